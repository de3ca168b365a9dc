"""Ablation of the seeds' training switches: baseline, ADA, ADA+top-k, ADA+FQ, ADA+attention.

Each variant trains for the same kimg on the same archive and seed; FID (and FID per class, e.g. per plane)
is measured at every snapshot, so the result is a table at equal kimg and a plot of FID over kimg, like the
seeds' figure. Prints the table, writes ``ablation.json`` and ``ablation.png`` into --outdir.

  # GPU, a real archive:
  python bench/ablation.py --data africa-128.zip --outdir ablation --kimg 200 --tick 20 --num-gen 5000
  # CPU smoke test at a tiny size (metrics.detectors' random-weights stand-in: the FIDs exercise the code and mean
  # nothing):
  python bench/ablation.py --outdir /tmp/abl --tiny
"""

import json
import os
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dnnlib  # noqa: E402
from training.cli import PATH, bool_option  # noqa: E402

VARIANTS = {
    'baseline':  dict(aug='noaug'),
    'ada':       dict(aug='ada'),
    'ada-topk':  dict(aug='ada', topk=True),
    'ada-fq':    dict(aug='ada', fq_res='AUTO'),
    'ada-attn':  dict(aug='ada', attn_res='AUTO'),
}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_metric(run_dir: str, metric: str, tick: float, kimg: float) -> list:
    """[(kimg, results dict)] from metric-<name>.jsonl: one entry per snapshot, at the kimg its name records
    (network-snapshot-<images>.pt), else at one tick per entry."""
    path = os.path.join(run_dir, f'metric-{metric}.jsonl')
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            digits = ''.join(ch for ch in os.path.basename(str(entry.get('snapshot_pkl') or '')) if ch.isdigit())
            at = int(digits) / 1000 if digits else min((len(rows) + 1) * tick, kimg)
            rows.append((round(at, 6), entry['results']))
    return rows


def plot_curves(curves: dict, path: str, title: str, width: int = 720, height: int = 440) -> None:
    """Line plot of {label: [(x, y)]} with axes and a legend (PIL only: no plotting dependency)."""
    img = PIL.Image.new('RGB', (width, height), 'white')
    draw = PIL.ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 160, 30, height - 50
    points = [(x, y) for c in curves.values() for x, y in c if np.isfinite(y)]
    if not points:
        draw.text((left, top), 'no finite values to plot', fill='black')
        img.save(path)
        return
    xs, ys = zip(*points)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline='black')
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, yv)
        draw.line([left - 4, py, left, py], fill='black')
        draw.text((5, py - 6), f'{yv:.2f}', fill='black')
        xv = x0 + (x1 - x0) * i / 4
        px, _ = to_px(xv, y0)
        draw.line([px, bottom, px, bottom + 4], fill='black')
        draw.text((px - 10, bottom + 8), f'{xv:g}', fill='black')
    draw.text((left + (right - left) // 2 - 15, height - 20), 'kimg', fill='black')
    draw.text((left, 8), title, fill='black')
    for i, (label, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [to_px(x, y) for x, y in curve if np.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.line([right + 15, top + 10 + 18 * i, right + 35, top + 10 + 18 * i], fill=colour, width=3)
        draw.text((right + 40, top + 4 + 18 * i), label, fill='black')
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        img.save(tmp)


def run_variant(name, data, outdir, kimg, tick, metric, metric_kwargs, common):
    """Train one variant in a subprocess-free call; returns its run dir."""
    from torch_utils import training_stats
    from training.config import setup_training_config
    from training.training_loop import training_loop
    opts = dict(common)
    for key, value in VARIANTS[name].items():
        opts[key] = value
    res = opts.pop('resolution')
    hook_res = str(min(32, res // 2))
    if opts.get('fq_res') == 'AUTO':
        opts['fq_res'] = hook_res
    if opts.get('attn_res') == 'AUTO':
        opts['attn_res'] = hook_res
    # No tick-0 snapshot: the variants are compared at equal kimg, and an FID of the untrained network costs time.
    c = setup_training_config(data=data, kimg=kimg, tick=tick, snap=1, metrics=metric, first_snap=False, **opts)
    c.metric_kwargs.update(metric_kwargs)
    c.run_dir = os.path.join(outdir, name)
    os.makedirs(c.run_dir, exist_ok=True)
    with open(os.path.join(c.run_dir, 'training_options.json'), 'w') as f:
        json.dump(c, f, indent=2)
    training_stats.reset()
    kwargs = {k: v for k, v in c.items() if k != 'num_gpus'}
    training_loop(**kwargs)
    return c.run_dir


@click.command()
@click.option('--data',       help='Slice archive [default: a phantom archive made here]', metavar='ZIP', type=PATH)
@click.option('--outdir',     help='Where to write runs, table and plot', metavar='DIR', type=PATH, required=True)
@click.option('--variants',   help='Comma-separated subset of ' + ','.join(VARIANTS), metavar='LIST', default=','.join(VARIANTS), show_default=True)
@click.option('--kimg',       help='Training length of every variant', metavar='FLOAT', type=float, default=200, show_default=True)
@click.option('--tick',       help='kimg between FID evaluations', metavar='FLOAT', type=float, default=20, show_default=True)
@click.option('--metric',     help='FID metric evaluated at every snapshot', metavar='NAME', default='fid10k_full', show_default=True)
@bool_option('--per-class',   help='Also FID per class (per plane)', default=True)
@click.option('--num-gen',    help='Generated images per FID (overrides the metric default)', metavar='INT', type=click.IntRange(min=2))
@click.option('--detector',   help='Inception detector path/URL [default: canonical]', metavar='PATH|URL', type=PATH)
@click.option('--batch',      help='Samples per optimizer step (train.py --batch)', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--cbase',      help='Channel base', metavar='INT', type=click.IntRange(min=1), default=16384, show_default=True)
@click.option('--cmax',       help='Max channels', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--seed',       help='Seed shared by all variants', metavar='INT', type=int, default=0, show_default=True)
@click.option('--device',     help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@bool_option('--tiny',        help='CPU smoke test: 16px phantom archive, tiny nets, random detector')
def main(data, outdir, variants, kimg, tick, metric, per_class, num_gen, detector, batch, cbase, cmax, seed, device, tiny):
    """Train every variant for equal kimg and compare FID over kimg."""
    os.makedirs(outdir, exist_ok=True)
    names = [v.strip() for v in variants.split(',') if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise click.BadParameter(f'unknown variant(s) {", ".join(bad)}; choose from {", ".join(VARIANTS)}', param_hint='--variants')
    if tiny:
        kimg, tick, batch, cbase, cmax, device = min(kimg, 0.032), min(tick, 0.016), 4, 256, 16, device or 'cpu'
        num_gen = num_gen or 16
        from metrics.detectors import save_stand_in_detector  # Lazy: torch stays out of --help.
        detector = detector or save_stand_in_detector(os.path.join(outdir, 'tiny-detector.pt'))
    if data is None:
        data = os.path.join(outdir, 'phantom-slices.zip')
        if not os.path.exists(data):
            res = 16 if tiny else 128
            subprocess.run([sys.executable, os.path.join(ROOT, 'dataset_tool.py'), '--source', 'phantom', '--phantom-cases',
                            '2' if tiny else '16', '--kind', 'slices', '--resolution', str(res), '--dest', data],
                           check=True, cwd=ROOT)
    from training.dataset import ImageFolderDataset
    probe = ImageFolderDataset(data, use_labels=True)
    resolution = probe.resolution
    probe.close()
    metrics = metric + (',fid_per_class' if per_class else '')
    metric_kwargs = {}
    if num_gen:
        metric_kwargs['num_gen'] = num_gen
    if detector:
        metric_kwargs['detector_url'] = detector
    common = dict(cond=True, batch=batch, cbase=cbase, cmax=cmax, seed=seed, device=device, workers=0 if tiny else 3,
                  map_depth=2, resolution=resolution)

    table = {}
    for name in names:
        print(f'=== {name} ===', flush=True)
        run_dir = run_variant(name, data, outdir, kimg, tick, metrics, metric_kwargs, common)
        table[name] = dict(run_dir=run_dir, fid=read_metric(run_dir, metric, tick, kimg),
                           per_class=read_metric(run_dir, 'fid_per_class', tick, kimg) if per_class else [])

    # Table at the final (equal) kimg, and curves over kimg.
    class_keys = sorted({k for v in table.values() for _, r in v['per_class'][-1:] for k in r})
    header = ['variant', 'kimg', metric] + class_keys
    rows = []
    for name, v in table.items():
        last_kimg, last = v['fid'][-1] if v['fid'] else (None, {})
        per = v['per_class'][-1][1] if v['per_class'] else {}
        rows.append([name, f'{last_kimg}', f'{last.get(metric, float("nan")):.3f}'] + [f'{per.get(k, float("nan")):.3f}' for k in class_keys])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print('  '.join(str(cell).ljust(w) for cell, w in zip(r, widths)))
    curves = {name: [(k, r.get(metric, float('nan'))) for k, r in v['fid']] for name, v in table.items()}
    plot_curves(curves, os.path.join(outdir, 'ablation.png'), f'{metric} over kimg')
    with open(os.path.join(outdir, 'ablation.json'), 'w') as f:
        json.dump(dict(metric=metric, kimg=kimg, table=table, header=header, rows=rows), f, indent=2)
    print(f'Wrote {os.path.join(outdir, "ablation.json")} and ablation.png')


if __name__ == '__main__':
    main()
