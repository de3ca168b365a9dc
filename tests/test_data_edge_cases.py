"""dataset_tool.py edge cases (issue 11): unreadable folders, macOS debris, existing destinations, SIGTERM, the cube
side of volumes, stale skipped.json, empty splits, re-converting project archives (PNG and .npy, slices and volumes),
label-map storage with deflated .npy entries, and archives in the old one-hot layout."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mri.sources import brats
from tests.test_dataset_tool import ok, read_archive, run_tool, write_case, npy
from training.dataset import ImageFolderDataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def two_cases(tmp_path_factory):
    src = tmp_path_factory.mktemp('cases')
    for k in range(2):
        write_case(src / f'C-00{k}', f'C-00{k}', seed=k)
    return src


def test_unreadable_case_folder_is_an_error_or_skipped(two_cases, tmp_path, monkeypatch):
    bad = str(two_cases / 'C-001')
    real_scandir = os.scandir

    def scandir(path='.'):
        if os.fspath(path) == bad:
            raise PermissionError(13, 'Permission denied', bad)
        return real_scandir(path)
    monkeypatch.setattr(os, 'scandir', scandir)  # root can read any folder, so a chmod would not show it
    r = run_tool('--source', two_cases, '--dest', tmp_path / 'a.zip', '--resolution', 16)
    assert r.exit_code == 1 and f'{bad}: folder cannot be read (Permission denied)' in r.output
    assert not (tmp_path / 'a.zip').exists()
    r = ok('--source', two_cases, '--dest', tmp_path / 'b.zip', '--resolution', 16, '--on-error', 'skip')
    assert 'skipped 1 cases' in r.output and 'C-001' in r.output
    assert json.loads((tmp_path / 'skipped.json').read_text())[0]['file'] == bad
    assert read_archive(tmp_path / 'b.zip')[1]['cases'] == {'C-000': 'train'}


def test_macos_debris_is_skipped(tmp_path):
    src = tmp_path / 'src'
    write_case(src / 'C-000', 'C-000')
    for junk in (src / '__MACOSX' / 'C-000' / '._C-000-t1n.nii.gz', src / 'C-000' / '._C-000-t2w.nii.gz'):
        junk.parent.mkdir(parents=True, exist_ok=True)
        junk.write_bytes(b'\x00\x05\x16\x07 AppleDouble resource fork')
    ok('--source', src, '--dest', tmp_path / 'a.zip', '--resolution', 16)
    assert list(read_archive(tmp_path / 'a.zip')[1]['cases']) == ['C-000']


@pytest.mark.parametrize('dest', ['a.zip', 'folder'])
def test_existing_destination_needs_overwrite(two_cases, tmp_path, dest):
    dest = tmp_path / dest
    if dest.suffix == '.zip':
        dest.write_bytes(b'precious')
    else:
        dest.mkdir()
        (dest / 'precious.txt').write_text('x')
    r = run_tool('--source', two_cases, '--dest', dest, '--resolution', 16)
    assert r.exit_code == 1 and '--dest exists; pass --overwrite' in r.output
    assert (dest.read_bytes() if dest.is_file() else (dest / 'precious.txt').read_text()) in (b'precious', 'x')
    ok('--source', two_cases, '--dest', dest, '--resolution', 16, '--overwrite')
    assert read_archive(dest)[1]['cases'] == {'C-000': 'train', 'C-001': 'train'}
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # the old folder is gone, nothing hidden


@pytest.mark.parametrize('target', ['process', 'group'])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, target):
    """SIGTERM to dataset_tool.py alone, or to its process group with two conversion workers (as `timeout` or
    Slurm send it): one line, exit 143, nothing written, no worker left behind."""
    src = tmp_path / 'src'
    for k in range(12):
        write_case(src / f'C-{k:03d}', f'C-{k:03d}', seed=k)
    out = tmp_path / 'out'
    out.mkdir()
    workers = ['--workers', '2'] if target == 'group' else []
    proc = subprocess.Popen([sys.executable, 'dataset_tool.py', '--source', str(src), '--dest', str(out / 'a.zip'),
                             '--resolution', '64', '--modalities', 'all', '--no-progress'] + workers, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=target == 'group')
    deadline = time.time() + 180
    # Terminated mid-conversion, once the temporary archive holds data (the situation of the issue: 471 MB left).
    while not any(p.name.startswith('.a.zip') and p.stat().st_size > 0 for p in out.iterdir()) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, 'the conversion ended before it could be terminated'
    if target == 'group':
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 'terminated (SIGTERM); nothing was written' in err and 'Traceback' not in err
    assert list(out.iterdir()) == []  # no archive, no hidden temporary archive
    if target == 'group':
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):  # the group is empty: no worker outlived the main process
            os.killpg(proc.pid, 0)


def test_volumes_resolution_is_the_cube_side(two_cases, tmp_path):
    ok('--source', two_cases, '--dest', tmp_path / 'v.zip', '--kind', 'volumes', '--resolution', 8)
    files, meta = read_archive(tmp_path / 'v.zip')
    assert meta['resolution'] == 8 and npy(files['C-000/C-000.npy']).shape == (1, 8, 8, 8)
    r = run_tool('--source', two_cases, '--dest', tmp_path / 'w.zip', '--kind', 'volumes', '--resolution', 8,
                 '--volume-size', 16)
    assert r.exit_code == 2 and '--resolution 8 and --volume-size 16 disagree' in r.output


def test_stale_skipped_json_is_removed(two_cases, tmp_path):
    (tmp_path / 'skipped.json').write_text('[{"case": "C-001", "file": "x", "problem": "old"}]')
    ok('--source', two_cases, '--dest', tmp_path / 'a.zip', '--resolution', 16)
    assert not (tmp_path / 'skipped.json').exists()


def test_empty_split_warns(two_cases, tmp_path):
    r = ok('--source', two_cases, '--dest', tmp_path / 'a.zip', '--resolution', 16, '--split', 'val=0.1')
    assert 'warning: --split val=0.1 of 2 cases gives no val cases' in r.output


def _dataset_arrays(path):
    d = ImageFolderDataset(str(path), use_labels=True)
    return {d.image_fname(i): d[i] for i in range(len(d))}, d


@pytest.fixture(scope='module')
def project_archive(two_cases, tmp_path_factory):
    dest = tmp_path_factory.mktemp('project') / 'p32.zip'
    ok('--source', two_cases, '--dest', dest, '--resolution', 32, '--modalities', 't2w,t2f', '--with-seg',
       '--labels', 'tumour', '--split', 'val=0.5', '--planes', 'axial,sagittal')
    return dest


def test_labelmap_storage_deflate_and_old_layout(project_archive, tmp_path):
    files, meta = read_archive(project_archive)
    x = npy(files[meta['labels'][0][0]])
    assert meta['seg_storage'] == 'labelmap' and x.shape == (3, 32, 32) and x[2].max() <= 3
    arrays, d = _dataset_arrays(project_archive)
    assert d.channels == ['t2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et']
    tumour = [img for img, _ in arrays.values() if img[2:].any()]
    assert tumour and all(set(np.unique(img[2:])) <= {0, 65535} and img[2:].sum(0).max() == 65535 for img in tumour)
    # The default .npy form is blosc2 (dataset.json "codec"); --codec deflate and --codec stored write the old forms.
    # All three hold the same arrays; deflate and blosc2 are smaller than stored.
    assert meta['codec'] == 'blosc2-shuffle-lz4hc5'
    forms = {}
    for codec in ('deflate', 'stored'):
        forms[codec] = tmp_path / f'{codec}.zip'
        ok('--source', project_archive.parent.parent / 'cases0', '--dest', forms[codec], '--resolution', 32,
           '--modalities', 't2w,t2f', '--with-seg', '--labels', 'tumour', '--split', 'val=0.5', '--planes',
           'axial,sagittal', '--codec', codec)
    with zipfile.ZipFile(forms['deflate']) as z:
        assert {i.compress_type for i in z.infolist() if i.filename.endswith('.npy')} == {zipfile.ZIP_DEFLATED}
        assert json.loads(z.read('dataset.json'))['codec'] == 'deflate-1'
    stored_files, stored_meta = read_archive(forms['stored'])
    assert stored_meta['codec'] == 'stored'
    assert all(np.array_equal(np.load(io.BytesIO(stored_files[k]), allow_pickle=False), npy(files[k]))
               for k in stored_files if k.endswith('.npy'))  # plain .npy files, as before
    assert forms['deflate'].stat().st_size < forms['stored'].stat().st_size / 2
    assert project_archive.stat().st_size < forms['stored'].stat().st_size / 2
    for codec in ('deflate', 'stored'):
        other, _ = _dataset_arrays(forms[codec])
        assert all(np.array_equal(other[k][0], arrays[k][0]) for k in arrays)
    # An archive in the old layout (three one-hot channels, no seg_storage) still loads, to the same arrays.
    old = tmp_path / 'old.zip'
    with zipfile.ZipFile(old, 'w') as z:
        old_meta = {k: v for k, v in meta.items() if k != 'seg_storage'}
        z.writestr('dataset.json', json.dumps(old_meta))
        for name, (img, _) in arrays.items():
            buf = io.BytesIO()
            np.save(buf, img)
            z.writestr(name, buf.getvalue())
    legacy, _ = _dataset_arrays(old)
    assert all(np.array_equal(legacy[k][0], arrays[k][0]) for k in arrays)


@pytest.mark.parametrize('layout', ['labelmap', 'onehot'])
def test_reconvert_project_archive_keeps_metadata(project_archive, tmp_path, layout):
    source = project_archive
    if layout == 'onehot':  # an archive written before label maps: one-hot seg channels
        source = tmp_path / 'old.zip'
        arrays, _ = _dataset_arrays(project_archive)
        files, meta = read_archive(project_archive)
        with zipfile.ZipFile(source, 'w') as z:
            z.writestr('dataset.json', json.dumps({k: v for k, v in meta.items() if k != 'seg_storage'}))
            for name, (img, _) in arrays.items():
                buf = io.BytesIO()
                np.save(buf, img)
                z.writestr(name, buf.getvalue())
    dest = tmp_path / 'p16.zip'
    ok('--source', source, '--dest', dest, '--resolution', 16, '--compress-level', 1)
    before, old_meta = read_archive(project_archive)
    after, meta = read_archive(dest)
    for key in ('label_names', 'label_groups', 'channels', 'kind', 'cases', 'file_cases', 'labels', 'normalization'):
        assert meta[key] == old_meta[key], key
    assert meta['seg_storage'] == 'labelmap' and meta['resolution'] == 16 and sorted(after) == sorted(before)
    arrays, d = _dataset_arrays(dest)
    assert d.image_shape == [5, 16, 16] and len(d) == len(before)
    assert 0 < len(ImageFolderDataset(str(dest), subset='val')) < len(d)
    # labels survive nearest-neighbour resampling: the tumour slices keep tumour pixels
    tumour = {rel for rel, vec in old_meta['labels'] if vec[-2] == 1}
    assert tumour and all(arrays[rel][0][2:].any() for rel in tumour if npy(before[rel])[-1].sum() > 4 * 3)


def test_reconvert_volume_archive_rescales_affines(two_cases, tmp_path):
    src = tmp_path / 'v16'
    ok('--source', two_cases, '--dest', src, '--kind', 'volumes', '--volume-size', 16, '--with-seg')
    ok('--source', src, '--dest', tmp_path / 'v8.zip', '--kind', 'volumes', '--volume-size', 8)
    _, m16 = read_archive(src)
    files, m8 = read_archive(tmp_path / 'v8.zip')
    rel = 'C-000/C-000.npy'
    vol = npy(files[rel])
    assert vol.shape == (2, 8, 8, 8) and m8['kind'] == 'volumes' and m8['channels'] == m16['channels']
    a16, a8 = np.array(m16['affines'][rel]), np.array(m8['affines'][rel])
    # The same physical cube: its centre and its corners map to the same scanner coordinates.
    assert np.allclose(a16 @ [7.5, 7.5, 7.5, 1], a8 @ [3.5, 3.5, 3.5, 1])
    assert np.allclose(a16 @ [-0.5, -0.5, -0.5, 1], a8 @ [-0.5, -0.5, -0.5, 1])
    assert ImageFolderDataset(str(tmp_path / 'v8.zip'))[0][0].shape == (4, 8, 8, 8)
    # The archive's space and native grids follow (they place generated volumes; re-converting dropped them).
    assert set(m8['native_grids']) == set(m16['native_grids']) and m8['space']['shape'] == [8, 8, 8]
    case = m8['file_cases'][rel]
    assert m8['native_grids'][case]['size'] == 8 and m8['native_grids'][case]['cube'] == m16['native_grids'][case]['cube']
    from mri import volume_space
    assert np.allclose(volume_space.grid_affine(m8['native_grids'][case]), a8)  # the same frame as the affine


def test_discover_ignores_debris_and_reports_unreadable(tmp_path, monkeypatch):
    write_case(tmp_path / 'C-000', 'C-000')
    (tmp_path / '._C-001-t1n.nii.gz').write_bytes(b'junk')
    real_scandir = os.scandir
    bad = str(tmp_path / 'locked')
    os.mkdir(bad)
    monkeypatch.setattr(os, 'scandir', lambda p='.': (_ for _ in ()).throw(PermissionError(13, 'Permission denied', bad))
                        if os.fspath(p) == bad else real_scandir(p))
    found = []
    assert [c.case_id for c in brats.discover_cases(tmp_path, found)] == ['C-000']
    assert [e.path for e in found] == [bad]
    with pytest.raises(brats.BratsError, match='folder cannot be read'):
        brats.discover_cases(tmp_path)


def test_npy_reader_fortran_order_and_truncation(tmp_path):
    from training.dataset import DatasetError
    a = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4)
    np.save(tmp_path / 'f.npy', np.asfortranarray(a))
    assert np.array_equal(ImageFolderDataset(str(tmp_path))[0][0], a)
    data = (tmp_path / 'f.npy').read_bytes()
    (tmp_path / 'f.npy').write_bytes(data[:-5])
    with pytest.raises(DatasetError, match='f.npy: unreadable image .*truncated'):
        ImageFolderDataset(str(tmp_path))


def test_image_folder_mixing_grey_and_rgb_is_refused_naming_the_file(tmp_path):
    """An image folder of grey and RGB PNGs converted into an archive that training failed on late, with a bare
    AssertionError; conversion now refuses it in one line naming the odd file, and writes nothing."""
    from PIL import Image
    src = tmp_path / 'src'
    src.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(src / 'a.png')
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / 'b.png')
    r = run_tool('--source', src, '--dest', tmp_path / 'o.zip', '--resolution', 16)
    assert r.exit_code != 0 and 'b.png' in r.output and 'grey' in r.output and 'Traceback' not in r.output, r.output
    assert not (tmp_path / 'o.zip').exists()
