"""Joint generation: an archive of all four modalities plus tumour-label channels trains, and generate.py
writes one image per modality, the decoded BraTS label map (values 0-3 only) and a colour overlay."""

import glob
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from tests.helpers import TINY_TRAIN_ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope='module')
def joint_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('joint')
    archive = str(tmp / 'joint.zip')
    _run(['dataset_tool.py', '--source', 'phantom', '--phantom-cases', '1', '--modalities', 'all', '--with-seg',
          '--resolution', '16', '--planes', 'axial,coronal', '--dest', archive])
    _run(['train.py', '--data', archive, '--outdir', str(tmp / 'runs'), '--cond=1', '--kimg', '0.016', '--tick', '0.016',
          '--snap', '1'] + TINY_TRAIN_ARGS)
    (run,) = glob.glob(str(tmp / 'runs' / '*'))
    return run


def test_generate_writes_modalities_labels_and_overlay(joint_run, tmp_path):
    out = str(tmp_path / 'gen')
    _run(['generate.py', '--network', joint_run, '--seeds', '0-1', '--class', 'axial', '--outdir', out])
    files = sorted(os.listdir(out))
    for seed in ('seed0000', 'seed0001'):
        for name in ('t1n', 't1c', 't2w', 't2f', 'seg', 'overlay'):
            assert f'{seed}-{name}.png' in files, files
        assert f'{seed}.npy' in files
    stack = np.load(os.path.join(out, 'seed0000.npy'))
    assert stack.shape == (7, 16, 16)
    seg = np.array(PIL.Image.open(os.path.join(out, 'seed0000-seg.png')))
    assert seg.shape == (16, 16) and set(np.unique(seg)) <= {0, 1, 2, 3}
    from mri.seg import decode_seg
    np.testing.assert_array_equal(seg, decode_seg(stack[4:7]))
    overlay = PIL.Image.open(os.path.join(out, 'seed0000-overlay.png'))
    assert overlay.mode == 'RGB'
    assert PIL.Image.open(os.path.join(out, 'seed0000-t2w.png')).mode == 'L'


def test_class_all_grid_shows_every_channel(joint_run, tmp_path):
    out = str(tmp_path / 'all')
    _run(['generate.py', '--network', joint_run, '--seeds', '0-2', '--class', 'all', '--outdir', out])
    grid = PIL.Image.open(os.path.join(out, 'class_grid.png'))
    # 3 seeds per plane, each its 4 modalities side by side (the seg channels as an overlay on the first, not inline),
    # 4-pixel gaps; a band per plane, named in a left margin (training.grids' sheet near 16:9).
    from training import grids
    sheets = {(p.width, p.height): m for m in range(20, 100) for p in [grids.plan_sheet([3, 3], (16, 4 * 16), m)]}
    assert grid.size in sheets, grid.size
    pixels = np.array(grid)
    assert (pixels[:, grids.GAP:sheets[grid.size]] < 128).any()  # the plane names
