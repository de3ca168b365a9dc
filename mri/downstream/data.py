"""Data for the downstream protocol: a real archive with tumour-label channels, folds by case, and synthetic pools.

Everything is dimension-agnostic: an item is an image ``[C, *spatial]`` in [-1, 1] and a label map ``[*spatial]``
with values 0-3, for slices (2 spatial axes) and volumes (3) alike.
"""

import json
import os
import re

import numpy as np
import torch

import dnnlib
from mri.seg import SEG_CHANNELS, decode_seg


class SegmentationError(RuntimeError):
    """Bad input for the segmentation protocol; the message names the file or flag and what is wrong."""


_SLICE_NAME = re.compile(r'^(?P<plane>.+?)-(?P<pos>\d+)\.[A-Za-z0-9]+$')


class RealArchive:
    """A dataset_tool.py archive with ``seg_*`` channels: input channels, label maps, and the case of every item."""

    def __init__(self, path: str):
        from training.dataset import DatasetError, ImageFolderDataset
        if not os.path.exists(path):
            raise SegmentationError(f'{path}: no such archive (--data)')
        try:
            self.dataset = ImageFolderDataset(path=path, use_labels=True, max_size=None, xflip=False)
        except DatasetError as err:
            raise SegmentationError(str(err)) from None
        self.path = path
        names = list(self.dataset.channels)
        missing = [s for s in SEG_CHANNELS if s not in names]
        if missing:
            raise SegmentationError(f'{path}: has no tumour-label channels ({", ".join(missing)} missing; channels are '
                                    f'{names}); rebuild it with dataset_tool.py --with-seg')
        self.channel_names = names
        self.seg_idx = [names.index(s) for s in SEG_CHANNELS]
        self.input_idx = [i for i, n in enumerate(names) if not str(n).startswith('seg_')]
        if not self.input_idx:
            raise SegmentationError(f'{path}: has only tumour-label channels; an image channel is needed as input')
        self.input_names = [names[i] for i in self.input_idx]
        self.spatial_shape = list(self.dataset.image_shape[1:])
        self.spatial_dims = len(self.spatial_shape)
        self.dtype_max = self.dataset.dtype_max
        self.kind = 'volumes' if self.spatial_dims == 3 else 'slices'
        self.item_cases = []
        for i in range(len(self.dataset)):
            case = self.dataset.file_case(i)
            if case is None:
                raise SegmentationError(f'{path}: dataset.json does not record the case of {self.dataset.image_fname(i)} '
                                        f'(file_cases); folds by case need an archive written by dataset_tool.py')
            self.item_cases.append(str(case))
        self.case_ids = sorted(set(self.item_cases))

    def __len__(self):
        return len(self.dataset)

    def items_of(self, cases) -> list:
        """Indices of every item of these cases, in archive order."""
        cases = set(cases)
        return [i for i, c in enumerate(self.item_cases) if c in cases]

    def load(self, idx: int):
        """``(image float32 [C_in, *spatial] in [-1, 1], labels int64 [*spatial])`` of item ``idx``."""
        raw, _label = self.dataset[idx]
        return to_item(raw, self.input_idx, self.seg_idx, self.dtype_max)

    def labels(self) -> np.ndarray:
        """The conditioning labels of all items ``[N, L]``."""
        return np.stack([self.dataset.get_label(i) for i in range(len(self.dataset))]) if len(self.dataset) else None

    def case_stacks(self, case: str) -> list:
        """The evaluation units of a case: ``[(name, [(position, item index)])]``.

        A volume is one unit. Slices are grouped per plane (from file names like ``axial-030.npy``) and placed at their
        slice positions, so that a stack is scored as the volume it came from (HD95 is then a 3D distance).
        """
        groups = {}
        for order, idx in enumerate(self.items_of([case])):
            base = os.path.basename(self.dataset.image_fname(idx))
            m = _SLICE_NAME.match(base) if self.spatial_dims == 2 else None
            plane, pos = (m.group('plane'), int(m.group('pos'))) if m else ('all', order)
            groups.setdefault(plane, []).append((pos, idx))
        return [(plane, sorted(members)) for plane, members in sorted(groups.items())]


def to_item(raw, input_idx, seg_idx, dtype_max):
    """Archive array (uint8/uint16 [C, *spatial]) -> (float32 inputs in [-1, 1], int64 label map)."""
    x = torch.from_numpy(np.asarray(raw, dtype=np.float32)) / float(dtype_max) * 2 - 1
    return x[input_idx].contiguous(), decode_seg(x[seg_idx], axis=0).to(torch.int64)


def make_folds(case_ids: list, folds: int, seed: int, what: str = 'the archive') -> list:
    """Split cases into ``folds`` disjoint test groups of near-equal size (seeded shuffle): ``[[case, ...], ...]``."""
    case_ids = sorted(case_ids)
    if folds < 2:
        raise SegmentationError(f'--folds {folds}: cross-validation needs at least 2 folds')
    if len(case_ids) < 2:  # No number of folds fits: say what to add, not a --folds that fails again.
        raise SegmentationError(f'--folds {folds}: {what} has {len(case_ids)} case(s); cross-validation by case needs '
                                f'at least 2 (convert more cases)')
    if len(case_ids) < folds:
        raise SegmentationError(f'--folds {folds}: {what} has only {len(case_ids)} cases; every fold needs at '
                                f'least one test case (use --folds {len(case_ids)} or more cases)')
    order = np.random.RandomState(seed).permutation(len(case_ids))
    return [sorted(case_ids[i] for i in part) for part in np.array_split(order, folds)]


# ----------------------------------------------------------------------------
# Synthetic pools: image+mask samples of a joint snapshot, written once, read by every fold and arm.

def load_generator(network: str, flag: str) -> tuple:
    """``(snapshot path, snapshot data, G_ema or G)`` of a snapshot file or run dir (its newest snapshot) named by
    the option ``flag``; a one-line SegmentationError when there is none."""
    from torch_utils import snapshot
    from training.checkpoint import latest_snapshot
    path = network
    if os.path.isdir(network):
        path = latest_snapshot(network)
        if path is None:
            raise SegmentationError(f'{network}: run dir has no network-snapshot-*.pt ({flag})')
    try:
        data, G = snapshot.load_generator(path, device='cpu', name=f'{path} ({flag})')
    except snapshot.SnapshotError as err:
        raise SegmentationError(str(err)) from None
    return path, data, G


class SnapshotSource:
    """A joint image+mask generator, checked against the real archive before anything is written."""

    def __init__(self, network: str, real: RealArchive, device, truncation_psi: float = 1.0):
        path, data, G = load_generator(network, '--network')
        from training.paint import is_paint_generator
        if is_paint_generator(G):
            raise SegmentationError(f'{path}: is a paint snapshot (it paints tumours into real scans, it does not '
                                    f'generate image+mask pairs); pass it as --paint-network for the arm real+inserted')
        channels = list((data.dataset or {}).get('channels') or [])
        if not all(s in channels for s in SEG_CHANNELS):
            raise SegmentationError(f'{path}: generates no tumour masks (its channels are {channels or "unrecorded"}; '
                                    f'train it on an archive made with dataset_tool.py --with-seg)')
        inputs = [c for c in channels if not str(c).startswith('seg_')]
        if inputs != real.input_names:
            raise SegmentationError(f'{path}: generates image channels {inputs}, but {real.path} has {real.input_names}')
        image_shape = list((data.dataset or {}).get('image_shape') or [])
        if image_shape and list(image_shape[1:]) != real.spatial_shape:
            raise SegmentationError(f'{path}: generates {"x".join(map(str, image_shape[1:]))} images, but {real.path} '
                                    f'holds {"x".join(map(str, real.spatial_shape))}')
        self.c_dim = int(getattr(G, 'c_dim', 0))
        self.labels = real.labels() if self.c_dim else None
        if self.c_dim and (self.labels is None or self.labels.shape[1] != self.c_dim):
            raise SegmentationError(f'{path}: is conditional on {self.c_dim} labels, but {real.path} has labels of '
                                    f'shape {None if self.labels is None else list(self.labels.shape)}')
        self.path = os.path.abspath(path)
        self.G = G.to(device)
        self.device = device
        self.psi = truncation_psi
        self.input_idx = [channels.index(c) for c in inputs]
        self.seg_idx = [channels.index(s) for s in SEG_CHANNELS]
        self.trained_on = dict(data.dataset or {})

    def sees_test_cases(self, real: RealArchive, test_subset: str = 'all') -> bool:
        """True when the generator was trained on cases of --data that some fold tests on."""
        src = self.trained_on.get('path')
        if not src or os.path.abspath(src) != os.path.abspath(real.path):
            return False
        trained = self.trained_on.get('subset') or 'all'
        return trained == 'all' or test_subset in ('all', trained)

    @torch.no_grad()
    def sample(self, first: int, count: int):
        """Items ``first .. first+count-1``: (uint16 images [n, C_in, *spatial], uint8 labels [n, *spatial]).

        Item i has its own RNG (seeded by i), so a pool's first n items never depend on how many are drawn.
        """
        z, c = [], []
        for i in range(first, first + count):
            rnd = np.random.RandomState([0x5E6, i])
            z.append(rnd.randn(int(self.G.z_dim)))
            c.append(self.labels[rnd.randint(len(self.labels))] if self.c_dim else np.zeros([0], np.float32))
        z = torch.from_numpy(np.stack(z).astype(np.float32)).to(self.device)
        c = torch.from_numpy(np.stack(c).astype(np.float32)).to(self.device)
        img = self.G(z, c, truncation_psi=self.psi, noise_mode='const').float()
        labels = decode_seg(img[:, self.seg_idx], axis=1)
        x = ((img[:, self.input_idx].clamp(-1, 1) + 1) / 2 * 65535).round()
        return x.to(torch.int32).cpu().numpy().astype(np.uint16), labels.cpu().numpy().astype(np.uint8)


def open_npy_for_writing(path: str, dtype, shape: tuple) -> np.memmap:
    """A .npy file of ``shape`` mapped for writing, its disk space allocated before anything is written.

    numpy's ``open_memmap`` makes a sparse file that takes its blocks only as pages are written back: on a full
    disk the process then dies of SIGBUS, with no message and its temporary files left behind. With the space
    allocated first, a full disk is an OSError (ENOSPC) here, which ``dnnlib.atomic_output`` reports in one line
    naming the file and cleans up after."""
    array = np.lib.format.open_memmap(path, mode='w+', dtype=dtype, shape=tuple(shape))
    size = os.path.getsize(path)
    try:
        with open(path, 'r+b') as f:
            if hasattr(os, 'posix_fallocate'):
                os.posix_fallocate(f.fileno(), 0, size)
            else:  # No fallocate (macOS): zeros written through the file take the blocks as well.
                f.seek(array.offset)
                for start in range(array.offset, size, 1 << 20):
                    f.write(bytes(min(1 << 20, size - start)))
    except BaseException as err:
        del array
        full = dnnlib.script.as_disk_full(err, path) if isinstance(err, Exception) else None
        if full is not None:  # Named here: the atomic writes around may be writing other files too.
            raise full from None
        raise
    return array


def pool_paths(pool_dir: str, key: str) -> tuple:
    return (os.path.join(pool_dir, f'{key}-images.npy'), os.path.join(pool_dir, f'{key}-labels.npy'),
            os.path.join(pool_dir, f'{key}.json'))


def ensure_pool(source: SnapshotSource, count: int, pool_dir: str, key: str, batch: int = 16, progress=True) -> tuple:
    """Generate (or reuse) the first ``count`` items of a source as two .npy files; returns their paths."""
    img_path, lab_path, meta_path = pool_paths(pool_dir, key)
    meta = dict(network=source.path, network_mtime=os.path.getmtime(source.path), truncation_psi=source.psi, count=count)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get('count', 0) >= count and dict(old, count=count) == meta:
            return img_path, lab_path
    first_img, first_lab = source.sample(0, 1)
    os.makedirs(pool_dir, exist_ok=True)
    with dnnlib.atomic_output(img_path, suffix='.npy') as tmp_img, dnnlib.atomic_output(lab_path, suffix='.npy') as tmp_lab:
        images = open_npy_for_writing(tmp_img, np.uint16, (count,) + first_img.shape[1:])
        labels = open_npy_for_writing(tmp_lab, np.uint8, (count,) + first_lab.shape[1:])
        unit = 'volumes' if len(first_img.shape) == 5 else 'images'
        with dnnlib.ProgressBar(count, desc=f'synthetic {key}', unit=unit, enabled=progress) as bar:
            for start in range(0, count, batch):
                n = min(batch, count - start)
                images[start:start + n], labels[start:start + n] = source.sample(start, n)
                bar.update(n)
        images.flush()
        labels.flush()
        del images, labels
    with dnnlib.atomic_output(meta_path, suffix='.json') as tmp, open(tmp, 'w') as f:
        json.dump(meta, f)
    return img_path, lab_path


class TrainingItems(torch.utils.data.Dataset):
    """The training set of one fold and arm: real items by index, then the first ``num_synthetic`` pool items.

    Safe for DataLoader workers: the zip and the memory maps are opened lazily in each process.
    """

    def __init__(self, real: RealArchive, real_indices: list, pool: tuple = None, num_synthetic: int = 0):
        self.dataset = real.dataset
        self.input_idx, self.seg_idx, self.dtype_max = real.input_idx, real.seg_idx, real.dtype_max
        self.real_indices = list(real_indices)
        self.pool = pool
        self.num_synthetic = int(num_synthetic)
        self._maps = None
        if self.num_synthetic and pool is None:
            raise ValueError('TrainingItems: synthetic items need a pool')

    def __len__(self):
        return len(self.real_indices) + self.num_synthetic

    def __getstate__(self):
        return dict(self.__dict__, _maps=None)

    def worker_init(self, _worker_id=None):
        """DataLoader worker_init_fn: each worker maps the synthetic pool itself. (The archive's zip handle needs
        nothing here: training.dataset opens one per process.)"""
        self._maps = None

    def __getitem__(self, i):
        if i < len(self.real_indices):
            raw, _ = self.dataset[self.real_indices[i]]
            return to_item(raw, self.input_idx, self.seg_idx, self.dtype_max)
        if self._maps is None:
            self._maps = tuple(np.load(p, mmap_mode='r') for p in self.pool)
        j = i - len(self.real_indices)
        x = torch.from_numpy(np.asarray(self._maps[0][j], dtype=np.float32)) / 65535 * 2 - 1
        return x, torch.from_numpy(np.asarray(self._maps[1][j], dtype=np.int64))
