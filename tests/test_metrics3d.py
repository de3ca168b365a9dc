"""Metrics of volumes (metrics/volumes.py): every one end to end through calc_metrics.py with a real 3D generator
(training.networks on volumes) saved as a snapshot, a tiny 2D TorchScript detector for the 2.5D FID and a tiny 3D one for the 3D
FID; the pieces against direct computations; bad combinations fail in one line."""

import json
import math
import os
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:DeprecationWarning')

import calc_metrics
from metrics import detectors
from metrics import metric_main
from metrics import msssim
from metrics import volumes
from torch_utils import snapshot

RES = 16
CHANNELS = ('t1n', 't2w', 'seg_et')


class TinyDetector3d(torch.nn.Module):
    """A random 3D feature network that returns a feature map, as MedicalNet's ResNet trunk does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv3d(1, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('MRI_GAN_CACHE', str(tmp_path / 'cache'))


def write_volume_archive(path, n=8, shape=(RES, RES, RES), bad_last=None):
    """A zip like dataset_tool.py --kind volumes writes: (C, D, H, W) uint16 .npy, four cases, a cohort label."""
    rng = np.random.RandomState(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing='ij'))
    labels, file_cases = [], {}
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(n):
            case = f'BraTS-GLI-{i // 2:05d}-000'
            brain = ((grid / (0.7 + 0.1 * rng.rand(3, 1, 1, 1))) ** 2).sum(0) < 1
            vol = np.stack([brain * np.clip(0.5 + 0.2 * np.sin(4 * grid[c] + rng.randn()), 0, 1) for c in range(2)]
                           + [brain * (grid[0] > 0.3)]).astype(np.float32)
            vol = np.rint(vol * 65535).astype(np.uint16)
            if bad_last and i == n - 1:
                vol = vol[:, :-1]
            rel = f'{case}/{case}-{i % 2}.npy'
            buf = __import__('io').BytesIO()
            np.save(buf, vol)
            z.writestr(rel, buf.getvalue())
            labels.append([rel, [1.0, 0.0] if i % 4 < 2 else [0.0, 1.0]])
            file_cases[rel] = case
        z.writestr('dataset.json', json.dumps(dict(
            labels=labels, label_names=['gli', 'ssa'], label_groups=[dict(name='cohort', values=['gli', 'ssa'])],
            channels=list(CHANNELS), kind='volumes', file_cases=file_cases,
            cases={c: 'train' for c in file_cases.values()})))
    return str(path)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('vol')
    data = write_volume_archive(root / 'vol16.zip')
    from training.networks import Generator
    from training.dataset import ImageFolderDataset
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=[RES] * 3, img_channels=len(CHANNELS),
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    desc = ImageFolderDataset(data, use_labels=True).describe()
    net = str(root / 'network-snapshot-000000.pt')
    snapshot.save_snapshot(net, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    det2d = str(root / 'det2d.pt')
    detectors.save_stand_in_detector(det2d)
    det3d = str(root / 'det3d.pt')
    torch.jit.script(TinyDetector3d().eval()).save(det3d)
    return dict(root=root, data=data, net=net, det2d=det2d, det3d=det3d)


def run(*args):
    return CliRunner().invoke(calc_metrics.main, [str(a) for a in args])


def test_every_volume_metric_end_to_end(setup, tmp_path):
    r = run('--network', setup['net'], '--metrics', ','.join(volumes.VOLUME_METRICS), '--detector', setup['det2d'],
            '--detector3d', setup['det3d'], '--num-gen', 4, '--run-dir', tmp_path)
    assert r.exit_code == 0, r.output + repr(r.exception)
    results = {}
    for name in volumes.VOLUME_METRICS:
        with open(tmp_path / f'metric-{name}.jsonl') as f:
            results.update(json.loads(f.readline())['results'])
    for plane in ('axial', 'coronal', 'sagittal'):
        for ch in ('t1n', 't2w'):  # seg channels are masks, never measured
            assert results[f'fid25d_full_{plane}_{ch}'] > 0
        assert results[f'fid25d_full_{plane}'] == pytest.approx(
            (results[f'fid25d_full_{plane}_t1n'] + results[f'fid25d_full_{plane}_t2w']) / 2)
    assert results['fid25d_full'] == pytest.approx(np.mean([results[f'fid25d_full_{p}'] for p in volumes.PLANE_DIMS]))
    assert 'fid25d_full_axial_seg_et' not in results
    assert results['fid3d_full_t1n'] > 0 and results['fid3d_full_t2w'] > 0
    assert 0 < results['msssim3d_div_real'] < 1 and 0 < results['msssim3d_div'] <= 1
    assert results['mmd3d'] > 0 and results['mmd3d_per_voxel'] == pytest.approx(results['mmd3d'] / (2 * RES ** 3))
    assert 0 <= results['ssim3d_nn_frac_closer'] <= 1 and results['mse3d_nn'] > 0
    assert all(math.isfinite(v) for v in results.values())

    # The real statistics are cached on the archive's content: a second run reads them.
    cached = set(os.listdir(os.environ['MRI_GAN_CACHE'] + '/gan-metrics'))
    assert any('fid25d' in f for f in cached) and any('fid3d' in f for f in cached)
    r = run('--network', setup['net'], '--metrics', 'fid25d_full', '--detector', setup['det2d'], '--num-gen', 4,
            '--run-dir', tmp_path)
    assert r.exit_code == 0 and set(os.listdir(os.environ['MRI_GAN_CACHE'] + '/gan-metrics')) == cached


def test_bad_combinations_fail_in_one_line(setup, tmp_path):
    # fid3d_full without --detector3d names the option.
    r = run('--network', setup['net'], '--metrics', 'fid3d_full', '--run-dir', tmp_path)
    assert r.exit_code == 1 and r.output.startswith('Error: fid3d_full needs a 3D feature network: pass --detector3d')
    assert r.output.count('\n') == 1
    # A 2D metric on a volume snapshot and its archive.
    r = run('--network', setup['net'], '--metrics', 'msssim_div', '--num-gen', 4, '--run-dir', tmp_path)
    assert r.exit_code == 1 and 'measure 2D images [C,H,W] (volumes: fid25d_full' in r.output
    # A 2D snapshot measured with a volume metric on a volume archive.
    from training.networks import Generator
    G2 = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=RES, img_channels=len(CHANNELS),
                   mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    net2 = str(tmp_path / 'net2d.pt')
    snapshot.save_snapshot(net2, dict(G=G2, D=None, G_ema=G2, augment_pipe=None), dataset=dict(kind='slices'))
    r = run('--network', net2, '--data', setup['data'], '--metrics', 'mmd3d', '--num-gen', 4, '--run-dir', tmp_path)
    assert r.exit_code == 1 and 'the generator makes 2D images' in r.output and r.output.count('\n') == 1
    assert not list(tmp_path.glob('metric-*.jsonl'))
    # A volume archive whose volumes do not share one shape.
    bad = write_volume_archive(tmp_path / 'bad.zip', bad_last=True)
    r = run('--network', setup['net'], '--data', bad, '--metrics', 'mmd3d', '--num-gen', 4, '--run-dir', tmp_path)
    assert r.exit_code == 1 and r.output.count('\n') == 1
    assert 'BraTS-GLI-00003-000-1.npy: volume of shape (3, 15, 16, 16)' in r.output and 'every volume' in r.output
    import click
    from training.config import setup_training_config
    with pytest.raises(click.UsageError, match='--data: .*bad.zip/BraTS-GLI-00003-000/BraTS-GLI-00003-000-1.npy: volume'):
        setup_training_config(data=bad, metrics='none', device='cpu')
    # train.py checks the metrics against the data before it starts.
    assert 'measure 2D images' in metric_main.metrics_problem(['fid10k_full'], True)
    assert 'measure volumes' in metric_main.metrics_problem(['mmd3d'], False)
    assert '--detector3d' in metric_main.metrics_problem(['fid3d_full'], True)
    assert metric_main.metrics_problem(['fid3d_full', 'mmd3d'], True, 'det.pt') is None


def test_pieces_against_direct_computations():
    # Slices of each plane come from the right axis of [N, C, D, H, W] (RAS order x, y, z).
    vol = torch.zeros([1, 1, 16, 16, 16])
    vol[0, 0, 5] = 1  # the sagittal plane x = 5
    sag = volumes.plane_slices(vol, 'sagittal', 16)
    assert list(volumes.slice_positions(16, 16)) == list(range(2, 14))
    assert sag.shape == (12, 1, 16, 16) and sag[3].sum() == 256 and sag.sum() == 256
    assert volumes.plane_slices(vol, 'axial', 16).shape == (12, 1, 16, 16)
    assert volumes.plane_slices(vol, 'axial', 16).sum() == 12 * 16  # every axial slice crosses x = 5 in one row

    # 3D SSIM: the separable window equals the full 11^3 Gaussian; identical volumes score 1.
    torch.manual_seed(0)
    x = torch.rand(2, 2, 24, 20, 22)
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    full = (g[:, None, None] * g[None, :, None] * g[None, None, :]).float().expand(2, 1, 11, 11, 11)
    assert torch.allclose(msssim._filter(2, 11, 1.5, 'cpu')(x), torch.nn.functional.conv3d(x, full, groups=2), atol=1e-5)
    assert torch.allclose(msssim.ms_ssim(x, x), torch.ones(2), atol=1e-5)
    assert (msssim.ms_ssim(x, torch.rand_like(x)) < 0.2).all()
    assert msssim.num_scales(128, 128, depth=128) == 4 and msssim.num_scales(160, 192, depth=40) == 2

    # bMMD^2 with the linear kernel = the kernel sums of Kwon et al.
    a, b = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    direct = ((a @ a.T).sum() + (b @ b.T).sum() - 2 * (a @ b.T).sum()) / 16
    assert torch.allclose(volumes.linear_bmmd2(a, b), direct)
