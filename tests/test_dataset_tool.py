"""dataset_tool.py / mri.sources.convert: the real BraTS case, synthetic cases, image folders, labels, splits, sources."""

import hashlib
import http.server
import io
import json
import os
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

import dataset_tool
from mri.sources import archive, brats, download, preprocess
from mri.output.nifti import save_volume_nifti
from mri.seg import decode_seg, encode_seg
from training.dataset import read_npy_member

REAL = Path(__file__).resolve().parents[1].parent / 'shared/data/brats'
REAL_CASE = REAL / 'BraTS-GLI-00000-000'
needs_real = pytest.mark.skipif(not REAL_CASE.is_dir(), reason=f'{REAL_CASE} not available')

# ---------------------------------------------------------------------------------------------------------------
# helpers


def run_tool(*args, env=None):
    r = CliRunner().invoke(dataset_tool.main, ['--no-progress', *map(str, args)], env=env)
    return r


def ok(*args, **kwargs):
    r = run_tool(*args, **kwargs)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def read_archive(path):
    """{relpath: bytes} and dataset.json of a zip or folder archive."""
    path = Path(path)
    if path.suffix == '.zip':
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist()}
    else:
        files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob('*') if p.is_file()}
    return files, json.loads(files.pop('dataset.json'))


def png(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def npy(data):
    return read_npy_member(io.BytesIO(data), len(data))  # any form of .npy member (blosc2 by default)


def onehot(x):
    """The stored array of a labelmap archive (last channel = labels 0-3) with the three one-hot seg channels in
    [-1, 1] floats after the other channels, as the networks see them."""
    return np.concatenate([x[:-1] / 65535.0 * 2 - 1, encode_seg(x[-1], 1.0) * 2 - 1])


def synthetic_case(seed=0, shape=(20, 24, 16), label_et=3):
    rng = np.random.RandomState(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    brain = (grid ** 2).sum(0) < 0.8
    arrays = {m: np.where(brain, 100 * (k + 1) + rng.randint(0, 400, shape), 0).astype(np.int16)
              for k, m in enumerate(brats.MODALITIES)}
    seg = np.zeros(shape, np.uint8)
    seg[8:12, 9:13, 6:9] = 2
    seg[9:11, 10:12, 7:8] = 1
    seg[11, 12, 8] = label_et
    arrays['seg'] = seg
    return arrays


def write_case(folder, case_id, naming='2023', ext='.nii.gz', seed=0, affine=None):
    arrays = synthetic_case(seed, label_et=4 if naming == '2021' else 3)
    names = ({'t1n': '-t1n', 't1c': '-t1c', 't2w': '-t2w', 't2f': '-t2f', 'seg': '-seg'} if naming == '2023' else
             {'t1n': '_t1', 't1c': '_t1ce', 't2w': '_t2', 't2f': '_flair', 'seg': '_seg'})
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine
    os.makedirs(folder, exist_ok=True)
    for m, arr in arrays.items():
        nib.save(nib.Nifti1Image(arr, affine), os.path.join(folder, f'{case_id}{names[m]}{ext}'))
    return arrays


def canonical_reference(case_dir, case_id):
    """Independent reference with plain nibabel: canonical arrays, brain crop box, cube side."""
    imgs = {m: nib.as_closest_canonical(nib.load(str(case_dir / f'{case_id}-{m}.nii.gz')))
            for m in (*brats.MODALITIES, 'seg')}
    arrays = {m: np.asarray(i.dataobj) for m, i in imgs.items()}
    mask = np.any([arrays[m] != 0 for m in brats.MODALITIES], axis=0)
    box = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[[0, -1]] for ax in range(3)]
    size = max(b - a + 1 for a, b in box)
    return imgs, arrays, mask, box, size


# ---------------------------------------------------------------------------------------------------------------
# the real case


@pytest.fixture(scope='module')
def real_slices(tmp_path_factory):
    if not REAL_CASE.is_dir():
        pytest.skip(f'{REAL_CASE} not available')
    dest = tmp_path_factory.mktemp('real') / 'slices.zip'
    ok('--source', REAL, '--dest', dest, '--resolution', 256)
    return read_archive(dest)


@needs_real
def test_real_slices_labels_counts_and_range(real_slices):
    files, meta = real_slices
    assert meta['label_names'] == ['axial', 'coronal', 'sagittal']
    assert meta['label_groups'] == [{'name': 'plane', 'values': ['axial', 'coronal', 'sagittal']}]
    assert meta['channels'] == ['t2w'] and meta['kind'] == 'slices'
    assert meta['normalization']['method'] == 'percentile' and meta['normalization']['bit_depth'] == 16
    assert meta['normalization']['low'] == 0.5 and meta['normalization']['high'] == 99.5
    assert set(files) == {rel for rel, _ in meta['labels']} == set(meta['file_cases'])
    assert meta['cases'] == {'BraTS-GLI-00000-000': 'train'}

    # Slices per plane: every canonical slice whose brain covers >= 10% of the square (S x S) slice.
    _, _, mask, box, size = canonical_reference(REAL_CASE, 'BraTS-GLI-00000-000')
    for plane, axis in preprocess.PLANE_AXIS.items():
        area = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        expected = int((area >= 0.1 * size * size).sum())
        vectors = [v for rel, v in meta['labels'] if f'/{plane}-' in rel]
        assert len(vectors) == expected > 50
        onehot = [1.0 if p == plane else 0.0 for p in ('axial', 'coronal', 'sagittal')]
        assert all(v == onehot for v in vectors)

    sample = png(files['BraTS-GLI-00000-000/axial-077.png'])
    assert sample.dtype == np.uint16 and sample.shape == (256, 256)
    stack = np.stack([png(files[rel]) for rel, _ in meta['labels'][::10]])
    assert stack.min() == 0 and stack.max() > 60000  # background at -1, brain up to +1, full 16-bit range


@needs_real
def test_real_tumour_is_where_the_seg_says(tmp_path):
    dest = tmp_path / 'seg.zip'
    ok('--source', REAL, '--dest', dest, '--resolution', 128, '--planes', 'axial', '--with-seg')
    files, meta = read_archive(dest)
    assert meta['channels'] == ['t2w', 'seg_netc', 'seg_snfh', 'seg_et']
    imgs, arrays, mask, box, size = canonical_reference(REAL_CASE, 'BraTS-GLI-00000-000')
    seg = arrays['seg'].astype(np.uint8)
    k = int(round(ndimage.center_of_mass(seg > 0)[2]))  # axial slice through the tumour centre
    x = npy(files[f'BraTS-GLI-00000-000/axial-{k:03d}.npy'])
    assert x.shape == (2, 128, 128) and x.dtype == np.uint16 and meta['seg_storage'] == 'labelmap'
    decoded = decode_seg(onehot(x)[1:])
    assert np.array_equal(decoded, x[1])

    # Reference: crop the canonical seg slice to the brain box, pad to the cube, nearest-resample with scipy.
    (x0, x1), (y0, y1), _ = box
    sl = seg[x0:x1 + 1, y0:y1 + 1, k]
    square = np.zeros((size, size), np.uint8)
    px, py = (size - sl.shape[0]) // 2, (size - sl.shape[1]) // 2
    square[px:px + sl.shape[0], py:py + sl.shape[1]] = sl
    ref = ndimage.zoom(square, 128 / size, order=0, grid_mode=True, mode='grid-constant')
    ref = ref[:, ::-1].T  # display orientation: rows anterior -> posterior, columns left -> right
    assert set(np.unique(ref)) == {0, 1, 2, 3}
    assert (decoded == ref).mean() > 0.995
    assert ((decoded > 0) == (ref > 0)).mean() > 0.995
    # The intensity channel is brain where the seg says tumour.
    assert (x[0][ref > 0] > 0).all()


@needs_real
def test_real_volume_64_affine_and_nifti(tmp_path):
    dest = tmp_path / 'vol'
    ok('--source', REAL, '--dest', dest, '--kind', 'volumes', '--volume-size', 64, '--modalities', 'all', '--with-seg')
    files, meta = read_archive(dest)
    rel = 'BraTS-GLI-00000-000/BraTS-GLI-00000-000.npy'
    assert list(files) == [rel] and meta['kind'] == 'volumes' and meta['label_names'] == []
    vol = npy(files[rel])
    assert vol.shape == (5, 64, 64, 64) and vol.dtype == np.uint16
    labels = vol[4]
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    affine = np.array(meta['affines'][rel])

    # The tumour centre in scanner mm agrees with the original seg's (voxels are ~2.7 mm here).
    orig = nib.load(str(REAL_CASE / 'BraTS-GLI-00000-000-seg.nii.gz'))
    com_orig = nib.affines.apply_affine(orig.affine, ndimage.center_of_mass(np.asarray(orig.dataobj) > 0))
    com_new = nib.affines.apply_affine(affine, ndimage.center_of_mass(labels > 0))
    assert np.abs(com_new - com_orig).max() < 2.0

    out = save_volume_nifti(tmp_path / 'v.nii.gz', vol[2:3], affine)
    back = nib.load(str(out))
    assert back.shape == (64, 64, 64) and np.allclose(back.affine, affine)
    assert np.array_equal(np.asarray(back.dataobj), vol[2])
    assert nib.aff2axcodes(back.affine) == ('R', 'A', 'S')


@needs_real
def test_real_lps_and_ras_give_identical_slices(tmp_path):
    ras = tmp_path / 'ras' / 'BraTS-GLI-00000-000'
    ras.mkdir(parents=True)
    for f in REAL_CASE.glob('*.nii.gz'):
        img = nib.load(str(f))
        assert nib.aff2axcodes(img.affine) == ('L', 'P', 'S')
        can = nib.as_closest_canonical(img)
        assert nib.aff2axcodes(can.affine) == ('R', 'A', 'S')
        nib.save(can, str(ras / f.name.replace('.nii.gz', '.nii')))  # also covers uncompressed .nii
    a, b = tmp_path / 'lps.zip', tmp_path / 'ras.zip'
    ok('--source', REAL, '--dest', a, '--resolution', 64)
    ok('--source', ras.parent, '--dest', b, '--resolution', 64)
    fa, ma = read_archive(a)
    fb, mb = read_archive(b)
    assert fa == fb and ma['labels'] == mb['labels']


# ---------------------------------------------------------------------------------------------------------------
# synthetic cases


def test_2021_naming_and_label_4(tmp_path):
    write_case(tmp_path / 'src' / 'BraTS2021_00001', 'BraTS2021_00001', naming='2021')
    cf, = brats.discover_cases(tmp_path / 'src')
    assert cf.naming == '2021' and set(cf.files) == set(brats.MODALITIES)
    case = brats.load_case(cf, load_seg=True)
    assert set(np.unique(case.seg)) == {0, 1, 2, 3} and case.seg[11, 12, 8] == 3
    dest = tmp_path / 'v.zip'
    ok('--source', tmp_path / 'src', '--dest', dest, '--kind', 'volumes', '--volume-size', 24, '--with-seg')
    files, meta = read_archive(dest)
    vol = npy(files['BraTS2021_00001/BraTS2021_00001.npy'])
    assert set(np.unique(vol[1])) == {0, 1, 2, 3}
    assert meta['source']['naming'] == ['2021']


def test_flat_folder_and_nii(tmp_path):
    for k in range(3):
        write_case(tmp_path / 'flat', f'C-{k:03d}', ext='.nii', seed=k)
    assert [c.case_id for c in brats.discover_cases(tmp_path / 'flat')] == ['C-000', 'C-001', 'C-002']
    dest = tmp_path / 'a.zip'
    ok('--source', tmp_path / 'flat', '--dest', dest, '--resolution', 16)
    files, meta = read_archive(dest)
    assert sorted(meta['cases']) == ['C-000', 'C-001', 'C-002']
    assert sorted({meta['file_cases'][r] for r in files}) == ['C-000', 'C-001', 'C-002']


def test_split_is_case_level_and_seeded(tmp_path):
    for k in range(10):
        write_case(tmp_path / 'src' / f'C-{k:03d}', f'C-{k:03d}', seed=k)
    metas = []
    for seed in (0, 0, 1):
        dest = tmp_path / f'split-{len(metas)}.zip'
        r = ok('--source', tmp_path / 'src', '--dest', dest, '--resolution', 16, '--planes', 'axial',
               '--split', 'val=0.2', '--split-seed', seed)
        assert 'val 2 cases' in r.output
        metas.append(read_archive(dest)[1])
    assert metas[0]['cases'] == metas[1]['cases'] != metas[2]['cases']
    cases = metas[0]['cases']
    assert sorted(cases.values()).count('val') == 2 and len(cases) == 10
    assert all(cases[cid] in ('train', 'val') for cid in metas[0]['file_cases'].values())


def test_labels_modality(tmp_path):
    write_case(tmp_path / 'src', 'C-001')
    dest = tmp_path / 'm.zip'
    ok('--source', tmp_path / 'src', '--dest', dest, '--resolution', 16, '--modalities', 't1c,t2f',
       '--labels', 'modality', '--planes', 'axial,sagittal')
    files, meta = read_archive(dest)
    assert meta['label_names'] == ['axial', 'sagittal', 't1c', 't2f']
    assert [g['name'] for g in meta['label_groups']] == ['plane', 'modality']
    assert meta['channels'] == ['modality']
    by_name = dict(meta['labels'])
    t1c = [r for r in by_name if '/t1c-' in r]
    assert len(t1c) == len(by_name) // 2 > 0
    assert all(by_name[r][2:] == [1.0, 0.0] for r in t1c)
    assert all(png(files[r]).ndim == 2 for r in t1c)


def test_labels_tumour_agree_with_seg(tmp_path):
    write_case(tmp_path / 'src', 'C-001')
    dest = tmp_path / 't.zip'
    ok('--source', tmp_path / 'src', '--dest', dest, '--resolution', 16, '--labels', 'tumour', '--with-seg')
    files, meta = read_archive(dest)
    assert meta['label_names'][3:] == ['tumour', 'no_tumour']
    seen = set()
    for rel, vec in meta['labels']:
        has = npy(files[rel])[1].any()
        assert vec[3:] == ([1.0, 0.0] if has else [0.0, 1.0])
        seen.add(has)
    assert seen == {True, False}


def test_labels_csv(tmp_path):
    for k in range(3):
        write_case(tmp_path / 'src' / f'C-{k}', f'C-{k}', seed=k)
    table = tmp_path / 'meta.csv'
    table.write_text('case_id,site,enhancing\nC-0,lagos,yes\nC-1,accra,no\nC-2,lagos,no\n')
    other = tmp_path / 'more.csv'
    other.write_text('case_id,treated\nC-0,yes\nC-1,yes\nC-2,no\n')
    dest = tmp_path / 'c.zip'
    ok('--source', tmp_path / 'src', '--dest', dest, '--resolution', 16, '--planes', 'coronal',
       '--labels', table, '--labels', other)
    files, meta = read_archive(dest)
    assert [g['name'] for g in meta['label_groups']] == ['plane', 'site', 'enhancing', 'treated']
    # 'yes'/'no' occur in two columns, so the second one is qualified to keep label_names unique
    assert meta['label_names'] == ['coronal', 'accra', 'lagos', 'no', 'yes', 'treated=no', 'treated=yes']
    for rel, vec in meta['labels']:
        cid = meta['file_cases'][rel]
        expected = {'C-0': [0, 1, 0, 1, 0, 1], 'C-1': [1, 0, 1, 0, 0, 1], 'C-2': [0, 1, 1, 0, 1, 0]}[cid]
        assert vec == [1.0] + [float(v) for v in expected]


def test_bit_depth_8_and_folder_dest(tmp_path):
    write_case(tmp_path / 'src', 'C-001')
    dest = tmp_path / 'eight'
    ok('--source', tmp_path / 'src', '--dest', dest, '--resolution', 32, '--bit-depth', 8, '--planes', 'axial')
    files, meta = read_archive(dest)
    assert meta['normalization']['bit_depth'] == 8
    imgs = [Image.open(io.BytesIO(d)) for d in files.values()]
    assert all(i.mode == 'L' and i.size == (32, 32) for i in imgs)
    assert 200 < max(np.asarray(i).max() for i in imgs) <= 255 and min(np.asarray(i).min() for i in imgs) == 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]


def test_minmax_denoise_and_max_cases(tmp_path):
    for k in range(3):
        write_case(tmp_path / 'src' / f'C-{k}', f'C-{k}', seed=k)
    dest = tmp_path / 'n.zip'
    ok('--source', tmp_path / 'src', '--dest', dest, '--kind', 'volumes', '--volume-size', 20, '--normalize', 'minmax',
       '--denoise', 0.7, '--max-cases', 2)
    files, meta = read_archive(dest)
    assert sorted(meta['cases']) == ['C-0', 'C-1']
    norm = meta['normalization']
    assert norm['method'] == 'minmax' and norm['denoise'] == 0.7 and norm['range'] == [-1, 1]


def test_preprocess_normalisation_and_resampling_units():
    values = np.arange(1, 1001, dtype=np.int16)
    assert preprocess.robust_range(values, 'percentile', 0.5, 99.5) == (5.0, 995.0)
    assert preprocess.robust_range(values.astype(np.float32), 'percentile', 0.5, 99.5) == (5.0, 995.0)
    assert preprocess.robust_range(values, 'minmax') == (1.0, 1000.0)
    # Upsampling a constant line keeps it constant inside; downsampling with the prefilter preserves the mean.
    up = preprocess.resample_matrix(10, 0, 10, 25, True).toarray()
    assert np.allclose(up[2:-2].sum(1), 1)
    x = np.random.RandomState(0).rand(64).astype(np.float32)
    down = preprocess.resample_matrix(64, 0, 64, 16, True) @ x
    assert abs(down[2:-2].mean() - x[8:-8].mean()) < 0.05
    # Aliasing: a Nyquist-frequency stripe pattern averages out instead of surviving as a false pattern.
    stripes = np.tile([0.0, 1.0], 32).astype(np.float32)
    assert np.ptp((preprocess.resample_matrix(64, 0, 64, 20, True) @ stripes)[3:-3]) < 0.05


def test_seg_encode_decode_exact():
    labels = np.random.RandomState(0).randint(0, 4, (5, 6, 7))
    enc = encode_seg(labels, 65535, np.uint16)
    assert enc.shape == (3, 5, 6, 7) and enc.dtype == np.uint16
    assert np.array_equal(decode_seg(enc / 65535.0 * 2 - 1), labels)
    import torch
    t = torch.from_numpy(encode_seg(labels, 1.0) * 2 - 1)[None]
    assert torch.equal(decode_seg(t, axis=1)[0], torch.from_numpy(labels))


def test_save_volume_nifti_multichannel(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    vol = np.random.RandomState(0).rand(3, 4, 5, 6).astype(np.float32)
    img = nib.load(str(save_volume_nifti(tmp_path / 'x.nii', vol, affine)))
    # A vector image as 3D Slicer / ITK read it: channels in dim[5] with NIFTI_INTENT_VECTOR, dim[4] (time) = 1.
    assert img.shape == (4, 5, 6, 1, 3) and np.allclose(img.affine, affine)
    assert img.header.get_intent()[0] == 'vector' and int(img.header['intent_code']) == 1007
    assert img.header['dim'][4] == 1 and img.header['dim'][5] == 3
    assert np.allclose(np.moveaxis(np.asarray(img.dataobj)[:, :, :, 0], -1, 0), vol)


def test_png_encoder_roundtrip():
    rng = np.random.RandomState(0)
    for level in (0, 1, 6):
        a = rng.randint(0, 65536, (3, 9, 11)).astype(np.uint16)
        for i, data in enumerate(archive.encode_pngs(a, 16, level)):
            im = Image.open(io.BytesIO(data))
            assert im.mode == 'I;16' and np.array_equal(np.asarray(im), a[i])
        b = rng.randint(0, 256, (2, 9, 11)).astype(np.uint8)
        assert np.array_equal(png(archive.encode_pngs(b, 8, level)[1]), b[1])


# ---------------------------------------------------------------------------------------------------------------
# other sources


def test_stylegan_image_folder(tmp_path):
    src = tmp_path / 'imgs'
    src.mkdir()
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(src / 'a.png')
    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(src / 'b.jpg')
    (src / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 1], ['b.jpg', 0]]}))
    dest = tmp_path / 'out.zip'
    ok('--source', src, '--dest', dest, '--resolution', 16)
    files, meta = read_archive(dest)
    assert [lab for _, lab in meta['labels']] == [1, 0]
    arrays = [png(files[rel]) for rel, _ in meta['labels']]
    assert arrays[0].shape == (16, 16, 3) and arrays[1].shape == (16, 16, 3)
    # 16-bit grey PNGs keep their depth (one kind per archive: mixed kinds are refused, test_data_edge_cases)
    grey = tmp_path / 'grey16'
    grey.mkdir()
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(grey / 'c.png')
    ok('--source', grey, '--dest', tmp_path / 'out16.zip', '--resolution', 16)
    files16, _ = read_archive(tmp_path / 'out16.zip')
    (only,) = files16.values()
    assert png(only).dtype == np.uint16 and abs(int(png(only)[8, 8]) - 40000) <= 1
    # ... and from a zip, without labels
    zsrc = tmp_path / 'imgs.zip'
    with zipfile.ZipFile(zsrc, 'w') as z:
        z.write(src / 'a.png', 'x/a.png')
    ok('--source', zsrc, '--dest', tmp_path / 'out2.zip', '--resolution', 8)
    files, meta = read_archive(tmp_path / 'out2.zip')
    assert meta['labels'] is None and len(files) == 1


def test_brats_africa_message_without_root(tmp_path):
    env = {download.ENV_VAR: None, 'MRI_GAN_CACHE': str(tmp_path / 'cache')}
    r = run_tool('--source', 'brats-africa', '--dest', tmp_path / 'a.zip', env=env)
    assert r.exit_code != 0 and 'Traceback' not in r.output
    line, = [l for l in r.output.splitlines() if l.startswith('Error:')]
    for fragment in ('--brats-root', 'BRATS_AFRICA_DIR', 'TCIA', '10.7937/v8h6-8x67', 'CC BY 4.0', '95 glioma',
                     '51 other neoplasm', 'BraTS-SSA-XXXXX-000', '--download'):
        assert fragment in line, fragment
    assert not (tmp_path / 'a.zip').exists()


def test_brats_africa_root_env_and_download(tmp_path, monkeypatch):
    write_case(tmp_path / 'africa' / 'BraTS-SSA-00002-000', 'BraTS-SSA-00002-000')
    monkeypatch.setenv(download.ENV_VAR, str(tmp_path / 'africa'))
    ok('--source', 'brats-africa', '--dest', tmp_path / 'a.zip', '--resolution', 16, '--planes', 'axial')
    assert read_archive(tmp_path / 'a.zip')[1]['source']['type'] == 'brats-africa'
    # --download: a zip of the collection, checked against its sha256 and extracted into --brats-root
    pack = tmp_path / 'BraTS-Africa.zip'
    with zipfile.ZipFile(pack, 'w') as z:
        for f in (tmp_path / 'africa').rglob('*.nii.gz'):
            z.write(f, f.relative_to(tmp_path / 'africa').as_posix())
    digest = hashlib.sha256(pack.read_bytes()).hexdigest()
    root = tmp_path / 'fetched'
    bad = run_tool('--source', 'brats-africa', '--brats-root', root, '--download', pack.as_uri(), '--sha256', '0' * 64,
                   '--dest', tmp_path / 'b.zip')
    assert bad.exit_code != 0 and 'sha256 mismatch' in bad.output and not (tmp_path / 'b.zip').exists()
    ok('--source', 'brats-africa', '--brats-root', root, '--download', pack.as_uri(), '--sha256', digest,
       '--dest', tmp_path / 'b.zip', '--resolution', 16, '--planes', 'axial')
    assert (root / 'BraTS-SSA-00002-000' / 'BraTS-SSA-00002-000-t1n.nii.gz').is_file()
    assert read_archive(tmp_path / 'b.zip')[0].keys() == read_archive(tmp_path / 'a.zip')[0].keys()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b''
    seen_ranges = []

    def do_GET(self):
        start = 0
        rng = self.headers.get('Range')
        self.seen_ranges.append(rng)
        if rng:
            start = int(rng.split('=')[1].split('-')[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_with_range(tmp_path, monkeypatch):
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')  # a CI proxy must not intercept the local server
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    payload = os.urandom(50000)
    _RangeHandler.payload, _RangeHandler.seen_ranges = payload, []
    server = http.server.HTTPServer(('127.0.0.1', 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        folder = tmp_path / 'dl'
        folder.mkdir()
        (folder / 'pack.zip.part').write_bytes(payload[:12345])  # an interrupted earlier download
        url = f'http://127.0.0.1:{server.server_address[1]}/pack.zip'
        path = download.fetch(url, folder, sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    finally:
        server.shutdown()
    assert path.read_bytes() == payload
    assert _RangeHandler.seen_ranges == ['bytes=12345-']
    assert not (folder / 'pack.zip.part').exists()


def test_phantom_source(tmp_path):
    pytest.importorskip('mri.sources.phantom')
    dest = tmp_path / 'p.zip'
    ok('--source', 'phantom', '--phantom-cases', 1, '--dest', dest, '--kind', 'volumes', '--volume-size', 32,
       '--with-seg', '--seed', 3)
    files, meta = read_archive(dest)
    assert meta['source']['type'] == 'phantom' and len(files) == 1
    vol = npy(next(iter(files.values())))
    assert vol.shape == (2, 32, 32, 32) and vol[1].any()


def test_workers_give_the_same_archive(tmp_path):
    for k in range(3):
        write_case(tmp_path / 'src' / f'C-{k}', f'C-{k}', seed=k)
    one, two = tmp_path / 'one.zip', tmp_path / 'two.zip'
    ok('--source', tmp_path / 'src', '--dest', one, '--resolution', 16, '--compress-level', 1)
    ok('--source', tmp_path / 'src', '--dest', two, '--resolution', 16, '--compress-level', 1, '--workers', 2)
    assert one.read_bytes() == two.read_bytes()  # deterministic, whatever the worker count
    assert sorted(os.listdir(tmp_path)) == ['one.zip', 'src', 'two.zip']  # no spool or temp files left


def test_progress_and_summary(tmp_path):
    write_case(tmp_path / 'src', 'C-001')
    r = CliRunner().invoke(dataset_tool.main, ['--source', str(tmp_path / 'src'), '--dest', str(tmp_path / 'a.zip'),
                                               '--resolution', 16])
    assert r.exit_code == 0, r.output
    assert '1/1 cases' in r.output and 'cases/s' in r.output and 'left' in r.output  # the status line
    assert 'wrote' in r.output and 'axial:' in r.output and 'brain slices skipped' in r.output  # the summary


def test_fast_gzip_reader_matches_nibabel(tmp_path):
    files = sorted(REAL_CASE.glob('*.nii.gz')) if REAL_CASE.is_dir() else []
    # plus synthetic files: float, big-endian, scaled (which falls back to nibabel), uncompressed
    arr = np.random.RandomState(0).rand(5, 6, 7).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / 'f.nii.gz'))
    nib.save(nib.Nifti1Image(arr.astype('>i2'), np.eye(4)), str(tmp_path / 'be.nii.gz'))
    scaled = nib.Nifti1Image((arr * 100).astype(np.int16), np.eye(4))
    scaled.header.set_slope_inter(2.0, 1.0)
    nib.save(scaled, str(tmp_path / 's.nii.gz'))
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / 'u.nii'))
    files += sorted(tmp_path.glob('*.nii*'))
    for f in files:
        data, affine = brats._read(f, 'x')
        ref = nib.load(str(f))
        expected = np.asarray(ref.dataobj)
        assert data.dtype == expected.dtype and data.shape == expected.shape, f
        assert np.array_equal(data, expected) and np.array_equal(affine, ref.affine), f


def test_archives_load_with_training_dataset(tmp_path):
    dataset = pytest.importorskip('training.dataset')
    for k in range(4):
        write_case(tmp_path / 'src' / f'C-{k}', f'C-{k}', seed=k)
    slices, vols = tmp_path / 's.zip', tmp_path / 'v'
    ok('--source', tmp_path / 'src', '--dest', slices, '--resolution', 16, '--labels', 'tumour', '--split', 'val=0.25')
    ok('--source', tmp_path / 'src', '--dest', vols, '--kind', 'volumes', '--volume-size', 8, '--with-seg')
    d = dataset.ImageFolderDataset(str(slices), use_labels=True)
    img, label = d[0]
    assert img.shape == (1, 16, 16) and img.dtype == np.uint16 and d.dtype_max == 65535
    assert d.label_names == ['axial', 'coronal', 'sagittal', 'tumour', 'no_tumour'] and label.shape == (5,)
    assert d.channels == ['t2w'] and d.kind == 'slices' and d.normalization['bit_depth'] == 16
    val = dataset.ImageFolderDataset(str(slices), subset='val')
    assert 0 < len(val) < len(d)
    v = dataset.ImageFolderDataset(str(vols))
    assert v[0][0].shape == (4, 8, 8, 8) and v.channels == ['t2w', 'seg_netc', 'seg_snfh', 'seg_et']
    assert len(v.affines) == 4


def test_dest_may_not_be_contain_or_sit_inside_the_source(tmp_path):
    """--dest DIR --overwrite once replaced the source folder by the archive (every NIfTI lost); a --dest above the
    source took unrelated files with it. Now: one line, exit 1, every file where it was."""
    src = tmp_path / 'data' / 'cases'
    write_case(src / 'BraTS-GLI-00001-000', 'BraTS-GLI-00001-000')
    (tmp_path / 'data' / 'notes.txt').write_text('keep me')
    before = sorted(p for p in tmp_path.rglob('*'))
    for dest, where in [(src, 'is'), (tmp_path / 'data', 'contains'), (src / 'out.zip', 'sits inside'),
                        (src / 'BraTS-GLI-00001-000', 'sits inside')]:
        r = run_tool('--source', src, '--dest', dest, '--overwrite', '--resolution', 16)
        assert r.exit_code == 1 and f'--dest {where} --source' in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert sorted(p for p in tmp_path.rglob('*')) == before
    assert (tmp_path / 'data' / 'notes.txt').read_text() == 'keep me'
    ok('--source', src, '--dest', tmp_path / 'elsewhere.zip', '--resolution', 16)


@pytest.mark.parametrize('args', [['--kind', 'volumes', '--volume-size', '100'],
                                  ['--kind', 'patches', '--patch-size', '100,100,100']])
def test_volume_sides_the_trainer_cannot_use_are_refused_up_front(tmp_path, args):
    """--volume-size 100 once converted, then training refused the shape (slices refuse --resolution 48 up front)."""
    r = run_tool('--source', 'phantom', '--phantom-cases', 1, '--dest', tmp_path / 'a.zip', *args)
    assert r.exit_code == 2 and 'not a base shape' in r.output and 'train.py could not use them' in r.output, r.output
    assert not (tmp_path / 'a.zip').exists()
