"""Throughput of the StyleGAN2 networks (training.networks) against a plain rendition of the reference design.

Measures images/second of
  - G forward: inference (eval mode, no grad, const noise), as generate.py and the metrics run G_ema;
  - D forward+backward: D(reals).sum().backward();
  - G+D main step: one minibatch of the loop (G non-saturating loss through a frozen D, backward, Adam; D loss
    on fakes and reals, backward, Adam);
  - R1 step: the lazy R1 pass (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN",
    Sec. 3.1) with conv2d_gradfix.no_weight_gradients, double backward, Adam;
  - training step: main step + R1 step / 16, the loop's rate with R1 every 16 minibatches.

With ``--baseline`` the same tasks run on ``Base*`` below: the StyleGAN2-ADA design written plainly
(demodulation coefficients from materialised per-sample weights [N,O,I,k,k]; modulated conv as a grouped
conv at inference and with scaled activations in training, as ADA chooses, or never grouped with
``--baseline-modconv unfused``; toRGB as a modulated conv like the others; the same torch_utils reference
ops; fp16 only on CUDA, like ours). Implementations are interleaved task by task and round by round and
each keeps its best round, so the ratio ours/baseline holds up on a shared, noisy machine.

Example:
    python bench/bench_networks.py --res 64 --channels 1 --cbase 16384 --cmax 256 --batch 8 \
        --device cpu --iters 2 --rounds 4 --baseline --json results.json
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils.ops import bias_act  # noqa: E402
from torch_utils.ops import conv2d_gradfix  # noqa: E402
from torch_utils.ops import conv2d_resample  # noqa: E402
from torch_utils.ops import upfirdn2d  # noqa: E402
from training import networks  # noqa: E402
from training.cli import add_bool_argument, add_json_argument  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Baseline: the reference StyleGAN2-ADA design, kept deliberately plain. Same parameters as ours (checked).


class BaseFC(torch.nn.Module):
    def __init__(self, fin, fout, act='linear', lr_mult=1.0, bias_init=0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([fout, fin]) / lr_mult)
        self.bias = torch.nn.Parameter(torch.full([fout], float(bias_init)))
        self.wg, self.bg, self.act = lr_mult / np.sqrt(fin), lr_mult, act

    def forward(self, x):
        x = x.matmul((self.weight * self.wg).t())
        return bias_act.bias_act(x, self.bias * self.bg, act=self.act)


class BaseConv(torch.nn.Module):
    def __init__(self, cin, cout, k, bias=True, act='linear', down=1, clamp=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([cout, cin, k, k]))
        self.bias = torch.nn.Parameter(torch.zeros([cout])) if bias else None
        self.register_buffer('f', upfirdn2d.setup_filter([1, 3, 3, 1]))
        self.wg, self.act, self.down, self.clamp = 1 / np.sqrt(cin * k * k), act, down, clamp

    def forward(self, x, gain=1.0):
        w = (self.weight * self.wg).to(x.dtype)
        x = conv2d_resample.conv2d_resample(x, w, f=self.f, down=self.down, padding=self.weight.shape[-1] // 2)
        g = bias_act.activation_funcs[self.act].def_gain * gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return bias_act.bias_act(x, b, act=self.act, gain=g, clamp=None if self.clamp is None else self.clamp * gain)


def base_modconv(x, weight, styles, noise, up, padding, f, demod, fused):
    """Modulated conv as ADA writes it: per-sample weights [N,O,I,k,k] give the demodulation coefficients."""
    N, I = styles.shape
    O = weight.shape[0]
    w = weight.unsqueeze(0) * styles.reshape(N, 1, I, 1, 1)
    d = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt() if demod else None
    if not fused:
        x = x * styles.to(x.dtype).reshape(N, I, 1, 1)
        x = conv2d_resample.conv2d_resample(x, weight.to(x.dtype), f=f, up=up, padding=padding, flip_weight=(up == 1))
        if d is not None:
            x = x * d.to(x.dtype).reshape(N, O, 1, 1)
        return x + noise.to(x.dtype) if noise is not None else x
    if d is not None:
        w = w * d.reshape(N, O, 1, 1, 1)
    x = x.reshape(1, N * I, *x.shape[2:])
    x = conv2d_resample.conv2d_resample(x, w.reshape(N * O, I, *weight.shape[2:]).to(x.dtype), f=f, up=up,
                                        padding=padding, groups=N, flip_weight=(up == 1))
    x = x.reshape(N, O, *x.shape[2:])
    return x + noise.to(x.dtype) if noise is not None else x


class BaseSynLayer(torch.nn.Module):
    def __init__(self, cin, cout, w_dim, res, up=1, clamp=None, k=3, rgb=False):
        super().__init__()
        self.affine = BaseFC(w_dim, cin, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([cout, cin, k, k]))
        self.bias = torch.nn.Parameter(torch.zeros([cout]))
        self.register_buffer('f', upfirdn2d.setup_filter([1, 3, 3, 1]))
        if not rgb:
            self.register_buffer('noise_const', torch.randn([res, res]))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.res, self.up, self.clamp, self.rgb, self.k = res, up, clamp, rgb, k

    def forward(self, x, w, fused, noise_mode):
        s = self.affine(w)
        if self.rgb:
            s = s * (1 / np.sqrt(self.weight[0].numel()))
            x = base_modconv(x, self.weight, s, None, 1, 0, self.f, demod=False, fused=fused)
            return bias_act.bias_act(x, self.bias.to(x.dtype), clamp=self.clamp)
        noise = None
        if noise_mode == 'random':
            noise = torch.randn([x.shape[0], 1, self.res, self.res], device=x.device) * self.noise_strength
        elif noise_mode == 'const':
            noise = self.noise_const * self.noise_strength
        x = base_modconv(x, self.weight, s, noise, self.up, self.k // 2, self.f, demod=True, fused=fused)
        return bias_act.bias_act(x, self.bias.to(x.dtype), act='lrelu', gain=np.sqrt(2), clamp=self.clamp)


class BaseG(torch.nn.Module):
    """Mapping (8 FC, lr 0.01) + skip synthesis, fused modconv at inference only (ADA's rule)."""

    def __init__(self, z_dim, w_dim, res, img_channels, cbase, cmax, map_layers, fp16_res, clamp, modconv='ada'):
        super().__init__()
        self.z_dim, self.w_dim = z_dim, w_dim
        self.modconv = modconv  # 'ada': grouped conv at inference, unfused in training; 'unfused': never grouped.
        for i in range(map_layers):
            setattr(self, f'fc{i}', BaseFC(z_dim if i == 0 else w_dim, w_dim, act='lrelu', lr_mult=0.01))
        self.map_layers = map_layers
        self.register_buffer('w_avg', torch.zeros([w_dim]))
        self.resolutions = [2 ** i for i in range(2, int(np.log2(res)) + 1)]
        ch = {r: min(cbase // r, cmax) for r in self.resolutions}
        fp16_from = max(2 ** (int(np.log2(res)) + 1 - fp16_res), 8)
        self.fp16 = {r: r >= fp16_from for r in self.resolutions}
        self.const = torch.nn.Parameter(torch.randn([ch[4], 4, 4]))
        self.register_buffer('f', upfirdn2d.setup_filter([1, 3, 3, 1]))
        for r in self.resolutions:
            if r > 4:
                setattr(self, f'conv0_{r}', BaseSynLayer(ch[r // 2], ch[r], w_dim, r, up=2, clamp=clamp))
            setattr(self, f'conv1_{r}', BaseSynLayer(ch[r], ch[r], w_dim, r, clamp=clamp))
            setattr(self, f'torgb_{r}', BaseSynLayer(ch[r], img_channels, w_dim, r, clamp=clamp, k=1, rgb=True))
        self.num_ws = 2 * len(self.resolutions)

    def forward(self, z, c, noise_mode='random'):
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        for i in range(self.map_layers):
            x = getattr(self, f'fc{i}')(x)
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        fused = (not self.training) and self.modconv == 'ada'
        img = None
        wi = 0
        for r in self.resolutions:
            dtype = torch.float16 if self.fp16[r] and z.device.type == 'cuda' else torch.float32
            block_fused = fused and dtype == torch.float32
            if r == 4:
                x = self.const.to(dtype).unsqueeze(0).repeat(z.shape[0], 1, 1, 1)
                x = self.conv1_4(x, ws[:, wi], block_fused, noise_mode)
                wi += 1
            else:
                x = getattr(self, f'conv0_{r}')(x.to(dtype), ws[:, wi], block_fused, noise_mode)
                x = getattr(self, f'conv1_{r}')(x, ws[:, wi + 1], block_fused, noise_mode)
                wi += 2
                img = upfirdn2d.upsample2d(img, self.f)
            y = getattr(self, f'torgb_{r}')(x, ws[:, wi], block_fused, noise_mode).float()
            img = y if img is None else img + y
        return img


class BaseD(torch.nn.Module):
    """Resnet discriminator with minibatch-std epilogue, as in StyleGAN2-ADA."""

    def __init__(self, res, img_channels, cbase, cmax, fp16_res, clamp, mbstd_group):
        super().__init__()
        self.resolutions = [2 ** i for i in range(int(np.log2(res)), 2, -1)]
        ch = {r: min(cbase // r, cmax) for r in self.resolutions + [4]}
        fp16_from = max(2 ** (int(np.log2(res)) + 1 - fp16_res), 8)
        self.fp16 = {r: r >= fp16_from for r in self.resolutions}
        self.fromrgb = BaseConv(img_channels, ch[res], 1, act='lrelu', clamp=clamp)
        for r in self.resolutions:
            setattr(self, f'conv0_{r}', BaseConv(ch[r], ch[r], 3, act='lrelu', clamp=clamp))
            setattr(self, f'conv1_{r}', BaseConv(ch[r], ch[r // 2], 3, act='lrelu', down=2, clamp=clamp))
            setattr(self, f'skip_{r}', BaseConv(ch[r], ch[r // 2], 1, bias=False, down=2))
        self.conv4 = BaseConv(ch[4] + 1, ch[4], 3, act='lrelu', clamp=clamp)
        self.fc = BaseFC(ch[4] * 16, ch[4], act='lrelu')
        self.out = BaseFC(ch[4], 1)
        self.mbstd_group = mbstd_group

    def forward(self, img, c):
        x = None
        for r in self.resolutions:
            dtype = torch.float16 if self.fp16[r] and img.device.type == 'cuda' else torch.float32
            x = self.fromrgb(img.to(dtype)) if x is None else x.to(dtype)
            y = getattr(self, f'skip_{r}')(x, gain=np.sqrt(0.5))
            x = getattr(self, f'conv0_{r}')(x)
            x = getattr(self, f'conv1_{r}')(x, gain=np.sqrt(0.5))
            x = y + x
        x = x.float()
        N, C, H, W = x.shape
        G = min(self.mbstd_group, N)
        y = x.reshape(G, -1, 1, C, H, W)
        y = ((y - y.mean(0)).square().mean(0) + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, 1, 1, 1).repeat(G, 1, H, W)
        x = self.conv4(torch.cat([x, y], 1))
        return self.out(self.fc(x.flatten(1)))

# ----------------------------------------------------------------------------------------------------------------
# Measurements.


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def make_tasks(G, D, args, device) -> dict:
    """Callables, one per measured task, each doing one iteration on its own copy of the inputs."""
    N = args.batch
    z = torch.randn([N, args.zdim], device=device)
    real = torch.randn([N, args.channels, args.res, args.res], device=device).clamp(-1, 1)
    opt_G = torch.optim.Adam(G.parameters(), lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    opt_D = torch.optim.Adam(D.parameters(), lr=0.0025, betas=(0.0, 0.99), eps=1e-8)
    softplus = torch.nn.functional.softplus

    def g_forward():
        G.eval().requires_grad_(False)  # Inference as generate.py and the metrics run it (G_ema).
        with torch.no_grad():
            G(z, None, noise_mode='const')

    def d_forward_backward():
        G.train()
        D.train().requires_grad_(True)
        D.zero_grad(set_to_none=True)
        D(real, None).sum().backward()

    def main_step():
        # G phase: non-saturating loss through a frozen D; then the D phase on fakes (no G graph) and reals.
        G.train().requires_grad_(True)
        D.train().requires_grad_(False)
        opt_G.zero_grad(set_to_none=True)
        softplus(-D(G(torch.randn_like(z), None), None)).mean().backward()
        opt_G.step()
        G.requires_grad_(False)
        D.requires_grad_(True)
        opt_D.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = G(torch.randn_like(z), None)
        softplus(D(fake, None)).mean().backward()
        softplus(-D(real, None)).mean().backward()
        opt_D.step()

    def r1_step(gamma=1.0, interval=16):
        # Lazy R1 (StyleGAN2, Sec. 3.1): its own pass and optimizer step, scaled by the interval.
        D.train().requires_grad_(True)
        opt_D.zero_grad(set_to_none=True)
        real_ = real.detach().requires_grad_(True)
        with conv2d_gradfix.no_weight_gradients():
            logits = D(real_, None)
            (grad,) = torch.autograd.grad(outputs=[logits.sum()], inputs=[real_], create_graph=True)
        (grad.square().sum([1, 2, 3]).mean() * (gamma / 2) * interval).backward()
        opt_D.step()

    return {'G forward': g_forward, 'D forward+backward': d_forward_backward, 'G+D main step': main_step,
            'R1 step': r1_step}


def time_task(fn, iters, device):
    """(wall seconds, process CPU seconds) per iteration of fn over iters calls."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - w0) / iters, (time.process_time() - c0) / iters


def measure_all(impls: dict, args, device) -> dict:
    """Interleave the implementations task by task and round by round; keep each one's best round.

    Taking the best of interleaved rounds makes the comparison robust to other load on the machine: both
    sides get the same chances of a quiet round. The CPU-time clock (process_time, all threads) is kept too:
    with --threads 1 it measures the work itself and hardly moves with other processes' load.
    Returns {impl: {task: {'wall': s, 'cpu': s}}}.
    """
    task_names = list(next(iter(impls.values())).keys())
    best = {name: {} for name in impls}
    for task in task_names:
        for name, tasks in impls.items():
            for _ in range(args.warmup):
                tasks[task]()
        for rnd in range(args.rounds):
            order = list(impls.items()) if rnd % 2 == 0 else list(impls.items())[::-1]  # No side always goes first.
            for name, tasks in order:
                iters = 1 if task == 'R1 step' else args.iters
                wall, cpu = time_task(tasks[task], iters, device)
                prev = best[name].get(task, dict(wall=float('inf'), cpu=float('inf')))
                best[name][task] = dict(wall=min(prev['wall'], wall), cpu=min(prev['cpu'], cpu))
            print(f'  {task}: round {rnd + 1}/{args.rounds} ' +
                  ' '.join(f"{n} {args.batch / best[n][task]['wall']:.2f} img/s" for n in impls),
                  file=sys.stderr, flush=True)
    for name in impls:
        # One training step = main step + 1/16 of an R1 step (R1 every 16 minibatches, as the loop runs it).
        main, r1 = best[name]['G+D main step'], best[name]['R1 step']
        best[name]['training step'] = {k: main[k] + r1[k] / 16 for k in ('wall', 'cpu')}
    return best


def build_ours(args, device):
    G = networks.Generator(z_dim=args.zdim, c_dim=0, w_dim=args.wdim, img_resolution=args.res,
                           img_channels=args.channels, mapping_kwargs=dict(num_layers=args.map),
                           channel_base=args.cbase, channel_max=args.cmax, num_fp16_res=args.fp16_res,
                           conv_clamp=args.clamp, architecture='skip')
    D = networks.Discriminator(c_dim=0, img_resolution=args.res, img_channels=args.channels, architecture='resnet',
                               channel_base=args.cbase, channel_max=args.cmax, num_fp16_res=args.fp16_res,
                               conv_clamp=args.clamp, epilogue_kwargs=dict(mbstd_group_size=min(4, args.batch)))
    return G.to(device), D.to(device)


def build_baseline(args, device):
    G = BaseG(args.zdim, args.wdim, args.res, args.channels, args.cbase, args.cmax, args.map, args.fp16_res, args.clamp,
              modconv=getattr(args, 'baseline_modconv', 'ada'))
    D = BaseD(args.res, args.channels, args.cbase, args.cmax, args.fp16_res, args.clamp, min(4, args.batch))
    return G.to(device), D.to(device)


def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        if names:
            cpu = names[0]
    except OSError:
        pass
    info = dict(cpu=cpu, torch=torch.__version__, threads=torch.get_num_threads(), device=str(device))
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def _count(module):
    return sum(p.numel() for p in module.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--res', type=int, default=64, metavar='INT', help='image resolution')
    parser.add_argument('--channels', type=int, default=1, metavar='INT', help='image channels')
    parser.add_argument('--cbase', type=int, default=16384, metavar='INT', help='channel_base')
    parser.add_argument('--cmax', type=int, default=256, metavar='INT', help='channel_max')
    parser.add_argument('--zdim', type=int, default=512, metavar='INT', help='z_dim')
    parser.add_argument('--wdim', type=int, default=512, metavar='INT', help='w_dim')
    parser.add_argument('--map', type=int, default=8, metavar='INT', help='mapping layers')
    parser.add_argument('--fp16-res', type=int, default=4, metavar='INT', help='num_fp16_res (fp16 only on CUDA)')
    parser.add_argument('--clamp', type=float, default=256, metavar='FLOAT', help='conv_clamp')
    parser.add_argument('--batch', type=int, default=8, metavar='INT', help='batch size')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu', help='where to run')
    parser.add_argument('--iters', type=int, default=2, metavar='INT', help='timed calls per task and round (R1: 1)')
    parser.add_argument('--rounds', type=int, default=4, metavar='INT', help='interleaved rounds; the best is kept')
    parser.add_argument('--warmup', type=int, default=1, metavar='INT', help='untimed iterations per task')
    parser.add_argument('--threads', type=int, default=None, metavar='INT', help='torch CPU threads (default: torch)')
    parser.add_argument('--plugins', choices=['on', 'off'], default='on',
                        help='CUDA plugins for upfirdn2d/bias_act (off: the PyTorch references; CPU always uses them)')
    add_bool_argument(parser, '--baseline', help='also measure the plain reference design')
    parser.add_argument('--baseline-modconv', choices=['ada', 'unfused'], default='ada',
                        help="baseline G: 'ada' = grouped conv at inference, unfused in training (ADA's rule); "
                             "'unfused' = never grouped")
    parser.add_argument('--seed', type=int, default=0, metavar='INT', help='random seed')
    add_json_argument(parser)
    args = parser.parse_args(argv)

    if args.device == 'cuda' and not torch.cuda.is_available():
        print('bench_networks: --device cuda but no CUDA device is available; skipping', file=sys.stderr)
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.plugins == 'off':
        upfirdn2d._plugin.disable('--plugins off')
        bias_act._plugin.disable('--plugins off')
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    info = machine_info(device)
    config = {k: v for k, v in vars(args).items() if k not in ('out',)}

    impls = {}
    params = {}
    builders = [('ours', build_ours)] + ([('baseline', build_baseline)] if args.baseline else [])
    for name, build in builders:
        torch.manual_seed(args.seed)
        G, D = build(args, device)
        params[name] = dict(G=_count(G), D=_count(D))
        print(f'[{name}] G {params[name]["G"]:,} params, D {params[name]["D"]:,} params', file=sys.stderr, flush=True)
        impls[name] = make_tasks(G, D, args, device)
    if args.baseline and params['ours'] != params['baseline']:
        print(f"bench_networks: warning: parameter counts differ: ours {params['ours']} vs "
              f"baseline {params['baseline']}", file=sys.stderr)
    secs = measure_all(impls, args, device)
    rows = {name: {task: dict(sec_per_iter=t['wall'], img_per_sec=args.batch / t['wall'], cpu_sec_per_iter=t['cpu'])
                   for task, t in secs[name].items()}
            for name in impls}
    for name in impls:
        rows[name]['params'] = params[name]

    tasks = ['G forward', 'D forward+backward', 'G+D main step', 'R1 step', 'training step']
    header = f"{'task':<20} {'ours img/s':>11}"
    if args.baseline:
        header += f" {'baseline img/s':>15} {'ours/base wall':>15} {'ours/base cpu':>14}"
    print(f"# {info['cpu'] if device.type == 'cpu' else info['gpu']} | torch {info['torch']} | "
          f"{info['threads']} threads | res {args.res} ch {args.channels} cbase {args.cbase} cmax {args.cmax} "
          f"batch {args.batch} iters {args.iters} x best of {args.rounds} rounds")
    print(header)
    print('-' * len(header))
    ratios = {}
    for task in tasks:
        line = f"{task:<20} {rows['ours'][task]['img_per_sec']:>11.2f}"
        if args.baseline:
            ratio = rows['ours'][task]['img_per_sec'] / rows['baseline'][task]['img_per_sec']
            ratio_cpu = rows['baseline'][task]['cpu_sec_per_iter'] / rows['ours'][task]['cpu_sec_per_iter']
            ratios[task] = dict(wall=ratio, cpu=ratio_cpu)
            line += f" {rows['baseline'][task]['img_per_sec']:>15.2f} {ratio:>15.2f} {ratio_cpu:>14.2f}"
        print(line)

    if args.json:
        plugins = {op: ('reference (CPU)' if device.type != 'cuda' else mod._plugin.failure or 'plugin')
                   for op, mod in (('upfirdn2d', upfirdn2d), ('bias_act', bias_act))}
        result = dict(machine=info, config=config, plugins=plugins, results=rows, ratio_ours_over_baseline=ratios)
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
        print(f'wrote {args.json}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
