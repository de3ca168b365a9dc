"""Compute quality metrics of a trained generator snapshot (docs/metrics.md lists them).

    python calc_metrics.py --network run/network-snapshot-001000000.pt --metrics fid10k_full,msssim_div
    python calc_metrics.py --network runs/00003-brats --metrics fid10k_full,kid10k_full,fid_per_class  # newest snapshot
    python calc_metrics.py --network net.pt --metrics fid50k_full --data brats.zip --subset val --gpus 4
    python calc_metrics.py --network paint-run --metrics paint_ssim,paint_psnr,paint_mse --subset val  # paint snapshot

Defaults for the real data (path, resolution, subset) come from the snapshot's dataset description; the reals
are never x-flipped unless --mirror=1 asks (StyleGAN2-ADA's protocol). Metrics named together share one pass of
the reals through the detector.
Each result is printed and appended as a JSON line to ``metric-<name>.jsonl`` in the run directory.
"""

import os
import tempfile
import textwrap

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402
import torch

from metrics import detectors
from metrics import metric_main
from metrics import metric_utils
from torch_utils import snapshot
from training.cli import PATH, bool_option, resolve_network

_EXPECTED = (metric_utils.MetricError, detectors.DetectorError, snapshot.SnapshotError, dnnlib.DownloadError)


def _expected_errors():
    errors = list(_EXPECTED)
    try:
        from training.dataset import DatasetError
        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


def _snapshot_defaults(snap) -> dict:
    """Data path, resolution and subset recorded with the snapshot (missing keys are None)."""
    ds = dict(snap.get('dataset') or {})
    extra = dict(snap.get('extra') or {})
    train_kwargs = dict((extra.get('training_options') or {}).get('training_set_kwargs') or extra.get('training_set_kwargs') or {})
    return dict(path=ds.get('path') or train_kwargs.get('path'), resolution=ds.get('resolution'),
                subset=ds.get('subset') or train_kwargs.get('subset'))


def calc_metrics(
    network: str,               # Snapshot (.pt, or an NVlabs .pkl: no code run), or a run dir (newest).
    metrics: list,              # Metric names.
    data: str = None,           # Real data; None = the snapshot's.
    subset: str = None,         # 'train', 'val' or 'all'; None = the snapshot's, else 'all'.
    mirror: bool = False,       # Add x-flipped reals (off in StyleGAN2-ADA's protocol, whatever the run trained with).
    gpus: int = 1,              # Processes (one per GPU); on a machine without CUDA, 1 = CPU.
    channel=None,               # Channel name or index; None = each image channel.
    num_gen: int = None,        # Cap on generated (and real) images per metric; None = the metric's own.
    num_real: int = None,       # Cap on the reals alone; None = num_gen.
    detector: str = None,       # Inception override.
    vgg_detector: str = None,   # VGG16 override.
    detector3d: str = None,     # 3D feature network (TorchScript) for fid3d_full.
    run_dir: str = None,        # Where metric-<name>.jsonl goes; None = the snapshot's folder.
    batch: int = 64,            # Images per process per step.
    device: str = None,         # 'cuda' or 'cpu'; None = cuda when available.
    rank: int = 0,              # This process (set by the launcher).
    progress: bool = True,      # Status lines on stderr.
    share: bool = True,         # Metrics share detector features (one pass of the reals).
    segmenter: str = None,      # Segmenter checkpoint of calc_segmentation.py (mask_dice, insert_dice).
) -> list:
    """Evaluate ``metrics`` on this rank; returns the result dicts (rank 0 also reports them)."""
    if not metrics:
        raise metric_utils.MetricError(f'--metrics: no metric given; choose from {", ".join(metric_main.list_valid_metrics())}')
    for metric in metrics:
        if not metric_main.is_valid_metric(metric):
            raise metric_utils.MetricError(f'unknown metric {metric!r}; valid metrics: {", ".join(metric_main.list_valid_metrics())}')
    if device == 'cuda' and not torch.cuda.is_available():
        raise metric_utils.MetricError('--device=cuda: no CUDA device is available; use --device=cpu')
    use_cuda = torch.cuda.is_available() if device is None else device == 'cuda'
    device = torch.device('cuda', rank) if use_cuda else torch.device('cpu')
    network = resolve_network(network)
    snap = snapshot.load_snapshot(network, device='cpu')
    G = snap.get('G_ema') or snap.get('G')
    if G is None:
        raise metric_utils.MetricError(f'{network}: holds no generator (G_ema or G)')
    defaults = _snapshot_defaults(snap)
    data = os.path.expanduser(data) if data else defaults['path']
    if not data:
        raise metric_utils.MetricError(f'{network}: records no training data path; pass --data')
    if not os.path.exists(data):
        raise metric_utils.MetricError(f'{data}: no such dataset (zip or folder); pass --data')
    dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True,
                                     max_size=None, xflip=False, subset=subset or defaults['subset'] or 'all')
    if defaults['resolution'] and data == defaults['path']:
        dataset_kwargs.resolution = defaults['resolution']
    if run_dir is not None and not os.path.isdir(run_dir):  # Results would otherwise be printed and not saved.
        raise metric_utils.MetricError(f'--run-dir {run_dir}: no such folder (results are appended to '
                                       f'metric-<name>.jsonl there)')
    run_dir = run_dir or os.path.dirname(os.path.abspath(network))

    def report(result):  # Each result printed and saved as it comes: a later failure does not lose it.
        if rank == 0:
            metric_main.report_metric(result, run_dir=run_dir, snapshot_pkl=network)
    results = metric_main.calc_metrics(metrics, share=share, on_result=report, G=G, dataset_kwargs=dataset_kwargs,
                                       num_gpus=gpus, rank=rank,
                                       device=device, progress=progress, channel=channel, detector_url=detector,
                                       vgg_detector_url=vgg_detector, num_gen=num_gen,
                                       num_real=num_real if num_real is not None else num_gen,
                                       batch_size=batch, run_dir=run_dir, xflip_reals=bool(mirror),
                                       detector3d=detector3d, segmenter=segmenter)
    return results


def _worker(rank: int, kwargs: dict, init_file: str):
    """One process of ``--gpus N``. An expected error (bad input) is not raised here, where every rank would print
    its own traceback: each rank writes its one line beside ``init_file`` and exits quietly, and the launcher
    reports one of them (rank 0's). A rank whose collective broke because another rank stopped with such an
    error exits quietly too."""
    cuda = torch.cuda.is_available() and kwargs.get('device') != 'cpu'
    torch.distributed.init_process_group(backend='nccl' if cuda else 'gloo', init_method=f'file://{init_file}', rank=rank,
                                         world_size=kwargs['gpus'])
    if cuda:
        torch.cuda.set_device(rank)
    try:
        calc_metrics(rank=rank, **kwargs)
    except _expected_errors() as err:
        with open(f'{init_file}.error{rank}', 'w') as f:
            f.write(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Exception:
        if not _rank_errors(init_file, kwargs['gpus']):
            raise
    finally:
        torch.distributed.destroy_process_group()


def _rank_errors(init_file: str, gpus: int) -> list:
    """The one-line errors the ranks of ``--gpus`` wrote, rank 0's first."""
    errors = []
    for rank in range(gpus):
        path = f'{init_file}.error{rank}'
        if os.path.isfile(path):
            with open(path) as f:
                errors.append(f.read())
    return errors


def _launch(kwargs: dict):
    """``--gpus N``: N processes; one error line however many ranks stopped with it."""
    if kwargs['device'] != 'cpu' and torch.cuda.is_available() and torch.cuda.device_count() < kwargs['gpus']:
        raise metric_utils.MetricError(f'--gpus {kwargs["gpus"]}: only {torch.cuda.device_count()} CUDA devices')
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, '.dist_init')
        torch.multiprocessing.spawn(_worker, args=(dict(kwargs), init_file), nprocs=kwargs['gpus'])
        errors = _rank_errors(init_file, kwargs['gpus'])
    if errors:
        raise metric_utils.MetricError(errors[0])


def _metric_list(_ctx, _param, value):
    names = [m.strip() for m in value.split(',') if m.strip()]
    if not names or 'none' in names:
        raise click.BadParameter(f'{value!r} measures nothing; name at least one metric (list: --help)')
    bad = [m for m in names if not metric_main.is_valid_metric(m)]
    if bad:
        raise click.BadParameter(f'unknown {", ".join(bad)}; valid metrics: {", ".join(metric_main.list_valid_metrics())}')
    return names


@click.command(context_settings=dict(max_content_width=120),
               epilog='\b\nMetrics (docs/metrics.md):\n' + textwrap.fill(', '.join(metric_main.list_valid_metrics()), 100,
                                                                      initial_indent='  ', subsequent_indent='  '))
@click.option('--network', 'network',   help='Snapshot .pt, NVlabs .pkl, or a run dir (its newest snapshot)', metavar='PATH', type=PATH,
              required=True)
@click.option('--metrics',              help='Comma-separated metrics (listed below)', metavar='LIST', default='fid50k_full',
              show_default=True, callback=_metric_list)
@click.option('--data',                 help='Real data [default: the snapshot\'s]', metavar='ZIP|DIR', type=PATH)
@click.option('--subset',               help='Case split of the real data [default: the snapshot\'s, else all]',
              type=click.Choice(['train', 'val', 'all']))
@bool_option('--mirror',                help='Add x-flipped reals (StyleGAN2-ADA never does, even for --mirror=1 runs)')
@click.option('--gpus',                 help='Number of GPUs (processes)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--device',               help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@click.option('--channel',              help='Measure this channel (name or index) [default: each]', metavar='NAME|INT')
@click.option('--metric-num-gen', '--num-gen', 'num_gen',
                                        help='Shorten every metric: at most N generated and N real images (the results '
                                             'record N) [default: the metric\'s own]', type=click.IntRange(min=2), metavar='N')
@click.option('--detector',             help='Inception network (path or URL) [default: NVIDIA\'s]', metavar='PATH|URL', type=PATH)
@click.option('--vgg-detector',         help='VGG16 network for PR and PPL [default: NVIDIA\'s]', metavar='PATH|URL', type=PATH)
@bool_option('--allow-pickle',         help='Deprecated, ignored: .pkl files load without running code', hidden=True)
@click.option('--detector3d',           help='3D feature network for fid3d_full (TorchScript; docs/volumes.md)', metavar='PATH|URL', type=PATH)
@click.option('--run-dir',              help='Where results are appended [default: the snapshot\'s folder]', metavar='DIR',
              type=PATH)
@click.option('--segmenter',            help='Segmenter for mask_dice and insert_dice (calc_segmentation.py checkpoint)', metavar='PATH',
              type=PATH)
@click.option('--batch',                help='Images per forward pass per GPU', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
def main(**kwargs):
    """Compute metrics of a generator snapshot."""
    kwargs = dnnlib.EasyDict(kwargs)
    if kwargs.pop('allow_pickle'):
        snapshot.warn_allow_pickle()
    try:
        if kwargs.gpus > 1:
            _launch(kwargs)
        else:
            calc_metrics(**kwargs)
    except _expected_errors() as err:
        raise click.ClickException(str(err).splitlines()[0]) from None


if __name__ == '__main__':
    dnnlib.run_cli(main)  # pylint: disable=no-value-for-parameter
