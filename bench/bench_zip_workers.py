#!/usr/bin/env python
"""Stress benchmark: training on a zip archive with DataLoader workers, the way users run it.

Issue 8: with the default `--workers 3` a zip archive crashed training at random ("Bad CRC-32 for file ...",
"File name in directory ... differ"), because the workers shared the parent's zip handle across the fork.
This runs `train.py` on a 64-px archive of the real case (../shared/data/brats, made with dataset_tool.py;
the phantom source where that is absent) for --kimg with --workers workers, --repeats times, each in a fresh
process, and counts the runs that failed or printed a zip/read error (must be 0). As the baseline, the same
training runs once more with `--workers 0` (the main process reads), so the s/kimg of the two are measured on
the same machine in the same session. Prints a table and writes JSON.

    OMP_NUM_THREADS=1 nice python bench/bench_zip_workers.py --json bench_zip_workers.json
"""

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.cli import bool_option, json_option  # noqa: E402  (after the path)

REAL = ROOT.parent / 'shared' / 'data' / 'brats'

# What a shared zip handle produced (and any other failure to read a member).
ZIP_ERRORS = re.compile(r'Bad CRC-32|File name in directory|BadZipFile|Bad magic number|unreadable image|'
                        r'DataLoader worker .* exited unexpectedly|Traceback')


def make_archive(dest: Path, resolution: int, source: str) -> dict:
    """The archive users would train on: dataset_tool.py defaults (three planes, t2w) at `resolution`."""
    if source == 'auto':
        source = 'real' if any(REAL.glob('*/*.nii*')) else 'phantom'
    args = ['--source', str(REAL)] if source == 'real' else ['--source', 'phantom', '--phantom-cases', '2', '--seed', '0']
    t0 = time.time()
    subprocess.run([sys.executable, 'dataset_tool.py', *args, '--dest', str(dest), '--resolution', str(resolution),
                    '--no-progress'], cwd=ROOT, check=True, capture_output=True, text=True)
    import zipfile
    with zipfile.ZipFile(dest) as z:
        images = sum(1 for n in z.namelist() if n.endswith(('.png', '.npy')))
    return dict(source=source, path=str(dest), images=images, size_mb=round(dest.stat().st_size / 2**20, 2),
                convert_sec=round(time.time() - t0, 1))


def train_once(data: Path, outdir: Path, kimg: float, workers: int, net_args: list) -> dict:
    """One train.py run in a fresh process; its exit code, the error lines it printed, and its s/kimg."""
    t0 = time.time()
    res = subprocess.run([sys.executable, 'train.py', '--data', str(data), '--outdir', str(outdir), '--cond=1',
                          '--kimg', str(kimg), '--tick', str(kimg / 4), '--snap', '1000', '--metrics', 'none',
                          '--workers', str(workers), *net_args],
                         cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    output = res.stdout + res.stderr
    errors = sorted({m.group(0) for m in ZIP_ERRORS.finditer(output)})
    stats = []
    for run in outdir.glob('*/stats.jsonl'):
        stats = [json.loads(line) for line in run.read_text().splitlines() if line.strip()]
    sec_per_kimg = None
    if len(stats) >= 2:  # Training speed between the first and the last tick: startup excluded.
        first, last = stats[0], stats[-1]
        dk = last['Progress/kimg']['mean'] - first['Progress/kimg']['mean']
        sec_per_kimg = (last['Timing/total_sec']['mean'] - first['Timing/total_sec']['mean']) / dk if dk > 0 else None
    reached = stats[-1]['Progress/kimg']['mean'] if stats else 0.0
    failed = res.returncode != 0 or bool(errors) or reached < kimg - 1e-3
    return dict(workers=workers, returncode=res.returncode, failed=failed, errors=errors, kimg=round(reached, 3),
                sec_per_kimg=None if sec_per_kimg is None else round(sec_per_kimg, 2), wall_sec=round(wall, 1),
                tail=output[-1500:] if failed else '')


def summarize(runs, archive, resolution, kimg, net, workers, repeats, out):
    """The JSON record (rewritten after every run, so a run cut short still leaves its figures)."""
    stressed = [r for r in runs if r['workers'] == workers]
    base = [r for r in runs if r['workers'] == 0]
    def mean(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 2) if values else None
    summary = dict(
        machine=f'{platform.machine()} {os.cpu_count()}-core CPU ({platform.platform()})',
        command=' '.join(['python', 'bench/bench_zip_workers.py'] + sys.argv[1:]),
        archive=dict(archive, path=os.path.basename(archive['path'])), resolution=resolution, kimg_per_run=kimg,
        omp_num_threads=os.environ.get('OMP_NUM_THREADS'), load_average_1min=round(os.getloadavg()[0], 1),
        network_args=net, workers=workers, repeats=repeats, runs_done=len(stressed),
        failed_runs=sum(r['failed'] for r in stressed), sec_per_kimg_workers=mean(r['sec_per_kimg'] for r in stressed),
        sec_per_kimg_baseline_workers0=mean(r['sec_per_kimg'] for r in base) if base else None, runs=runs)
    tmp_out = out + '.tmp'
    with open(tmp_out, 'w') as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp_out, out)
    return summary


@click.command()
@click.option('--source',     type=click.Choice(['auto', 'real', 'phantom']), default='auto', show_default=True,
              help='auto: the real case when ../shared/data/brats has it, else phantom cases')
@click.option('--resolution', type=click.IntRange(min=4), default=64, show_default=True, metavar='INT')
@click.option('--kimg',       type=click.FloatRange(min=0.01), default=2.0, show_default=True, metavar='FLOAT', help='Per run')
@click.option('--workers',    type=click.IntRange(min=1), default=3, show_default=True, metavar='INT', help='DataLoader workers (train.py default: 3)')
@click.option('--repeats',    type=click.IntRange(min=1), default=3, show_default=True, metavar='INT')
@bool_option('--baseline', default=True, help='One more run with --workers 0')
@click.option('--net',        default='--cbase 256 --cmax 16 --map-depth 1 --batch 16 --device cpu', show_default=True,
              metavar='ARGS', help='CPU-sized network options passed to train.py')
@json_option(default='bench_zip_workers.json')
def main(source, resolution, kimg, workers, repeats, baseline, net, json_path):
    out = json_path
    """Train on a zip with DataLoader workers --repeats times; report errors (must be 0) and s/kimg."""
    with tempfile.TemporaryDirectory(prefix='bench_zip_workers_') as tmp:
        tmp = Path(tmp)
        archive = make_archive(tmp / f'data{resolution}.zip', resolution, source)
        print(f'archive: {archive["images"]} images, {archive["size_mb"]} MB ({archive["source"]}), '
              f'converted in {archive["convert_sec"]} s', flush=True)
        runs = []
        plan = [workers] * repeats + ([0] if baseline else [])
        for i, w in enumerate(plan):
            r = train_once(tmp / 'data{}.zip'.format(resolution), tmp / f'runs{i}', kimg, w, net.split())
            runs.append(r)
            status = 'FAILED ' + '; '.join(r['errors']) if r['failed'] else 'ok'
            print(f'run {i + 1}/{len(plan)}: workers {w}, {r["kimg"]} kimg, {r["sec_per_kimg"]} s/kimg, '
                  f'{r["wall_sec"]} s wall: {status}', flush=True)
            summarize(runs, archive, resolution, kimg, net, workers, repeats, out)

    summary = summarize(runs, archive, resolution, kimg, net, workers, repeats, out)
    print()
    print(f'{"run":>4}  {"workers":>7}  {"kimg":>6}  {"s/kimg":>7}  {"wall s":>7}  errors')
    for i, r in enumerate(runs):
        print(f'{i + 1:>4}  {r["workers"]:>7}  {r["kimg"]:>6.3f}  {r["sec_per_kimg"] or float("nan"):>7.2f}  '
              f'{r["wall_sec"]:>7.1f}  {", ".join(r["errors"]) or ("exit " + str(r["returncode"]) if r["failed"] else "0")}')
    print(f'\nfailed runs with {workers} workers: {summary["failed_runs"]} of {repeats}; '
          f'mean s/kimg {summary["sec_per_kimg_workers"]}'
          + (f' (workers 0: {summary["sec_per_kimg_baseline_workers0"]})' if baseline else ''))
    print(f'wrote {out}')
    sys.exit(1 if summary['failed_runs'] else 0)


if __name__ == '__main__':
    main()
