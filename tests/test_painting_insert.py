"""Tumour painting put to use (issue 18): placement, insertion, healing and moving with a tiny untrained paint
model on tiny phantom cases, the case folders on the source grid (read back with nibabel and dataset_tool.py), and
bad input refused in one line with nothing written."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

import dataset_tool
import generate
from mri.output import cases as case_output
from mri.painting import label_sources
from mri.painting.insert import Painter, PaintError, heal_case, insert_tumours, move_tumour
from mri.painting.place import Placer, transform_shape
from mri.sources import brats, patches
from mri.sources.phantom import write_phantom_cases
from torch_utils import snapshot
from training.networks import Generator
from training.paint import PaintGenerator

SHAPE = (64, 64, 40)        # tiny phantom cases (LPS on disk, as BraTS): a whole brain with its tumour
CHANNELS = ['t1n', 't1c', 't2w', 't2f', 'brain', 'seg_netc', 'seg_snfh', 'seg_et']
TINY = dict(mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8, num_fp16_res=0, conv_clamp=None)
NORM = {'method': 'percentile', 'low': 0.5, 'high': 99.5}


def _paint_snapshot(path, res, c_dim=0, groups=None):
    torch.manual_seed(0)
    G = PaintGenerator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=res, img_channels=len(CHANNELS),
                       channels=CHANNELS, **TINY)
    desc = {'kind': 'patches', 'channels': CHANNELS, 'normalization': NORM,
            'patch_size': list(res) if isinstance(res, list) else [res, res]}
    if groups:
        desc.update(label_groups=groups, label_names=[v for g in groups for v in g['values']])
    snapshot.save_snapshot(str(path), dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    return G


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('paint')
    write_phantom_cases(root / 'cases', 2, seed=1, shape=SHAPE, progress=False)
    G3 = _paint_snapshot(root / 'paint3d.pt', [32, 32, 32])
    G2 = _paint_snapshot(root / 'paint2d.pt', 16, c_dim=2,
                         groups=[{'name': 'plane', 'values': ['axial', 'coronal']}])
    torch.manual_seed(0)
    joint = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=[16, 16, 16], img_channels=7, **TINY)
    snapshot.save_snapshot(str(root / 'joint.pt'), dict(G=joint, D=None, G_ema=joint, augment_pipe=None),
                           dataset={'kind': 'volumes', 'channels': CHANNELS[:4] + CHANNELS[5:]})
    cases = brats.discover_cases(root / 'cases')
    # a small drawn tumour (1 mm voxels, as the phantoms): SNFH around ET around NETC; the phantoms' own tumours
    # are large for brains this small
    g = np.indices((9, 9, 9)) - 4
    r = np.sqrt((g ** 2).sum(0))
    small = np.select([r <= 1, r <= 2.2, r <= 3.6], [1, 3, 2], 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(small, np.eye(4)), root / 'small.nii.gz')
    return dict(root=root, G3=G3, G2=G2, cases=cases, natives=[patches.load_native(c) for c in cases])


PLANES = {'label_groups': [{'name': 'plane', 'values': ['axial', 'coronal']}]}


def painter(data, dims):
    return Painter(data['G3']) if dims == '3d' else Painter(data['G2'], desc=PLANES)


def gen(*args):
    r = CliRunner().invoke(generate.main, [str(a) for a in args])
    return r


def one_line_error(r):
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip() and not ln.startswith('Painting ')]  # progress
    assert len(lines) == 1 and lines[0].startswith('Error:'), r.output
    return lines[0]


def syn_folders(outdir):
    return sorted(d for d in os.listdir(outdir) if d.startswith('BraTS-SYN')) if os.path.isdir(outdir) else []


# ---------------------------------------------------------------------------------------------------------------
# Placement


def test_placement_never_overlaps_the_tumour_or_itself_and_stays_inside_the_brain():
    g = np.indices((50, 50, 40))
    brain = ((g[0] - 25) ** 2 / 22 ** 2 + (g[1] - 25) ** 2 / 22 ** 2 + (g[2] - 20) ** 2 / 17 ** 2) < 1
    tumour = np.zeros_like(brain)
    tumour[20:30, 18:28, 15:25] = True
    shape = np.zeros((7, 7, 7), np.uint8)
    shape[1:6, 1:6, 1:6] = 2
    shape[2:5, 2:5, 2:5] = 3
    edge, margin = 2, 2
    for seed in range(3):
        rng = np.random.default_rng(seed)
        placer = Placer(brain, tumour, dilation=2, edge=edge, margin=margin)
        placed = []
        for _ in range(8):
            labels, record = transform_shape(shape, rng)
            p, why = placer.place(labels, rng, record)
            assert (p is None) != (why is None)
            if p is not None:
                placed.append(p)
        assert len(placed) >= 3
        inside = ndimage.distance_transform_edt(np.pad(brain, 1))[1:-1, 1:-1, 1:-1] > edge
        far = ndimage.distance_transform_edt(~tumour) > margin
        taken = np.zeros_like(brain)
        for p in placed:
            region = np.zeros_like(brain)
            region[p.region_box] = p.region
            tumour_new = np.zeros_like(brain)
            tumour_new[p.box] = p.labels > 0
            assert (tumour_new <= region).all()                     # the tumour lies in its repaint region
            assert inside[region].all() and far[region].all()       # inside the brain, clear of the tumour
            assert not (ndimage.distance_transform_edt(~taken) <= margin)[region].any()  # clear of earlier ones
            taken |= region


def test_a_shape_larger_than_the_patch_is_refused_with_the_reason():
    brain = np.ones((60, 60, 60), bool)
    placer = Placer(brain, None, dilation=3, max_region=(16, 16, 16))
    p, why = placer.place(np.full((14, 5, 5), 2, np.uint8), np.random.default_rng(0))
    assert p is None and "patch (16x16x16)" in why and '20x11x11' in why


# ---------------------------------------------------------------------------------------------------------------
# Insertion, healing, moving (library)


def _seg_file(native):
    return np.asarray(nib.load(str(native.source.files.seg)).dataobj)


@pytest.mark.parametrize('dims', ['3d', '2d'])
def test_insert_paints_inside_the_region_only_and_adds_the_labels(data, tmp_path, dims):
    native = data['natives'][0]
    p2 = painter(data, dims)
    source = label_sources.open_label_source(data['root'] / 'small.nii.gz', p2.ndim)
    result = insert_tumours(p2, native, source, 3, np.random.default_rng(1))
    assert result.placements, result.failures
    changed = np.abs(result.images - native.images).max(axis=0) > 0
    assert changed.any() and not (changed & ~result.region).any()
    assert not (result.region & ~native.brain).any() and not (result.region & (native.seg > 0)).any()
    new = result.seg != native.seg
    assert (native.seg[new] == 0).all() and (result.seg[new] > 0).all() and (new <= result.region).all()
    for p in result.placements:
        if dims == '2d':
            assert sorted(p['size'])[0] == 1 and p['plane'] in ('axial', 'coronal')  # a slab in its plane
    # the case folder: the source's grid, affine, dtype, and its own voxels outside the region
    out = case_output.write_case(tmp_path, 'BraTS-SYN-00000-000', native, result, {'source_case': native.case_id})
    region_src = native.to_source(result.region)
    for m in brats.MODALITIES:
        src_img = nib.load(str(native.source.files.files[m]))
        img = nib.load(os.path.join(out, f'BraTS-SYN-00000-000-{m}.nii.gz'))
        src, got = np.asarray(src_img.dataobj), np.asarray(img.dataobj)
        assert got.shape == src.shape and got.dtype == src.dtype
        assert np.array_equal(img.affine, src_img.affine)
        assert int(img.header['sform_code']) == int(src_img.header['sform_code'])
        assert np.array_equal(got[~region_src], src[~region_src])
        assert not np.array_equal(got[region_src], src[region_src])
    seg_img = nib.load(os.path.join(out, 'BraTS-SYN-00000-000-seg.nii.gz'))
    seg = np.asarray(seg_img.dataobj)
    assert np.array_equal(seg_img.affine, nib.load(str(native.source.files.seg)).affine)
    assert np.array_equal(seg, native.to_source(result.seg).astype(seg.dtype))
    old = _seg_file(native)
    assert np.array_equal(seg[old > 0], old[old > 0])  # old labels kept, new ones added
    sidecar = json.load(open(os.path.join(out, 'BraTS-SYN-00000-000-painting.json')))
    assert sidecar['source_case'] == native.case_id and len(sidecar['placements']) == len(result.placements)


def test_the_label_map_changes_what_is_painted(data):
    native = data['natives'][0]
    p3 = painter(data, '3d')
    source = label_sources.open_label_source(data['root'] / 'small.nii.gz', 3)
    a = insert_tumours(p3, native, source, 1, np.random.default_rng(3))
    p = a.placements[0]
    b_labels = np.zeros(native.shape, np.uint8)  # the same region painted healthy instead: other voxels
    mask = a.region
    painted = a.images.copy()
    painted[:, mask] = native.images[:, mask]
    centre = tuple(p['centre'])
    p3.paint_at(painted, [0, 1, 2, 3], centre, mask, b_labels, p3.z(np.random.default_rng(3)),
                     np.zeros([0], np.float32))
    assert not np.allclose(painted[:, mask], a.images[:, mask])


def test_heal_leaves_seg_zero_in_the_healed_region(data):
    native = data['natives'][1]
    for dims in ('3d', '2d'):
        result = heal_case(painter(data, dims), native, np.random.default_rng(0))
        assert result.healed['voxels'] > 0 and (native.seg > 0).sum() == result.healed['tumour_voxels']
        assert (result.region >= (native.seg > 0)).all() and (result.seg[result.region] == 0).all()
        changed = np.abs(result.images - native.images).max(axis=0) > 0
        assert not (changed & ~result.region).any()
        assert np.array_equal(result.seg[~result.region], native.seg[~result.region])


def test_move_heals_then_paints_the_tumour_elsewhere(data):
    native = data['natives'][1]
    result = move_tumour(painter(data, '2d'), native, np.random.default_rng(0), margin=1, edge=1)
    assert result.healed['voxels'] > 0 and len(result.placements) == 1, result.failures
    moved = (result.seg > 0) & (native.seg == 0)
    assert moved.any() and not (moved & (native.seg > 0)).any()
    assert (result.seg[native.seg > 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Label sources


def test_label_sources_archive_joint_snapshot_and_nifti(data, tmp_path):
    rng = np.random.default_rng(0)
    # a joint snapshot: the decoded seg channels of a seeded sample
    joint = label_sources.open_label_source(data['root'] / 'joint.pt', 3)
    shape = joint.draw(rng)
    assert shape.labels.ndim == 3 and shape.labels.max() <= 3 and 'seed' in shape.origin
    # a drawn NIfTI: a shape (values 1-3), for a 2D painter one slab of it
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:12, 6:13, 7:11] = 2
    lab[7:10, 8:11, 8:10] = 3
    nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / 'drawn.nii.gz')
    drawn = label_sources.open_label_source(tmp_path / 'drawn.nii.gz', 2)
    slab = drawn.draw(rng, 'coronal')
    assert slab.labels.shape[1] == 1 and slab.spacing == (2.0, 2.0, 2.0) and set(np.unique(slab.labels)) <= {0, 2, 3}
    # a volume archive converted with --with-seg
    r = CliRunner().invoke(dataset_tool.main, ['--no-progress', '--source', str(data['root'] / 'cases'), '--dest',
                                               str(tmp_path / 'v16.zip'), '--kind', 'volumes', '--volume-size', '16',
                                               '--modalities', 'all', '--with-seg'])
    assert r.exit_code == 0, r.output
    cases = label_sources.open_label_source(data['root'] / 'cases', 3)
    shape = cases.draw(rng)
    assert shape.labels.any() and shape.origin['case'].startswith('BraTS-PHT') and shape.spacing == (1.0, 1.0, 1.0)
    arch = label_sources.open_label_source(tmp_path / 'v16.zip', 3)
    shape = arch.draw(rng)
    assert shape.labels.any() and shape.spacing is not None and shape.origin['case'].startswith('BraTS-PHT')
    # a 3D patch archive (its tumour patches), and 2D slices: for a 2D painter, refused by a 3D one
    for kind, extra, dims in (('patches', ['--patch-size', '16,16,16'], 3), ('slices', ['--resolution', '16'], 2)):
        r = CliRunner().invoke(dataset_tool.main, ['--no-progress', '--source', str(data['root'] / 'cases'), '--dest',
                                                   str(tmp_path / f'{kind}.zip'), '--kind', kind, '--modalities', 'all',
                                                   '--with-seg', *extra])
        assert r.exit_code == 0, r.output
        shape = label_sources.open_label_source(tmp_path / f'{kind}.zip', dims).draw(rng, 'axial')
        assert shape.labels.any() and shape.labels.max() <= 3
        if dims == 2:
            assert shape.labels.shape[2] == 1  # a slab in the painter's (axial) plane
            with pytest.raises(label_sources.LabelSourceError, match='holds 2D label maps'):
                label_sources.open_label_source(tmp_path / f'{kind}.zip', 3)


# ---------------------------------------------------------------------------------------------------------------
# generate.py end to end


def test_cli_inserts_writes_cases_reruns_and_dataset_tool_reads_them(data, tmp_path):
    out = tmp_path / 'out'
    r = gen('--network', data['root'] / 'paint3d.pt', '--insert-into', data['root'] / 'cases', '--per-case', '2',
            '--labels-from', data['root'] / 'small.nii.gz', '--seeds', '0-1', '--outdir', out, '--device', 'cpu')
    assert r.exit_code == 0, r.output + repr(r.exception)
    folders = syn_folders(out)
    assert folders == ['BraTS-SYN-00000-000', 'BraTS-SYN-00000-001', 'BraTS-SYN-00001-000', 'BraTS-SYN-00001-001']
    assert 'tumour(s) placed' in r.output
    for f in folders:
        names = sorted(os.listdir(out / f))
        assert names == sorted([f'{f}-{k}.nii.gz' for k in ('t1n', 't1c', 't2w', 't2f', 'seg')]
                               + [f'{f}-montage.png', f'{f}-painting.json'])
        side = json.load(open(out / f / f'{f}-painting.json'))
        assert side['snapshot']['sha256'] and side['seed'] in (0, 1) and side['label_source']['kind'] == 'nifti'
    summary = json.load(open(out / 'painting-summary.json'))
    assert summary['placed'] >= 4
    stamp = os.path.getmtime(out / folders[0] / f'{folders[0]}-t1n.nii.gz')
    r = gen('--network', data['root'] / 'paint3d.pt', '--insert-into', data['root'] / 'cases', '--per-case', '2',
            '--labels-from', data['root'] / 'small.nii.gz', '--seeds', '0-1', '--outdir', out, '--device', 'cpu')
    assert r.exit_code == 0 and '4 already done' in r.output, r.output
    assert os.path.getmtime(out / folders[0] / f'{folders[0]}-t1n.nii.gz') == stamp
    # the output is a BraTS collection dataset_tool.py converts (montages and sidecars are passed over)
    r = CliRunner().invoke(dataset_tool.main, ['--no-progress', '--source', str(out), '--dest', str(tmp_path / 'v.zip'),
                                               '--kind', 'volumes', '--volume-size', '16', '--modalities', 'all',
                                               '--with-seg'])
    assert r.exit_code == 0, r.output
    import zipfile
    with zipfile.ZipFile(tmp_path / 'v.zip') as z:
        assert sorted(json.loads(z.read('dataset.json'))['cases']) == folders


def test_cli_heal_and_move(data, tmp_path):
    r = gen('--network', data['root'] / 'paint3d.pt', '--insert-into', data['root'] / 'cases', '--heal',
            '--outdir', tmp_path / 'healed', '--device', 'cpu')
    assert r.exit_code == 0, r.output
    for n, native in enumerate(data['natives']):
        seg = np.asarray(nib.load(tmp_path / f'healed/BraTS-SYN-{n:05d}-000/BraTS-SYN-{n:05d}-000-seg.nii.gz').dataobj)
        assert not seg.any()  # every tumour healed: seg 0 where it was
    r = gen('--network', data['root'] / 'paint2d.pt', '--insert-into', data['root'] / 'cases', '--move',
            '--dilation', '2', '--margin', '1', '--outdir', tmp_path / 'moved', '--device', 'cpu')
    assert r.exit_code == 0, r.output
    assert syn_folders(tmp_path / 'moved')


def test_more_tumours_than_fit_are_reported_and_nothing_fitting_fails(data, tmp_path):
    r = gen('--network', data['root'] / 'paint3d.pt', '--insert-into', data['root'] / 'cases', '--per-case', '12',
            '--tries', '2', '--labels-from', data['root'] / 'small.nii.gz', '--outdir', tmp_path / 'many', '--device', 'cpu')
    assert r.exit_code == 0, r.output
    assert 'not placed (2 shapes tried)' in r.output and syn_folders(tmp_path / 'many')
    r = gen('--network', data['root'] / 'paint3d.pt', '--insert-into', data['root'] / 'cases', '--margin', '40',
            '--tries', '1', '--labels-from', data['root'] / 'cases', '--outdir', tmp_path / 'none', '--device', 'cpu')
    assert 'nothing could be painted' in one_line_error(r)
    assert not syn_folders(tmp_path / 'none')


def test_bad_inputs_give_one_line_and_write_nothing(data, tmp_path):
    root = data['root']
    out = tmp_path / 'out'
    base = ['--network', root / 'paint3d.pt', '--insert-into', root / 'cases', '--outdir', out, '--device', 'cpu']
    # a label NIfTI on another grid, painted where it was drawn
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[3:6, 3:6, 3:6] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / 'other-grid.nii.gz')
    line = one_line_error(gen(*base, '--labels-from', tmp_path / 'other-grid.nii.gz', '--labels-as-drawn'))
    assert 'other-grid.nii.gz' in line and 'grid' in line
    # a label NIfTI with values that are no labels
    nib.save(nib.Nifti1Image(lab * 5, np.eye(4)), tmp_path / 'fives.nii.gz')
    assert 'values must be 0-3' in one_line_error(gen(*base, '--labels-from', tmp_path / 'fives.nii.gz'))
    # a paint snapshot where a joint one is expected, and the reverse
    assert 'is a paint snapshot' in one_line_error(gen(*base, '--labels-from', root / 'paint2d.pt'))
    line = one_line_error(gen('--network', root / 'joint.pt', '--insert-into', root / 'cases', '--labels-from',
                              root / 'cases', '--outdir', out, '--device', 'cpu'))
    assert 'is not a paint snapshot' in line
    line = one_line_error(gen('--network', root / 'paint3d.pt', '--seeds', '0', '--outdir', out, '--device', 'cpu'))
    assert 'this is a paint snapshot; use --insert-into' in line
    # a 2D label source for a volume painter
    # a case whose brain is empty (every modality zero)
    empty = tmp_path / 'empty'
    shutil.copytree(root / 'cases' / data['cases'][0].case_id, empty / 'BraTS-PHT-00009-000')
    for m in brats.MODALITIES:
        src = next((empty / 'BraTS-PHT-00009-000').glob(f'*-{m}.nii.gz'))
        img = nib.load(src)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine, img.header),
                 empty / 'BraTS-PHT-00009-000' / f'BraTS-PHT-00009-000-{m}.nii.gz')
        if src.name != f'BraTS-PHT-00009-000-{m}.nii.gz':
            os.remove(src)
    for f in (empty / 'BraTS-PHT-00009-000').glob('BraTS-PHT-00001*'):
        os.rename(f, str(f).replace('BraTS-PHT-00001', 'BraTS-PHT-00009'))
    line = one_line_error(gen('--network', root / 'paint3d.pt', '--insert-into', empty, '--heal', '--outdir', out,
                              '--device', 'cpu'))
    assert 'BraTS-PHT-00009-000' in line
    assert not syn_folders(out)
    with pytest.raises(PaintError, match='not a paint snapshot'):
        Painter(snapshot.load_snapshot(str(root / 'joint.pt')).G_ema)
