"""Resume semantics (docs/training.md, "Resume"), snapshot names of short runs, checks before the run dir."""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import train
from tests.helpers import make_png_folder
from tests.nvlabs_fake import write_nvlabs_pickle
from torch_utils import training_stats
from training import checkpoint

# A 16-px conditional run: 0.2 kimg, tick 0 after the first batch of 8 (as NVlabs), then ticks of 56 images, a
# snapshot each tick (the default --workers).
TINY = ['--cond=1', '--cbase', '256', '--cmax', '16', '--map-depth', '1', '--batch', '8', '--metrics', 'none',
        '--device', 'cpu', '--workers', '2']


def _train(args, ok=True):
    training_stats.reset()  # Several runs in this process (the CLI in-process saves starting Python each time).
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)
    return result


def _refused(args, *expected):
    """A refusal: usage exit status, one error line naming what is wrong, no traceback."""
    result = _train(list(args) + ['--dry-run'], ok=False)  # Were it not refused, it would only print.
    assert result.exit_code == 2, result.output[-2000:] + repr(result.exception)
    error = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error) == 1 and 'Traceback' not in result.output, result.output
    for text in expected:
        assert text in error[0], error[0]
    return error[0]


def _options(run_dir):
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_png_folder(str(tmp_path_factory.mktemp('data') / 'pngs'), n=16, res=16, num_classes=2, with_split=True)


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp('runs')
    _train(['--outdir', outdir, '--data', data, '--kimg', '0.2', '--tick', '0.05', '--snap', '1'] + TINY)
    (run_dir,) = [str(p) for p in outdir.iterdir()]
    return run_dir


def test_short_run_keeps_one_file_per_snapshot(run, tmp_path):
    names = sorted(os.listdir(run))
    snaps = [n for n in names if n.startswith('network-snapshot-')]
    grids = [n for n in names if n.startswith('fakes') and n != 'fakes_init.png']
    assert snaps == [f'network-snapshot-{n:09d}.pt' for n in (8, 64, 120, 176, 200)]  # The first at tick 0.
    assert grids == [f'fakes{n:09d}.png' for n in (8, 64, 120, 176, 200)]
    assert checkpoint.latest_snapshot(run) == os.path.join(run, 'network-snapshot-000000200.pt')
    import generate
    assert generate.resolve_network(run) == os.path.join(run, 'network-snapshot-000000200.pt')
    # Names of older runs (kimg, six digits; also NVlabs' .pkl) are still read and ordered by images seen.
    mixed = str(tmp_path / 'mixed')
    os.makedirs(mixed)
    for name in ['network-snapshot-000000.pt', 'network-snapshot-000000200.pt', 'network-snapshot-000000150.pkl']:
        open(os.path.join(mixed, name), 'w').close()
    assert os.path.basename(checkpoint.latest_snapshot(mixed)) == 'network-snapshot-000000200.pt'
    open(os.path.join(mixed, 'network-snapshot-000001.pkl'), 'w').close()  # 1 kimg = 1000 images: newer.
    assert os.path.basename(checkpoint.latest_snapshot(mixed)) == 'network-snapshot-000001.pkl'


def test_resume_run_takes_mid_run_flags_and_keeps_them(run, tmp_path):
    run2 = str(tmp_path / 'run')
    shutil.copytree(run, run2)
    result = _train(['--resume', run2, '--kimg', '0.25', '--tick', '0.04', '--snap', '2', '--workers', '1',
                     '--metric-num-gen', '50'])
    assert 'Resuming' in result.output
    opts = _options(run2)
    assert opts['total_kimg'] == 0.25 and opts['kimg_per_tick'] == 0.04 and opts['network_snapshot_ticks'] == 2
    assert opts['metric_kwargs']['num_gen'] == opts['metric_kwargs']['num_real'] == 50
    assert opts['data_loader_kwargs']['num_workers'] == 1 and 'resume_run' not in opts
    assert os.path.isfile(os.path.join(run2, 'network-snapshot-000000256.pt'))
    # A later plain resume keeps the saved total: it is reached, so it asks for a larger --kimg.
    _refused(['--resume', run2], 'already at 0.256 kimg', 'its --kimg 0.25')
    # --metrics is checked before anything is written.
    _refused(['--resume', run2, '--kimg', '1', '--metrics', 'fid_bogus'], '--metrics: unknown fid_bogus')
    assert _options(run2) == opts


def test_resume_run_refuses_model_and_data_flags(run, tmp_path):
    before = sorted(os.listdir(run))
    _refused(['--resume', run, '--outdir', tmp_path / 'other', '--data', run], '--data, --outdir cannot change mid-run')
    _refused(['--resume', run, '--kimg', '1', '--cbase', '512', '--cond=1'], '--cbase, --cond cannot change mid-run')
    _refused(['--resume', run, '--resume-partial'], '--resume-partial cannot change mid-run')
    assert not os.path.exists(tmp_path / 'other') and sorted(os.listdir(run)) == before
    _refused(['--resume', tmp_path / 'nonexistent'], 'no such run dir or snapshot file')
    moved = str(tmp_path / 'moved')
    shutil.copytree(run, moved)
    opts = _options(moved)
    opts['training_set_kwargs']['path'] = str(tmp_path / 'gone.zip')
    with open(os.path.join(moved, 'training_options.json'), 'w') as f:
        json.dump(opts, f)
    _refused(['--resume', moved, '--kimg', '1'], 'its training data', 'gone.zip is missing')
    _refused(['--resume', os.path.join(run, 'network-snapshot-000000200.pt')], '--outdir and --data required')


def test_resume_snapshot_starts_a_new_run(run, data, tmp_path):
    snap = os.path.join(run, 'network-snapshot-000000200.pt')
    outdir = tmp_path / 'new'
    result = _train(['--resume', snap, '--outdir', outdir, '--data', data, '--kimg', '0.008', '--tick', '0.008'] + TINY)
    assert 'copied 159 of 159 tensors' in result.output
    (new_run,) = os.listdir(outdir)
    assert _options(outdir / new_run)['resume_pkl'] == snap


def test_resume_snapshot_refuses_what_does_not_fit(run, data, tmp_path):
    snap = os.path.join(run, 'network-snapshot-000000200.pt')
    outdir = tmp_path / 'out'
    uncond = [a for a in TINY if a != '--cond=1']
    _refused(['--resume', snap, '--outdir', outdir, '--data', data] + uncond,
             'label dimension (c_dim) 2 in the snapshot, 0 here', '--resume-partial')
    _refused(['--resume', snap, '--outdir', outdir, '--data', data] + TINY + ['--cmax', '8'],
             'network widths differ', 'b4.const')
    data8 = make_png_folder(str(tmp_path / 'png8'), n=4, res=8, num_classes=2)
    _refused(['--resume', snap, '--outdir', outdir, '--data', data8] + TINY, 'resolution 16 in the snapshot, 8 here')
    labelled = make_png_folder(str(tmp_path / 'planes'), n=4, res=16, num_classes=2, labels='groups')
    _refused(['--resume', snap, '--outdir', outdir, '--data', labelled] + TINY,
             'labels class0,class1 in the snapshot, axial,coronal here')
    assert not os.path.exists(outdir)
    result = _train(['--resume', snap, '--outdir', outdir, '--data', data, '--resume-partial', '--kimg', '0.008',
                     '--tick', '0.008'] + uncond)
    assert 'copied 133 of 137 tensors' in result.output


def test_resume_from_nvlabs_pickle_fits(data, tmp_path):
    """An NVlabs pickle of the same architecture starts a new run with every tensor copied, no flag needed."""
    from training.config import setup_training_config
    from training.networks import Discriminator, Generator
    from training.augment import AugmentPipe
    c = setup_training_config(data=data, cond=True, cbase=256, cmax=16, map_depth=1, batch=8, metrics='none', device='cpu')
    common = dict(c_dim=2, img_resolution=16, img_channels=1)
    g_kwargs = dict(z_dim=512, w_dim=512, mapping_kwargs=c.G_kwargs.mapping_kwargs, **common,
                    synthesis_kwargs=dict(channel_base=256, channel_max=16, num_fp16_res=0, conv_clamp=None))
    d_kwargs = dict(architecture='resnet', channel_base=256, channel_max=16, **common,
                    epilogue_kwargs=c.D_kwargs.epilogue_kwargs)
    a_kwargs = {k: v for k, v in c.augment_kwargs.items() if k not in ('class_name', 'channel_names')}  # NVlabs' own.
    G = Generator(**g_kwargs)
    nets = dict(G=(G, 'Generator', g_kwargs), G_ema=(G, 'Generator', g_kwargs),
                D=(Discriminator(**d_kwargs), 'Discriminator', d_kwargs),
                augment_pipe=(AugmentPipe(**a_kwargs), 'AugmentPipe', a_kwargs))
    marker = str(tmp_path / 'ran-code')
    pkl = write_nvlabs_pickle(str(tmp_path / 'network-snapshot-000100.pkl'), nets, marker)
    result = _train(['--resume', pkl, '--outdir', tmp_path / 'out', '--data', data, '-n'] + TINY)
    assert 'Dry run' in result.output and not os.path.exists(marker)
    from training.config import check_resume_snapshot
    c.resume_partial = False
    facts = dict(resolution=16, num_channels=1, channels=['gray'], c_dim=2, label_names=['class0', 'class1'])
    assert check_resume_snapshot(c, facts, pkl) == (159, 159)


def test_checks_run_before_the_run_dir(data, tmp_path):
    outdir = tmp_path / 'runs'
    no_val = make_png_folder(str(tmp_path / 'noval'), n=8, res=16, num_classes=2, with_split=True)
    with open(os.path.join(no_val, 'dataset.json')) as f:
        meta = json.load(f)
    meta['cases'] = {case: 'train' for case in meta['cases']}  # A split whose val part is empty.
    with open(os.path.join(no_val, 'dataset.json'), 'w') as f:
        json.dump(meta, f)
    _refused(['--outdir', outdir, '--data', no_val, '--subset', 'val'] + TINY, '--subset=val', "no images found in subset 'val'")
    bad_zip = tmp_path / 'bad.zip'
    bad_zip.write_bytes(b'not a zip at all')
    _refused(['--outdir', outdir, '--data', bad_zip] + TINY, '--data', 'not a readable zip')
    _refused(['--outdir', outdir, '--data', data, '--metrics', 'fid50k_full,fid_bogus'] + TINY[:-6],
             '--metrics: unknown fid_bogus')
    _refused(['--outdir', bad_zip, '--data', data] + TINY, 'exists and is not a directory')
    assert not os.path.exists(outdir)


def test_resume_run_config_upgrades_options_of_earlier_versions(data, tmp_path):
    """A run dir written before the one network family: its training_options.json names mri.networks3d,
    mri.augment3d, the hooks in mri/ and mri.grid3d grid functions; a continued run gets today's names."""
    import torch
    from training.config import resume_run_config
    run_dir = tmp_path / 'old-run'
    run_dir.mkdir()
    hook = dict(class_name='mri.attention.SelfAttention')
    old = dict(
        device='cpu', num_gpus=1, total_kimg=1, kimg_per_tick=0.004, image_snapshot_ticks=1, network_snapshot_ticks=1,
        training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=False),
        G_kwargs=dict(class_name='mri.networks3d.Generator', z_dim=512, checkpointing=False, attn_kwargs=hook),
        D_kwargs=dict(class_name='mri.networks3d.Discriminator', mixed_precision='float16',
                      quantize_kwargs=dict(class_name='mri.fq.FeatureQuantizer', resolutions=[8])),
        augment_kwargs=dict(class_name='mri.augment3d.AugmentPipe3d', channel_names=['t1n'], xflip=1),
        loss_kwargs=dict(class_name='training.loss.StyleGAN2Loss', topk_kwargs=dict(class_name='mri.topk.TopK')),
        grid_kwargs=dict(setup='mri.grid3d.setup_volume_grid', save='mri.grid3d.save_volume_grid', channels=['t1n']),
        metrics=[], metric_kwargs={})
    (run_dir / 'training_options.json').write_text(json.dumps(old))
    from torch_utils import snapshot
    snapshot.save_snapshot(str(run_dir / 'network-snapshot-000008.pt'), {})
    torch.save(dict(cur_nimg=8, snapshot='network-snapshot-000008.pt'), str(run_dir / checkpoint.STATE_NAME))
    c = resume_run_config(str(run_dir), kimg=2)
    assert c.G_kwargs.class_name == 'training.networks.Generator'
    assert c.D_kwargs.class_name == 'training.networks.Discriminator'
    assert c.augment_kwargs.class_name == 'training.augment.AugmentPipe'
    assert c.augment_kwargs.channel_names == ['t1n'] and c.augment_kwargs.xflip == 1
    assert c.G_kwargs.attn_kwargs.class_name == 'training.attention.SelfAttention'
    assert c.D_kwargs.quantize_kwargs.class_name == 'training.fq.FeatureQuantizer'
    assert c.loss_kwargs.topk_kwargs.class_name == 'training.topk.TopK'
    assert 'grid_kwargs' not in c and c.total_kimg == 2 and c.resume_run == str(run_dir)
    assert c.training_set_kwargs.path == data                      # Attribute access all the way down.
    assert 'mri.' not in json.dumps(c)


def test_run_dirs_are_claimed_atomically_and_locked(tmp_path):
    """Two trainers started at once once picked the same run dir; a --resume of a run still training trained beside
    it. Now each new run makes its own dir with os.mkdir, and a trainer holds run.lock (flock) while it trains."""
    from training.config import next_run_dir
    a = checkpoint.claim_run_dir(str(tmp_path), 'x', next_run_dir)
    b = checkpoint.claim_run_dir(str(tmp_path), 'x', next_run_dir)
    assert os.path.basename(a) == '00000-x' and os.path.basename(b) == '00001-x'
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from training import checkpoint\n'
                               f'with checkpoint.RunLock({a!r}):\n    print("held", flush=True); time.sleep(60)'],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(checkpoint.RunDirBusy, match=f'PID {holder.pid}'):
            with checkpoint.RunLock(a):
                pass
    finally:
        holder.kill()
        holder.wait()
    open(os.path.join(a, '.tmp-abc123.pt'), 'wb').close()  # What SIGKILL during a snapshot write leaves.
    with checkpoint.RunLock(a):  # The holder died without unlocking: its lock is taken over, its leftovers removed.
        assert not os.path.exists(os.path.join(a, '.tmp-abc123.pt'))
        with open(os.path.join(a, checkpoint.LOCK_NAME)) as f:
            assert f.read().strip() == str(os.getpid())


def test_resume_of_a_run_that_is_training_is_refused(run, tmp_path):
    copy = str(tmp_path / 'run')
    shutil.copytree(run, copy)
    with checkpoint.RunLock(copy):  # As if a trainer were at work in it.
        result = _train(['--resume', copy, '--kimg', '0.3'], ok=False)
    assert result.exit_code == 2 and 'is training in this run dir' in result.output, result.output
    assert 'Traceback' not in result.output


def test_resume_refuses_an_archive_rebuilt_at_the_same_path(run, data, tmp_path):
    """An archive rebuilt at the same path with other cases once resumed silently; the state records its content."""
    copy, data_copy = str(tmp_path / 'run'), str(tmp_path / 'pngs')
    shutil.copytree(run, copy)
    shutil.copytree(data, data_copy)
    options = _options(copy)
    options['training_set_kwargs']['path'] = data_copy
    with open(os.path.join(copy, 'training_options.json'), 'w') as f:
        json.dump(options, f)
    state = torch.load(os.path.join(copy, checkpoint.STATE_NAME), weights_only=True)
    assert state['data_hash']
    name = sorted(n for n in os.listdir(data_copy) if n.endswith('.png'))[0]
    with open(os.path.join(data_copy, name), 'ab') as f:  # One file of the archive is not what it was.
        f.write(b'\0')
    result = _train(['--resume', copy, '--kimg', '0.3', '--dry-run'], ok=False)
    assert result.exit_code == 2 and 'has changed since' in result.output, result.output


@pytest.mark.parametrize('damage', ['missing', 'truncated'])
def test_resume_whose_snapshot_is_missing_or_truncated(run, tmp_path, damage):
    copy = str(tmp_path / 'run')
    shutil.copytree(run, copy)
    name = torch.load(os.path.join(copy, checkpoint.STATE_NAME), weights_only=True)['snapshot']
    path = os.path.join(copy, name)
    if damage == 'missing':
        os.remove(path)
    else:
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
    result = _train(['--resume', copy, '--kimg', '0.3'], ok=False)
    assert result.exit_code == 2 and name in result.output and 'cannot be used' in result.output, result.output
    assert 'Traceback' not in result.output
