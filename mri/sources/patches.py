"""Native cases and patch archives: the case on its own voxel grid, and 2D / 3D patches of it around tumours and
in healthy brain tissue, for training the tumour painter (issue 18; `dataset_tool.py --kind patches`).

The painter, like GliGAN (Ferreira et al., "How we won BraTS 2023 Adult Glioma challenge? Just faking it!", 2024)
and the BraTS 2024 inpainting task, works on the scan's own voxels: a patch is cut from the RAS-canonical array
(`preprocess.to_canonical`: axis permutations and flips only) without resampling, so that what is painted can be
put back into the source file voxel for voxel. Intensities are normalised exactly as the slice and volume archives
are (`preprocess.robust_range` / `preprocess.normalize`: per case and modality over brain voxels), mapped to
[-1, 1] with background -1.

`load_native` gives a `NativeCase` (canonical images in [-1, 1], seg, brain, and the way back to the source file's
orientation and units); `crop` / `paste` cut and put back boxes around a voxel, padding outside the volume;
`crop_slice` / `paste_slice` do the same for a 2D crop in one plane, in the display orientation of the slice
archives (`preprocess._to_display`). `patch_case` is the per-case writer behind `mri.sources.convert` for
kind 'patches'.
"""

import dataclasses

import nibabel as nib
import numpy as np

from mri.sources import brats, preprocess

_RAS = np.array([[0, 1], [1, 1], [2, 1]])  # nibabel orientation of a canonical array: axis k is world axis k, +


# ---------------------------------------------------------------------------------------------------------------
# Native cases


@dataclasses.dataclass
class NativeCase:
    """A case on its own voxel grid, RAS-canonical, normalised to [-1, 1] as the archives are (see `load_native`)."""
    case_id: str
    images: np.ndarray      # float32 (M, X, Y, Z) in [-1, 1], RAS-canonical, background -1
    modalities: tuple       # names, in the order of `images`
    seg: np.ndarray         # uint8 (X, Y, Z) canonical, labels 0-3 (zeros when the case has none)
    brain: np.ndarray       # bool (X, Y, Z) canonical
    ranges: dict            # modality -> (lo, hi): value = lo + (x + 1) / 2 * (hi - lo) inside the brain
    source: brats.Case      # the case as loaded: source orientation, dtype, affine, files
    affine: np.ndarray      # 4x4 voxel -> RAS mm of the canonical arrays
    has_seg: bool = True    # False when the case has no label file (seg is then all zero)

    @property
    def shape(self):
        """Spatial shape of the canonical arrays (X, Y, Z)."""
        return tuple(self.brain.shape)

    @property
    def spacing(self):
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))

    def to_source(self, array_xyz):
        """The same voxels in the source file's orientation: the inverse of `preprocess.to_canonical` (a view
        where possible). `array_xyz` is (X, Y, Z) or (..., X, Y, Z) on the canonical grid."""
        array_xyz = np.asarray(array_xyz)
        assert array_xyz.shape[-3:] == self.shape, (array_xyz.shape, self.shape)
        ornt = nib.orientations.io_orientation(self.source.affine)
        if np.array_equal(ornt, _RAS):
            return array_xyz
        back = nib.orientations.ornt_transform(_RAS, ornt)  # canonical -> source axes and flips
        lead = array_xyz.ndim - 3
        # apply_orientation works on the first three axes: leading (channel) axes go to the back and return after
        moved = np.moveaxis(array_xyz, tuple(range(lead)), tuple(range(3, 3 + lead)))
        out = nib.orientations.apply_orientation(moved, back)
        return np.moveaxis(out, tuple(range(3, 3 + lead)), tuple(range(lead)))

    def denormalise(self, m_index, x):
        """Source intensity units (float64) of values `x` in [-1, 1] of modality `self.modalities[m_index]`: the
        inverse of the normalisation inside the brain (values that were clipped to [lo, hi] come back as lo / hi)."""
        lo, hi = self.ranges[self.modalities[m_index]]
        return lo + (np.asarray(x, np.float64) + 1) / 2 * (hi - lo)


def load_native(
    case_files,                     # brats.CaseFiles, or a brats.Case already loaded
    modalities=brats.MODALITIES,    # the image channels, in order
    normalize='percentile',         # 'percentile' or 'minmax', as dataset_tool.py --normalize
    low=0.5,                        # percentiles for normalize='percentile'
    high=99.5,
):
    """Loads a case (with its labels when it has a label file) onto its canonical grid as a `NativeCase`.

    The normalisation is that of `preprocess.prepare_case` (the same functions, over the same brain voxels), so
    patches and painted cases live in the units of the archives. A case whose brain (nonzero in any modality) is
    empty, or a modality without brain voxels or constant there, raises BratsError naming the file."""
    if isinstance(case_files, brats.Case):
        case = case_files
    else:
        case = brats.load_case(case_files, load_seg=case_files.seg is not None)
    files = case.files
    raw_brain = preprocess.brain_mask(case.images)
    if not raw_brain.any():
        first = files.files.get(modalities[0]) or files.case_id
        raise brats.BratsError(first, f'the brain of case {case.case_id} is empty (every modality is 0 everywhere)',
                               case.case_id)
    arrays = {m: case.images[m] for m in modalities}
    arrays['__brain__'] = raw_brain
    if case.seg is not None:
        arrays['__seg__'] = case.seg
    arrays, affine = preprocess.to_canonical(arrays, case.affine)
    brain = np.ascontiguousarray(arrays.pop('__brain__'))
    seg = arrays.pop('__seg__', None)
    seg = np.zeros(brain.shape, np.uint8) if seg is None else np.ascontiguousarray(seg, dtype=np.uint8)
    images = np.empty((len(modalities),) + brain.shape, np.float32)
    ranges = {}
    for k, m in enumerate(modalities):
        values = case.images[m][raw_brain]  # the order of the voxels does not matter to robust_range
        if values.size == 0 or not np.any(values):
            raise brats.BratsError(files.files[m], f'{m} has no nonzero voxels inside the brain mask', case.case_id)
        lo, hi = preprocess.robust_range(values, normalize, low, high)
        if hi <= lo:
            raise brats.BratsError(files.files[m], f'{m} is constant inside the brain ({lo:g})', case.case_id)
        unit = preprocess.normalize(arrays[m], brain, lo, hi)  # [0, 1], background 0: the archives' stored value
        np.multiply(unit, np.float32(2), out=images[k])
        images[k] -= np.float32(1)
        ranges[m] = (lo, hi)
    return NativeCase(case_id=case.case_id, images=images, modalities=tuple(modalities), seg=seg, brain=brain,
                      ranges=ranges, source=case, affine=np.asarray(affine, np.float64), has_seg=case.seg is not None)


# ---------------------------------------------------------------------------------------------------------------
# Boxes around a voxel


def _box(spatial, centre, size):
    """Slices into the array and into the patch of the part of the box of `size` around `centre` that lies inside
    an array of spatial shape `spatial`. The box starts at centre - size // 2 on every axis."""
    if not len(spatial) == len(centre) == len(size):
        raise ValueError(f'crop/paste: centre {tuple(centre)} and size {tuple(size)} must have one entry per '
                         f'spatial axis of {tuple(spatial)}')
    src, dst = [], []
    for n, c, s in zip(spatial, centre, size):
        start = int(c) - int(s) // 2
        a, b = max(start, 0), min(start + int(s), n)
        if b <= a:  # the box misses the array on this axis: nothing to copy
            a = b = 0
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start) if b > a else slice(0, 0))
    return tuple(src), tuple(dst)


def crop(array, centre, size, fill):
    """The box of `size` (one entry per spatial axis) around `centre` of `array` (..., X, Y, Z) or (..., X, Y): a new
    array (..., *size) of the array's dtype, `fill` where the box reaches past the array. The box runs from
    centre - size // 2 to centre - size // 2 + size on each axis (the centre voxel is at index size // 2)."""
    array = np.asarray(array)
    n = len(size)
    src, dst = _box(array.shape[array.ndim - n:], centre, size)
    out = np.full(array.shape[:array.ndim - n] + tuple(int(s) for s in size), fill, dtype=array.dtype)
    out[(Ellipsis,) + dst] = array[(Ellipsis,) + src]
    return out


def paste(array, patch, centre, where=None):
    """Writes the voxels of `patch` (..., *size) where `where` (the patch's spatial shape, bool; None = all) is True
    into `array` around `centre` (the box of `crop`), in place; the part of the box outside the array is dropped.
    Leading axes of `patch` and `where` broadcast against those of `array`. Returns `array`."""
    patch = np.asarray(patch)
    n = len(centre)
    size = patch.shape[patch.ndim - n:]
    src, dst = _box(array.shape[array.ndim - n:], centre, size)
    target = array[(Ellipsis,) + src]  # a view: copyto writes into `array`
    mask = True if where is None else np.asarray(where, bool)[(Ellipsis,) + dst]
    np.copyto(target, patch[(Ellipsis,) + dst], where=mask, casting='unsafe')  # as array[...] = patch would
    return array


# ---------------------------------------------------------------------------------------------------------------
# 2D crops in one plane, in the slice archives' display orientation


def _slice_box(plane, size_hw):
    """The 3D box (one voxel thick along the plane's axis) that a (H, W) display crop of `plane` covers: columns run
    along the first in-plane RAS axis, rows along the second (preprocess._to_display)."""
    h, w = (int(s) for s in size_hw)
    axis = preprocess.PLANE_AXIS[plane]
    inplane = [a for a in range(3) if a != axis]
    box = [1, 1, 1]
    box[inplane[0]], box[inplane[1]] = w, h
    return axis, tuple(box)


def to_display(a, plane):
    """(..., A, B) in-plane arrays (RAS order) -> (..., H, W) display order, as `preprocess._to_display` orients
    the slices of the archives: axial / coronal rows = B reversed, columns = A; sagittal also reverses A."""
    a = a[..., :, ::-1] if plane in ('axial', 'coronal') else a[..., ::-1, ::-1]
    return np.swapaxes(a, -1, -2)


def from_display(a, plane):
    """The inverse of `to_display`: (..., H, W) -> (..., A, B)."""
    a = np.swapaxes(a, -1, -2)
    return a[..., :, ::-1] if plane in ('axial', 'coronal') else a[..., ::-1, ::-1]


def crop_slice(array, centre, size_hw, plane, fill):
    """A 2D crop (..., H, W) of `array` (..., X, Y, Z) in the slice of `plane` through `centre`, around it, in the
    display orientation of the slice archives; `fill` outside the volume."""
    axis, box = _slice_box(plane, size_hw)
    sub = crop(array, centre, box, fill)
    return to_display(np.squeeze(sub, axis=sub.ndim - 3 + axis), plane)


def paste_slice(array, patch_hw, centre, plane, where=None):
    """Puts a display-oriented 2D crop (..., H, W) of `crop_slice` back into `array` (..., X, Y, Z) in place where
    `where` ((H, W) bool, None = all) is True. Returns `array`."""
    patch_hw = np.asarray(patch_hw)
    axis, _ = _slice_box(plane, patch_hw.shape[-2:])
    patch = np.expand_dims(from_display(patch_hw, plane), patch_hw.ndim - 2 + axis)
    if where is not None:
        where = np.expand_dims(from_display(np.asarray(where, bool), plane), axis)
    return paste(array, patch, centre, where)
