"""Shared machinery of the metrics: options, channels, image conversion, feature statistics and their cache.

The evaluation protocol follows StyleGAN2-ADA (Karras et al., NeurIPS 2020): real statistics come from the
training archive (cached on disk), generated statistics from fresh samples of G conditioned on labels drawn
from the archive. Work is sharded over ``num_gpus`` ranks and gathered with ``torch.distributed.all_gather``
when a process group is initialised; everything also runs on one CPU.
"""

import copy
import hashlib
import json
import os
import sys
import zipfile

import numpy as np
import torch

import dnnlib
from metrics import detectors
from torch_utils import misc
from torch_utils.label_channels import is_label_channel

CACHE_FORMAT = 3  # Bump when the meaning of a cached file changes: old files are then never read.
RGB_NAMES = (['red', 'green', 'blue'], ['r', 'g', 'b'], ['rgb_r', 'rgb_g', 'rgb_b'])


class MetricError(RuntimeError):
    """A metric cannot run with these inputs; the message says what to change."""


# ----------------------------------------------------------------------------
# Options.

def make_options(
    G=None,                     # Generator (used on a copy); None for metrics of reals only.
    G_kwargs: dict = None,      # Extra arguments of G.forward; default noise_mode='const'.
    dataset_kwargs: dict = None,  # dnnlib.construct_class_by_name kwargs of the real data.
    num_gpus: int = 1,          # Ranks taking part (1 = no sharding).
    rank: int = 0,              # This process's rank.
    device=None,                # None = cuda:rank when available, else cpu.
    cache: bool = True,         # Read/write real-data statistics in the cache dir.
    progress: bool = False,     # Status line on stderr (rank 0 only).
    channel=None,               # Channel name or index to measure; None = every image channel in turn.
    detector_url: str = None,   # Inception override (path or URL); None = canonical, then offline fallback.
    vgg_detector_url: str = None,  # VGG16 override for PR and PPL.
    allow_pickle: bool = False, # Allow unpickling detector files that are plain pickles.
    num_gen: int = None,        # Override of the generated count of every metric (quick runs); None = theirs.
    num_real: int = None,       # Cap on the reals of every metric (a seeded random subset); None = theirs.
    batch_size: int = 64,       # Images per rank per step.
    num_workers: int = None,    # DataLoader workers; None = 3 on CUDA (at most the usable cores), 0 on CPU.
    run_dir: str = None,        # Where results are reported (informational here).
    seed: int = 0,              # Base seed of latents, labels and real subsets.
    **extra,                    # Kept as-is for metric-specific settings.
) -> dnnlib.EasyDict:
    assert 0 <= rank < num_gpus, (rank, num_gpus)
    if num_gpus > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise MetricError(f'num_gpus={num_gpus} needs an initialised torch.distributed process group')
    if device is None:
        device = torch.device('cuda', rank) if torch.cuda.is_available() else torch.device('cpu')
    device = torch.device(device)
    if num_workers is None:
        num_workers = min(3, dnnlib.usable_cpus()) if device.type == 'cuda' else 0
    return dnnlib.EasyDict(G=G, G_kwargs=dnnlib.EasyDict(G_kwargs or {}), dataset_kwargs=dnnlib.EasyDict(dataset_kwargs or {}),
                           num_gpus=num_gpus, rank=rank, device=device, cache=cache, progress=progress and rank == 0,
                           channel=channel, detector_url=detector_url, vgg_detector_url=vgg_detector_url,
                           allow_pickle=allow_pickle, num_gen=num_gen, num_real=num_real, batch_size=batch_size,
                           num_workers=num_workers,
                           run_dir=run_dir, seed=seed, **extra)


def num_generated(opts, default: int) -> int:
    """The generated count of a metric, unless ``opts.num_gen`` overrides it (--metric-num-gen). The count used
    and the metric's own are noted in ``opts`` for the result record (metric_main.calc_metric), so that a
    shortened result is never mistaken for a full one."""
    count = int(opts.num_gen) if opts.get('num_gen') else int(default)
    opts['num_gen_used'], opts['num_gen_default'] = count, int(default)
    return count


def num_real(opts, max_real: int = None) -> int:
    """The reals a metric measures at most: its own ``max_real`` (None = all), capped by ``opts.num_real`` when a
    quick run shortens the metric (--metric-num-gen; a random subset with a fixed seed, as for ``max_real``)."""
    if not opts.get('num_real'):
        return max_real
    return int(opts.num_real) if max_real is None else min(int(max_real), int(opts.num_real))


def get_detector(opts, kind: str = 'inception') -> detectors.Detector:
    url = opts.detector_url if kind == 'inception' else opts.get('vgg_detector_url')
    return detectors.load_detector(kind, url=url, device=opts.device, allow_pickle=opts.get('allow_pickle', False),
                                   verbose=opts.rank == 0)


def get_dataset(opts, **overrides):
    if not opts.dataset_kwargs:
        raise MetricError('no real data given (dataset_kwargs is empty); pass --data')
    kwargs = dict(opts.dataset_kwargs, **overrides)
    kwargs.setdefault('class_name', 'training.dataset.ImageFolderDataset')
    dataset = dnnlib.construct_class_by_name(**kwargs)
    if len(dataset.image_shape) != 3:
        raise MetricError(f'{kwargs.get("path")}: images of shape {dataset.image_shape}; these metrics measure 2D '
                          f'images [C,H,W] (volumes: fid25d_full, fid3d_full, msssim3d_div, mmd3d, ssim3d_nn, mse3d_nn)')
    return dataset


def dataset_labels(dataset) -> np.ndarray:
    """All labels ``[N, L]`` (L may be 0)."""
    labels = [np.asarray(dataset.get_label(i), dtype=np.float32).reshape(-1) for i in range(len(dataset))]
    return np.stack(labels) if labels else np.zeros([0, 0], np.float32)


# ----------------------------------------------------------------------------
# Channels and conversion to detector input.

def channel_sets(names: list, channel=None) -> list:
    """``[(suffix or None, [channel indices])]``: which channels go to the detector together.

    RGB archives go in as one image; otherwise every image channel is measured on its own (repeated to
    three for the detector), named by a suffix when there are several. Tumour-label channels (``seg_*``)
    are masks, not images, and are never measured.
    """
    names = list(names)
    image_idx = [i for i, n in enumerate(names) if not is_label_channel(n)]
    multi = len(image_idx) > 1
    if channel is not None and str(channel) != '':
        if isinstance(channel, int) or str(channel).isdigit():
            idx = int(channel)
            if not 0 <= idx < len(names):
                raise MetricError(f'channel {idx} out of range: the data has channels {names}')
        elif channel in names:
            idx = names.index(channel)
        else:
            raise MetricError(f'unknown channel {channel!r}: the data has channels {names}')
        if is_label_channel(names[idx]):
            raise MetricError(f'channel {names[idx]!r} is a tumour label, not an image; choose one of '
                              f'{[names[i] for i in image_idx]}')
        return [(str(names[idx]) if multi else None, [idx])]
    if [str(n).lower() for n in names] in RGB_NAMES:
        return [(None, [0, 1, 2])]
    if not image_idx:
        raise MetricError(f'no image channels to measure among {names}')
    return [(str(names[i]) if multi else None, [i]) for i in image_idx]


def to_uint8(images: torch.Tensor, dtype_max: int = None) -> torch.Tensor:
    """uint8/uint16 data (``dtype_max`` 255/65535) or generated floats in [-1, 1] -> uint8 0..255.

    Both paths round the same way: a stored value v and the float ``v / vmax * 2 - 1`` it stands for give the
    same byte, so reals and fakes are quantised identically.
    """
    if images.dtype == torch.uint8:
        return images
    if images.dtype.is_floating_point:
        return (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # +128 = +127.5 then round.
    if dtype_max is None:
        raise ValueError(f'integer images of type {images.dtype} need dtype_max')
    return (images.to(torch.float32) * (255 / dtype_max) + 0.5).floor().clamp(0, 255).to(torch.uint8)


def to_unit(images: torch.Tensor, dtype_max: int = None) -> torch.Tensor:
    """uint data or generated [-1, 1] floats -> float32 in [0, 1] (for MS-SSIM and nearest neighbours)."""
    if images.dtype.is_floating_point:
        return ((images.to(torch.float32) + 1) / 2).clamp(0, 1)
    return images.to(torch.float32) / float(dtype_max or 255)


def select_rgb(images: torch.Tensor, idx: list) -> torch.Tensor:
    """Channels ``idx`` of ``[N, C, H, W]`` as three channels: one channel is repeated, three pass through."""
    x = images[:, idx]
    if len(idx) == 1:
        x = x.repeat(1, 3, 1, 1)
    assert x.shape[1] == 3, f'cannot make 3 detector channels from {len(idx)}'
    return x


# ----------------------------------------------------------------------------
# Feature statistics.

class FeatureStats:
    """Running feature statistics: all rows, and/or mean and covariance (accumulated in float64)."""

    def __init__(self, capture_all: bool = False, capture_mean_cov: bool = False, max_items: int = None):
        self.capture_all = capture_all
        self.capture_mean_cov = capture_mean_cov
        self.max_items = max_items
        self.num_items = 0
        self.num_features = None
        self.all_features = []
        self.raw_sum = None
        self.raw_outer = None

    def is_full(self) -> bool:
        return self.max_items is not None and self.num_items >= self.max_items

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        assert x.ndim == 2, x.shape
        if self.num_features is None:
            self.num_features = x.shape[1]
        assert x.shape[1] == self.num_features, (x.shape, self.num_features)
        if self.max_items is not None:
            x = x[:max(self.max_items - self.num_items, 0)]
        if x.shape[0] == 0:
            return
        self.num_items += x.shape[0]
        if self.capture_all:
            self.all_features.append(x)
        if self.capture_mean_cov:
            x64 = x.astype(np.float64)
            if self.raw_sum is None:
                self.raw_sum = np.zeros([self.num_features], np.float64)
                self.raw_outer = np.zeros([self.num_features, self.num_features], np.float64)
            self.raw_sum += x64.sum(axis=0)
            self.raw_outer += x64.T @ x64

    def append_torch(self, x: torch.Tensor, num_gpus: int = 1) -> None:
        """Append this rank's rows after gathering every rank's, in global order (rank-interleaved rows)."""
        assert x.ndim == 2, x.shape
        if num_gpus > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [torch.empty_like(x) for _ in range(num_gpus)]
            torch.distributed.all_gather(parts, x.contiguous())
            x = torch.stack(parts, dim=1).flatten(0, 1)  # Row j of rank r is global item j * num_gpus + r.
        self.append(x.detach().cpu().numpy())

    def get_all(self) -> np.ndarray:
        assert self.capture_all
        return np.concatenate(self.all_features) if self.all_features else np.zeros([0, self.num_features or 0], np.float32)

    def get_mean_cov(self):
        assert self.capture_mean_cov and self.num_items > 1, 'need at least two items for a covariance'
        mean = self.raw_sum / self.num_items
        cov = (self.raw_outer - self.num_items * np.outer(mean, mean)) / (self.num_items - 1)  # Unbiased, as np.cov.
        return mean, cov

    def save(self, path: str) -> None:
        """Write atomically: a killed run never leaves half a cache file."""
        arrays = dict(meta=np.array(json.dumps(dict(capture_all=self.capture_all, capture_mean_cov=self.capture_mean_cov,
                                                    max_items=self.max_items, num_items=self.num_items,
                                                    num_features=self.num_features))))
        if self.capture_all:
            arrays['all'] = self.get_all()
        if self.capture_mean_cov and self.raw_sum is not None:
            arrays['raw_sum'], arrays['raw_outer'] = self.raw_sum, self.raw_outer
        with dnnlib.atomic_output(path, suffix='.npz') as tmp, open(tmp, 'wb') as f:
            np.savez(f, **arrays)

    @staticmethod
    def read_meta(path: str):
        """The header of a saved file (what it captured, how many items), or None when missing or unreadable."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return json.loads(str(data['meta']))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None

    @staticmethod
    def load(path: str) -> 'FeatureStats':
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data['meta']))
            stats = FeatureStats(meta['capture_all'], meta['capture_mean_cov'], meta['max_items'])
            stats.num_items, stats.num_features = meta['num_items'], meta['num_features']
            if stats.capture_all:
                stats.all_features = [data['all']]
            if 'raw_sum' in data:
                stats.raw_sum, stats.raw_outer = data['raw_sum'], data['raw_outer']
        return stats


def _feature_fn(detector: detectors.Detector, what: str):
    assert what in ('features', 'class_probs'), what
    return getattr(detector, what)


def _broadcast_flag(flag: bool, opts) -> bool:
    """Rank 0 decides (e.g. 'the cache file exists') for everyone, so that all ranks run the same steps."""
    if opts.num_gpus > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([int(flag)], device=opts.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())
    return flag


def _shard(indices: np.ndarray, opts) -> np.ndarray:
    """This rank's items: equal-sized shards (wrapping round), so every rank runs the same number of steps."""
    n = len(indices)
    per_rank = (n - 1) // opts.num_gpus + 1
    return indices[(np.arange(per_rank) * opts.num_gpus + opts.rank) % n]


def dataset_cache_key(dataset, content: str, indices, **options) -> str:
    """Digest of what real-data statistics depend on, and nothing else: the pixels (archive content, which items,
    x-flipped or not), the detector and the metric's options (what, channels). The training seed, the metric
    name, the subset-sampling parameters and the recorded resolution only reach the key through the items
    they select, so every metric that measures the same images shares one file."""
    indices = np.asarray(indices, dtype=np.int64)
    flips = getattr(dataset, '_xflip', None)  # Per item: 1 = the mirrored copy of an image.
    items = hashlib.sha256()
    for i in indices.tolist():
        name = dataset.image_fname(i) if hasattr(dataset, 'image_fname') else str(i)
        items.update(f'{name}:{int(flips[i]) if flips is not None else 0}\n'.encode())
    key = dict(format=CACHE_FORMAT, content=content, items=items.hexdigest(), **options)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _satisfies(stats: 'FeatureStats', capture_all: bool = False, capture_mean_cov: bool = False) -> bool:
    return (stats.capture_all or not capture_all) and (stats.capture_mean_cov or not capture_mean_cov)


def _load_cached(path: str, opts, stats_kwargs: dict):
    """Cached statistics at ``path`` that hold what ``stats_kwargs`` asks for, or None (missing, damaged: warned)."""
    usable = None
    if opts.rank == 0 and os.path.isfile(path):
        try:
            usable = FeatureStats.load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            # A killed copy or a full disk: the statistics are recomputed and the file rewritten.
            print(f'warning: {path}: damaged statistics cache ({type(err).__name__}); recomputing', file=sys.stderr,
                  flush=True)
        if usable is not None and not _satisfies(usable, **stats_kwargs):
            usable = None
    if not _broadcast_flag(usable is not None, opts):
        return None
    return usable if usable is not None else FeatureStats.load(path)


def _merged_capture(path: str, stats_kwargs: dict) -> dict:
    """What to capture when (re)computing: the request plus what an existing file held, so one file serves both."""
    out = dict(capture_all=bool(stats_kwargs.get('capture_all')), capture_mean_cov=bool(stats_kwargs.get('capture_mean_cov')))
    meta = FeatureStats.read_meta(path)
    if meta is not None:
        out['capture_all'] |= meta['capture_all'] and FeatureMemo.fits(meta['num_items'], 1, meta['num_features'] or 0)
        out['capture_mean_cov'] |= meta['capture_mean_cov']
    return out


def stats_from_rows(rows: np.ndarray, chunk: int, max_items: int = None, **stats_kwargs) -> 'FeatureStats':
    """FeatureStats of feature rows, appended in chunks of ``chunk`` rows: the order and grouping of a streamed
    pass over the same items, so mean and covariance come out as if the items had been streamed."""
    stats = FeatureStats(max_items=len(rows) if max_items is None else max_items, **stats_kwargs)
    if len(rows) == 0:
        return stats
    for start in range(0, len(rows), chunk):
        stats.append(rows[start:start + chunk])
    return stats


class FeatureMemo:
    """Features shared by the metrics of one evaluation (one snapshot): each real image and each generated
    set goes through a detector once, however many metrics ask for it.

    Reals: one pass over the whole archive keeps every row; each request (all items, a random subset, one
    class) takes its rows. Generated: a set is keyed by everything that decides its images (G, its kwargs,
    labels, count, seed), so FID and KID of the same size share it. Kept within ``MAX_BYTES``; a larger
    request streams as if there were no memo.
    """

    MAX_BYTES = 2 << 30

    def __init__(self):
        self.real_rows = {}     # (detector digest, what, dataset key, channels) -> rows [len(dataset), F]
        self.generated = {}     # (detector digest, what, G key, num_items, labels digest, channels) -> FeatureStats

    @staticmethod
    def fits(num_items: int, num_sets: int, num_features: int = 2048) -> bool:
        return num_items * num_sets * num_features * 4 <= FeatureMemo.MAX_BYTES


def _real_rows(opts, dataset, detector, todo: list, what: str) -> dict:
    """``{suffix: rows of every item of the dataset}`` from the memo, computed (or read from the cache) once."""
    memo = opts.feature_memo
    dataset_key = json.dumps(dict(opts.dataset_kwargs), sort_keys=True, default=str)
    keys = {suffix: (detector.digest, what, dataset_key, tuple(idx)) for suffix, idx in todo}
    missing = [(suffix, idx) for suffix, idx in todo if keys[suffix] not in memo.real_rows]
    if missing:
        plain = dnnlib.EasyDict(opts, feature_memo=None)
        stats = compute_feature_stats_for_dataset(plain, detector, missing, what=what, tag='all', capture_all=True)
        for suffix, _ in missing:
            memo.real_rows[keys[suffix]] = stats[suffix].get_all()
    return {suffix: memo.real_rows[keys[suffix]] for suffix, _ in todo}


def compute_feature_stats_for_dataset(
    opts,                       # Metric options.
    detector,                   # detectors.Detector.
    sets: list,                 # channel_sets(): [(suffix, indices)].
    what: str = 'features',     # Detector output: 'features' or 'class_probs'.
    max_items: int = None,      # Random subset of at most this many reals (fixed seed); None = all.
    indices=None,               # Restrict to these dataset indices (e.g. one class); None = all.
    tag: str = 'all',           # Names the restriction in the progress line (e.g. 'plane=axial').
    **stats_kwargs,             # capture_all / capture_mean_cov.
) -> dict:
    """Statistics of real images per channel set ``{suffix: FeatureStats}``: from the cache when it holds them,
    else from the evaluation's shared features (``opts.feature_memo``), else from one pass over the images."""
    dataset = get_dataset(opts)
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    max_items = num_real(opts, max_items)
    if max_items is not None and len(indices) > max_items:
        indices = np.sort(np.random.RandomState(opts.seed).choice(indices, max_items, replace=False))
    if len(indices) == 0:
        raise MetricError(f'{getattr(dataset, "path", "dataset")}: no real images to measure ({tag})')
    out, paths, todo = {}, {}, []
    # Hashed once per call: a folder archive is read whole to hash it.
    content = dataset.content_hash() if opts.cache and hasattr(dataset, 'content_hash') else None
    for suffix, idx in sets:
        if opts.cache:
            if content is None:
                raise MetricError(f'{getattr(dataset, "path", dataset)}: dataset has no content_hash(); cannot key a cache on it')
            key = dataset_cache_key(dataset, content, indices, detector=detector.digest, what=what, channels=list(idx))
            paths[suffix] = dnnlib.make_cache_dir_path('gan-metrics', f'{dataset.name}-{what}-{key[:32]}.npz')
            cached = _load_cached(paths[suffix], opts, stats_kwargs)
            if cached is not None:
                out[suffix] = cached
                continue
        todo.append((suffix, idx))
    if not todo:
        return out
    memo = opts.get('feature_memo')
    # The memo holds every real image's row; a shortened run (num_real) measures a subset only, so it streams that
    # subset (the metrics of one evaluation then share it through the cache file).
    if memo is not None and FeatureMemo.fits(len(dataset), len(todo)) and not opts.get('num_real'):
        rows = _real_rows(opts, dataset, detector, todo, what)
        for suffix, _ in todo:  # Rows at hand: keep both kinds, so the cache file serves any later request.
            out[suffix] = stats_from_rows(rows[suffix][indices], opts.batch_size * opts.num_gpus, capture_all=True,
                                          capture_mean_cov=True)
    else:
        capture = {suffix: _merged_capture(paths[suffix], stats_kwargs) if opts.cache else dict(stats_kwargs)
                   for suffix, _ in todo}
        for suffix, _ in todo:
            out[suffix] = FeatureStats(max_items=len(indices), **capture[suffix])
        shard = _shard(indices, opts)
        loader = real_loader(opts, torch.utils.data.Subset(dataset, shard.tolist()))
        fn = _feature_fn(detector, what)
        unit = _unit((getattr(dataset, 'image_shape', None) or [0])[1:])
        with dnnlib.ProgressBar(len(indices), desc=f'reals {tag}', unit=unit, enabled=opts.progress) as bar:
            for images, _labels in loader:
                images = torch.as_tensor(images)
                for suffix, idx in todo:
                    out[suffix].append_torch(fn(select_rgb(to_uint8(images, dataset.dtype_max), idx)), opts.num_gpus)
                bar.update(min(images.shape[0] * opts.num_gpus, len(indices) - bar.done))  # The last shards wrap round.
    for suffix, _ in todo:
        if opts.cache and opts.rank == 0:
            out[suffix].save(paths[suffix])
    return out


# ----------------------------------------------------------------------------
# Generated images.

class GeneratorSampler:
    """Draws batches from a copy of G, with labels drawn from real labels (optionally of one class)."""

    def __init__(self, opts, dataset, labels: np.ndarray = None, seed_offset: int = 0):
        if opts.G is None:
            raise MetricError('this metric needs a generator (G)')
        img_channels = getattr(opts.G, 'img_channels', None)
        if img_channels is not None and img_channels != len(dataset.channels):
            raise MetricError(f'G makes {img_channels}-channel images but {getattr(dataset, "path", "the data")} has '
                              f'{len(dataset.channels)} channels {list(dataset.channels)}; pass the matching --data')
        if labels is None:
            labels = dataset_labels(dataset)
        self.G = copy.deepcopy(opts.G).eval().requires_grad_(False).to(opts.device)
        self.G_kwargs = dict(noise_mode='const', **opts.G_kwargs) if 'noise_mode' not in opts.G_kwargs else dict(opts.G_kwargs)
        self.device = opts.device
        self.c_dim = int(getattr(self.G, 'c_dim', 0))
        self.z_dim = int(self.G.z_dim)
        if self.c_dim > 0 and (labels is None or len(labels) == 0 or labels.shape[1] != self.c_dim):
            raise MetricError(f'G is conditional (c_dim={self.c_dim}) but the real data has labels of shape '
                              f'{None if labels is None else list(labels.shape)}; pass --data with the training labels')
        self.labels = labels
        # Different ranks draw different samples; the same (seed, rank) always draws the same ones.
        self.rng = np.random.RandomState([opts.seed, opts.rank, seed_offset])

    def labels_batch(self, n: int) -> torch.Tensor:
        if self.c_dim == 0:
            return torch.zeros([n, 0], device=self.device)
        c = self.labels[self.rng.randint(len(self.labels), size=n)]
        return torch.from_numpy(c).to(self.device)

    def latents(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.randn(n, self.z_dim).astype(np.float32)).to(self.device)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``[n, C, R, R]`` float32 images in about [-1, 1]."""
        img = self.G(self.latents(n), self.labels_batch(n), **self.G_kwargs)
        assert img.ndim == 4 and img.shape[0] == n, img.shape
        return img.to(torch.float32)


def _unit(spatial) -> str:
    """What a progress line counts: 'volumes' for items of three spatial axes, else 'images'."""
    return 'volumes' if len(spatial or [0, 0]) == 3 else 'images'


def real_loader(opts, dataset) -> torch.utils.data.DataLoader:
    """The DataLoader every metric reads reals with: ``opts.batch_size`` and ``opts.num_workers``, workers that
    survive a process-group SIGTERM long enough (torch_utils.misc.loader_worker_init)."""
    return torch.utils.data.DataLoader(dataset, batch_size=opts.batch_size, num_workers=opts.num_workers,
                                       worker_init_fn=misc.loader_worker_init())


def generated_batches(opts, sampler: GeneratorSampler, num_items: int, desc: str = 'fakes'):
    """Yield this rank's generated batches until ``num_items`` images exist over all ranks."""
    steps = (num_items - 1) // (opts.batch_size * opts.num_gpus) + 1
    with dnnlib.ProgressBar(num_items, desc=desc, unit=_unit(getattr(sampler.G, 'img_shape', None)),
                            enabled=opts.progress) as bar:
        for _ in range(steps):
            yield sampler.sample(opts.batch_size)
            bar.update(min(opts.batch_size * opts.num_gpus, num_items - bar.done))


def compute_feature_stats_for_generator(
    opts,                       # Metric options.
    detector,                   # detectors.Detector.
    sets: list,                 # channel_sets(): [(suffix, indices)].
    num_items: int,             # Generated images over all ranks.
    what: str = 'features',     # 'features' or 'class_probs'.
    labels: np.ndarray = None,  # Labels to condition on (rows drawn at random); None = all real labels.
    **stats_kwargs,             # capture_all / capture_mean_cov.
) -> dict:
    """Statistics of generated images per channel set; one G pass serves every channel set, and with
    ``opts.feature_memo`` every metric of the evaluation that asks for the same images."""
    memo = opts.get('feature_memo')
    key = None
    if memo is not None:
        label_key = 'all' if labels is None else hashlib.sha256(np.ascontiguousarray(labels, np.float32).tobytes()).hexdigest()
        key = (detector.digest, what, id(opts.G), json.dumps(dict(opts.G_kwargs), sort_keys=True, default=str), num_items,
               label_key, tuple(tuple(idx) for _, idx in sets), opts.seed, opts.batch_size)
        held = memo.generated.get(key)
        if held is not None and all(_satisfies(held[suffix], **stats_kwargs) for suffix, _ in sets):
            return held
        if FeatureMemo.fits(num_items, len(sets)):
            stats_kwargs = dict(stats_kwargs, capture_all=True, capture_mean_cov=True)  # Serves FID, KID, PR alike.
        else:
            key = None
    sampler = GeneratorSampler(opts, get_dataset(opts), labels)
    out = {suffix: FeatureStats(max_items=num_items, **stats_kwargs) for suffix, _ in sets}
    fn = _feature_fn(detector, what)
    for img in generated_batches(opts, sampler, num_items):
        for suffix, idx in sets:
            out[suffix].append_torch(fn(select_rgb(to_uint8(img), idx)), opts.num_gpus)
    if key is not None:
        memo.generated[key] = out
    return out


def per_channel_results(name: str, values: dict) -> dict:
    """``{name: value}`` for one channel set; ``{name_<channel>: v, ..., name: mean}`` for several."""
    if list(values) == [None]:
        return {name: float(values[None])}
    out = {f'{name}_{suffix}': float(v) for suffix, v in values.items()}
    out[name] = float(np.mean(list(values.values())))
    return out
