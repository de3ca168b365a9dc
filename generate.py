"""Generate images from a trained snapshot, by class name.

Examples:
  python generate.py --network runs/00000-x/network-snapshot-000200000.pt --seeds 0-3 --class axial --outdir out
  python generate.py --network runs/00000-x --seeds 0-7 --class all --outdir out          # newest snapshot, grid
  python generate.py --network net.pt --seeds 0 --class axial,t2w --format png16 --outdir out
  python generate.py --network stylegan2-ada-network.pkl --seeds 0-3 --outdir out   # NVlabs pickle, no code run
  python generate.py --network paint.pt --insert-into cases/ --per-case 2 --labels-from cases/ --outdir out  # painting
  python generate.py --network paint.pt --insert-into cases/ --heal --outdir healed   # docs/painting.md

Single-channel images become grey PNGs (8- or 16-bit); multi-channel archives (modalities, tumour labels)
give one image per channel, the decoded BraTS label map (a palette PNG: pixel values are the labels 0-3, shown in
the colours of training.grids.LABEL_COLOURS) and a colour overlay, plus an ``.npy`` of the stack. A status line
shows images done, rate and time left.
A volume snapshot writes NIfTI per modality and the tumour labels, and a three-plane montage per seed
(mri.output.volumes.VolumeWriter, docs/volumes.md); one loop (generate_samples) serves both:
  python generate.py --network runs/00001-vol --seeds 0-3 --class ssa --outdir out --native-grid
Every output is clipped to [-1, 1] (the range of the training archive); `--format npy` writes that float32 array for
any number of channels, and for volumes no montage unless `--montage` asks for one.

Datasets (docs/cohorts.md): `--format brats|nnunet` writes BraTS case folders or an nnU-Net v2 raw dataset
(mri.output.datasets) with manifest.json (mri.output.manifest), resumable and shardable over torchrun processes:
  python generate.py --network runs/00001-vol --seeds 0-499 --balance --format nnunet --outdir Dataset501_BraTSSyn
  python generate.py --from-manifest Dataset501_BraTSSyn/manifest.json --outdir Dataset502_Again
"""

import os

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402
import numpy as np  # noqa: E402

from mri.output.images import ImageWriter  # noqa: E402
from training.cli import BOOL, PATH, bool_option, resolve_network  # noqa: E402
from training.labels import ClassSpecError, all_classes, parse_class  # noqa: E402


def resolve_classes(G, desc, class_spec) -> list:
    """``[(name or None, label vector, [label names set])]``: every class for class_spec 'all' (a name each), else
    the one class asked for (name None)."""
    label_names = list(desc.get('label_names') or [f'class{i}' for i in range(G.c_dim)])[:G.c_dim] if G.c_dim else []
    label_groups = desc.get('label_groups') or None
    if class_spec == 'all':
        if G.c_dim == 0:
            raise ClassSpecError('--class all: this network is unconditional')
        return [(name, label, name.split(',')) for name, label in all_classes(label_names, label_groups)]
    label = parse_class(class_spec, label_names, label_groups)
    return [(None, label, [n for n, v in zip(label_names, label) if v])]


def plan_items(seeds, classes, balance=False) -> list:
    """``[(class index, seed)]`` in the order generation walks them: every class for every seed (class-major), or with
    `balance` one class per seed, the classes in turn, so each class gets len(seeds) / len(classes) samples (+-1)."""
    if balance:
        return [(i % len(classes), int(seed)) for i, seed in enumerate(seeds)]
    return [(k, int(seed)) for k in range(len(classes)) for seed in seeds]


def item_name(writer, seed, class_index, class_name) -> str:
    """A writer's name for one sample: its case id (dataset writers), else the stem ``seedNNNN[-<class>]``."""
    if hasattr(writer, 'item_name'):
        return writer.item_name(seed, class_index, class_name)
    return f'seed{seed:04d}' + (f'-{class_name.replace(",", "-")}' if class_name else '')


def _verdict(result) -> dict:
    """The privacy gate's verdict as plain JSON values (floats to 6 decimals; the sample's own name left out)."""
    out = {'keep': bool(result['keep'])}
    for key, value in result.items():
        if key in ('keep', 'name') or value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            out[key] = bool(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = round(float(value), 6)
        else:
            out[key] = str(value)
    return out


def generate_samples(
    G,                              # generator: (z, c) -> [N, C, H, W] or [N, C, D, H, W]
    seeds,                          # one sample per seed and class (per seed with `balance`)
    classes,                        # resolve_classes()
    writer,                         # ImageWriter, VolumeWriter or mri.output.datasets.DatasetWriter
    outdir,                         # output folder, made once the first sample passed writer.start
    truncation_psi=1.0,
    noise_mode='const',
    device='cpu',
    verbose=True,
    class_grid=False,               # finish with the writer's class grid (class_spec 'all', one process)
    gate=None,                      # metrics.privacy.PrivacyGate or alike: check() drops samples too close to training
    trunc_center='class',           # truncation around the class's own average w, or 'global' (training.sampling)
    balance=False,                  # one class per seed, in turn (plan_items)
    rank=0,                         # this process of a torchrun job: it makes items rank, rank + world_size, ...
    world_size=1,
    provenance=None,                # dict added to every dataset case's sidecar (snapshot, truncation, ...)
    before_write=None,              # called once the first sample passed writer.start, before anything is written
    finish=True,                    # after every rank is done, rank 0 calls writer.finish
) -> list:
    """The one seed/class loop of generation (samples through training.sampling, so a seed names the same sample in
    generate.py, style_mixing.py and projector.py): this process's share of plan_items(), each sample checked by the
    privacy gate (a dropped sample is not written; counted in the progress line, recorded by dataset writers), and
    handed to the writer (stem ``seedNNNN[-<class>]``, or the dataset writer's case id). Items a dataset writer has
    already finished are skipped (a rerun resumes). Returns the paths written (for a dataset writer only its
    dataset-level files: the manifest lists the cases)."""
    from training import sampling
    averages = sampling.ClassAverages()
    items = plan_items(seeds, classes, balance)
    is_dataset = getattr(writer, 'dataset', False)

    def run(class_index, seed):
        return sampling.sample(G, seed, classes[class_index][1], truncation_psi, noise_mode, trunc_center, averages,
                               device)

    first = run(*items[0])
    writer.start(first)  # a writer refuses before the output folder exists
    if before_write is not None:
        before_write()
    os.makedirs(outdir, exist_ok=True)
    mine = list(range(rank, len(items), world_size))
    written, dropped, skipped = [], 0, 0
    bar = dnnlib.ProgressBar(len(mine), desc='Generating' if world_size == 1 else f'Generating (rank {rank})',
                             unit=writer.unit, enabled=verbose)
    for j, i in enumerate(mine):
        k, seed = items[i]
        name, label, values = classes[k]
        stem = item_name(writer, seed, k, name)
        shown = f'{stem} [{name or ",".join(values) or "unconditional"}]'  # the progress line names the class
        if is_dataset and writer.done(stem):
            skipped += 1
            bar.update(done=j + 1, tail=f'{shown} already done ({skipped} so far)')
            continue
        sample = first if i == 0 else run(k, seed)
        record = dict(provenance or {}, seed=seed, class_index=k, **{'class': name or ','.join(values)})
        if gate is not None:
            record['privacy'] = _verdict(gate.check(sample, list(getattr(writer, 'channels', None) or []), stem))
            if not record['privacy']['keep']:
                dropped += 1
                if is_dataset:
                    writer.drop(stem, record)
                bar.update(done=j + 1, tail=f'{shown} dropped by the privacy gate ({dropped} dropped)')
                continue
        if is_dataset:  # its cases are listed in the manifest: nothing per case is kept here (flat memory)
            writer.write(sample, stem, name, values, record=record)
        else:
            written += writer.write(sample, os.path.join(outdir, stem), name, values)
        bar.update(done=j + 1, tail=shown + (f' ({dropped} dropped)' if dropped else ''))
    if skipped or dropped:  # the last line says what this run did and did not make
        bar.update(done=len(mine), tail=f'{len(mine) - skipped - dropped} made, {skipped} already done'
                                        + (f', {dropped} dropped by the privacy gate' if dropped else ''))
    bar.close()
    from mri.output.datasets import barrier
    barrier()
    if finish and rank == 0 and (is_dataset or (class_grid and world_size == 1)):
        names = [item_name(writer, seed, k, classes[k][0]) for k, seed in items]
        written += writer.finish(classes, names) if is_dataset else writer.finish(classes)
    return written


def open_gate(desc, max_nn_ssim, privacy_report, privacy_data, device, verbose=True):
    """The privacy gate (metrics.privacy.PrivacyGate) asked for by --max-nn-ssim / --privacy-report, else None."""
    if max_nn_ssim is None and not privacy_report:
        return None
    archive = privacy_data or (desc or {}).get('path')
    if not archive or not os.path.exists(archive):
        flag = '--privacy-data' if privacy_data else 'the snapshot\'s training archive'
        raise GenerateError(f'{flag} {archive or "(not recorded)"}: not found; the privacy gate compares samples with '
                            f'the generator\'s training archive: pass it with --privacy-data PATH')
    try:
        from metrics.privacy import PrivacyGate
    except ImportError:
        raise GenerateError('--max-nn-ssim / --privacy-report: this version has no privacy gate (metrics/privacy.py)') from None
    return PrivacyGate(archive, max_nn_ssim=max_nn_ssim, device=str(device), verbose=verbose)


class GenerateError(ValueError):
    """generate.py cannot run as asked; one line."""


def load_generator(network, device):
    """(G, dataset description) of a snapshot: G_ema, else G; one line for a paint snapshot."""
    from mri.output.volumes import VolumeOutputError
    from training import sampling
    # A paint snapshot would run on blank input and paint nothing of use.
    return sampling.load_generator(network, device, VolumeOutputError, 'this is a paint snapshot; use --insert-into '
                                   'CASES (with --labels-from, --heal or --move)')


def generate_images(
    network: str,                   # Snapshot path or run dir.
    seeds: list,                    # Seeds, one image per seed (per class for class_spec='all').
    outdir: str,                    # Output folder.
    class_spec: str = None,         # Class name(s), index, 'all', or None for unconditional networks.
    truncation_psi: float = 1.0,    # Truncation; 1 = none.
    noise_mode: str = 'const',      # 'const', 'random' or 'none'.
    fmt: str = None,                # 'png', 'png16', 'npy', 'nifti', 'brats' or 'nnunet'; None = png / nifti.
    device: str = None,             # None = cuda when available.
    verbose: bool = True,
    native_grid: bool = False,      # Volumes: NIfTI on the original BraTS grid (mri.volume_space).
    montage: bool = None,           # Volumes: a montage PNG each; None = with nifti, not with npy.
    trunc_center: str = 'class',    # Truncation around the class's own average w, or 'global'.
    balance: bool = False,          # Datasets: one class per seed, the classes in turn.
    regions: bool = True,           # nnunet: BraTS regions in dataset.json (else the three labels).
    with_real: str = None,          # Datasets: a folder of real BraTS cases to add.
    max_nn_ssim: float = None,      # Privacy gate: drop samples closer than this to a training sample.
    privacy_report: bool = False,   # Privacy gate: check every sample, keep all, write the report.
    privacy_data: str = None,       # Privacy gate: the training archive (default: the snapshot's).
    gate=None,                      # A privacy gate object (tests); None = open_gate() from the options above.
    rank: int = 0,                  # torchrun: this process and their number (init_distributed()).
    world_size: int = 1,
) -> list:
    """Generates images (PNG/npy), volumes (NIfTI/npy and montages, docs/volumes.md) or a BraTS / nnU-Net dataset
    with its manifest (docs/cohorts.md) by seed and class from a snapshot; returns the paths written."""
    import torch
    from mri.output.volumes import VolumeOutputError, VolumeWriter, snapshot_kind

    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    G, desc = load_generator(network, device)
    if fmt in ('brats', 'nnunet'):
        return export_dataset(G, desc, resolve_network(network), outdir, fmt, seeds, class_spec, truncation_psi,
                              trunc_center, noise_mode, native_grid, balance, regions, with_real, max_nn_ssim,
                              privacy_report, privacy_data, gate, device, verbose, rank, world_size)
    if balance or with_real:
        raise GenerateError(f'{"--balance" if balance else "--with-real"}: makes datasets; use --format brats or nnunet')
    gate = gate if gate is not None else open_gate(desc, max_nn_ssim, privacy_report, privacy_data, device, verbose)
    if snapshot_kind(desc) == 'volumes':  # 3D: NIfTI per modality and labels, three-plane montages (docs/volumes.md)
        if fmt not in (None, 'nifti', 'npy'):
            raise VolumeOutputError(f'--format {fmt}: {network} is a volume snapshot; use --format nifti (its default), '
                                    f'npy, brats or nnunet')
        writer = VolumeWriter(desc, outdir, fmt or 'nifti', native_grid, verbose, montage=montage,
                              class_grid=class_spec == 'all')
    else:
        if fmt == 'nifti' or native_grid:
            raise VolumeOutputError(f'{"--native-grid" if native_grid else "--format nifti"}: {network} is a 2D (slices) '
                                    f'snapshot; NIfTI output needs a volume snapshot (dataset_tool.py --kind volumes)')
        writer = ImageWriter(outdir, desc.get('channels') or [], fmt or 'png', verbose, class_grid=class_spec == 'all')
    classes = resolve_classes(G, desc, class_spec)
    written = generate_samples(G, seeds, classes, writer, outdir, truncation_psi, noise_mode, device, verbose,
                               class_grid=class_spec == 'all', gate=gate, trunc_center=trunc_center, rank=rank,
                               world_size=world_size)
    if gate is not None:
        written += gate.report(outdir if world_size == 1 else os.path.join(outdir, f'privacy-rank{rank}'))
    return written


def export_dataset(G, desc, network, outdir, fmt, seeds, class_spec, truncation_psi, trunc_center, noise_mode,
                   native_grid, balance, regions, with_real, max_nn_ssim, privacy_report, privacy_data, gate, device,
                   verbose, rank, world_size) -> list:
    """generate.py --format brats|nnunet: every check first, then the manifest (status 'running'), this process's
    cases (generate_samples) and real cases, and on rank 0 once all are done dataset.json and the complete manifest
    (mri.output.manifest). Returns the paths written by this process."""
    from mri.output import manifest as mf
    from mri.output.datasets import DatasetWriter, barrier, find_real_cases
    writer = DatasetWriter(desc, outdir, fmt, native_grid, regions, verbose)
    if balance and not G.c_dim:
        raise GenerateError('--balance: this network is unconditional; there are no classes to balance')
    classes = resolve_classes(G, desc, 'all' if balance else class_spec)
    real = find_real_cases(with_real, writer) if with_real else []
    names = [item_name(writer, seed, k, classes[k][0]) for k, seed in plan_items(seeds, classes, balance)]  # checked now
    snap = mf.snapshot_record(network)
    options = dict(seeds=[int(s) for s in seeds], class_spec=class_spec, classes=[c[0] or ','.join(c[2]) for c in classes],
                   truncation_psi=float(truncation_psi), trunc_center=trunc_center, noise_mode=noise_mode,
                   fmt=fmt, native_grid=bool(native_grid), balance=bool(balance), regions=bool(regions),
                   with_real=os.path.abspath(with_real) if with_real else None, max_nn_ssim=max_nn_ssim,
                   privacy_report=bool(privacy_report), privacy_data=privacy_data, device=device.type)
    old = mf.check_outdir(outdir, fmt, snap['sha256'])
    if old is not None and not mf.same_options(old['options'], options):
        key = next(k for k in options if old['options'].get(k) != options[k])
        raise mf.ManifestError(f'--outdir {outdir}: holds a dataset started with other options ({key}: '
                               f'{old["options"].get(key)!r}, now {options[key]!r}); choose another --outdir')
    gate = gate if gate is not None else open_gate(desc, max_nn_ssim, privacy_report, privacy_data, device, verbose)
    provenance = {'snapshot_sha256': snap['sha256'], 'truncation_psi': float(truncation_psi),
                  'trunc_center': trunc_center, 'noise_mode': noise_mode}

    def start_manifest():
        if rank == 0:
            writer.clear_partial()  # a killed export's temporary files, before any rank writes
            os.makedirs(outdir, exist_ok=True)
            mf.write_json(os.path.join(outdir, mf.MANIFEST), mf.new_manifest(fmt, snap, options))
        barrier()

    written = generate_samples(G, seeds, classes, writer, outdir, truncation_psi, noise_mode, device, verbose,
                               gate=gate, trunc_center=trunc_center, balance=balance, rank=rank, world_size=world_size,
                               provenance=provenance, before_write=start_manifest, finish=False)
    for cf in real[rank::world_size]:
        if not writer.done(cf.case_id):
            writer.add_real_case(cf)
    if gate is not None:
        written += gate.report(outdir if world_size == 1 else os.path.join(outdir, f'privacy-rank{rank}'))
    barrier()
    if rank == 0:
        written += writer.finish(classes, names + [cf.case_id for cf in real])
        manifest = mf.new_manifest(fmt, snap, options)
        manifest.update(status='complete', cases=writer.finished_cases(names + [cf.case_id for cf in real]),
                        dropped=writer.dropped_cases(names))
        written.append(mf.write_json(os.path.join(outdir, mf.MANIFEST), manifest))
        if verbose:
            print(f'{len(manifest["cases"])} case(s) in {outdir} ({fmt})' +
                  (f', {len(manifest["dropped"])} dropped by the privacy gate' if manifest['dropped'] else ''))
    return written


def init_distributed(device=None):
    """(rank, world size, device) of a torchrun job (RANK / WORLD_SIZE / LOCAL_RANK in the environment): gloo on
    the CPU, nccl and one GPU per local rank with cuda; (0, 1, device) in a single process."""
    import torch
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 0, 1, device
    rank, local = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', os.environ['RANK']))
    cuda = device != 'cpu' and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if cuda else 'gloo')
    return rank, world, f'cuda:{local}' if cuda else 'cpu'


@click.command()
@click.option('--network', 'network',   help='Snapshot .pt, NVlabs .pkl, or run dir (newest snapshot) [with --from-manifest: default the one it records]', metavar='PATH', type=PATH)
@click.option('--seeds',                help='Seeds, e.g. 0-3,7 [painting: default 0, one case per seed]', metavar='LIST', type=str)
@click.option('--trunc', 'truncation_psi', help='Truncation psi', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--trunc-center',         help='Truncate around the class\'s own average w, or the global one', type=click.Choice(['class', 'global']), default='class', show_default=True)
@click.option('--class', 'class_spec',  help='Class: name(s) one per group (axial,t2w), index (one label group only), or all', metavar='NAME|IDX|all', type=str)
@click.option('--noise-mode',           help='Noise mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True)
@click.option('--outdir',               help='Where to save the output images', metavar='DIR', type=PATH, required=True)
@click.option('--format', 'fmt',        help='Output format [default: png; nifti for volumes]; brats / nnunet: a dataset (docs/cohorts.md)', type=click.Choice(['png', 'png16', 'npy', 'nifti', 'brats', 'nnunet']))
@bool_option('--native-grid',           help='Volumes: NIfTI on the original BraTS grid (240x240x155)')
@click.option('--montage',              help='Volumes: a three-plane montage PNG per volume [default: 1 with nifti, 0 with npy]', type=BOOL, is_flag=False, flag_value=True, default=None, metavar='[BOOL]')
@bool_option('--balance',               help='Datasets: one class per seed, every class in turn (painting: tumour sizes in turn)')
@bool_option('--regions',               help='nnunet: BraTS regions (whole tumour, tumour core, enhancing) in dataset.json', default=True)
@click.option('--with-real',            help='Datasets: a folder of real BraTS cases to add to the dataset', metavar='PATH', type=PATH)
@click.option('--from-manifest',        help='Make the dataset a manifest.json describes again, into --outdir', metavar='PATH', type=PATH)
@click.option('--max-nn-ssim',          help='Privacy gate: drop samples whose nearest training sample is closer (SSIM)', metavar='FLOAT', type=click.FloatRange(0, 1))
@bool_option('--privacy-report',        help='Privacy gate: check every sample, keep all, write privacy-report.json')
@click.option('--privacy-data',         help='Privacy gate: the training archive [default: the snapshot\'s]', metavar='PATH', type=PATH)
@bool_option('--allow-pickle',         help='Deprecated, ignored: .pkl files load without running code', hidden=True)
@click.option('--device',               help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@click.option('--insert-into', 'cases', help='Paint snapshot: BraTS case folders (or an archive of them) to paint into', metavar='CASES', type=PATH)
@click.option('--per-case',             help='Painting: new tumours per case', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--labels-from',          help='Painting: label maps: BraTS cases, an archive, a joint snapshot or a NIfTI', metavar='SOURCE', type=PATH)
@bool_option('--heal',                  help='Painting: fill the existing tumour with healthy tissue (seg 0 there)')
@bool_option('--move',                  help='Painting: heal the tumour, then paint it elsewhere')
@bool_option('--labels-as-drawn',       help='Painting: paint a NIfTI label map where it was drawn (on the case\'s grid)')
@click.option('--dilation',             help='Painting: voxels of rim repainted around a tumour', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--margin',               help='Painting: voxels kept between a new tumour and any other', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--scale', 'scale',      help='Painting: range of the random scale of a label map', metavar='MIN,MAX', type=str, default='0.8,1.25', show_default=True)
@click.option('--tries',                help='Painting: shapes tried per tumour before it is reported', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@dnnlib.sigterm_as_interrupt()  # SIGTERM stops it like Ctrl-C (also run in-process); the caller's handler is restored
def main(network, seeds, truncation_psi, trunc_center, class_spec, noise_mode, outdir, fmt, native_grid, montage, balance,
         regions, with_real, from_manifest, max_nn_ssim, privacy_report, privacy_data, allow_pickle, device, cases,
         per_case, labels_from, heal, move, labels_as_drawn, dilation, margin, scale, tries):
    """Generate images by class from a trained network, or a BraTS / nnU-Net dataset of them (--format brats|nnunet,
    docs/cohorts.md); or, with a paint snapshot, paint tumours into real cases (--insert-into), heal them (--heal) or
    move them (--move): docs/painting.md. Under `torchrun --nproc_per_node K` the seeds are shared out."""
    from torch_utils.snapshot import SnapshotError, warn_allow_pickle
    from mri.output.datasets import DatasetOutputError
    from mri.output.manifest import ManifestError
    from mri.output.volumes import VolumeOutputError
    if allow_pickle:
        warn_allow_pickle()
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')
    errors = (ClassSpecError, SnapshotError, VolumeOutputError, DatasetOutputError, ManifestError, GenerateError)
    try:  # the privacy gate's bad input (an archive of other channels or shape) is one line too
        from metrics.privacy import PrivacyError
        errors += (PrivacyError,)
    except ImportError:
        pass
    rank, world_size, device = init_distributed(device)
    try:
        if from_manifest is not None:
            given = [f for f, v in (('--seeds', seeds), ('--class', class_spec), ('--format', fmt),
                                    ('--insert-into', cases), ('--with-real', with_real)) if v is not None]
            if given:
                raise click.UsageError(f'--from-manifest takes its options from the manifest; drop {given[0]}')
            return regenerate(from_manifest, outdir, network, device, rank, world_size)
        if network is None:
            raise click.UsageError('Missing option \'--network\'')
        try:
            seed_list = dnnlib.parse_range(seeds) if seeds is not None else None
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint='--seeds') from None
        painting = cases is not None or heal or move or labels_from is not None or labels_as_drawn
        if painting:
            if max_nn_ssim is not None or privacy_report:
                raise click.UsageError('--max-nn-ssim / --privacy-report: the privacy gate checks generated samples; '
                                       'painted cases keep the real case around the tumour and are not gated')
            if fmt not in (None, 'brats', 'nnunet'):
                raise click.UsageError(f'--format {fmt}: painted cases are BraTS case folders (--format brats, the '
                                       f'default) or an nnU-Net dataset (--format nnunet)')
            opts = paint_options(cases, heal, move, labels_from, labels_as_drawn, per_case, seed_list or [0],
                                 dilation, margin, _scale_range(scale), tries, balance)
            paint_main(network, cases, outdir, labels_from, opts, class_spec, truncation_psi, noise_mode, device,
                       fmt, with_real, trunc_center, rank, world_size)
            return
        if seed_list is None:
            raise click.UsageError('Missing option \'--seeds\' (e.g. --seeds 0-3)')
        generate_images(network, seed_list, outdir, class_spec, truncation_psi, noise_mode, fmt, device=device,
                        native_grid=native_grid, montage=montage, trunc_center=trunc_center, balance=balance, regions=regions,
                        with_real=with_real, max_nn_ssim=max_nn_ssim, privacy_report=privacy_report,
                        privacy_data=privacy_data, rank=rank, world_size=world_size)
    except errors as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:  # every file is written atomically; finished cases stay and a rerun skips them
        dnnlib.exit_interrupted(f'what was finished is kept in {outdir}: run the same command to resume')


def regenerate(manifest_path, outdir, network=None, device=None, rank=0, world_size=1, verbose=True) -> list:
    """generate.py --from-manifest: the dataset a manifest describes, made again into `outdir` with the snapshot it
    names (or `network`, which must have the same sha256)."""
    from mri.output import manifest as mf
    old = mf.read_manifest(manifest_path)
    network = network or old['snapshot'].get('path')
    if not network or not os.path.isfile(network):
        raise mf.ManifestError(f'{manifest_path}: its snapshot {network} is not there; pass it with --network PATH')
    mf.check_snapshot(old, manifest_path, network)
    o = dict(old['options'])
    if o.get('mode'):  # painted cases
        from mri.painting.run import PaintOptions
        fields = PaintOptions.__dataclass_fields__
        opts = PaintOptions(**{k: tuple(v) if k in ('seeds', 'scale') else v for k, v in o['paint'].items() if k in fields})
        paint_main(network, o['cases'], outdir, o.get('labels_from'), opts, o.get('class_spec'), o['truncation_psi'],
                   o['noise_mode'], device or o.get('device'), o['fmt'], o.get('with_real'), o.get('trunc_center', 'class'),
                   rank, world_size)
        return []
    return generate_images(network, o['seeds'], outdir, o['class_spec'], o['truncation_psi'], o['noise_mode'], o['fmt'],
                           device=device or o.get('device'), verbose=verbose, native_grid=o['native_grid'],
                           trunc_center=o['trunc_center'], balance=o['balance'], regions=o['regions'],
                           with_real=o['with_real'], max_nn_ssim=o['max_nn_ssim'], privacy_report=o['privacy_report'],
                           privacy_data=o['privacy_data'], rank=rank, world_size=world_size)


def _scale_range(text):
    try:
        lo, hi = (float(v) for v in text.split(','))
    except ValueError:
        raise click.BadParameter(f'{text}: expected MIN,MAX, e.g. 0.5,1', param_hint='--scale') from None
    if not 0 < lo <= hi:
        raise click.BadParameter(f'{text}: need 0 < MIN <= MAX', param_hint='--scale')
    return lo, hi


def paint_options(cases, heal, move, labels_from, labels_as_drawn, per_case, seeds, dilation, margin, scale, tries,
                  balance=False):
    """The painting switches checked together, as mri.painting.run.PaintOptions."""
    from mri.painting.run import PaintOptions
    if cases is None:
        flag = '--heal' if heal else '--move' if move else '--labels-from' if labels_from else '--labels-as-drawn'
        raise click.UsageError(f'{flag} paints into real cases: pass them with --insert-into CASES')
    if heal and move:
        raise click.UsageError('--heal and --move: choose one (--move heals, then paints the tumour elsewhere)')
    if (heal or move) and labels_from:
        raise click.UsageError(f'{"--heal" if heal else "--move"} takes no --labels-from (healing paints healthy tissue; '
                               f'--move paints the case\'s own tumour)')
    return PaintOptions(mode='heal' if heal else 'move' if move else 'insert', per_case=per_case, seeds=tuple(seeds),
                        tries=tries, dilation=dilation, margin=margin, as_drawn=labels_as_drawn, scale=scale,
                        balance_sizes=bool(balance))


def paint_main(network, cases, outdir, labels_from, opts, class_spec, truncation_psi, noise_mode, device, fmt=None,
               with_real=None, trunc_center='class', rank=0, world_size=1):
    """generate.py on a paint snapshot (mri.painting.run): paints; with --format brats|nnunet also the dataset's
    manifest (and nnU-Net layout) over the painted case folders (mri.output.datasets.export_painted)."""
    from torch_utils.snapshot import SnapshotError
    from mri.output.cases import CaseOutputError
    from mri.painting.run import PaintJobError, paint_cases
    network = resolve_network(network)
    if fmt is None and with_real:
        raise click.UsageError('--with-real: makes datasets; use --format brats or nnunet')
    try:
        if fmt is None:
            paint_cases(network, cases, outdir, labels_from, opts, class_spec, device, noise_mode, truncation_psi,
                        rank=rank, world_size=world_size)
            return
        from mri.output.datasets import export_painted
        export_painted(network, cases, outdir, labels_from, opts, class_spec, device, noise_mode, truncation_psi,
                       fmt, with_real, trunc_center, rank, world_size)
    except (PaintJobError, SnapshotError, CaseOutputError) as err:
        raise click.ClickException(str(err)) from None


if __name__ == '__main__':
    dnnlib.run_cli(main)
