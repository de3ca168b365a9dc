"""Zip archives read by DataLoader workers (the defaults users get): no handle is shared across a fork.

Before each process opened its own zip handle, workers forked after the parent had opened the archive read
through one shared file offset and failed at random with "Bad CRC-32" or "File name in directory ... differ".
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dnnlib
from tests.helpers import make_png_folder, zip_folder
from training.dataset import ImageFolderDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _zip(tmp_path, channels, n, res):
    root = make_png_folder(str(tmp_path / 'src'), n=n, res=res, num_classes=2, channels=channels, seed=1)
    return zip_folder(root, str(tmp_path / 'data.zip'))


@pytest.mark.parametrize('channels', [1, 2], ids=['png', 'npy'])
def test_loader_workers_read_a_zip_the_parent_opened(tmp_path, channels):
    ds = ImageFolderDataset(_zip(tmp_path, channels, n=48, res=32), use_labels=True)
    expected = np.stack([ds[i][0] for i in range(len(ds))])  # The parent has read every member.
    ds.content_hash()                                        # ... and the zip directory (as metrics do).
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True, prefetch_factor=2)
    for _epoch in range(3):
        images = torch.cat([img for img, _label in loader]).numpy()
        np.testing.assert_array_equal(images, expected)
    # The parent's own handle still reads correctly after the workers have run.
    np.testing.assert_array_equal(ds[len(ds) - 1][0], expected[-1])
    ds.close()


def test_each_process_opens_its_own_handle(tmp_path):
    ds = ImageFolderDataset(_zip(tmp_path, 1, n=4, res=8))
    parent = ds._get_zipfile()
    assert ds._get_zipfile() is parent  # Reused within a process.
    ds._zipfile_pid = -1                 # As a forked child sees it: the handle belongs to another pid.
    child = ds._get_zipfile()
    assert child is not parent and parent.fp is None  # The inherited handle is closed, never read from.
    assert ds[3][0].shape == (1, 8, 8)
    ds.close()


@pytest.mark.parametrize('channels', [1, 2], ids=['png', 'npy'])
def test_train_on_zip_with_default_workers(tmp_path, channels):
    data = _zip(tmp_path, channels, n=32, res=16)
    outdir = str(tmp_path / 'runs')
    # No --workers: the default (3, at most the CPU count) is what users get.
    res = subprocess.run([sys.executable, 'train.py', '--data', data, '--outdir', outdir, '--cond=1', '--kimg', '0.064',
                          '--tick', '0.032', '--snap', '100', '--cbase', '256', '--cmax', '16', '--map-depth', '1',
                          '--batch', '8', '--metrics', 'none', '--device', 'cpu', '--aug', 'ada'],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run,) = glob.glob(os.path.join(outdir, '*'))
    with open(os.path.join(run, 'training_options.json')) as f:
        assert json.load(f)['data_loader_kwargs']['num_workers'] == min(3, dnnlib.usable_cpus())
    assert 'suggested max number of worker' not in res.stderr  # torch's warning, twice per 2-core run before
    with open(os.path.join(run, 'stats.jsonl')) as f:
        assert json.loads(f.readlines()[-1])['Progress/kimg']['mean'] == pytest.approx(0.064, abs=0.01)

