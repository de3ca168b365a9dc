"""Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", ICLR 2018).

KID is the unbiased estimate of the squared maximum mean discrepancy between Inception features of real and
generated images under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.
"""

import numpy as np

from metrics import metric_utils


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-sized sets ``x, y [m, d]`` with k(a, b) = (a.b / d + 1)^3 (Eq. 3 of the paper)."""
    assert x.ndim == 2 and x.shape == y.shape and x.shape[0] > 1, (x.shape, y.shape)
    m, d = x.shape
    x, y = x.astype(np.float64), y.astype(np.float64)
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))  # i != j only.
    return float(within - 2 * k_xy.sum() / (m * m))


def kid_from_features(
    real: np.ndarray,           # Real features [Nr, d].
    gen: np.ndarray,            # Generated features [Ng, d].
    num_subsets: int = 100,     # Random subsets averaged.
    max_subset_size: int = 1000,  # Subset size (capped by the smaller set).
    seed: int = 0,              # Subset sampling seed.
) -> float:
    m = min(len(real), len(gen), max_subset_size)
    if m < 2:
        raise metric_utils.MetricError(f'KID needs at least two real and two generated images (got {len(real)}, {len(gen)})')
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        total += polynomial_mmd2(real[rng.choice(len(real), m, replace=False)], gen[rng.choice(len(gen), m, replace=False)])
    return total / num_subsets


def compute_kid(opts, max_real: int, num_gen: int, num_subsets: int = 100, max_subset_size: int = 1000) -> dict:
    """KID per channel set ``{suffix: kid}``; NaN on ranks other than 0."""
    detector = metric_utils.get_detector(opts, 'inception')
    sets = metric_utils.channel_sets(metric_utils.get_dataset(opts).channels, opts.channel)
    real = metric_utils.compute_feature_stats_for_dataset(opts, detector, sets, max_items=max_real, capture_all=True)
    gen = metric_utils.compute_feature_stats_for_generator(opts, detector, sets, num_items=num_gen, capture_all=True)
    if opts.rank != 0:
        return {suffix: float('nan') for suffix, _ in sets}
    return {suffix: kid_from_features(real[suffix].get_all(), gen[suffix].get_all(), num_subsets, max_subset_size, opts.seed)
            for suffix, _ in sets}
