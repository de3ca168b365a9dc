"""Metric protocol and habits: reals never x-flipped, a cache keyed on pixels only and rebuilt when damaged, features
shared by the metrics of one evaluation, one download notice, the VGG flag, calc_metrics.py's CLI (run dirs,
metric names, --device), and progress lines while the training loop evaluates metrics."""

import glob
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import calc_metrics
import dnnlib
from metrics import detectors
from metrics import metric_main
from metrics import metric_utils
from tests.test_metrics import FakeG, metric_kwargs, write_archive
from torch_utils import snapshot

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:DeprecationWarning')


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('MRI_GAN_CACHE', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def detector_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('det') / 'tiny_detector.pt')
    return detectors.save_stand_in_detector(path)


@pytest.fixture(scope='module')
def archive(tmp_path_factory):
    return write_archive(str(tmp_path_factory.mktemp('data') / 'mri'), n=16, channels=('t2w',))


def _cache_files():
    return sorted(glob.glob(os.path.join(dnnlib.make_cache_dir_path('gan-metrics'), '*.npz')))


def _count_images(monkeypatch):
    """Images through the detector, split into reals (uint8 from the archive) and fakes, by identity of the batch."""
    counts = dict(images=0)
    real_features = detectors.Detector.features

    def counting(self, images):
        counts['images'] += images.shape[0]
        return real_features(self, images)
    monkeypatch.setattr(detectors.Detector, 'features', counting)
    return counts


def test_full_metrics_never_use_mirrored_reals(archive, detector_path):
    """A --mirror=1 run hands the loop dataset kwargs with xflip=True; the metric must measure the archive as is."""
    kw = metric_kwargs(archive, detector_path, G=FakeG(img_channels=1), cache=False)
    mirrored_run = dict(kw['dataset_kwargs'], xflip=True)
    plain = metric_main.calc_metric('fid10k_full', **kw).results.fid10k_full
    from_run = metric_main.calc_metric('fid10k_full', **dict(kw, dataset_kwargs=mirrored_run)).results.fid10k_full
    asked = metric_main.calc_metric('fid10k_full', **dict(kw, xflip_reals=True)).results.fid10k_full
    assert from_run == plain and asked != pytest.approx(plain, rel=1e-6)


def test_cache_key_holds_only_what_changes_pixels(archive, detector_path, monkeypatch):
    counts = _count_images(monkeypatch)
    base = metric_kwargs(archive, detector_path, G=FakeG(img_channels=1))
    for extra in [dict(), dict(random_seed=7, resolution=16), dict(xflip=True), dict(random_seed=3)]:
        metric_main.calc_metric('fid10k_full', **dict(base, dataset_kwargs=dict(base['dataset_kwargs'], **extra)))
    assert len(_cache_files()) == 1
    assert counts['images'] == 16 + 4 * 16  # The reals once; 16 fakes per run.
    # KID of the same images reads the same file (it grows to hold the rows KID needs) instead of a second key.
    metric_main.calc_metric('kid10k_full', **base)
    assert len(_cache_files()) == 1
    # Other pixels (another subset) are another key.
    metric_main.calc_metric('fid10k_full', **dict(base, dataset_kwargs=dict(base['dataset_kwargs'], subset='train')))
    assert len(_cache_files()) == 2


def test_damaged_cache_is_recomputed_with_one_warning(archive, detector_path, capsys):
    kw = metric_kwargs(archive, detector_path, G=FakeG(img_channels=1))
    first = metric_main.calc_metric('fid10k_full', **kw).results.fid10k_full
    (path,) = _cache_files()
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    again = metric_main.calc_metric('fid10k_full', **kw).results.fid10k_full
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if 'damaged' in line]
    assert len(warnings) == 1 and path in warnings[0] and 'recomputing' in warnings[0]
    assert again == pytest.approx(first, rel=1e-9)
    assert metric_utils.FeatureStats.load(path).num_items == 16  # Rewritten whole.


def test_metrics_together_share_one_pass_of_reals_and_of_fakes(detector_path, monkeypatch, tmp_path):
    path = write_archive(str(tmp_path / 'two'), n=24, channels=('t2w',))
    kw = metric_kwargs(path, detector_path, G=FakeG(img_channels=1), cache=False, num_gen=16)
    names = ['fid10k_full', 'kid10k_full', 'fid_per_class']
    counts = _count_images(monkeypatch)
    alone = metric_main.calc_metrics(names, share=False, **kw)
    unshared = counts['images']
    counts['images'] = 0
    together = metric_main.calc_metrics(names, **kw)
    # Reals: 24 once instead of 24 (FID) + 24 (KID) + 12 + 12 (per class); fakes: 16 for FID and KID, 16 per class.
    assert unshared == 24 * 3 + 16 * 2 + 16 * 2
    assert counts['images'] == 24 + 16 + 16 * 2
    for a, b in zip(alone, together):
        assert a.metric == b.metric and set(a.results) == set(b.results)
        for key in a.results:
            assert b.results[key] == pytest.approx(a.results[key], rel=1e-5, abs=1e-9), key


def test_one_download_notice_then_offline_fallback(monkeypatch, capsys):
    monkeypatch.setattr(detectors, '_offline', {})
    monkeypatch.setattr(dnnlib.util.time, 'sleep', lambda s: None)
    monkeypatch.setattr(detectors, 'VGG16_URL', 'http://127.0.0.1:9/vgg16.pkl')  # Nothing listens on port 9.
    with pytest.raises(detectors.DetectorError) as info:
        detectors.load_detector('vgg16')
    err = capsys.readouterr().err
    assert err.count('Downloading') == 1, err
    assert '--vgg-detector' in str(info.value) and '\n' not in str(info.value)


def test_train_passes_vgg_detector_to_the_metrics(tmp_path):
    from tests.helpers import make_png_folder
    from training.config import setup_training_config
    data = make_png_folder(str(tmp_path / 'd'), n=4, res=16)
    c = setup_training_config(data=data, device='cpu', metrics='pr10k3_full', detector='~/inc.pt', vgg_detector='/x/vgg.pt')
    assert c.metric_kwargs == dict(detector_url='~/inc.pt', vgg_detector_url='/x/vgg.pt')


@pytest.fixture
def run_dir(tmp_path, archive, monkeypatch):
    monkeypatch.setattr(snapshot, 'SNAPSHOT_CLASSES', snapshot.SNAPSHOT_CLASSES | {f'{FakeG.__module__}.{FakeG.__qualname__}'})
    run = tmp_path / 'run'
    G = FakeG(img_channels=1)
    for kimg in (0, 16):
        snapshot.save_snapshot(str(run / f'network-snapshot-{kimg:06d}.pt'), dict(G=G, D=None, G_ema=G, augment_pipe=None),
                               dataset=dict(path=archive, resolution=16, channels=['t2w']))
    return str(run)


def test_calc_metrics_cli_run_dir_names_none_and_device(run_dir, detector_path, monkeypatch):
    runner = CliRunner()
    helptext = runner.invoke(calc_metrics.main, ['--help']).output
    assert all(name in helptext for name in metric_main.list_valid_metrics()) and '--device' in helptext
    res = runner.invoke(calc_metrics.main, ['--network', run_dir, '--metrics', 'none'])
    assert res.exit_code == 2 and 'nothing' in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.startswith('Error')]) == 1
    home = os.path.dirname(run_dir)
    monkeypatch.setenv('HOME', home)
    res = runner.invoke(calc_metrics.main, ['--network', '~/run', '--metrics', 'fid10k_full', '--num-gen', '8',
                                            f'--detector={detector_path}', '--batch', '8', '--device', 'cpu'])
    assert res.exit_code == 0, res.output
    assert '"snapshot_pkl": "network-snapshot-000016.pt"' in res.output  # The newest snapshot of the run dir.
    empty = os.path.join(home, 'empty')
    os.makedirs(empty)
    res = runner.invoke(calc_metrics.main, ['--network', empty])
    assert res.exit_code == 2 and 'no network-snapshot' in res.output


def test_metrics_during_training_show_progress_with_rate_and_time_left(archive, detector_path, tmp_path, capsys):
    import dnnlib
    from training.training_loop import Run, _evaluate_metrics
    kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=archive, use_labels=True, xflip=True,
                  random_seed=0, resolution=16)
    opts = dnnlib.EasyDict(metrics=['fid10k_full', 'kid10k_full'], training_set_kwargs=kwargs, num_gpus=1, rank=0,
                           run_dir=str(tmp_path), metric_kwargs=dict(detector_url=detector_path, num_gen=16,
                                                                     batch_size=8))
    run = Run(opts=opts, device=torch.device('cpu'), nets=dnnlib.EasyDict(G_ema=FakeG(img_channels=1)))
    results = _evaluate_metrics(run, str(tmp_path / 'network-snapshot-000000.pt'))
    assert np.isfinite(results['fid10k_full']) and np.isfinite(results['kid10k_full'])
    err = capsys.readouterr().err
    assert 'reals' in err and 'fakes' in err and 'images/s' in err and 'left' in err, err

