"""Dataset archive writer: a zip (or a folder) of images plus `dataset.json`, written atomically. Members are stored,
except `.npy` members that the caller deflated (`deflate`, `npy_entry`; dataset_tool.py --codec deflate); `.npy`
members are by default stored blosc2 forms (`blosc2_npy`, --codec blosc2), read by training.dataset.read_npy_member.

The layout extends the StyleGAN2-ADA dataset format (Karras et al., "Training Generative Adversarial Networks with
Limited Data", NeurIPS 2020): images at relative paths and `dataset.json` with "labels"; this project adds named
label groups, channel names, the normalisation, the case split and, for volumes, affines (docs/internals.md,
section Dataset archives).

Everything is written to a temporary file or folder beside the destination and moved into place with `os.replace`
only when complete, so an error or Ctrl-C never leaves a half-written archive behind.

PNG encoding is done here rather than by Pillow because it is the hot loop of a conversion: a 16-bit slice is
quantised straight into big-endian PNG rows (filter type 0) and deflated with zlib, whose compressor releases the
GIL so slices compress in parallel threads. Uncompressed PNGs (the default, level 0) skip zlib's compressor: a batch
of slices is quantised in one pass into a buffer laid out as finished files (stored deflate blocks of whole rows),
and the zip writer takes the CRC-32 computed there instead of reading the 50 MB of a case once more. The files are
standard PNG (ISO/IEC 15948) that Pillow reads as 'I;16'; the zip is a standard stored zip (PKWARE APPNOTE).
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


class ArchiveReadError(ValueError):
    """An archive's dataset.json cannot be read; one line naming the archive and the reason."""


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
        # Prescaled input comes from convex combinations of [0, 1] values times vmax (mri.sources.preprocess), so it is
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


class _StoredLayout:
    """Byte layout of a PNG whose IDAT is a zlib stream of stored (uncompressed) deflate blocks, each holding whole
    scanlines, so that every sample has a fixed offset and a batch of images can be quantised straight into place.

    All images of one size share it: the prefix (signature, IHDR, IDAT length) and suffix (IEND) are constant, and so
    is `crc_fix`, which turns the running CRC-32 of the file up to the end of the IDAT data into the IDAT chunk CRC
    (CRC-32 is affine in its start value: crc(M, a) ^ crc(M, b) depends only on a ^ b and len(M)), so one CRC pass
    gives both the chunk CRC and the zip member's CRC."""

    def __init__(self, height, width, bit_depth):
        self.height, self.width, self.bit_depth = height, width, bit_depth
        self.row = 1 + width * bit_depth // 8
        if self.row > 0xFFFF:
            raise ValueError(f'PNG rows of {self.row} bytes do not fit a stored deflate block')
        self.rows_per_block = 0xFFFF // self.row
        blocks = -(-height // self.rows_per_block)
        data = height * self.row + 5 * blocks                        # scanlines + stored block headers
        self.idat_len = 2 + data + 4                                 # zlib header, blocks, Adler-32
        ihdr = struct.pack('>IIBBBBB', width, height, bit_depth, 0, 0, 0, 0)
        prefix = b''.join([_PNG_SIGNATURE, *_chunk(b'IHDR', ihdr), struct.pack('>I', self.idat_len)])
        self.idat_start = len(prefix)                                # offset of the b'IDAT' tag
        self.data_end = self.idat_start + 4 + self.idat_len          # end of the CRC'd IDAT tag + data
        self.size = self.data_end + 4 + 12                           # + IDAT CRC + IEND chunk
        self.template = np.zeros(self.size, np.uint8)
        self.template[:len(prefix)] = np.frombuffer(prefix, np.uint8)
        head = self.idat_start + 4
        self.template[self.idat_start:head] = np.frombuffer(b'IDAT', np.uint8)
        self.template[head:head + 2] = (0x78, 0x01)                  # zlib: deflate, 32K window, no dictionary
        self.blocks = []                                             # (first row, rows, offset of first row)
        pos = head + 2
        for first in range(0, height, self.rows_per_block):
            rows = min(self.rows_per_block, height - first)
            length = rows * self.row
            final = first + rows == height
            self.template[pos:pos + 5] = np.frombuffer(struct.pack('<BHH', final, length, length ^ 0xFFFF), np.uint8)
            self.blocks.append((first, rows, pos + 5))
            pos += 5 + length
        self.adler_at = pos
        self.template[self.data_end + 4:] = np.frombuffer(b''.join(_chunk(b'IEND', b'')), np.uint8)
        zeros = bytes(self.data_end - self.idat_start)
        self.crc_fix = zlib.crc32(zeros, zlib.crc32(prefix)) ^ zlib.crc32(zeros)


_LAYOUTS = {}


def encode_stored_pngs(images, bit_depth=16, prescaled=False):
    """(N, H, W) images -> N uncompressed PNGs (deflate 'stored' blocks, filter type 0) written into one buffer.

    Input as for `encode_pngs`: uint8/uint16 stored as is, float in [0, 1] (or [0, vmax] when `prescaled`) quantised
    to round(x * vmax). Returns (list of N memoryviews of the PNG files, list of their CRC-32s for the zip entries).
    Quantisation, byte order and placement are one pass; then one Adler-32 and one CRC-32 pass per image."""
    assert images.ndim == 3, f'expected (N, H, W), got {images.shape}'
    assert bit_depth in (8, 16), bit_depth
    n, h, w = images.shape
    key = (h, w, bit_depth)
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = _LAYOUTS[key] = _StoredLayout(h, w, bit_depth)
    buf = np.empty((n, lay.size), np.uint8)
    buf[...] = lay.template  # headers; the rest is overwritten below
    vmax = (1 << bit_depth) - 1
    dtype = np.dtype('>u2') if bit_depth == 16 else np.dtype(np.uint8)
    floats = images.dtype.kind == 'f'
    if floats and not prescaled:
        images = np.clip(images * np.float32(vmax), 0, vmax)
    for first, rows, offset in lay.blocks:
        buf[:, offset:offset + rows * lay.row:lay.row] = 0  # filter byte 0 (None) of each scanline
        dst = np.ndarray((n, rows, w), dtype, buffer=buf, offset=offset + 1, strides=(lay.size, lay.row, dtype.itemsize))
        src = images[:, first:first + rows]
        if floats:
            # Prescaled input is a convex combination of [0, 1] values times vmax (mri.sources.preprocess): within [0, vmax]
            # up to float rounding, so rounding is x + 0.5 truncated, fused with the cast to big-endian samples.
            np.add(src, np.float32(0.5), out=dst, casting='unsafe')
        else:
            dst[...] = src
    adler_at, data_end = lay.adler_at, lay.data_end
    views, crcs = [], []
    for i in range(n):
        png = memoryview(buf[i])
        adler = 1
        for _, rows, offset in lay.blocks:
            adler = zlib.adler32(png[offset:offset + rows * lay.row], adler)
        png[adler_at:adler_at + 4] = struct.pack('>I', adler)
        crc = zlib.crc32(png[:data_end])
        png[data_end:data_end + 4] = struct.pack('>I', crc ^ lay.crc_fix)
        crcs.append(zlib.crc32(png[data_end:], crc))
        views.append(png)
    return views, crcs


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


def deflate(data, level):
    """Raw deflate stream (zip method 8) of the bytes-like `data` at zlib `level` 1-9. Returns (compressed bytes,
    CRC-32 of `data`, len(data)), the arguments `ArchiveWriter.add` takes after the name. zlib releases the GIL, so
    threads compress in parallel. On .npy slices (about 60% background zeros, the brain barely compressible 16-bit
    samples) level 1 is within 1% of level 9's size; its stream also inflates faster than the run-length strategy's
    (which PNG rows use), because zero runs come out as fewer, longer matches."""
    data = memoryview(data).cast('B')
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY)
    return comp.compress(data) + comp.flush(), zlib.crc32(data), data.nbytes


# The forms of .npy members (dataset_tool.py --codec). blosc2 (the default) is the .npy header followed by one
# blosc2 chunk of the pixels, byte shuffle + LZ4HC level 5: on the real case's all-modalities + seg archive 0.31 of
# the stored bytes, read 1.4x faster than stored members in two runs (docs/data.md, bench/bench_archive_codec.py;
# zstd level 1 is 5% smaller but read slower than stored in one of them); deflate 0.31 of the bytes, read at 0.4x. The member keeps its .npy name; training.dataset.read_npy_member reads every form.
NPY_CODECS = ('blosc2', 'deflate', 'stored')
BLOSC2_FORM = 'blosc2-shuffle-lz4hc5'  # what dataset.json "codec" records for blosc2 members


def codec_record(codec, level):
    """dataset.json's "codec": the form of the archive's .npy members, e.g. 'blosc2-shuffle-lz4hc5', 'deflate-1'."""
    return BLOSC2_FORM if codec == 'blosc2' else f'deflate-{deflate_level(level)}' if codec == 'deflate' else 'stored'


def deflate_level(level):
    """zlib level of deflated .npy members: --compress-level, or 1 where it is 0 (PNGs stored)."""
    return level if level > 0 else 1


def blosc2_npy(array):
    """An array as a blosc2 .npy member: the plain .npy header (C order), then one blosc2 chunk of the pixels (byte
    shuffle, LZ4HC level 5, one thread: conversion workers and threads already fill the cores).

    LZ4HC spends about 7 ms per 256^2 five-channel slice encoding (LZ4 0.4 ms, zstd 1 1.3 ms), once, at conversion;
    its chunks decode as fast as LZ4's, every epoch. An array beyond a
    chunk's 2 GiB, or whose chunk would be exactly as long as its pixels (a reader tells the forms apart by the
    member's length), is written as a plain .npy."""
    import blosc2  # a dependency (requirements.txt); imported here so that reading old archives never needs it
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    if array.nbytes > blosc2.MAX_BUFFERSIZE or array.dtype.itemsize > 255:
        return encode_npy(array)
    chunk = blosc2.compress2(array, typesize=array.dtype.itemsize, clevel=5, filters=[blosc2.Filter.SHUFFLE],
                             codec=blosc2.Codec.LZ4HC, nthreads=1)
    if len(chunk) == array.nbytes:
        return encode_npy(array)
    return header.getvalue() + chunk


def npy_entry(array, codec='stored', level=1):
    """An array as a .npy archive entry in the form `codec` (NPY_CODECS): blosc2 and stored give (data,), deflate
    (data, CRC-32, size) at zlib `level` (see `deflate`); `ArchiveWriter.add(relpath, *npy_entry(...))` takes either."""
    if codec == 'blosc2':
        return (blosc2_npy(array),)
    data = encode_npy(array)
    return deflate(data, deflate_level(level)) if codec == 'deflate' else (data,)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path_beside(dest, tag='tmp'):
    dest = Path(dest)
    return dest.parent / f'.{dest.name}.{tag}-{os.getpid()}'


class _StoredZip:
    """A minimal zip writer (PKWARE APPNOTE 6.3): stored members, or members the caller deflated already (`deflate`,
    so that worker threads compress in parallel), ZIP64 where sizes, offsets or the entry count need it, as
    `zipfile` reads them. Unlike `zipfile.ZipFile.writestr` it takes the member's CRC-32
    when the caller already has it (mri.sources.archive.encode_stored_pngs computes it in the pass that fills the PNG), and
    writes bytes-like data without copying it."""

    _DOS_TIME, _DOS_DATE = 0, (_ZIP_TIME[0] - 1980) << 9 | _ZIP_TIME[1] << 5 | _ZIP_TIME[2]

    def __init__(self, f):
        self._f = f  # a binary file opened for writing, empty
        self._pos = 0
        self._central = []

    def add(self, name, data, crc=None, size=None):
        """Adds a member. `size` None: `data` is stored as is. Otherwise `data` is a raw deflate stream (see
        `deflate`) of `size` bytes whose CRC-32 is `crc`, written with method 8 (deflate)."""
        data = memoryview(data).cast('B')
        stored = data.nbytes
        method = 0 if size is None else 8
        size = stored if size is None else size
        if crc is None:
            assert method == 0, 'a deflated member needs the CRC-32 of its content'
            crc = zlib.crc32(data)
        encoded = name.encode('utf-8')
        flags = 0 if encoded.isascii() else 0x800  # bit 11: the name is UTF-8
        big = max(size, stored) >= 0xFFFFFFFF
        extra = struct.pack('<HHQQ', 1, 16, size, stored) if big else b''
        size32, stored32 = (0xFFFFFFFF, 0xFFFFFFFF) if big else (size, stored)
        header = struct.pack('<IHHHHHIIIHH', 0x04034B50, 45 if big else 20, flags, method, self._DOS_TIME,
                             self._DOS_DATE, crc, stored32, size32, len(encoded), len(extra))
        self._f.write(header + encoded + extra)
        self._f.write(data)
        self._central.append((encoded, flags, method, crc, size, stored, self._pos))
        self._pos += len(header) + len(encoded) + len(extra) + stored

    def close(self):
        """Writes the central directory and closes the file."""
        if self._f is None:
            return
        start = self._pos
        parts = []
        for encoded, flags, method, crc, size, stored, offset in self._central:
            z64 = []
            if max(size, stored) >= 0xFFFFFFFF:
                z64 += [size, stored]
            if offset >= 0xFFFFFFFF:
                z64.append(offset)
            extra = struct.pack(f'<HH{len(z64)}Q', 1, 8 * len(z64), *z64) if z64 else b''
            size32, stored32 = (0xFFFFFFFF, 0xFFFFFFFF) if max(size, stored) >= 0xFFFFFFFF else (size, stored)
            parts.append(struct.pack('<IHHHHHHIIIHHHHHII', 0x02014B50, 3 << 8 | (45 if z64 else 20), 45 if z64 else 20,
                                     flags, method, self._DOS_TIME, self._DOS_DATE, crc, stored32, size32, len(encoded),
                                     len(extra), 0, 0, 0, 0o644 << 16, min(offset, 0xFFFFFFFF)))
            parts.append(encoded)
            parts.append(extra)
        central = b''.join(parts)
        count, end = len(self._central), start + len(central)
        tail = b''
        if count >= 0xFFFF or start >= 0xFFFFFFFF or len(central) >= 0xFFFFFFFF:
            tail = struct.pack('<IQHHIIQQQQ', 0x06064B50, 44, 45, 45, 0, 0, count, count, len(central), start)
            tail += struct.pack('<IIQI', 0x07064B50, 0, end, 1)
        tail += struct.pack('<IHHHHIIH', 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                            min(len(central), 0xFFFFFFFF), min(start, 0xFFFFFFFF), 0)
        f, self._f = self._f, None
        try:
            f.write(central + tail)
        finally:
            f.close()


class ArchiveWriter:
    """Writes a dataset archive atomically. Use as a context manager; `commit(dataset_json)` makes it visible.

    `dest` ending in `.zip` gives a zip; anything else gives a folder. An existing destination (a zip, or a folder
    that is not empty) is refused unless `overwrite`, and then replaced only at commit. Leaving the `with` block
    without a commit, by an exception, KeyboardInterrupt or SIGTERM (dataset_tool.py turns it into
    KeyboardInterrupt), removes the temporary file or folder.
    """

    def __init__(self, dest, overwrite=False):
        self.dest = Path(dest)
        self.is_zip = self.dest.suffix.lower() == '.zip'
        self.overwrite = overwrite
        self.names = set()
        self._zip = None
        self._tmp = None
        if self.dest.exists() or self.dest.is_symlink():
            if self.is_zip and not self.dest.is_file():
                raise ArchiveError(f'{self.dest}: --dest exists and is not a zip file')
            if not self.is_zip and not self.dest.is_dir():
                raise ArchiveError(f'{self.dest}: --dest exists and is not a folder')
            if not overwrite and (self.is_zip or any(self.dest.iterdir())):
                raise ArchiveError(f'{self.dest}: --dest exists; pass --overwrite to replace it, or choose another')
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            if self.is_zip:
                fd, tmp = tempfile.mkstemp(prefix=f'.{self.dest.name}.', suffix='.tmp', dir=self.dest.parent)
                self._tmp = Path(tmp)
                # Written through mkstemp's descriptor: reopening the name with truncation would make ext4
                # (auto_da_alloc) flush the whole archive to disk when it is closed.
                self._zip = _StoredZip(os.fdopen(fd, 'wb'))
                os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the archive private
            else:
                self._tmp = Path(tempfile.mkdtemp(prefix=f'.{self.dest.name}.', suffix='.tmp', dir=self.dest.parent))
                os.chmod(self._tmp, 0o777 & ~_umask())
        except OSError as e:
            self._cleanup()
            raise ArchiveError(f'{self.dest}: cannot write the archive ({e.strerror or e})') from None
        except BaseException:  # Ctrl-C or SIGTERM while the temporary file is set up: no `with` block cleans up yet
            self._cleanup()
            raise

    def add(self, relpath, data, crc=None, size=None):
        """Adds one file (bytes-like) at the archive-relative POSIX path `relpath`; `crc` is its CRC-32 if known.
        With `size`, `data` is a raw deflate stream of `size` bytes (`deflate`): a zip stores it deflated, a folder
        gets the inflated file."""
        if relpath in self.names:
            raise ValueError(f'{self.dest}: duplicate archive entry {relpath}')
        self.names.add(relpath)
        try:
            if self._zip is not None:
                self._zip.add(relpath, data, crc, size)
            else:
                path = self._tmp / relpath
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data if size is None else zlib.decompress(data, -15))
        except OSError as e:
            raise ArchiveError(f'{self.dest}: writing {relpath} failed ({e.strerror or e})') from None

    def commit(self, dataset_json):
        """Writes dataset.json, closes and moves the archive into place (replacing an old one, see `overwrite`)."""
        # No indent: json's C encoder only runs for compact output, and dataset.json can list 100k files.
        self.add('dataset.json', json.dumps(dataset_json, separators=(',', ':')).encode())
        old = None
        try:
            if self._zip is not None:
                self._zip.close()
                self._zip = None
            if not self.is_zip and self.dest.is_dir() and any(self.dest.iterdir()):
                # os.replace cannot replace a non-empty folder: move the old one aside first, delete it after.
                old = temp_path_beside(self.dest, 'old')
                os.replace(self.dest, old)
            os.replace(self._tmp, self.dest)
        except OSError as e:
            if old is not None and not self.dest.exists():
                os.replace(old, self.dest)
            raise ArchiveError(f'{self.dest}: cannot move the finished archive into place ({e.strerror or e})') from None
        self._tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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


def read_dataset_json(path):
    """The dataset.json of a zip or folder archive; None when it has none (or `path` does not exist);
    ArchiveReadError when it cannot be read."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, 'dataset.json')) as f:
                return json.load(f)
        with zipfile.ZipFile(path) as z, z.open('dataset.json') as f:
            return json.load(f)
    except (KeyError, FileNotFoundError):
        return None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ArchiveReadError(f'{path}: archive cannot be read ({err})') from None
