"""Image folders and zips -> a resized archive: StyleGAN2-ADA folders, as NVlabs' dataset_tool converted them, and
this project's own archives (re-converted to another resolution with their metadata).

The StyleGAN2-ADA dataset format (Karras et al., "Training Generative Adversarial Networks with Limited Data",
NeurIPS 2020): PNG/JPG images in a folder or zip, with an optional `dataset.json` {"labels": [[name, label], ...]}.
Each image is centre-cropped to a square and resized to the output resolution (Lanczos), keeping its channels and
its bit depth; labels are kept as given, the files are renumbered.

A project archive (dataset.json with "channels", "label_names", "kind", ...; PNG or `.npy` slices, `.npy` volumes)
keeps its file names, labels, label names and groups, channels, normalisation record, case split and, for volumes,
affines (rescaled to the new grid). `.npy` arrays are resampled like mri.sources.preprocess resamples a case: linear with an
anti-aliasing prefilter for images, nearest neighbour for the tumour labels, which come out as a label map
("seg_storage": "labelmap") whichever way the source stored them. Volumes take the cube side from --volume-size.
"""

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

import dnnlib
from mri import volume_space
from mri.sources import archive, brats, preprocess
from mri.seg import SEG_CHANNELS, SEG_STORAGE, onehot_to_labelmap

# dataset.json keys that describe the content and survive a re-conversion unchanged
_KEPT_KEYS = ('label_names', 'label_groups', 'channels', 'kind', 'normalization', 'cases')


IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.npy')


def is_image_source(source):
    """True for a zip, or a folder with images and no NIfTI files."""
    source = Path(source)
    if source.is_file():
        return source.suffix.lower() == '.zip'
    if not source.is_dir():
        return False
    has_images = False
    for p in brats.walk_files(source, unreadable=[]):  # the BraTS discovery reports unreadable folders
        if brats.is_nifti(p):
            return False
        has_images = has_images or p.suffix.lower() in IMAGE_EXTS
    return has_images


def _open_image_source(source):
    """Returns (sorted image names, read(name) -> bytes, dataset.json dict or None). macOS debris (`__MACOSX/`,
    `._*`) is not an image."""
    source = Path(source)
    if source.is_file():
        try:
            z = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as e:
            raise brats.BratsError(source, f'cannot be read as a zip ({e})') from None
        names = {n for n in z.namelist() if not n.endswith('/') and not brats.is_os_debris(Path(n))}
        read = z.read
    else:
        names = {p.relative_to(source).as_posix() for p in brats.walk_files(source)}
        read = lambda name: (source / name).read_bytes()  # noqa: E731
    meta = None
    if 'dataset.json' in names:
        try:
            meta = json.loads(read('dataset.json'))
        except ValueError as e:
            raise brats.BratsError(f'{source}/dataset.json', f'invalid JSON ({e})') from None
        if not isinstance(meta, dict):
            raise brats.BratsError(f'{source}/dataset.json', 'expected a JSON object')
    images = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTS)
    if not images:
        raise brats.BratsError(source, f'no images ({", ".join(IMAGE_EXTS)}) found')
    return images, read, meta


def is_project_archive(meta):
    """dataset.json of an archive written by this project's dataset_tool (not a plain StyleGAN2-ADA one)."""
    return bool(meta) and any(k in meta for k in ('channels', 'label_names', 'kind'))


def convert_image_folder(
    source,                 # folder or zip: StyleGAN2-ADA layout, or an archive of this project
    dest,                   # .zip or folder
    opts,                   # mri.sources.convert.ConvertOptions: resolution (volume_size for volumes), max_cases, compress_level, overwrite
    progress=True,
):
    """Resizes every image (side: opts.resolution; volumes: opts.volume_size) keeping channels, bit depth and labels;
    a project archive also keeps its file names and metadata (see the module docstring)."""
    images, read, meta = _open_image_source(source)
    project = is_project_archive(meta)
    images = _first(images, meta if project else None, opts.max_cases)
    volumes = project and meta.get('kind') == 'volumes'
    side = opts.volume_size if volumes else opts.resolution
    seg = _seg_layout(meta) if project else None
    given = dict((k, v) for k, v in (meta or {}).get('labels') or [])
    labels = [] if given else None
    relpaths, affines = {}, {}
    first_kind = None  # (image kind, its first file): every image of an archive must be of one kind
    bar = dnnlib.ProgressBar(len(images), unit='images', enabled=progress)
    t0 = time.time()
    with archive.ArchiveWriter(dest, opts.overwrite) as writer:
        for i, name in enumerate(images):
            relpath = name if project else f'{i // 1000:05d}/img{i:08d}{".npy" if name.endswith(".npy") else ".png"}'
            relpaths[name] = relpath
            data = read(name)
            if name.lower().endswith('.npy'):
                array, scale = _resize_array(_load_npy(data, f'{source}/{name}'), side, seg, f'{source}/{name}')
                writer.add(relpath, *archive.npy_entry(array, opts.codec, opts.compress_level))
                if volumes and name in (meta.get('affines') or {}):
                    affines[relpath] = _rescaled_affine(meta['affines'][name], scale)
            else:
                png, kind = _resized_png(data, f'{source}/{name}', side, opts.compress_level)
                first_kind = first_kind or (kind, name)
                if kind != first_kind[0]:  # training would stop late on it with no file named
                    raise brats.BratsError(f'{source}/{name}', f'is {kind}, but {first_kind[1]} is {first_kind[0]}: an '
                                                               f'archive holds one kind of image; convert them to one mode first')
                writer.add(relpath, png)
            if labels is not None:
                if name not in given:
                    raise brats.BratsError(f'{source}/dataset.json', f'no label for {name}')
                labels.append([relpath, given[name]])
            bar.update(done=i + 1)
        bar.close()
        writer.commit(_output_meta(meta, project, labels, relpaths, affines, seg, source, side, opts))
    return {'dest': str(dest), 'cases': len(set((meta or {}).get('file_cases', {}).get(n) for n in images) - {None}),
            'images': len(images), 'counts': {'images': len(images)}, 'skipped_slices': {}, 'skipped_cases': [],
            'skipped_json': '', 'split': {}, 'seconds': time.time() - t0, 'min_brain_fraction': 0,
            'kind': meta.get('kind', 'images') if project else 'images', 'warnings': []}


def _first(images, meta, max_cases):
    """The first `max_cases` cases (project archives with file_cases) or images (anything else)."""
    if max_cases is None:
        return images
    file_cases = (meta or {}).get('file_cases')
    if not file_cases:
        return images[:max_cases]
    keep = set(sorted(set(file_cases.values()))[:max_cases])
    return [n for n in images if file_cases.get(n) in keep]


def _seg_layout(meta):
    """None, or (storage, index of the first seg channel in the stored array) for an archive with tumour channels."""
    channels = meta.get('channels') or []
    if not all(c in channels for c in SEG_CHANNELS):
        return None
    first = channels.index(SEG_CHANNELS[0])
    return (meta.get('seg_storage') or 'onehot'), first


def _load_npy(data, where):
    try:
        from training.dataset import read_npy_member  # here: the decoder's module imports torch
        array = read_npy_member(io.BytesIO(data), len(data))  # any form of .npy member (plain, blosc2)
    except (OSError, ValueError, EOFError) as e:
        raise brats.BratsError(where, f'cannot be read as .npy ({e})') from None
    if array.ndim not in (3, 4) or array.dtype not in (np.uint8, np.uint16):
        raise brats.BratsError(where, f'expected a (C,H,W) or (C,D,H,W) uint8/uint16 array, got {array.dtype} '
                                      f'{tuple(array.shape)}')
    return array


def _resize_array(array, side, seg, where):
    """(C, [D,] H, W) -> (C', [side,] side, side) and the scale (old/new side). Image channels: linear with the
    anti-aliasing prefilter of mri.sources.preprocess; tumour channels: nearest neighbour, stored as one label map."""
    spatial = array.shape[1:]
    if len(set(spatial)) != 1:
        raise brats.BratsError(where, f'expected square slices or cubes, got shape {tuple(array.shape)}')
    n = spatial[0]
    axes = tuple(range(1, array.ndim))
    first = seg[1] if seg else array.shape[0]
    if seg and seg[0] == 'onehot':
        if array.shape[0] != first + len(SEG_CHANNELS):
            raise brats.BratsError(where, f'{array.shape[0]} channels disagree with dataset.json "channels"')
        labelmap = onehot_to_labelmap(array[first:])
    elif seg:
        if array.shape[0] != first + 1:
            raise brats.BratsError(where, f'{array.shape[0]} channels disagree with dataset.json "channels"')
        labelmap = array[first]
    vmax = np.iinfo(array.dtype).max
    out = []
    matrix = preprocess.resample_matrix(n, 0, n, side)
    for chan in array[:first]:
        x = chan.astype(np.float32)
        for axis in range(x.ndim):
            x = preprocess.resample_axis(x, axis, matrix)
        out.append(preprocess.quantize(np.clip(x / vmax, 0, 1), vmax, array.dtype))
    if seg:
        out.append(preprocess.resample_labels(labelmap, [0] * len(axes), n, side, axes=tuple(range(len(axes))))
                   .astype(array.dtype))
    return np.stack(out), n / side


def _rescaled_affine(affine, scale):
    """The affine of a cube resampled by 1/scale with pixel centres aligned: new voxel i is old (i + 0.5) * scale - 0.5."""
    m = np.diag([scale, scale, scale, 1.0])
    m[:3, 3] = 0.5 * scale - 0.5
    return (np.asarray(affine, np.float64) @ m).tolist()


def _resized_png(data, where, side, level):
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError) as e:
        raise brats.BratsError(where, f'cannot be read as an image ({e})') from None
    arr = _resize_image(img, side)
    kind = f'{"grey" if arr.ndim == 2 else f"{arr.shape[-1]}-channel"} {arr.dtype.itemsize * 8}-bit'
    if arr.ndim == 2:
        return archive.encode_png(arr, level), kind
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='png', compress_level=level)
    return buf.getvalue(), kind


def _rescaled_natives(meta, out, side):
    """A volume archive's native_grids for cubes of `side` (each record's output size; the crop, padding and cube
    stay), for the cases kept; {} for other archives."""
    if meta.get('kind') != 'volumes' or not meta.get('native_grids'):
        return {}
    kept = set((out.get('file_cases') or {}).values()) or set(meta['native_grids'])
    return {cid: dict(record, size=int(side)) for cid, record in meta['native_grids'].items() if cid in kept}


def _output_meta(meta, project, labels, relpaths, affines, seg, source, side, opts):
    """dataset.json of the output: a project archive keeps its metadata, with file names mapped and the new size."""
    if not project:
        return {'labels': labels, 'source': {'path': str(source), 'tool': 'dataset_tool.py', 'resolution': side,
                                             'type': 'image-folder'}}
    out = {k: meta[k] for k in _KEPT_KEYS if k in meta}
    out['labels'] = labels
    if meta.get('file_cases'):
        out['file_cases'] = {relpaths[n]: meta['file_cases'][n] for n in relpaths if n in meta['file_cases']}
        kept = set(out['file_cases'].values())
        if 'cases' in out:
            out['cases'] = {c: s for c, s in out['cases'].items() if c in kept}
    if affines:
        out['affines'] = affines
    natives = _rescaled_natives(meta, out, side)
    if natives:  # generated volumes keep their place in the scanner (generate.py --native-grid, NIfTI affines)
        out['native_grids'] = natives
        out['space'] = volume_space.archive_space(natives)
    if seg:
        out['seg_storage'] = SEG_STORAGE
    out['resolution'] = side
    if any(r.endswith('.npy') for r in relpaths.values()):
        out['codec'] = archive.codec_record(opts.codec, opts.compress_level)  # of the .npy members
    out['source'] = {'type': 'archive', 'path': str(source), 'tool': 'dataset_tool.py', 'resolution': side,
                     'compress_level': opts.compress_level, 'original': meta.get('source')}
    return out


def _resize_image(img, resolution):
    """Centre-crop to a square and resize to resolution^2; returns uint8 (H, W[, C]) or uint16 (H, W)."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        # 16-bit grayscale: resize in float so that no precision is lost to an 8-bit round trip
        arr = np.asarray(img, dtype=np.float32)
        out = np.asarray(Image.fromarray(arr, mode='F').resize((resolution, resolution), Image.LANCZOS))
        return np.clip(np.round(out), 0, 65535).astype(np.uint16)
    if img.mode not in ('L', 'LA', 'RGB', 'RGBA'):
        img = img.convert('RGBA' if 'A' in img.getbands() else 'RGB')
    if img.mode == 'LA':
        img = img.convert('RGBA')  # PNG writers handle L+alpha poorly; keep the alpha channel as data
    return np.asarray(img.resize((resolution, resolution), Image.LANCZOS))
