"""Generated volumes as files a clinician's viewer opens: NIfTI per modality, the tumour label map, a montage.

`generate.py` on a volume snapshot (`kind: volumes`) calls `generate_volumes`. Per seed it writes one `.nii.gz` per
image channel (intensities (x + 1) / 2 in [0, 1], background 0 as in skull-stripped BraTS), the decoded tumour
labels as `-seg.nii.gz` (BraTS values 0-3, mri.seg.decode_seg) and a three-plane PNG montage (mid-axial,
mid-coronal, mid-sagittal; a row per channel and one of the labels over the first anatomy channel). Every NIfTI
carries the archive's space (mri.volume_space: RAS, its voxel spacing and origin), so the files of one seed overlay
each other, and the archive's reference case, in 3D Slicer and ITK-SNAP. With `native_grid` they are mapped back onto
the original BraTS grid (240x240x155) with the crop and zoom recorded at conversion time.
"""

import json
import os
import sys
import zipfile

import numpy as np
import PIL.Image

import dnnlib
from mri import volume_space
from mri.nifti import save_volume_nifti
from mri.preprocess import _to_display
from mri.seg import SEG_CHANNELS, decode_seg
from training.grids import LABEL_COLOURS, overlay

ANATOMY_ORDER = ('t2f', 't1c', 't2w', 't1n')  # the channel under the label overlay: FLAIR shows oedema best


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


def mid_planes(volume):
    """(D, H, W) in RAS array order [x, y, z] -> [axial, coronal, sagittal] mid-slices in display order (rows
    anterior->posterior or superior->inferior, patient left on the right of the picture as in mri.preprocess)."""
    x, y, z = (s // 2 for s in volume.shape)
    return [_to_display(volume[None, :, :, z], 'axial')[0], _to_display(volume[None, :, y, :], 'coronal')[0],
            _to_display(volume[None, x, :, :], 'sagittal')[0]]


def _tile(rows):
    """Rows of [H, W, 3] uint8 cells (sizes may differ: anisotropic grids) -> one canvas, cells padded black."""
    h = max(c.shape[0] for r in rows for c in r)
    w = max(c.shape[1] for r in rows for c in r)
    canvas = np.zeros([h * len(rows), w * max(len(r) for r in rows), 3], np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            canvas[i * h:i * h + cell.shape[0], j * w:j * w + cell.shape[1]] = cell
    return canvas


def _grey_u8(plane):
    return np.rint((np.asarray(plane, np.float32) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def _grey(plane):
    return np.repeat(_grey_u8(plane)[..., None], 3, axis=2)


def split_channels(volume, channels):
    """(image channels [(name, (D, H, W))], label map (D, H, W) uint8 or None) of a (C, D, H, W) volume in [-1, 1]."""
    names = list(channels) if channels and len(channels) == volume.shape[0] else [f'ch{i}' for i in range(volume.shape[0])]
    images = [(n, volume[i]) for i, n in enumerate(names) if n not in SEG_CHANNELS]
    labels = None
    if all(s in names for s in SEG_CHANNELS):
        labels = decode_seg(volume[[names.index(s) for s in SEG_CHANNELS]], axis=0).astype(np.uint8)
    return images, labels


def montage(volume, channels):
    """Three-plane montage [H, W, 3] uint8 of one (C, D, H, W) volume in [-1, 1]: a row per image channel, and a row
    of the tumour labels over the first anatomy channel when the volume has them."""
    images, labels = split_channels(volume, channels)
    rows = [[_grey(p) for p in mid_planes(v)] for _, v in images]
    if labels is not None and images:
        base = dict(images).get(next((n for n in ANATOMY_ORDER if n in dict(images)), images[0][0]))
        rows.append([overlay(_grey_u8(p), l) for p, l in zip(mid_planes(base), mid_planes(labels))])
    elif labels is not None:
        rows.append([LABEL_COLOURS[l] for l in mid_planes(labels)])
    return _tile(rows)


def save_png(rgb, path):
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        PIL.Image.fromarray(rgb, 'RGB').save(tmp)
    return path


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
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, 'dataset.json')) as f:
                return json.load(f)
        with zipfile.ZipFile(path) as z, z.open('dataset.json') as f:
            return json.load(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return {}


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _channel_file_name(name, class_values):
    """Per-modality archives have one channel named 'modality': the file takes the modality asked for."""
    if name == 'modality':
        from mri.brats import MODALITIES
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
):
    """Writes one generated volume; returns the paths written (NIfTI files, or the .npy, then the montage)."""
    written = []
    images, labels = split_channels(volume, channels)
    if fmt == 'npy':
        with dnnlib.atomic_output(stem + '.npy', suffix='.npy') as tmp:
            np.save(tmp, volume.astype(np.float32))
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
    written.append(save_png(montage(volume, channels), stem + '-montage.png'))
    return written


def generate_volumes(
    G,                      # a 3D generator: (z, c) -> [N, C, D, H, W]
    desc,                   # the snapshot's dataset description
    seeds,                  # one volume per seed (per class with class_spec 'all')
    outdir,                 # output folder
    class_spec=None,        # class name(s), index, 'all', or None (unconditional)
    truncation_psi=1.0,
    noise_mode='const',
    fmt='nifti',            # 'nifti' or 'npy'
    native_grid=False,      # also map onto the original BraTS grid
    device='cpu',
    verbose=True,
):
    """Generates and writes volumes; returns the paths written (montages; class_grid.png for class_spec 'all')."""
    import torch
    from training.labels import ClassSpecError, all_classes, parse_class

    label_names = list(desc.get('label_names') or [f'class{i}' for i in range(G.c_dim)])[:G.c_dim] if G.c_dim else []
    label_groups = desc.get('label_groups') or None
    channels = desc.get('channels') or []
    if class_spec == 'all':
        if G.c_dim == 0:
            raise ClassSpecError('--class all: this network is unconditional')
        classes = all_classes(label_names, label_groups)
    else:
        classes = [(None, parse_class(class_spec, label_names, label_groups))]

    def run(seed, label):
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).to(device=device, dtype=torch.float32)
        c = torch.from_numpy(label[None]).to(device)
        with torch.no_grad():
            img = G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)
        if img.ndim != 5:
            raise VolumeOutputError(f'the generator made images of shape {tuple(img.shape)}, not volumes [N, C, D, H, W]')
        return img[0].float().cpu().numpy()

    first = run(seeds[0], classes[0][1])
    space = resolve_space(desc, first.shape[1:], warn=verbose)
    if native_grid and not space.get('native'):
        raise VolumeOutputError('--native-grid: the snapshot\'s archive records no native grid (convert it again with '
                                'this version of dataset_tool.py, --kind volumes)')
    os.makedirs(outdir, exist_ok=True)
    written, strips = [], []
    bar = dnnlib.ProgressBar(len(seeds) * len(classes), desc='Generating', unit='volumes', enabled=verbose)
    for name, label in classes:
        values = name.split(',') if name else [n for n, v in zip(label_names, label) if v]
        row = []
        for seed in seeds:
            vol = first if (seed == seeds[0] and label is classes[0][1]) else run(seed, label)
            stem = os.path.join(outdir, f'seed{seed:04d}' + (f'-{name.replace(",", "-")}' if name else ''))
            written += write_volume(vol, channels, stem, space, fmt, native_grid, values)
            images, _ = split_channels(vol, channels)
            if images:
                row.append(np.concatenate([_grey(p) for p in mid_planes(images[0][1])], axis=1))
            bar.update(tail=os.path.basename(stem))
        strips.append(row)
    bar.close()
    if class_spec == 'all' and all(strips):
        grid = os.path.join(outdir, 'class_grid.png')
        written.append(save_png(_tile(strips), grid))
        if verbose:
            print(f'Rows of {grid}: ' + ' | '.join(name for name, _ in classes))
    return written
