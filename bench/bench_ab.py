"""Before/after speed of a change to the engine: bench_networks.py (2D) and bench_3d.py (volumes) from two checkouts.

Runs the same bench command in a checkout of the earlier code (``--base DIR``, e.g. ``git worktree add --detach
/tmp/base <commit>``) and in this one, alternating A, B, A, B, ... for ``--rounds`` rounds, each run in a fresh
process, and keeps each side's best figure per task: on a shared machine the best of interleaved rounds is the
figure least disturbed by other load, and both sides meet the same load. Prints a table of rates and the ratio
after/before (> 1 = faster now) and writes JSON.

Example (the measurement of docs/benchmarks.md, "One engine: before and after"):
    git worktree add --detach /tmp/base 0f33175
    python bench/bench_ab.py --base /tmp/base --rounds 3 --json /tmp/bench_ab.json
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dnnlib  # noqa: E402
from training.cli import add_json_argument  # noqa: E402

# (name, script, arguments, how to read rates from its JSON): the documented CPU configurations of both benches.
BENCHES = [
    ('2D 32^2', 'bench/bench_networks.py',
     ['--res', '32', '--channels', '1', '--cbase', '4096', '--cmax', '128', '--zdim', '256', '--wdim', '256',
      '--batch', '8', '--iters', '4', '--rounds', '3', '--device', 'cpu'], 'networks'),
    ('2D 64^2', 'bench/bench_networks.py',
     ['--res', '64', '--channels', '1', '--cbase', '16384', '--cmax', '256', '--batch', '8', '--iters', '1',
      '--rounds', '3', '--device', 'cpu'], 'networks'),
    ('3D 32^3', 'bench/bench_3d.py',
     ['--res', '32', '--batch', '4', '--channels', '7', '--cbase', '512', '--cmax', '64', '--steps', '8', '--iters', '3',
      '--device', 'cpu'], 'volumes'),
]


def _rates(kind: str, report: dict) -> dict:
    """Task name -> samples per second from one bench's JSON."""
    if kind == 'networks':
        return {task: row['img_per_sec'] for task, row in report['results']['ours'].items() if 'img_per_sec' in row}
    result = report['results'][0]
    return {task: result[f'{key}_vol_per_s'] for task, key in
            [('G forward', 'G_fwd'), ('D forward+backward', 'D_fwd_bwd'), ('bare G+D fwd+bwd', 'bare_fwd_bwd'),
             ('training step', 'step')]}


def _run(tree: str, script: str, args: list, kind: str, timeout: float, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'r.json')
        # --out, not --json: a base checkout from before the rename knows only --out (now a hidden alias).
        cmd = [sys.executable, os.path.join(tree, script)] + args + ['--out', out]
        env = dict(os.environ)
        if threads:  # One thread leaves the other core to the machine: far steadier timings on a shared 2-core box.
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            if kind == 'networks':
                cmd += ['--threads', str(threads)]
        res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout, env=env)
        if res.returncode != 0 or not os.path.isfile(out):
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ['no output']
            raise RuntimeError(f'{script} in {tree} failed (exit {res.returncode}): {tail[0]}')
        with open(out) as f:
            return _rates(kind, json.load(f))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--base', required=True, metavar='DIR', help='checkout of the code before the change')
    parser.add_argument('--rounds', type=int, default=3, metavar='INT', help='interleaved rounds per side')
    parser.add_argument('--only', default=None, metavar='NAMES', help='comma-separated bench names (default: all)')
    parser.add_argument('--timeout', type=float, default=1200, metavar='SEC', help='seconds per bench run')
    parser.add_argument('--threads', type=int, default=1, metavar='INT', help='CPU threads per run (0 = torch default)')
    add_json_argument(parser, default='bench_ab.json', help='JSON results')
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.base, 'train.py')):
        parser.error(f'--base {args.base}: not a checkout of this project (no train.py)')
    benches = [b for b in BENCHES if args.only is None or b[0] in args.only.split(',')]
    best = {name: {'before': {}, 'after': {}} for name, *_ in benches}
    start = time.time()
    total = len(benches) * args.rounds * 2
    done = 0
    for rnd in range(args.rounds):
        for name, script, bench_args, kind in benches:
            for side, tree in (('before', args.base), ('after', ROOT)):
                rates = _run(tree, script, bench_args, kind, args.timeout, args.threads)
                for task, rate in rates.items():
                    best[name][side][task] = max(rate, best[name][side].get(task, 0))
                done += 1
                elapsed = time.time() - start
                print(f'[{done}/{total}] {name} {side} round {rnd + 1} ({elapsed:.0f} s, about '
                      f'{elapsed / done * (total - done):.0f} s left)', file=sys.stderr, flush=True)
    machine = f'{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores'
    print(f'Machine: {machine}; {args.threads or "default"} thread(s) per run; best of {args.rounds} interleaved '
          f'rounds per side')
    print(f"{'bench':<9} {'task':<22} {'before /s':>10} {'after /s':>10} {'after/before':>13}")
    rows = []
    for name, *_ in benches:
        for task, before in best[name]['before'].items():
            after = best[name]['after'].get(task, float('nan'))
            rows.append(dict(bench=name, task=task, before=before, after=after, ratio=after / before))
            print(f'{name:<9} {task:<22} {before:>10.2f} {after:>10.2f} {after / before:>13.3f}')
    with dnnlib.atomic_output(args.json, suffix='.json') as tmp, open(tmp, 'w') as f:
        json.dump(dict(machine=machine, base=os.path.abspath(args.base), rounds=args.rounds, threads=args.threads,
                       rows=rows), f, indent=2)
    return rows


if __name__ == '__main__':
    main()
