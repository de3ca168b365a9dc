"""Tests for mri/sources/phantom.py: synthetic BraTS-format cases (anatomy, contrasts, labels, files, resume, speed)."""

import os
import time

import nibabel as nib
import numpy as np
import pytest

from mri.sources import phantom
from mri.sources.phantom import MODALITIES, REF_SHAPE, brats_affine, make_phantom_case, write_phantom_cases

SMALL = (64, 64, 40)
REAL_CASE = '/work/shared/data/brats/BraTS-GLI-00000-000'
CSF, GM, WM = 1, 2, 3


@pytest.fixture(scope='module')
def small_cases():
    return [make_phantom_case(seed, SMALL, return_tissue=True) for seed in range(6)]


def _tissue_means(case, name):
    """Mean of a modality over healthy voxels of each tissue class, as (csf, gm, wm)."""
    healthy = case['seg'] == 0
    return [float(case[name][(case['tissue'] == t) & healthy].mean()) for t in (CSF, GM, WM)]


def test_deterministic_per_seed_and_thread_count():
    a = make_phantom_case(11, SMALL)
    b = make_phantom_case(11, SMALL, threads=1)
    assert sorted(a) == sorted(MODALITIES + ('seg', 'affine'))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_different_seeds_differ(small_cases):
    a, b = small_cases[0], small_cases[1]
    assert not np.array_equal(a['seg'], b['seg'])
    for name in MODALITIES:
        assert not np.array_equal(a[name], b[name]), name
    # the outline itself varies, not only the tumour
    assert not np.array_equal(a['t1n'] > 0, b['t1n'] > 0)


def test_types_shapes_and_affine(small_cases):
    case = small_cases[0]
    for name in MODALITIES:
        assert case[name].dtype == np.int16 and case[name].shape == SMALL
    assert case['seg'].dtype == np.uint8 and case['seg'].shape == SMALL
    np.testing.assert_array_equal(case['affine'], brats_affine(SMALL))
    assert nib.aff2axcodes(case['affine']) == ('L', 'P', 'S')
    # the released BraTS grid: diag(-1, -1, 1), origin (0, 239, 0)
    expected = np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    np.testing.assert_array_equal(brats_affine(REF_SHAPE), expected)
    np.testing.assert_array_equal(brats_affine((10, 20, 30), (0.5, 2.0, 3.0))[:3, :],
                                  [[-0.5, 0, 0, 0], [0, -2, 0, 38], [0, 0, 3, 0]])


def test_labels_complete_and_inside_brain(small_cases):
    for case in small_cases + [make_phantom_case(s, (48, 48, 32)) for s in range(20, 24)]:
        seg = case['seg']
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
        brain = case['t1n'] > 0
        assert not np.any(seg[~brain]), 'tumour labels outside the brain mask'
        assert 0.05 < brain.mean() < 0.3


def test_background_exactly_zero_and_one_shared_mask(small_cases):
    for case in small_cases:
        brain = case['t1n'] > 0
        for name in MODALITIES:
            assert np.array_equal(case[name] > 0, brain), name
            assert case[name].min() >= 0 and not np.any(case[name][~brain])
        # skull-stripped: the mask is one blob that does not touch the grid border on the sides
        assert not brain[0].any() and not brain[-1].any() and not brain[:, 0].any() and not brain[:, -1].any()


def test_tissue_contrast_ranks(small_cases):
    for case in small_cases:
        csf, gm, wm = _tissue_means(case, 't1n')
        assert wm > gm > csf, ('T1', csf, gm, wm)
        csf, gm, wm = _tissue_means(case, 't1c')
        assert wm > gm > csf, ('T1c', csf, gm, wm)
        csf, gm, wm = _tissue_means(case, 't2w')
        assert csf > gm > wm, ('T2', csf, gm, wm)
        csf, gm, wm = _tissue_means(case, 't2f')
        assert gm > wm > csf, ('FLAIR', csf, gm, wm)


def test_tumour_contrast_matches_labels(small_cases):
    for case in small_cases:
        seg = case['seg']
        wm = {name: _tissue_means(case, name)[2] for name in MODALITIES}
        mean = lambda name, label: float(case[name][seg == label].mean())
        assert mean('t2f', 2) > 1.2 * wm['t2f'], 'FLAIR oedema should be bright'
        assert mean('t2w', 2) > wm['t2w'], 'T2 oedema should be bright'
        assert mean('t1n', 2) < wm['t1n'], 'T1 oedema should be slightly dark'
        assert mean('t1c', 3) / wm['t1c'] > 1.3 * mean('t1n', 3) / wm['t1n'], 'ET should enhance on T1c'
        assert mean('t1n', 1) < mean('t1n', 2) and mean('t2w', 1) > wm['t2w'], 'NETC: T1 dark, T2 bright'
        assert mean('t1c', 1) < mean('t1c', 3), 'NETC does not enhance'


def test_partial_volume_not_staircase(small_cases):
    # the brain edge and tissue borders are blurred: many distinct levels, not a handful of plateaus
    case = small_cases[0]
    brain = case['t1n'] > 0
    assert np.unique(case['t1n'][brain]).size > 300
    # noise is Rician-like and present: neighbouring WM voxels differ
    wm = (case['tissue'] == WM) & (case['seg'] == 0)
    diffs = np.diff(case['t1n'].astype(np.float32), axis=0)[wm[1:] & wm[:-1]]
    assert 0 < diffs.std() < 0.2 * _tissue_means(case, 't1n')[2]


def test_full_size_speed_and_ranges():
    make_phantom_case(0, SMALL)  # warm-up: first-call costs (imports, thread start) are not per-case costs
    start = time.perf_counter()
    case = make_phantom_case(1, return_tissue=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f'full-size phantom took {elapsed:.2f} s'
    brain = case['t1n'] > 0
    assert 0.12 < brain.mean() < 0.22  # a real BraTS case: 0.166 of the grid
    # medians inside the brain near those of a real case (t1n 827, t1c 1993, t2w 486, t2f 997)
    for name, (lo, hi) in dict(t1n=(400, 1400), t1c=(1000, 3500), t2w=(250, 1200), t2f=(500, 1800)).items():
        median = float(np.median(case[name][brain]))
        assert lo < median < hi, (name, median)
        assert case[name].max() < 32767


def test_write_files_like_brats(tmp_path):
    dirs = write_phantom_cases(tmp_path, 2, seed=5, shape=SMALL, progress=False)
    names = ['BraTS-PHT-00005-000', 'BraTS-PHT-00006-000']
    assert [os.path.basename(d) for d in dirs] == names
    assert sorted(os.listdir(tmp_path)) == names  # no temporary folders left
    for number, case_dir in zip((5, 6), dirs):
        case = os.path.basename(case_dir)
        assert sorted(os.listdir(case_dir)) == sorted(f'{case}-{k}.nii.gz' for k in ('t1c', 't1n', 't2f', 't2w', 'seg'))
        expected = make_phantom_case(number, SMALL)
        for key in ('t1c', 't1n', 't2f', 't2w', 'seg'):
            img = nib.load(os.path.join(case_dir, f'{case}-{key}.nii.gz'))
            assert img.shape == SMALL
            assert img.get_data_dtype() == (np.uint8 if key == 'seg' else np.int16)
            assert nib.aff2axcodes(img.affine) == ('L', 'P', 'S')
            np.testing.assert_allclose(img.affine, brats_affine(SMALL))
            assert int(img.header['qform_code']) == 1
            assert int(img.header['sform_code']) == (0 if key == 'seg' else 1)
            data = np.asanyarray(img.dataobj)
            assert data.dtype == expected[key].dtype
            np.testing.assert_array_equal(data, expected[key])


@pytest.mark.skipif(not os.path.isdir(REAL_CASE), reason='no real BraTS case to compare headers with')
def test_header_fields_match_a_real_brats_case(tmp_path):
    affine = brats_affine(REF_SHAPE)
    fields = ('dim', 'pixdim', 'xyzt_units', 'qform_code', 'sform_code', 'quatern_b', 'quatern_c', 'quatern_d',
              'qoffset_x', 'qoffset_y', 'qoffset_z', 'srow_x', 'srow_y', 'srow_z', 'magic', 'intent_code')
    for key, dtype in (('t1n', np.int16), ('seg', np.uint8)):
        path = tmp_path / f'x-{key}.nii.gz'
        nib.save(phantom._nifti_image(np.zeros(REF_SHAPE, dtype), affine, 1.0, key == 'seg'), path)
        ours = nib.load(path)
        real = nib.load(os.path.join(REAL_CASE, f'BraTS-GLI-00000-000-{key}.nii.gz'))
        np.testing.assert_allclose(ours.affine, real.affine)
        for field in fields:
            np.testing.assert_allclose(np.asarray(ours.header[field], float) if field != 'magic' else 0,
                                       np.asarray(real.header[field], float) if field != 'magic' else 0,
                                       err_msg=f'{key}: {field}')
        assert ours.header['magic'] == real.header['magic']
        if key != 'seg':  # the real label map is float32; ours is uint8 as the project asks
            assert ours.get_data_dtype() == real.get_data_dtype()
            assert np.isnan(ours.header['scl_slope']) == np.isnan(real.header['scl_slope'])


def test_resume_skips_complete_cases(tmp_path, capsys):
    dirs = write_phantom_cases(tmp_path, 2, seed=0, shape=(48, 48, 32), progress=False)
    seg_path = os.path.join(dirs[0], 'BraTS-PHT-00000-000-seg.nii.gz')
    stamp = os.stat(seg_path).st_mtime_ns
    os.utime(seg_path, ns=(stamp - 10**9, stamp - 10**9))
    dirs3 = write_phantom_cases(tmp_path, 3, seed=0, shape=(48, 48, 32), progress=True)
    assert dirs3[:2] == dirs and os.path.isdir(dirs3[2])
    assert os.stat(seg_path).st_mtime_ns == stamp - 10**9, 'a complete case was rewritten'
    err = capsys.readouterr().err
    assert '3/3' in err and '2 already there' in err
    # a folder that is not a complete case is never silently overwritten
    os.remove(os.path.join(dirs3[2], 'BraTS-PHT-00002-000-t2w.nii.gz'))
    with pytest.raises(ValueError, match='BraTS-PHT-00002-000'):
        write_phantom_cases(tmp_path, 3, seed=0, shape=(48, 48, 32), progress=False)
    # a different grid does not count as complete either
    with pytest.raises(ValueError, match='BraTS-PHT-00000-000'):
        write_phantom_cases(tmp_path, 1, seed=0, shape=(40, 40, 32), progress=False)


def test_parallel_workers_write_the_same_cases(tmp_path):
    serial = write_phantom_cases(tmp_path / 'a', 2, seed=3, shape=(32, 32, 24), progress=False)
    parallel = write_phantom_cases(tmp_path / 'b', 2, seed=3, shape=(32, 32, 24), workers=2, progress=False)
    for d1, d2 in zip(serial, parallel):
        assert os.path.basename(d1) == os.path.basename(d2)
        for name in sorted(os.listdir(d1)):
            a = np.asanyarray(nib.load(os.path.join(d1, name)).dataobj)
            b = np.asanyarray(nib.load(os.path.join(d2, name)).dataobj)
            np.testing.assert_array_equal(a, b)


def test_cli(tmp_path):
    phantom.main(['--outdir', str(tmp_path), '--cases', '1', '--seed', '9', '--shape', '40,40,24'])
    assert os.listdir(tmp_path) == ['BraTS-PHT-00009-000']
    img = nib.load(tmp_path / 'BraTS-PHT-00009-000' / 'BraTS-PHT-00009-000-t2f.nii.gz')
    assert img.shape == (40, 40, 24)
    import click
    with pytest.raises(click.BadParameter):
        phantom.main(['--outdir', str(tmp_path), '--shape', '40,40'])


def test_bad_arguments():
    with pytest.raises(ValueError, match='shape'):
        make_phantom_case(0, (8, 64, 64))
    with pytest.raises(ValueError, match='spacing'):
        brats_affine(REF_SHAPE, -1.0)
    with pytest.raises(ValueError, match='5-digit'):
        write_phantom_cases('/nonexistent-never-created', 2, seed=99999, progress=False)
