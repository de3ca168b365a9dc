"""The MRI training hooks (top-k, feature quantization, attention) through the real loop: train, snapshot, resume."""

import json
import os

import click
import pytest
import torch
from click.testing import CliRunner

import train

from tests.helpers import make_png_folder, zip_folder
from torch_utils import snapshot, training_stats
from training import checkpoint
from training import config as training_config
from training.config import setup_training_config
from training.training_loop import training_loop

HOOKS = {
    'topk': dict(topk=True, topk_gamma=0.5, topk_min=0.25),
    'topk-mirror': dict(topk=True, topk_gamma=0.5, topk_min=0.25, mirror=True),
    'fq': dict(fq_res='8', fq_dict=16, fq_decay=0.8, fq_weight=1.0),
    'attn': dict(attn_res='8'),
}


def _train(data, run_dir, kimg, **hook):
    training_stats.reset()
    c = setup_training_config(data=data, batch=4, cond=True, cbase=256, cmax=16, map_depth=1, kimg=kimg, tick=0.008,
                              snap=1, metrics='none', device='cpu', aug='ada', target=0.0, **hook)
    if os.path.isdir(run_dir) and os.path.isfile(os.path.join(run_dir, checkpoint.STATE_NAME)):
        c.resume_run = run_dir
    os.makedirs(run_dir, exist_ok=True)
    kwargs = {k: v for k, v in c.items() if k not in ('num_gpus',)}
    kwargs['run_dir'] = run_dir
    return training_loop(**kwargs)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    # A zip read by the default DataLoader workers: what users train on.
    root = tmp_path_factory.mktemp('d')
    return zip_folder(make_png_folder(str(root / 'pngs'), n=8, res=16, num_classes=2), str(root / 'pngs.zip'))


@pytest.mark.parametrize('name', list(HOOKS))
def test_hook_trains_snapshots_and_resumes(name, data, tmp_path):
    run = str(tmp_path / 'run')
    _train(data, run, 0.016, **HOOKS[name])
    snap = snapshot.load_snapshot(checkpoint.latest_snapshot(run))
    state = checkpoint.load_training_state(run)
    with open(os.path.join(run, 'stats.jsonl')) as f:
        stats = [json.loads(line) for line in f]
    if name.startswith('topk'):
        # 8 distinct images per epoch (--mirror's copies are not new images); the last G step of 16 images starts
        # at 12 seen: 0.5 ** (12 / 8), then the floor.
        assert state['topk_fraction'] == pytest.approx(0.5 ** 1.5, abs=1e-6)
        assert 'Loss/topk_fraction' in stats[-1]
        assert snap.extra.config['training_set_kwargs']['use_labels']
    if name == 'fq':
        assert any(k.startswith('quantizers.8.') for k in snap.D.state_dict())
        assert 'FQ/perplexity8' in stats[-1] and 'Loss/D_real/fq' in stats[-1]
        embed_before = snap.D.state_dict()['quantizers.8.embed'].clone()
    if name == 'attn':
        assert hasattr(snap.G_ema.synthesis, 'attn8') or any('attn8' in k for k in snap.G_ema.state_dict())
        assert any('attn8' in k for k in snap.D.state_dict())
    result = _train(data, run, 0.032, **HOOKS[name])
    assert result.cur_nimg == 32
    after = checkpoint.load_training_state(run)
    assert after['cur_nimg'] == 32
    if name.startswith('topk'):
        assert after['topk_fraction'] == pytest.approx(0.25)
    if name == 'fq':
        resumed = snapshot.load_snapshot(checkpoint.latest_snapshot(run))
        assert not torch.equal(resumed.D.state_dict()['quantizers.8.embed'], embed_before)  # dictionary kept moving


def test_freezed_keeps_highest_resolution_blocks_of_D_fixed(data, tmp_path):
    training_stats.reset()
    c = setup_training_config(data=data, batch=4, cond=True, cbase=256, cmax=16, map_depth=1, kimg=0.008, tick=0.008,
                              snap=1, metrics='none', device='cpu', aug='noaug', freezed=1, seed=5)
    kwargs = {k: v for k, v in c.items() if k != 'num_gpus'}
    kwargs['run_dir'] = str(tmp_path)
    D = training_loop(**kwargs).D
    state = checkpoint.load_training_state(str(tmp_path))
    # Adam keeps moments only for parameters it stepped: the frozen 16x16 block has none, the next block has.
    names = [n for n, _ in D.named_parameters()]
    stepped = {names[int(i)] for i in state['optimizers']['D']['state']}
    assert [n for n in names if n.startswith('b16.')] and not any(n.startswith('b16.') for n in stepped)
    assert any(n.startswith('b8.') for n in stepped)


def test_full_resolution_attention_is_refused_in_one_line_before_any_work(data, tmp_path):
    out = tmp_path / 'runs'
    r = CliRunner().invoke(train.main, ['--outdir', str(out), '--data', data, '--attn-res', '8,16', '--device', 'cpu'])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1 and '--attn-res: 16 is the full resolution' in lines[0] and '4, 8' in lines[0]
    assert not out.exists()                                 # nothing written


def test_attention_memory_warning_is_one_line(data, capsys):
    opts = dict(data=data, batch=4, cbase=256, cmax=16, metrics='none', device='cpu', attn_res='4,8')
    c = setup_training_config(**opts)
    assert 'warning' not in capsys.readouterr().err
    # 4 and 8 at batch 4: G and D layers, 2 * (2,048 + 131,072) = 266,240 bytes; a 400 kB device warns at 50%.
    training_config.warn_attention_memory([4, 8], c.G_kwargs.attn_kwargs, batch_gpu=4, device='cpu', total_bytes=400_000)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('warning: --attn-res 4,8') and '--batch-gpu' in err[0]
    training_config.warn_attention_memory([4, 8], c.G_kwargs.attn_kwargs, batch_gpu=4, device='cpu', total_bytes=600_000)
    assert capsys.readouterr().err == ''


def test_hook_options_reach_the_config(data):
    c = setup_training_config(data=data, batch=4, metrics='none', device='cpu', topk=True, topk_global=True,
                              fq_res='8', fq_mode='loss')
    assert c.loss_kwargs.topk_global is True and c.loss_kwargs.topk_kwargs['min_frac'] == 0.75
    assert c.D_kwargs.quantize_kwargs['mode'] == 'loss'
    # The hooks by today's class names (training/), in the one network family.
    assert c.loss_kwargs.topk_kwargs['class_name'] == 'training.topk.TopK'
    assert c.D_kwargs.quantize_kwargs['class_name'] == 'training.fq.FeatureQuantizer'
    assert c.G_kwargs.class_name == 'training.networks.Generator'
    with pytest.raises(click.UsageError, match='--fq-mode'):
        setup_training_config(data=data, batch=4, metrics='none', device='cpu', fq_res='8', fq_mode='both')
    # The full resolution (the README's --fq-res 32 on a 32-px archive once passed --dry-run and crashed later).
    full = setup_training_config(data=data, batch=4, metrics='none', device='cpu').training_set_kwargs.resolution
    with pytest.raises(click.UsageError, match=f'--fq-res: {full} is the full resolution'):
        setup_training_config(data=data, batch=4, metrics='none', device='cpu', fq_res=str(full))


def test_checkpointing_and_bf16_reach_the_2d_networks(data):
    """The one network family takes checkpointing and mixed_precision in 2D too; a 2D config names them only when
    asked, so its networks are configured as before."""
    c = setup_training_config(data=data, batch=4, metrics='none', device='cpu')
    assert not {'checkpointing', 'mixed_precision'} & (set(c.G_kwargs) | set(c.D_kwargs))
    c = setup_training_config(data=data, batch=4, metrics='none', device='cpu', checkpointing=True, bf16=True)
    for kwargs in (c.G_kwargs, c.D_kwargs):
        assert kwargs.checkpointing is True and kwargs.mixed_precision == 'bfloat16'


def test_freezed_counts_blocks_and_refuses_freezing_all_of_d(data):
    """--freezed N freezes N blocks (help and docs said layers); --freezed 4 on a 3-block D froze everything."""
    from training.training_loop import _frozen_param_names
    from training.networks import Discriminator
    c = setup_training_config(data=data, batch=4, metrics='none', device='cpu', freezed=1)  # 16 px: blocks 16, 8, 4.
    D = Discriminator(c_dim=2, img_resolution=16, img_channels=1, channel_base=64, channel_max=8)
    assert {n.split('.')[0] for n in _frozen_param_names(D, c.freezed)} == {'b16'}
    with pytest.raises(click.UsageError, match='--freezed 3: D has 3 blocks here'):
        setup_training_config(data=data, batch=4, metrics='none', device='cpu', freezed=3)
