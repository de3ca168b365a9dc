"""ADA options as in StyleGAN2-ADA: ada_kimg 100 when starting from a snapshot (transfer learning), else 500;
--p only with --aug=fixed, refused with one line otherwise."""

import copy
import os

import pytest
from click.testing import CliRunner

import dnnlib
import train
from tests.helpers import make_png_folder
from torch_utils import snapshot
from training.config import setup_training_config
from training.dataset import ImageFolderDataset

TINY = dict(cbase=256, cmax=16, map_depth=1, batch=4, metrics='none', device='cpu')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_png_folder(str(tmp_path_factory.mktemp('data') / 'pngs'), n=4, res=16, num_classes=2)


def _snapshot(data, path):
    """A real snapshot of fresh networks for this data, as a finished run would leave it."""
    c = setup_training_config(data=data, cond=True, **TINY)
    ds = ImageFolderDataset(data, use_labels=True)
    common = dict(c_dim=ds.label_dim, img_resolution=ds.resolution, img_channels=ds.num_channels)
    G = dnnlib.construct_class_by_name(**c.G_kwargs, **common)
    D = dnnlib.construct_class_by_name(**c.D_kwargs, **common)
    pipe = dnnlib.construct_class_by_name(**c.augment_kwargs)
    snapshot.save_snapshot(path, dict(G=G, D=D, G_ema=copy.deepcopy(G), augment_pipe=pipe), dataset=ds.describe())
    return path


@pytest.mark.parametrize('cfg', ['auto', 'cifar'])
def test_ada_kimg_is_500_from_scratch_and_100_from_a_snapshot(data, tmp_path, cfg):
    assert setup_training_config(data=data, cond=True, cfg=cfg, **TINY).ada_kimg == 500
    pt = _snapshot(data, str(tmp_path / 'network-snapshot-000000.pt'))
    assert setup_training_config(data=data, cond=True, cfg=cfg, resume=pt, **TINY).ada_kimg == 100
    # A fixed p has no controller to speed up.
    assert 'ada_kimg' not in setup_training_config(data=data, cond=True, aug='fixed', p=0.2, resume=pt, **TINY)


@pytest.mark.parametrize('aug', ['ada', 'noaug'])
def test_p_without_aug_fixed_is_refused_in_one_line(data, tmp_path, aug):
    outdir = tmp_path / 'runs'
    r = CliRunner().invoke(train.main, ['--data', data, '--outdir', str(outdir), f'--aug={aug}', '--p', '0.2',
                                        '--metrics', 'none', '--device', 'cpu', '--dry-run'])
    assert r.exit_code == 2, r.output
    (line,) = [line for line in r.output.splitlines() if line.startswith('Error:')]
    assert '--p can only be specified with --aug=fixed' in line and 'Traceback' not in r.output
    assert not outdir.exists()  # Nothing half-made.
    c = setup_training_config(data=data, aug='fixed', p=0.2, **TINY)
    assert c.augment_p == 0.2 and c.ada_target is None
