"""Generated volumes as files a clinician's viewer opens: NIfTI per modality, the tumour label map, a montage.

`generate.py` on a volume snapshot (`kind: volumes`) hands every generated volume to a `VolumeWriter` (its one
seed/class loop is generate.generate_samples). Per seed it writes one `.nii.gz` per image channel (intensities
(x + 1) / 2 in [0, 1], background 0 as in skull-stripped BraTS), the decoded tumour labels as `-seg.nii.gz` (BraTS
values 0-3, mri.seg.decode_seg) and a three-plane PNG montage (training.grids.montage: mid-axial, mid-coronal,
mid-sagittal; a row per channel and one of the labels over the first anatomy channel). Every NIfTI carries the
archive's space (mri.volume_space: RAS, its voxel spacing and origin), so the files of one seed overlay each other,
and the archive's reference case, in 3D Slicer and ITK-SNAP. With `native_grid` they are mapped back onto the
original BraTS grid (240x240x155) with the crop and zoom recorded at conversion time. `--format npy` writes the
(C, D, H, W) float32 array clipped to [-1, 1] and no montage unless `--montage` asks for one.
"""

import os
import sys

import numpy as np

import dnnlib
from mri import volume_space
from mri.output.nifti import save_volume_nifti
from mri.seg import overlay_channel
from training import grids
from training.grids import channel_names, save_png, split_label_channels


class VolumeOutputError(ValueError):
    """Generated volumes cannot be written as asked (wrong kind of snapshot, no native grid recorded); one line."""


def snapshot_kind(desc) -> str:
    """'volumes' or 'slices' from a snapshot's dataset description."""
    kind = (desc or {}).get('kind')
    if kind in ('volumes', 'slices', 'images'):
        return 'volumes' if kind == 'volumes' else 'slices'
    return 'volumes' if len((desc or {}).get('image_shape') or []) == 4 else 'slices'


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def split_channels(volume, channels):
    """(image channels [(name, (D, H, W))], label map (D, H, W) uint8 or None) of a (C, D, H, W) volume in [-1, 1]."""
    names = channel_names(channels, volume.shape[0])
    image_idx, label_idx = split_label_channels(names)
    labels = grids.label_map(volume[label_idx], drange=(-1, 1)) if label_idx else None
    return [(names[i], volume[i]) for i in image_idx], labels


def montage(volume, channels, title=None):
    """Three-plane montage [H, W, 3] uint8 of one (C, D, H, W) volume in [-1, 1] (training.grids.montage), the
    tumour labels over the first anatomy channel (mri.seg.ANATOMY_ORDER); with a title (the sample and its class),
    its rows named in a left margin and the title above."""
    names = channel_names(channels, volume.shape[0])
    sheet = grids.montage(volume, names, drange=(-1, 1), overlay_on=overlay_channel(names))
    if title is None:
        return sheet
    image_idx, label_idx = split_label_channels(names)
    rows = [names[i] for i in image_idx] + (['labels'] if label_idx else [])
    return grids.annotate(sheet, rows, title)


# ---------------------------------------------------------------------------------------------------------------
# Space


def resolve_space(desc, spatial_shape, warn=True):
    """The archive space of a snapshot: recorded in the snapshot, else read from the training archive's dataset.json
    when it is still there, else 1 mm RAS centred on the origin (with a notice)."""
    space = (desc or {}).get('space')
    if not space and desc and desc.get('path') and os.path.exists(desc['path']):
        space = _archive_meta(desc['path']).get('space')
    if space and list(space.get('shape') or []) == list(spatial_shape):
        return space
    if warn:
        why = 'records no space' if not space else f"space {space.get('shape')} differs from the volumes {list(spatial_shape)}"
        print(f'Note: the snapshot {why}; writing NIfTI with 1 mm RAS voxels centred on the origin', file=sys.stderr)
    fallback = volume_space.fallback_space(spatial_shape[0])
    fallback['shape'] = list(spatial_shape)
    return fallback


def _archive_meta(path):
    """The archive's dataset.json, or {} when it cannot be read (the space then falls back, with a notice)."""
    from mri.sources.archive import ArchiveReadError, read_dataset_json
    try:
        return read_dataset_json(path) or {}
    except ArchiveReadError:
        return {}


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _channel_file_name(name, class_values):
    """Per-modality archives have one channel named 'modality': the file takes the modality asked for."""
    if name == 'modality':
        from mri.sources.brats import MODALITIES
        return next((v for v in class_values if v in MODALITIES), name)
    return name


def write_volume(
    volume,                 # (C, D, H, W) float in [-1, 1]
    channels,               # channel names (snapshot dataset description)
    stem,                   # output path without suffix, e.g. out/seed0000
    space,                  # resolve_space()
    fmt='nifti',            # 'nifti' or 'npy'
    native_grid=False,      # map onto the original BraTS grid of the space's reference case
    class_values=(),        # label names of the class generated (names the 'modality' channel)
    montage_png=True,       # also the three-plane montage PNG
):
    """Writes one generated volume; returns the paths written (NIfTI files, or the .npy clipped to [-1, 1] like
    every other output, then the montage when asked)."""
    written = []
    images, labels = split_channels(volume, channels)
    if fmt == 'npy':
        with dnnlib.atomic_output(stem + '.npy', suffix='.npy') as tmp:
            np.save(tmp, np.clip(volume, -1, 1).astype(np.float32))
        written.append(stem + '.npy')
    else:
        record = space.get('native') if native_grid else None
        affine = np.asarray(space['affine'])
        for name, chan in images:
            data = ((chan.astype(np.float32) + 1) / 2).clip(0, 1)
            if record is not None:
                data, affine = volume_space.to_native(data, record)
            path = f'{stem}-{_channel_file_name(name, class_values)}.nii.gz'
            written.append(str(save_volume_nifti(path, data, affine, [name])))
        if labels is not None:
            data = labels
            if record is not None:
                data, affine = volume_space.to_native(labels, record, labels=True)
            written.append(str(save_volume_nifti(stem + '-seg.nii.gz', data.astype(np.uint8), affine, ['seg 0-3'])))
    if montage_png:
        title = os.path.basename(stem) + (f'  class {",".join(class_values)}' if class_values else '')
        written.append(save_png(montage(volume, channels, title), stem + '-montage.png'))
    return written


CLASS_GRID_CELLS = 16      # seeds per class in a volume class grid (a montage each, kept until the end)


class VolumeWriter:
    """Writes each generated volume (generate.generate_samples hands them over) as NIfTI files (or .npy) and a
    montage, and with class_spec 'all' class_grid.png: a sheet near 16:9 with a band per class named at its left,
    a cell per seed (its three-plane montage, `montage`), the first CLASS_GRID_CELLS seeds of each class (only
    those montages are kept: memory stays flat however many seeds)."""

    unit = 'volumes'

    def __init__(
        self,
        desc,               # the snapshot's dataset description (channels, space)
        outdir,             # output folder
        fmt='nifti',        # 'nifti' or 'npy'
        native_grid=False,  # also map onto the original BraTS grid
        verbose=True,
        montage=None,       # a montage PNG per volume; None = with NIfTI, not with npy (arrays for programs)
        class_grid=True,    # keep the class grid's montages for finish() (generate.py: class_spec 'all' only)
    ):
        self.desc, self.outdir, self.fmt, self.native_grid, self.verbose = desc, outdir, fmt, native_grid, verbose
        self.montage = (fmt != 'npy') if montage is None else bool(montage)
        self.channels = desc.get('channels') or []
        self.space = None
        self.cells = {} if class_grid else None  # class name -> the class grid's montages, CLASS_GRID_CELLS at most

    def start(self, first):
        """Checks the first volume (C, D, H, W) and resolves the archive space, before anything is written."""
        if first.ndim != 4:
            raise VolumeOutputError(f'the generator made images of shape {(1,) + tuple(first.shape)}, not volumes '
                                    f'[N, C, D, H, W]')
        self.space = resolve_space(self.desc, first.shape[1:], warn=self.verbose)
        if self.native_grid and not self.space.get('native'):
            raise VolumeOutputError('--native-grid: the snapshot\'s archive records no native grid (convert it again '
                                    'with this version of dataset_tool.py, --kind volumes)')

    def write(self, volume, stem, class_name, class_values):
        """Writes one volume; returns the paths written."""
        written = write_volume(volume, self.channels, stem, self.space, self.fmt, self.native_grid, class_values,
                               montage_png=self.montage)
        if self.cells is not None:
            kept = self.cells.setdefault(class_name, [])
            if len(kept) < CLASS_GRID_CELLS:
                kept.append(montage(volume, self.channels))
        return written

    def finish(self, classes):
        """class_grid.png (class_spec 'all'); returns the paths written."""
        groups = [(name, len(cells)) for name, cells in (self.cells or {}).items() if cells]
        if not groups:
            return []
        sheet = grids.draw_sheet([cell for cells in self.cells.values() for cell in cells], groups)
        grid = save_png(sheet, os.path.join(self.outdir, 'class_grid.png'))
        if self.verbose:
            print(f'Classes of {grid} (each named left of its band, up to {CLASS_GRID_CELLS} seeds each): '
                  + ' | '.join(name for name, _, _ in classes))
        return [grid]
