"""Generate images from a trained snapshot, by class name.

Examples:
  python generate.py --network runs/00000-x/network-snapshot-000200000.pt --seeds 0-3 --class axial --outdir out
  python generate.py --network runs/00000-x --seeds 0-7 --class all --outdir out          # newest snapshot, grid
  python generate.py --network net.pt --seeds 0 --class axial,t2w --format png16 --outdir out
  python generate.py --network stylegan2-ada-network.pkl --seeds 0-3 --outdir out   # NVlabs pickle, no code run

Single-channel images become grey PNGs (8- or 16-bit); multi-channel archives (modalities, tumour labels)
give one image per channel, the decoded BraTS label map (a palette PNG: pixel values are the labels 0-3, shown in
the colours of training.grids.LABEL_COLOURS) and a colour overlay, plus an ``.npy`` of the stack. A status line
shows images done, rate and time left.
A volume snapshot writes NIfTI per modality and the tumour labels, and a three-plane montage per seed
(mri/volume_output.py, docs/volumes.md):
  python generate.py --network runs/00001-vol --seeds 0-3 --class ssa --outdir out --native-grid
"""

import os

import click
import numpy as np
import PIL.Image

import dnnlib
from training.cli import PATH, bool_option, resolve_network
from training.grids import LABEL_COLOURS, overlay
from training.labels import ClassSpecError, all_classes, parse_class


def label_png(seg: np.ndarray) -> PIL.Image.Image:
    """[H,W] labels 0-3 as a palette ('P') image: the pixel values stay the labels, viewers show the colours."""
    image = PIL.Image.fromarray(seg.astype(np.uint8), 'P')
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(LABEL_COLOURS)] = LABEL_COLOURS  # NETC red, SNFH green, ET yellow
    image.putpalette(palette.ravel().tolist())
    return image


def _write_png(array, path, bit_depth):
    """[H,W] grey or [H,W,3] RGB from [-1,1] floats; written atomically."""
    x = (np.asarray(array, dtype=np.float64) + 1) / 2
    if bit_depth == 16 and x.ndim == 2:
        image = PIL.Image.fromarray(np.rint(x.clip(0, 1) * 65535).astype(np.uint16))
    else:
        image = PIL.Image.fromarray(np.rint(x.clip(0, 1) * 255).astype(np.uint8), 'RGB' if x.ndim == 3 else 'L')
    _save_image(image, path)


def _save_image(image, path):
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        image.save(tmp)


def _save_npy(array, path):
    with dnnlib.atomic_output(path, suffix='.npy') as tmp:
        np.save(tmp, array)


def write_outputs(img_chw: np.ndarray, channels: list, stem: str, fmt: str) -> list:
    """Write one generated image [C,H,W] in [-1,1]; returns the paths written."""
    from mri.seg import SEG_CHANNELS, decode_seg
    written = []
    if fmt == 'npy':
        _save_npy(img_chw.astype(np.float32), stem + '.npy')
        return [stem + '.npy']
    bits = 16 if fmt == 'png16' else 8
    names = list(channels) if channels and len(channels) == img_chw.shape[0] else [f'ch{i}' for i in range(img_chw.shape[0])]
    if img_chw.shape[0] == 1:
        _write_png(img_chw[0], stem + '.png', bits)
        return [stem + '.png']
    if names == ['red', 'green', 'blue']:
        _write_png(img_chw.transpose(1, 2, 0), stem + '.png', 8)
        return [stem + '.png']
    for name, chan in zip(names, img_chw):
        if name in SEG_CHANNELS:
            continue
        written.append(f'{stem}-{name}.png')
        _write_png(chan, written[-1], bits)
    if all(s in names for s in SEG_CHANNELS):
        seg = decode_seg(img_chw[[names.index(s) for s in SEG_CHANNELS]], axis=0).astype(np.uint8)
        written.append(f'{stem}-seg.png')
        _save_image(label_png(seg), written[-1])  # BraTS values 0-3, exact, with a palette
        anatomy = [n for n in ('t2f', 't1c', 't2w', 't1n') if n in names] or [n for n in names if n not in SEG_CHANNELS]
        if anatomy:
            base = np.rint((img_chw[names.index(anatomy[0])] + 1) * 127.5).clip(0, 255).astype(np.uint8)
            written.append(f'{stem}-overlay.png')
            _save_image(PIL.Image.fromarray(overlay(base, seg), 'RGB'), written[-1])
    written.append(stem + '.npy')
    _save_npy(img_chw.astype(np.float32), written[-1])
    return written


def generate_images(
    network: str,                   # Snapshot path or run dir.
    seeds: list,                    # Seeds, one image per seed (per class for class_spec='all').
    outdir: str,                    # Output folder.
    class_spec: str = None,         # Class name(s), index, 'all', or None for unconditional networks.
    truncation_psi: float = 1.0,    # Truncation; 1 = none.
    noise_mode: str = 'const',      # 'const', 'random' or 'none'.
    fmt: str = None,                # 'png', 'png16', 'npy' or 'nifti'; None = png (slices) or nifti (volumes).
    device: str = None,             # None = cuda when available.
    verbose: bool = True,
    native_grid: bool = False,      # Volumes: NIfTI on the original BraTS grid (mri.volume_space).
) -> list:
    import torch
    from torch_utils import snapshot
    from training.grids import save_image_grid

    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    data = snapshot.load_snapshot(resolve_network(network), device=device)
    G = data.G_ema if data.G_ema is not None else data.G
    if G is None:
        raise snapshot.SnapshotError(f'{network}: holds no generator')
    desc = data.dataset or {}
    label_names = list(desc.get('label_names') or [f'class{i}' for i in range(G.c_dim)])[:G.c_dim] if G.c_dim else []
    label_groups = desc.get('label_groups') or None
    channels = desc.get('channels') or []
    from mri.volume_output import VolumeOutputError, generate_volumes, snapshot_kind
    if snapshot_kind(desc) == 'volumes':  # 3D: NIfTI per modality and labels, three-plane montages (docs/volumes.md)
        if fmt not in (None, 'nifti', 'npy'):
            raise VolumeOutputError(f'--format {fmt}: {network} is a volume snapshot; use --format nifti (its default) or npy')
        return generate_volumes(G, desc, seeds, outdir, class_spec, truncation_psi, noise_mode, fmt or 'nifti',
                                native_grid, device, verbose)
    if fmt == 'nifti' or native_grid:
        raise VolumeOutputError(f'{"--native-grid" if native_grid else "--format nifti"}: {network} is a 2D (slices) '
                                f'snapshot; NIfTI output needs a volume snapshot (dataset_tool.py --kind volumes)')
    fmt = fmt or 'png'
    os.makedirs(outdir, exist_ok=True)

    def run(seed, label):
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).to(device=device, dtype=torch.float32)
        c = torch.from_numpy(label[None]).to(device)
        with torch.no_grad():
            return G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)[0].float().cpu().numpy()

    written = []
    if class_spec == 'all':
        if G.c_dim == 0:
            raise ClassSpecError('--class all: this network is unconditional')
        classes = all_classes(label_names, label_groups)
        jobs = [(seed, label, f'seed{seed:04d}-{name.replace(",", "-")}') for name, label in classes for seed in seeds]
    else:
        label = parse_class(class_spec, label_names, label_groups)
        jobs = [(seed, label, f'seed{seed:04d}') for seed in seeds]
    bar = dnnlib.ProgressBar(len(jobs), desc='Generating', unit='images', enabled=verbose)
    rows = []
    for done, (seed, label, stem) in enumerate(jobs, start=1):
        rows.append(run(seed, label))
        written += write_outputs(rows[-1], channels, os.path.join(outdir, stem), fmt)
        bar.update(done=done, tail=stem)
    bar.close()
    if class_spec == 'all':
        grid = os.path.join(outdir, 'class_grid.png')
        save_image_grid(np.stack(rows), grid, drange=[-1, 1], grid_size=(len(seeds), len(classes)), channels=channels,
                        row_labels=[name for name, _ in classes])
        written.append(grid)
        if verbose:
            print(f'Rows of {grid} (named in its left margin): ' + ' | '.join(name for name, _ in classes))
    return written


@click.command()
@click.option('--network', 'network',   help='Snapshot .pt, NVlabs .pkl, or run dir (newest snapshot)', metavar='PATH', type=PATH, required=True)
@click.option('--seeds',                help='Seeds, e.g. 0-3,7', metavar='LIST', type=str, required=True)
@click.option('--trunc', 'truncation_psi', help='Truncation psi', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--class', 'class_spec',  help='Class: name(s) one per group (axial,t2w), index (one label group only), or all', metavar='NAME|IDX|all', type=str)
@click.option('--noise-mode',           help='Noise mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True)
@click.option('--outdir',               help='Where to save the output images', metavar='DIR', type=PATH, required=True)
@click.option('--format', 'fmt',        help='Output format [default: png; nifti for volumes]', type=click.Choice(['png', 'png16', 'npy', 'nifti']))
@bool_option('--native-grid',           help='Volumes: NIfTI on the original BraTS grid (240x240x155)')
@bool_option('--allow-pickle',         help='Deprecated, ignored: .pkl files load without running code', hidden=True)
@click.option('--device',               help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
def main(network, seeds, truncation_psi, class_spec, noise_mode, outdir, fmt, native_grid, allow_pickle, device):
    """Generate images by class from a trained network."""
    from torch_utils.snapshot import SnapshotError, warn_allow_pickle
    from mri.volume_output import VolumeOutputError
    if allow_pickle:
        warn_allow_pickle()
    try:
        seed_list = dnnlib.parse_range(seeds)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--seeds') from None
    try:
        generate_images(network, seed_list, outdir, class_spec, truncation_psi, noise_mode, fmt, device=device,
                        native_grid=native_grid)
    except (ClassSpecError, SnapshotError, VolumeOutputError) as err:
        raise click.ClickException(str(err)) from None


if __name__ == '__main__':
    main()
