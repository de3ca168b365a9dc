"""Perceptual path length (Karras et al., "A Style-Based Generator Architecture for Generative Adversarial
Networks", CVPR 2019, Sec. 3).

PPL is the expected LPIPS distance (Zhang et al., CVPR 2018) between images generated from two latents an
epsilon apart on an interpolation path, divided by epsilon^2. ``ppl2_wend`` interpolates linearly in W and
samples path endpoints (t = 0), as StyleGAN2 reports it. Outliers outside the 1st-99th percentile are dropped.
"""

import numpy as np
import torch

import dnnlib
from metrics import metric_utils


def _slerp(a, b, t):
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    omega = (a * b).sum(dim=-1, keepdim=True).clamp(-1, 1).acos()
    out = (a * torch.sin((1 - t) * omega) + b * torch.sin(t * omega)) / torch.sin(omega)
    return out / out.norm(dim=-1, keepdim=True)


def _to_lpips_input(img: torch.Tensor, idx: list) -> torch.Tensor:
    """Generated [-1, 1] channels ``idx`` -> float RGB in [0, 255], at most 256 pixels wide (box-filtered)."""
    x = metric_utils.select_rgb(img, idx)
    factor = x.shape[-1] // 256
    if factor > 1:
        x = torch.nn.functional.avg_pool2d(x, factor)
    return ((x + 1) * (255 / 2)).to(torch.float32)


def filtered_mean(dist: np.ndarray) -> float:
    """Mean of the distances between the 1st and 99th percentiles (the paper's outlier rejection)."""
    lo = np.percentile(dist, 1, method='lower')
    hi = np.percentile(dist, 99, method='higher')
    return float(dist[(dist >= lo) & (dist <= hi)].mean())


@torch.no_grad()
def compute_ppl(
    opts,                       # Metric options.
    num_samples: int,           # Latent pairs over all ranks.
    epsilon: float = 1e-4,      # Step along the path.
    space: str = 'w',           # 'z' (spherical interpolation) or 'w' (linear).
    sampling: str = 'end',      # 'end' (t = 0) or 'full' (t uniform in [0, 1]).
) -> dict:
    """PPL per channel set ``{suffix: ppl}``; NaN on ranks other than 0."""
    assert space in ('z', 'w') and sampling in ('end', 'full')
    detector = metric_utils.get_detector(opts, 'vgg16')
    detector.check('lpips')
    dataset = metric_utils.get_dataset(opts)
    sets = metric_utils.channel_sets(dataset.channels, opts.channel)
    sampler = metric_utils.GeneratorSampler(opts, dataset)
    G = sampler.G
    noise_mode = sampler.G_kwargs.get('noise_mode', 'const')
    stats = {suffix: metric_utils.FeatureStats(capture_all=True, max_items=num_samples) for suffix, _ in sets}
    steps = (num_samples - 1) // (opts.batch_size * opts.num_gpus) + 1
    n = opts.batch_size
    with dnnlib.ProgressBar(num_samples, desc='ppl', unit='pairs', enabled=opts.progress) as bar:
        for _ in range(steps):
            t = torch.from_numpy(sampler.rng.rand(n, 1, 1).astype(np.float32)).to(opts.device)
            if sampling == 'end':
                t = t * 0
            c = sampler.labels_batch(n)
            z0, z1 = sampler.latents(n), sampler.latents(n)
            if space == 'w':
                w0, w1 = G.mapping(torch.cat([z0, z1]), torch.cat([c, c])).chunk(2)
                wa, wb = w0.lerp(w1, t), w0.lerp(w1, t + epsilon)
            else:
                za, zb = _slerp(z0, z1, t[:, 0]), _slerp(z0, z1, t[:, 0] + epsilon)
                wa, wb = G.mapping(torch.cat([za, zb]), torch.cat([c, c])).chunk(2)
            img = G.synthesis(torch.cat([wa, wb]), noise_mode=noise_mode).to(torch.float32)
            for suffix, idx in sets:
                lp = detector.lpips_features(_to_lpips_input(img, idx))
                la, lb = lp.chunk(2)
                dist = (la - lb).square().sum(dim=1) / epsilon ** 2
                stats[suffix].append_torch(dist[:, None], opts.num_gpus)
            bar.update(min(n * opts.num_gpus, num_samples - bar.done))
    if opts.rank != 0:
        return {suffix: float('nan') for suffix, _ in sets}
    return {suffix: filtered_mean(stats[suffix].get_all()[:, 0]) for suffix, _ in sets}
