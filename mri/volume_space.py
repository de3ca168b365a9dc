"""The physical space of a volume archive, and the way back to the original BraTS grid.

`mri.sources.preprocess` turns a case into a cube: reorient to RAS (axis permutations and flips), crop the brain's bounding
box (`start`), pad it centred to a cube of side S (`pads`), and resample the cube to R^3 voxels with pixel centres
aligned (`grid_affine`). A conversion records, per case, what is needed to undo this (`native_grids` in
dataset.json), and one archive-wide `space`: the grid of a reference case, the case whose cube side S is the median
of the archive. A generated volume has no case of its own; written with the space's affine it has the archive's
real voxel spacing, RAS orientation and an origin where BraTS brains lie (BraTS cases are co-registered to the SRI24
atlas, so one case's frame fits all of them), and it overlays the reference case's original files in 3D Slicer or
ITK-SNAP. `to_native` maps a volume back onto the original grid of a case (240x240x155 for BraTS), in the original
files' voxel order and affine.
"""

import numpy as np
import nibabel as nib
from scipy import ndimage

RAS = np.array([[0, 1], [1, 1], [2, 1]])


def native_record(prep, original_shape, original_affine, size):
    """What `to_native` needs for one case: original grid, canonical grid, crop, padding, cube and output size."""
    ornt = nib.orientations.io_orientation(np.asarray(original_affine))
    canonical_shape = [int(original_shape[int(a)]) for a in ornt[:, 0].argsort()]  # RAS axis k holds input axis
    return {
        'shape': [int(s) for s in original_shape[:3]],
        'affine': np.asarray(original_affine, dtype=np.float64).tolist(),
        'canonical_shape': canonical_shape,
        'canonical_affine': np.asarray(prep.affine, dtype=np.float64).tolist(),
        'crop_start': [int(s) for s in prep.start],
        'pads': [int(p) for p in prep.pads],
        'cube': int(prep.size),
        'size': int(size),
    }


def grid_affine(record):
    """Voxel-to-RAS affine of the R^3 archive grid of a case (same as mri.sources.preprocess.grid_affine)."""
    scale = record['cube'] / record['size']
    m = np.eye(4)
    for axis in range(3):
        m[axis, axis] = scale
        m[axis, 3] = (scale - 1) / 2 - record['pads'][axis] + record['crop_start'][axis]
    return np.asarray(record['canonical_affine']) @ m


def archive_space(natives):
    """The archive-wide space from {case_id: native_record}: the grid of the case with the median cube side."""
    if not natives:
        return None
    order = sorted(natives, key=lambda cid: (natives[cid]['cube'], cid))
    ref = order[(len(order) - 1) // 2]
    record = natives[ref]
    affine = grid_affine(record)
    return {
        'orientation': 'RAS',
        'reference_case': ref,
        'shape': [record['size']] * 3,
        'affine': affine.tolist(),
        'spacing': [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        'origin': [float(o) for o in affine[:3, 3]],
        'native': record,
    }


def fallback_space(size):
    """A 1 mm-per-voxel RAS space centred on the origin, for snapshots of archives that record no space."""
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray([size] * 3) - 1) / 2
    return {'orientation': 'RAS', 'reference_case': None, 'shape': [size] * 3, 'affine': affine.tolist(),
            'spacing': [1.0] * 3, 'origin': affine[:3, 3].tolist(), 'native': None}


def to_native(
    volume,                 # (D, H, W) array on the archive grid (RAS array order), R^3
    record,                 # native_record of the case whose grid to map onto
    labels=False,           # nearest neighbour (label maps) instead of trilinear interpolation
    background=0.0,         # value outside the cube
):
    """The volume on the original grid: shape record['shape'], the original files' voxel order. Returns (array,
    affine). Inverts the crop, padding and resampling of mri.sources.preprocess, then the RAS reorientation."""
    volume = np.asarray(volume)
    size = record['size']
    if volume.shape != (size, size, size):
        raise ValueError(f'to_native: expected a {size}^3 volume, got shape {volume.shape}')
    # Canonical voxel i sits at cube coordinate u = i - start + pad; archive voxel j at u = (j + 0.5) * S / R - 0.5,
    # so j = (i - start + pad + 0.5) * R / S - 0.5: a diagonal affine map per axis.
    zoom = size / record['cube']
    offset = [(-record['crop_start'][a] + record['pads'][a] + 0.5) * zoom - 0.5 for a in range(3)]
    src = volume.astype(np.float32) if not labels else volume
    canonical = ndimage.affine_transform(src, [zoom] * 3, offset=offset, output_shape=tuple(record['canonical_shape']),
                                         order=0 if labels else 1, mode='constant', cval=background,
                                         output=volume.dtype if labels else np.float32)
    ornt = nib.orientations.io_orientation(np.asarray(record['affine']))
    back = nib.orientations.ornt_transform(RAS, ornt)
    native = nib.orientations.apply_orientation(canonical, back)
    assert list(native.shape) == list(record['shape']), (native.shape, record['shape'])
    return np.ascontiguousarray(native), np.asarray(record['affine'])
