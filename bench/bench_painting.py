#!/usr/bin/env python
"""Benchmark: tumour painting (issue 18), ours against the L1 U-Net and the ring fill, after equal CPU time.

Two settings, each leaving one case out:
  2d  64^2 axial patches of the three real cases (../shared/data/brats and ../shared/data/brats-extra): trained on
      two, scored on the third (``--held-out``); skipped cleanly when the cases are absent.
  3d  32^3 patches of phantom cases: trained on ``--phantom-cases`` phantoms, scored on one phantom of another seed.

Per setting, each phase as a user runs it: dataset_tool.py writes the patch archives (``--kind patches``); train.py
trains ours (``--cfg paint``) until its processes have used ``--budget`` CPU seconds (then SIGTERM: the loop writes
its snapshot and stops); the L1 U-Net (mri/painting/baselines.py) then trains in this process for exactly the CPU
seconds ours used, on the same patches and the same repaint masks (`mri.painting.masks.RepaintMasks`). On the
held-out case:
  paint_ssim / paint_psnr / paint_mse: tumour-shaped masks in its healthy patches (all-zero label maps), every method
      paints the same masks, scored per modality against the real tissue (BraTS 2024 inpainting protocol);
  insert_dice: one segmenter (a MONAI U-Net trained here on the training patches, saved in calc_segmentation.py's
      format) segments tumours inserted into its healthy patches (label maps of training tumours, painted by ours and
      by the U-Net), Dice against the inserted labels, beside its Dice on the case's real tumours;
  seconds per painted case: ``--per-case`` patches painted one at a time, median of repeats, ours vs the U-Net.
Prints a table, writes JSON (``--out``) with the machine named (``--machine`` or $BENCH_MACHINE, else a description
of this one). The goals (docs/benchmarks.md): SSIM of ours at least the U-Net's; insert_dice at least 0.9x the Dice
on real tumours.

    python bench/bench_painting.py --outdir /tmp/bench-paint --out bench_painting.json          # CPU, full
    python bench/bench_painting.py --outdir /tmp/bench-paint-q --out /tmp/paint-quick.json --quick   # minutes
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
from mri.painting import baselines              # noqa: E402

SHARED = ROOT.parent / 'shared' / 'data'
REAL_CASES = [SHARED / 'brats' / 'BraTS-GLI-00000-000', SHARED / 'brats-extra' / 'BraTS-GLI-90001-000',
              SHARED / 'brats-extra' / 'BraTS-GLI-90003-000']
SETTINGS = {  # name: source, patch side (full, quick), dims
    '2d': dict(source='real', side=64, quick_side=32, dims=2),
    '3d': dict(source='phantom', side=32, quick_side=16, dims=3),
}
GAN_ARGS = '--cbase 2048 --cmax 64 --map-depth 2 --batch 8'    # CPU-sized widths of ours (train.py options)


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


def run_phase(name, args, log, budget=None):
    """Run ``python ARGS`` in the repository; with ``budget`` (CPU seconds), SIGTERM it once its processes have used
    that much. Returns ``(wall seconds, CPU seconds of all its processes)``; exits with its stderr on failure."""
    log.write(f'$ {" ".join(map(str, args))}\n')
    log.flush()
    start, cpu_start = time.time(), _cpu_seconds_children()
    proc = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    stopped = False
    while proc.poll() is None:
        time.sleep(0.5)
        if budget is not None and not stopped:
            used = _tree_cpu_seconds(proc.pid)
            if used is None:
                used = time.time() - start  # No /proc: wall time stands in.
            if used >= budget:
                proc.send_signal(signal.SIGTERM)
                stopped = True
    wall, cpu = time.time() - start, _cpu_seconds_children() - cpu_start
    if proc.returncode != 0:
        log.flush()
        tail = Path(log.name).read_text()[-3000:]
        sys.exit(f'{name} failed (exit {proc.returncode}); see {log.name}:\n{tail}')
    print(f'  {name:<24} {wall:8.1f} s wall {cpu:8.1f} s CPU' + (' (stopped at the budget)' if stopped else ''),
          flush=True)
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
    common = ['--kind', 'patches', '--patch-size', patch, '--modalities', 'all', '--with-seg', '--no-progress']
    if cfg['dims'] == 2:
        common += ['--planes', 'axial']
    train_zip, test_zip = work / 'train.zip', work / 'test.zip'
    if cfg['source'] == 'real':
        present = [c for c in REAL_CASES if c.is_dir()]
        if len(present) < 2:
            print(f'{setting}: skipped (the real cases are not at {SHARED}: found {len(present)} of 3)')
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
# The three painters behind one call: fn(context, mask, labels, c) -> composite.

class GeneratorFill:
    """Ours: a paint snapshot's G_ema, one seeded z per call, the patch's class vector."""

    def __init__(self, snapshot_path, device='cpu', seed=0):
        from torch_utils.snapshot import load_snapshot
        self.G = load_snapshot(snapshot_path, device).G_ema
        self.device, self.seed = device, seed

    @torch.no_grad()
    def __call__(self, context, mask, labels, c=None):
        n = context.shape[0]
        z = torch.randn([n, self.G.z_dim], generator=torch.Generator().manual_seed(self.seed)).to(self.device)
        c = torch.zeros([n, self.G.c_dim]) if c is None or c.shape[1] != self.G.c_dim else c
        out = self.G(z, c.to(self.device), context=context.to(self.device), mask=mask.to(self.device, torch.float32),
                     labels=labels.to(self.device, torch.float32), truncation_psi=1, noise_mode='const')
        return out.cpu()


def _baseline_fn(fill):
    return lambda context, mask, labels, c=None: fill(context, mask, labels)


def _batched(fn, context, mask, labels, c, batch):
    return torch.cat([fn(context[i:i + batch], mask[i:i + batch], labels[i:i + batch], c[i:i + batch])
                      for i in range(0, context.shape[0], batch)])


# ----------------------------------------------------------------------------
# Masks and metrics.

def mask_sampler():
    """The repaint masks the GAN trains on (the lead's RepaintMasks)."""
    from mri.painting.masks import RepaintMasks
    return RepaintMasks()


def healthy_eval_masks(held, seed):
    """Tumour-shaped masks in the held-out case's healthy patches, all-zero labels: the same for every method."""
    idx = [i for i, t in enumerate(held.types) if t == 'healthy']
    torch.manual_seed(seed)
    mask, labels = mask_sampler()(held.labels[idx], held.brain[idx])
    mask = (mask > 0.5) & held.brain[idx]
    keep = [k for k in range(len(idx)) if mask[k].any()]
    return [idx[k] for k in keep], mask[keep], torch.zeros_like(labels[keep])


def paint_metrics(painted, real, mask, modalities):
    """``{modality: {ssim, psnr, mse}}``, the mean over patches, the BraTS 2024 inpainting protocol: per patch and
    modality, both images clipped and scaled to [0, 1] by the 0.5/99.5 percentiles of the real image with the region
    voided; MSE and PSNR over the region's voxels; SSIM over the region's bounding box.
    (Stand-in until metrics/paint.py lands on main: then this calls its per-batch functions.)"""
    from metrics.msssim import ssim
    out = {m: dict(ssim=[], psnr=[], mse=[]) for m in modalities}
    for n in range(real.shape[0]):
        where = mask[n, 0]
        box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in torch.nonzero(where, as_tuple=True))
        for k, name in enumerate(modalities):
            ref = (real[n, k] + 1) / 2
            lo, hi = np.percentile((ref * ~where).numpy(), [0.5, 99.5])
            lo = max(lo, 0.0)
            scale = max(hi - lo, 1e-6)
            a = ((ref.clamp(lo, hi) - lo) / scale)
            b = (((painted[n, k] + 1) / 2).clamp(lo, hi) - lo) / scale
            mse = float(((a[where] - b[where]) ** 2).mean())
            out[name]['mse'].append(mse)
            out[name]['psnr'].append(float(10 * np.log10(1 / max(mse, 1e-10))))
            a_box, b_box = a[box], b[box]
            pad = [(0, max(0, 7 - s)) for s in a_box.shape][::-1]
            a_box = torch.nn.functional.pad(a_box, [p for pair in pad for p in pair])
            b_box = torch.nn.functional.pad(b_box, [p for pair in pad for p in pair])
            out[name]['ssim'].append(float(ssim(a_box[None, None], b_box[None, None], win_size=7)))
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in out.items()}


def train_segmenter_on(train, dims, steps, path, seed=0):
    """One segmenter (MONAI U-Net, calc_segmentation.py's checkpoint format) on the training patches' real labels."""
    from mri.downstream.engine import train_segmenter
    from mri.downstream.model import build_segmenter, save_segmenter
    from mri.seg import decode_seg
    torch.manual_seed(seed)
    model = build_segmenter('unet', dims, len(train.paint_channels), features=16, levels=3)
    labelmap = decode_seg(train.labels * 2 - 1, axis=1).long()
    items = torch.utils.data.TensorDataset(train.images, labelmap)
    patch = list(train.images.shape[2:])
    train_segmenter(model, items, steps=steps, batch=8, lr=2e-3, seed=seed, device='cpu', patch=patch, workers=0)
    save_segmenter(str(path), model, dict(arch='unet', spatial_dims=dims, in_channels=len(train.paint_channels),
                                          input_names=list(train.paint_channels), features=16, levels=3, patch=patch))
    return model


def segment_dice(model, images, labels):
    """Dice per region (WT/TC/ET) pooled over the patches: segmenter on ``images`` against one-hot ``labels``."""
    from mri.downstream.model import predict_labels
    from mri.downstream.regions import pooled_dice
    from mri.seg import decode_seg
    pred = torch.cat([predict_labels(model, images[i:i + 8], list(images.shape[2:])) for i in range(0, len(images), 8)])
    return pooled_dice(pred, decode_seg(labels * 2 - 1, axis=1).long())


def insertion_set(train, held, radius=3):
    """Held-out healthy patches with training tumours' label maps in them (inside the brain), the repaint mask the
    tumour dilated by ``radius`` (as the GAN trains): (indices, mask, labels)."""
    healthy = [i for i, t in enumerate(held.types) if t == 'healthy']
    tumours = [i for i, t in enumerate(train.types) if t == 'tumour' and train.labels[i].any()]
    if not healthy or not tumours:
        return [], None, None
    src = [tumours[k % len(tumours)] for k in range(len(healthy))]
    labels = train.labels[src] * held.brain[healthy]
    keep = [k for k in range(len(healthy)) if labels[k].any()]
    labels = labels[keep]
    mask = baselines.dilate(labels.amax(dim=1, keepdim=True) > 0, radius) & held.brain[[healthy[k] for k in keep]]
    return [healthy[k] for k in keep], mask, labels


def seconds_per_case(fn, held, idx, mask, labels, per_case, repeats):
    """Median seconds to paint ``per_case`` patches one at a time (as insertion into a case does)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(min(per_case, len(idx))):
            fn(held.images[idx[k]][None], mask[k][None], labels[k][None], held.c[idx[k]][None])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------
# One setting end to end.

def run_setting(setting, args, log):
    cfg = SETTINGS[setting]
    side = cfg['quick_side'] if args.quick else cfg['side']
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
    fns, cpu = {}, {}
    runs = work / 'runs'
    try:
        import training.paint  # noqa: F401  (the paint family: is it on this branch?)
        has_paint = True
    except ImportError:
        has_paint = False
    if has_paint and not args.skip_ours:
        _, cpu['ours'] = run_phase('train ours', ['train.py', '--data', train_zip, '--outdir', runs, '--cfg', 'paint',
                                                  '--kimg', 100000, '--tick', 0.02, '--snap', 1000, '--metrics', 'none',
                                                  '--device', 'cpu'] + args.gan_args.split(), log, budget=args.budget)
        snaps = sorted(runs.glob('*/network-snapshot-*.pt'), key=lambda p: p.stat().st_mtime)
        fns['ours'] = GeneratorFill(str(snaps[-1]))
        record['ours_snapshot'] = str(snaps[-1])
    else:
        print('  ours: skipped' + ('' if has_paint else ' (training/paint.py is not on this branch yet)'))
    budget = cpu.get('ours', args.budget)

    # The L1 U-Net, for the CPU seconds ours used.
    torch.manual_seed(args.seed)
    unet = baselines.UNetInpainter(cfg['dims'], train.paint_channels, train.label_channels, features=args.unet_features,
                                   levels=args.unet_levels)
    trained = baselines.train_inpainter(unet, train.images, train.brain, train.labels, mask_sampler(), cpu_seconds=budget,
                                        batch=8, seed=args.seed)
    baselines.save_inpainter(str(work / 'unet-inpainter.pt'), unet, trained)
    cpu['unet'] = trained.cpu_seconds
    print(f'  {"train U-Net (in process)":<24} {trained.wall_seconds:8.1f} s wall {trained.cpu_seconds:8.1f} s CPU '
          f'({trained.steps} steps, L1 {trained.first_loss:.3f} -> {trained.last_loss:.3f})', flush=True)
    fns['unet'] = _baseline_fn(unet.fill)
    fns['ring'] = _baseline_fn(baselines.RingFill(width=args.ring_width).fill)
    record.update(cpu_seconds=cpu, unet_steps=trained.steps, unet_l1=[trained.first_loss, trained.last_loss])

    # paint_ssim / psnr / mse on the held-out case's healthy patches.
    idx, mask, zero = healthy_eval_masks(held, args.seed)
    record['paint'], record['paint_patches'] = {}, len(idx)
    for name, fn in fns.items():
        if not idx:
            break
        painted = _batched(fn, held.images[idx], mask, zero, held.c[idx], 8)
        outside = ~mask.expand_as(painted)
        assert torch.equal(painted[outside], held.images[idx][outside]), f'{name} changed voxels outside the mask'
        per_mod = paint_metrics(painted, held.images[idx], mask, held.paint_channels)
        record['paint'][name] = dict(per_modality=per_mod, **{k: float(np.mean([v[k] for v in per_mod.values()]))
                                                             for k in ('ssim', 'psnr', 'mse')})

    # insert_dice: one segmenter, real tumours against inserted ones.
    segmenter = train_segmenter_on(train, cfg['dims'], args.seg_steps, work / 'segmenter.pt', args.seed)
    real_idx = [i for i, t in enumerate(held.types) if t == 'tumour' and held.labels[i].any()]
    record['dice_real'] = segment_dice(segmenter, held.images[real_idx], held.labels[real_idx]) if real_idx else None
    ins_idx, ins_mask, ins_labels = insertion_set(train, held)
    record['insert_dice'] = {}
    for name in ('ours', 'unet'):
        if name in fns and ins_idx:
            painted = _batched(fns[name], held.images[ins_idx], ins_mask, ins_labels, held.c[ins_idx], 8)
            record['insert_dice'][name] = segment_dice(segmenter, painted, ins_labels)
    record['inserted_patches'] = len(ins_idx)

    # Seconds per painted case.
    record['seconds_per_case'] = {name: seconds_per_case(fns[name], held, ins_idx, ins_mask, ins_labels, args.per_case,
                                                         args.repeats)
                                  for name in ('ours', 'unet') if name in fns and ins_idx}
    return record


def format_table(results):
    lines = ['| setting | method | CPU s trained | SSIM | PSNR dB | MSE | insert_dice WT/TC/ET | Dice real WT/TC/ET | s / case |',
             '|---|---|---|---|---|---|---|---|---|']
    for setting, r in results.items():
        if 'skipped' in r:
            lines.append(f'| {setting} | skipped: {r["skipped"]} | | | | | | | |')
            continue
        real = r.get('dice_real')
        real_s = '/'.join(f'{real[k]:.3f}' for k in ('WT', 'TC', 'ET')) if real else '-'
        for name in ('ours', 'unet', 'ring'):
            p = r['paint'].get(name)
            if p is None and name != 'ring' and name not in r['cpu_seconds']:
                continue
            ins = r['insert_dice'].get(name)
            label = f'{setting} {r["side"]}^{r["dims"]}'
            lines.append(f'| {label} | {name} | {r["cpu_seconds"].get(name, 0):.0f} | '
                         + (f'{p["ssim"]:.3f} | {p["psnr"]:.2f} | {p["mse"]:.4f}' if p else '- | - | -') + ' | '
                         + ('/'.join(f'{ins[k]:.3f}' for k in ('WT', 'TC', 'ET')) if ins else '-') + ' | '
                         + (real_s if name != 'ring' else '-') + ' | '
                         + (f'{r["seconds_per_case"][name]:.3f}' if name in r['seconds_per_case'] else '-') + ' |')
    return '\n'.join(lines)


@click.command()
@click.option('--outdir',         metavar='DIR', required=True, help='Work folder (archives, runs, models, log)')
@click.option('--out',            metavar='JSON', default='bench_painting.json', show_default=True, help='Results')
@click.option('--settings',       metavar='LIST', default='2d,3d', show_default=True, help='Which settings: 2d, 3d')
@click.option('--quick',          is_flag=True, help='Small patches (2D 32^2, 3D 16^3), short budget: checks the bench runs')
@click.option('--budget',         metavar='SEC', type=click.FloatRange(min=1), default=None, help='CPU seconds of training per method  [default: 1800; --quick 20]')
@click.option('--held-out',       metavar='CASE', default='BraTS-GLI-00000-000', show_default=True, help='2D: the real case scored (the others train)')
@click.option('--phantom-cases',  metavar='INT', type=click.IntRange(min=1), default=None, help='3D: phantom training cases  [default: 6; --quick 2]')
@click.option('--gan-args',       metavar='STR', default=GAN_ARGS, show_default=True, help='train.py options of ours')
@click.option('--unet-features',  metavar='INT', type=click.IntRange(min=2), default=16, show_default=True, help='U-Net first-level channels')
@click.option('--unet-levels',    metavar='INT', type=click.IntRange(min=2), default=4, show_default=True, help='U-Net levels')
@click.option('--ring-width',     metavar='INT', type=click.IntRange(min=1), default=3, show_default=True, help='Ring fill: ring width (voxels)')
@click.option('--seg-steps',      metavar='INT', type=click.IntRange(min=1), default=None, help='Segmenter steps  [default: 600; --quick 30]')
@click.option('--per-case',       metavar='INT', type=click.IntRange(min=1), default=3, show_default=True, help='Tumours painted per case (timing)')
@click.option('--repeats',        metavar='INT', type=click.IntRange(min=1), default=3, show_default=True, help='Timing repeats (median)')
@click.option('--skip-ours',      is_flag=True, help='Baselines only')
@click.option('--machine',        metavar='STR', default=None, help='Machine name for the record [default: $BENCH_MACHINE or a description]')
@click.option('--seed',           metavar='INT', type=int, default=0, show_default=True)
def main(**kwargs):
    args = dnnlib.EasyDict(kwargs)
    args.budget = args.budget or (20.0 if args.quick else 1800.0)
    args.phantom_cases = args.phantom_cases or (2 if args.quick else 6)
    args.seg_steps = args.seg_steps or (30 if args.quick else 600)
    settings = [s.strip() for s in args.settings.split(',') if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise click.BadParameter(f'unknown setting(s) {unknown}; expected some of {", ".join(SETTINGS)}',
                                 param_hint='--settings')
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    machine = args.machine or machine_name()
    print(f'machine: {machine}\nbudget: {args.budget:.0f} CPU s of training per method and setting', flush=True)
    results = {}
    with open(outdir / 'bench.log', 'a') as log:
        for setting in settings:
            results[setting] = run_setting(setting, args, log)
    table = format_table(results)
    print('\n' + table)
    record = dict(machine=machine, quick=args.quick, budget_cpu_seconds=args.budget,
                  options={k: v for k, v in args.items() if k not in ('out', 'outdir', 'machine')}, results=results,
                  table=table)
    with dnnlib.atomic_output(args.out, suffix='.json') as tmp:
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
