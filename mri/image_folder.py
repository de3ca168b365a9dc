"""StyleGAN2-ADA image folders and zips -> a resized archive, as NVlabs' dataset_tool converted them.

The StyleGAN2-ADA dataset format (Karras et al., "Training Generative Adversarial Networks with Limited Data",
NeurIPS 2020): PNG/JPG images in a folder or zip, with an optional `dataset.json` {"labels": [[name, label], ...]}.
Each image is centre-cropped to a square and resized to the output resolution (Lanczos), keeping its channels and
its bit depth; labels are kept as given. Used by dataset_tool.py when --source is such a folder or zip.
"""

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

import dnnlib
from mri import archive, brats


IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


def is_image_source(source):
    """True for a zip, or a folder with images and no NIfTI files."""
    source = Path(source)
    if source.is_file():
        return source.suffix.lower() == '.zip'
    if not source.is_dir():
        return False
    has_images = False
    for p in source.rglob('*'):
        if brats.is_nifti(p):
            return False
        has_images = has_images or p.suffix.lower() in IMAGE_EXTS
    return has_images


def _open_image_source(source):
    """Returns (sorted image names, read(name) -> bytes, dataset.json dict or None)."""
    source = Path(source)
    if source.is_file():
        try:
            z = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError) as e:
            raise brats.BratsError(source, f'cannot be read as a zip ({e})') from None
        names = set(z.namelist())
        read = z.read
    else:
        names = {p.relative_to(source).as_posix() for p in source.rglob('*') if p.is_file()}
        read = lambda name: (source / name).read_bytes()  # noqa: E731
    meta = None
    if 'dataset.json' in names:
        try:
            meta = json.loads(read('dataset.json'))
        except ValueError as e:
            raise brats.BratsError(f'{source}/dataset.json', f'invalid JSON ({e})') from None
    images = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTS)
    if not images:
        raise brats.BratsError(source, f'no images ({", ".join(IMAGE_EXTS)}) found')
    return images, read, meta


def convert_image_folder(
    source,                 # folder or zip of images in the StyleGAN2-ADA layout
    dest,                   # .zip or folder
    resolution=256,         # output side; images are centre-cropped to a square and resized (Lanczos)
    max_images=None,
    compress_level=0,
    progress=True,
):
    """Resizes every image to resolution^2 keeping its channels and bit depth, and keeps the labels as given."""
    images, read, meta = _open_image_source(source)
    if max_images is not None:
        images = images[:max_images]
    given = dict((k, v) for k, v in (meta or {}).get('labels') or [])
    labels = [] if given else None
    bar = dnnlib.ProgressBar(len(images), unit='images', enabled=progress)
    t0 = time.time()
    with archive.ArchiveWriter(dest) as writer:
        for i, name in enumerate(images):
            try:
                img = Image.open(io.BytesIO(read(name)))
                img.load()
            except (OSError, ValueError) as e:
                raise brats.BratsError(f'{source}/{name}', f'cannot be read as an image ({e})') from None
            arr = _resize_image(img, resolution)
            relpath = f'{i // 1000:05d}/img{i:08d}.png'
            if arr.ndim == 2:
                data = archive.encode_png(arr, compress_level)
            else:
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format='png', compress_level=compress_level)
                data = buf.getvalue()
            writer.add(relpath, data)
            if labels is not None:
                if name not in given:
                    raise brats.BratsError(f'{source}/dataset.json', f'no label for {name}')
                labels.append([relpath, given[name]])
            bar.update(done=i + 1)
        bar.close()
        writer.commit({'labels': labels, 'source': {'path': str(source), 'tool': 'dataset_tool.py',
                                                    'resolution': resolution, 'type': 'image-folder'}})
    return {'dest': str(dest), 'cases': 0, 'images': len(images), 'counts': {'images': len(images)},
            'skipped_slices': {}, 'skipped_cases': [], 'skipped_json': '', 'split': {},
            'seconds': time.time() - t0, 'min_brain_fraction': 0, 'kind': 'images'}


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
