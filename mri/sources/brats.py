"""BraTS case discovery, naming, validation and loading.

Reads the multi-parametric MRI of the BraTS challenges (Menze et al., IEEE TMI 2015; Baid et al., arXiv:2107.02314;
BraTS-Africa: Adewole et al., arXiv:2305.19369): per case four co-registered, skull-stripped 3D scans (T1 native,
T1 contrast-enhanced, T2-weighted, T2-FLAIR) and an optional tumour label map, as `.nii` or `.nii.gz`.

Two naming schemes are recognised, at any folder depth (a flat folder of files works too, cases are grouped by name):

    2023 / BraTS-Africa:  <case>-t1n  <case>-t1c  <case>-t2w  <case>-t2f  <case>-seg   (labels 0, 1, 2, 3)
    2021 and earlier:     <case>_t1   <case>_t1ce <case>_t2   <case>_flair <case>_seg  (labels 0, 1, 2, 4; 4 -> 3)

Every problem is raised as `BratsError`, a one-line message that names the file and what is wrong with it.
"""

import dataclasses
import gzip
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

MODALITIES = ('t1n', 't1c', 't2w', 't2f')  # canonical names (BraTS 2023), also the channel order of `all`

# suffix -> (canonical modality or 'seg', naming scheme)
_SUFFIXES = {
    '-t1n': ('t1n', '2023'), '-t1c': ('t1c', '2023'), '-t2w': ('t2w', '2023'), '-t2f': ('t2f', '2023'),
    '-seg': ('seg', '2023'),
    '_t1': ('t1n', '2021'), '_t1ce': ('t1c', '2021'), '_t2': ('t2w', '2021'), '_flair': ('t2f', '2021'),
    '_seg': ('seg', '2021'),
}
# Longest suffixes first so that `_t1ce` wins over `_t1`.
_NAME_RE = re.compile(r'^(?P<case>.+?)(?P<suffix>' + '|'.join(sorted(map(re.escape, _SUFFIXES), key=len, reverse=True))
                      + r')\.nii(?:\.gz)?$', re.IGNORECASE)
_NIFTI_RE = re.compile(r'\.nii(\.gz)?$', re.IGNORECASE)

# Label values on disk per naming scheme, and how they map to the loaded label set {0, 1, 2, 3}.
LABEL_SETS = {'2023': (0, 1, 2, 3), '2021': (0, 1, 2, 4)}
_LABEL_MAPS = {'2023': {0: 0, 1: 1, 2: 2, 3: 3}, '2021': {0: 0, 1: 1, 2: 2, 4: 3}}


class BratsError(ValueError):
    """A bad input, with a one-line message naming the file (or folder) and the problem."""

    def __init__(self, path, problem, case_id=None):
        self.path = str(path)
        self.problem = problem
        self.case_id = case_id
        super().__init__(f'{self.path}: {problem}')


@dataclasses.dataclass
class CaseFiles:
    """The files of one case, found by `discover_cases`."""
    case_id: str                # e.g. 'BraTS-GLI-00000-000'
    files: dict                 # modality ('t1n', 't1c', 't2w', 't2f') -> Path
    seg: Path = None            # label map, None when the case has none
    naming: str = '2023'        # '2023' or '2021'

    def expected_path(self, modality):
        """Where the missing file of `modality` ('seg' for the labels) would be, for error messages."""
        known = next(iter(self.files.values()), self.seg)
        suffix = next(s for s, (m, n) in _SUFFIXES.items() if m == modality and n == self.naming)
        ext = '.nii.gz' if known is None or known.name.lower().endswith('.gz') else '.nii'
        folder = known.parent if known is not None else Path('.')
        return folder / f'{self.case_id}{suffix}{ext}'


@dataclasses.dataclass
class Case:
    """One loaded, validated case. Arrays keep the on-disk dtype and orientation and may be read-only (they can
    share the inflated file buffer): copy before modifying in place. `affine` is shared by all."""
    case_id: str
    images: dict                # modality -> 3D ndarray (on-disk dtype, scaled only if the header asks for it)
    seg: np.ndarray             # uint8 labels in {0, 1, 2, 3}, or None
    affine: np.ndarray          # 4x4 float64 voxel -> scanner RAS mm
    files: CaseFiles


def parse_name(path):
    """Returns (case_id, modality or 'seg', naming) for a BraTS file name, or None if the name is not one."""
    m = _NAME_RE.match(Path(path).name)
    if m is None:
        return None
    modality, naming = _SUFFIXES[m.group('suffix').lower()]
    return m.group('case'), modality, naming


def is_nifti(path):
    return bool(_NIFTI_RE.search(Path(path).name))


def is_os_debris(path):
    """macOS archive debris: `__MACOSX/` folders and AppleDouble `._name` files (resource forks, not images)."""
    return path.name.startswith('._') or '__MACOSX' in path.parts


def walk_files(source, unreadable=None):
    """Every file under the folder `source` (sorted Paths), without macOS debris (`is_os_debris`).

    Folders reached through symbolic links are walked too (a data set is often a folder of links to case folders
    kept elsewhere); a link to a folder that contains it (a loop) raises BratsError naming the link. A folder that
    cannot be listed raises BratsError, or, when `unreadable` is a list, is appended to it as a BratsError and
    skipped: never dropped silently (Path.rglob would skip it without a word)."""
    source = Path(source)

    def check_links(root, dirs):
        here = os.path.realpath(root)
        for d in dirs:
            link = Path(root, d)
            if not link.is_symlink():
                continue
            target = os.path.realpath(link)
            if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                raise BratsError(link, f'symbolic link loop: it points to {target}, a folder that contains it')

    def failed(err):
        folder = Path(err.filename) if err.filename else source
        problem = BratsError(folder, f'folder cannot be read ({err.strerror or err})', folder.name)
        if unreadable is None:
            raise problem
        unreadable.append(problem)
    out = []
    for root, dirs, files in os.walk(source, onerror=failed, followlinks=True):
        dirs[:] = [d for d in dirs if d != '__MACOSX']
        check_links(root, dirs)
        out += [Path(root, f) for f in files if not f.startswith('._')]
    return sorted(out)


def discover_cases(source, unreadable=None):
    """Finds every BraTS case under the folder `source` (any depth). Returns a list of CaseFiles sorted by case id.

    Raises BratsError for an empty folder, a file that appears twice (same case and modality) or mixed naming
    schemes within one case; a folder that cannot be read raises too, or is appended to the list `unreadable` (see
    walk_files). macOS debris (`__MACOSX/`, `._*`) is ignored. Missing modality and label files are checked when
    the case is loaded (load_case), so that a conversion can skip such a case (--on-error skip).
    """
    source = Path(source)
    if not source.is_dir():
        raise BratsError(source, 'not a folder of BraTS cases')
    found = {}  # case_id -> CaseFiles
    nifti_seen = []
    for path in (p for p in walk_files(source, unreadable) if is_nifti(p)):
        nifti_seen.append(path)
        parsed = parse_name(path)
        if parsed is None:
            continue  # unrelated NIfTI (a mask, a registration output): not ours to judge
        case_id, modality, naming = parsed
        cf = found.setdefault(case_id, CaseFiles(case_id=case_id, files={}, naming=naming))
        if cf.naming != naming:
            raise BratsError(path, f'case {case_id} mixes BraTS {cf.naming} and {naming} file names', case_id)
        previous = cf.seg if modality == 'seg' else cf.files.get(modality)
        if previous is not None:
            raise BratsError(path, f'case {case_id} appears twice: {modality} is also in {previous}', case_id)
        if modality == 'seg':
            cf.seg = path
        else:
            cf.files[modality] = path
    if not found and not unreadable:
        what = f'{len(nifti_seen)} NIfTI files but none named like a BraTS case' if nifti_seen else 'no NIfTI files'
        raise BratsError(source, f'{what} (expected <case>-t1n.nii.gz ... or <case>_t1.nii.gz ..., at any depth)')
    # A case missing a modality is found all the same: load_case refuses it (check_complete), which --on-error skip
    # can skip like any bad case instead of the whole conversion stopping here.
    return [found[k] for k in sorted(found)]


def check_complete(case_files, need_seg):
    """Raises BratsError naming the first missing file of the case."""
    for modality in MODALITIES:
        if modality not in case_files.files:
            raise BratsError(case_files.expected_path(modality), f'missing {modality} file of case {case_files.case_id}',
                             case_files.case_id)
    if need_seg and case_files.seg is None:
        raise BratsError(case_files.expected_path('seg'), f'missing label (seg) file of case {case_files.case_id}',
                         case_files.case_id)


def _read(path, case_id):
    """Loads one NIfTI file once: (array with the on-disk dtype, affine). Raises BratsError on any read problem."""
    try:
        img = nib.load(str(path))
        _check_claim(path, img, case_id)
        data = _gzip_fast_path(path, img.dataobj)
        if data is None:
            # np.asarray on dataobj keeps the on-disk dtype when the header has no scaling (the BraTS case), which is
            # both faster and smaller than get_fdata()'s float64.
            data = np.asarray(img.dataobj)
        affine = img.affine
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BratsError(path, f'corrupt or truncated gzip data ({type(e).__name__}: {e})', case_id) from None
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if 'gzip' in first.lower():
            raise BratsError(path, f'corrupt or truncated gzip data ({first})', case_id) from None
        raise BratsError(path, f'cannot be read as NIfTI ({first})', case_id) from None
    if affine is None:
        raise BratsError(path, 'has no affine (no qform or sform)', case_id)
    # A trailing singleton dimension (x, y, z, 1) is still one volume; anything else that is not 3D is not ours.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BratsError(path, f'is a {data.ndim}D image of shape {tuple(data.shape)}, expected a 3D volume', case_id)
    if data.dtype.kind not in 'biuf':
        raise BratsError(path, f'has unsupported data type {data.dtype}', case_id)
    return data, np.asarray(affine, dtype=np.float64)


MAX_VOXELS = 1 << 30  # 1024^3: far beyond any brain MRI (BraTS: 240 x 240 x 155 = 8.9 million)


def _check_claim(path, img, case_id):
    """Refuse (BratsError) a header whose voxel count is beyond any brain scan, or an uncompressed file shorter
    than its header says, before the data is allocated (a header claiming 100000^3 voxels would otherwise be)."""
    shape = tuple(int(n) for n in img.header.get_data_shape())
    voxels = int(np.prod(shape, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise BratsError(path, f'its header claims {"x".join(map(str, shape))} voxels, beyond any brain scan '
                               f'(at most {MAX_VOXELS}); a damaged header?', case_id)
    if not str(path).endswith('.gz'):
        need = int(img.header.get('vox_offset', 0)) + voxels * img.header.get_data_dtype().itemsize
        have = os.path.getsize(path)
        if have < need:
            raise BratsError(path, f'truncated: its header claims {need} bytes of image, the file has {have}', case_id)


def _gzip_fast_path(path, proxy):
    """The voxel array of an unscaled .nii.gz, inflated in one call, or None when nibabel should read it.

    Reading a .nii.gz is dominated by gzip; nibabel streams it through Python's GzipFile in chunks, which costs
    about a third more CPU than one `gzip.decompress` of the whole file (C code, one buffer). nibabel still parses
    the header, so offset, dtype (byte order included), shape and order are exactly what it would use; the result
    equals `np.asarray(img.dataobj)` (read-only, as it shares the inflated buffer)."""
    if not str(path).lower().endswith('.gz') or not getattr(proxy, 'is_proxy', False):
        return None
    try:
        shape, dtype, offset, order = tuple(proxy.shape), np.dtype(proxy.dtype), int(proxy.offset), proxy.order
        if float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0:
            return None  # scaled data: let nibabel apply its scaling rules
    except (AttributeError, TypeError, ValueError):
        return None  # an unexpected proxy: nibabel knows best
    count = int(np.prod(shape, dtype=np.int64))
    need = offset + count * dtype.itemsize
    with open(path, 'rb') as f:
        data = f.read()
    # zlib's own gzip mode (wbits 31: header, CRC-32 and length checked by inflate) into one buffer of the size the
    # header announces: ~40% faster than gzip.decompress, which grows its output in blocks, joins them (a copy of the
    # whole volume) and then computes the CRC in a second pass. One-shot zlib stops after the first gzip member, so a
    # (rare) multi-member file goes through gzip.decompress, which reads them all.
    raw = zlib.decompress(data, 31, max(need, 1))
    if len(raw) < need:
        raw = gzip.decompress(data)
    if len(raw) < need:
        raise EOFError(f'{len(raw)} bytes after inflation, the header needs {need}')
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(shape, order=order)


def _check_finite(data, path, case_id):
    if data.dtype.kind == 'f':
        bad = ~np.isfinite(data)
        if bad.any():
            raise BratsError(path, f'contains {int(bad.sum())} NaN/Inf values', case_id)


def load_case(
    case_files,             # CaseFiles from discover_cases
    load_seg=False,         # read the label map (required then); False skips it entirely (faster)
    affine_atol=1e-3,       # mm; modalities whose affines differ more than this are not co-registered
    threads=1,              # read the files in parallel threads (gzip inflation releases the GIL)
):
    """Loads and validates a case: all four modalities (each file read once) and optionally the labels.

    Raises BratsError naming the file for: a missing file, a corrupt or truncated gzip, a non-3D image, NaN/Inf,
    an all-zero volume, shapes or affines that disagree with the first modality, label values outside the set.
    """
    check_complete(case_files, need_seg=load_seg)
    cid = case_files.case_id
    paths = [case_files.files[m] for m in MODALITIES] + ([case_files.seg] if load_seg else [])
    if threads > 1:
        pool = ThreadPoolExecutor(min(threads, len(paths)))
        futures = [pool.submit(_read, p, cid) for p in paths]
        pool.shutdown(wait=True)
        reads = [f.result for f in futures]  # raised in file order below, so the first bad file is reported
    else:
        reads = [lambda p=p: _read(p, cid) for p in paths]
    images, affine, shape, ref_path = {}, None, None, None
    for modality, read in zip(MODALITIES, reads):
        path = case_files.files[modality]
        data, aff = read()
        _check_finite(data, path, cid)
        if shape is None:
            shape, affine, ref_path = data.shape, aff, path
        elif data.shape != shape:
            raise BratsError(path, f'shape {tuple(data.shape)} differs from {tuple(shape)} of {ref_path.name}', cid)
        elif not np.allclose(aff, affine, rtol=0, atol=affine_atol):
            diff = float(np.abs(aff - affine).max())
            raise BratsError(path, f'affine differs from that of {ref_path.name} (max difference {diff:.4g})', cid)
        if not data.any():
            raise BratsError(path, 'is an all-zero volume', cid)
        images[modality] = data
    seg = None
    if load_seg:
        path = case_files.seg
        data, aff = reads[-1]()
        if data.shape != shape:
            raise BratsError(path, f'shape {tuple(data.shape)} differs from {tuple(shape)} of {ref_path.name}', cid)
        if not np.allclose(aff, affine, rtol=0, atol=affine_atol):
            diff = float(np.abs(aff - affine).max())
            raise BratsError(path, f'affine differs from that of {ref_path.name} (max difference {diff:.4g})', cid)
        seg = labels_to_canonical(data, case_files.naming, path, cid)
    return Case(case_id=cid, images=images, seg=seg, affine=affine, files=case_files)


def labels_to_canonical(data, naming, path='<labels>', case_id=None):
    """Validates a label map against its naming scheme's label set and returns uint8 labels in {0, 1, 2, 3}."""
    allowed = LABEL_SETS[naming]
    _check_finite(data, path, case_id)
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 255:
        raise BratsError(path, f'label values outside {set(allowed)}: range {lo:g}..{hi:g}', case_id)
    labels = data.astype(np.uint8)
    if data.dtype.kind == 'f' and not np.array_equal(labels, data):
        raise BratsError(path, f'label values outside {set(allowed)}: non-integer values', case_id)
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    unknown = sorted(set(present.tolist()) - set(allowed))
    if unknown:
        raise BratsError(path, f'label values outside {set(allowed)} (BraTS {naming} naming): {unknown}', case_id)
    if naming != '2023':
        lut = np.zeros(256, np.uint8)
        for src, dst in _LABEL_MAPS[naming].items():
            lut[src] = dst
        labels = lut[labels]
    return labels
