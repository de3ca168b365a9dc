"""projector.py: projection lowers the distance to the target in 2D and 3D, the CLI writes its files for an archive
item, a .npy, a PNG and a NIfTI target, SIGTERM stops with the best so far saved, bad input is one line."""

import os
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import projector
from tests.test_privacy import CHANNELS, as_sample, make_archive
from torch_utils import snapshot
from training.dataset import ImageFolderDataset
from training.networks import Generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_generator(shape, c_dim):
    torch.manual_seed(0)
    return Generator(z_dim=16, c_dim=c_dim, w_dim=16, img_resolution=shape[0], img_channels=len(CHANNELS),
                     spatial_dims=len(shape), mapping_kwargs=dict(num_layers=2), channel_base=256, channel_max=16)


def make_snapshot(root, shape, c_dim=0, **archive_kwargs):
    """(snapshot path, archive path, items): a tiny random generator recording a zip archive as its training data."""
    archive, items = make_archive(os.path.join(root, 'train.zip'), shape, labels=c_dim > 0, **archive_kwargs)
    G = tiny_generator(shape, c_dim)
    path = os.path.join(root, 'net.pt')
    subset = 'train' if archive_kwargs.get('val_cases') else 'all'  # as train.py picks it
    snapshot.save_snapshot(path, dict(G=G, D=None, G_ema=G, augment_pipe=None),
                           dataset=ImageFolderDataset(archive, subset=subset, use_labels=c_dim > 0).describe())
    return path, archive, items


@pytest.fixture(scope='module')
def net2d(tmp_path_factory):
    return make_snapshot(str(tmp_path_factory.mktemp('p2')), (16, 16), c_dim=2, cases=2, per_case=2)


@pytest.fixture(scope='module')
def net3d(tmp_path_factory):
    return make_snapshot(str(tmp_path_factory.mktemp('p3')), (8, 8, 8), cases=2, per_case=1)


@pytest.mark.parametrize('which', ['net2d', 'net3d'])
def test_projection_reduces_the_distance(which, request):
    path, archive, items = request.getfixturevalue(which)
    G, desc = projector.load_generator(path, 'cpu')
    image, c, name = projector.resolve_target(G, desc, '1', None, None)
    assert image.shape[0] == 2 and name == sorted(items)[1]  # image channels only: the tumour label is left out
    if G.c_dim:
        assert c.tolist() == [0, 1]  # the item's own class
    dists = []
    result = projector.project(G, image, [0, 1], c, num_steps=12, on_step=lambda s, d, ss, m: dists.append(d))
    assert len(dists) == 12 and result.steps == 12 and not result.interrupted
    assert result.distance < dists[0] and min(dists) < dists[0]
    assert result.w.shape == (1, G.num_ws, G.w_dim) and result.image.shape == (3,) + tuple(G.img_shape)
    assert all(np.isfinite(v).all() for v in result.noise.values()) and result.noise
    # the saved w and noise reproduce the reported reconstruction
    G2 = G.eval()
    for name, buf in projector.noise_buffers(G2).items():
        buf.copy_(torch.from_numpy(result.noise[name]))
    again = G2.synthesis(torch.from_numpy(result.w), noise_mode='const', force_fp32=True)[0].numpy()
    assert np.allclose(again, result.image, atol=1e-5)


def test_noise_regularisation_sees_correlation():
    white = torch.randn([32, 32], generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.avg_pool2d(white[None, None], 3, 1, 1)[0, 0]
    smooth = (smooth - smooth.mean()) / smooth.std()
    assert projector.noise_regularisation([smooth]) > 20 * projector.noise_regularisation([white])
    cube = torch.randn([16, 16, 16], generator=torch.Generator().manual_seed(1))
    assert projector.noise_regularisation([cube]) < 0.01


def _run(args):
    return CliRunner().invoke(projector.main, args, catch_exceptions=False)


def test_cli_outputs(tmp_path, net2d, net3d):
    path, archive, items = net2d
    out = tmp_path / 'item'
    res = _run(['--network', path, '--target', '0', '--num-steps', '3', '--outdir', str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == ['proj.npy', 'proj.png', 'projected_w.npz', 'target.npy']
    with np.load(out / 'projected_w.npz') as z:
        assert z['w'].shape[0] == 1 and z['c'].tolist() == [1, 0] and int(z['steps']) == 3
    assert np.allclose(np.load(out / 'target.npy'), as_sample(items[sorted(items)[0]])[:2], atol=1e-6)

    png = tmp_path / 't.png'  # a grey PNG: one image channel would not do for a 2-channel generator
    PIL.Image.fromarray(items[sorted(items)[0]][0]).save(png)
    res = _run(['--network', path, '--target', str(png), '--class', 'coronal', '--num-steps', '2', '--outdir', str(tmp_path / 'png')])
    assert res.exit_code != 0 and '1 channels, but the generator makes 3 (t1n, t2w, seg_netc), 2 of them image' in res.output

    path3, _archive3, items3 = net3d
    npy = tmp_path / 'v.npy'
    np.save(npy, items3[sorted(items3)[0]])  # uint8, every channel, as an archive stores it
    res = _run(['--network', path3, '--target', str(npy), '--num-steps', '2', '--outdir', str(tmp_path / 'npy')])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / 'npy' / 'proj.npy').shape == (3, 8, 8, 8)
    nibabel = pytest.importorskip('nibabel')
    nii = tmp_path / 'v.nii.gz'
    data = np.moveaxis(items3[sorted(items3)[0]][:2].astype(np.float32) / 255, 0, -1)  # [0, 1], as generate.py writes
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(nii))
    res = _run(['--network', path3, '--target', str(nii), '--num-steps', '2', '--outdir', str(tmp_path / 'nii')])
    assert res.exit_code == 0, res.output
    assert np.allclose(np.load(tmp_path / 'nii' / 'target.npy'), as_sample(items3[sorted(items3)[0]])[:2], atol=1e-6)
    one = []  # a BraTS-style case: one NIfTI per modality, given as a comma-separated list
    for k in range(2):
        one.append(str(tmp_path / f'm{k}.nii.gz'))
        nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(data[..., k]), np.eye(4)), one[-1])
    res = _run(['--network', path3, '--target', ','.join(one), '--num-steps', '1', '--outdir', str(tmp_path / 'two')])
    assert res.exit_code == 0, res.output
    assert np.allclose(np.load(tmp_path / 'two' / 'target.npy'), np.load(tmp_path / 'nii' / 'target.npy'))


def test_bad_input(tmp_path, net2d, net3d):
    path, archive, items = net2d
    cases = [
        (['--target', str(tmp_path / 'none.png')], 'none.png: no such file'),
        (['--target', '99'], 'holds items 0-3'),
        (['--target', '0', '--data', str(tmp_path / 'gone.zip')], 'gone.zip: training archive not found'),
    ]
    npy = tmp_path / 'a.npy'
    np.save(npy, np.zeros([2, 16, 16], np.float32))
    cases.append((['--target', str(npy)], '--class: this generator is conditional'))
    np.save(tmp_path / 'b.npy', np.zeros([2, 8, 8], np.float32))
    cases.append((['--target', str(tmp_path / 'b.npy'), '--class', 'axial'], 'target of shape [8, 8] differs from the generator\'s [16, 16]'))
    for args, message in cases:
        res = _run(['--network', path, '--num-steps', '1', '--outdir', str(tmp_path / 'o')] + args)
        assert res.exit_code == 1 and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and not os.path.exists(tmp_path / 'o')


def test_sigterm_saves_the_best_so_far(tmp_path, net3d):
    path = net3d[0]
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'projector.py'), '--network', path, '--target', '0',
                             '--num-steps', '100000', '--outdir', str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    first = proc.stderr.readline()  # the first progress line: the optimisation runs
    assert 'projecting' in first and 'step' in first, first
    proc.send_signal(signal.SIGTERM)
    stdout, rest = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    with np.load(out / 'projected_w.npz') as z:
        assert 1 <= int(z['steps']) < 100000
    assert 'terminated (SIGTERM) after' in stdout and os.path.exists(out / 'proj.png')


# ----------------------------------------------------------------------------------------------------------------
# calc_privacy.py: the membership signal

def test_attack_auc():
    import calc_privacy
    assert calc_privacy.attack_auc([3, 4], [1, 2]) == 1
    assert calc_privacy.attack_auc([1, 2], [3, 4]) == 0
    assert calc_privacy.attack_auc([1, 2], [1, 2]) == 0.5


def test_membership_cli(tmp_path, net2d):
    import json
    import calc_privacy
    path, archive, items = net2d
    held, _ = make_archive(str(tmp_path / 'held.zip'), (16, 16), cases=2, per_case=1, seed=7, labels=True)
    out = tmp_path / 'm'
    res = CliRunner().invoke(calc_privacy.main, ['--network', path, '--held-out', held, '--num', '2', '--num-steps', '2',
                                                 '--outdir', str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.load(open(out / 'membership.json'))
    s = data['summary']
    assert s['complete'] and s['counts'] == {'train': 2, 'held-out': 2} and 0 <= s['auc_ssim'] <= 1
    assert {r['group'] for r in data['items']} == {'train', 'held-out'}
    assert len({r['case'] for r in data['items'] if r['group'] == 'train'}) == 2  # different cases first
    assert 'membership attack AUC' in res.output and 'held-out' in res.output

    wrong, _ = make_archive(str(tmp_path / 'wrong.zip'), (8, 8), cases=1, per_case=1, labels=True)
    res = CliRunner().invoke(calc_privacy.main, ['--network', path, '--held-out', wrong, '--num', '1', '--num-steps', '1',
                                                 '--outdir', str(tmp_path / 'w')], catch_exceptions=False)
    assert res.exit_code == 1 and 'wrong.zip: items of shape [8, 8] differ from the generator\'s [16, 16]' in res.output
    res = CliRunner().invoke(calc_privacy.main, ['--network', path, '--held-out', str(tmp_path / 'no.zip'),
                                                 '--outdir', str(tmp_path / 'w')], catch_exceptions=False)
    assert res.exit_code == 1 and 'no.zip: archive not found' in res.output and not os.path.exists(tmp_path / 'w')


def test_membership_val_split(tmp_path):
    """--held-out val: the training archive's own val cases against its train cases."""
    import calc_privacy
    path, archive, items = make_snapshot(str(tmp_path), (8, 8, 8), cases=3, per_case=1, val_cases=1)
    G, desc = projector.load_generator(path, 'cpu')
    result = calc_privacy.membership(G, desc, archive, 'val', num=2, num_steps=1, verbose=False)
    held = [r['case'] for r in result['items'] if r['group'] == 'held-out']
    train = [r['case'] for r in result['items'] if r['group'] == 'train']
    assert held == ['case0'] and sorted(train) == ['case1', 'case2']


def test_membership_val_needs_a_train_subset(tmp_path):
    """--held-out val on a generator trained on every item: its val cases are no held-out cases."""
    import calc_privacy
    path, archive, items = make_snapshot(str(tmp_path), (8, 8, 8), cases=3, per_case=1, val_cases=1)
    G, desc = projector.load_generator(path, 'cpu')
    desc['subset'] = 'all'
    with pytest.raises(calc_privacy.PrivacyRunError, match='trained on the all items .* val cases are not held out'):
        calc_privacy.membership(G, desc, archive, 'val', num=1, num_steps=1, verbose=False)


def test_membership_resumes_where_it_stopped(tmp_path, net2d, monkeypatch):
    """membership.json is saved after every item; started again with the same settings the run projects only the
    items not done, and ends with the results of a run never stopped; other settings start over."""
    import json
    import calc_privacy
    path, archive, items = net2d
    held, _ = make_archive(str(tmp_path / 'held.zip'), (16, 16), cases=2, per_case=1, seed=7, labels=True)
    args = ['--network', path, '--held-out', held, '--num', '2', '--num-steps', '2']
    full = tmp_path / 'full'
    assert CliRunner().invoke(calc_privacy.main, args + ['--outdir', str(full)]).exit_code == 0
    whole = json.load(open(full / 'membership.json'))
    stopped = tmp_path / 'stopped'
    stopped.mkdir()
    partial = dict(whole, items=whole['items'][:3])
    partial['summary'] = dict(whole['summary'], complete=False)
    (stopped / 'membership.json').write_text(json.dumps(partial))
    calls = []
    project = calc_privacy.projector.project
    monkeypatch.setattr(calc_privacy.projector, 'project', lambda *a, **k: calls.append(1) or project(*a, **k))
    res = CliRunner().invoke(calc_privacy.main, args + ['--outdir', str(stopped)])
    assert res.exit_code == 0 and 'Resuming' in res.output and '3 of 4 items done' in res.output, res.output
    assert len(calls) == 1
    assert json.load(open(stopped / 'membership.json')) == whole
    res = CliRunner().invoke(calc_privacy.main, args[:-1] + ['3', '--outdir', str(stopped)])  # other --num-steps
    assert 'other settings; starting over' in res.output and len(calls) == 5
