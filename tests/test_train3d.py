"""Volumes through the one training loop: train.py on a phantom volume archive (zip, default workers), montage
grids, exact resume, a 2-process gloo run, and the bad inputs (2D/3D snapshot mix-ups, shapes not base x 2^k)."""

import glob
import json
import os
import subprocess
import sys
import zipfile

import click
import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp

from torch_utils import snapshot
from training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY3D = ['--cbase', '256', '--cmax', '16', '--map-depth', '2', '--batch', '4', '--metrics', 'none', '--device', 'cpu']


def _run(args):
    res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _fails(args):
    res = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    return res.stderr.strip().splitlines()[-1]


@pytest.fixture(scope='module')
def vol_zip(tmp_path_factory):
    """2 phantom cases as 8^3 volumes: two modalities and the three tumour channels, labelled by tumour."""
    path = str(tmp_path_factory.mktemp('vol') / 'vol8.zip')
    _run(['dataset_tool.py', '--source', 'phantom', '--phantom-cases', '2', '--dest', path, '--kind', 'volumes',
          '--volume-size', '8', '--modalities', 't1n,t2w', '--with-seg', '--labels', 'tumour'])
    return path


def _last_grid(run_dir):
    """The newest fakes grid (named by images seen: fakes000000032.png)."""
    return max(glob.glob(os.path.join(run_dir, 'fakes0*.png')))


def _train(outdir, data, kimg, extra=()):
    _run(['train.py', '--data', data, '--outdir', outdir, '--cond=1', '--kimg', str(kimg), '--tick', '0.016',
          '--snap', '1', '--aug', 'ada', '--target', '0.0', '--seed', '2'] + TINY3D + list(extra))
    (run,) = glob.glob(os.path.join(outdir, '*'))
    return run


@pytest.fixture(scope='module')
def straight_run(vol_zip, tmp_path_factory):
    return _train(str(tmp_path_factory.mktemp('a')), vol_zip, 0.032)


def test_volume_run_end_to_end(straight_run):
    options = json.load(open(os.path.join(straight_run, 'training_options.json')))
    assert options['G_kwargs']['class_name'] == 'training.networks.Generator'        # One family for 2D and 3D.
    assert options['augment_kwargs']['class_name'] == 'training.augment.AugmentPipe'
    assert 'grid_kwargs' not in options
    assert options['augment_kwargs']['channel_names'] == ['t1n', 't2w', 'seg_netc', 'seg_snfh', 'seg_et']
    data = snapshot.load_snapshot(checkpoint.latest_snapshot(straight_run))
    img = data.G_ema(torch.randn([1, data.G_ema.z_dim]), torch.tensor([[1.0, 0.0]]))
    assert list(img.shape) == [1, 5, 8, 8, 8] and data.dataset.kind == 'volumes'
    stats = [json.loads(line) for line in open(os.path.join(straight_run, 'stats.jsonl'))]
    assert stats[-1]['Progress/kimg']['mean'] == pytest.approx(0.032, abs=0.001)
    assert stats[-1]['Progress/augment']['mean'] > 0  # ADA ran its 3D pipeline.
    # Montages: the samples of an unconditional volume grid for the one class, each 2 image channels + the label
    # overlay, in 3 planes of 8 voxels, wrapped to a sheet near 16:9 with white gaps between the cells and the class
    # name in a left margin (training.grids, as in 2D).
    from training import grids
    count = grids.VOLUME_COLS * grids.VOLUME_ROWS
    sheets = {(p.height, p.width) for p in (grids.plan_sheet([count], (3 * 8, 3 * 8), m) for m in range(10, 100))}
    for name in ['reals.png', 'fakes_init.png', os.path.basename(_last_grid(straight_run))]:
        grid = np.array(PIL.Image.open(os.path.join(straight_run, name)))
        assert grid.shape[2] == 3 and grid.shape[:2] in sheets, (name, grid.shape)  # The class name in the margin.


def test_volume_resume_is_exact(vol_zip, straight_run, tmp_path):
    """0.016 kimg + resume to 0.032 gives the weights of 0.032 kimg straight."""
    run = _train(str(tmp_path / 'b'), vol_zip, 0.016)
    _run(['train.py', '--resume', run, '--kimg', '0.032'])
    a = snapshot.load_snapshot(checkpoint.latest_snapshot(straight_run))
    b = snapshot.load_snapshot(checkpoint.latest_snapshot(run))
    for name in ['G', 'D', 'G_ema']:
        for (k, va), vb in zip(a[name].state_dict().items(), b[name].state_dict().values()):
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=f'{name}.{k}')
    assert float(a.augment_pipe.p) == pytest.approx(float(b.augment_pipe.p))


@pytest.mark.slow
def test_volume_gloo_two_processes(vol_zip, tmp_path):
    from tests.test_distributed import _worker
    from training.config import setup_training_config
    c = setup_training_config(data=vol_zip, gpus=2, batch=4, cond=True, cbase=256, cmax=16, map_depth=1, kimg=0.016,
                              tick=0.008, snap=1, metrics='none', device='cpu', aug='fixed', p=0.5)
    c.run_dir = str(tmp_path / 'run')
    os.makedirs(c.run_dir)
    mp.start_processes(_worker, args=(c, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, start_method='spawn')
    r0 = torch.load(str(tmp_path / 'rank0.pt'), weights_only=True)
    r1 = torch.load(str(tmp_path / 'rank1.pt'), weights_only=True)
    for name in r0:
        for key in r0[name]:
            assert torch.equal(r0[name][key], r1[name][key]), f'{name}.{key} differs between ranks'
    assert checkpoint.latest_snapshot(c.run_dir) == checkpoint.snapshot_path(c.run_dir, 16)


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing written.

def _volume_zip(path, shape, n=2):
    """A minimal volume archive written by hand (fast): n uint8 volumes of ``shape`` with one channel."""
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(n):
            with z.open(f'v{i}.npy', 'w') as f:
                np.save(f, np.full([1] + list(shape), 100, np.uint8))
        z.writestr('dataset.json', json.dumps({'kind': 'volumes', 'channels': ['t1n'], 'labels': None}))
    return str(path)


def test_shape_not_base_times_power_of_two(tmp_path):
    from training.config import setup_training_config
    data = _volume_zip(tmp_path / 'odd.zip', [12, 12, 20])
    with pytest.raises(click.UsageError, match='not a base shape') as err:
        setup_training_config(data=data, device='cpu', metrics='none')
    assert '--data' in str(err.value.message) and '\n' not in err.value.message
    data = _volume_zip(tmp_path / 'box.zip', [20, 24, 20])  # 5x6x5 x 4: accepted, anisotropic.
    c = setup_training_config(data=data, device='cpu', metrics='none')
    assert c.G_kwargs.class_name == 'training.networks.Generator' and c.training_set_kwargs.resolution is None
    assert c.G_kwargs.mixed_precision == 'float16' and c.G_kwargs.checkpointing is False


def test_hook_resolutions_name_the_levels_of_a_volume(tmp_path):
    """--attn-res and --fq-res name a level by its largest side: 10x12x10 = 5x6x5 x 2 has levels of side 6, 12."""
    from training.config import setup_training_config
    data = _volume_zip(tmp_path / 'box.zip', [10, 12, 10])
    c = setup_training_config(data=data, device='cpu', metrics='none', attn_res='6', fq_res='6')
    assert c.G_kwargs.attn_res == [6] and c.D_kwargs.attn_res == [6]
    assert c.G_kwargs.attn_kwargs['class_name'] == 'training.attention.SelfAttention'
    assert c.D_kwargs.quantize_kwargs['resolutions'] == [6]
    # D quantizes block outputs; none is at the full resolution (D could not be built with 12).
    with pytest.raises(click.UsageError, match='--fq-res: 12 is the full resolution; D has no 10x12x10 block'):
        setup_training_config(data=data, device='cpu', metrics='none', fq_res='6,12')
    with pytest.raises(click.UsageError, match='--attn-res: 12 is the full resolution; D has no 10x12x10 block') as err:
        setup_training_config(data=data, device='cpu', metrics='none', attn_res='12')
    assert 'choose from 6' in err.value.message
    with pytest.raises(click.UsageError, match='--fq-res: 8 is not the largest side of a level') as err:
        setup_training_config(data=data, device='cpu', metrics='none', fq_res='8')
    assert 'choose from 6, 12' in err.value.message and '\n' not in err.value.message


def _tiny_snapshot(path, volume):
    from training.networks import Generator
    shape = [8, 8, 8] if volume else [8, 8]
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=shape, img_channels=1, channel_base=64, channel_max=8)
    desc = dict(kind='volumes' if volume else 'slices', image_shape=[1] + shape)
    snapshot.save_snapshot(str(path), dict(G=G, G_ema=G), dataset=desc)
    return str(path)


def test_resume_refuses_2d_snapshot_for_volumes_and_reverse(tmp_path):
    from tests.helpers import make_png_folder
    vol = _volume_zip(tmp_path / 'v.zip', [8, 8, 8])
    slices = make_png_folder(str(tmp_path / 'pngs'), n=2, res=8)
    snap2d = _tiny_snapshot(tmp_path / 's2d.pt', volume=False)
    snap3d = _tiny_snapshot(tmp_path / 's3d.pt', volume=True)
    out = str(tmp_path / 'runs')
    line = _fails(['train.py', '--data', vol, '--outdir', out, '--resume', snap2d, '--device', 'cpu', '--metrics', 'none'])
    assert '--resume' in line and '2D snapshot' in line and 'volumes' in line
    assert not os.path.exists(out)
    from training.config import setup_training_config  # The same check, in-process (each CLI start costs seconds).
    with pytest.raises(click.UsageError, match=r'--resume: .* is a 3D \(volume\) snapshot'):
        setup_training_config(data=slices, resume=snap3d, device='cpu', metrics='none')
    with pytest.raises(click.UsageError, match='--cfg=vol32: a volume preset'):
        setup_training_config(data=slices, cfg='vol32', device='cpu', metrics='none')
    with pytest.raises(click.UsageError, match='--cfg=paper256: a 2D preset'):
        setup_training_config(data=vol, cfg='paper256', device='cpu', metrics='none')


def test_anisotropic_box_trains(tmp_path):
    """A base x 2^k box (5x6x5 x 2 = 10x12x10) trains through the loop and its montage grids."""
    from training.config import setup_training_config
    from training.training_loop import training_loop
    data = _volume_zip(tmp_path / 'box.zip', [10, 12, 10], n=4)
    c = setup_training_config(data=data, device='cpu', metrics='none', batch=2, cbase=64, cmax=8, map_depth=1,
                              kimg=0.004, tick=0.002, snap=1)
    c.run_dir = str(tmp_path / 'run')
    os.makedirs(c.run_dir)
    kwargs = {k: v for k, v in c.items() if k not in ('num_gpus', 'run_dir')}
    result = training_loop(rank=0, num_gpus=1, run_dir=c.run_dir, **kwargs)
    assert result.G_ema.img_shape == [10, 12, 10]
    # Montage cells are as tall as the tallest plane (12) and as wide as the widest (12), 3 planes, 8 samples (no
    # class margin: unconditional), with white gaps, wrapped to a sheet near 16:9.
    from training import grids
    grid = np.array(PIL.Image.open(_last_grid(c.run_dir)))
    plan = grids.plan_sheet([grids.VOLUME_COLS * grids.VOLUME_ROWS], (12, 3 * 12))
    assert grid.shape[:2] == (plan.height, plan.width)
    data = snapshot.load_snapshot(checkpoint.latest_snapshot(c.run_dir))
    assert data.dataset.image_shape == [1, 10, 12, 10]
