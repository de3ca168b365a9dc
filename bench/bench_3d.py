"""Peak memory and volumes/second of the network family (training.networks) on volumes and of the loop's whole training step.

Per configuration (volume side or shape, batch, channels, precision, activation checkpointing) it measures
  - G forward: inference (eval mode, no grad, const noise), as generate.py and the metrics run G_ema;
  - D forward+backward: D(reals).sum().backward();
  - bare forward+backward: the network work of the two main phases without the loop: G -> D -> backward (the G
    phase), then D on detached fakes and on reals -> backward (the D phase); no regularisation, ADA, optimizer;
  - training step: the loop's own step (training.training_loop._train_step with the vol preset's loss, 3D ADA
    at p = 0.3, Adam, G_ema) averaged over 16 steps, so lazy R1 (every 16) and path length (every 4) count at
    their real share. ``step / bare`` is the loop's overhead over the networks' own forward+backward.
Peak memory: on CUDA torch.cuda.max_memory_allocated of the step; on CPU the peak RSS of a fresh process that runs
only this configuration, minus the RSS after the networks were built (the cost of the batch), and per volume.

Every configuration runs in its own process (so peak RSS belongs to it alone). A table is printed and the results
are written as JSON. ``--dry-run`` runs one tiny configuration in this process, in seconds (the tests call it).

Examples:
    python bench/bench_3d.py --res 16,32,64 --batch 2 --cbase 1024 --cmax 128 --device cpu --json bench3d-cpu.json
    python bench/bench_3d.py --res 32,64 --batch 1,2 --skip-timing --device cpu --json bench3d-mem.json
    python bench/bench_3d.py --res 128,160x192x160 --batch 8,2 --checkpointing 0,1 --device cuda
    python bench/bench_3d.py --res 32,64 --batch 8 --cbase 512 --cmax 64 --pass-form auto,folded --steps 4 --device cpu

``--pass-form`` picks how torch_utils/ops/upfirdn3d.py runs its 1D filter passes (``auto`` = the device's default, or one of
``depthwise``/``folded`` forced), so the two forms can be compared on the same configuration in one run.
"""

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dnnlib  # noqa: E402
from training.cli import add_bool_argument, add_json_argument  # noqa: E402

STEPS = 16  # Training steps averaged: one R1 pass (interval 16) and four path-length passes (interval 4).


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: kilobytes.


def _current_rss_gb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 30


def _shape(text):
    parts = [int(v) for v in str(text).lower().split('x')]
    return parts * 3 if len(parts) == 1 else parts


class _Volumes:
    """Stands in for the dataset: random uint16 volumes in memory (the bench measures compute, not I/O)."""

    def __init__(self, channels, shape, c_dim, batch):
        self.dtype_max = 65535
        self.channels = channels
        self.c_dim = c_dim
        self.batch = batch
        self.shape = shape

    def __len__(self):
        return 64

    def get_label(self, idx):
        out = np.zeros([self.c_dim], np.float32)
        if self.c_dim:
            out[idx % self.c_dim] = 1
        return out

    def __iter__(self):
        while True:
            img = torch.randint(0, self.dtype_max, [self.batch, self.channels] + self.shape, dtype=torch.int32)
            yield img, torch.from_numpy(np.stack([self.get_label(i) for i in range(self.batch)]))


def _build(cfg, device):
    from training import training_loop
    from training.augment import augpipe_specs
    from training.config import VOLUME_CFG_SPECS
    shape = _shape(cfg['res'])
    c_dim = cfg['c_dim']
    names = ['t1n', 't1c', 't2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et'][:cfg['channels']] if cfg['channels'] <= 7 else None
    common = dict(channel_base=cfg['cbase'], channel_max=cfg['cmax'], num_fp16_res=0 if cfg['precision'] == 'fp32' else 2,
                  conv_clamp=None if cfg['precision'] == 'fp32' else 256, checkpointing=bool(cfg['checkpointing']),
                  mixed_precision='bfloat16' if cfg['precision'] == 'bf16' else 'float16')
    res = shape
    G = dnnlib.construct_class_by_name(class_name='training.networks.Generator', z_dim=512, w_dim=512, c_dim=c_dim,
                                       img_resolution=res, img_channels=cfg['channels'],
                                       mapping_kwargs=dict(num_layers=2), **common).train().requires_grad_(False).to(device)
    D = dnnlib.construct_class_by_name(class_name='training.networks.Discriminator', c_dim=c_dim, img_resolution=res,
                                       img_channels=cfg['channels'], epilogue_kwargs=dict(mbstd_group_size=min(4, cfg['batch'])),
                                       **common).train().requires_grad_(False).to(device)
    pipe = dnnlib.construct_class_by_name(class_name='training.augment.AugmentPipe', channel_names=names,
                                          **augpipe_specs['bgc']).to(device)
    pipe.p.fill_(0.3)
    preset = VOLUME_CFG_SPECS['vol' + str(min(max(shape), 256))] if 'vol' + str(max(shape)) in VOLUME_CFG_SPECS else VOLUME_CFG_SPECS['vol64']
    loss = dnnlib.construct_class_by_name(class_name='training.loss.StyleGAN2Loss', device=device, G=G, D=D,
                                          augment_pipe=pipe, r1_gamma=preset['gamma'], style_mixing_prob=0.9, pl_weight=2)
    opt = dict(class_name='torch.optim.Adam', lr=0.002, betas=[0, 0.99], eps=1e-8)
    phases = training_loop._phases(G, D, opt, opt, 4, 16)
    for phase in phases:
        phase.start_event = phase.end_event = None
    return G, D, pipe, loss, phases, shape


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(fn, device, iters):
    fn()  # Warm-up (oneDNN/cuDNN primitive creation).
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def run_one(cfg: dict) -> dict:
    """Measure one configuration in this process; returns a dict of figures."""
    from torch_utils.ops import upfirdn3d
    with upfirdn3d.forced_pass_form(None if cfg.get('pass_form', 'auto') == 'auto' else cfg['pass_form']):
        return _measure(cfg)


def _measure(cfg: dict) -> dict:
    from torch_utils.ops import upfirdn3d
    from training import training_loop
    device = torch.device(cfg['device'])
    torch.manual_seed(0)
    G, D, pipe, loss, phases, shape = _build(cfg, device)
    G_ema = G.__class__(**G.init_kwargs).eval().requires_grad_(False).to(device)
    batch, iters = cfg['batch'], cfg['iters']
    data = _Volumes(cfg['channels'], shape, cfg['c_dim'], batch)
    z = torch.randn([batch, G.z_dim], device=device)
    c = torch.from_numpy(np.stack([data.get_label(i) for i in range(batch)])).to(device)
    reals = torch.rand([batch, cfg['channels']] + shape, device=device) * 2 - 1
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _current_rss_gb()
    out = dict(cfg, pass_form=upfirdn3d._pass_form(device), shape=shape, G_params=sum(p.numel() for p in G.parameters()),
               D_params=sum(p.numel() for p in D.parameters()))

    # The loop's own step and EMA on a Run of this configuration (training.training_loop's state object).
    run = training_loop.Run(opts=dnnlib.EasyDict(num_gpus=1, batch_size=batch, batch_gpu=batch, ema_kimg=2.5,
                                                 ema_rampup=None),
                            device=device, training_set=data, batches=iter(data), loss=loss, phases=phases,
                            frozen=set(), nets=dnnlib.EasyDict(G=G, D=D, G_ema=G_ema, augment_pipe=pipe),
                            cur_nimg=10 ** 6)

    def step():
        training_loop._train_step(run)
        training_loop._update_ema(run)
        run.batch_idx += 1

    if cfg['skip_timing']:
        step()  # batch_idx 0: every phase runs (G main, path length, D main, R1): the step's peak memory.
        _sync(device)
    else:
        with torch.no_grad():
            G.eval()
            out['G_fwd_s'] = _timed(lambda: G(z, c, noise_mode='const'), device, iters)
            G.train()
        D.requires_grad_(True)
        out['D_fwd_bwd_s'] = _timed(lambda: D(reals, c).sum().backward(), device, iters)
        G.requires_grad_(True)

        def bare():
            D.requires_grad_(False)
            D(G(z, c), c).sum().backward()  # G phase.
            D.requires_grad_(True)
            with torch.no_grad():
                fakes = G(z, c)
            (D(fakes, c).sum() + D(reals, c).sum()).backward()  # D phase.
        out['bare_fwd_bwd_s'] = _timed(bare, device, iters)
        G.requires_grad_(False)
        D.requires_grad_(False)
        for p in list(G.parameters()) + list(D.parameters()):
            p.grad = None
        step()  # Warm-up: batch_idx 0 runs every phase once.
        _sync(device)
        start = time.perf_counter()
        for _ in range(cfg.get('steps', STEPS)):
            step()
        _sync(device)
        out['step_s'] = (time.perf_counter() - start) / cfg.get('steps', STEPS)
        out['step_over_bare'] = out['step_s'] / out['bare_fwd_bwd_s']
        for key in ['G_fwd', 'D_fwd_bwd', 'bare_fwd_bwd', 'step']:
            out[key + '_vol_per_s'] = batch / out[key + '_s']
    if device.type == 'cuda':
        out['peak_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        out['per_volume_gb'] = out['peak_gb'] / batch
    else:
        out['peak_rss_gb'] = _rss_gb()
        out['batch_rss_gb'] = out['peak_rss_gb'] - base_rss
        out['per_volume_gb'] = out['batch_rss_gb'] / batch
    return out


def _fresh_process(cfg: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'cfg.json')
        with open(path, 'w') as f:
            json.dump(cfg, f)
        try:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), '--one', path], capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(cfg, error=f'timed out after {timeout:.0f} s')
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ['?'])[-1]
            return dict(cfg, error=tail[:300])
        return json.loads(res.stdout.strip().splitlines()[-1])


def _table(results) -> str:
    head = ['shape', 'batch', 'ch', 'prec', 'ckpt', 'pass', 'G fwd vol/s', 'D f+b vol/s', 'bare f+b vol/s', 'step vol/s',
            'step/bare', 'peak GB', 'GB/volume']
    rows = []
    for r in results:
        if 'error' in r:
            rows.append(['x'.join(map(str, _shape(r['res']))), r['batch'], r['channels'], r['precision'],
                         r['checkpointing'], r.get('pass_form', 'auto'), 'error: ' + r['error'][:60]] + [''] * 6)
            continue

        def f(key, fmt='{:.3f}'):
            return fmt.format(r[key]) if key in r else '-'
        peak = r.get('peak_gb', r.get('batch_rss_gb'))
        rows.append(['x'.join(map(str, r['shape'])), r['batch'], r['channels'], r['precision'], r['checkpointing'],
                     r.get('pass_form', '-'), f('G_fwd_vol_per_s'), f('D_fwd_bwd_vol_per_s'), f('bare_fwd_bwd_vol_per_s'), f('step_vol_per_s'),
                     f('step_over_bare', '{:.2f}x'), f'{peak:.3f}', f('per_volume_gb')])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ['  '.join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines += ['  '.join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--res', default='16,32,64', help='Volume sides or DxHxW shapes, comma-separated')
    parser.add_argument('--batch', default='2', help='Batch sizes, comma-separated')
    parser.add_argument('--channels', type=int, default=7, help='Volume channels (4 modalities + 3 label channels)')
    parser.add_argument('--cond', type=int, default=2, help='Label dimension (0 = unconditional)')
    parser.add_argument('--precision', default=None, help='fp32, fp16, bf16 (comma-separated) [default: fp16 on CUDA, fp32 on CPU]')
    parser.add_argument('--checkpointing', default='0', help='0, 1 or 0,1')
    parser.add_argument('--cbase', type=int, default=4096, help='channel_base (the vol32-vol128 presets)')
    parser.add_argument('--cmax', type=int, default=256, help='channel_max (the vol presets)')
    parser.add_argument('--iters', type=int, default=2, help='Timed iterations of each network task')
    parser.add_argument('--steps', type=int, default=STEPS,
                        help='Training steps averaged (16 = one R1 pass at its real share; fewer = quicker, R1 counts more)')
    parser.add_argument('--pass-form', default='auto',
                        help='3D filter passes: auto, depthwise, folded (comma-separated to compare; torch_utils/ops/upfirdn3d.py)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    add_bool_argument(parser, '--skip-timing', help='Only the peak memory of one full step (all phases)')
    parser.add_argument('--timeout', type=float, default=1800, help='Seconds per configuration')
    add_json_argument(parser, default='bench3d.json', help='JSON results')
    add_bool_argument(parser, '--dry-run', '--tiny', help='One tiny configuration (8^3, batch 2), in seconds')
    parser.add_argument('--one', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        with open(args.one) as f:
            print(json.dumps(run_one(json.load(f))))
        return None
    if args.precision is None:
        args.precision = 'fp16' if args.device == 'cuda' else 'fp32'
    if args.device == 'cpu' and args.precision != 'fp32':
        parser.error(f'--precision {args.precision}: reduced precision is measured on CUDA only (on a CPU the networks '
                     f'run those blocks in float32)')
    forms = args.pass_form.split(',')
    for form in forms:
        if form not in ('auto', 'depthwise', 'folded'):
            parser.error(f'--pass-form: unknown form {form!r} (auto, depthwise, folded)')
    if args.dry_run:
        args.res, args.batch, args.channels, args.cbase, args.cmax, args.iters = '8', '2', 2, 64, 8, 1
    configs = [dict(res=res, batch=int(b), channels=args.channels, c_dim=args.cond, precision=prec,
                    checkpointing=int(ck), cbase=args.cbase, cmax=args.cmax, iters=args.iters, device=args.device,
                    skip_timing=args.skip_timing, steps=2 if args.dry_run else args.steps, pass_form=form)
               for res, b, prec, ck, form in itertools.product(args.res.split(','), args.batch.split(','),
                                                               args.precision.split(','), args.checkpointing.split(','),
                                                               forms)]
    results = []
    t0 = time.time()
    for i, cfg in enumerate(configs):
        print(f'[{i + 1}/{len(configs)}] {cfg["res"]} batch {cfg["batch"]} {cfg["precision"]} ckpt {cfg["checkpointing"]} '
              f'passes {cfg["pass_form"]} ({time.time() - t0:.0f} s so far)', file=sys.stderr, flush=True)
        # --dry-run stays in this process (a smoke test of every task); real runs get a fresh process each.
        results.append(run_one(cfg) if args.dry_run else _fresh_process(cfg, args.timeout))
    machine = (torch.cuda.get_device_name() if args.device == 'cuda' else
               f'{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} '
               f'threads {torch.get_num_threads()}')
    report = dict(machine=machine, argv=sys.argv[1:] if argv is None else argv, results=results)
    print(f'Machine: {machine}')
    print(_table(results))
    directory = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(directory, exist_ok=True)
    with dnnlib.atomic_output(args.json, suffix='.json') as tmp, open(tmp, 'w') as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == '__main__':
    main()
