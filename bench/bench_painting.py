#!/usr/bin/env python
"""Benchmark: tumour painting (issue 18), ours against the L1 U-Net and the ring fill, after equal training time.

Two settings, each leaving one case out:
  2d  64^2 axial patches of the three real cases (../shared/data/brats and ../shared/data/brats-extra): trained on
      two, scored on the third (``--held-out``); skipped cleanly when the cases are absent.
  3d  32^3 patches of phantom cases: trained on ``--phantom-cases`` phantoms, scored on one phantom of another seed.

Per setting, each phase as a user runs it: dataset_tool.py writes the patch archives (``--kind patches``); train.py
trains ours (``--cfg paint``) until its processes have used ``--budget`` CPU seconds counted from its 'Training for'
line (then SIGTERM: the loop finishes the step in flight, writes its snapshot and stops); the L1 U-Net
(mri/painting/baselines.py) then trains in this process for exactly the CPU seconds ours used from that line to its
exit, on the same patches with the same repaint masks (`mri.painting.masks.RepaintMasks`). With ``--device cuda``
both budgets are wall seconds (equal device time). On the held-out case, every method behind the paint generator's
call (`baselines.AsGenerator`) goes through the registry's metrics, so all paint the same masks with the same seeds:
  paint_ssim / paint_psnr / paint_mse (metrics/paint.py): tumour-shaped masks in its healthy patches, all-zero label
      maps, scored per modality against the real tissue (the BraTS inpainting protocol);
  insert_dice (metrics/insert_dice.py): one segmenter (a MONAI U-Net trained here on the training patches' real
      tumours, saved in calc_segmentation.py's format) segments tumours inserted into its healthy patches, Dice against
      the inserted labels, beside its Dice on the case's real tumours (``insert_dice_real``) and their ratio;
  seconds per painted case: ``--per-case`` tumours painted one forward pass each, median of repeats, ours vs the U-Net.
Prints a table, writes JSON (``--json``) with the machine named (``--machine`` or $BENCH_MACHINE, else a description
of this one). The goals (docs/benchmarks.md): paint_ssim of ours at least the U-Net's; insert_dice at least 0.9x the
Dice on real tumours.

    python bench/bench_painting.py --outdir /tmp/bench-paint --json bench_painting.json          # CPU, full
    python bench/bench_painting.py --outdir /tmp/bench-paint-q --json /tmp/paint-quick.json --quick   # minutes
"""

import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dnnlib                                   # noqa: E402  (after the path)
from training.cli import PATH, bool_option, json_option  # noqa: E402
from mri.painting import baselines              # noqa: E402

# ../shared/data beside the checkout (a git worktree one level deeper finds it one level further up).
SHARED = next((p for p in (ROOT.parent / 'shared' / 'data', ROOT.parent.parent / 'shared' / 'data') if p.is_dir()),
              ROOT.parent / 'shared' / 'data')
REAL_CASES = ['brats/BraTS-GLI-00000-000', 'brats-extra/BraTS-GLI-90001-000', 'brats-extra/BraTS-GLI-90003-000']
SETTINGS = {  # name: source, dims, patch side (full, quick), CPU-sized train.py options of ours
    # 2D: 32 channels at 64^2, 64 below; 3D: 16 channels at 32^3, 32 at 16^3, 64 below (as the U-Net's 16, 32, ...).
    '2d': dict(source='real', dims=2, side=64, quick_side=32, gan_args='--cbase 2048 --cmax 64 --map-depth 2 --batch 8'),
    '3d': dict(source='phantom', dims=3, side=32, quick_side=32,  # 16^3 holds too little of a phantom's tumour
               gan_args='--cbase 512 --cmax 64 --map-depth 2 --batch 8'),
}


# ----------------------------------------------------------------------------
# Processes and CPU time.

def _cpu_seconds_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu_seconds(pid):
    """CPU seconds used so far by a process and its live descendants (Linux /proc; None elsewhere)."""
    tick = os.sysconf('SC_CLK_TCK')
    parents, used = {}, {}
    try:
        entries = [e for e in os.listdir('/proc') if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        # After the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15), 0-based from 'state'.
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = sum(int(v) for v in fields[11:15]) / tick
    total, frontier = 0.0, [pid]
    while frontier:
        p = frontier.pop()
        total += used.get(p, 0.0)
        frontier += [c for c, parent in parents.items() if parent == p]
    return total


def run_phase(name, args, log, budget=None, clock='cpu', marker=None):
    """Run ``python ARGS`` in the repository, its output to ``log``. With ``budget`` seconds, SIGTERM it once its
    processes have used that much CPU time (``clock='cpu'``) or that much wall time has passed (``'wall'``, a GPU's
    time), counted from the first line of output holding ``marker`` (e.g. train.py's 'Training for': imports, network
    building and the first grids are not training time). Returns ``(wall seconds, CPU seconds)`` of all its processes
    (with a marker, both from the marker on); exits with the log's tail on failure."""
    log.write(f'$ {" ".join(map(str, args))}\n')
    log.flush()
    log_start = log.tell()
    start, cpu_start = time.time(), _cpu_seconds_children()
    proc = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    stopped, origin = False, None  # origin: (wall, tree CPU) when the marker was seen

    def used_now():
        cpu = _tree_cpu_seconds(proc.pid) if clock == 'cpu' else None
        return time.time() if cpu is None else cpu  # The wall clock (asked for, or no /proc to read CPU time from).
    while proc.poll() is None:
        time.sleep(0.5)
        if budget is None or stopped:
            continue
        if origin is None:
            if marker is None or marker in Path(log.name).read_text(errors='replace')[log_start:]:
                origin = (time.time(), _tree_cpu_seconds(proc.pid) or 0.0, used_now())
            continue  # The first check comes a poll later: the signal handler is installed by then.
        if used_now() - origin[2] >= budget:
            proc.send_signal(signal.SIGTERM)
            stopped = True
    wall, cpu = time.time() - start, _cpu_seconds_children() - cpu_start
    if origin is not None and marker is not None:
        wall, cpu = wall - (origin[0] - start), cpu - origin[1]
    if proc.returncode != 0:
        log.flush()
        tail = Path(log.name).read_text(errors='replace')[-3000:]
        sys.exit(f'{name} failed (exit {proc.returncode}); see {log.name}:\n{tail}')
    print(f'  {name:<24} {wall:8.1f} s wall {cpu:8.1f} s CPU' + (' (stopped at the budget)' if stopped else '')
          + (' after setup' if origin is not None and marker is not None else ''), flush=True)
    return wall, cpu


def machine_name():
    name = os.environ.get('BENCH_MACHINE')
    if name:
        return name
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return (f'{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, '
            f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}')


# ----------------------------------------------------------------------------
# Data: patch archives, leave one case out.

def make_archives(setting, cfg, side, work, log, args):
    """(train archive, held-out archive, held-out case id) for one setting, or None when its cases are absent."""
    patch = ','.join([str(side)] * cfg['dims'])
    common = ['--kind', 'patches', '--patch-size', patch, '--modalities', 'all', '--patches-per-case',
              args.patches_per_case, '--no-progress']
    if cfg['dims'] == 2:
        common += ['--planes', 'axial']
    train_zip, test_zip = work / 'train.zip', work / 'test.zip'
    if cfg['source'] == 'real':
        present = [Path(args.shared_data) / c for c in REAL_CASES if (Path(args.shared_data) / c).is_dir()]
        if len(present) < 2:
            print(f'{setting}: skipped (the real cases are not in {args.shared_data}: found {len(present)} of 3)')
            return None
        held = [c for c in present if c.name == args.held_out] or present[:1]
        sources = {'train': [c for c in present if c not in held], 'test': held}
        for part, zip_path in (('train', train_zip), ('test', test_zip)):
            if zip_path.exists():
                continue
            folder = work / f'cases-{part}'  # Links: the shared cases are never copied.
            folder.mkdir(parents=True, exist_ok=True)
            for case in sources[part]:
                if not (folder / case.name).exists():
                    (folder / case.name).symlink_to(case, target_is_directory=True)
            run_phase(f'archive ({part})', ['dataset_tool.py', '--source', folder, '--dest', zip_path] + common, log)
        return train_zip, test_zip, held[0].name
    if not train_zip.exists():
        run_phase('archive (train)', ['dataset_tool.py', '--source', 'phantom', '--phantom-cases', args.phantom_cases,
                                      '--seed', 0, '--dest', train_zip] + common, log)
    if not test_zip.exists():
        run_phase('archive (held out)', ['dataset_tool.py', '--source', 'phantom', '--phantom-cases', 1, '--seed',
                                         1000, '--dest', test_zip] + common, log)
    return train_zip, test_zip, 'phantom seed 1000'


# ----------------------------------------------------------------------------
# The three painters, each behind the paint generator's call (so the registry's paint metrics score them alike).

def load_ours(snapshot_path, device='cpu'):
    from torch_utils.snapshot import load_snapshot
    return load_snapshot(snapshot_path, device).G_ema


def mask_sampler():
    """The repaint masks the GAN trains on (the lead's RepaintMasks)."""
    from mri.painting.masks import RepaintMasks
    return RepaintMasks()


def measure(G, archive, segmenter, num_items, seed, device='cpu'):
    """The registry's paint metrics on the held-out archive: ``{metric key: value}`` (paint_ssim/psnr/mse per
    modality and averaged; insert_dice, insert_dice_real, their ratio, per class): the one place metrics are
    called."""
    from metrics import metric_main, metric_utils
    kwargs = dict(G=G, dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(archive),
                                           use_labels=True), num_gpus=1, rank=0, device=device, cache=False,
                  num_gen=num_items, batch_size=8, seed=seed, segmenter=str(segmenter))
    out = {}
    for group in (['paint_ssim', 'paint_psnr', 'paint_mse'], ['insert_dice']):
        try:
            for res in metric_main.calc_metrics(group, **kwargs):
                out.update(res.results)
        except metric_utils.MetricError as err:  # e.g. no tumour fits a healthy patch: recorded, the others go on
            out[f'{group[0]}_error'] = str(err)
            print(f'  {group[0]}: {err}', flush=True)
    return out


def train_segmenter_on(train, dims, steps, path, seed=0, device='cpu'):
    """One segmenter (MONAI U-Net, calc_segmentation.py's checkpoint format) on the training patches' real labels."""
    from mri.downstream.engine import train_segmenter
    from mri.downstream.model import build_segmenter, save_segmenter
    from mri.seg import decode_seg
    torch.manual_seed(seed)
    model = build_segmenter('unet', dims, len(train.paint_channels), features=16, levels=3)
    labelmap = decode_seg(train.labels.to(torch.float32) * 2 - 1, axis=1).long()
    items = torch.utils.data.TensorDataset(train.images, labelmap)
    patch = list(train.images.shape[2:])
    train_segmenter(model, items, steps=steps, batch=8, lr=2e-3, seed=seed, device=device, patch=patch, workers=0)
    save_segmenter(str(path), model, dict(arch='unet', spatial_dims=dims, in_channels=len(train.paint_channels),
                                          input_names=list(train.paint_channels), features=16, levels=3, patch=patch))
    return model


@torch.no_grad()
def seconds_per_case(G, held, per_case, repeats, seed=0, device='cpu'):
    """Median seconds to paint ``per_case`` tumours into the held-out case one at a time (as insertion into a case
    does: one forward pass per tumour), with its own tumour patches' masks and labels."""
    idx = [i for i, t in enumerate(held.types) if t == 'tumour' and held.labels[i].any()][:per_case]
    if not idx:
        return None
    mask, labels = mask_sampler()(held.labels[idx], held.brain[idx], generator=torch.Generator().manual_seed(seed))
    c = held.c[idx] if held.c.shape[1] == G.c_dim else torch.zeros([len(idx), G.c_dim])
    z = torch.randn([len(idx), G.z_dim], generator=torch.Generator().manual_seed(seed))
    z, c, mask, labels = z.to(device), c.to(device), mask.to(device), labels.to(device)
    context = (held.images[idx].to(device) * (1 - mask))
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    times = []
    for _ in range(repeats + 1):  # The first round warms up (allocator, cuDNN choices) and is not counted.
        sync()
        start = time.perf_counter()
        for k in range(len(idx)):
            G(z[k:k + 1], c[k:k + 1], context=context[k:k + 1], mask=mask[k:k + 1], labels=labels[k:k + 1],
              truncation_psi=1, noise_mode='const')
        sync()
        times.append(time.perf_counter() - start)
    times = times[1:]
    return statistics.median(times) * per_case / len(idx)


# ----------------------------------------------------------------------------
# One setting end to end.

def run_setting(setting, args, log):
    cfg = SETTINGS[setting]
    side = args[f'side_{setting}'] or (cfg['quick_side'] if args.quick else cfg['side'])
    work = Path(args.outdir) / f'{setting}-{side}'
    work.mkdir(parents=True, exist_ok=True)
    print(f'{setting}: {cfg["dims"]}D {side}^{cfg["dims"]}, {cfg["source"]} cases', flush=True)
    made = make_archives(setting, cfg, side, work, log, args)
    if made is None:
        return dict(skipped='real cases absent')
    train_zip, test_zip, held_case = made
    train, held = baselines.patch_tensors(str(train_zip)), baselines.patch_tensors(str(test_zip))
    record = dict(dims=cfg['dims'], side=side, source=cfg['source'], held_out=held_case,
                  train_patches=len(train.types), held_patches=len(held.types), modalities=train.paint_channels)

    # Ours, stopped at the CPU budget.
    ours, cpu, wall, images = None, {}, {}, {}
    clock = 'cpu' if args.device == 'cpu' else 'wall'  # Equal CPU time on a CPU, equal device time on a GPU.
    runs = work / 'runs'
    if not args.skip_ours:
        wall['ours'], cpu['ours'] = run_phase('train ours', ['train.py', '--data', train_zip, '--outdir', runs,
                                                             '--cfg', 'paint',
                                                  '--kimg', 100000, '--tick', 0.02, '--snap', 1000, '--metrics', 'none',
                                                  '--device', args.device] + (args.gan_args or cfg['gan_args']).split(),
                                       log,
                                       budget=args.budget, clock=clock, marker='Training for')
        snaps = sorted(runs.glob('*/network-snapshot-*.pt'), key=lambda p: p.stat().st_mtime)
        ours = load_ours(str(snaps[-1]), args.device)
        record['ours_snapshot'] = str(snaps[-1])
        images['ours'] = int(snaps[-1].stem.rsplit('-', 1)[-1])  # network-snapshot-<images seen>.pt
    else:
        print('  ours: skipped (--skip-ours)')
    budget = (cpu if clock == 'cpu' else wall).get('ours', args.budget)

    # The L1 U-Net, for the CPU seconds ours used.
    torch.manual_seed(args.seed)
    unet = baselines.UNetInpainter(cfg['dims'], train.paint_channels, train.label_channels, features=args.unet_features,
                                   levels=args.unet_levels)
    trained = baselines.train_inpainter(unet, train.images, train.brain, train.labels, mask_sampler(), batch=8,
                                        seed=args.seed, device=args.device, **{f'{clock}_seconds': budget})
    baselines.save_inpainter(str(work / 'unet-inpainter.pt'), unet, trained)
    cpu['unet'], wall['unet'], images['unet'] = trained.cpu_seconds, trained.wall_seconds, trained.steps * 8
    print(f'  {"train U-Net (in process)":<24} {trained.wall_seconds:8.1f} s wall {trained.cpu_seconds:8.1f} s CPU '
          f'({trained.steps} steps, L1 {trained.first_loss:.3f} -> {trained.last_loss:.3f})', flush=True)
    shape = list(train.images.shape[2:])
    painters = dict(ours=ours) if ours is not None else {}
    painters['unet'] = baselines.AsGenerator(unet, train.paint_channels, train.label_channels, shape)
    painters['ring'] = baselines.AsGenerator(baselines.RingFill(width=args.ring_width), train.paint_channels,
                                             train.label_channels, shape)
    record.update(budget_clock=clock, cpu_seconds=cpu, wall_seconds=wall, images_seen=images, unet_steps=trained.steps,
                  unet_l1=[trained.first_loss, trained.last_loss])

    # One segmenter (trained on the training cases' real tumours); the registry's metrics on the held-out case.
    start = time.time()
    segmenter = work / 'segmenter.pt'
    train_segmenter_on(train, cfg['dims'], args.seg_steps, segmenter, args.seed, args.device)
    print(f'  {"segmenter":<24} {time.time() - start:8.1f} s wall ({args.seg_steps} steps)', flush=True)
    record['metrics'], record['seconds_per_case'] = {}, {}
    for name, G in painters.items():
        start = time.time()
        G = G.to(args.device)
        record['metrics'][name] = measure(G, test_zip, segmenter, args.num_items, args.seed, args.device)
        if name != 'ring':
            record['seconds_per_case'][name] = seconds_per_case(G, held, args.per_case, args.repeats, args.seed,
                                                                args.device)
        print(f'  {"metrics " + name:<24} {time.time() - start:8.1f} s wall', flush=True)
    return record


def format_table(results):
    """One row per setting and method: seconds trained (CPU, or wall on a GPU), patches seen, the paint scores (mean
    over modalities), insert_dice
    (mean of WT/TC/ET) beside the same segmenter's Dice on real tumours, seconds per painted case."""
    lines = ['| setting | method | s trained | patches seen | paint_ssim | paint_psnr dB | paint_mse | insert_dice | '
             'Dice on real '
             'tumours | ratio | s / case |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for setting, r in results.items():
        if 'skipped' in r:
            lines.append(f'| {setting} | skipped: {r["skipped"]} | | | | | | | | | |')
            continue
        for name, m in r['metrics'].items():
            m = dict(m)
            for key in ('paint_ssim', 'paint_psnr', 'paint_mse', 'insert_dice', 'insert_dice_real',
                        'insert_dice_ratio'):
                m.setdefault(key, float('nan'))
            spent = r['cpu_seconds' if r['budget_clock'] == 'cpu' else 'wall_seconds'].get(name)
            spent = '-' if spent is None else f'{spent:.0f} {r["budget_clock"]}'
            secs = r['seconds_per_case'].get(name)
            seen = r['images_seen'].get(name, '-')
            lines.append(f'| {setting} {r["side"]}^{r["dims"]} | {name} | {spent} | {seen} | '
                         f'{m["paint_ssim"]:.3f} | {m["paint_psnr"]:.2f} | {m["paint_mse"]:.4f} | '
                         f'{m["insert_dice"]:.3f} | {m["insert_dice_real"]:.3f} | {m["insert_dice_ratio"]:.2f} | '
                         f'{"-" if secs is None else f"{secs:.3f}"} |')
    return '\n'.join(lines)


@click.command()
@click.option('--outdir',         metavar='DIR', type=PATH, required=True, help='Work folder (archives, runs, models, log)')
@json_option(default='bench_painting.json')
@click.option('--settings',       metavar='LIST', default='2d,3d', show_default=True, help='Which settings: 2d, 3d')
@bool_option('--quick', help='2D 32^2, few patches, short budget: checks the bench runs')
@click.option('--budget',         metavar='SEC', type=click.FloatRange(min=1), default=None, help='Seconds of training per method (CPU s; wall s with --device cuda)  [default: 1800; --quick 20]')
@click.option('--side-2d',        metavar='INT', type=click.IntRange(min=16), default=None, help='2D patch side  [default: 64; --quick 32]')
@click.option('--side-3d',        metavar='INT', type=click.IntRange(min=16), default=None, help='3D patch side  [default: 32]')
@click.option('--device',         type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True, help='cuda: budgets in wall seconds (equal device time)')
@click.option('--held-out',       metavar='CASE', default='BraTS-GLI-00000-000', show_default=True, help='2D: the real case scored (the others train)')
@click.option('--phantom-cases',  metavar='INT', type=click.IntRange(min=1), default=None, help='3D: phantom training cases  [default: 6; --quick 2]')
@click.option('--patches-per-case', metavar='INT', type=click.IntRange(min=1), default=None, help='Tumour (and as many healthy) patches per case  [default: 32; --quick 6]')
@click.option('--gan-args',       metavar='STR', default=None, help='train.py options of ours  [default: CPU-sized widths per setting]')
@click.option('--shared-data',    metavar='DIR', type=PATH, default=str(SHARED), show_default=True, help='2D: holds brats/ and brats-extra/')
@click.option('--unet-features',  metavar='INT', type=click.IntRange(min=2), default=16, show_default=True, help='U-Net first-level channels')
@click.option('--unet-levels',    metavar='INT', type=click.IntRange(min=2), default=4, show_default=True, help='U-Net levels')
@click.option('--ring-width',     metavar='INT', type=click.IntRange(min=1), default=3, show_default=True, help='Ring fill: ring width (voxels)')
@click.option('--seg-steps',      metavar='INT', type=click.IntRange(min=1), default=None, help='Segmenter steps  [default: 600; --quick 30]')
@click.option('--num-items',      metavar='INT', type=click.IntRange(min=1), default=None, help='Patches per metric [default: every healthy patch, at most 1000]')
@click.option('--per-case',       metavar='INT', type=click.IntRange(min=1), default=3, show_default=True, help='Tumours painted per case (timing)')
@click.option('--repeats',        metavar='INT', type=click.IntRange(min=1), default=3, show_default=True, help='Timing repeats (median)')
@bool_option('--skip-ours', help='Baselines only')
@click.option('--machine',        metavar='STR', default=None, help='Machine name for the record [default: $BENCH_MACHINE or a description]')
@click.option('--seed',           metavar='INT', type=int, default=0, show_default=True)
def main(**kwargs):
    args = dnnlib.EasyDict(kwargs)
    args.budget = args.budget or (20.0 if args.quick else 1800.0)
    args.phantom_cases = args.phantom_cases or (2 if args.quick else 6)
    args.seg_steps = args.seg_steps or (30 if args.quick else 600)
    args.patches_per_case = args.patches_per_case or (6 if args.quick else 32)
    settings = [s.strip() for s in args.settings.split(',') if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise click.BadParameter(f'unknown setting(s) {unknown}; expected some of {", ".join(SETTINGS)}',
                                 param_hint='--settings')
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    machine = args.machine or machine_name()
    clock = 'CPU' if args.device == 'cpu' else 'wall'
    print(f'machine: {machine}\nbudget: {args.budget:.0f} {clock} s of training per method and setting', flush=True)
    results = {}
    with open(outdir / 'bench.log', 'a') as log:
        for setting in settings:
            results[setting] = run_setting(setting, args, log)
    table = format_table(results)
    print('\n' + table)
    record = dict(machine=machine, device=args.device, quick=args.quick, budget_seconds=args.budget, budget_clock=clock,
                  options={k: v for k, v in args.items() if k not in ('json_path', 'outdir', 'machine')}, results=results,
                  table=table)
    with dnnlib.atomic_output(args.json_path, suffix='.json') as tmp:
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=1)
    print(f'wrote {args.json_path}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
