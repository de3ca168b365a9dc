"""SSIM and multi-scale SSIM (Wang, Simoncelli & Bovik, "Multiscale Structural Similarity for Image Quality
Assessment", Asilomar 2003; Wang et al., IEEE TIP 2004), and the MS-SSIM diversity metric of Odena et al.
("Conditional Image Synthesis with Auxiliary Classifier GANs", ICML 2017): the mean MS-SSIM of random pairs of
images. Lower means more diverse; reported for generated and, side by side, for real images.

Images are float in [0, 1] with any number of channels; SSIM is computed per channel and averaged. The five
scales of the paper need images of at least 161 pixels with the 11-pixel window; smaller images use as many
scales as fit, with the paper's weights renormalised (docs/metrics.md). Volumes ``[N, C, D, H, W]`` work the same
way with a 3D Gaussian window (applied separably: 3 x 11 taps per voxel instead of 11^3) and 2x2x2 pooling between
scales, the 3D SSIM of volumetric GAN papers (e.g. 3D-StyleGAN, Hong et al., MICCAI DGM4MICCAI 2021).
"""

import math

import numpy as np
import torch

import dnnlib
from metrics import metric_utils

MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, Sec. 3.1.
K1, K2 = 0.01, 0.03


def _window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(torch.float32).expand(channels, 1, size, size).contiguous()


def _window_size(height: int, width: int, size: int = 11, depth: int = None) -> int:
    size = min(size, height, width, *([depth] if depth is not None else []))
    return size if size % 2 == 1 else size - 1


def _filter(channels: int, win_size: int, sigma: float, device):
    """'Valid' Gaussian filtering (as the paper) of ``[N, C, H, W]`` or, separably, of ``[N, C, D, H, W]``."""
    w = _window(win_size, sigma, channels, device)
    coords = torch.arange(win_size, dtype=torch.float64, device=device) - (win_size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(torch.float32)
    kernels = [g.reshape(shape).expand(channels, 1, *shape[2:]).contiguous()
               for shape in ([1, 1, -1, 1, 1], [1, 1, 1, -1, 1], [1, 1, 1, 1, -1])]

    def filt(t):
        if t.ndim == 4:
            return torch.nn.functional.conv2d(t, w, groups=channels)
        for k in kernels:
            t = torch.nn.functional.conv3d(t, k, groups=channels)
        return t
    return filt


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, win_size: int, sigma: float = 1.5):
    """Per-image, per-channel means of the luminance*cs map and of the cs map ``([N, C], [N, C])``."""
    channels = x.shape[1]
    dims = tuple(range(2, x.ndim))
    filt = _filter(channels, win_size, sigma, x.device)
    mu_x, mu_y = filt(x), filt(y)
    # (Co)variances are shift-invariant; centring first keeps E[x^2] - E[x]^2 from cancelling in float32.
    xc = x - x.mean(dim=dims, keepdim=True)
    yc = y - y.mean(dim=dims, keepdim=True)
    mu_xc, mu_yc = filt(xc), filt(yc)
    var_x = filt(xc * xc) - mu_xc ** 2
    var_y = filt(yc * yc) - mu_yc ** 2
    cov = filt(xc * yc) - mu_xc * mu_yc
    c1, c2 = K1 ** 2, K2 ** 2  # Dynamic range L = 1.
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (lum * cs).mean(dim=dims), cs.mean(dim=dims)


def _spatial_window(x: torch.Tensor, win_size: int) -> int:
    return _window_size(x.shape[-2], x.shape[-1], win_size, depth=x.shape[2] if x.ndim == 5 else None)


def ssim(x: torch.Tensor, y: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """Mean SSIM ``[N]`` of image pairs ``x, y [N, C, H, W]`` (or volumes ``[N, C, D, H, W]``) in [0, 1]
    (channels averaged)."""
    assert x.shape == y.shape and x.ndim in (4, 5), (x.shape, y.shape)
    s, _ = _ssim_terms(x.to(torch.float32), y.to(torch.float32), _spatial_window(x, win_size))
    return s.mean(dim=1)


def num_scales(height: int, width: int, win_size: int = 11, depth: int = None) -> int:
    """Scales that fit: each halves the image, and the coarsest must still hold one window."""
    side = min(height, width, *([depth] if depth is not None else []))
    return max(1, min(len(MS_WEIGHTS), 1 + int(math.floor(math.log2(max(side / win_size, 1))))))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """MS-SSIM ``[N]`` of image pairs ``x, y [N, C, H, W]`` (or volumes ``[N, C, D, H, W]``) in [0, 1]
    (channels averaged)."""
    assert x.shape == y.shape and x.ndim in (4, 5), (x.shape, y.shape)
    x, y = x.to(torch.float32), y.to(torch.float32)
    levels = num_scales(x.shape[-2], x.shape[-1], win_size, depth=x.shape[2] if x.ndim == 5 else None)
    pool = torch.nn.functional.avg_pool2d if x.ndim == 4 else torch.nn.functional.avg_pool3d
    weights = torch.tensor(MS_WEIGHTS[:levels], dtype=torch.float32, device=x.device)
    weights = weights / weights.sum()
    factors = []
    for level in range(levels):
        s, cs = _ssim_terms(x, y, _spatial_window(x, win_size))
        # Negative contrast-structure terms (anti-correlated patches) would make fractional powers NaN.
        factors.append((s if level == levels - 1 else cs).clamp(min=0))
        if level < levels - 1:
            x, y = pool(x, 2), pool(y, 2)
    stacked = torch.stack(factors, dim=0)  # [levels, N, C]
    return torch.prod(stacked ** weights[:, None, None], dim=0).mean(dim=1)


def image_channels(names: list, channel=None) -> list:
    """Channel indices measured together by the pixel-space metrics: the chosen one, else every image channel."""
    return sorted({i for _suffix, idx in metric_utils.channel_sets(names, channel) for i in idx})


@torch.no_grad()
def compute_msssim_diversity(opts, num_images: int, dataset=None, sampler=None) -> dict:
    """``{'gen': mean MS-SSIM of generated pairs, 'real': same for real pairs}``; NaN on ranks other than 0.
    ``dataset``/``sampler``: the real data and the generator sampler (default: the 2D ones of metric_utils)."""
    dataset = dataset if dataset is not None else metric_utils.get_dataset(opts)
    idx = image_channels(dataset.channels, opts.channel)
    num_pairs = max(num_images // 2, 1)

    gen = metric_utils.FeatureStats(capture_all=True, max_items=num_pairs)
    sampler = sampler if sampler is not None else metric_utils.GeneratorSampler(opts, dataset)
    for img in metric_utils.generated_batches(opts, sampler, num_pairs * 2, desc='ms-ssim fakes'):
        img = metric_utils.to_unit(img[:, idx])
        half = img.shape[0] // 2
        gen.append_torch(ms_ssim(img[:half], img[half:2 * half])[:, None], opts.num_gpus)

    rng = np.random.RandomState([opts.seed, 1])
    pairs = rng.randint(len(dataset), size=[num_pairs, 2])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]] if len(dataset) > 1 else pairs  # An image paired with itself says nothing.
    real = metric_utils.FeatureStats(capture_all=True, max_items=len(pairs))
    shard = metric_utils._shard(np.arange(len(pairs)), opts)
    step = max(opts.batch_size // 2, 1)
    with dnnlib.ProgressBar(len(pairs), desc='ms-ssim reals', unit='pairs', enabled=opts.progress) as bar:
        for start in range(0, len(shard), step):
            rows = pairs[shard[start:start + step]]
            load = lambda col: torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in rows[:, col]])  # noqa: E731
            a = metric_utils.to_unit(load(0)[:, idx], dataset.dtype_max).to(opts.device)
            b = metric_utils.to_unit(load(1)[:, idx], dataset.dtype_max).to(opts.device)
            real.append_torch(ms_ssim(a, b)[:, None], opts.num_gpus)
            bar.update(len(rows) * opts.num_gpus)
    if opts.rank != 0:
        return dict(gen=float('nan'), real=float('nan'))
    return dict(gen=float(gen.get_all().mean()), real=float(real.get_all().mean()))
