"""A 2-process gloo run on CPU trains and keeps both ranks' parameters identical."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import make_patch_archive, make_png_folder, zip_folder
from training import checkpoint


def _worker(rank, c, init_file, out_dir):
    import train
    from training.training_loop import training_loop
    torch.set_num_threads(1)
    train._init_distributed(rank, 2, 'cpu', init_file)
    kwargs = {k: v for k, v in c.items() if k not in ('num_gpus', 'run_dir')}
    result = training_loop(rank=rank, num_gpus=2, run_dir=c.run_dir, **kwargs)
    torch.save({name: {k: v.detach().clone() for k, v in getattr(result, name).state_dict().items()}
                for name in ['G', 'D', 'G_ema', 'augment_pipe']}, os.path.join(out_dir, f'rank{rank}.pt'))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize('hooks', [{}, dict(topk=True, fq_res='8', fq_dict=16, attn_res='8'), 'paint'],
                         ids=['plain', 'mri-hooks', 'paint'])
def test_two_process_gloo_keeps_ranks_identical(tmp_path, hooks):
    from training.config import setup_training_config
    if hooks == 'paint':  # The painting family: a patch archive (each rank draws its own repaint masks).
        data, hooks = make_patch_archive(str(tmp_path / 'data')), {}
    else:
        data = make_png_folder(str(tmp_path / 'data'), n=8, res=16, num_classes=2)
    c = setup_training_config(data=data, gpus=2, batch=4, cond=True, cbase=256, cmax=16, map_depth=1, kimg=0.024,
                              tick=0.012, snap=1, metrics='none', device='cpu', aug='fixed', p=0.5,
                              **hooks)
    c.run_dir = str(tmp_path / 'run')
    os.makedirs(c.run_dir)
    mp.start_processes(_worker, args=(c, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, start_method='spawn')
    r0 = torch.load(str(tmp_path / 'rank0.pt'), weights_only=True)
    r1 = torch.load(str(tmp_path / 'rank1.pt'), weights_only=True)
    for name in r0:
        for key in r0[name]:
            assert torch.equal(r0[name][key], r1[name][key]), f'{name}.{key} differs between ranks'
    assert float(r0['augment_pipe']['p']) == 0.5
    assert checkpoint.latest_snapshot(c.run_dir) is not None


@pytest.mark.slow
def test_torchrun_two_processes_share_one_run_dir(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # What users run: a zip archive and the default DataLoader workers (3 per rank).
    data = zip_folder(make_png_folder(str(tmp_path / 'data'), n=8, res=16, num_classes=2), str(tmp_path / 'data.zip'))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          'train.py', '--data', data, '--outdir', str(tmp_path / 'runs'), '--cond=1', '--cbase', '256',
                          '--cmax', '16', '--map-depth', '1', '--batch', '4', '--kimg', '0.008', '--tick', '0.008',
                          '--snap', '1', '--metrics', 'none', '--device', 'cpu'],
                         cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    runs = os.listdir(str(tmp_path / 'runs'))
    assert runs == ['00000-data-gpus2-batch4-cond']
    assert checkpoint.latest_snapshot(str(tmp_path / 'runs' / runs[0])) is not None
