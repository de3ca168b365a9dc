"""mri.sources.patches and dataset_tool.py --kind patches: native cases, crop / paste, patch archives (issue 18)."""

import io
import json
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
from mri.seg import SEG_CHANNELS, encode_seg
from mri.sources import brats, patches, preprocess
from training.dataset import read_npy_member
from mri.sources.phantom import write_phantom_cases
from training.dataset import ImageFolderDataset

SHAPE = (40, 40, 28)  # tiny phantom cases: a whole brain at ~6 mm, with its tumour


@pytest.fixture(scope='module')
def phantom_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('phantom')
    write_phantom_cases(root, 2, seed=1, shape=SHAPE, progress=False)
    return root


# ---------------------------------------------------------------------------------------------------------------
# crop / paste


def test_crop_paste_round_trip_with_padding_at_the_border():
    a = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    for centre in [(2, 3, 3), (0, 0, 0), (4, 5, 6), (-3, 2, 9)]:
        p = patches.crop(a, centre, (4, 4, 4), fill=-1)
        assert p.shape == (2, 4, 4, 4) and p.dtype == a.dtype
        start = [c - 2 for c in centre]
        for idx in np.ndindex(4, 4, 4):
            src = tuple(s + i for s, i in zip(start, idx))
            inside = all(0 <= v < n for v, n in zip(src, a.shape[1:]))
            assert np.array_equal(p[(slice(None),) + idx], a[(slice(None),) + src] if inside else [-1, -1])
        back = np.full_like(a, -5)  # a value `a` does not hold
        patches.paste(back, p, centre)  # the padding lies outside: dropped
        inside = patches.crop(np.ones(a.shape[1:], bool), centre, (4, 4, 4), fill=False)
        assert np.array_equal(patches.crop(back, centre, (4, 4, 4), fill=-1)[:, inside], p[:, inside])
        assert (back == -5).sum() == back.size - 2 * inside.sum()
    # `where` writes only its voxels; 2D arrays too
    img = np.zeros((6, 6), np.uint8)
    where = np.zeros((3, 3), bool)
    where[1, 1] = where[0, 2] = True
    patches.paste(img, np.full((3, 3), 5, np.uint8), (0, 0), where)
    assert img.sum() == 5 and img[0, 0] == 5  # (0, 2) of the patch lies at row -1: outside, dropped
    with pytest.raises(ValueError, match='one entry per'):
        patches.crop(img, (1, 1, 1), (2, 2, 2), 0)


@pytest.mark.parametrize('plane', preprocess.PLANES)
def test_crop_slice_is_oriented_as_the_slice_archives(plane):
    a = np.random.RandomState(0).rand(5, 6, 7).astype(np.float32)
    axis = preprocess.PLANE_AXIS[plane]
    centre = [2, 3, 3]
    display = preprocess._to_display(np.moveaxis(a, axis, 0), plane)[centre[axis]]  # the whole slice as archived
    size = display.shape
    big = patches.crop_slice(a, centre, (size[0] + 4, size[1] + 4), plane, fill=-1)
    # the whole slice lies within the big crop, unflipped and untransposed, surrounded by padding
    hits = [(i, j) for i in range(5) for j in range(5)
            if np.array_equal(big[i:i + size[0], j:j + size[1]], display)]
    assert len(hits) == 1 and (big == -1).sum() == big.size - display.size
    back = np.zeros_like(a)
    patches.paste_slice(back, big, centre, plane, where=big != -1)
    assert np.array_equal(np.take(back, centre[axis], axis), np.take(a, centre[axis], axis))
    assert np.count_nonzero(back) == display.size


# ---------------------------------------------------------------------------------------------------------------
# native cases


def _flipped_copy(src_dir, dest_dir, case_id):
    """The case's files with the x and z axes of the array flipped and the affine changed to match (same anatomy,
    another voxel order): an (R, P, I)-style case that to_canonical must reorient."""
    dest_dir.mkdir(parents=True)
    for f in sorted(src_dir.glob('*.nii.gz')):
        img = nib.load(str(f))
        data = np.asarray(img.dataobj)[::-1, :, ::-1]
        flip = np.diag([-1.0, 1.0, -1.0, 1.0])
        flip[0, 3], flip[2, 3] = data.shape[0] - 1, data.shape[2] - 1
        out = nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip)
        nib.save(out, str(dest_dir / f.name))
    return brats.discover_cases(dest_dir.parent)[0]


def test_load_native_to_source_and_denormalise(phantom_dir, tmp_path):
    case_files = brats.discover_cases(phantom_dir)[0]
    native = patches.load_native(case_files)
    assert native.images.shape == (4,) + SHAPE and native.images.dtype == np.float32
    assert native.modalities == brats.MODALITIES and native.seg.dtype == np.uint8 and native.seg.any()
    assert native.images.min() == -1 and native.images.max() == 1 and (native.images[:, ~native.brain] == -1).all()
    assert nib.aff2axcodes(native.affine) == ('R', 'A', 'S')
    flipped = _flipped_copy(case_files.files['t1n'].parent, tmp_path / 'flip' / case_files.case_id, case_files.case_id)
    other = patches.load_native(flipped)
    assert nib.aff2axcodes(other.source.affine) != ('R', 'A', 'S')
    # the same anatomy on the same canonical grid, whatever the voxel order on disk
    assert np.array_equal(other.images, native.images) and np.array_equal(other.seg, native.seg)
    assert np.allclose(other.affine, native.affine)
    for nc in (native, other):
        assert np.array_equal(nc.to_source(nc.seg), nc.source.seg)
        assert np.array_equal(nc.to_source(nc.brain), preprocess.brain_mask(nc.source.images))
        both = nc.to_source(nc.images)
        for k, m in enumerate(nc.modalities):
            raw = nc.source.images[m].astype(np.float64)
            lo, hi = nc.ranges[m]
            brain = nc.to_source(nc.brain)
            unclipped = brain & (raw >= lo) & (raw <= hi)
            assert unclipped.sum() > 0.9 * brain.sum()
            assert np.allclose(nc.denormalise(k, both[k][unclipped]), raw[unclipped], atol=1e-3 * (hi - lo))


def test_load_native_empty_brain_and_subset_of_modalities(phantom_dir):
    case_files = brats.discover_cases(phantom_dir)[0]
    native = patches.load_native(case_files, modalities=('t2f', 't1c'), normalize='minmax')
    assert native.images.shape[0] == 2 and native.modalities == ('t2f', 't1c')
    case = brats.load_case(case_files, load_seg=True)
    empty = brats.Case(case.case_id, {m: np.zeros_like(v) for m, v in case.images.items()}, case.seg, case.affine,
                       case.files)
    with pytest.raises(brats.BratsError) as err:
        patches.load_native(empty)
    assert len(str(err.value).splitlines()) == 1 and str(case_files.files['t1n']) in str(err.value)
    assert 'empty' in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# patch archives (dataset_tool.py --kind patches)

CHANNELS = list(brats.MODALITIES) + ['brain'] + list(SEG_CHANNELS)


def tool(*args):
    return CliRunner().invoke(dataset_tool.main, ['--no-progress', *map(str, args)])


def ok(*args):
    r = tool(*args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def read_zip(path):
    with zipfile.ZipFile(path) as z:
        files = {n: read_npy_member(z.open(n), z.getinfo(n).file_size) for n in z.namelist() if n.endswith('.npy')}
        return files, json.loads(z.read('dataset.json'))


def copy_case(src_dir, dest_root, change=None):
    """A copy of the case folder under dest_root; `change(key, array) -> array` rewrites a file's voxels."""
    out = dest_root / src_dir.name
    shutil.copytree(src_dir, out)
    if change is not None:
        for f in sorted(out.glob('*.nii.gz')):
            key = f.name[len(src_dir.name) + 1:-len('.nii.gz')]
            img = nib.load(str(f))
            nib.save(nib.Nifti1Image(change(key, np.asarray(img.dataobj)), img.affine, img.header), str(f))
    return out


def check_patch(stack, info, size, native):
    """A stored patch against its record and the native case: the crop at its centre, quantised as stored."""
    vmax = 65535
    centre, plane = info['centre'], info.get('plane')
    if plane is None:
        images = patches.crop(native.images, centre, size, -1.0)
        brain = patches.crop(native.brain, centre, size, False)
        seg = patches.crop(native.seg, centre, size, 0)
    else:
        images = patches.crop_slice(native.images, centre, size, plane, -1.0)
        brain = patches.crop_slice(native.brain, centre, size, plane, False)
        seg = patches.crop_slice(native.seg, centre, size, plane, 0)
    assert stack.dtype == np.uint16 and stack.shape == (len(native.modalities) + 2,) + tuple(size)
    assert np.abs(stack[:-2] / vmax * 2 - 1 - images).max() <= 1.01 / vmax
    assert np.array_equal(stack[-2], brain * vmax) and np.array_equal(stack[-1], seg)
    if info['type'] == 'tumour':
        assert native.seg[tuple(centre)] > 0 and stack[-1].any()
    else:
        assert native.brain[tuple(centre)] and not stack[-1].any()
        assert brain.mean() >= patches.MIN_HEALTHY_BRAIN - 1e-6


def load_all(path, shape):
    """Every item through ImageFolderDataset and DataLoader workers, as training reads the zip."""
    d = ImageFolderDataset(str(path), use_labels=True)
    loader = torch.utils.data.DataLoader(d, batch_size=4, num_workers=2)
    batches = [(x, c) for x, c in loader]
    x = torch.cat([b[0] for b in batches])
    assert list(x.shape) == [len(d), len(CHANNELS)] + list(shape) and x.dtype == torch.uint16
    return d, x


def test_patch_archive_3d(phantom_dir, tmp_path):
    dest = tmp_path / 'p3.zip'
    r = ok('--source', phantom_dir, '--dest', dest, '--kind', 'patches', '--patch-size', '16,16,12',
           '--patches-per-case', 3, '--healthy-per-case', 2, '--labels', 'cohort', '--workers', 2)
    assert 'tumour patches: 6' in r.output and 'healthy patches: 4' in r.output
    files, meta = read_zip(dest)
    assert meta['kind'] == 'patches' and meta['channels'] == CHANNELS and meta['seg_storage'] == 'labelmap'
    assert meta['patch_size'] == [16, 16, 12] and meta['spacing'] == [1.0, 1.0, 1.0]
    assert [g['name'] for g in meta['label_groups']] == ['cohort'] and len(meta['cases']) == 2
    assert sorted(meta['patches']) == sorted(files) == sorted(meta['file_cases'])
    natives = {cf.case_id: patches.load_native(cf) for cf in brats.discover_cases(phantom_dir)}
    assert {cid: meta['normalization']['case_ranges'][cid] for cid in natives} == \
        {cid: {m: list(r) for m, r in n.ranges.items()} for cid, n in natives.items()}
    types = [info['type'] for info in meta['patches'].values()]
    assert types.count('tumour') == 6 and types.count('healthy') == 4
    for rel, info in meta['patches'].items():
        assert info['case'] == meta['file_cases'][rel] and 'plane' not in info
        check_patch(files[rel], info, (16, 16, 12), natives[info['case']])
    d, x = load_all(dest, (16, 16, 12))
    assert d.channels == CHANNELS and d.kind == 'patches' and d.label_names == ['pht']
    desc = d.describe()
    assert desc['patch_size'] == [16, 16, 12] and desc['spacing'] == [1.0, 1.0, 1.0]
    for i in range(len(d)):
        stored = files[d.image_fname(i)]
        assert np.array_equal(x[i, -3:].numpy(), encode_seg(stored[-1], 65535)) and np.array_equal(x[i, :-3], stored[:-1])


def test_patch_archive_2d(phantom_dir, tmp_path):
    dest = tmp_path / 'p2.zip'
    ok('--source', phantom_dir, '--dest', dest, '--kind', 'patches', '--patch-size', '16,16', '--planes',
       'axial,sagittal', '--patches-per-case', 2, '--labels', 'tumour', '--modalities', 't2f,t1c')
    files, meta = read_zip(dest)
    channels = ['t2f', 't1c', 'brain'] + list(SEG_CHANNELS)
    assert meta['channels'] == channels and meta['patch_size'] == [16, 16]
    assert [g['name'] for g in meta['label_groups']] == ['plane', 'tumour']
    assert meta['label_groups'][0]['values'] == ['axial', 'sagittal']
    assert len(files) == 2 * 2 * (2 + 2)  # cases x planes x (tumour + healthy, as many by default)
    natives = {cf.case_id: patches.load_native(cf, ('t2f', 't1c')) for cf in brats.discover_cases(phantom_dir)}
    labels = dict(meta['labels'])
    for rel, info in meta['patches'].items():
        assert rel.split('/')[1].startswith(f"{info['plane']}-{info['type']}-")
        check_patch(files[rel], info, (16, 16), natives[info['case']])
        plane = [1.0, 0.0] if info['plane'] == 'axial' else [0.0, 1.0]
        assert labels[rel] == plane + ([1.0, 0.0] if info['type'] == 'tumour' else [0.0, 1.0])
    d = ImageFolderDataset(str(dest), use_labels=True)
    x = torch.cat([b[0] for b in torch.utils.data.DataLoader(d, batch_size=4, num_workers=2)])
    assert x.shape == (len(files), len(channels), 16, 16) and d.describe()['patch_size'] == [16, 16]


def test_patches_are_seeded_and_independent_of_workers(phantom_dir, tmp_path):
    args = ['--source', phantom_dir, '--kind', 'patches', '--patch-size', '8,8,8', '--patches-per-case', 2]
    ok(*args, '--dest', tmp_path / 'a.zip')
    ok(*args, '--dest', tmp_path / 'b.zip', '--workers', 2)
    ok(*args, '--dest', tmp_path / 'c.zip', '--seed', 5)
    assert (tmp_path / 'a.zip').read_bytes() == (tmp_path / 'b.zip').read_bytes()
    centres = [[i['centre'] for i in read_zip(tmp_path / f'{n}.zip')[1]['patches'].values()] for n in 'ac']
    assert centres[0] != centres[1]


def test_case_without_tumour_gives_healthy_patches_only(phantom_dir, tmp_path):
    src = tmp_path / 'src'
    first, second = sorted(p for p in phantom_dir.iterdir() if p.is_dir())
    copy_case(first, src, lambda key, a: np.zeros_like(a) if key == 'seg' else a)
    copy_case(second, src)
    dest = tmp_path / 'p.zip'
    r = ok('--source', src, '--dest', dest, '--kind', 'patches', '--patch-size', '8,8,8', '--patches-per-case', 2)
    assert 'cases without tumour (healthy patches only): 1' in r.output
    _, meta = read_zip(dest)
    kinds = {}
    for info in meta['patches'].values():
        kinds.setdefault(info['case'], []).append(info['type'])
    assert kinds == {first.name: ['healthy', 'healthy'], second.name: ['tumour', 'tumour', 'healthy', 'healthy']}
    # patches larger than the brain leave no room for a healthy one: said in the summary, not silently dropped
    r = ok('--source', src, '--dest', tmp_path / 'big.zip', '--kind', 'patches', '--patch-size', '64,64,64',
           '--patches-per-case', 1)
    assert 'healthy patches not found (too little tumour-free brain): 2' in r.output


def test_bad_cases_and_options_are_one_line(phantom_dir, tmp_path):
    first, second = sorted(p for p in phantom_dir.iterdir() if p.is_dir())
    noseg = tmp_path / 'noseg'
    copy_case(first, noseg)
    seg = noseg / first.name / f'{first.name}-seg.nii.gz'
    seg.unlink()
    empty = tmp_path / 'empty'
    copy_case(first, empty, lambda key, a: np.zeros_like(a))
    copy_case(second, empty)
    dest = tmp_path / 'p.zip'
    for src, words in [(noseg, [str(seg), 'missing label']), (empty, [str(empty / first.name), 'all-zero'])]:
        r = tool('--source', src, '--dest', dest, '--kind', 'patches', '--patch-size', '8,8,8')
        assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
        assert all(w in r.output for w in words), r.output
        assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.')) == []
    r = ok('--source', empty, '--dest', dest, '--kind', 'patches', '--patch-size', '8,8,8', '--on-error', 'skip')
    assert 'skipped 1 cases' in r.output and read_zip(dest)[1]['cases'] == {second.name: 'train'}
    for args, words in [(['--patch-size', '8,8,8,8'], '--patch-size'), (['--patch-size', '24,24'], 'power of two'),
                        (['--labels', 'modality'], '--labels modality'), (['--denoise', '1'], '--denoise'),
                        (['--patches-per-case', 0, '--healthy-per-case', 0], 'nothing to write')]:
        r = tool('--source', phantom_dir, '--dest', tmp_path / 'x.zip', '--kind', 'patches', *args)
        assert r.exit_code != 0 and words in r.output and not (tmp_path / 'x.zip').exists(), r.output
        assert len([line for line in r.output.splitlines() if line.strip()]) <= 3, r.output  # click: usage + error
