"""generate.py on a volume snapshot (mri/output/volumes.py, mri/volume_space.py): NIfTI per modality and the tumour
labels with the archive's affine, three-plane montages, --native-grid back onto the original grid, and snapshots of
the wrong kind refused in one line with nothing written."""

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import dataset_tool
import generate
from mri.output import volumes as volume_output
from mri import volume_space
from tests.test_dataset_tool import REAL, needs_real, write_case
from torch_utils import snapshot

MODALITIES = ('t1n', 't1c', 't2w', 't2f')


def convert(source, dest, size, *extra):
    r = CliRunner().invoke(dataset_tool.main, ['--no-progress', '--source', str(source), '--dest', str(dest), '--kind',
                                               'volumes', '--volume-size', str(size), '--modalities', 'all', '--with-seg',
                                               *extra])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(dest) as z:
        meta = json.loads(z.read('dataset.json'))
    from training.dataset import ImageFolderDataset
    ds = ImageFolderDataset(str(dest))  # the volumes as training sees them: seg as three one-hot channels
    vols = {ds.image_fname(i): ds[i][0] for i in range(len(ds))}
    return meta, vols


def as_generated(stored):
    """An archive volume as G would give it: floats in [-1, 1]."""
    return stored.astype(np.float32) / 65535 * 2 - 1


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('vol')
    for k, cid in enumerate(['BraTS-GLI-00001-000', 'BraTS-SSA-00002-000', 'BraTS-GLI-00003-000']):
        write_case(root / 'src' / cid, cid, seed=k)
    meta, vols = convert(root / 'src', root / 'v16.zip', 16, '--labels', 'cohort')
    from training.networks import Generator
    from training.dataset import ImageFolderDataset
    ds = ImageFolderDataset(str(root / 'v16.zip'), use_labels=True)
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=ds.label_dim, w_dim=8, img_resolution=[16, 16, 16], img_channels=7,
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    net = root / 'network-snapshot-000000.pt'
    snapshot.save_snapshot(str(net), dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=ds.describe())
    return dict(root=root, meta=meta, vols=vols, net=net)


def gen(*args):
    return CliRunner().invoke(generate.main, [str(a) for a in args])


def test_generate_writes_nifti_with_the_archive_affine(data, tmp_path):
    r = gen('--network', data['net'], '--seeds', '0-1', '--class', 'ssa', '--outdir', tmp_path / 'out')
    assert r.exit_code == 0, r.output + repr(r.exception)
    space = data['meta']['space']
    ref = data['meta']['space']['reference_case']
    assert np.allclose(space['affine'], data['meta']['affines'][f'{ref}/{ref}.npy'])  # the reference case's grid
    for seed in (0, 1):
        stem = tmp_path / f'out/seed{seed:04d}'
        for m in MODALITIES:
            img = nib.load(f'{stem}-{m}.nii.gz')
            assert img.shape == (16, 16, 16) and np.allclose(img.affine, space['affine'])
            assert nib.aff2axcodes(img.affine) == ('R', 'A', 'S') and int(img.header['sform_code']) == 1
            x = np.asarray(img.dataobj)
            assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        seg = nib.load(f'{stem}-seg.nii.gz')
        assert np.allclose(seg.affine, space['affine']) and seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}
        w, h = Image.open(f'{stem}-montage.png').size  # 4 modalities + the label overlay, 3 planes of 16
        assert h == 5 * 16 + 20 and w > 3 * 16  # a title line (seed and class) and a margin naming the rows
    # Conditioning by name reaches G; --class all gives every cohort and a grid with a band per class.
    r = gen('--network', data['net'], '--seeds', '0', '--class', 'gli', '--outdir', tmp_path / 'gli')
    assert r.exit_code == 0
    assert not np.allclose(nib.load(tmp_path / 'gli/seed0000-t1n.nii.gz').get_fdata(),
                           nib.load(tmp_path / 'out/seed0000-t1n.nii.gz').get_fdata())
    r = gen('--network', data['net'], '--seeds', '0-1', '--class', 'all', '--outdir', tmp_path / 'all')
    assert r.exit_code == 0 and 'Classes of' in r.output and 'gli | ssa' in r.output
    from training import grids  # a band per class named at its left, a cell per seed: its montage (5 rows, 3 planes)
    margin = grids.name_margin([('gli', 2), ('ssa', 2)])
    plan = grids.plan_sheet([2, 2], (5 * 16, 3 * 16), margin)
    assert Image.open(tmp_path / 'all/class_grid.png').size == (plan.width, plan.height)
    assert (tmp_path / 'all/seed0001-ssa-seg.nii.gz').is_file()


def test_real_labels_survive_the_round_trip(data, tmp_path):
    """An archive volume written as NIfTI: labels exactly those of the archive, on the archive's grid; mapped back
    with --native-grid, on the original file's grid (its shape, affine and voxel order)."""
    rel, stored = next(iter(data['vols'].items()))
    case = rel.split('/')[0]
    channels = data['meta']['channels']
    space = dict(data['meta']['space'], affine=data['meta']['affines'][rel], native=data['meta']['native_grids'][case])
    volume_output.write_volume(as_generated(stored), channels, str(tmp_path / 'a'), space)
    labels = np.asarray(nib.load(tmp_path / 'a-seg.nii.gz').dataobj)
    expected = np.zeros(stored.shape[1:], np.uint8)
    for k in range(3):
        expected[stored[4 + k] > 0] = k + 1
    assert np.array_equal(labels, expected) and expected.max() > 0

    volume_output.write_volume(as_generated(stored), channels, str(tmp_path / 'n'), space, native_grid=True)
    original = nib.load(data['root'] / 'src' / case / f'{case}-seg.nii.gz')
    native = nib.load(tmp_path / 'n-seg.nii.gz')
    assert native.shape == original.shape == (20, 24, 16) and np.allclose(native.affine, original.affine)
    t1n = nib.load(tmp_path / 'n-t1n.nii.gz')
    brain = np.asarray(nib.load(data['root'] / 'src' / case / f'{case}-t1n.nii.gz').dataobj) != 0
    inside = np.asarray(t1n.dataobj) > 0.05
    centre = lambda mask: np.array(np.nonzero(mask)).mean(axis=1)  # noqa: E731
    assert np.abs(centre(inside) - centre(brain)).max() < 0.25  # the brain lands where it was (blurred by 20->16->20)
    assert (inside & brain).sum() / (inside | brain).sum() > 0.6


def test_native_grid_is_exact_without_zoom(tmp_path):
    """With the output size equal to the cube side the resampling is the identity: --native-grid gives back the
    original label map voxel for voxel, in the original (LPS-ordered) file's layout."""
    write_case(tmp_path / 'src' / 'BraTS-GLI-00001-000', 'BraTS-GLI-00001-000')
    probe, _ = convert(tmp_path / 'src', tmp_path / 'p.zip', 8)
    cube = probe['native_grids']['BraTS-GLI-00001-000']['cube']
    meta, vols = convert(tmp_path / 'src', tmp_path / 'c.zip', cube)
    record = meta['native_grids']['BraTS-GLI-00001-000']
    stored = next(iter(vols.values()))
    labels = volume_output.split_channels(as_generated(stored), meta['channels'])[1]
    native, affine = volume_space.to_native(labels, record, labels=True)
    original = nib.load(tmp_path / 'src/BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz')
    assert np.array_equal(native, np.asarray(original.dataobj)) and np.allclose(affine, original.affine)


@needs_real
def test_real_case_native_grid(tmp_path):
    meta, vols = convert(REAL, tmp_path / 'r.zip', 32)
    case = 'BraTS-GLI-00000-000'
    space = meta['space']
    assert space['reference_case'] == case and space['native']['shape'] == [240, 240, 155]
    labels = volume_output.split_channels(as_generated(next(iter(vols.values()))), meta['channels'])[1]
    seg, affine = volume_space.to_native(labels, space['native'], labels=True)
    original = nib.load(REAL / case / f'{case}-seg.nii.gz')
    assert seg.shape == (240, 240, 155) and np.allclose(affine, original.affine)
    a, b = seg > 0, np.asarray(original.dataobj) > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8  # whole tumour, after 32^3 and back


def test_wrong_kind_of_snapshot_is_refused(data, tmp_path):
    from training.networks import Generator
    G2 = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=1, mapping_kwargs=dict(num_layers=1),
                   channel_base=64, channel_max=8)
    net2 = tmp_path / 'net2d.pt'
    snapshot.save_snapshot(str(net2), dict(G=G2, D=None, G_ema=G2, augment_pipe=None), dataset=dict(kind='slices'))
    cases = [(net2, ['--native-grid'], f'Error: --native-grid: {net2} is a 2D (slices) snapshot; NIfTI output needs'),
             (net2, ['--format', 'nifti'], f'Error: --format nifti: {net2} is a 2D (slices) snapshot'),
             (data['net'], ['--format', 'png16', '--class', 'gli'],
              f'Error: --format png16: {data["net"]} is a volume snapshot; use --format nifti')]
    for net, extra, message in cases:
        out = tmp_path / 'never'
        r = gen('--network', net, '--seeds', '0', '--outdir', out, *extra)
        assert r.exit_code == 1 and r.output.startswith(message) and r.output.count('\n') == 1, r.output
        assert not out.exists()
    # A snapshot whose archive space is gone: 1 mm RAS, said in one line.
    desc = dict(snapshot.load_snapshot(str(data['net'])).dataset, space=None, path=str(tmp_path / 'moved.zip'))
    space = volume_output.resolve_space(desc, [16, 16, 16])
    assert np.allclose(np.diag(space['affine'])[:3], 1) and space['native'] is None
