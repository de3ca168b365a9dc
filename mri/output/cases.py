"""Painted cases as BraTS case folders: drop-in cases on the source case's own grid, affine, units and dtype.

`write_case` turns a mri.painting.insert.PaintResult into `BraTS-SYN-xxxxx-yyy/` with
`BraTS-SYN-xxxxx-yyy-{t1n,t1c,t2w,t2f,seg}.nii.gz` (BraTS 2023 naming and labels 0-3), a three-plane montage (source,
result, new labels) and a JSON sidecar (source case, snapshot and its sha256, seed, placements, label source). Each
file starts from the source file: its header (affine, qform/sform codes, units), its dtype and its voxels; only the
voxels of the repaint region are replaced, by the painted values mapped back to the source's intensity units
(NativeCase.denormalise), orientation (NativeCase.to_source) and dtype (rounded and clipped for integer scans). So
every voxel outside the region is the source's own value, and the case overlays its source in 3D Slicer.

A case folder appears all at once: it is written into a hidden folder under names no BraTS reader takes for a case,
renamed into place, its files renamed to their BraTS names, and the sidecar written last: a case is finished when
its sidecar is there (`case_done`), and a rerun skips it. A killed run leaves at most a hidden folder, or a case
folder without its sidecar, which the next run replaces.
"""

import json
import os
import shutil

import nibabel as nib
import numpy as np

import dnnlib
from mri.sources.brats import MODALITIES

SYN_PREFIX = 'BraTS-SYN'
FILE_KEYS = MODALITIES + ('seg',)


class CaseOutputError(ValueError):
    """A painted case cannot be written where asked; one line naming the folder."""


def synthetic_case_id(number, variant) -> str:
    """BraTS 2023 naming: BraTS-SYN-<5-digit case>-<3-digit variant>."""
    if not (0 <= int(number) <= 99999 and 0 <= int(variant) <= 999):
        raise CaseOutputError(f'case number {number} / variant {variant} do not fit BraTS-SYN-xxxxx-yyy')
    return f'{SYN_PREFIX}-{int(number):05d}-{int(variant):03d}'


def sidecar_path(case_dir, case_id):
    return os.path.join(case_dir, f'{case_id}-painting.json')


def case_done(outdir, case_id) -> bool:
    """True when the case folder is finished (its sidecar is written last)."""
    case_dir = os.path.join(outdir, case_id)
    return os.path.isfile(sidecar_path(case_dir, case_id)) and all(
        os.path.isfile(os.path.join(case_dir, f'{case_id}-{k}.nii.gz')) for k in FILE_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Voxels back in the source's terms


def _cast(values, dtype):
    """Float values as `dtype`: rounded and clipped to its range for integer types."""
    dtype = np.dtype(dtype)
    if dtype.kind in 'iub':
        info = np.iinfo(dtype) if dtype.kind != 'b' else None
        values = np.rint(values)
        if info is not None:
            values = np.clip(values, info.min, info.max)
    return values.astype(dtype)


def source_modality(native, m_index, painted, region):
    """The source file's array of modality `m_index` with the voxels of `region` (canonical bool) replaced by the
    painted values (canonical float [-1, 1]) in the source's units, orientation and dtype; a new array."""
    src = native.source.images[native.modalities[m_index]]
    out = np.array(src, copy=True)
    if region.any():
        values = np.zeros(region.shape, np.float64)
        values[region] = native.denormalise(m_index, painted[region])
        where = native.to_source(region)
        out[where] = _cast(native.to_source(values)[where], src.dtype)
    return out


def source_seg(native, seg, dtype):
    """The painted case's labels (canonical uint8 0-3) in the source file's orientation and `dtype`."""
    return _cast(native.to_source(seg).astype(np.float64), dtype)


def _header_of(path):
    img = nib.load(str(path))
    return img.header.copy(), img.get_data_dtype()


def _nifti(array, header):
    """An image that keeps the source header as it is (affine, codes, units): no affine is passed, so nibabel does
    not rewrite the qform/sform from one."""
    header = header.copy()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    return nib.Nifti1Image(array, None, header)


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def case_montage(native, result, at=None):
    """[H, W, 3] uint8: three planes through `at` (canonical voxel; default the middle) in rows: the source with its
    labels, the result, the result with its labels (the channel under the labels: mri.seg.overlay_channel)."""
    from mri.seg import overlay_channel
    from training import grids
    name = overlay_channel(native.modalities)
    m = native.modalities.index(name)
    rows = []
    for image, seg, labelled in ((native.images[m], native.seg, True), (result.images[m], None, False),
                                 (result.images[m], result.seg, True)):
        grey = [grids.to_uint8(p, (-1, 1)) for p in grids.mid_planes(image, at)]
        if labelled:
            rows.append([grids.overlay(g, np.asarray(s)) for g, s in zip(grey, grids.mid_planes(seg, at))])
        else:
            rows.append([np.repeat(g[..., None], 3, axis=2) for g in grey])
    return grids.tile_cells(rows)


def montage_point(result):
    """The voxel the montage planes go through: the first placement's centre, else the middle of what was healed."""
    if result.placements:
        return result.placements[0]['centre']
    if result.region.any():
        return [int(np.median(i)) for i in np.nonzero(result.region)]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Case folders


def _clear_partial(outdir, case_id):
    """Removes what a killed run left of this case: hidden partial folders, and a case folder without its sidecar
    that holds nothing but files this writer makes."""
    for name in os.listdir(outdir):
        if name.startswith(f'.{case_id}.partial-'):
            shutil.rmtree(os.path.join(outdir, name), ignore_errors=True)
    case_dir = os.path.join(outdir, case_id)
    if os.path.isdir(case_dir) and not case_done(outdir, case_id):
        ours = {f'{case_id}-{k}.nii.gz' for k in FILE_KEYS} | {f'{k}.nii.gz' for k in FILE_KEYS} | {
            f'{case_id}-montage.png', f'{case_id}-painting.json'}
        stray = [f for f in os.listdir(case_dir) if f not in ours]
        if stray:
            raise CaseOutputError(f'{case_dir}: exists, is not a finished painted case and holds {stray[0]}; '
                                  f'move it away or choose another --outdir')
        shutil.rmtree(case_dir)


def write_case(
    outdir,                 # output folder (created)
    case_id,                # synthetic_case_id()
    native,                 # mri.sources.patches.NativeCase: the source case
    result,                 # mri.painting.insert.PaintResult
    sidecar,                # JSON dict: source, snapshot, seed, label source, ...; placements and files are added
    montage=True,           # write <case>-montage.png
) -> str:
    """Writes one painted case folder atomically (module docstring); returns its path."""
    os.makedirs(outdir, exist_ok=True)
    _clear_partial(outdir, case_id)
    final = os.path.join(outdir, case_id)
    tmp = os.path.join(outdir, f'.{case_id}.partial-{os.getpid()}')
    os.makedirs(tmp)
    try:
        files = native.source.files
        for m, modality in enumerate(native.modalities):
            if modality not in MODALITIES:
                continue
            header, _ = _header_of(files.files[modality])
            nib.save(_nifti(source_modality(native, m, result.images[m], result.region), header),
                     os.path.join(tmp, f'{modality}.nii.gz'))
        if files.seg is not None:
            header, dtype = _header_of(files.seg)
        else:  # a case without labels: the first image's header, as a label map
            header, dtype = _header_of(files.files[native.modalities[0]])
            header.set_slope_inter(1, 0)
            dtype = np.uint8
        nib.save(_nifti(source_seg(native, result.seg, dtype), header), os.path.join(tmp, 'seg.nii.gz'))
        written = [f'{case_id}-{k}.nii.gz' for k in FILE_KEYS]
        if montage:
            from training.grids import save_png
            save_png(case_montage(native, result, montage_point(result)), os.path.join(tmp, f'{case_id}-montage.png'))
            written.append(f'{case_id}-montage.png')
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for k in FILE_KEYS:  # BraTS names only once the folder is in place: a partial folder is never a case
        os.replace(os.path.join(final, f'{k}.nii.gz'), os.path.join(final, f'{case_id}-{k}.nii.gz'))
    record = dict(sidecar, case=case_id, files=written, placements=result.placements, failures=result.failures,
                  healed=result.healed, repainted_voxels=int(result.region.sum()))
    with dnnlib.atomic_output(sidecar_path(final, case_id), suffix='.json') as t:
        with open(t, 'w') as f:
            json.dump(record, f, indent=1)
    return final
