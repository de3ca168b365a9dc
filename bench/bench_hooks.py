"""Cost of the training hooks' rules (docs/hooks.md), each against its baseline in the same run.

  - top-k G phase: batch-level top-k (a no-grad scoring pass over the whole batch, then the gradient pass
    replayed round by round) against the plain Gmain phase, same networks, batch and rounds;
  - attention: forward+backward of one SelfAttention layer on an image (--attn-dims 2) or a volume
    (--attn-dims 3), fused kernel (scaled_dot_product_attention) against the math path (matmul + softmax, what
    R1 / path length need), time and, on CUDA, peak memory.

Implementations are interleaved round by round and each keeps its best round, so ratios hold on a shared,
noisy machine. Prints a table and writes JSON.

Example:
    python bench/bench_hooks.py --device cpu --res 32 --batch 8 --batch-gpu 4 --rounds 3 --json hooks.json
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.attention import SelfAttention  # noqa: E402
from training import networks  # noqa: E402
from training.cli import add_json_argument  # noqa: E402
from training.loss import StyleGAN2Loss  # noqa: E402


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _best_of(fns: dict, rounds: int, device) -> dict:
    """{name: (best seconds, peak bytes or None)} with the functions interleaved round by round."""
    best = {name: (float('inf'), None) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
            if seconds < best[name][0]:
                best[name] = (seconds, peak)
    return best


def bench_topk(device, res, batch, batch_gpu, rounds):
    torch.manual_seed(0)
    kw = dict(channel_base=4096, channel_max=128, num_fp16_res=0, conv_clamp=None)
    G = networks.Generator(z_dim=64, c_dim=0, w_dim=64, img_resolution=res, img_channels=1,
                           mapping_kwargs=dict(num_layers=2), **kw).to(device)
    D = networks.Discriminator(c_dim=0, img_resolution=res, img_channels=1, **kw).to(device).requires_grad_(False)
    z = torch.randn([batch, 64], device=device)
    c = torch.zeros([batch, 0], device=device)
    phase_rounds = [(None, None, zz, cc) for zz, cc in zip(z.split(batch_gpu), c.split(batch_gpu))]
    losses = {
        'plain Gmain': StyleGAN2Loss(device=device, G=G, D=D, pl_weight=0, r1_gamma=0),
        'top-k Gmain': StyleGAN2Loss(device=device, G=G, D=D, pl_weight=0, r1_gamma=0, dataset_size=batch,
                                     topk_kwargs=dict(class_name='training.topk.TopK', gamma=0.5, min_frac=0.5)),
    }

    def run(loss):
        def fn():
            G.zero_grad(set_to_none=True)
            loss.accumulate_phase('Gmain', phase_rounds, gain=1 / len(phase_rounds), cur_nimg=batch)
        return fn
    return _best_of({name: run(loss) for name, loss in losses.items()}, rounds, device)


def bench_attention(device, res, batch, channels, rounds, dims=2):
    torch.manual_seed(0)
    fused = SelfAttention(channels=channels, resolution=res).to(device)
    math_path = SelfAttention(channels=channels, resolution=res, fused=False).to(device)
    math_path.load_state_dict(fused.state_dict())
    for layer in (fused, math_path):
        with torch.no_grad():
            layer.gain.fill_(0.5)
    x = torch.randn([batch, channels] + [res] * dims, device=device, requires_grad=True)

    def run(layer):
        def fn():
            layer(x).square().mean().backward()
        return fn
    return _best_of({'attention fused': run(fused), 'attention math': run(math_path)}, rounds, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--res', type=int, default=32, help='Image resolution of the top-k networks')
    parser.add_argument('--batch', type=int, default=8, help='Batch of the G phase')
    parser.add_argument('--batch-gpu', type=int, default=4, help='Round size (accumulation)')
    parser.add_argument('--attn-res', type=int, default=32, help='Feature-map side of the attention layer')
    parser.add_argument('--attn-dims', type=int, default=2, choices=[2, 3], help='Spatial dims of the attention input')
    parser.add_argument('--attn-batch', type=int, default=8)
    parser.add_argument('--attn-channels', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--machine', default=None, help='Machine name for the table [default: platform]')
    add_json_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = args.machine or (torch.cuda.get_device_name(device) if device.type == 'cuda' else
                               f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs')

    results = {}
    results.update(bench_topk(device, args.res, args.batch, args.batch_gpu, args.rounds))
    results.update(bench_attention(device, args.attn_res, args.attn_batch, args.attn_channels, args.rounds,
                                   args.attn_dims))
    rows = []
    for base, other in [('plain Gmain', 'top-k Gmain'), ('attention math', 'attention fused')]:
        for name in (base, other):
            seconds, peak = results[name]
            ratio = seconds / results[base][0]
            rows.append(dict(task=name, seconds=seconds, ratio_to_baseline=ratio,
                             peak_mib=None if peak is None else peak / 2 ** 20))
    print(f'machine: {machine}; torch {torch.__version__}; device {device}')
    print(f'{"task":<18} {"seconds":>9} {"x baseline":>10} {"peak MiB":>9}')
    for r in rows:
        peak = '-' if r['peak_mib'] is None else f'{r["peak_mib"]:.0f}'
        print(f'{r["task"]:<18} {r["seconds"]:>9.4f} {r["ratio_to_baseline"]:>10.2f} {peak:>9}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=machine, torch=torch.__version__, device=str(device), args=vars(args), rows=rows), f,
                      indent=2)


if __name__ == '__main__':
    main()
