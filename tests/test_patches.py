"""mri.sources.patches and dataset_tool.py --kind patches: native cases, crop / paste, patch archives (issue 18)."""

import numpy as np
import nibabel as nib
import pytest

from mri.sources import brats, patches, preprocess
from mri.sources.phantom import write_phantom_cases

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
