"""End to end on CPU: train.py on a tiny labelled PNG folder, generate.py by class, exact resume, SIGTERM."""

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
          '--snap', '1', '--aug', 'ada', '--target', '0.0'] + TINY_TRAIN_ARGS)
    (run,) = glob.glob(os.path.join(outdir, '*'))
    return run


def test_run_dir_contents(run_dir):
    for name in ['training_options.json', 'log.txt', 'stats.jsonl', 'reals.png', 'fakes_init.png',
                 'fakes000000.png', 'network-snapshot-000000.pt', 'training-state.pt']:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    # Conditional grid: one row per class (2 classes) of 32x32 images.
    grid = np.array(PIL.Image.open(os.path.join(run_dir, 'fakes_init.png')))
    assert grid.ndim == 3 and grid.shape[0] == 2 * 32 + 3 * 4  # two rows, 4-pixel gaps around them
    stats = _stats(run_dir)
    assert stats[-1]['Progress/kimg']['mean'] == pytest.approx(0.2, abs=0.01)
    assert stats[-1]['Progress/augment']['mean'] > 0  # ADA with target 0 raises p
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'sec/kimg' in log and 'augment' in log
    data = snapshot.load_snapshot(os.path.join(run_dir, 'network-snapshot-000000.pt'))
    assert data.dataset.label_names == ['class0', 'class1'] and data.G_ema.img_channels == 1


def test_generate_by_class(run_dir, tmp_path):
    out = str(tmp_path / 'gen')
    _run(['generate.py', '--network', os.path.join(run_dir, 'network-snapshot-000000.pt'), '--seeds', '0-3',
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
    assert os.path.isfile(os.path.join(run2, 'network-snapshot-000000.pt'))


def test_resume_is_exact(data_dir, tmp_path):
    """0.2 kimg + resume to 0.3 gives the same weights as 0.3 kimg straight (same ticks and snapshots)."""
    common = ['--data', data_dir, '--cond=1', '--tick', '0.1', '--snap', '1', '--aug', 'ada', '--target', '0.0',
              '--seed', '3'] + TINY_TRAIN_ARGS
    _run(['train.py', '--outdir', str(tmp_path / 'a'), '--kimg', '0.3'] + common)
    _run(['train.py', '--outdir', str(tmp_path / 'b'), '--kimg', '0.2'] + common)
    (run_b,) = glob.glob(str(tmp_path / 'b' / '*'))
    _run(['train.py', '--resume', run_b, '--kimg', '0.3'])
    (run_a,) = glob.glob(str(tmp_path / 'a' / '*'))
    a = snapshot.load_snapshot(os.path.join(run_a, 'network-snapshot-000000.pt'))
    b = snapshot.load_snapshot(os.path.join(run_b, 'network-snapshot-000000.pt'))
    for name in ['G', 'D', 'G_ema']:
        for (k, va), vb in zip(a[name].state_dict().items(), b[name].state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=f'{name}.{k}')
    assert float(a.augment_pipe.p) == pytest.approx(float(b.augment_pipe.p))


def test_sigterm_saves_and_resumes(data_dir, tmp_path):
    outdir = str(tmp_path / 'runs')
    proc = subprocess.Popen([sys.executable, 'train.py', '--data', data_dir, '--outdir', outdir, '--cond=1',
                             '--kimg', '50', '--tick', '0.1', '--snap', '100', '--aug', 'ada', '--target', '0.0'] + TINY_TRAIN_ARGS,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait until training has started (a first tick line), then ask it to stop.
    deadline = time.time() + 240
    seen = ''
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if line.startswith('tick 0'):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    seen += out
    assert proc.returncode == 0, seen[-3000:]
    (run,) = glob.glob(os.path.join(outdir, '*'))
    assert os.path.isfile(os.path.join(run, 'training-state.pt')), seen[-2000:]
    stopped_kimg = _stats(run)[-1]['Progress/kimg']['mean']
    assert 0 < stopped_kimg < 50
    _run(['train.py', '--resume', run, '--kimg', f'{stopped_kimg + 0.1:.3f}'])
    resumed = _stats(run)
    assert resumed[-1]['Progress/kimg']['mean'] >= stopped_kimg + 0.09
