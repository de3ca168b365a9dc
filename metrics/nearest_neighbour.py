"""Nearest-neighbour memorisation indicators: for each generated image, its distance to the closest real
training image, in mean squared error (``mse_nn``) or SSIM (``ssim_nn``; Wang et al., IEEE TIP 2004).

Distances alone do not say what is "too close", so each is set beside the real-to-real baseline: the median
distance from a real image to its nearest other real image (excluding images of the same case when the
archive records cases, since neighbouring slices of one volume are near-duplicates). The fraction of
generated images closer to the training set than that median is the memorisation indicator (about 0 for a
generator that does not copy, approaching 1 for one that reproduces training images). Following the idea of
Webster et al. ("Detecting Overfitting of Deep Generative Networks via Latent Recovery", CVPR 2019) and the
copy detection of Meehan et al. (AISTATS 2020), in pixel space.

SSIM to every real image is costly, so ``ssim_nn`` scores the ``ssim_candidates`` nearest reals by MSE.
Images are compared at most ``nn_resolution`` pixels wide (box-filtered) to bound memory.
"""

import numpy as np
import torch

import dnnlib
from metrics import metric_utils
from metrics import msssim

NN_RESOLUTION = 128         # Comparison size cap (pixels).
SSIM_CANDIDATES = 8         # Reals (nearest by MSE) scored by SSIM per query.
MAX_REAL_QUERIES = 1000     # Reals used to estimate the real-to-real baseline.


def _shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    factor = max(x.shape[-1] // size, 1)
    pool = torch.nn.functional.avg_pool2d if x.ndim == 4 else torch.nn.functional.avg_pool3d  # images or volumes
    return pool(x, factor) if factor > 1 else x


def _case_ids(dataset) -> np.ndarray:
    """Case id per item (for excluding same-case neighbours), or None when the archive does not record cases."""
    if not hasattr(dataset, 'file_case'):
        return None
    ids = [dataset.file_case(i) for i in range(len(dataset))]
    if all(case is None for case in ids):
        return None
    return np.array([str(case) if case is not None else f'#{i}' for i, case in enumerate(ids)])


def cases_problem(dataset) -> str:
    """Why the real-to-real baseline cannot be measured on ``dataset`` (one line), or None. With the images of
    one case only, every real neighbour is a slice of the same volume (excluded as a near-duplicate), and using
    them anyway gave a meaningless baseline (a median SSIM of 0.974)."""
    cases = _case_ids(dataset)
    if cases is None:
        return None
    distinct = sorted(set(cases.tolist()))
    if len(distinct) >= 2:
        return None
    subset = getattr(dataset, 'subset', None)
    where = f'{getattr(dataset, "path", "the data")}' + (f' (subset {subset})' if subset not in (None, 'all') else '')
    return (f'{where} holds one case ({distinct[0]}); nearest neighbours measure against real images of other cases '
            f'(slices of one case are near-duplicates), so they need at least two: use another --subset or more cases')


def load_real_pool(opts, dataset, idx: list, max_items: int = None) -> torch.Tensor:
    """Real images ``[N, C, h, w]`` float16 in [0, 1] on the device (every rank holds the whole pool)."""
    loader = metric_utils.real_loader(opts, dataset)
    pool = []
    with dnnlib.ProgressBar(len(dataset), desc='nn reals', unit='images', enabled=opts.progress) as bar:
        for images, _labels in loader:
            x = metric_utils.to_unit(torch.as_tensor(images)[:, idx], dataset.dtype_max)
            pool.append(_shrink(x, opts.get('nn_resolution') or NN_RESOLUTION).to(opts.device, torch.float16))
            bar.update(x.shape[0])
    return torch.cat(pool)


def nearest_mse(query: torch.Tensor, pool: torch.Tensor, exclude: torch.Tensor = None, k: int = 1, chunk: int = 2048):
    """``(mse [Q, k], index [Q, k])`` of the k nearest pool images by mean squared error.

    ``exclude [Q, P]`` (bool) marks pairs that may not be neighbours (the image itself, same-case images).
    """
    q = query.flatten(1).to(torch.float32)
    q_sq = q.square().sum(1, keepdim=True)
    best_d, best_i = None, None
    for start in range(0, pool.shape[0], chunk):
        p = pool[start:start + chunk].flatten(1).to(torch.float32)
        d = (q_sq + p.square().sum(1)[None] - 2 * q @ p.T).clamp(min=0) / q.shape[1]  # |q - p|^2 / D
        if exclude is not None:
            d = d.masked_fill(exclude[:, start:start + chunk], float('inf'))
        idx = torch.arange(start, start + p.shape[0], device=d.device).expand_as(d)
        if best_d is not None:
            d, idx = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        best_d, order = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = idx.gather(1, order)
    return best_d, best_i


def nearest_ssim(query: torch.Tensor, pool: torch.Tensor, exclude: torch.Tensor = None, candidates: int = SSIM_CANDIDATES):
    """Highest SSIM ``[Q]`` of each query to its ``candidates`` nearest pool images by MSE."""
    _, cand = nearest_mse(query, pool, exclude, k=candidates)
    q = query.to(torch.float32)
    scores = torch.stack([msssim.ssim(q, pool[cand[:, j]].to(torch.float32)) for j in range(cand.shape[1])], dim=1)
    if exclude is not None:  # Fewer allowed neighbours than candidates: excluded picks must not count.
        scores = scores.masked_fill(exclude.gather(1, cand), float('-inf'))
    return scores.max(dim=1).values


def _distance(kind: str, query, pool, exclude):
    if kind == 'mse':
        return nearest_mse(query, pool, exclude)[0][:, 0]
    return nearest_ssim(query, pool, exclude)


@torch.no_grad()
def compute_nn(opts, kind: str, num_gen: int, dataset=None, sampler=None) -> dict:
    """``{'mean', 'frac_closer', 'real_median'}`` for ``kind`` 'mse' or 'ssim'; NaN on ranks other than 0.
    ``dataset``/``sampler``: the real data and the generator sampler (default: the 2D ones of metric_utils)."""
    assert kind in ('mse', 'ssim')
    dataset = dataset if dataset is not None else metric_utils.get_dataset(opts)
    if len(dataset) < 2:
        raise metric_utils.MetricError(f'{getattr(dataset, "path", "dataset")}: nearest neighbours need at least two real images')
    problem = cases_problem(dataset)
    if problem:
        raise metric_utils.MetricError(problem)
    idx = msssim.image_channels(dataset.channels, opts.channel)
    pool = load_real_pool(opts, dataset, idx)
    size = pool.shape[-1]

    # Real-to-real baseline: a real image's nearest other real image, never itself nor its own case.
    cases = _case_ids(dataset)
    rng = np.random.RandomState([opts.seed, 2])
    queries = np.sort(rng.choice(len(dataset), min(len(dataset), MAX_REAL_QUERIES), replace=False))
    base = metric_utils.FeatureStats(capture_all=True, max_items=len(queries))
    shard = metric_utils._shard(queries, opts)
    for start in range(0, len(shard), opts.batch_size):
        rows = shard[start:start + opts.batch_size]
        exclude = torch.zeros([len(rows), len(dataset)], dtype=torch.bool)
        exclude[torch.arange(len(rows)), torch.from_numpy(rows)] = True
        if cases is not None:  # At least two cases (cases_problem), so every row keeps a neighbour.
            exclude |= torch.from_numpy(cases[rows][:, None] == cases[None, :])
        dist = _distance(kind, pool[torch.from_numpy(rows).to(opts.device)], pool, exclude.to(opts.device))
        base.append_torch(dist[:, None], opts.num_gpus)

    gen = metric_utils.FeatureStats(capture_all=True, max_items=num_gen)
    sampler = sampler if sampler is not None else metric_utils.GeneratorSampler(opts, dataset)
    for img in metric_utils.generated_batches(opts, sampler, num_gen, desc=f'{kind}_nn fakes'):
        x = _shrink(metric_utils.to_unit(img[:, idx]), size)
        assert x.shape[1:] == pool.shape[1:], (x.shape, pool.shape)
        gen.append_torch(_distance(kind, x, pool, None)[:, None], opts.num_gpus)

    if opts.rank != 0:
        return dict(mean=float('nan'), frac_closer=float('nan'), real_median=float('nan'))
    d_gen, d_real = gen.get_all()[:, 0], base.get_all()[:, 0]
    median = float(np.median(d_real))
    closer = d_gen < median if kind == 'mse' else d_gen > median  # Closer = smaller MSE or larger SSIM.
    return dict(mean=float(d_gen.mean()), frac_closer=float(closer.mean()), real_median=median)
