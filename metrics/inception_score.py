"""Inception Score (Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016).

IS = exp(E_x KL(p(y|x) || p(y))), computed on splits of the generated set; mean and standard deviation over
splits are reported. It needs the class outputs of the canonical Inception network.
"""

import numpy as np

from metrics import metric_utils


def inception_score(probs: np.ndarray, num_splits: int = 10) -> tuple:
    """``(mean, std)`` of the score over ``num_splits`` contiguous splits of ``probs [N, K]``."""
    probs = np.asarray(probs, np.float64)
    assert probs.ndim == 2 and probs.shape[0] >= num_splits, (probs.shape, num_splits)
    scores = []
    for part in np.array_split(probs, num_splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def compute_is(opts, num_gen: int, num_splits: int = 10) -> tuple:
    """``({suffix: mean}, {suffix: std})``; NaN on ranks other than 0."""
    detector = metric_utils.get_detector(opts, 'inception')
    detector.check('class_probs')  # Before minutes of generation, not after.
    sets = metric_utils.channel_sets(metric_utils.get_dataset(opts).channels, opts.channel)
    gen = metric_utils.compute_feature_stats_for_generator(opts, detector, sets, num_items=num_gen, what='class_probs',
                                                           capture_all=True)
    if opts.rank != 0:
        nan = {suffix: float('nan') for suffix, _ in sets}
        return nan, dict(nan)
    mean, std = {}, {}
    for suffix, _ in sets:
        mean[suffix], std[suffix] = inception_score(gen[suffix].get_all(), min(num_splits, gen[suffix].num_items))
    return mean, std
