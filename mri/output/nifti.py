"""Write volumes (real or generated) as NIfTI-1 files with a true affine.

Volume archives record, per volume, the affine of the resampled grid (`dataset.json` "affines"), so a generated
`(C, D, H, W)` array can be written back with real millimetre spacing and RAS orientation and opened in any viewer
(NIfTI-1: Cox et al., "A (sort of) new image data format standard: NIfTI-1", NeuroImage 22, 2004).
"""

from pathlib import Path

import nibabel as nib
import numpy as np

import dnnlib


def save_volume_nifti(
    path,                   # output path, ending in .nii or .nii.gz
    array,                  # (C, D, H, W) or (D, H, W); numpy array or torch tensor; any numeric dtype
    affine,                 # 4x4 voxel-to-scanner (RAS, mm) matrix, e.g. dataset.json "affines"[relpath]
    channel_names=None,     # optional list of C names, stored in the header description
):
    """Writes `array` atomically. Returns the path.

    One channel gives a 3D image. C > 1 channels give a vector image as the NIfTI-1 standard defines it and ITK-based
    viewers (3D Slicer, ITK-SNAP) read it: shape (x, y, z, 1, C), the channels in the 5th dimension (dim[5]) with
    intent code NIFTI_INTENT_VECTOR (1007); dim[4] is time and stays 1, so viewers show one multi-component volume
    rather than C time frames. nibabel reads it back as a 5D array."""
    path = Path(path)
    if not (path.name.endswith('.nii') or path.name.endswith('.nii.gz')):
        raise ValueError(f'{path}: a NIfTI file name must end in .nii or .nii.gz')
    if hasattr(array, 'detach'):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    vector = array.ndim == 4 and array.shape[0] > 1
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)[:, :, :, None, :] if vector else array[0]
    elif array.ndim != 3:
        raise ValueError(f'{path}: expected a (C, D, H, W) or (D, H, W) array, got shape {array.shape}')
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f'{path}: affine must be 4x4, got shape {affine.shape}')
    if array.dtype == np.float16 or array.dtype == np.bool_:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.header.set_xyzt_units('mm')
    if vector:
        img.header.set_intent('vector', (), name='channels')
    img.header.set_qform(affine, code=1)  # code 1: scanner-anatomical coordinates
    img.header.set_sform(affine, code=1)
    if channel_names:
        img.header['descrip'] = ','.join(channel_names)[:79].encode()
    suffix = '.nii.gz' if path.name.endswith('.nii.gz') else '.nii'
    with dnnlib.atomic_output(str(path), suffix=suffix) as tmp:  # the suffix tells nibabel to gzip
        nib.save(img, tmp)
    return path
