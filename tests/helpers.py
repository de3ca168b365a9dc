"""Shared test helpers: tiny datasets and tiny network configs (kept small for 2-core CI)."""

import json
import os
import zipfile

import numpy as np
import PIL.Image

SHARED_BRATS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data', 'brats')


def make_png_folder(root, n=16, res=32, num_classes=2, bit16=False, channels=1, labels='int', seed=0, with_split=False):
    """A StyleGAN2-ADA-style folder of PNGs with dataset.json labels; class k is brighter toward the top."""
    rnd = np.random.RandomState(seed)
    os.makedirs(root, exist_ok=True)
    vmax = 65535 if bit16 else 255
    entries = []
    file_cases = {}
    for i in range(n):
        cls = i % num_classes
        yy = np.linspace(0, 1, res)[:, None] * np.ones([1, res])
        img = (yy if cls == 0 else 1 - yy) * 0.7 + 0.3 * rnd.rand(res, res)
        arr = np.rint(img * vmax).astype(np.uint16 if bit16 else np.uint8)
        name = f'img{i:04d}.png'
        if channels == 1:
            PIL.Image.fromarray(arr).save(os.path.join(root, name))
        elif channels == 3 and not bit16:
            PIL.Image.fromarray(np.stack([arr] * 3, axis=2)).save(os.path.join(root, name))
        else:
            name = f'img{i:04d}.npy'
            np.save(os.path.join(root, name), np.stack([arr] * channels))
        entries.append([name, cls if labels == 'int' else [float(cls == k) for k in range(num_classes)]])
        file_cases[name] = f'case{i % 4}'
    meta = {'labels': entries}
    if labels == 'groups':
        meta['label_names'] = ['axial', 'coronal'][:num_classes]
        meta['label_groups'] = [{'name': 'plane', 'values': meta['label_names']}]
    if with_split:
        meta['cases'] = {'case0': 'val', 'case1': 'train', 'case2': 'train', 'case3': 'train'}
        meta['file_cases'] = file_cases
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump(meta, f)
    return root


def zip_folder(folder, zip_path):
    with zipfile.ZipFile(zip_path, 'w', compression=zipfile.ZIP_STORED) as z:
        for name in sorted(os.listdir(folder)):
            z.write(os.path.join(folder, name), name)
    return zip_path


# The default --workers (3, at most the usable cores): test_joint_generation trains on a zip, where `--workers 0` once
# hid a crash.
TINY_TRAIN_ARGS = ['--cbase', '1024', '--cmax', '64', '--map-depth', '2', '--batch', '8', '--metrics', 'none',
                   '--device', 'cpu']


def make_patch_archive(root, cases=3, patch_size='16,16', seed=2):
    """A tumour-painting patch archive (dataset_tool.py --kind patches, axial crops for 2D, with the cohort label)
    of tiny phantom cases (a whole brain at ~6 mm, with its tumour) under ``root``; returns the zip's path."""
    from click.testing import CliRunner
    import dataset_tool
    from mri.sources.phantom import write_phantom_cases
    write_phantom_cases(os.path.join(root, 'cases'), cases, seed=seed, shape=(40, 40, 28), progress=False)
    dest = os.path.join(root, 'patches.zip')
    result = CliRunner().invoke(dataset_tool.main, [
        '--source', os.path.join(root, 'cases'), '--dest', dest, '--kind', 'patches', '--patch-size', patch_size,
        '--planes', 'axial', '--patches-per-case', '2', '--labels', 'cohort', '--no-progress'])
    assert result.exit_code == 0, result.output
    return dest


def blob_labels(shape, centre, radius):
    """A tumour label map of `shape` with a ball at `centre`: SNFH (2) outside, an ET (3) ring, NETC (1) inside."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing='ij')
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
    labels = np.zeros(shape, np.uint8)
    labels[dist < radius] = 2
    labels[dist < radius * 0.65] = 3
    labels[dist < radius * 0.3] = 1
    return labels
