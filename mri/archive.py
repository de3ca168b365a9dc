"""Dataset archive writer: an uncompressed zip (or a folder) of images plus `dataset.json`, written atomically.

The layout extends the StyleGAN2-ADA dataset format (Karras et al., "Training Generative Adversarial Networks with
Limited Data", NeurIPS 2020): images at relative paths and `dataset.json` with "labels"; this project adds named
label groups, channel names, the normalisation, the case split and, for volumes, affines (docs/internals.md,
section Dataset archives).

Everything is written to a temporary file or folder beside the destination and moved into place with `os.replace`
only when complete, so an error or Ctrl-C never leaves a half-written archive behind.

PNG encoding is done here rather than by Pillow because it is the hot loop of a conversion: a 16-bit slice is
quantised straight into big-endian PNG rows (filter type 0) and deflated with zlib, whose compressor releases the
GIL so slices compress in parallel threads. The files are standard PNG (ISO/IEC 15948) that Pillow reads as 'I;16'.
"""

import io
import json
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry time: identical inputs give byte-identical archives


class ArchiveError(OSError):
    """The destination cannot be written; one line naming it and the reason."""


def _chunk(tag, data):
    """PNG chunk pieces (length, tag, data, CRC) as a list, so that the caller joins everything with one copy."""
    crc = zlib.crc32(data, zlib.crc32(tag)) & 0xFFFFFFFF
    return [struct.pack('>I', len(data)), tag, data, struct.pack('>I', crc)]


def png_from_rows(rows, height, width, bit_depth, level):
    """A grayscale PNG from raw scanlines `rows` (bytes-like: height x (1 + width * bit_depth / 8), filter byte
    first).

    Level 0 stores; level 1 uses zlib's run-length strategy (Z_RLE), which on filtered MRI slices is both ~2.5x
    faster and smaller than level 1's default LZ77 search; levels 2-9 are zlib's usual levels."""
    ihdr = struct.pack('>IIBBBBB', width, height, bit_depth, 0, 0, 0, 0)  # colour type 0 = grayscale
    strategy = zlib.Z_RLE if level == 1 else zlib.Z_DEFAULT_STRATEGY
    comp = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    idat = comp.compress(rows) + comp.flush()
    return b''.join([_PNG_SIGNATURE, *_chunk(b'IHDR', ihdr), *_chunk(b'IDAT', idat), *_chunk(b'IEND', b'')])


def png_rows(images, bit_depth, filtered=True, prescaled=False):
    """(N, H, W) array -> (N, H, 1 + W * bytes) uint8 scanlines. uint8/uint16 input is stored as is; float input is
    taken as [0, 1] (or [0, vmax] when `prescaled`) and quantised to round(x * vmax); float input that is not
    prescaled is scaled in place (the caller hands over a scratch array).

    `filtered` applies PNG filter type 1 (Sub: each byte minus the byte one sample to the left, modulo 256), which
    turns smooth anatomy and flat background into runs of small values that deflate compresses well."""
    n, h, w = images.shape
    nbytes = bit_depth // 8
    raw = np.empty((n, h, 1 + w * nbytes), np.uint8)
    raw[:, :, 0] = 1 if filtered else 0  # the filter byte of each scanline
    body = raw[:, :, 1:]
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    if images.dtype.kind == 'f':
        vmax = (1 << bit_depth) - 1
        q = images
        if not prescaled:
            q *= np.float32(vmax)
            np.clip(q, 0, vmax, out=q)
        # Prescaled input comes from convex combinations of [0, 1] values times vmax (mri.preprocess), so it is
        # within [0, vmax] up to float rounding and needs no clip pass. Rounding and the cast are one pass.
        samples = np.empty((n, h, w), dtype)
        np.add(q, np.float32(0.5), out=samples, casting='unsafe')
    else:
        samples = np.ascontiguousarray(images, dtype=dtype)
    if bit_depth == 16:
        if samples is images:
            samples = samples.copy()
        samples.byteswap(inplace=True)  # PNG samples are big-endian
    body[...] = samples.view(np.uint8).reshape(n, h, w * nbytes)
    if filtered:
        body[:, :, nbytes:] -= body[:, :, :-nbytes].copy()  # uint8 arithmetic wraps modulo 256, as PNG wants
    return raw


def encode_pngs(images, bit_depth=16, level=1, threads=None, prescaled=False):
    """Encodes (N, H, W) images (uint8/uint16, or float in [0, 1] or prescaled to [0, vmax], which is overwritten)
    as N one-channel PNGs. Returns a list of bytes."""
    assert images.ndim == 3, f'expected (N, H, W), got {images.shape}'
    assert bit_depth in (8, 16), bit_depth
    n, h, w = images.shape
    raw = png_rows(images, bit_depth, filtered=level > 0, prescaled=prescaled)

    def encode(i):
        return png_from_rows(memoryview(raw[i]).cast('B'), h, w, bit_depth, level)  # no copy of the rows
    threads = threads or os.cpu_count() or 1
    if level == 0 or threads == 1 or n < 4:
        return [encode(i) for i in range(n)]
    with ThreadPoolExecutor(min(threads, n)) as pool:  # zlib releases the GIL while it compresses
        return list(pool.map(encode, range(n)))


def encode_png(image, level=1):
    """One (H, W) uint8 or uint16 array as a PNG (8- or 16-bit by dtype)."""
    image = np.asarray(image)
    assert image.ndim == 2 and image.dtype in (np.uint8, np.uint16), (image.shape, image.dtype)
    return encode_pngs(image[None], 8 * image.dtype.itemsize, level, threads=1)[0]


def encode_npy(array):
    """An array as .npy bytes (C order)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path_beside(dest, tag='tmp'):
    dest = Path(dest)
    return dest.parent / f'.{dest.name}.{tag}-{os.getpid()}'


class ArchiveWriter:
    """Writes a dataset archive atomically. Use as a context manager; `commit(dataset_json)` makes it visible.

    `dest` ending in `.zip` gives an uncompressed zip (an existing zip is replaced only at commit); anything else
    gives a folder, which must not exist yet or be empty. Leaving the `with` block without a commit, by an
    exception or KeyboardInterrupt, removes the temporary file or folder.
    """

    def __init__(self, dest):
        self.dest = Path(dest)
        self.is_zip = self.dest.suffix.lower() == '.zip'
        self.names = set()
        self._zip = None
        self._tmp = None
        if self.dest.exists():
            if self.is_zip and not self.dest.is_file():
                raise ArchiveError(f'{self.dest}: --dest exists and is not a zip file')
            if not self.is_zip and (not self.dest.is_dir() or any(self.dest.iterdir())):
                raise ArchiveError(f'{self.dest}: --dest exists and is not an empty folder; remove it or choose another')
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            if self.is_zip:
                fd, tmp = tempfile.mkstemp(prefix=f'.{self.dest.name}.', suffix='.tmp', dir=self.dest.parent)
                os.close(fd)
                self._tmp = Path(tmp)
                os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the archive private
                self._zip = zipfile.ZipFile(self._tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True)
            else:
                self._tmp = Path(tempfile.mkdtemp(prefix=f'.{self.dest.name}.', suffix='.tmp', dir=self.dest.parent))
                os.chmod(self._tmp, 0o777 & ~_umask())
        except OSError as e:
            self._cleanup()
            raise ArchiveError(f'{self.dest}: cannot write the archive ({e.strerror or e})') from None

    def add(self, relpath, data):
        """Adds one file (bytes) at the archive-relative POSIX path `relpath`."""
        if relpath in self.names:
            raise ValueError(f'{self.dest}: duplicate archive entry {relpath}')
        self.names.add(relpath)
        try:
            if self._zip is not None:
                self._zip.writestr(zipfile.ZipInfo(relpath, date_time=_ZIP_TIME), data)
            else:
                path = self._tmp / relpath
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        except OSError as e:
            raise ArchiveError(f'{self.dest}: writing {relpath} failed ({e.strerror or e})') from None

    def commit(self, dataset_json):
        """Writes dataset.json, closes and moves the archive into place."""
        # No indent: json's C encoder only runs for compact output, and dataset.json can list 100k files.
        self.add('dataset.json', json.dumps(dataset_json, separators=(',', ':')).encode())
        try:
            if self._zip is not None:
                self._zip.close()
                self._zip = None
            os.replace(self._tmp, self.dest)
        except OSError as e:
            raise ArchiveError(f'{self.dest}: cannot move the finished archive into place ({e.strerror or e})') from None
        self._tmp = None
        return self.dest

    def abort(self):
        self._cleanup()

    def _cleanup(self):
        if self._zip is not None:
            try:
                self._zip.close()
            except (OSError, ValueError):
                pass  # closing a broken zip must not hide the original error
            self._zip = None
        if self._tmp is not None:
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            elif self._tmp.exists():
                self._tmp.unlink()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._cleanup()  # no-op after a commit
        return False


def write_json_atomic(path, obj):
    """Writes JSON to `path` via a temporary file beside it."""
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path
