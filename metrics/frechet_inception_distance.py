"""Frechet Inception Distance (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium", NeurIPS 2017).

FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), between Gaussians fitted to the Inception pool3
features of real and generated images.
"""

import numpy as np
import scipy.linalg

from metrics import metric_utils


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """Principal matrix square root; scipy's warnings about near-singular input are expected here (few samples)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return scipy.linalg.sqrtm(a)


def frechet_distance(
    mu1: np.ndarray,            # Mean [F] of the first set.
    sigma1: np.ndarray,         # Covariance [F, F] of the first set.
    mu2: np.ndarray,            # Mean [F] of the second set.
    sigma2: np.ndarray,         # Covariance [F, F] of the second set.
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2, (mu1.shape, sigma1.shape)
    mean_term = np.square(mu1 - mu2).sum()
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than features): a tiny ridge keeps sqrtm defined.
        eps = 1e-6 * np.eye(sigma1.shape[0])
        covmean = _sqrtm((sigma1 + eps) @ (sigma2 + eps))
    # Round-off gives the square root a negligible imaginary part; its trace is real in exact arithmetic.
    return float(np.real(mean_term + np.trace(sigma1 + sigma2 - 2 * covmean)))


def compute_fid(
    opts,                       # Metric options.
    max_real: int,              # Reals to use (random subset); None = the whole archive.
    num_gen: int,               # Generated images.
    labels=None,                # Condition G on these label rows; None = all real labels.
    real_indices=None,          # Restrict reals to these indices (fid_per_class); None = all.
    tag: str = 'all',           # Names that restriction in the cache key.
) -> dict:
    """FID per channel set ``{suffix: fid}``; NaN on ranks other than 0."""
    detector = metric_utils.get_detector(opts, 'inception')
    sets = metric_utils.channel_sets(metric_utils.get_dataset(opts).channels, opts.channel)
    real = metric_utils.compute_feature_stats_for_dataset(opts, detector, sets, max_items=max_real, indices=real_indices,
                                                          tag=tag, capture_mean_cov=True)
    gen = metric_utils.compute_feature_stats_for_generator(opts, detector, sets, num_items=num_gen, labels=labels,
                                                           capture_mean_cov=True)
    if opts.rank != 0:
        return {suffix: float('nan') for suffix, _ in sets}
    out = {}
    for suffix, _ in sets:
        mu_r, sigma_r = real[suffix].get_mean_cov()
        mu_g, sigma_g = gen[suffix].get_mean_cov()
        out[suffix] = frechet_distance(mu_r, sigma_r, mu_g, sigma_g)
    return out
