"""generate.py --format brats|nnunet (mri/output/datasets.py, mri/output/manifest.py): the BraTS and nnU-Net v2 raw
layouts from joint snapshots (2D and 3D), real cases added, --balance, the manifest and --from-manifest bit for bit,
resuming, torchrun sharding, the privacy gate's hook, and bad input refused in one line with nothing written."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from torch_utils import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANNELS = ['t1n', 't1c', 't2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et']


def make_snapshot(path, volumes, channels=CHANNELS, res=16):
    """A tiny joint generator (two cohort classes) saved as a snapshot with its dataset description."""
    from training.networks import Generator
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=[res] * 3 if volumes else res,
                  img_channels=len(channels), mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    shape = [len(channels)] + [res] * (3 if volumes else 2)
    desc = dict(channels=list(channels), label_names=['gli', 'ssa'],
                label_groups=[{'name': 'cohort', 'values': ['gli', 'ssa']}], kind='volumes' if volumes else 'slices',
                image_shape=shape, resolution=res)
    snapshot.save_snapshot(str(path), dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    return str(path)


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp('nets')
    return dict(vol=make_snapshot(root / 'vol.pt', True), slc=make_snapshot(root / 'slc.pt', False),
                nolabel=make_snapshot(root / 'nolabel.pt', False, channels=CHANNELS[:4]), root=root)


@pytest.fixture(scope='module')
def real_cases(tmp_path_factory):
    from mri.sources.phantom import write_phantom_cases
    root = tmp_path_factory.mktemp('real')
    write_phantom_cases(str(root / 'cases'), 2, seed=0, shape=(24, 24, 16), progress=False)
    return str(root / 'cases')


def gen(*args):
    r = CliRunner().invoke(generate.main, [str(a) for a in args])
    return r


def ok(*args):
    r = gen(*args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def tree_hashes(folder, skip=('manifest.json',)):
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, '**', '*'), recursive=True)):
        if os.path.isfile(path) and os.path.basename(path) not in skip:
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def check_nnunet_layout(folder):
    """nnU-Net v2's raw dataset format (documentation/dataset_format.md), checked without nnU-Net: dataset.json's
    required keys, CASE_XXXX image names for every channel, a label per case with the declared values, geometry."""
    with open(os.path.join(folder, 'dataset.json')) as f:
        meta = json.load(f)
    for key in ('channel_names', 'labels', 'numTraining', 'file_ending'):
        assert key in meta, key
    ending, nch = meta['file_ending'], len(meta['channel_names'])
    assert list(meta['channel_names']) == [str(i) for i in range(nch)]
    labels = sorted(f[:-len(ending)] for f in os.listdir(os.path.join(folder, 'labelsTr')) if f.endswith(ending))
    assert len(labels) == meta['numTraining']
    images = sorted(os.listdir(os.path.join(folder, 'imagesTr')))
    assert images == sorted(f'{c}_{k:04d}{ending}' for c in labels for k in range(nch))
    assert meta['labels']['background'] == 0
    declared = set()
    for value in meta['labels'].values():
        declared |= set(value if isinstance(value, list) else [value])
    if any(isinstance(v, list) for v in meta['labels'].values()):
        assert len(meta['regions_class_order']) == len(meta['labels']) - 1
    for case in labels:
        lab_path = os.path.join(folder, 'labelsTr', case + ending)
        if ending == '.png':
            lab = np.array(PIL.Image.open(lab_path))
            img = np.array(PIL.Image.open(os.path.join(folder, 'imagesTr', f'{case}_0000.png')))
            assert img.dtype == np.uint16 and lab.dtype == np.uint8 and img.shape == lab.shape
        else:
            lab_img = nib.load(lab_path)
            lab = np.asarray(lab_img.dataobj)
            for k in range(nch):
                img = nib.load(os.path.join(folder, 'imagesTr', f'{case}_{k:04d}{ending}'))
                assert img.shape == lab_img.shape and np.allclose(img.affine, lab_img.affine)
        assert set(np.unique(lab).tolist()) <= declared
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def test_nnunet_3d_layout_and_dataset_json(nets, tmp_path):
    out = tmp_path / 'Dataset501_Syn'
    ok('--network', nets['vol'], '--seeds', '0-1', '--class', 'all', '--format', 'nnunet', '--outdir', out)
    meta = check_nnunet_layout(str(out))
    assert meta['channel_names'] == {'0': 't1n', '1': 't1c', '2': 't2w', '3': 't2f'}
    # BraTS 2023 labels (1 NETC, 2 SNFH, 3 ET) as regions, the way nnU-Net's BraTS conversion declares them
    assert meta['labels'] == {'background': 0, 'whole tumor': [1, 2, 3], 'tumor core': [1, 3], 'enhancing tumor': [3]}
    assert meta['regions_class_order'] == [2, 1, 3] and meta['file_ending'] == '.nii.gz' and meta['numTraining'] == 4
    img = nib.load(str(out / 'imagesTr' / 'BraTS-SYN-00001-001_0002.nii.gz'))
    x = np.asarray(img.dataobj)
    assert img.shape == (16, 16, 16) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert nib.load(str(out / 'labelsTr' / 'BraTS-SYN-00001-001.nii.gz')).get_data_dtype() == np.uint8
    side = json.loads((out / 'provenance' / 'BraTS-SYN-00001-001.json').read_text())
    assert side['seed'] == 1 and side['class'] == 'ssa' and side['snapshot_sha256'] == snapshot_sha(nets['vol'])


def snapshot_sha(path):
    from dnnlib.util import sha256_file
    return sha256_file(path)


def test_nnunet_labels_without_regions(nets, tmp_path):
    ok('--network', nets['vol'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet', '--regions=0', '--outdir', tmp_path / 'd')
    meta = check_nnunet_layout(str(tmp_path / 'd'))
    assert meta['labels'] == {'background': 0, 'NETC': 1, 'SNFH': 2, 'ET': 3} and 'regions_class_order' not in meta


def test_nnunet_2d_is_png(nets, tmp_path):
    out = tmp_path / 'd2'
    ok('--network', nets['slc'], '--seeds', '0-2', '--class', 'gli', '--format', 'nnunet', '--outdir', out)
    meta = check_nnunet_layout(str(out))
    assert meta['file_ending'] == '.png' and meta['numTraining'] == 3


def test_brats_layout_reads_back_as_brats_cases(nets, tmp_path):
    from mri.sources import brats
    out = tmp_path / 'b'
    ok('--network', nets['vol'], '--seeds', '3', '--class', 'all', '--format', 'brats', '--outdir', out)
    found = brats.discover_cases(str(out))
    assert [c.case_id for c in found] == ['BraTS-SYN-00003-000', 'BraTS-SYN-00003-001']
    seg = np.asarray(nib.load(str(found[1].seg)).dataobj)
    assert found[1].seg is not None and seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
    assert (out / 'BraTS-SYN-00003-001' / 'BraTS-SYN-00003-001-generation.json').is_file()
    assert not [n for n in os.listdir(out) if n.startswith('.')]


def test_with_real_cases_join_the_dataset(nets, real_cases, tmp_path):
    out = tmp_path / 'mix'
    ok('--network', nets['vol'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet', '--with-real', real_cases,
       '--outdir', out)
    meta = check_nnunet_layout(str(out))
    assert meta['numTraining'] == 3
    real = sorted(os.listdir(real_cases))
    for case in real:  # the real scans as they were, byte for byte
        src = os.path.join(real_cases, case, f'{case}-t2f.nii.gz')
        with open(src, 'rb') as a, open(out / 'imagesTr' / f'{case}_0003.nii.gz', 'rb') as b:
            assert a.read() == b.read()
    manifest = json.loads((out / 'manifest.json').read_text())
    assert [c['case'] for c in manifest['cases'] if c.get('real')] == real


def test_balance_draws_classes_in_turn(nets, tmp_path):
    out = tmp_path / 'bal'
    ok('--network', nets['slc'], '--seeds', '0-4', '--balance', '--format', 'nnunet', '--outdir', out)
    manifest = json.loads((out / 'manifest.json').read_text())
    classes = [c['class'] for c in manifest['cases']]
    assert classes == ['gli', 'ssa', 'gli', 'ssa', 'gli'] and len(manifest['cases']) == 5


@pytest.mark.parametrize('kind', ['vol', 'slc', 'painted'])
def test_nnunet_integrity_check_passes(nets, real_cases, tmp_path, kind, request):
    pytest.importorskip('nnunetv2')
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    out = tmp_path / 'Dataset502_Syn'
    if kind == 'painted':
        paint = request.getfixturevalue('paint')
        ok('--network', paint / 'paint.pt', '--insert-into', paint / 'cases', '--labels-from', paint / 'small.nii.gz',
           '--device', 'cpu', '--format', 'nnunet', '--with-real', real_cases, '--outdir', out)
    else:
        extra = ['--with-real', real_cases] if kind == 'vol' else []
        ok('--network', nets[kind], '--seeds', '0-1', '--class', 'all', '--format', 'nnunet', '--outdir', out, *extra)
    verify_dataset_integrity(str(out), 1)  # raises on any problem


# ---------------------------------------------------------------------------------------------------------------
# Provenance


def test_manifest_regenerates_the_dataset_bit_for_bit(nets, tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    ok('--network', nets['vol'], '--seeds', '0-2', '--class', 'all', '--format', 'brats', '--trunc', '0.7',
       '--outdir', a)
    manifest = json.loads((a / 'manifest.json').read_text())
    assert manifest['snapshot']['sha256'] == snapshot_sha(nets['vol']) and manifest['status'] == 'complete'
    assert manifest['options']['truncation_psi'] == 0.7 and manifest['options']['trunc_center'] == 'class'
    assert len(manifest['cases']) == 6 and manifest['code_version'] and manifest['date']
    ok('--from-manifest', a / 'manifest.json', '--outdir', b)
    assert tree_hashes(str(a)) == tree_hashes(str(b)) and len(tree_hashes(str(a))) == 6 * 6
    again = json.loads((b / 'manifest.json').read_text())
    assert again['cases'] == manifest['cases'] and again['options'] == manifest['options']


def test_trunc_center_changes_truncated_samples(nets, tmp_path):
    for center in ('class', 'global'):
        ok('--network', nets['slc'], '--seeds', '0', '--class', 'ssa', '--format', 'nnunet', '--trunc', '0.5',
           '--trunc-center', center, '--outdir', tmp_path / center)
    a = tree_hashes(str(tmp_path / 'class'), skip=('manifest.json', 'BraTS-SYN-00000-000.json'))
    b = tree_hashes(str(tmp_path / 'global'), skip=('manifest.json', 'BraTS-SYN-00000-000.json'))
    assert a.keys() == b.keys() and a != b


def test_killed_export_resumes(nets, tmp_path, monkeypatch):
    from mri.output import datasets
    clean, out = tmp_path / 'clean', tmp_path / 'out'
    ok('--network', nets['vol'], '--seeds', '0-3', '--class', 'gli', '--format', 'nnunet', '--outdir', clean)
    real_write = datasets.DatasetWriter.write
    calls = []

    def dying_write(self, *args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while writing the third case
        return real_write(self, *args, **kwargs)
    monkeypatch.setattr(datasets.DatasetWriter, 'write', dying_write)
    r = gen('--network', nets['vol'], '--seeds', '0-3', '--class', 'gli', '--format', 'nnunet', '--outdir', out)
    assert r.exit_code != 0
    assert json.loads((out / 'manifest.json').read_text())['status'] == 'running'
    assert not (out / 'dataset.json').exists()
    monkeypatch.setattr(datasets.DatasetWriter, 'write', real_write)
    calls.clear()
    monkeypatch.setattr(datasets.DatasetWriter, 'write', lambda self, *a, **k: calls.append(a[1]) or real_write(self, *a, **k))
    ok('--network', nets['vol'], '--seeds', '0-3', '--class', 'gli', '--format', 'nnunet', '--outdir', out)
    assert calls == ['BraTS-SYN-00002-000', 'BraTS-SYN-00003-000']  # the finished cases were skipped
    assert tree_hashes(str(out)) == tree_hashes(str(clean))


class StandInGate:
    """What metrics.privacy.PrivacyGate promises (session interface): check() per sample, report() at the end."""

    def __init__(self, drop):
        self.drop, self.seen, self.reported = drop, [], None

    def check(self, sample, channels, name):
        assert sample.ndim == 4 and channels == CHANNELS
        self.seen.append(name)
        return {'keep': name not in self.drop, 'nn_ssim': 0.99 if name in self.drop else 0.2, 'nn_mse': 0.01,
                'nn_index': 3, 'nn_name': 'case3/slice.npy'}

    def report(self, outdir):
        self.reported = outdir
        path = os.path.join(outdir, 'privacy-report.json')
        with open(path, 'w') as f:
            json.dump({'seen': self.seen}, f)
        return [path]


def test_privacy_gate_drops_and_records(nets, tmp_path):
    gate = StandInGate(drop={'BraTS-SYN-00001-000'})
    out = str(tmp_path / 'g')
    generate.generate_images(nets['vol'], [0, 1, 2], out, 'gli', fmt='nnunet', device='cpu', verbose=False, gate=gate)
    assert gate.seen == ['BraTS-SYN-00000-000', 'BraTS-SYN-00001-000', 'BraTS-SYN-00002-000'] and gate.reported == out
    manifest = json.loads(open(os.path.join(out, 'manifest.json')).read())
    assert [c['case'] for c in manifest['cases']] == ['BraTS-SYN-00000-000', 'BraTS-SYN-00002-000']
    assert manifest['dropped'][0]['case'] == 'BraTS-SYN-00001-000' and manifest['dropped'][0]['privacy']['nn_ssim'] == 0.99
    assert manifest['cases'][0]['privacy'] == {'keep': True, 'nn_ssim': 0.2, 'nn_mse': 0.01, 'nn_index': 3,
                                               'nn_name': 'case3/slice.npy'}
    assert not glob.glob(os.path.join(out, '*Tr', 'BraTS-SYN-00001-000*'))
    assert json.load(open(os.path.join(out, 'dataset.json')))['numTraining'] == 2


def test_privacy_options_need_a_training_archive(nets, tmp_path):
    r = gen('--network', nets['vol'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet', '--max-nn-ssim', '0.9',
            '--outdir', tmp_path / 'p')
    assert r.exit_code != 0 and 'Error: ' in r.output and len(r.output.strip().splitlines()) == 1
    assert 'training archive' in r.output and not (tmp_path / 'p').exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def one_line_error(r, *words):
    assert r.exit_code != 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: '), r.output
    for w in words:
        assert w in lines[0], lines[0]


def test_outdir_holding_another_dataset_is_refused(nets, tmp_path):
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'dataset.json').write_text('{"labels": {}}')
    one_line_error(gen('--network', nets['vol'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet', '--outdir',
                       foreign), 'dataset.json')
    assert sorted(os.listdir(foreign)) == ['dataset.json']
    ours = tmp_path / 'ours'
    ok('--network', nets['vol'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet', '--outdir', ours)
    before = tree_hashes(str(ours), skip=())
    one_line_error(gen('--network', nets['vol'], '--seeds', '0', '--class', 'gli', '--format', 'brats', '--outdir',
                       ours), 'nnunet')
    one_line_error(gen('--network', nets['slc'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet', '--outdir',
                       ours), 'another snapshot')
    one_line_error(gen('--network', nets['vol'], '--seeds', '0-1', '--class', 'gli', '--format', 'nnunet', '--outdir',
                       ours), 'seeds')
    assert tree_hashes(str(ours), skip=()) == before


def test_no_label_channels_for_nnunet(nets, tmp_path):
    one_line_error(gen('--network', nets['nolabel'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet',
                       '--outdir', tmp_path / 'x'), 'label channels')
    assert not (tmp_path / 'x').exists()


def test_from_manifest_with_another_snapshot_is_refused(nets, tmp_path):
    ok('--network', nets['slc'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet', '--outdir', tmp_path / 'a')
    one_line_error(gen('--from-manifest', tmp_path / 'a' / 'manifest.json', '--network', nets['vol'], '--outdir',
                       tmp_path / 'b'), 'sha256')
    assert not (tmp_path / 'b').exists()
    (tmp_path / 'junk.json').write_text('{"a": 1}')
    one_line_error(gen('--from-manifest', tmp_path / 'junk.json', '--outdir', tmp_path / 'b'), 'not a manifest')


def test_real_cases_for_a_2d_dataset_are_refused(nets, real_cases, tmp_path):
    one_line_error(gen('--network', nets['slc'], '--seeds', '0', '--class', 'gli', '--format', 'nnunet',
                       '--with-real', real_cases, '--outdir', tmp_path / 'x'), '2D')
    assert not (tmp_path / 'x').exists()


# ---------------------------------------------------------------------------------------------------------------
# Painted cases


@pytest.fixture(scope='module')
def paint(tmp_path_factory):
    from mri.sources.phantom import write_phantom_cases
    from training.paint import PaintGenerator
    root = tmp_path_factory.mktemp('paint')
    write_phantom_cases(root / 'cases', 2, seed=1, shape=(64, 64, 40), progress=False)
    channels = ['t1n', 't1c', 't2w', 't2f', 'brain', 'seg_netc', 'seg_snfh', 'seg_et']
    torch.manual_seed(0)
    G = PaintGenerator(z_dim=8, c_dim=0, w_dim=8, img_resolution=[32, 32, 32], img_channels=len(channels),
                       channels=channels, mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8,
                       num_fp16_res=0, conv_clamp=None)
    desc = {'kind': 'patches', 'channels': channels, 'patch_size': [32, 32, 32],
            'normalization': {'method': 'percentile', 'low': 0.5, 'high': 99.5}}
    snapshot.save_snapshot(str(root / 'paint.pt'), dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    g = np.indices((9, 9, 9)) - 4
    r = np.sqrt((g ** 2).sum(0))
    small = np.select([r <= 1, r <= 2.2, r <= 3.6], [1, 3, 2], 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(small, np.eye(4)), str(root / 'small.nii.gz'))
    return root


def test_painted_cases_as_nnunet_dataset_with_manifest(paint, real_cases, tmp_path):
    args = ['--network', paint / 'paint.pt', '--insert-into', paint / 'cases', '--labels-from', paint / 'small.nii.gz',
            '--seeds', '0-2', '--balance', '--device', 'cpu', '--format', 'nnunet']
    out = tmp_path / 'Dataset503_Painted'
    ok(*args, '--with-real', real_cases, '--outdir', out)
    meta = check_nnunet_layout(str(out))
    manifest = json.loads((out / 'manifest.json').read_text())
    painted = [c for c in manifest['cases'] if not c.get('real')]
    folders = sorted(d for d in os.listdir(out / 'cases') if d.startswith('BraTS-SYN'))
    assert [c['case'] for c in painted] == folders and len(folders) >= 4  # a case where nothing fitted has none
    assert meta['numTraining'] == len(folders) + 2
    for c in painted:  # --balance: tumour sizes in turn, by seed
        assert c['size_bin'] == ['small', 'medium', 'large'][c['seed']]
    assert all(c['source_case'].startswith('BraTS-PHT') and c['placements'] for c in painted)
    assert manifest['options']['mode'] == 'insert' and manifest['snapshot']['sha256'] == snapshot_sha(paint / 'paint.pt')
    # the nnU-Net files are the painted case folders' own files (hard links or copies)
    case = folders[-1]
    with open(out / 'imagesTr' / f'{case}_0001.nii.gz', 'rb') as a, \
            open(out / 'cases' / case / f'{case}-t1c.nii.gz', 'rb') as b:
        assert a.read() == b.read()
    ok('--from-manifest', out / 'manifest.json', '--outdir', tmp_path / 'again')
    skip = ('manifest.json', 'painting-summary.json')
    assert tree_hashes(str(out), skip) == tree_hashes(str(tmp_path / 'again'), skip)


def test_painted_brats_dataset_refuses_a_foreign_outdir(paint, tmp_path):
    foreign = tmp_path / 'f'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    one_line_error(gen('--network', paint / 'paint.pt', '--insert-into', paint / 'cases', '--labels-from',
                       paint / 'small.nii.gz', '--format', 'brats', '--outdir', foreign, '--device', 'cpu'), 'not empty')
    assert os.listdir(foreign) == ['notes.txt']
    r = gen('--network', paint / 'paint.pt', '--insert-into', paint / 'cases', '--format', 'brats', '--outdir',
            tmp_path / 'new', '--device', 'cpu')  # no --labels-from: refused before any case, no folder left
    assert r.exit_code != 0 and 'labels-from' in r.output and not (tmp_path / 'new').exists()


# ---------------------------------------------------------------------------------------------------------------
# Scale


@pytest.mark.slow
def test_torchrun_two_gloo_processes_write_every_case_once(nets, tmp_path):
    single, multi = tmp_path / 'single', tmp_path / 'multi'
    env = dict(os.environ, OMP_NUM_THREADS='1')  # both one thread a process: float sums alike, so bytes alike
    res = subprocess.run([sys.executable, 'generate.py', '--network', nets['vol'], '--seeds', '0-2', '--class', 'all',
                          '--format', 'nnunet', '--outdir', str(single), '--device', 'cpu'],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          'generate.py', '--network', nets['vol'], '--seeds', '0-2', '--class', 'all', '--format',
                          'nnunet', '--outdir', str(multi), '--device', 'cpu'],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # each rank made its own 3 of the 6 cases (items rank, rank + 2, ...), and rank 0 wrote dataset.json once all were in
    assert 'Generating (rank 0) 3/3 cases' in res.stderr and 'Generating (rank 1) 3/3 cases' in res.stderr
    assert tree_hashes(str(multi)) == tree_hashes(str(single))
    assert json.loads((multi / 'manifest.json').read_text())['status'] == 'complete'


# ---------------------------------------------------------------------------------------------------------------
# --format npy (issue 21)


@pytest.mark.parametrize('volumes', [False, True], ids=['2d', '3d'])
def test_npy_is_clipped_one_channel_works_and_volumes_get_no_montage(tmp_path, volumes):
    from training.networks import Generator
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=[16] * 3 if volumes else 16, img_channels=1,
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    with torch.no_grad():  # make the raw output overshoot [-1, 1]
        for p in G.synthesis.parameters():
            p.mul_(4)
    desc = {'kind': 'volumes', 'channels': ['t1n'], 'image_shape': [1, 16, 16, 16]} if volumes else {'channels': ['t1n']}
    net = str(tmp_path / 'one.pt')
    snapshot.save_snapshot(net, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    ok('--network', net, '--seeds', '0-1', '--format', 'npy', '--outdir', tmp_path / 'o')
    assert sorted(os.listdir(tmp_path / 'o')) == ['seed0000.npy', 'seed0001.npy']
    x = np.load(tmp_path / 'o' / 'seed0000.npy')
    assert x.shape == (1,) + (16,) * (3 if volumes else 2) and x.dtype == np.float32
    assert -1 <= x.min() and x.max() <= 1 and (np.abs(x) == 1).any()  # clipped, not rescaled
    if volumes:
        ok('--network', net, '--seeds', '0', '--format', 'npy', '--montage', '--outdir', tmp_path / 'm')
        assert sorted(os.listdir(tmp_path / 'm')) == ['seed0000-montage.png', 'seed0000.npy']


@pytest.mark.slow
def test_bench_cohort_runs_at_a_tiny_size(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    import bench_cohort
    figures = bench_cohort.main.main(['--num', '3', '--compare', '1', '--res', '16', '--procs', '1', '--json',
                                      str(tmp_path / 'c.json'), '--workdir', str(tmp_path)], standalone_mode=False)
    saved = json.loads((tmp_path / 'c.json').read_text())
    assert saved == json.loads(json.dumps(figures))
    assert [r['volumes'] for r in saved['runs']] == [1, 3] and all(r['peak_mib'] > 0 for r in saved['runs'])


# ---------------------------------------------------------------------------------------------------------------
# docs/cohorts.md


def test_docs_two_commands_make_an_nnunet_training_folder(nets, tmp_path):
    import re
    import shlex
    text = open(os.path.join(ROOT, 'docs', 'cohorts.md')).read()
    block = re.search(r'runs these two commands.*?```bash\n(.*?)```', text, re.S).group(1).strip().splitlines()
    assert len(block) == 2 and block[0].startswith('python generate.py') and block[1].startswith('nnUNetv2_plan_and_preprocess')
    command = block[0].replace('runs/00001-vol32', nets['vol']).replace('0-499', '0-3').replace('$nnUNet_raw', str(tmp_path))
    argv = shlex.split(command)
    res = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    dataset_id = re.search(r'-d (\d+)', block[1]).group(1)
    (folder,) = glob.glob(str(tmp_path / f'Dataset{dataset_id}_*'))  # the folder the second command's -d names
    meta = check_nnunet_layout(folder)
    assert meta['numTraining'] == 4
    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    except ImportError:
        return  # nnU-Net is not a dependency; where it is installed, its check (the second command's first step) runs
    verify_dataset_integrity(folder, 1)


@pytest.mark.slow
def test_export_killed_mid_run_resumes(nets, tmp_path):
    import signal
    import time
    out = tmp_path / 'killed'
    cmd = [sys.executable, 'generate.py', '--network', nets['vol'], '--seeds', '0-39', '--class', 'gli', '--format',
           'nnunet', '--outdir', str(out), '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(glob.glob(str(out / 'provenance' / '*.json'))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: only atomic writes protect the folder
    proc.wait()
    done = sorted(glob.glob(str(out / 'provenance' / '*.json')))
    assert 3 <= len(done) < 40 and not (out / 'dataset.json').exists()
    stamps = {p: os.path.getmtime(p) for p in done}
    (out / 'imagesTr' / '.tmp-killed.nii.gz').write_bytes(b'half')  # what a kill inside an atomic write leaves
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f'{40 - len(done)} made, {len(done)} already done' in res.stderr  # finished cases skipped, not made again
    assert all(os.path.getmtime(p) == stamps[p] for p in done)
    meta = check_nnunet_layout(str(out))
    assert meta['numTraining'] == 40 and not glob.glob(str(out / '**' / '.tmp-*'), recursive=True)
    assert json.loads((out / 'manifest.json').read_text())['status'] == 'complete'


def test_seeds_beyond_the_case_names_are_refused(nets, tmp_path):
    one_line_error(gen('--network', nets['slc'], '--seeds', '99999-100000', '--class', 'gli', '--format', 'nnunet',
                       '--outdir', tmp_path / 'x'), '0-99999')
    assert not (tmp_path / 'x').exists()


def test_native_grid_puts_synthetic_cases_on_the_real_cases_grid(real_cases, tmp_path):
    import dataset_tool
    from training.dataset import ImageFolderDataset
    r = CliRunner().invoke(dataset_tool.main, ['--no-progress', '--source', real_cases, '--dest', str(tmp_path / 'v.zip'),
                                               '--kind', 'volumes', '--volume-size', '16', '--modalities', 'all',
                                               '--with-seg'])
    assert r.exit_code == 0, r.output
    desc = ImageFolderDataset(str(tmp_path / 'v.zip')).describe()
    from training.networks import Generator
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=[16] * 3, img_channels=7,
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    net = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(net, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    out = tmp_path / 'Dataset504_Native'
    ok('--network', net, '--seeds', '0', '--format', 'nnunet', '--native-grid', '--with-real', real_cases, '--outdir', out)
    check_nnunet_layout(str(out))
    ref = desc['space']['reference_case']
    real = nib.load(str(out / 'labelsTr' / f'{ref}.nii.gz'))
    for name in ('imagesTr/BraTS-SYN-00000-000_0003.nii.gz', 'labelsTr/BraTS-SYN-00000-000.nii.gz'):
        syn = nib.load(str(out / name))
        assert syn.shape == real.shape and np.allclose(syn.affine, real.affine)


def test_nnunet_turns_predicted_brats_regions_back_into_brats_2023_labels():
    pytest.importorskip('nnunetv2')
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from mri.output.datasets import BRATS_REGIONS, BRATS_REGIONS_CLASS_ORDER
    manager = LabelManager(BRATS_REGIONS, BRATS_REGIONS_CLASS_ORDER)
    # four voxels: background, NETC (in WT and TC), SNFH (in WT only), ET (in all three regions)
    regions = np.array([[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]], np.float32)[:, :, None, None]
    assert manager.convert_probabilities_to_segmentation(regions).ravel().tolist() == [0, 1, 2, 3]


def test_real_privacy_gate_drops_a_planted_copy_from_the_export(nets, tmp_path):
    """generate.py with metrics.privacy.PrivacyGate itself (not a stand-in): a training archive that holds an exact
    copy of seed 0's volume; --max-nn-ssim drops that case, keeps the others and writes the report."""
    import zipfile
    out_npy = tmp_path / 'npy'
    ok('--network', nets['vol'], '--seeds', '0', '--class', 'gli', '--format', 'npy', '--outdir', out_npy)
    copy = np.load(glob.glob(str(out_npy / '*.npy'))[0])
    rng = np.random.RandomState(0)
    items = [copy] + [rng.uniform(-1, 1, copy.shape).astype(np.float32) for _ in range(3)]
    archive = tmp_path / 'train.zip'
    meta = {'channels': CHANNELS, 'file_cases': {}}
    with zipfile.ZipFile(archive, 'w') as z:
        for i, item in enumerate(items):
            name = f'case{i}/{i:05d}.npy'
            meta['file_cases'][name] = f'case{i}'
            with z.open(name, 'w') as f:
                np.save(f, np.rint((item + 1) / 2 * 255).clip(0, 255).astype(np.uint8))
        z.writestr('dataset.json', json.dumps(meta))
    out = tmp_path / 'ds'
    ok('--network', nets['vol'], '--seeds', '0-2', '--class', 'gli', '--format', 'nnunet', '--max-nn-ssim', '0.95',
       '--privacy-data', archive, '--outdir', out)
    manifest = json.loads((out / 'manifest.json').read_text())
    dropped = {d['case']: d['privacy'] for d in manifest['dropped']}
    assert 'BraTS-SYN-00000-000' in dropped and dropped['BraTS-SYN-00000-000']['nn_ssim'] > 0.99
    assert dropped['BraTS-SYN-00000-000']['nn_name'].startswith('case0/')
    assert (out / 'privacy-report.json').is_file()
    assert not glob.glob(str(out / 'imagesTr' / 'BraTS-SYN-00000-000*'))


def test_painting_under_torchrun_shares_the_cases_out(paint, tmp_path):
    """Plain painting (no --format) under torchrun: each rank paints its share of (case, seed) and the folders are
    those of one process. Before, every rank painted every case and the second one failed on the first's folder."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    args = ['generate.py', '--network', str(paint / 'paint.pt'), '--insert-into', str(paint / 'cases'),
            '--labels-from', str(paint / 'small.nii.gz'), '--seeds', '0-1', '--device', 'cpu', '--outdir']
    res = subprocess.run([sys.executable] + args + [str(tmp_path / 'single')], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'] + args
                         + [str(tmp_path / 'multi')], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert 'Painting 2/2 cases' in res.stderr and 'Painting 4/4' not in res.stderr
    summaries = ('painting-summary.json', 'painting-summary-rank0.json', 'painting-summary-rank1.json')
    assert tree_hashes(str(tmp_path / 'multi'), summaries) == tree_hashes(str(tmp_path / 'single'), summaries)
    ranks = [json.loads((tmp_path / 'multi' / f'painting-summary-rank{r}.json').read_text()) for r in (0, 1)]
    assert sorted(c['case'] for s in ranks for c in s['cases']) == sorted(
        c['case'] for c in json.loads((tmp_path / 'single' / 'painting-summary.json').read_text())['cases'])
