"""Cohort export at scale: N generated volumes written as an nnU-Net dataset by K processes (torchrun, gloo on the
CPU), timed, with each process's peak memory at N and at a tenth of N (flat memory: the two should match), and the
privacy gate's cost per sample where metrics.privacy.PrivacyGate exists (the column is left out otherwise).

Prints a table and writes the figures as JSON (issue 19's target: 1,000 32^3 volumes on the CPU with 2 processes):

  python bench/bench_cohort.py --num 1000 --compare 100 --res 32 --procs 2 --out cohort-bench.json
  python bench/bench_cohort.py --num 4 --compare 2 --res 16 --procs 1 --out /tmp/c.json   # a smoke run

The generator is tiny and untrained (its cost is not what is measured: writing, sharding, the manifest are).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training.cli import PATH, json_option  # noqa: E402

CHANNELS = ['t1n', 't1c', 't2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et']


def make_snapshot(path, res):
    """A tiny untrained joint generator (four modalities + three label channels, two classes) at res^3."""
    import torch
    from torch_utils import snapshot
    from training.networks import Generator
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=2, w_dim=16, img_resolution=[res] * 3, img_channels=len(CHANNELS),
                  mapping_kwargs=dict(num_layers=1), channel_base=256, channel_max=16)
    desc = dict(channels=CHANNELS, label_names=['gli', 'ssa'], label_groups=[{'name': 'cohort', 'values': ['gli', 'ssa']}],
                kind='volumes', image_shape=[len(CHANNELS), res, res, res], resolution=res)
    snapshot.save_snapshot(path, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    return path


# Runs one export in a fresh interpreter and reports the largest resident set of any process it waited for
# (ru_maxrss of reaped descendants, torchrun's workers included), so each measurement starts from zero.
_MEASURE = r'''
import json, resource, subprocess, sys, time
t0 = time.time()
res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": res.returncode, "seconds": time.time() - t0,
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "tail": res.stderr[-1500:]}))
'''


def export_once(network, outdir, num, procs):
    """{'seconds', 'peak_mib'} of generate.py --format nnunet for seeds 0..num-1 in `procs` processes."""
    args = ['generate.py', '--network', network, '--seeds', f'0-{num - 1}', '--balance', '--format', 'nnunet',
            '--outdir', outdir, '--device', 'cpu']
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(procs)] + args
           if procs > 1 else [sys.executable] + args)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    out = subprocess.run([sys.executable, '-c', _MEASURE] + cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result['rc'] != 0:
        raise click.ClickException(f'the export of {num} volumes failed: {result["tail"].strip().splitlines()[-1:]}')
    return {'volumes': num, 'procs': procs, 'seconds': round(result['seconds'], 2),
            'volumes_per_s': round(num / result['seconds'], 2), 'peak_mib': round(result['peak_kib'] / 1024, 1)}


def gate_cost(network, workdir, res, samples=10):
    """Seconds per sample of PrivacyGate.check against a phantom training archive at res^3; None without the gate."""
    try:
        from metrics.privacy import PrivacyGate
    except ImportError:
        return None
    import numpy as np
    import torch
    from click.testing import CliRunner
    import dataset_tool
    from torch_utils import snapshot
    from training import sampling
    archive = os.path.join(workdir, 'train.zip')
    r = CliRunner().invoke(dataset_tool.main, ['--no-progress', '--source', 'phantom', '--phantom-cases', '4',
                                               '--kind', 'volumes', '--volume-size', str(res), '--modalities', 'all',
                                               '--with-seg', '--dest', archive])
    if r.exit_code != 0:
        raise click.ClickException(f'the phantom archive for the gate failed: {r.output.strip()[-300:]}')
    G = snapshot.load_snapshot(network).G_ema
    gate = PrivacyGate(archive, device='cpu', verbose=False)
    label = np.array([1, 0], np.float32)
    gate.check(sampling.sample(G, 0, label), CHANNELS, 'warm-up')  # the archive's features load once
    t0 = time.time()
    for seed in range(samples):
        with torch.no_grad():
            x = sampling.sample(G, seed + 1, label)
        gate.check(x, CHANNELS, f'seed{seed}')
    return (time.time() - t0) / samples


def print_table(rows, gate_s):
    head = f'{"volumes":>8} {"procs":>5} {"seconds":>8} {"volumes/s":>10} {"peak MiB/proc":>14}'
    if gate_s is not None:
        head += f' {"gate ms/sample":>15}'
    print(head)
    for row in rows:
        line = f'{row["volumes"]:>8} {row["procs"]:>5} {row["seconds"]:>8.1f} {row["volumes_per_s"]:>10.2f} {row["peak_mib"]:>14.1f}'
        if gate_s is not None:
            line += f' {gate_s * 1000:>15.1f}'
        print(line)


@click.command()
@click.option('--num',      help='Volumes exported', metavar='INT', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--compare',  help='A smaller export whose peak memory should match (flat memory)', metavar='INT', type=click.IntRange(min=1), default=100, show_default=True)
@click.option('--res',      help='Volume size (res^3)', metavar='INT', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--procs',    help='Processes (torchrun --nproc_per_node)', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@json_option(default='cohort-bench.json', help='Where to write the figures as JSON')
@click.option('--workdir',  help='Scratch folder [default: a temporary one]', metavar='DIR', type=PATH)
def main(num, compare, res, procs, json_path, workdir):
    """Time and peak memory of exporting generated volumes as an nnU-Net dataset (docs/cohorts.md)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        network = make_snapshot(os.path.join(tmp, 'net.pt'), res)
        rows = [export_once(network, os.path.join(tmp, f'd{n}'), n, procs) for n in sorted({compare, num})]
        gate_s = gate_cost(network, tmp, res)
    figures = {'res': res, 'procs': procs, 'runs': rows, 'gate_s_per_sample': gate_s,
               'peak_ratio': round(rows[-1]['peak_mib'] / rows[0]['peak_mib'], 3)}
    print_table(rows, gate_s)
    print(f'peak memory at {rows[-1]["volumes"]} / at {rows[0]["volumes"]} volumes: {figures["peak_ratio"]}')
    from mri.output.manifest import write_json
    write_json(json_path, figures)
    return figures


if __name__ == '__main__':
    main()
