"""Bad BraTS input gets one clear line naming the file and the problem, and leaves nothing half-written."""

import gzip
import json
import os
import zipfile

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import dataset_tool
from mri.sources import convert

SHAPE = (20, 24, 16)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1, 0, 12], [0, 0, 1, -8], [0, 0, 0, 1]])  # LPS, as BraTS


def case_arrays(seed=0, shape=SHAPE, naming='2023'):
    """Four int16 'modalities' with an ellipsoid brain and a small tumour, plus labels."""
    rng = np.random.RandomState(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
    brain = (grid ** 2).sum(0) < 0.8
    arrays = {}
    for k, m in enumerate(('t1n', 't1c', 't2w', 't2f')):
        arrays[m] = np.where(brain, 100 * (k + 1) + rng.randint(0, 400, shape), 0).astype(np.int16)
    seg = np.zeros(shape, np.uint8)
    seg[8:12, 9:13, 6:9] = 2
    seg[9:11, 10:12, 7:8] = 1
    seg[11, 12, 8] = 4 if naming == '2021' else 3
    arrays['seg'] = seg
    return arrays


def write_case(folder, case_id, arrays=None, affine=AFFINE, naming='2023', ext='.nii.gz', skip=()):
    """Writes a synthetic case with the naming scheme's file names; returns {modality: path}."""
    arrays = case_arrays(naming=naming) if arrays is None else arrays
    names = ({'t1n': '-t1n', 't1c': '-t1c', 't2w': '-t2w', 't2f': '-t2f', 'seg': '-seg'} if naming == '2023' else
             {'t1n': '_t1', 't1c': '_t1ce', 't2w': '_t2', 't2f': '_flair', 'seg': '_seg'})
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for m, arr in arrays.items():
        if m in skip:
            continue
        paths[m] = os.path.join(folder, f'{case_id}{names[m]}{ext}')
        nib.save(nib.Nifti1Image(arr, affine), paths[m])
    return paths


def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, ['--no-progress', *map(str, args)])


def assert_clean_failure(result, dest, *fragments):
    """Non-zero exit, a one-line 'Error: ...' naming what it should, no traceback, and no archive or temp file."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [l for l in result.output.strip().splitlines() if l.startswith('Error:')]
    assert len(lines) == 1, result.output
    assert 'Traceback' not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not os.path.exists(dest)
    parent = os.path.dirname(dest)
    if os.path.isdir(parent):
        leftovers = [n for n in os.listdir(parent) if n.startswith('.') or n.endswith(('.tmp', '.part'))]
        assert not leftovers, leftovers


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / 'src'
    folder.mkdir()
    return folder


@pytest.fixture
def dest(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    return out / 'archive.zip'


def test_missing_modality(src, dest):
    write_case(src / 'C-001', 'C-001')
    write_case(src / 'C-002', 'C-002', skip=('t2w',))
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-002-t2w.nii.gz', 'missing t2w')


def test_missing_modality_is_skipped_with_on_error_skip(src, dest):
    """docs/data.md: --on-error skip skips a case with a missing modality (it once stopped the conversion: exit 1)."""
    write_case(os.path.join(src, 'C-001'), 'C-001')
    write_case(os.path.join(src, 'C-002'), 'C-002', skip=('t2w',))
    r = run_tool('--source', src, '--dest', dest, '--on-error', 'skip', '--resolution', 16)
    assert r.exit_code == 0 and 'C-002' in r.output and 'missing t2w' in r.output, r.output
    assert os.path.isfile(dest)
    with open(os.path.join(os.path.dirname(dest), 'skipped.json')) as f:
        assert [s['case'] for s in json.load(f)] == ['C-002']


def test_missing_label_file(src, dest):
    write_case(src / 'C-001', 'C-001', skip=('seg',))
    r = run_tool('--source', src, '--dest', dest, '--with-seg')
    assert_clean_failure(r, dest, 'C-001-seg.nii.gz', 'missing label')


def test_missing_label_file_is_fine_without_seg(src, dest):
    write_case(src / 'C-001', 'C-001', skip=('seg',))
    r = run_tool('--source', src, '--dest', dest, '--resolution', 16)
    assert r.exit_code == 0, r.output
    assert dest.is_file()


def test_shape_mismatch(src, dest):
    arrays = case_arrays()
    arrays['t2f'] = arrays['t2f'][:, :, :-2]
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t2f.nii.gz', 'shape (20, 24, 14) differs')


def test_affine_mismatch(src, dest):
    paths = write_case(src, 'C-001')
    img = nib.load(paths['t1c'])
    shifted = img.affine.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), paths['t1c'])
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t1c.nii.gz', 'affine differs', 'max difference 2')


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_nan_inf(src, dest, bad):
    arrays = case_arrays()
    arrays['t1n'] = arrays['t1n'].astype(np.float32)
    arrays['t1n'][5, 5, 5] = bad
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t1n.nii.gz', 'NaN/Inf')


def test_all_zero_volume(src, dest):
    arrays = case_arrays()
    arrays['t2w'][:] = 0
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t2w.nii.gz', 'all-zero')


def test_truncated_gzip(src, dest):
    paths = write_case(src, 'C-001')
    data = open(paths['t2w'], 'rb').read()
    open(paths['t2w'], 'wb').write(data[:len(data) // 2])
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t2w.nii.gz', 'corrupt or truncated gzip')


@pytest.mark.parametrize('ext', ['.nii.gz', '.nii'])
@pytest.mark.parametrize('claim', [(32767, 32767, 32767), (2000, 2000, 400), (20, 24, 400)])
def test_header_size_claims_are_refused_before_allocation(src, dest, ext, claim):
    """Headers claiming 100000^3 or 32767^3 voxels once made dataset_tool allocate the claim and die of a
    MemoryError traceback; an uncompressed file shorter than its header is refused too."""
    paths = write_case(src, 'C-001', ext=ext)
    img = nib.load(paths['t2w'])
    raw = (gzip.decompress(open(paths['t2w'], 'rb').read()) if ext == '.nii.gz' else open(paths['t2w'], 'rb').read())
    header = img.header.copy()
    header.set_data_shape(claim)
    raw = header.binaryblock + raw[348:]
    open(paths['t2w'], 'wb').write(gzip.compress(raw) if ext == '.nii.gz' else raw)
    r = run_tool('--source', src, '--dest', dest)
    problem = 'beyond any brain scan' if np.prod(claim, dtype=float) > 2 ** 30 else ('truncated' if ext == '.nii' else 'gzip')
    assert_clean_failure(r, dest, f'C-001-t2w{ext}', problem)


def test_corrupt_gzip(src, dest):
    paths = write_case(src, 'C-001')
    raw = gzip.decompress(open(paths['t1c'], 'rb').read())
    blob = bytearray(gzip.compress(raw))
    blob[len(blob) // 2: len(blob) // 2 + 64] = b'\x00' * 64  # damage the deflate stream
    open(paths['t1c'], 'wb').write(bytes(blob))
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t1c.nii.gz', 'corrupt or truncated gzip')


def test_not_gzip_at_all(src, dest):
    paths = write_case(src, 'C-001')
    open(paths['t1n'], 'wb').write(b'not a gzip stream' * 50)
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t1n.nii.gz', 'gzip')


def test_label_values_outside_set(src, dest):
    arrays = case_arrays()
    arrays['seg'][1, 1, 1] = 7
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest, '--with-seg')
    assert_clean_failure(r, dest, 'C-001-seg.nii.gz', 'label values outside', '[7]')


def test_label_4_in_2023_naming_is_outside_set(src, dest):
    arrays = case_arrays()
    arrays['seg'][1, 1, 1] = 4
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest, '--labels', 'tumour')
    assert_clean_failure(r, dest, 'C-001-seg.nii.gz', 'label values outside', '[4]')


def test_2d_image(src, dest):
    arrays = case_arrays()
    arrays['t2f'] = arrays['t2f'][:, :, 5]
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t2f.nii.gz', '2D image')


def test_4d_image(src, dest):
    arrays = case_arrays()
    arrays['t1n'] = np.stack([arrays['t1n']] * 2, axis=-1)
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001-t1n.nii.gz', '4D image')


def test_empty_folder(src, dest):
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, str(src), 'no NIfTI files')


def test_folder_without_brats_names(src, dest):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(src / 'brainmask.nii.gz'))
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, str(src), 'none named like a BraTS case')


def test_same_case_twice(src, dest):
    write_case(src / 'a' / 'C-001', 'C-001')
    write_case(src / 'b' / 'C-001', 'C-001')
    r = run_tool('--source', src, '--dest', dest)
    assert_clean_failure(r, dest, 'C-001', 'appears twice')


def test_unwritable_dest(src, tmp_path):
    write_case(src, 'C-001')
    blocker = tmp_path / 'not-a-folder'
    blocker.write_text('a file where a folder should be')
    dest = blocker / 'archive.zip'
    r = run_tool('--source', src, '--dest', dest)
    assert r.exit_code != 0
    assert 'cannot write' in r.output and str(dest) in r.output and 'Traceback' not in r.output
    assert sorted(os.listdir(tmp_path)) == ['not-a-folder', 'src']


def test_nonempty_dest_folder(src, tmp_path):
    write_case(src, 'C-001')
    dest = tmp_path / 'out'
    dest.mkdir()
    (dest / 'keep.txt').write_text('x')
    r = run_tool('--source', src, '--dest', dest)
    assert r.exit_code != 0 and '--dest exists; pass --overwrite' in r.output
    assert os.listdir(dest) == ['keep.txt']


def test_missing_source(tmp_path, dest):
    r = run_tool('--source', tmp_path / 'nowhere', '--dest', dest)
    assert_clean_failure(r, dest, 'nowhere', 'no such file or folder')


def test_bad_csv_case(src, dest, tmp_path):
    write_case(src, 'C-001')
    table = tmp_path / 'meta.csv'
    table.write_text('case_id,site\nC-999,lagos\n')
    r = run_tool('--source', src, '--dest', dest, '--labels', table)
    assert_clean_failure(r, dest, 'meta.csv', 'no row for case C-001')


def test_skip_writes_the_rest_and_skipped_json(src, dest):
    write_case(src / 'C-001', 'C-001')
    arrays = case_arrays()
    arrays['t2w'][:] = 0
    write_case(src / 'C-002', 'C-002', arrays)
    write_case(src / 'C-003', 'C-003')
    r = run_tool('--source', src, '--dest', dest, '--on-error', 'skip', '--resolution', 16)
    assert r.exit_code == 0, r.output
    assert 'skipped 1 cases' in r.output and 'all-zero' in r.output
    with zipfile.ZipFile(dest) as z:
        meta = json.loads(z.read('dataset.json'))
    assert sorted(meta['cases']) == ['C-001', 'C-003']
    skipped = json.loads((dest.parent / 'skipped.json').read_text())
    assert [s['case'] for s in skipped] == ['C-002']
    assert skipped[0]['file'].endswith('C-002-t2w.nii.gz') and 'all-zero' in skipped[0]['problem']


def test_fail_stops_at_first_bad_case_with_workers(src, dest):
    write_case(src / 'C-001', 'C-001')
    arrays = case_arrays()
    arrays['t1n'][:] = 0
    write_case(src / 'C-002', 'C-002', arrays)
    r = run_tool('--source', src, '--dest', dest, '--workers', 2, '--resolution', 16)
    assert_clean_failure(r, dest, 'C-002-t1n.nii.gz', 'all-zero')


def test_skip_with_every_case_bad(src, dest):
    arrays = case_arrays()
    arrays['t1n'][:] = 0
    write_case(src, 'C-001', arrays)
    r = run_tool('--source', src, '--dest', dest, '--on-error', 'skip')
    assert_clean_failure(r, dest, 'no case could be converted')


def test_ctrl_c_leaves_nothing(src, dest, monkeypatch):
    for k in range(3):
        write_case(src / f'C-00{k}', f'C-00{k}')
    real = convert.convert_case
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(convert, 'convert_case', interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_brats(src, dest, convert.ConvertOptions(resolution=16), progress=False)
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_case_folders_reached_through_symlinks_convert(tmp_path, dest):
    """A --source folder of symbolic links to case folders kept elsewhere (how many people arrange a data set)."""
    store = tmp_path / 'store'
    for case_id in ('BraTS-GLI-00001-000', 'BraTS-GLI-00002-000'):
        write_case(store / case_id, case_id)
    links = tmp_path / 'links'
    links.mkdir()
    for case_id in ('BraTS-GLI-00001-000', 'BraTS-GLI-00002-000'):
        os.symlink(store / case_id, links / case_id)
    from mri.sources import brats
    assert [cf.case_id for cf in brats.discover_cases(links)] == ['BraTS-GLI-00001-000', 'BraTS-GLI-00002-000']
    result = run_tool('--source', links, '--dest', dest, '--kind', 'slices', '--resolution', 16)
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(dest) as z:
        assert 'dataset.json' in z.namelist() and len(z.namelist()) > 1


def test_symlink_loop_is_refused_in_one_line(src, dest):
    write_case(src / 'BraTS-GLI-00001-000', 'BraTS-GLI-00001-000')
    os.symlink(src, src / 'BraTS-GLI-00001-000' / 'again')  # Points to a folder that contains it.
    result = run_tool('--source', src, '--dest', dest, '--kind', 'slices', '--resolution', 16)
    assert_clean_failure(result, dest, 'again', 'symbolic link loop')

