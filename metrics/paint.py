"""Metrics of tumour-painting generators (training.paint.PaintGenerator) on a patch archive: how well do they fill a
region with healthy tissue? ``paint_ssim``, ``paint_psnr``, ``paint_mse``, per modality and averaged.

The protocol is that of the BraTS inpainting challenge ("Local Synthesis of Healthy Brain Tissue via Inpainting",
Kofler et al., arXiv:2305.08992; 2023 and 2024 editions, the same scoring), as its evaluation code computes it
(github.com/BraTS-inpainting/2023_challenge, ``evaluation/evaluation_utils.py: compute_metrics``, which the challenge
server runs on ``[1, 1, X, Y, Z]`` tensors):

1. The repaint region is a tumour-shaped mask inside healthy brain; the painter sees the image with the region
   blanked, and its output is compared with the real tissue there.
2. Both images are cut to the region (``image * mask``, zero elsewhere) and normalised to [0, 1] with the 0.5 and
   99.5 percentiles of the *real* image outside the region (``real * ~mask``, the whole array, zeros included; the
   lower one raised to 0 if negative): clip to [lo, hi], then ``(x - lo) / (hi - lo)``.
3. SSIM (Wang et al., IEEE TIP 2004) as torchmetrics computes it with its defaults: a Gaussian window of 11 voxels
   per axis, sigma 1.5, K1 = 0.01, K2 = 0.03, reflection padding at the array border, the data range taken from the
   two normalised images (the larger max - min); 3D for volumes (the challenge's 5-D input), 2D for 2D patches. The
   SSIM map over the whole array is averaged over the voxels of the region.
4. MSE over the voxels of the region; PSNR with a fixed data range of 1 (``10 log10(1 / MSE)``) over the same voxels.
   A painter that reproduces the tissue exactly has PSNR infinity; it is capped at ``PSNR_CAP`` dB so that means stay
   finite (reached only below an MSE of 1e-10).
5. Each score per painted item and modality, then the mean over items (the challenge's mean over cases).

Our data: each healthy patch of the archive (dataset.json ``patches`` type ``healthy``) is one item. Its intensities,
stored in [-1, 1] with background -1 (the archive's own percentile normalisation, linear inside the brain), are mapped
to [0, 1] by ``(x + 1) / 2`` (background 0, as in a BraTS file); the percentile normalisation of step 2 makes the
scores independent of the linear map. The reference of step 2 is the patch outside the region (the context the
painter sees), where the challenge uses the whole scan outside it.

The repaint masks are the training masks in healthy mode (``mri.painting.masks.RepaintMasks(...)(labels, brain,
mode='healthy', generator=g)``: the shape of one of the archive's tumours, flipped and moved into brain tissue),
reached by ``class_name`` (``opts.paint_masks``), because metrics/ does not import mri/ (DESIGN.md). Everything random
is seeded per item from ``opts.seed`` (masks, shape donors, latents): a metric is repeatable, and independent of the
batch size and of the number of GPUs.
"""

import copy
import json

import numpy as np
import torch

import dnnlib
from metrics import metric_utils

PAINT_METRICS = ('paint_ssim', 'paint_psnr', 'paint_mse', 'insert_dice')
MASKS = dnnlib.EasyDict(class_name='mri.painting.masks.RepaintMasks')  # opts.paint_masks overrides (class_name + kwargs)
SSIM_WINDOW = 11            # voxels per axis (torchmetrics: int(3.5 * sigma + 0.5) * 2 + 1)
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PERCENTILES = (0.5, 99.5)   # step 2 of the protocol
PSNR_CAP = 100.0            # dB; 10 log10(1 / 1e-10)
DONOR_POOL = 32             # tumour patches whose shapes healthy masks borrow
DONORS_PER_ITEM = 3         # of them, offered to the mask sampler per item
VOLUME_BATCH = 4            # 3D patches per rank per G call (opts.volume_batch overrides)


# ----------------------------------------------------------------------------
# Which generator, which data.

def is_paint_generator(G) -> bool:
    """A tumour-painting generator (training.paint.PaintGenerator): it names the channels it paints and the label
    channels it is conditioned on. (Duck-typed: metrics/ does not import training/.)"""
    return G is not None and hasattr(G, 'paint_channels') and hasattr(G, 'label_channels')


def generator_problem(metric: str, G) -> str:
    """Why ``metric`` cannot measure ``G`` (one line), or None: a paint metric needs a paint generator, every other
    metric a whole-image one."""
    if G is None:
        return None
    paint = is_paint_generator(G)
    if metric in PAINT_METRICS and not paint:
        return (f'{metric} measures tumour-painting generators (a snapshot trained on a patch archive, '
                f'dataset_tool.py --kind patches); this snapshot holds a whole-image generator ({type(G).__name__}): '
                f'use fid10k_full, msssim_div, ssim_nn, mask_dice, ... (docs/metrics.md)')
    if metric not in PAINT_METRICS and paint:
        return (f'{metric} measures whole-image generators; this snapshot paints tumours into patches '
                f'({type(G).__name__}): use {", ".join(PAINT_METRICS)} (docs/metrics.md)')
    return None


class PatchArchive:
    """A patch archive (dataset.json ``kind: patches``) as the paint metrics read it: the paint, label and brain
    channels of each patch, which patches are healthy and which hold a tumour, and their conditioning labels."""

    def __init__(self, opts, G):
        if not opts.dataset_kwargs:
            raise metric_utils.MetricError('no real data given (dataset_kwargs is empty); pass --data')
        kwargs = dict(opts.dataset_kwargs)
        kwargs.setdefault('class_name', 'training.dataset.ImageFolderDataset')
        kwargs.update(xflip=False, max_size=None)
        self.dataset = dataset = dnnlib.construct_class_by_name(**kwargs)
        self.path = getattr(dataset, 'path', kwargs.get('path'))
        if getattr(dataset, 'kind', None) != 'patches':
            raise metric_utils.MetricError(f'{self.path}: holds {getattr(dataset, "kind", "images")}, not patches; the '
                                           f'paint metrics measure a patch archive (dataset_tool.py --kind patches)')
        names = list(dataset.channels)
        self.names = names
        missing = [n for n in list(G.paint_channels) + list(G.label_channels) + ['brain'] if n not in names]
        if missing:
            raise metric_utils.MetricError(f'{self.path}: has channels {names}, but the generator paints '
                                           f'{list(G.paint_channels)} from labels {list(G.label_channels)} and the '
                                           f'metrics need a brain channel too ({", ".join(missing)} missing)')
        self.paint_idx = [names.index(n) for n in G.paint_channels]
        self.label_idx = [names.index(n) for n in G.label_channels]
        self.brain_idx = names.index('brain')
        self.spatial = list(dataset.image_shape[1:])
        if list(getattr(G, 'img_shape', self.spatial)) != self.spatial:
            raise metric_utils.MetricError(f'{self.path}: holds patches of {"x".join(map(str, self.spatial))}, but the '
                                           f'generator paints {"x".join(map(str, G.img_shape))}; pass the matching --data')
        self.dtype_max = dataset.dtype_max
        self.c_dim = int(getattr(G, 'c_dim', 0))
        if self.c_dim and (not dataset.has_labels or dataset.label_dim != self.c_dim):
            raise metric_utils.MetricError(f'{self.path}: the generator is conditional on {self.c_dim} labels, but the '
                                           f'archive has {dataset.label_dim if dataset.has_labels else "no"} labels; '
                                           f'pass the archive it was trained on')
        info = self._patch_info()
        types = [info.get(dataset.image_fname(i), {}).get('type') for i in range(len(dataset))]
        self.healthy = [i for i, t in enumerate(types) if t == 'healthy']
        self.tumour = [i for i, t in enumerate(types) if t == 'tumour']
        if not self.healthy and not self.tumour:
            raise metric_utils.MetricError(f'{self.path}: dataset.json "patches" records no patch type (healthy or '
                                           f'tumour); rebuild it with dataset_tool.py --kind patches')

    def _patch_info(self) -> dict:
        """dataset.json ``patches``: ``{relpath: {'case', 'centre', 'type', ...}}``."""
        info = getattr(self.dataset, 'patch_info', None)
        if info is None:
            info = (getattr(self.dataset, '_meta', None) or {}).get('patches')
        return dict(info or {})

    def load(self, idx: int) -> tuple:
        """``(paint channels float32 [M, *S] in [-1, 1], labels bool [K, *S], brain bool [1, *S], c float32 [L])``."""
        raw = torch.from_numpy(np.asarray(self.dataset[idx][0], dtype=np.float32))
        image = raw[self.paint_idx] / self.dtype_max * 2 - 1
        labels = raw[self.label_idx] > self.dtype_max / 2
        brain = raw[self.brain_idx:self.brain_idx + 1] > self.dtype_max / 2
        c = np.asarray(self.dataset.get_label(idx), np.float32).reshape(-1) if self.c_dim else np.zeros([0], np.float32)
        return image, labels, brain, torch.from_numpy(c)

    def order(self, indices: list, seed: int, salt: int) -> list:
        """A seeded permutation of ``indices``: item k of a metric is patch ``order[k % len]``."""
        return [indices[j] for j in np.random.RandomState([seed, salt]).permutation(len(indices))]


def item_rng(seed: int, item: int, salt: int) -> tuple:
    """(numpy RandomState, CPU torch.Generator) of one item: its draws never depend on batching or ranks."""
    rng = np.random.RandomState([seed % (1 << 31), item, salt])
    gen = torch.Generator().manual_seed(int(rng.randint(1 << 31)))
    return rng, gen


def mask_sampler(opts):
    """The repaint-mask sampler, built by name (``opts.paint_masks``, default ``MASKS``)."""
    spec = dnnlib.EasyDict(opts.get('paint_masks') or MASKS)
    try:
        return dnnlib.construct_class_by_name(**spec)
    except (ImportError, AttributeError) as err:
        raise metric_utils.MetricError(f'repaint-mask sampler {spec.class_name!r} cannot be built ({err})') from None


def donor_pool(archive: PatchArchive, seed: int) -> list:
    """Label maps ``bool [K, *S]`` of up to ``DONOR_POOL`` tumour patches (seeded choice): the shapes masks borrow."""
    pool = []
    for idx in archive.order(archive.tumour, seed, 0xD0)[:DONOR_POOL]:
        labels = archive.load(idx)[1]
        if labels.any():
            pool.append(labels)
    return pool


class Painter:
    """A copy of the paint generator on the device, called as the spec fixes: ``G(z, c, context=, mask=, labels=)``."""

    def __init__(self, opts, archive: PatchArchive):
        self.G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
        self.kwargs = dict(opts.G_kwargs)
        self.kwargs.setdefault('noise_mode', 'const')
        self.device = opts.device
        self.z_dim = int(self.G.z_dim)
        self.batch = opts.batch_size if len(archive.spatial) == 2 else \
            max(1, min(opts.batch_size, int(opts.get('volume_batch') or VOLUME_BATCH)))

    def latent(self, rng) -> torch.Tensor:
        return torch.from_numpy(rng.randn(self.z_dim).astype(np.float32))

    @torch.no_grad()
    def __call__(self, z, c, real, mask, labels) -> torch.Tensor:
        """Paint ``mask`` of ``real`` [N, M, *S] (blanked there, so nothing of it leaks) with ``labels``; float32 out."""
        mask = mask.to(self.device, torch.float32)
        context = real.to(self.device) * (1 - mask)
        out = self.G(z.to(self.device), c.to(self.device), context=context, mask=mask,
                     labels=labels.to(self.device, torch.float32), **self.kwargs)
        if tuple(out.shape) != tuple(real.shape):
            raise metric_utils.MetricError(f'the generator painted {list(out.shape)} for patches {list(real.shape)}')
        return out.to(torch.float32)


# ----------------------------------------------------------------------------
# The BraTS inpainting scores.

def _gaussian_window(spatial_dims: int, device) -> torch.Tensor:
    d = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-0.5 * (d / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    w = g
    for _ in range(spatial_dims - 1):
        w = w[..., None] * g
    return w[None, None]


def ssim_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-voxel SSIM ``[N, 1, *S]`` of ``pred, target [N, 1, *S]`` (torchmetrics' defaults, protocol step 3)."""
    dims = pred.ndim - 2
    pad = (SSIM_WINDOW - 1) // 2
    if min(pred.shape[2:]) <= pad:
        raise metric_utils.MetricError(f'patches of {"x".join(map(str, pred.shape[2:]))} are too small for the '
                                       f'{SSIM_WINDOW}-voxel SSIM window (at least {pad + 1} per axis)')
    flat = lambda x: x.flatten(1).amax(1) - x.flatten(1).amin(1)  # noqa: E731
    data_range = torch.maximum(flat(pred), flat(target)).view(-1, *[1] * (dims + 1))
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    n = pred.shape[0]
    stack = torch.cat([pred, target, pred * pred, target * target, pred * target])
    stack = torch.nn.functional.pad(stack, [pad] * (2 * dims), mode='reflect')
    conv = torch.nn.functional.conv3d if dims == 3 else torch.nn.functional.conv2d
    mu_p, mu_t, pp, tt, pt = conv(stack, _gaussian_window(dims, pred.device)).split(n)
    var_p = (pp - mu_p ** 2).clamp(min=0)
    var_t = (tt - mu_t ** 2).clamp(min=0)
    cov = pt - mu_p * mu_t
    return ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))


def brats_scores(real: torch.Tensor, painted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores ``[N, M, 3]`` (SSIM, PSNR, MSE) per item and modality, NaN where an item has no usable region.

    Args:
        real:    real patches [N, M, *S] in [-1, 1].
        painted: painted patches [N, M, *S] in about [-1, 1].
        mask:    repaint regions [N, 1, *S] in {0, 1}.
    """
    n, m = real.shape[:2]
    spatial = list(real.shape[2:])
    gt = ((real.to(torch.float32) + 1) / 2).reshape(n * m, 1, *spatial)
    pr = ((painted.to(torch.float32) + 1) / 2).reshape(n * m, 1, *spatial)
    region = mask.bool().expand(n, m, *spatial).reshape(n * m, 1, *spatial)
    # Step 2: percentiles of the real image outside the region (masked voxels count as zeros, as in the challenge).
    reference = (gt * ~region).flatten(1).to(torch.float64)
    lo, hi = torch.quantile(reference, torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64,
                                                    device=reference.device), dim=1).to(torch.float32)
    lo = lo.clamp(min=0)
    shape = [-1] + [1] * (len(spatial) + 1)
    lo, hi = lo.view(shape), hi.view(shape)
    scale = (hi - lo).clamp(min=1e-12)
    gt_n = (torch.minimum(torch.maximum(gt * region, lo), hi) - lo) / scale
    pr_n = (torch.minimum(torch.maximum(pr * region, lo), hi) - lo) / scale
    # Steps 3 and 4.
    count = region.flatten(1).sum(1).to(torch.float32)
    ssim = (ssim_map(pr_n, gt_n) * region).flatten(1).sum(1) / count.clamp(min=1)
    mse = ((pr_n - gt_n).square() * region).flatten(1).sum(1) / count.clamp(min=1)
    psnr = (10 * torch.log10(1 / mse.clamp(min=10 ** (-PSNR_CAP / 10)))).clamp(max=PSNR_CAP)
    out = torch.stack([ssim, psnr, mse], dim=1)
    usable = (count > 0) & (hi.flatten() > lo.flatten())
    out[~usable] = float('nan')
    return out.view(n, m, 3)


# ----------------------------------------------------------------------------
# The metrics.

def _memo_key(opts, num_items: int):
    return ('paint_scores', id(opts.G), json.dumps(dict(opts.G_kwargs), sort_keys=True, default=str),
            json.dumps(dict(opts.dataset_kwargs), sort_keys=True, default=str),
            json.dumps(dict(opts.get('paint_masks') or MASKS), sort_keys=True, default=str), num_items, opts.seed)


def _all_reduce(t: torch.Tensor, opts) -> torch.Tensor:
    if opts.num_gpus > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def compute_paint_scores(opts, num_items: int = None) -> dict:
    """``{'ssim' | 'psnr' | 'mse': {modality: mean over items}, 'items': n}``: healthy masks in the archive's healthy
    patches, painted with all-zero labels. ``num_items`` (None = every healthy patch, at most 1000; more repeats
    patches with other masks). Computed once per evaluation for the three metrics (``opts.feature_memo``)."""
    archive = PatchArchive(opts, opts.G)
    if not archive.healthy:
        raise metric_utils.MetricError(f'{archive.path}: holds no healthy patch to paint (dataset.json "patches" '
                                       f'types); the paint metrics fill healthy tissue')
    num_items = metric_utils.num_generated(opts, min(len(archive.healthy), 1000)) if num_items is None else num_items
    memo = opts.get('feature_memo')
    key = _memo_key(opts, num_items)
    if memo is not None and key in memo.generated:
        return memo.generated[key]
    sampler = mask_sampler(opts)
    pool = donor_pool(archive, opts.seed)
    painter = Painter(opts, archive)
    order = archive.order(archive.healthy, opts.seed, 0x4EA)
    names = [archive.names[i] for i in archive.paint_idx]
    sums = torch.zeros([len(names), 3], dtype=torch.float64)
    counts = torch.zeros([len(names)], dtype=torch.float64)
    mine = list(range(opts.rank, num_items, opts.num_gpus))
    with dnnlib.ProgressBar(num_items, desc='paint', unit='patches', enabled=opts.progress) as bar:
        for start in range(0, len(mine), painter.batch):
            batch = []
            for k in mine[start:start + painter.batch]:
                image, labels, brain, c = archive.load(order[k % len(order)])
                rng, gen = item_rng(opts.seed, k, 0x4EA)
                donors = [pool[j] for j in rng.choice(len(pool), min(DONORS_PER_ITEM, len(pool)), replace=False)] \
                    if pool else []
                mask, _target = sampler(torch.stack([labels] + donors), torch.stack([brain] * (1 + len(donors))),
                                        mode='healthy', generator=gen)
                batch.append((painter.latent(rng), c, image, mask[0]))
            z, c, real, mask = (torch.stack(x) for x in zip(*batch))
            painted = painter(z, c, real, mask, torch.zeros([len(batch), len(archive.label_idx)] + archive.spatial))
            scores = brats_scores(real.to(painted.device), painted, mask.to(painted.device)).cpu().to(torch.float64)
            ok = ~scores.isnan().any(dim=2)  # [N, M]
            sums += torch.where(ok[..., None], scores, torch.zeros_like(scores)).sum(0)
            counts += ok.sum(0)
            bar.update(min(len(batch) * opts.num_gpus, num_items - bar.done))
    totals = _all_reduce(torch.cat([sums.flatten(), counts]).to(opts.device), opts).cpu()
    sums, counts = totals[:sums.numel()].view(sums.shape), totals[sums.numel():]
    if not (counts > 0).all():
        raise metric_utils.MetricError(f'{archive.path}: no healthy patch held a usable repaint region (brain tissue '
                                       f'outside the mask to normalise against)')
    means = sums / counts[:, None]
    out = {what: {name: float(means[j, w]) for j, name in enumerate(names)} for w, what in enumerate(('ssim', 'psnr', 'mse'))}
    out['items'] = int(counts.min())
    if memo is not None:
        memo.generated[key] = out
    return out


def results(name: str, per_modality: dict) -> dict:
    """``{name: mean over modalities, name_<modality>: value}`` (the plain key alone for one modality)."""
    return metric_utils.per_channel_results(name, per_modality if len(per_modality) > 1 else {None: next(iter(per_modality.values()))})
