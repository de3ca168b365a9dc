"""Benchmark the reference and CUDA-plugin paths of upfirdn2d and bias_act (StyleGAN2's fused ops).

    python bench/bench_ops.py --json bench_ops.json [--device cuda] [--repeat 20]

Prints a table (milliseconds per forward and forward+backward) and writes the rows as JSON. Plugin rows are
skipped where there is no CUDA device or the plugin does not build (the reason is recorded).
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_utils.ops import bias_act, upfirdn2d  # noqa: E402
from training.cli import json_option  # noqa: E402

UPFIRDN_CASES = [
    # name, shape [N, C, H, W], op
    ('filter2d', (4, 256, 32, 32), 'filter'),
    ('upsample2d', (4, 3, 256, 256), 'up'),
    ('upsample2d', (4, 128, 64, 64), 'up'),
    ('downsample2d', (4, 128, 64, 64), 'down'),
    ('downsample2d', (4, 64, 128, 128), 'down'),
]
BIAS_ACT_CASES = [
    ('lrelu', (4, 512, 16, 16)),
    ('lrelu', (4, 128, 128, 128)),
    ('swish', (4, 128, 64, 64)),
    ('linear', (64, 512)),
]


def _time(fn, device, repeat):
    """Median milliseconds of fn() over `repeat` runs after warm-up; synchronises CUDA around each run."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1000


def _upfirdn_fn(op, x, f, impl):
    if op == 'filter':
        return lambda: upfirdn2d.filter2d(x, f, impl=impl)
    if op == 'up':
        return lambda: upfirdn2d.upsample2d(x, f, impl=impl)
    return lambda: upfirdn2d.downsample2d(x, f, impl=impl)


def run_benchmarks(device, dtype, repeat, progress=print):
    rows = []
    impls = ['ref']
    plugin_note = None
    if device.type == 'cuda':
        impls.append('cuda')
    else:
        plugin_note = 'no CUDA device'
    for name, shape, op in UPFIRDN_CASES:
        x = torch.randn(shape, device=device, dtype=dtype)
        f = upfirdn2d.setup_filter([1, 3, 3, 1], device=device)
        for impl in impls:
            if impl == 'cuda' and upfirdn2d._plugin.get() is None:
                plugin_note = upfirdn2d._plugin.failure
                continue
            fwd = _time(_upfirdn_fn(op, x, f, impl), device, repeat)
            xg = x.detach().requires_grad_(True)
            fn = _upfirdn_fn(op, xg, f, impl)

            def fwd_bwd(fn=fn, xg=xg):
                y = fn()
                torch.autograd.grad(y, xg, torch.ones_like(y))
            both = _time(fwd_bwd, device, repeat)
            rows.append(dict(op='upfirdn2d', case=name, shape=list(shape), impl=impl, fwd_ms=fwd, fwd_bwd_ms=both))
            progress(rows[-1])
    for act, shape in BIAS_ACT_CASES:
        x = torch.randn(shape, device=device, dtype=dtype)
        b = torch.randn(shape[1], device=device, dtype=dtype)
        for impl in impls:
            if impl == 'cuda' and bias_act._plugin.get() is None:
                plugin_note = bias_act._plugin.failure
                continue
            fwd = _time(lambda: bias_act.bias_act(x, b, act=act, clamp=256, impl=impl), device, repeat)
            xg = x.detach().requires_grad_(True)

            def fwd_bwd(xg=xg, impl=impl, act=act):
                y = bias_act.bias_act(xg, b, act=act, clamp=256, impl=impl)
                torch.autograd.grad(y, xg, torch.ones_like(y))
            both = _time(fwd_bwd, device, repeat)
            rows.append(dict(op='bias_act', case=act, shape=list(shape), impl=impl, fwd_ms=fwd, fwd_bwd_ms=both))
            progress(rows[-1])
    return rows, plugin_note


@click.command()
@json_option(default='bench_ops.json', help='JSON file for the rows')
@click.option('--device', metavar='DEV',  type=str, default=None, help='cpu or cuda  [default: cuda if available]')
@click.option('--dtype',  metavar='TYPE', type=click.Choice(['float32', 'float16']), default='float32', show_default=True, help='Tensor dtype')
@click.option('--repeat', metavar='INT',  type=click.IntRange(min=1), default=10, show_default=True, help='Timed runs per row (median reported)')
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), default=None, help='torch CPU threads')
def main(json_path, device, dtype, repeat, threads):
    """Time reference vs plugin for upfirdn2d and bias_act."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    dtype = getattr(torch, dtype)

    def progress(row):
        print(f'  {row["op"]:<10} {row["case"]:<13} {str(tuple(row["shape"])):<20} {row["impl"]:<5} '
              f'fwd {row["fwd_ms"]:9.3f} ms   fwd+bwd {row["fwd_bwd_ms"]:9.3f} ms', flush=True)

    print(f'device={device} dtype={dtype} repeat={repeat} torch={torch.__version__} threads={torch.get_num_threads()}')
    rows, plugin_note = run_benchmarks(device, dtype, repeat, progress)
    if plugin_note:
        print(f'plugin rows skipped: {plugin_note}')
    # Speed-up of the plugin over the reference, where both ran.
    ref = {(r['op'], r['case'], tuple(r['shape'])): r for r in rows if r['impl'] == 'ref'}
    for r in rows:
        if r['impl'] == 'cuda':
            base = ref[(r['op'], r['case'], tuple(r['shape']))]
            r['speedup_fwd'] = base['fwd_ms'] / r['fwd_ms']
            r['speedup_fwd_bwd'] = base['fwd_bwd_ms'] / r['fwd_bwd_ms']
            print(f'  speed-up {r["op"]:<10} {r["case"]:<13} {str(tuple(r["shape"])):<20} '
                  f'fwd x{r["speedup_fwd"]:.2f}  fwd+bwd x{r["speedup_fwd_bwd"]:.2f}')
    result = dict(device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
                  dtype=str(dtype), torch=torch.__version__, repeat=repeat, plugin_note=plugin_note, rows=rows)
    out_path = json_path
    tmp = out_path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out_path)
    print(f'wrote {out_path}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
