"""Benchmark: metrics evaluated together (one pass of the reals, one set of generated features where sizes agree)
against the same metrics evaluated one by one, in the same run, on the same archive, generator and detector.

    python bench/bench_metric_sharing.py                                   # fid10k_full,kid10k_full,fid_per_class
    python bench/bench_metric_sharing.py --reals 1200 --num-gen 500 --json sharing.json

The archive is a zip of 16-bit PNG slices with three plane labels (the dataset_tool.py layout), the generator is a
small training.networks.Generator, and the detector a random-weights TorchScript stand-in for Inception
(``--features``, 2048 like Inception): its numbers mean nothing, but the work per image (load, decode, generate,
detect) is the metric's; FID's matrix square roots (two 2048x2048 eigendecompositions per FID) are the same
either way.
"Cold" starts with an empty statistics cache (a new archive, or calc_metrics.py's first run); "warm" repeats the
evaluation with the cache that run left (every later snapshot of a training run).
"""

import io
import json
import os
import sys
import tempfile
import time
import zipfile

import click
import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.cli import PATH  # noqa: E402

PLANES = ('axial', 'coronal', 'sagittal')


def write_archive(path: str, num: int, res: int, seed: int = 0) -> str:
    """``num`` smooth random 16-bit slices, plane labels in turn, as an uncompressed zip."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:res, :res] / res
    labels = []
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for i in range(num):
            plane = i % len(PLANES)
            img = 0.5 + 0.25 * np.sin(5 * xx * (plane + 1) + rng.randn()) * np.cos(4 * yy + rng.randn())
            img = np.clip(img + 0.05 * rng.randn(res, res), 0, 1)
            buf = io.BytesIO()
            PIL.Image.fromarray(np.rint(img * 65535).astype(np.uint16)).save(buf, format='PNG')
            name = f'{i:05d}.png'
            z.writestr(name, buf.getvalue())
            labels.append([name, [float(j == plane) for j in range(len(PLANES))]])
        meta = dict(labels=labels, label_names=list(PLANES), label_groups=[dict(name='plane', values=list(PLANES))],
                    channels=['t2w'], kind='slices')
        z.writestr('dataset.json', json.dumps(meta))
    return path


def make_detector(path: str, features: int) -> str:
    """A random-weights TorchScript stand-in for Inception: NVIDIA's calling convention, ``features`` outputs."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)
            self.fc = torch.nn.Linear(16, features)

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = torch.nn.functional.interpolate(img.float() / 127.5 - 1, size=(64, 64), mode='bilinear', align_corners=False)
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.jit.script(Tiny().eval()).save(path)
    return path


def make_generator(res: int):
    import torch
    from training.networks import Generator
    torch.manual_seed(0)
    return Generator(z_dim=64, c_dim=len(PLANES), w_dim=64, img_resolution=res, img_channels=1,
                     mapping_kwargs=dict(num_layers=2), channel_base=1024, channel_max=64, num_fp16_res=0).eval()


def evaluate(metrics: list, share: bool, kwargs: dict, cache_dir: str) -> dict:
    """Seconds and images through the detector for one evaluation of ``metrics``."""
    from metrics import detectors
    from metrics import metric_main
    os.environ['MRI_GAN_CACHE'] = cache_dir
    counted = dict(images=0)
    features = detectors.Detector.features

    def counting(self, images):
        counted['images'] += int(images.shape[0])
        return features(self, images)
    detectors.Detector.features = counting
    try:
        start = time.perf_counter()
        results = metric_main.calc_metrics(metrics, share=share, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        detectors.Detector.features = features
    return dict(seconds=seconds, detector_images=counted['images'],
                results={r.metric: r.results[r.metric] for r in results})


@click.command()
@click.option('--metrics', 'metric_list', help='Metrics evaluated together', metavar='LIST',
              default='fid10k_full,kid10k_full,fid_per_class', show_default=True)
@click.option('--reals',     help='Slices in the archive', metavar='INT', type=click.IntRange(min=6), default=900, show_default=True)
@click.option('--res',       help='Slice side (pixels)', metavar='INT', type=click.IntRange(min=8), default=64, show_default=True)
@click.option('--num-gen',   help='Generated images per metric (overrides 10k)', metavar='INT', type=click.IntRange(min=2),
              default=300, show_default=True)
@click.option('--batch',     help='Images per step', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--workers',   help='DataLoader workers', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)
@click.option('--threads',   help='torch CPU threads', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--features',  help='Detector features (Inception: 2048)', metavar='INT', type=click.IntRange(min=2), default=2048,
              show_default=True)
@click.option('--json', 'json_path', help='Also write the results here', metavar='PATH', type=PATH)
def main(metric_list, reals, res, num_gen, batch, workers, threads, features, json_path):
    """Time metrics evaluated together against one by one (CPU)."""
    import torch
    torch.set_num_threads(threads)
    metrics = [m.strip() for m in metric_list.split(',') if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_archive(os.path.join(tmp, 'slices.zip'), reals, res)
        kwargs = dict(G=make_generator(res), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data,
                                                                  use_labels=True),
                      device='cpu', detector_url=make_detector(os.path.join(tmp, 'detector.pt'), features), num_gen=num_gen,
                      batch_size=batch, num_workers=workers)
        evaluate(metrics[:1], False, dict(kwargs, num_gen=2 * batch), os.path.join(tmp, 'warmup'))  # Load, JIT, page cache.
        rows = []
        for cache in ('cold', 'warm'):
            for share in (False, True):
                cache_dir = os.path.join(tmp, f'cache-{"shared" if share else "separate"}')
                row = evaluate(metrics, share, kwargs, cache_dir)
                rows.append(dict(cache=cache, mode='together' if share else 'one by one', **row))
                print(f'{cache:5s} {rows[-1]["mode"]:11s} {row["seconds"]:7.1f} s  {row["detector_images"]} images', flush=True)
    for cache in ('cold', 'warm'):
        base, shared = [r for r in rows if r['cache'] == cache]
        shared['speedup'] = base['seconds'] / shared['seconds']
        for name, value in base['results'].items():
            assert abs(shared['results'][name] - value) <= 1e-4 * max(1.0, abs(value)), (name, value, shared['results'][name])

    machine = f'{os.cpu_count()}-core CPU, torch {torch.__version__}, {threads} threads'
    print(f'{",".join(metrics)}: {reals} slices {res}x{res}, {num_gen} generated per metric, batch {batch}, '
          f'{features} detector features; {machine}')
    print(f'| cache | evaluation | seconds | images through the detector | speed-up |')
    print(f'|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["cache"]} | {r["mode"]} | {r["seconds"]:.1f} | {r["detector_images"]} | '
              f'{r["speedup"]:.2f}x |' if 'speedup' in r else
              f'| {r["cache"]} | {r["mode"]} | {r["seconds"]:.1f} | {r["detector_images"]} | 1 (baseline) |')
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(dict(metrics=metrics, reals=reals, res=res, num_gen=num_gen, batch=batch, features=features,
                           machine=machine, rows=rows), f, indent=2)


if __name__ == '__main__':
    main()
