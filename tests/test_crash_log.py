"""A crash during training leaves its full traceback in log.txt of the run dir, on every rank that crashes."""

import glob
import os
import subprocess
import sys

import pytest

from tests.helpers import make_png_folder, zip_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _archive_that_breaks_mid_run(tmp_path):
    """A zip whose first image is fine and whose others are cut inside their pixel data: their headers are those of
    the first (the checks before training read headers only), and they fail when loaded."""
    root = make_png_folder(str(tmp_path / 'src'), n=16, res=16, num_classes=2)
    for i in range(1, 16):
        path = os.path.join(root, f'img{i:04d}.png')
        with open(path, 'rb') as f:
            data = f.read()
        with open(path, 'wb') as f:  # Everything up to the pixel data (IDAT), then a few bytes of it: truncated.
            f.write(data[:data.index(b'IDAT') + 8])
    return zip_folder(root, str(tmp_path / 'broken.zip'))


def _train(data, outdir, *extra):
    return subprocess.run([sys.executable, 'train.py', '--data', data, '--outdir', outdir, '--kimg', '0.1',
                           '--cbase', '256', '--cmax', '16', '--map-depth', '1', '--batch', '4', '--metrics', 'none',
                           '--device', 'cpu', *extra],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)


def test_crash_traceback_reaches_log_txt(tmp_path):
    res = _train(_archive_that_breaks_mid_run(tmp_path), str(tmp_path / 'runs'))
    assert res.returncode != 0
    (run,) = glob.glob(str(tmp_path / 'runs' / '*'))
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'Training crashed (pid ' in log
    crash = log[log.index('Training crashed'):]
    assert 'Traceback (most recent call last):' in crash and 'training_loop' in crash
    assert 'unreadable image' in crash and 'broken.zip/img00' in crash  # The error itself, naming the file.
    assert crash.rstrip().splitlines()[-1] in res.stderr                # The same last line the console got.


def _rank(rank, c, init_file):
    import train
    try:
        train.subprocess_fn(rank, c, init_file)
    except Exception:
        os._exit(1)  # The crash is logged; spare the test runner's stderr a second copy.


@pytest.mark.slow
def test_crash_on_two_gloo_processes_logs_every_rank(tmp_path):
    # The processes of `train.py --gpus 2 --device cpu`, started without torch's spawn, whose 30-s grace
    # period after a failure would only slow the test down.
    import multiprocessing
    from training.config import setup_training_config
    c = setup_training_config(data=_archive_that_breaks_mid_run(tmp_path), gpus=2, batch=4, cbase=256, cmax=16,
                              map_depth=1, kimg=0.1, metrics='none', device='cpu')
    assert c.data_loader_kwargs.num_workers > 0
    c.run_dir = str(tmp_path / 'run')
    os.makedirs(c.run_dir)
    ctx = multiprocessing.get_context('spawn')
    procs = [ctx.Process(target=_rank, args=(rank, c, str(tmp_path / 'init'))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [1, 1]
    log = open(os.path.join(c.run_dir, 'log.txt')).read()
    assert 'Training crashed on rank 0 of 2' in log, log[-3000:]
    rank1 = [line[len('[rank 1] '):] for line in log.splitlines() if line.startswith('[rank 1] ')]
    assert rank1 and rank1[0].startswith('Training crashed on rank 1 of 2'), log[-3000:]
    assert 'Traceback (most recent call last):' in rank1
    assert any('unreadable image' in line for line in rank1)
