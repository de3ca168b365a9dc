#!/usr/bin/env python
"""Benchmark: the whole downstream protocol end to end on the phantom source (known labels), timed per phase.

Phases, each a fresh process exactly as a user runs it: (1) dataset_tool.py makes a phantom archive with all four
modalities and the tumour-label channels; (2) train.py trains a joint image+mask generator briefly; (3)
calc_segmentation.py runs k-fold cross-validation with the arms real, real+synthetic@R and synthetic. The target
(issue 10): at 64 px on a CPU with 2 folds, the protocol (phase 3, from the archive and the snapshot to the table)
in under 15 minutes; phases 1 and 2 make its inputs and are timed beside it. CPU seconds are reported next to wall
seconds because a shared machine stretches the wall time. The generator of this short run is far from converged, so
its Dice figures test the plumbing, not whether synthetic data helps (see docs/benchmarks.md for the BraTS-Africa
command that asks that).

    python bench/bench_segmentation.py --outdir /tmp/bench-seg --json bench_segmentation.json
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.cli import PATH, json_option  # noqa: E402  (after the path)


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(name, args, log, cpu):
    """Run one phase; returns its wall seconds and records its CPU seconds (all its processes) in ``cpu``."""
    start, cpu_start = time.time(), _cpu_seconds()
    res = subprocess.run([sys.executable] + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    cpu[name] = _cpu_seconds() - cpu_start
    log.write(f'$ {" ".join(map(str, args))}\n{res.stdout}\n{res.stderr}\n')
    if res.returncode != 0:
        sys.exit(f'{name} failed (exit {res.returncode}); see {log.name}:\n{res.stderr[-2000:]}')
    print(f'{name:<14} {seconds:8.1f} s wall {cpu[name]:8.1f} s CPU', flush=True)
    return seconds


@click.command()
@click.option('--outdir',     metavar='DIR', type=PATH, required=True, help='Work folder (archive, run, evaluation)')
@json_option(default='bench_segmentation.json')
@click.option('--cases',      metavar='INT', type=click.IntRange(min=2), default=8, show_default=True, help='Phantom cases')
@click.option('--res',        metavar='INT', type=click.IntRange(min=16), default=64, show_default=True, help='Slice side')
@click.option('--kimg',       metavar='FLOAT', type=float, default=0.1, show_default=True, help='Generator training length')
@click.option('--folds',      metavar='INT', type=click.IntRange(min=2), default=2, show_default=True, help='Folds')
@click.option('--steps',      metavar='INT', type=click.IntRange(min=1), default=150, show_default=True, help='Segmenter steps per fold and arm')
@click.option('--ratio',      metavar='LIST', default='1', show_default=True, help='--synthetic-ratio')
@click.option('--device',     type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
def main(outdir, json_path, cases, res, kimg, folds, steps, ratio, device):
    out = json_path
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    archive, runs, evaluation = outdir / 'phantom-seg.zip', outdir / 'runs', outdir / 'seg-eval'
    times, cpu = {}, {}
    with open(outdir / 'bench.log', 'w') as log:
        if not archive.exists():
            times['archive'] = _run('archive', ['dataset_tool.py', '--source', 'phantom', '--phantom-cases', cases,
                                                '--modalities', 'all', '--with-seg', '--resolution', res, '--planes',
                                                'axial', '--dest', archive, '--no-progress'], log, cpu)
        if not runs.exists():
            times['generator'] = _run('generator', ['train.py', '--data', archive, '--outdir', runs, '--cond=1',
                                                    '--kimg', kimg, '--tick', kimg, '--snap', 1, '--cbase', 2048,
                                                    '--cmax', 64, '--map-depth', 2, '--batch', 8, '--metrics', 'none',
                                                    '--device', device], log, cpu)  # The default 3 workers on the zip.
        reused = [name for name in ('archive', 'generator') if name not in times]
        if reused:
            print(f'reused from {outdir}: {", ".join(reused)} (not timed)')
        (run,) = sorted(runs.iterdir())
        times['segmentation'] = _run('segmentation', ['calc_segmentation.py', '--data', archive, '--network', run,
                                                      '--outdir', evaluation, '--folds', folds, '--synthetic-ratio', ratio,
                                                      '--steps', steps, '--batch', 8, '--device', device,
                                                      '--no-progress'], log, cpu)
    results = json.loads((evaluation / 'results.json').read_text())
    total = sum(times.values())
    print(f'{"total":<14} {total:8.1f} s wall {sum(cpu.values()):8.1f} s CPU  (target: segmentation under 900 s at '
          f'64 px on a CPU, 2 folds)\n')
    print((evaluation / 'results.md').read_text())
    per_arm = {arm: {r: results['summary'][arm][r]['dice']['mean'] for r in results['regions']} for arm in results['arms']}
    train_s = {arm: sum(f['train_seconds'] for f in results['per_fold'][arm]) for arm in results['arms']}
    record = dict(machine=os.environ.get('BENCH_MACHINE', 'unnamed'), device=device, cases=cases, res=res, kimg=kimg,
                  folds=folds, steps=steps, ratio=ratio, seconds=times, cpu_seconds=cpu, reused=reused, total_seconds=total, dice=per_arm,
                  train_seconds_per_arm=train_s, items=results['folds'])
    with open(out, 'w') as f:
        json.dump(record, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
