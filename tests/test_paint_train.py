"""The painting family end to end on CPU: a patch archive from dataset_tool.py picks it, trains with the loop's
snapshots and grids, resumes exactly; the options that do not apply are refused before the run dir exists."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import train
from tests.helpers import make_patch_archive, make_png_folder
from torch_utils import snapshot, training_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--cond=1', '--cbase', '256', '--cmax', '16', '--map-depth', '1', '--batch', '4', '--device', 'cpu',
        '--tick', '0.016', '--snap', '1', '--seed', '5']


def _run(args):
    res = subprocess.run([sys.executable] + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope='module')
def patches(tmp_path_factory):
    """A 2D patch archive (16x16 axial crops, with the cohort label) of three tiny phantom cases."""
    return make_patch_archive(str(tmp_path_factory.mktemp('paint')))


def test_paint_run_resumes_exactly(patches, tmp_path):
    """0.032 kimg + resume to 0.048 gives the weights of 0.048 kimg straight; the run is the painting family
    (picked by the patch archive), with its loss, grids of repainted reals and the snapshot's dataset kind."""
    _run(['train.py', '--outdir', tmp_path / 'a', '--data', patches, '--kimg', '0.048'] + TINY)
    _run(['train.py', '--outdir', tmp_path / 'b', '--data', patches, '--kimg', '0.032'] + TINY)
    (run_b,) = glob.glob(str(tmp_path / 'b' / '*'))
    _run(['train.py', '--resume', run_b, '--kimg', '0.048'])
    (run_a,) = glob.glob(str(tmp_path / 'a' / '*'))
    with open(os.path.join(run_a, 'training_options.json')) as f:
        opts = json.load(f)
    assert opts['G_kwargs']['class_name'] == 'training.paint.PaintGenerator'
    assert opts['loss_kwargs']['class_name'] == 'training.paint_loss.PaintLoss'
    assert opts['augment_kwargs']['channel_names'][4:] == ['seg_repaint', 'seg_netc', 'seg_snfh', 'seg_et']
    assert os.path.isfile(os.path.join(run_a, 'fakes_init.png')) and os.path.isfile(os.path.join(run_a, 'reals.png'))
    name = 'network-snapshot-000000048.pt'
    a, b = snapshot.load_snapshot(os.path.join(run_a, name)), snapshot.load_snapshot(os.path.join(run_b, name))
    assert a.dataset['kind'] == 'patches' and a.G_ema.paint_channels == ['t1n', 't1c', 't2w', 't2f']
    for net in ['G', 'D', 'G_ema']:
        for (k, va), vb in zip(a[net].state_dict().items(), b[net].state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=f'{net}.{k}')
    with open(os.path.join(run_a, 'stats.jsonl')) as f:
        stats = [json.loads(line) for line in f]
    assert stats[-1]['Loss/G/l1']['num'] > 0 and stats[-1]['Paint/region_fraction']['mean'] > 0


def _refused(args, *expected):
    training_stats.reset()
    result = CliRunner().invoke(train.main, [str(a) for a in args] + ['--dry-run'])
    assert result.exit_code == 2, result.output[-2000:] + repr(result.exception)
    error = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error) == 1 and 'Traceback' not in result.output, result.output
    for text in expected:
        assert text in error[0], error[0]


def test_options_that_do_not_apply_are_refused(patches, tmp_path):
    slices = make_png_folder(str(tmp_path / 'pngs'), n=4, res=16, num_classes=2)
    out = ['--outdir', tmp_path / 'runs', '--device', 'cpu']
    _refused(out + ['--data', slices, '--cfg', 'paint'], '--cfg=paint', 'dataset_tool.py --kind patches')
    _refused(out + ['--data', slices, '--paint-l1', '2'], '--paint-l1', 'patch archive')
    _refused(out + ['--data', patches, '--metrics', 'fid50k_full'], '--metrics', 'fid50k_full', 'paint_ssim')
    _refused(out + ['--data', patches, '--topk=1'], '--topk', 'painting family')
    assert not os.path.exists(tmp_path / 'runs')


def test_dry_run_names_the_family(patches, tmp_path):
    training_stats.reset()
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path), '--data', patches, '--device', 'cpu',
                                             '--cfg', 'paint', '--paint-l1', '0.5', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert 'training.paint.PaintGenerator' in result.output and '"paint_l1": 0.5' in result.output
