"""Train a conditional StyleGAN2-ADA generator (2D slices or 3D volumes) on a dataset archive.

Examples:
  python train.py --outdir runs --data slices.zip --cond=1 --mirror=1 --kimg 5000
  python train.py --outdir runs --data slices.zip --cond=1 --cbase 1024 --cmax 64 --batch 8 --kimg 0.2 --metrics none
  python train.py --outdir runs --data slices.zip --cond=1 --metrics fid10k_full --metric-num-gen 1000   # quick metrics
  python train.py --resume runs/00003-slices-gpus1-batch8-cond --kimg 8000   # continue that run exactly, longer
  python train.py --resume other/network-snapshot-000200000.pt --outdir runs --data slices.zip   # new run from weights
  torchrun --nproc_per_node 4 train.py --outdir runs --data slices.zip --gpus 4
"""

import errno
import json
import os
import sys
import tempfile
import traceback

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402

from training.cli import PATH, bool_option  # noqa: E402
from training.config import (AUGPIPE_NAMES, CFG_SPECS, MID_RUN_OPTIONS, RANGES, check_metrics_ready,  # noqa: E402
                             describe_run, next_run_dir, resume_run_config, save_options, setup_training_config)

LOG_RESERVE = 64 << 10  # Bytes kept free beside log.txt for the crash record when the disk fills.


class Logger:
    """Tee stdout/stderr into ``log.txt`` of the run dir (append, so a resumed run keeps its history).

    Only rank 0 tees its output; a crash on any rank is appended by ``log_crash``. Lines reach the file as they
    are printed. Beside it a hidden reserve file holds LOG_RESERVE bytes of the disk: when the disk fills, the
    console keeps getting every line, the file stops taking them, and ``log_crash`` frees the reserve to write
    the crash record, so that log.txt always ends with the error that stopped the run.
    """

    def __init__(self, file_name: str):
        self.path = file_name
        self.file = open(file_name, 'a', buffering=1)  # Line-buffered: `tail -f` and other ranks' crash blocks see whole lines.
        self.broken = None  # The OSError that stopped writes to the file (a full disk).
        self.reserve = os.path.join(os.path.dirname(file_name), '.tmp-log-reserve')  # '.tmp-': a later RunLock removes it.
        try:
            with open(self.reserve, 'wb') as f:
                if hasattr(os, 'posix_fallocate'):
                    os.posix_fallocate(f.fileno(), 0, LOG_RESERVE)
                else:
                    f.write(bytes(LOG_RESERVE))
        except OSError:
            self.free_reserve()  # Already full: the crash record is written as far as it fits.
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self, self

    def write(self, text):
        if self.broken is None:
            try:
                self.file.write(text)
            except OSError as err:
                self.broken = err  # The failing write is the run's business (it fails too); keep the console.
        self.stdout.write(text)

    def flush(self):
        if self.broken is None:
            try:
                self.file.flush()
            except OSError as err:
                self.broken = err
        self.stdout.flush()

    def isatty(self):
        return False

    def free_reserve(self):
        try:
            os.remove(self.reserve)
        except OSError:
            pass

    def close(self):
        sys.stdout, sys.stderr = self.stdout, self.stderr
        try:
            if self.broken is not None:
                # Lines the full disk refused may wait in the file's buffer; written now (space is free again)
                # they would land after the crash record that log_crash appended. So the descriptor goes first.
                os.close(self.file.fileno())
            self.file.close()
        except (OSError, ValueError):
            pass
        self.free_reserve()


def crash_line(err: BaseException, run_dir: str = None):
    """The one line that a known failure prints instead of a traceback (log.txt keeps the traceback), or None for
    an unexpected error (a bug: its traceback is what a report needs). Known: a full disk, a damaged training
    file (training.dataset.DatasetError, from a DataLoader worker too)."""
    message = dnnlib.disk_full_message(err, os.path.join(run_dir, '') if run_dir else None)
    if message is not None:
        return message + (f'; free some space, then continue with --resume {run_dir}' if run_dir else '')
    from training.dataset import DatasetError
    if isinstance(err, DatasetError):
        return str(err)
    return None


def log_crash(run_dir: str, rank: int, num_gpus: int, logger: Logger = None):
    """Append the exception being handled, with its full traceback, to ``log.txt`` of the run dir.

    For a cluster job that file is often the only record. Rank 0 writes through its logger (the file only:
    the console gets the traceback, or one line for a known failure, when the exception leaves the process).
    Other ranks append one block whose every line starts with ``[rank N]``, in a single write so blocks of
    several ranks never interleave. The block ends with the line the console gets. When the disk is full, the
    logger's reserve is freed first and the block goes straight to the file. Never raises: a failure to log
    must not hide the crash itself.
    """
    import time
    err = sys.exc_info()[1]
    text = traceback.format_exc()
    worker = getattr(err, 'worker_traceback', None)
    if worker:
        text += f'\nIn the DataLoader worker:\n{worker.rstrip()}\n'
    line = crash_line(err, run_dir)
    if line is not None:
        text += f'Error: {line}\n'
    where = f' on rank {rank} of {num_gpus}' if num_gpus > 1 else ''
    block = f'\nTraining crashed{where} (pid {os.getpid()}, {time.strftime("%Y-%m-%d %H:%M:%S")}):\n{text}'
    if logger is None:
        block = ''.join(f'[rank {rank}] {ln}\n' for ln in block.strip('\n').splitlines())
    try:
        if logger is not None:
            full = logger.broken is not None and logger.broken.errno in (errno.ENOSPC, errno.EDQUOT)
            if full or dnnlib.disk_full_message(err) is not None:
                logger.free_reserve()
                logger.broken = logger.broken or OSError(errno.ENOSPC, 'disk full')  # The text file may hold refused bytes.
            if logger.broken is None:
                logger.file.write(block)
                logger.file.flush()
                return
        if os.path.isdir(run_dir):  # Under torchrun rank 0 may not have made the run dir yet.
            fd = os.open(os.path.join(run_dir, 'log.txt'), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, block.encode())
            finally:
                os.close(fd)
    except OSError:
        pass


def _init_distributed(rank, num_gpus, device, init_file=None):
    import torch
    from torch_utils import training_stats
    if num_gpus > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if device == 'cuda' else 'gloo'
        if init_file is not None:
            torch.distributed.init_process_group(backend=backend, init_method=f'file://{init_file}', rank=rank, world_size=num_gpus)
        else:
            torch.distributed.init_process_group(backend=backend)  # torchrun's environment.
    sync_device = (torch.device('cuda', torch.cuda.current_device()) if device == 'cuda' else torch.device('cpu')) if num_gpus > 1 else None
    training_stats.init_multiprocessing(rank=rank, sync_device=sync_device)


def subprocess_fn(rank, c, init_file=None):
    """One process of a run: set up its device and process group, then enter the loop."""
    import torch
    from training.training_loop import training_loop
    if c.device == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', rank)))
    logger = Logger(os.path.join(c.run_dir, 'log.txt')) if rank == 0 else None
    try:
        _init_distributed(rank, c.num_gpus, c.device, init_file)
        kwargs = {k: v for k, v in c.items() if k not in ('num_gpus', 'run_dir')}
        training_loop(rank=rank, num_gpus=c.num_gpus, run_dir=c.run_dir, **kwargs)
    except (Exception, KeyboardInterrupt) as err:  # KeyboardInterrupt: a second Ctrl-C while saving.
        log_crash(c.run_dir, rank, c.num_gpus, logger)
        # Release what the failed frames hold, the DataLoader iterator first, so that its workers stop through
        # their own shutdown path now; left to interpreter exit, multiprocessing terminates them and a
        # spawned rank prints a second, misleading error ("DataLoader worker ... killed by signal").
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        if c.num_gpus > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if logger is not None:
            logger.close()


def _torchrun_rank():
    """This process's rank under torchrun (its environment variables), else None."""
    if 'WORLD_SIZE' in os.environ and 'RANK' in os.environ:
        return int(os.environ['RANK'])
    return None


def launch_training(c: dnnlib.EasyDict, dry_run: bool = False):
    import torch
    if _torchrun_rank() not in (None, 0):  # Under torchrun only rank 0 reports and writes the options.
        if not dry_run:
            subprocess_fn(rank=_torchrun_rank(), c=c)
        return
    print()
    print('Training options:')
    print(json.dumps(c, indent=2))
    print()
    print(f'Output directory:    {c.run_dir}')
    print(f'Processes:           {c.num_gpus} ({c.device})')
    print(f'Batch size:          {c.batch_size} images ({c.batch_gpu} per process per round)')
    print(f'Training duration:   {c.total_kimg} kimg')
    print(f'Dataset:             {c.training_set_kwargs.path} (subset {c.training_set_kwargs.subset})')
    print(f'Conditional:         {c.training_set_kwargs.use_labels}')
    print()
    if dry_run:
        print('Dry run; exiting.')
        return
    os.makedirs(c.run_dir, exist_ok=True)
    save_options(c)  # A continued run saves the options it changed, so a later plain --resume keeps them.

    if _torchrun_rank() is not None:
        subprocess_fn(rank=0, c=c)
    elif c.num_gpus == 1:
        subprocess_fn(rank=0, c=c)
    else:
        with tempfile.TemporaryDirectory() as temp_dir:
            torch.multiprocessing.set_start_method('spawn', force=True)
            torch.multiprocessing.spawn(fn=subprocess_fn, args=(c, os.path.join(os.path.abspath(temp_dir), '.torch_distributed_init')), nprocs=c.num_gpus)


def _explicit_options(ctx: click.Context) -> set:
    """Names of the options given on the command line (or by environment), as opposed to defaults."""
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in given}


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def build_config(opts: dnnlib.EasyDict, explicit: set) -> dnnlib.EasyDict:
    """The run's config, every check done before any directory exists (docs/training.md, "Resume").

    ``--resume RUN_DIR`` continues in place and takes only the MID_RUN_OPTIONS (saved for later resumes); any
    other option given explicitly is refused. Otherwise ``--outdir`` and ``--data`` make a new run, which
    ``--resume SNAPSHOT`` starts from that snapshot's weights."""
    if opts.allow_pickle:
        from torch_utils.snapshot import warn_allow_pickle
        warn_allow_pickle()
    resume = opts.resume
    if resume is not None:
        if not os.path.exists(resume):
            raise click.UsageError(f'--resume {resume}: no such run dir or snapshot file')
    if resume is not None and os.path.isdir(resume):
        refused = sorted(explicit - set(MID_RUN_OPTIONS) - {'resume', 'dry_run', 'allow_pickle'})
        if refused:
            raise click.UsageError(
                f'--resume {resume}: continues that run with its own options; {", ".join(map(_flag, refused))} '
                f'cannot change mid-run (allowed: {", ".join(map(_flag, MID_RUN_OPTIONS))}). To start a new run from '
                f'its weights: --resume {os.path.join(resume, "network-snapshot-....pt")} --outdir DIR --data DATA')
        c = resume_run_config(resume, **{k: opts[k] for k in MID_RUN_OPTIONS if k in explicit})
        check_metrics_ready(c)
        return c
    missing = [_flag(k) for k in ('outdir', 'data') if opts[k] is None]
    if missing:
        hint = ('--resume SNAPSHOT starts a new run from its weights' if resume is not None
                else 'or --resume RUN_DIR alone to continue a run')
        raise click.UsageError(f'{" and ".join(missing)} required ({hint})')
    outdir = opts.outdir
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.UsageError(f'--outdir {outdir}: exists and is not a directory')
    parent = outdir if os.path.isdir(outdir) else os.path.dirname(os.path.abspath(outdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.UsageError(f'--outdir {outdir}: {parent} is not writable')
    c = setup_training_config(**opts)
    check_metrics_ready(c)  # Last: it may download a detector.
    c.run_dir = next_run_dir(outdir, describe_run(c, opts.desc))
    return c


@click.command(context_settings=dict(max_content_width=120))
# Required.
@click.option('--outdir',       help='Where to make the run dir', metavar='DIR', type=PATH)
@click.option('--data',         help='Training data (zip or folder)', metavar='[ZIP|DIR]', type=PATH)
@click.option('--gpus',         help='Number of GPUs (or CPU processes) to use', metavar='INT', type=RANGES['gpus'], default=1, show_default=True)
# Optional features.
@bool_option('--cond',          help='Train conditional model on dataset labels')
@bool_option('--mirror',        help='Enable dataset x-flips')
@click.option('--subset',       help='Case-level split to train on [default: train if the archive has one]', type=click.Choice(['train', 'val', 'all']))
@click.option('--aug',          help='Augmentation mode', type=click.Choice(['noaug', 'ada', 'fixed']), default='ada', show_default=True)
@click.option('--p',            help='Probability for --aug=fixed', metavar='FLOAT', type=RANGES['p'])
@click.option('--target',       help='Target value for --aug=ada', metavar='FLOAT', type=RANGES['target'], default=0.6, show_default=True)
@click.option('--augpipe',      help='Augmentation pipeline', type=click.Choice(AUGPIPE_NAMES), default='bgc', show_default=True)
@click.option('--resume',       help='Continue a run dir in place, or start a new run from a snapshot (.pt, NVlabs .pkl)', metavar='[RUN_DIR|PT|PKL]', type=PATH)
@bool_option('--resume-partial', help='With --resume SNAPSHOT: start from the matching tensors even if the snapshot does not fit')
@click.option('--freezed',      help="Freeze D's N highest-resolution blocks (FreezeD)", metavar='INT', type=RANGES['freezed'], default=0, show_default=True)
@bool_option('--allow-pickle', help='Deprecated, ignored: .pkl files load without running code', hidden=True)
# Hyperparameters.
@click.option('--cfg',          help='Base configuration', type=click.Choice(list(CFG_SPECS)), default='auto', show_default=True)
@click.option('--batch',        help='Total batch size [default: preset]', metavar='INT', type=click.IntRange(min=1))
@click.option('--batch-gpu',    help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase',        help='Capacity multiplier [default: preset]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cmax',         help='Max. feature maps [default: 512]', metavar='INT', type=click.IntRange(min=1))
@click.option('--map-depth',    help='Mapping network depth [default: preset]', metavar='INT', type=click.IntRange(min=1))
@click.option('--glr',          help='G learning rate [default: preset]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--dlr',          help='D learning rate [default: preset]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--gamma',        help='R1 regularization weight [default: preset]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--mbstd-group',  help='Minibatch std group size [default: preset]', metavar='INT', type=click.IntRange(min=0))
# MRI training hooks.
@bool_option('--topk',          help='Top-k generator updates over the whole batch (Sinha et al. 2020)')
@click.option('--topk-gamma',   help='Top-k decay per epoch of distinct images', metavar='FLOAT', type=RANGES['topk_gamma'], default=0.99, show_default=True)
@click.option('--topk-min',     help='Top-k minimum fraction (nu)', metavar='FLOAT', type=RANGES['topk_min'], default=0.75, show_default=True)
@bool_option('--topk-global',   help="Top-k over the batch of all GPUs, not each GPU's")
@click.option('--fq-res',       help='D feature quantization resolutions, e.g. 32,16', metavar='LIST', type=str)
@click.option('--fq-dict',      help='FQ dictionary size', metavar='INT', type=RANGES['fq_dict'], default=256, show_default=True)
@click.option('--fq-decay',     help='FQ dictionary EMA decay per D step', metavar='FLOAT', type=RANGES['fq_decay'], default=0.8, show_default=True)
@click.option('--fq-weight',    help='FQ commitment loss weight (D, and G on fakes)', metavar='FLOAT', type=RANGES['fq_weight'], default=1.0, show_default=True)
@click.option('--fq-mode',      help='forward: D continues with the codes (R1 on the unquantized D); loss: commitment loss and dictionary only', type=click.Choice(['forward', 'loss']), default='forward', show_default=True)
@click.option('--attn-res',     help="Self-attention in G and D at these resolutions, 4 .. res/2, e.g. 16,32 (volumes: a level's largest side). "
                                     "Memory per layer in R1/path-length passes: 8*N*L*L' bytes, L=R*R, L'=L/4 from 64x64 "
                                     "(1 GiB at 64, batch-gpu 32)", metavar='LIST', type=str)
@click.option('--paint-l1',     help='Painting family (patch archives): weight of the L1 term inside the repainted region [default: 1]', metavar='FLOAT', type=click.FloatRange(min=0))
@bool_option('--checkpointing', help='Recompute block activations in backward (less memory, more time)')
@bool_option('--bf16',          help='bfloat16 instead of float16 in the mixed-precision blocks')
# Misc settings.
@click.option('--desc',         help='String to include in result dir name', metavar='STR', type=str)
@click.option('--metrics',      help='Quality metrics at each snapshot, or none [default: fid50k_full; fid25d_full for volumes]', metavar='[NAME|A,B,C|none]', type=str)
@click.option('--detector',     help='Inception detector for --metrics (path or URL) [default: canonical]', metavar='PATH|URL', type=PATH)
@click.option('--vgg-detector', help='VGG16 detector for --metrics pr*/ppl* (path or URL) [default: canonical]', metavar='PATH|URL', type=PATH)
@click.option('--detector3d',   help='3D feature network for --metrics fid3d_full (TorchScript)', metavar='PATH|URL', type=PATH)
@click.option('--metric-num-gen', help='Shorten --metrics: at most N generated and N real images each (recorded with the results) [default: the metric\'s own]', metavar='N', type=RANGES['metric_num_gen'])
@click.option('--kimg',         help='Total training duration [default: preset]', metavar='KIMG', type=RANGES['kimg'])
@click.option('--tick',         help='How often to print progress', metavar='KIMG', type=RANGES['tick'], default=4, show_default=True)
@click.option('--snap',         help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@bool_option('--first-snap',    help='Grid, snapshot and --metrics at tick 0 too, right after the first batch (as StyleGAN2-ADA); --first-snap=0 waits for tick --snap', default=True)
@click.option('--seed',         help='Random seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@bool_option('--fp32',          help='Disable mixed-precision')
@bool_option('--nobench',       help='Disable cuDNN benchmarking')
@bool_option('--allow-tf32',    help='Allow TF32 for matmul and convolutions')
@click.option('--workers',      help='DataLoader worker processes [default: 3, at most the CPU count]', metavar='INT', type=click.IntRange(min=0))
@click.option('--device',       help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@bool_option('-n', '--dry-run', help='Print training options and exit')
def main(**opts):
    """Train a (conditional) StyleGAN2-ADA on an archive of slices or volumes made by dataset_tool.py."""
    opts = dnnlib.EasyDict(opts)
    rank = _torchrun_rank()
    if rank is not None:
        # torchrun (one or many nodes): its world size is the process count, and rank 0 picks the run dir.
        import torch
        opts.gpus = int(os.environ['WORLD_SIZE'])
        device = opts.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        if device == 'cuda':
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        torch.distributed.init_process_group(backend='nccl' if device == 'cuda' else 'gloo')
    c = build_config(opts, _explicit_options(click.get_current_context()))
    from training import checkpoint
    if not opts.dry_run and rank in (None, 0) and not c.get('resume_run'):
        # A new run's dir is made here, atomically: a second trainer started at once takes the next number.
        c.run_dir = checkpoint.claim_run_dir(os.path.dirname(c.run_dir), describe_run(c, opts.desc), next_run_dir)
    if rank is not None and c.num_gpus != opts.gpus:
        raise click.UsageError(f'--resume {opts.resume}: the run used {c.num_gpus} processes; torchrun started {opts.gpus}')
    if rank is not None:
        import torch
        shared = [c]
        torch.distributed.broadcast_object_list(shared, src=0)  # Every rank uses rank 0's config and run dir.
        c = shared[0]
    if opts.dry_run or rank not in (None, 0):
        launch_training(c, dry_run=opts.dry_run)
        return
    try:
        with checkpoint.RunLock(c.run_dir):  # Held by the launching process until every rank has finished.
            launch_training(c)
    except checkpoint.RunDirBusy as err:
        raise click.UsageError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a known failure is one line (log.txt has the traceback); others go up.
        line = crash_line(err, c.run_dir)
        if line is None:
            raise
        raise click.ClickException(line) from None


if __name__ == '__main__':
    dnnlib.run_cli(main)
