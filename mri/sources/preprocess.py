"""Preprocessing of a loaded BraTS case: RAS orientation, brain crop, pad, anti-aliased resampling, normalisation.

The steps follow the usual BraTS GAN pipelines (e.g. Kazerouni et al. / Dorjsembe et al. brain-MRI synthesis work,
and the BraTS preprocessing of Bakas et al., Sci. Data 4:170117, 2017: co-registered, skull-stripped, 1 mm):

1. Canonical RAS+ orientation (as nibabel's `as_closest_canonical`: axis permutations and flips only, no
   interpolation), so LPS and RAS copies of one scan give identical arrays.
2. Crop to the brain's bounding box over all four modalities (brain = voxel nonzero in any modality; BraTS is
   skull-stripped with background exactly 0), then pad, centred, to a cube of side S = the largest extent.
3. Robust min-max per case and modality over brain voxels: the `low`/`high` percentiles (or min/max) map to 0/1,
   clipped; background stays 0. Archives store `round(v * vmax)`, which the loader maps to `v * 2 - 1` in [-1, 1].
4. Optional Gaussian denoising (sigma in input voxels, background re-masked).
5. Resampling to the output size with linear interpolation; when downsampling, a Gaussian prefilter with
   sigma = (S/R - 1) / 2 input voxels (the anti-aliasing rule of scikit-image's `resize`) is applied first.
   Labels use nearest neighbour. Both are separable, so each axis is one sparse matrix (`resample_matrix`) that
   folds padding, prefilter and interpolation together: a BraTS volume is never padded or filtered in full.
"""

import dataclasses
import functools

import nibabel as nib
import numpy as np
import scipy.sparse
from scipy import ndimage

from mri.sources import brats

PLANES = ('axial', 'coronal', 'sagittal')
PLANE_AXIS = {'sagittal': 0, 'coronal': 1, 'axial': 2}  # slice axis in the RAS array [x, y, z]


def to_canonical(arrays, affine):
    """Reorients a dict of co-registered 3D arrays to the closest canonical RAS+ orientation.

    Returns (dict of views, new affine). Equivalent to `nibabel.as_closest_canonical` on each image."""
    shape = next(iter(arrays.values())).shape
    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return dict(arrays), affine
    out = {k: nib.orientations.apply_orientation(v, ornt) for k, v in arrays.items()}
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    return out, new_affine


def brain_mask(images):
    """Brain = nonzero in any modality (BraTS volumes are skull-stripped with background exactly 0)."""
    vols = list(images.values())
    if len(vols) > 1 and all(v.dtype.kind in 'biu' for v in vols):
        # Integer scans (BraTS): the bitwise OR of the voxels is nonzero exactly where one of them is; a third of
        # the passes of one comparison per modality. Ufuncs follow the arrays' memory order (order 'K').
        acc = np.bitwise_or(vols[0], vols[1])
        for v in vols[2:]:
            acc |= v
        return np.not_equal(acc, 0)
    mask = np.not_equal(vols[0], 0)
    tmp = np.empty_like(mask)
    for v in vols[1:]:
        np.not_equal(v, 0, out=tmp)
        mask |= tmp
    return mask


def bounding_box(mask):
    """Returns ((start, stop), ...) per axis of the nonzero region of `mask` (which must not be empty)."""
    if mask.ndim == 3:
        # Two passes over the volume instead of three: the (x, y) projection gives both in-plane extents.
        flat = mask.any(axis=2)
        projections = (flat.any(axis=1), flat.any(axis=0), mask.any(axis=(0, 1)))
        return tuple((int(np.argmax(p)), len(p) - int(np.argmax(p[::-1]))) for p in projections)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def robust_range(values, method='percentile', low=0.5, high=99.5):
    """(lo, hi) intensities of the brain voxels `values` (1D): percentiles (nearest rank) or min/max."""
    if values.size == 0:
        raise ValueError('robust_range: no brain voxels')
    if method == 'minmax':
        return float(values.min()), float(values.max())
    if method != 'percentile':
        raise ValueError(f'unknown normalisation method {method!r}')
    if values.dtype.kind in 'iu':
        # Integer scans (all BraTS releases are int16): an exact nearest-rank percentile from a histogram is an
        # order of magnitude faster than np.percentile's partition on millions of voxels.
        vmin = int(values.min())
        vmax = int(values.max())
        if vmax - vmin < (1 << 22):
            cdf = np.cumsum(np.bincount((values - vmin).ravel().astype(np.intp, copy=False)))
            ranks = np.ceil(np.array([low, high]) / 100 * values.size).clip(1, values.size)
            lo, hi = np.searchsorted(cdf, ranks) + vmin
            return float(lo), float(hi)
    lo, hi = np.percentile(values, [low, high], method='inverted_cdf')
    return float(lo), float(hi)


def normalize(volume, mask, lo, hi):
    """Maps [lo, hi] to [0, 1] (clipped) as float32; voxels outside `mask` become 0."""
    scale = np.float32(1.0 / max(hi - lo, 1e-12))
    out = np.subtract(volume, np.float32(lo), dtype=np.float32)  # the cast to float32 is exact for int16 scans
    out *= scale
    # clip to [0, 1] and 0 outside the brain in two passes: min(max(x, 0), mask) with mask as 0/1
    np.maximum(out, np.float32(0), out=out)
    np.minimum(out, mask, out=out)
    return out


@functools.lru_cache(maxsize=64)  # the same few (crop, cube, output) sizes recur across planes and cases
def resample_matrix(
    n,                      # input samples along the axis (the cropped extent)
    pad_before,             # zeros padded before them to centre the crop in the cube
    size,                   # padded extent S (the cube side)
    out_size,               # output samples R
    antialias=True,         # Gaussian prefilter when downsampling (S > R)
):
    """Sparse (R, n) matrix: padding (implicit zeros), prefilter and linear interpolation along one axis.

    Output sample j sits at padded coordinate (j + 0.5) * S / R - 0.5 (pixel centres aligned, as
    `scipy.ndimage.zoom(grid_mode=True)`); samples outside the data are zero (background). Cached: callers must
    not modify the returned matrix in place."""
    scale = size / out_size
    coord = (np.arange(out_size) + 0.5) * scale - 0.5 - pad_before
    i0 = np.floor(coord).astype(np.int64)
    w1 = coord - i0
    dense = np.zeros((out_size, n + 2), np.float64)  # two guard columns for indices -1 and n
    rows = np.arange(out_size)
    np.add.at(dense, (rows, np.clip(i0 + 1, 0, n + 1)), 1 - w1)
    np.add.at(dense, (rows, np.clip(i0 + 2, 0, n + 1)), w1)
    interp = dense[:, 1:n + 1]
    if antialias and scale > 1:
        sigma = (scale - 1) / 2
        radius = int(np.ceil(4 * sigma))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()
        # interp @ (Gaussian band matrix), as shifted row sums; zero boundary: outside the crop is background
        blurred = np.zeros_like(interp)
        for k, t in zip(range(-radius, radius + 1), taps):
            if k >= 0:
                blurred[:, k:] += t * interp[:, :n - k]
            else:
                blurred[:, :n + k] += t * interp[:, -k:]
        interp = blurred
    interp[np.abs(interp) < 1e-7] = 0
    return scipy.sparse.csr_matrix(interp.astype(np.float32))


def contiguous_copy(a):
    """`np.ascontiguousarray(a)` for a 3D array, by 2D slabs when the copy transposes the memory order.

    numpy copies element by element in the order of the destination; when the source's fastest axis is another one,
    every element read touches a new cache line and, across a whole volume, a new page. Copying one 2D slab at a time
    (the destination's last axis and the source's fastest one) keeps each slab's lines in cache: several times
    faster for the volumes here, and the values are the same."""
    if a.ndim != 3 or a.flags.c_contiguous:
        return np.ascontiguousarray(a)
    if int(np.argmin(np.abs(a.strides))) != 0:
        return np.ascontiguousarray(a)  # (measured: slabs only pay off when the source's fastest axis is the first)
    out = np.empty(a.shape, a.dtype)
    index = [slice(None)] * 3
    for k in range(a.shape[1]):
        index[1] = k
        out[tuple(index)] = a[tuple(index)]
    return out


def resample_axis(x, axis, matrix):
    """Applies an (R, n) matrix along `axis` of the float32 array `x` (size n there)."""
    moved = np.moveaxis(x, axis, 0)
    flat = contiguous_copy(moved).reshape(moved.shape[0], -1)
    out = np.asarray(matrix @ flat, dtype=np.float32)
    return np.moveaxis(out.reshape((matrix.shape[0],) + moved.shape[1:]), 0, axis)


def nearest_index(n, pad_before, size, out_size):
    """Nearest-neighbour source index per output sample (same grid as `resample_matrix`) and its validity."""
    idx = np.floor((np.arange(out_size) + 0.5) * (size / out_size)).astype(np.int64) - pad_before
    valid = (idx >= 0) & (idx < n)
    return np.clip(idx, 0, n - 1), valid


def resample_labels(labels, pads, size, out_size, axes=(0, 1, 2)):
    """Nearest-neighbour resampling of a label array along `axes` (padding = label 0)."""
    out = labels
    for axis in axes:
        idx, valid = nearest_index(labels.shape[axis], pads[axis], size, out_size)
        out = np.take(out, idx, axis=axis)
        if not valid.all():
            shape = [1] * out.ndim
            shape[axis] = -1
            out = out * valid.reshape(shape).astype(out.dtype)
    return out


@dataclasses.dataclass
class Prepared:
    """A case after orientation, crop and normalisation, before resampling."""
    case_id: str
    images: dict            # modality -> float32 [0, 1] cropped volume, background 0
    mask: np.ndarray        # bool cropped brain mask
    seg: np.ndarray         # uint8 cropped labels or None
    start: tuple            # crop start per axis in the canonical array
    pads: tuple             # zeros before the crop per axis in the cube
    size: int               # cube side S
    affine: np.ndarray      # canonical RAS affine of the uncropped array
    ranges: dict            # modality -> (lo, hi) intensities used for normalisation


def prepare_case(
    case,                   # brats.Case
    modalities,             # modalities to keep, e.g. ('t2w',)
    method='percentile',    # 'percentile' or 'minmax'
    low=0.5,                # percentiles for method='percentile'
    high=99.5,
    denoise=None,           # Gaussian sigma in voxels, None = off
):
    arrays = dict(case.images)
    # The mask and the brain voxels are taken from the arrays as loaded (contiguous in memory): on the reoriented
    # views (negative strides) the same passes cost several times more. Neither depends on the orientation.
    raw_mask = brain_mask(arrays)
    flat_mask = raw_mask.ravel(order='K')
    arrays['__mask__'] = raw_mask
    if case.seg is not None:
        arrays['__seg__'] = case.seg
    arrays, affine = to_canonical(arrays, case.affine)
    seg = arrays.pop('__seg__', None)
    mask = arrays.pop('__mask__')
    box = bounding_box(mask)
    crop = tuple(slice(a, b) for a, b in box)
    mask = mask[crop]
    extents = mask.shape
    size = max(extents)
    pads = tuple((size - e) // 2 for e in extents)
    images, ranges = {}, {}
    for m in modalities:
        vol = arrays[m][crop]
        raw = case.images[m]
        # every brain voxel lies inside the crop; the order of the voxels does not matter to robust_range
        same_order = ((raw.flags.f_contiguous and raw_mask.flags.f_contiguous)
                      or (raw.flags.c_contiguous and raw_mask.flags.c_contiguous))
        brain = raw.ravel(order='K')[flat_mask] if same_order else vol[mask]
        if brain.size == 0 or not np.any(brain):
            raise brats.BratsError(case.files.files[m], f'{m} has no nonzero voxels inside the brain mask', case.case_id)
        lo, hi = robust_range(brain, method, low, high)
        if hi <= lo:
            raise brats.BratsError(case.files.files[m], f'{m} is constant inside the brain ({lo:g})', case.case_id)
        norm = normalize(vol, mask, lo, hi)
        if denoise:
            norm = ndimage.gaussian_filter(norm, float(denoise), mode='constant')
            norm[~mask] = 0
        images[m] = norm
        ranges[m] = (lo, hi)
    seg = None if seg is None else np.ascontiguousarray(seg[crop])
    return Prepared(case_id=case.case_id, images=images, mask=mask, seg=seg, start=tuple(a for a, _ in box),
                    pads=pads, size=size, affine=affine, ranges=ranges)


def grid_affine(prep, out_size):
    """Voxel-to-RAS affine of the cube resampled to `out_size`^3 (matches `resample_matrix`'s sample positions)."""
    scale = prep.size / out_size
    m = np.eye(4)
    for axis in range(3):
        m[axis, axis] = scale
        m[axis, 3] = (scale - 1) / 2 - prep.pads[axis] + prep.start[axis]
    return prep.affine @ m


def _to_display(a, plane):
    """(n, A, B) slices in RAS array order -> (n, H, W) display order (views).

    axial: rows anterior->posterior, columns patient left->right (x); coronal: rows superior->inferior, columns x;
    sagittal: rows superior->inferior, columns anterior->posterior."""
    if plane in ('axial', 'coronal'):  # (n, x, y|z) -> rows = y|z reversed, cols = x
        return a[:, :, ::-1].transpose(0, 2, 1)
    return a[:, ::-1, ::-1].transpose(0, 2, 1)  # sagittal: (n, y, z) -> rows = z reversed, cols = y reversed


def slice_indices(prep, plane, min_brain_fraction):
    """Indices (in the cropped array) of the slices of `plane` whose brain area is at least `min_brain_fraction` of
    the square slice (S x S, i.e. of the output image)."""
    axis = PLANE_AXIS[plane]
    other = tuple(a for a in range(3) if a != axis)
    frac = np.count_nonzero(prep.mask, axis=other) / float(prep.size * prep.size)
    return np.flatnonzero(frac >= min_brain_fraction), frac


def extract_slices(prep, plane, resolution, indices, antialias=True, gain=1.0):
    """Resampled slices of `plane` at `indices`: dict modality -> (n, R, R) float32 in [0, gain] (gain = vmax saves
    the quantiser a pass), and the seg as (n, R, R) uint8 (or None). The slice axis is not resampled."""
    axis = PLANE_AXIS[plane]
    inplane = [a for a in range(3) if a != axis]
    mats = {a: resample_matrix(prep.mask.shape[a], prep.pads[a], prep.size, resolution, antialias) for a in inplane}
    if gain != 1:
        mats[inplane[1]] = mats[inplane[1]] * np.float32(gain)
    flip_columns = plane == 'sagittal'
    if flip_columns:
        # The sagittal display reverses the in-plane A axis: reversing the matrix rows produces it reversed (same
        # sums per pixel), so that the image rows are read forwards when they are encoded.
        mats[inplane[0]] = mats[inplane[0]][::-1]
    indices = np.asarray(indices)
    if len(indices) and np.array_equal(indices, np.arange(indices[0], indices[-1] + 1)):
        indices = slice(int(indices[0]), int(indices[-1]) + 1)  # the usual case: a view instead of a gathered copy

    def pick(vol):
        sel = [slice(None)] * 3
        sel[axis] = indices
        return np.moveaxis(vol[tuple(sel)], axis, 0)  # (n, A, B)
    out = {}
    for m, vol in prep.images.items():
        sub = resample_axis(pick(vol), 1, mats[inplane[0]])
        sub = resample_axis(sub, 2, mats[inplane[1]])
        out[m] = _to_display(sub[:, ::-1] if flip_columns else sub, plane)  # undo the flip before _to_display's
    seg = None
    if prep.seg is not None:
        sub = pick(prep.seg)
        pads = (0, prep.pads[inplane[0]], prep.pads[inplane[1]])
        seg = _to_display(resample_labels(sub, pads, prep.size, resolution, axes=(1, 2)), plane)
    return out, seg


def extract_volume(prep, size, antialias=True):
    """The cube resampled to size^3: dict modality -> (size,)*3 float32 [0, 1] in RAS array order, seg or None."""
    mats = [resample_matrix(prep.mask.shape[a], prep.pads[a], prep.size, size, antialias) for a in range(3)]
    out = {}
    for m, vol in prep.images.items():
        v = vol
        for axis in range(3):
            v = resample_axis(v, axis, mats[axis])
        out[m] = v
    seg = None if prep.seg is None else resample_labels(prep.seg, prep.pads, prep.size, size)
    return out, seg


def quantize(x, vmax, dtype):
    """[0, 1] float -> round(x * vmax) as uint8/uint16 (contiguous)."""
    out = np.multiply(x, np.float32(vmax))
    out += np.float32(0.5)
    np.clip(out, 0, vmax, out=out)
    return out.astype(dtype)
