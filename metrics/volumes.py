"""Metrics of generated volumes ``[N, C, D, H, W]`` (archives of ``kind: volumes``, 3D generators).

* 2.5D FID (``fid25d_full``): Inception features of 2D slices taken in each of the three planes, one FID per plane
  and their mean, as MAISI reports (Guo et al., "MAISI: Medical AI for Synthetic Imaging", WACV 2025). Slices are
  ``SLICES_PER_PLANE`` evenly spaced positions over the middle three quarters of each axis (the outer eighths of a
  brain cube are mostly background), every image channel on its own as in the 2D FID.
* 3D FID (``fid3d_full``): the Frechet distance (Heusel et al., NeurIPS 2017) between features of a 3D network the
  user supplies (``--detector3d PATH``, TorchScript; e.g. MedicalNet's ResNet-50, Chen et al., arXiv:1904.00625,
  exported as docs/volumes.md shows). Each image channel goes in alone as ``[N, 1, D, H, W]``, z-scored over its
  brain voxels (intensity above ``BRAIN_THRESHOLD``) with background 0, MedicalNet's normalisation; a feature map
  output is averaged over its spatial axes.
* 3D MS-SSIM diversity (``msssim3d_div``): the mean 3D MS-SSIM of random pairs of generated volumes, and of real
  ones beside it (Odena et al., ICML 2017; 3D as in 3D-StyleGAN, Hong et al., 2021).
* bMMD^2 (``mmd3d``): the batch-wise squared maximum mean discrepancy with the linear kernel in voxel space that
  Kwon et al. (MICCAI 2019, "Generation of 3D brain MRI using auto-encoding generative adversarial networks")
  defined and 3D-StyleGAN reports: for batches X, Y of B volumes in [-1, 1], (1/B^2)(sum k(x, x') + sum k(y, y')
  - 2 sum k(x, y)) with k the dot product, i.e. the squared distance of the batch means, summed over voxels;
  averaged over batches. ``mmd3d_per_voxel`` divides by the voxel count so that sizes compare.
* Nearest neighbours in 3D (``ssim3d_nn``, ``mse3d_nn``): metrics/nearest_neighbour.py on volumes box-filtered to at
  most ``NN_RESOLUTION_3D`` voxels a side (memorisation indicators against the real-to-real baseline).
"""

import hashlib
import os

import numpy as np
import torch

import dnnlib
from metrics import detectors
from metrics import frechet_inception_distance
from metrics import metric_utils
from metrics import msssim
from metrics import nearest_neighbour

PLANE_DIMS = {'axial': 4, 'coronal': 3, 'sagittal': 2}  # dim of [N, C, D, H, W] (RAS order x, y, z) sliced across
SLICES_PER_PLANE = 16       # 2.5D FID: slice positions per plane and volume.
VOLUME_BATCH = 4            # Volumes per rank per step (a 128^3 x 7 volume is 58 MB in float32).
MMD_BATCH = 8               # Volumes per bMMD^2 batch.
NN_RESOLUTION_3D = 32       # Nearest neighbours: comparison side cap (voxels).
BRAIN_THRESHOLD = 0.01      # 3D FID: voxels above this (in [0, 1]) are brain, for the z-score.
VOLUME_METRICS = ('fid25d_full', 'fid3d_full', 'msssim3d_div', 'mmd3d', 'ssim3d_nn', 'mse3d_nn')


# ----------------------------------------------------------------------------
# Data, generator and detector.

def volume_options(opts) -> dnnlib.EasyDict:
    """The options with a batch size volumes fit in (``opts.volume_batch`` overrides VOLUME_BATCH)."""
    return dnnlib.EasyDict(opts, batch_size=max(1, min(opts.batch_size, int(opts.get('volume_batch') or VOLUME_BATCH))))


def get_volume_dataset(opts):
    """The real volumes; a slice archive is a one-line MetricError naming the 2D metrics."""
    if not opts.dataset_kwargs:
        raise metric_utils.MetricError('no real data given (dataset_kwargs is empty); pass --data')
    kwargs = dict(opts.dataset_kwargs)
    kwargs.setdefault('class_name', 'training.dataset.ImageFolderDataset')
    dataset = dnnlib.construct_class_by_name(**kwargs)
    if len(dataset.image_shape) != 4:
        raise metric_utils.MetricError(f'{kwargs.get("path")}: images of shape {dataset.image_shape}; the volume metrics '
                                       f'({", ".join(VOLUME_METRICS)}) measure volumes [C,D,H,W]; for 2D images use '
                                       f'fid10k_full, msssim_div, ssim_nn, ...')
    return dataset


class VolumeSampler(metric_utils.GeneratorSampler):
    """Generated volumes ``[n, C, D, H, W]``; a 2D generator or another volume shape is a one-line MetricError."""

    def __init__(self, opts, dataset, labels=None, seed_offset=0):
        super().__init__(opts, dataset, labels, seed_offset)
        self.shape = list(dataset.image_shape)
        with torch.no_grad():  # one probe (not from the sample stream), so that a wrong G fails before any work
            c = torch.zeros([1, self.c_dim], device=self.device)
            if self.c_dim:
                c[0, 0] = 1
            self._check(self.G(torch.zeros([1, self.z_dim], device=self.device), c, **self.G_kwargs))

    def _check(self, img):
        if img.ndim != 5:
            raise metric_utils.MetricError(f'the generator makes 2D images {list(img.shape[1:])}; the volume metrics need '
                                           f'a volume generator (a snapshot trained on a --kind volumes archive)')
        if list(img.shape[1:]) != self.shape:
            raise metric_utils.MetricError(f'the generator makes volumes {list(img.shape[1:])} but the real data has '
                                           f'{self.shape}; pass the matching --data')
        return img

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self._check(self.G(self.latents(n), self.labels_batch(n), **self.G_kwargs)).to(torch.float32)


def real_batches(opts, dataset, indices, desc='reals'):
    """This rank's share of the real volumes at ``indices``, as raw uint tensors, with a progress line."""
    shard = metric_utils._shard(np.asarray(indices), opts)
    loader = metric_utils.real_loader(opts, torch.utils.data.Subset(dataset, shard.tolist()))
    with dnnlib.ProgressBar(len(indices), desc=desc, unit='volumes', enabled=opts.progress) as bar:
        for images, _labels in loader:
            yield torch.as_tensor(images)
            bar.update(min(images.shape[0] * opts.num_gpus, len(indices) - bar.done))


class VolumeDetector:
    """A user's 3D feature network (TorchScript): unit volumes ``[N, 1, D, H, W]`` -> features ``[N, F]``."""

    def __init__(self, path: str, device, allow_pickle: bool = False):
        with open(path, 'rb') as f:
            self.digest = hashlib.sha256(f.read()).hexdigest()
        self.module = detectors.read_torchscript(path, allow_pickle=allow_pickle).eval().to(device)
        self.source = path
        self.device = device

    @torch.no_grad()
    def features(self, unit: torch.Tensor) -> torch.Tensor:
        assert unit.ndim == 5 and unit.shape[1] == 1, unit.shape
        x = unit.to(self.device, torch.float32)
        brain = x > BRAIN_THRESHOLD
        count = brain.sum(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1)
        mean = (x * brain).sum(dim=(1, 2, 3, 4), keepdim=True) / count
        var = ((x - mean).square() * brain).sum(dim=(1, 2, 3, 4), keepdim=True) / count
        x = torch.where(brain, (x - mean) / var.sqrt().clamp(min=1e-6), torch.zeros_like(x))
        try:
            out = self.module(x)
        except RuntimeError as err:
            raise detectors.DetectorError(f'{self.source}: the 3D detector failed on volumes {list(x.shape)} '
                                          f'({str(err).splitlines()[0][:200]})') from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim > 2:
            out = out.flatten(2).mean(dim=2)  # a feature map: global average pooling
        return out.reshape(out.shape[0], -1).to(torch.float32)


def load_detector3d(opts) -> VolumeDetector:
    path = opts.get('detector3d')
    if not path:
        raise metric_utils.MetricError('fid3d_full needs a 3D feature network: pass --detector3d PATH (a TorchScript '
                                       'file, e.g. MedicalNet ResNet-50 exported as in docs/volumes.md)')
    try:
        local = dnnlib.open_url(path, return_filename=True, verbose=opts.rank == 0)
    except dnnlib.DownloadError as err:
        raise metric_utils.MetricError(f'--detector3d {path}: {err}') from None
    return VolumeDetector(local, opts.device, opts.get('allow_pickle', False))


# ----------------------------------------------------------------------------
# Feature statistics (real ones cached like the 2D metrics' on the archive's content).

def slice_positions(length: int, count: int = SLICES_PER_PLANE) -> torch.Tensor:
    """``count`` evenly spaced indices over the middle three quarters of an axis (fewer when the axis is short)."""
    lo, hi = length * 0.125, length * 0.875 - 1
    pos = np.unique(np.rint(np.linspace(lo, max(hi, lo), count)).astype(np.int64).clip(0, length - 1))
    return torch.from_numpy(pos)


def plane_slices(volumes: torch.Tensor, plane: str, count: int = SLICES_PER_PLANE) -> torch.Tensor:
    """``[N, C, D, H, W]`` -> the slices across ``plane`` as images ``[N * k, C, a, b]``."""
    dim = PLANE_DIMS[plane]
    picked = volumes.index_select(dim, slice_positions(volumes.shape[dim], count).to(volumes.device))
    return picked.movedim(dim, 1).flatten(0, 1)


def _cached(opts, dataset, name, indices, options, compute):
    """``compute()`` -> {key: FeatureStats}, read from / written to the cache, keyed on the archive's content and
    the items measured."""
    if not opts.cache:
        return compute()
    digest = metric_utils.dataset_cache_key(dataset, dataset.content_hash(), indices, what=name, **options)
    paths = {}

    def path(key):
        return dnnlib.make_cache_dir_path('gan-metrics', f'{dataset.name}-{name}-{key}-{digest[:32]}.npz')
    keys = options['keys']
    if metric_utils._broadcast_flag(all(os.path.isfile(path(k)) for k in keys), opts):
        return {k: metric_utils.FeatureStats.load(path(k)) for k in keys}
    out = compute()
    if opts.rank == 0:
        for k in keys:
            paths[k] = path(k)
            out[k].save(paths[k])
    return out


def _stat_key(plane, suffix):
    return f'{plane}' if suffix is None else f'{plane}_{suffix}'


def fid25d_stats(opts, dataset, volumes, sets, num_items, detector, count):
    """{plane_suffix: FeatureStats} of the 2.5D slices of ``volumes`` (an iterable of ``[n, C, D, H, W]``)."""
    shape = [None, None] + list(dataset.image_shape[1:])  # the count per plane caps what the last wrapped shards add
    out = {_stat_key(p, s): metric_utils.FeatureStats(capture_mean_cov=True,
                                                      max_items=num_items * len(slice_positions(shape[d], count)))
           for p, d in PLANE_DIMS.items() for s, _ in sets}
    for batch in volumes:
        u8 = metric_utils.to_uint8(batch, dataset.dtype_max)
        for plane in PLANE_DIMS:
            slices = plane_slices(u8, plane, count)
            for suffix, idx in sets:
                out[_stat_key(plane, suffix)].append_torch(detector.features(metric_utils.select_rgb(slices, idx)),
                                                           opts.num_gpus)
    return out


def compute_fid25d(opts, num_gen: int, max_real: int = None, count: int = SLICES_PER_PLANE) -> dict:
    """{plane: {suffix: fid}} for the three planes; NaN on ranks other than 0."""
    opts = volume_options(opts)
    dataset = get_volume_dataset(opts)
    sets = metric_utils.channel_sets(dataset.channels, opts.channel)
    detector = metric_utils.get_detector(opts, 'inception')
    indices = np.arange(len(dataset))
    if max_real is not None and len(indices) > max_real:
        indices = np.sort(np.random.RandomState(opts.seed).choice(indices, max_real, replace=False))
    keys = [_stat_key(p, s) for p in PLANE_DIMS for s, _ in sets]
    real = _cached(opts, dataset, 'fid25d', indices, dict(keys=keys, detector=detector.digest, slices=count, num_items=len(indices),
                                                 channels=[idx for _, idx in sets]),
                   lambda: fid25d_stats(opts, dataset, real_batches(opts, dataset, indices, 'fid25d reals'), sets,
                                        len(indices), detector, count))
    sampler = VolumeSampler(opts, dataset)
    gen = fid25d_stats(opts, dataset, metric_utils.generated_batches(opts, sampler, num_gen, desc='fid25d fakes'), sets,
                       num_gen, detector, count)
    if opts.rank != 0:
        return {p: {s: float('nan') for s, _ in sets} for p in PLANE_DIMS}
    return {p: {s: frechet_inception_distance.frechet_distance(*real[_stat_key(p, s)].get_mean_cov(),
                                                               *gen[_stat_key(p, s)].get_mean_cov())
                for s, _ in sets} for p in PLANE_DIMS}


def fid3d_stats(opts, dataset, volumes, idx_list, num_items, detector):
    out = {str(i): metric_utils.FeatureStats(capture_mean_cov=True, max_items=num_items) for i in idx_list}
    for batch in volumes:
        unit = metric_utils.to_unit(batch, dataset.dtype_max)
        for i in idx_list:
            out[str(i)].append_torch(detector.features(unit[:, i:i + 1]), opts.num_gpus)
    return out


def compute_fid3d(opts, num_gen: int, max_real: int = None) -> dict:
    """{channel name or None: fid} with the user's 3D detector; NaN on ranks other than 0."""
    detector = load_detector3d(opts)  # first: a missing --detector3d fails before any work
    opts = volume_options(opts)
    dataset = get_volume_dataset(opts)
    idx_list = msssim.image_channels(dataset.channels, opts.channel)
    names = {i: (str(dataset.channels[i]) if len(idx_list) > 1 else None) for i in idx_list}
    indices = np.arange(len(dataset))
    if max_real is not None and len(indices) > max_real:
        indices = np.sort(np.random.RandomState(opts.seed).choice(indices, max_real, replace=False))
    real = _cached(opts, dataset, 'fid3d', indices, dict(keys=[str(i) for i in idx_list], detector=detector.digest,
                                                num_items=len(indices), threshold=BRAIN_THRESHOLD),
                   lambda: fid3d_stats(opts, dataset, real_batches(opts, dataset, indices, 'fid3d reals'), idx_list,
                                       len(indices), detector))
    sampler = VolumeSampler(opts, dataset)
    gen = fid3d_stats(opts, dataset, metric_utils.generated_batches(opts, sampler, num_gen, desc='fid3d fakes'),
                      idx_list, num_gen, detector)
    if opts.rank != 0:
        return {names[i]: float('nan') for i in idx_list}
    return {names[i]: frechet_inception_distance.frechet_distance(*real[str(i)].get_mean_cov(), *gen[str(i)].get_mean_cov())
            for i in idx_list}


# ----------------------------------------------------------------------------
# Pixel-space metrics.

def linear_bmmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """bMMD^2 of two batches ``[B, V]`` with the linear kernel: (sum <x, x'> + sum <y, y'> - 2 sum <x, y>) / B^2,
    which is |mean x - mean y|^2 (computed so: O(B V) instead of O(B^2 V))."""
    return (x.mean(0) - y.mean(0)).square().sum()


@torch.no_grad()
def compute_mmd3d(opts, num_gen: int, batch: int = MMD_BATCH) -> dict:
    """{'mmd': mean bMMD^2 over batches (summed over voxels), 'per_voxel': the same per voxel}; NaN off rank 0."""
    opts = dnnlib.EasyDict(volume_options(opts), batch_size=batch)
    dataset = get_volume_dataset(opts)
    idx = msssim.image_channels(dataset.channels, opts.channel)
    sampler = VolumeSampler(opts, dataset)
    rng = np.random.RandomState([opts.seed, opts.rank, 3])
    stats = metric_utils.FeatureStats(capture_all=True)
    voxels = None
    for fake in metric_utils.generated_batches(opts, sampler, num_gen, desc='mmd3d'):
        rows = rng.randint(len(dataset), size=fake.shape[0])
        real = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in rows]).to(opts.device)
        x = metric_utils.to_unit(real[:, idx], dataset.dtype_max).flatten(1).to(torch.float64) * 2 - 1
        y = metric_utils.to_unit(fake[:, idx]).flatten(1).to(torch.float64) * 2 - 1
        voxels = x.shape[1]
        stats.append_torch(linear_bmmd2(x, y).reshape(1, 1).to(torch.float32), opts.num_gpus)
    if opts.rank != 0:
        return dict(mmd=float('nan'), per_voxel=float('nan'))
    mmd = float(stats.get_all().mean())
    return dict(mmd=mmd, per_voxel=mmd / voxels)


def compute_msssim3d_diversity(opts, num_images: int) -> dict:
    opts = volume_options(opts)
    dataset = get_volume_dataset(opts)
    return msssim.compute_msssim_diversity(opts, num_images, dataset=dataset, sampler=VolumeSampler(opts, dataset))


def compute_nn3d(opts, kind: str, num_gen: int) -> dict:
    opts = dnnlib.EasyDict(volume_options(opts), nn_resolution=opts.get('nn_resolution3d') or NN_RESOLUTION_3D)
    dataset = get_volume_dataset(opts)
    return nearest_neighbour.compute_nn(opts, kind, num_gen, dataset=dataset, sampler=VolumeSampler(opts, dataset))


def plane_results(name: str, per_plane: dict) -> dict:
    """{name_<plane>[_<channel>]: fid, name_<plane>: mean over channels, name: mean over planes}."""
    out = {}
    for plane, values in per_plane.items():
        out.update(metric_utils.per_channel_results(f'{name}_{plane}', values))
    out[name] = float(np.mean([out[f'{name}_{plane}'] for plane in per_plane]))
    return out
