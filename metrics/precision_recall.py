"""Improved precision and recall (Kynkaanniemi et al., "Improved Precision and Recall Metric for Assessing
Generative Models", NeurIPS 2019).

Each set's manifold is the union of balls around its VGG16 features, with radius the distance to the k-th
nearest neighbour in the same set. Precision is the fraction of generated features inside the real manifold;
recall the fraction of real features inside the generated manifold.
"""

import numpy as np
import torch

from metrics import metric_utils


def knn_radii(feats: torch.Tensor, k: int, batch: int = 4096) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row ``[N]``."""
    assert feats.ndim == 2 and feats.shape[0] > k, (feats.shape, k)
    radii = []
    for start in range(0, feats.shape[0], batch):
        dist = torch.cdist(feats[start:start + batch], feats)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # k + 1: the nearest row is the point itself, at 0.
    return torch.cat(radii)


def manifold_coverage(ref: torch.Tensor, radii: torch.Tensor, query: torch.Tensor, batch: int = 4096) -> float:
    """Fraction of ``query`` rows within ``radii[i]`` of some ``ref[i]``."""
    inside = []
    for start in range(0, query.shape[0], batch):
        dist = torch.cdist(query[start:start + batch], ref)
        inside.append((dist <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real: np.ndarray, gen: np.ndarray, nhood_size: int = 3, device='cpu') -> tuple:
    real_t = torch.as_tensor(real, dtype=torch.float32, device=device)
    gen_t = torch.as_tensor(gen, dtype=torch.float32, device=device)
    if min(len(real_t), len(gen_t)) <= nhood_size:
        raise metric_utils.MetricError(f'precision/recall with k={nhood_size} needs more than {nhood_size} real and '
                                       f'generated images (got {len(real_t)}, {len(gen_t)})')
    precision = manifold_coverage(real_t, knn_radii(real_t, nhood_size), gen_t)
    recall = manifold_coverage(gen_t, knn_radii(gen_t, nhood_size), real_t)
    return precision, recall


def compute_pr(opts, max_real: int, num_gen: int, nhood_size: int = 3) -> tuple:
    """``({suffix: precision}, {suffix: recall})`` on VGG16 features; NaN on ranks other than 0."""
    detector = metric_utils.get_detector(opts, 'vgg16')
    sets = metric_utils.channel_sets(metric_utils.get_dataset(opts).channels, opts.channel)
    real = metric_utils.compute_feature_stats_for_dataset(opts, detector, sets, max_items=max_real, capture_all=True)
    gen = metric_utils.compute_feature_stats_for_generator(opts, detector, sets, num_items=num_gen, capture_all=True)
    if opts.rank != 0:
        nan = {suffix: float('nan') for suffix, _ in sets}
        return nan, dict(nan)
    precision, recall = {}, {}
    for suffix, _ in sets:
        precision[suffix], recall[suffix] = precision_recall(real[suffix].get_all(), gen[suffix].get_all(), nhood_size,
                                                             opts.device)
    return precision, recall
