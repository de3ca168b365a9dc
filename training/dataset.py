"""Datasets: zip archives or folders of 8/16-bit PNG, JPEG or ``.npy`` images with ``dataset.json`` labels.

Reads both the archives that ``dataset_tool.py`` writes (named label groups, channel names, case-level
splits, normalisation record; see DESIGN.md) and plain StyleGAN2-ADA image folders/zips (labels as ints
or float lists). Items are ``(uint8/uint16 array [C,H,W] or [C,D,H,W], float32 label)``.
"""

import hashlib
import json
import os
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils.label_channels import label_channel_indices, labelmap_to_onehot

# What reading a damaged file raises: PIL gives SyntaxError for a broken PNG, zipfile's inflater zlib.error for a
# damaged deflated member (BadZipFile for a CRC mismatch), a truncated file EOFError, a damaged blosc2 member
# ValueError (read_npy_member).
READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, zlib.error, zipfile.BadZipFile,
               PIL.Image.DecompressionBombError)

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.npy')


# .npy members come in two forms, told apart by their bytes (the member keeps its .npy name either way, so nothing
# keyed on names changes): the plain .npy file, or its header followed by one blosc2 chunk of the pixels (byte
# shuffle + LZ4HC, mri.sources.archive.blosc2_npy), which dataset_tool.py writes by default. A blosc2 chunk starts
# with 16 bytes: format version, codec version, flags, typesize, then little-endian int32 uncompressed bytes,
# block size and chunk bytes. The writer never emits a chunk exactly as long as the raw pixels, so the member's
# length alone says which form it is, and the chunk's own sizes must agree with the .npy header and the member.
_BLOSC2_HEAD = 16
_BLOSC2_FREE_BYTES = 1 << 26    # A chunk may claim this much whatever its size ...
_BLOSC2_MAX_RATIO = 1000        # ... and beyond it at most this many times its own bytes (real slices: 3-5x).


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _blosc2_sizes(head: bytes):
    """(uncompressed bytes, chunk bytes) from the start of a blosc2 chunk; None where ``head`` is no blosc2 chunk."""
    if len(head) < _BLOSC2_HEAD or not 2 <= head[0] <= 10 or not 1 <= head[3] <= 255:
        return None
    nbytes, _blocksize, cbytes = np.frombuffer(head, '<i4', 3, offset=4).tolist()
    return (nbytes, cbytes) if nbytes >= 0 and cbytes >= 32 else None


def _decode_blosc2(chunk: bytes, image: np.ndarray):
    """Decompresses one blosc2 chunk into ``image`` (sized by the caller from the checked claim), in this thread:
    blosc2 with one thread starts no thread pool, so DataLoader workers forked after a read stay safe."""
    try:
        import blosc2
    except ImportError:
        raise ValueError('a blosc2-compressed member, and blosc2 does not import (pip install blosc2)') from None
    try:
        blosc2.decompress2(chunk, dst=image, nthreads=1)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f'damaged blosc2 data ({str(err).strip() or type(err).__name__})') from None


def read_npy_member(f, size: int = None) -> np.ndarray:
    """A .npy archive member or file, either form (see above), read into a fresh writable array: the one decoder
    of .npy members that every reader uses. ``size``: the member's length in bytes. Every size claim is checked
    before the array is allocated: a plain member's header may not claim more bytes than the member holds, and a
    blosc2 member's header and chunk must claim the same size, at most ``_BLOSC2_MAX_RATIO`` times the chunk's bytes
    (beyond 64 MiB). Raises ValueError (or the file's own read errors) with the problem in one line."""
    shape, fortran, dtype = _npy_header(f)
    if dtype.hasobject:
        raise ValueError('object arrays are not images')
    claim = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    payload = None if size is None else size - f.tell()
    head = b''
    if payload is not None and payload != claim:
        head = f.read(min(_BLOSC2_HEAD, payload))
        if _blosc2_sizes(head) == (claim, payload):
            if claim > max(_BLOSC2_FREE_BYTES, _BLOSC2_MAX_RATIO * payload):
                raise ValueError(f'its header claims shape {tuple(shape)} ({claim} bytes) from {payload} bytes of '
                                 f'blosc2 data, more than {_BLOSC2_MAX_RATIO}x; refused')
            chunk = bytearray(payload)  # One copy of the compressed bytes, read in place.
            chunk[:len(head)] = head
            if len(head) + f.readinto(memoryview(chunk)[len(head):]) != payload:
                raise ValueError(f'truncated blosc2 data (expected {payload} bytes)')
            image = np.zeros(shape[::-1] if fortran else shape, dtype)
            _decode_blosc2(chunk, image)
            return image.T if fortran else image
        if payload < claim:
            raise ValueError(f'its header claims shape {tuple(shape)} ({claim} bytes), more than the file holds '
                             f'({size}): truncated, or a damaged blosc2 chunk (its sizes disagree)')
    head = head[:claim]  # A plain member with bytes after its pixels (np.save writes none): they are ignored.
    image = np.empty(shape[::-1] if fortran else shape, dtype)
    view = memoryview(image).cast('B')
    view[:len(head)] = head
    if len(head) + f.readinto(view[len(head):]) != image.nbytes:
        raise ValueError(f'truncated .npy data (expected {image.nbytes} bytes for shape {shape})')
    return image.T if fortran else image


class DatasetError(RuntimeError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file.

    Raised in a DataLoader worker, it reaches the training process as torch re-raises it there: the same class
    built from one text, "Caught DatasetError in DataLoader worker process N. Original Traceback ...", whose
    last line is the worker's message. That text is split here: the message is the worker's one line again
    (naming the archive and member), and ``worker_traceback`` keeps the rest for log.txt.
    """

    def __init__(self, message=''):
        self.worker_traceback = None
        text = str(message)
        if text.startswith('Caught ') and '\nOriginal Traceback' in text:
            self.worker_traceback = text
            last = text.rstrip().splitlines()[-1]
            message = last.split('DatasetError: ', 1)[1] if 'DatasetError: ' in last else last
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self),)


class Dataset(torch.utils.data.Dataset):
    """Base class: label handling, mirroring and random subsets on top of ``_load_raw_image``."""

    def __init__(
        self,
        name: str,                  # Name of the dataset.
        raw_shape: list,            # Shape of the raw image data (NCHW or NCDHW).
        max_size: int = None,       # Use at most this many images (random subset); None = all.
        use_labels: bool = False,   # Return labels (else zero-length label vectors).
        xflip: bool = False,        # Add horizontally mirrored copies (doubles the size).
        random_seed: int = 0,       # Seed of the max_size subset.
    ):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._raw_labels = None
        self._label_shape = None

        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            self._raw_labels = self._load_raw_labels() if self._use_labels else None
            if self._raw_labels is None:
                self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            assert self._raw_labels.shape[0] == self._raw_shape[0]
            assert self._raw_labels.dtype == np.float32
        return self._raw_labels

    def close(self):
        pass

    def _load_raw_image(self, raw_idx):
        raise NotImplementedError

    def _load_raw_labels(self):
        raise NotImplementedError

    def __getstate__(self):
        return dict(self.__dict__, _raw_labels=None)

    def __del__(self):
        try:
            self.close()
        except Exception:  # Interpreter shutdown: nothing useful to do.
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        image = self._load_raw_image(self._raw_idx[idx])
        assert list(image.shape) == self.image_shape, (image.shape, self.image_shape)
        if self._xflip[idx]:
            image = image[..., ::-1]
        return np.ascontiguousarray(image), self.get_label(idx)

    def get_label(self, idx) -> np.ndarray:
        return self._get_raw_labels()[self._raw_idx[idx]].copy()

    def get_details(self, idx) -> dnnlib.EasyDict:
        return dnnlib.EasyDict(raw_idx=int(self._raw_idx[idx]), xflip=int(self._xflip[idx]) != 0,
                               raw_label=self._get_raw_labels()[self._raw_idx[idx]].copy())

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self):
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        if len(self.image_shape) == 4:  # Volumes: the largest side (a base x 2^k box, e.g. 160x192x160, is no cube).
            return max(self.image_shape[1:])
        assert self.image_shape[-1] == self.image_shape[-2]
        return self.image_shape[-1]

    @property
    def label_shape(self):
        if self._label_shape is None:
            raw = self._get_raw_labels()
            self._label_shape = list(raw.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        return self.label_shape[0] if self.label_shape else 0

    @property
    def has_labels(self):
        return self.label_dim > 0

    @property
    def has_onehot_labels(self):
        return self._get_raw_labels().dtype == np.int64


class ImageFolderDataset(Dataset):
    """A folder or uncompressed zip of images plus an optional ``dataset.json``."""

    def __init__(
        self,
        path: str,                  # Folder or zip.
        resolution: int = None,     # Expected resolution; None = take it from the data.
        subset: str = 'all',        # 'all', 'train' or 'val': the case-level split of dataset.json.
        **super_kwargs,             # max_size, use_labels, xflip, random_seed.
    ):
        self._path = str(path)
        self._zipfile = None        # Opened lazily, one handle per process: see _get_zipfile.
        self._zipfile_pid = None    # The process that opened self._zipfile.
        if subset not in ('all', 'train', 'val'):
            raise DatasetError(f'{path}: unknown subset {subset!r}; expected all, train or val')
        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path).replace(os.sep, '/')
                                for root, _dirs, files in os.walk(self._path) for fname in files}
        elif self._path.lower().endswith('.zip') and os.path.isfile(self._path):
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except zipfile.BadZipFile as err:
                raise DatasetError(f'{path}: not a readable zip ({err})') from None
        else:
            raise DatasetError(f'{path}: not a dataset folder or .zip file')

        self._meta = self._load_meta()
        fnames = sorted(f for f in self._all_fnames if f.lower().endswith(IMAGE_EXTS) and not f.startswith('__MACOSX'))
        self.subset = subset
        if subset != 'all':
            fnames = self._filter_subset(fnames, subset)
        self._image_fnames = fnames
        if len(self._image_fnames) == 0:
            raise DatasetError(f'{path}: no images found' + (f' in subset {subset!r}' if subset != 'all' else ''))

        name = os.path.splitext(os.path.basename(self._path.rstrip('/')))[0]
        first = self._load_raw_image(0)
        raw_shape = [len(self._image_fnames)] + list(first.shape)
        if resolution is not None and (raw_shape[-1] != resolution or raw_shape[-2] != resolution):
            raise DatasetError(f'{path}: images are {raw_shape[-2]}x{raw_shape[-1]}, expected {resolution}x{resolution}')
        self._dtype = first.dtype
        self._check_shapes(volumes=first.ndim == 4)
        super().__init__(name=name, raw_shape=raw_shape, **super_kwargs)

    def _check_shapes(self, volumes: bool):
        """Every file of the archive has the first one's stored shape and type, read from the headers only (.npy
        header; PNG/JPEG size and mode): a 32x32, RGB or 8-bit PNG among 16x16 16-bit ones is one line naming the
        file before training or measuring starts, not a bare AssertionError in a worker mid-run."""
        first = None
        for fname in self._image_fnames:
            npy = fname.lower().endswith('.npy')
            if volumes and not npy:
                raise DatasetError(f'{self._path}/{fname}: a volume archive holds only .npy volumes')
            try:
                with self._open_file(fname) as f:
                    if npy:  # Both forms of a .npy member begin with the plain header.
                        shape, _order, dtype = _npy_header(f)
                        form = (tuple(shape), str(dtype))
                    else:
                        with PIL.Image.open(f) as im:  # Reads the header only.
                            form = (im.size, im.mode)
            except READ_ERRORS as err:
                raise DatasetError(f'{self._path}/{fname}: unreadable {"volume" if volumes else "image"} '
                                   f'({str(err).strip() or type(err).__name__})') from None
            if first is None:
                first = form
            elif form != first and volumes:
                raise DatasetError(f'{self._path}/{fname}: volume of shape {form[0]} ({form[1]}) differs from '
                                   f'{self._image_fnames[0]} {first[0]} ({first[1]}); every volume of an archive '
                                   f'must have one shape (rebuild it with one --volume-size)')
            elif form != first:
                what = 'shape' if npy else 'size and mode'
                raise DatasetError(f'{self._path}/{fname}: {what} {form[0]} ({form[1]}) differs from '
                                   f'{self._image_fnames[0]} {first[0]} ({first[1]}); every image of an archive must '
                                   f'have one {what} (rebuild it with dataset_tool.py)')

    # -- file access -------------------------------------------------------------------------------

    def _get_zipfile(self):
        # A ZipFile reads through one OS file whose offset a fork shares: DataLoader workers forked after
        # the parent opened the archive (to read dataset.json, or a metrics pass) would seek and read over
        # one another ("Bad CRC-32", "File name in directory ... differ"). So each process opens its own
        # handle, keyed on its pid; a handle inherited through fork is never read from.
        assert self._type == 'zip'
        pid = os.getpid()
        if self._zipfile is None or self._zipfile_pid != pid:
            if self._zipfile is not None:
                self._close_zipfile()
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = pid
        return self._zipfile

    def _close_zipfile(self):
        # Safe on a handle inherited through fork too: it closes this process's copy of the descriptor
        # only, and a read-mode ZipFile and its buffered reader do not seek when closed, so the parent's
        # file position is left alone.
        handle, self._zipfile = self._zipfile, None
        try:
            handle.close()
        except (OSError, ValueError):
            pass

    def _file_size(self, fname) -> int:
        """Bytes of a member (uncompressed) or file, as its directory records them."""
        if self._type == 'dir':
            return os.path.getsize(os.path.join(self._path, fname))
        return self._get_zipfile().getinfo(fname).file_size

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        if self._zipfile is not None:
            self._close_zipfile()
        self._zipfile_pid = None

    def __getstate__(self):
        return dict(super().__getstate__(), _zipfile=None, _zipfile_pid=None)

    def _load_meta(self) -> dict:
        if 'dataset.json' not in self._all_fnames:
            return {}
        try:
            with self._open_file('dataset.json') as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f'{self._path}/dataset.json: not valid JSON ({err})') from None
        if not isinstance(meta, dict):
            raise DatasetError(f'{self._path}/dataset.json: expected a JSON object')
        return meta

    def _filter_subset(self, fnames, subset):
        cases = self._meta.get('cases')
        file_cases = self._meta.get('file_cases')
        if not cases or not file_cases:
            raise DatasetError(f'{self._path}: has no case-level split in dataset.json; use subset=all '
                               f'or rebuild it with dataset_tool.py --split')
        return [f for f in fnames if cases.get(file_cases.get(f)) == subset]

    def _load_raw_image(self, raw_idx) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                if fname.lower().endswith('.npy'):
                    image = read_npy_member(f, self._file_size(fname))
                else:
                    image = np.array(PIL.Image.open(f))
        except READ_ERRORS as err:
            raise DatasetError(f'{self._path}/{fname}: unreadable image ({str(err).strip() or type(err).__name__})') from None
        if fname.lower().endswith('.npy'):
            if image.ndim not in (3, 4):
                raise DatasetError(f'{self._path}/{fname}: .npy must be (C,H,W) or (C,D,H,W), got shape {image.shape}')
        elif image.ndim == 2:
            image = image[np.newaxis]           # HW -> CHW
        else:
            image = image.transpose(2, 0, 1)    # HWC -> CHW
        if image.dtype == np.int32 or image.dtype == np.int16:  # Some PIL modes for 16-bit PNG ('I').
            image = np.clip(image, 0, 65535).astype(np.uint16)
        if image.dtype not in (np.uint8, np.uint16):
            raise DatasetError(f'{self._path}/{fname}: pixel type {image.dtype} is not uint8 or uint16')
        if self._meta.get('seg_storage') == 'labelmap' and image.ndim in (3, 4):
            # The archive stores the label map (values 0..K) as the last channel; the networks see the K one-hot
            # label channels that dataset.json "channels" names (0 / dtype max), as in archives written before.
            k = self._num_label_channels()
            out = np.empty((image.shape[0] - 1 + k,) + image.shape[1:], image.dtype)
            out[:-k] = image[:-1]
            labelmap_to_onehot(image[-1], k, vmax=np.iinfo(image.dtype).max, out=out[-k:])
            image = out
        return image

    def _num_label_channels(self) -> int:
        """K of an archive that stores its label map: the ``seg_*`` channels that dataset.json "channels" names."""
        k = len(label_channel_indices(self._meta.get('channels')))
        if k == 0:
            raise DatasetError(f'{self._path}/dataset.json: "seg_storage": "labelmap", but "channels" names no '
                               f'label channel (seg_*) to expand the map into')
        return k

    def _load_raw_labels(self):
        labels = self._meta.get('labels')
        if labels is None:
            return None
        labels = dict(labels)
        missing = [f for f in self._image_fnames if f not in labels]
        if missing:
            raise DatasetError(f'{self._path}/dataset.json: no label for {missing[0]} ({len(missing)} images unlabelled)')
        values = [labels[fname] for fname in self._image_fnames]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            negative = [f for f, v in zip(self._image_fnames, values) if v < 0]
            if negative:
                raise DatasetError(f'{self._path}/dataset.json: class label {labels[negative[0]]} of {negative[0]} is '
                                   f'negative ({len(negative)} such); integer labels are class indices 0, 1, ...')
            # StyleGAN2-ADA integer class labels become one-hot vectors.
            num = int(self._meta.get('num_classes', max(values) + 1))
            onehot = np.zeros([len(values), num], dtype=np.float32)
            onehot[np.arange(len(values)), values] = 1
            return onehot
        try:
            array = np.array(values, dtype=np.float32)
        except ValueError:
            raise DatasetError(f'{self._path}/dataset.json: labels are neither ints nor equal-length float lists') from None
        if array.ndim == 1:
            array = array[:, None]
        bad = ~np.isfinite(array).all(axis=1) if array.ndim == 2 else None
        if bad is not None and bad.any():
            first = self._image_fnames[int(np.flatnonzero(bad)[0])]
            raise DatasetError(f'{self._path}/dataset.json: the label of {first} is not finite ({labels[first]}); '
                               f'{int(bad.sum())} labels hold NaN or infinity')
        return array

    # -- metadata ---------------------------------------------------------------------------------

    @property
    def path(self):
        return self._path

    @property
    def dtype_max(self) -> int:
        return 65535 if self._dtype == np.uint16 else 255

    @property
    def kind(self) -> str:
        return self._meta.get('kind', 'volumes' if len(self.image_shape) == 4 else 'slices' if self._meta else 'images')

    @property
    def channels(self) -> list:
        names = self._meta.get('channels')
        if names and len(names) == self.num_channels:
            return list(names)
        return {1: ['gray'], 3: ['red', 'green', 'blue']}.get(self.num_channels, [f'ch{i}' for i in range(self.num_channels)])

    @property
    def label_names(self) -> list:
        if not self.has_labels:
            return []
        names = self._meta.get('label_names')
        if names and len(names) == self.label_dim:
            return list(names)
        return [f'class{i}' for i in range(self.label_dim)]

    @property
    def label_groups(self) -> list:
        """Named one-hot groups ``[{'name', 'values'}]`` covering the label vector in order."""
        if not self.has_labels:
            return []
        groups = self._meta.get('label_groups')
        if groups and sum(len(g['values']) for g in groups) == self.label_dim:
            return [dict(name=g['name'], values=list(g['values'])) for g in groups]
        return [dict(name='class', values=self.label_names)]

    @property
    def normalization(self) -> dict:
        return dict(self._meta.get('normalization') or {})

    @property
    def split(self) -> dict:
        return dict(self._meta.get('cases') or {})

    @property
    def affines(self) -> dict:
        return dict(self._meta.get('affines') or {})

    def image_fname(self, idx) -> str:
        return self._image_fnames[self._raw_idx[idx]]

    def file_case(self, idx):
        """The case (patient) an item comes from, per dataset.json ``file_cases``; None when not recorded."""
        return (self._meta.get('file_cases') or {}).get(self.image_fname(idx))

    def content_hash(self) -> str:
        """Digest of the archive content (names + bytes): caches keyed on it go stale when the data changes."""
        h = hashlib.sha256()
        h.update(self.subset.encode())
        names = sorted(f for f in self._all_fnames if f.lower().endswith(IMAGE_EXTS) or f == 'dataset.json')
        if self._type == 'zip':
            # The zip directory stores a CRC-32 of every member: content-based and free to read.
            infos = {i.filename: i for i in self._get_zipfile().infolist()}
            for name in names:
                h.update(f'{name}:{infos[name].file_size}:{infos[name].CRC}\n'.encode())
        else:
            for name in names:
                h.update(name.encode() + b'\n')
                with open(os.path.join(self._path, name), 'rb') as f:
                    for block in iter(lambda: f.read(1 << 20), b''):
                        h.update(block)
        return h.hexdigest()

    def describe(self) -> dict:
        """What a snapshot records about its training data (DESIGN.md)."""
        return dict(path=os.path.abspath(self._path), resolution=self.resolution, channels=self.channels,
                    label_names=self.label_names, label_groups=self.label_groups, kind=self.kind,
                    normalization=self.normalization, dtype_max=self.dtype_max, image_shape=self.image_shape,
                    subset=self.subset, space=self._meta.get('space'),
                    # patch archives (tumour painting): the patch on the scan's own grid, that grid's voxel size, and
                    # for 2D crops their planes (the painter paints in them, with or without plane labels)
                    **{k: self._meta[k] for k in ('patch_size', 'spacing') if k in self._meta},
                    **({'planes': self.planes} if self.kind == 'patches' and self.planes else {}))

    @property
    def planes(self) -> list:
        """The slice planes of a 2D archive (its ``plane`` label group, whether or not labels are used), else []."""
        groups = self._meta.get('label_groups') or []
        return next((list(g['values']) for g in groups if g.get('name') == 'plane'), []) if len(self.image_shape) == 3 else []

    @property
    def patch_info(self) -> dict:
        """dataset.json ``patches`` of a patch archive: ``{relpath: {'case', 'centre', 'type', ['plane']}}``."""
        return dict(self._meta.get('patches') or {})
