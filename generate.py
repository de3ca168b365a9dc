"""Generate images from a trained snapshot, by class name.

Examples:
  python generate.py --network runs/00000-x/network-snapshot-000200000.pt --seeds 0-3 --class axial --outdir out
  python generate.py --network runs/00000-x --seeds 0-7 --class all --outdir out          # newest snapshot, grid
  python generate.py --network net.pt --seeds 0 --class axial,t2w --format png16 --outdir out
  python generate.py --network stylegan2-ada-network.pkl --seeds 0-3 --outdir out   # NVlabs pickle, no code run
  python generate.py --network paint.pt --insert-into cases/ --per-case 2 --labels-from cases/ --outdir out  # painting
  python generate.py --network paint.pt --insert-into cases/ --heal --outdir healed   # docs/painting.md

Single-channel images become grey PNGs (8- or 16-bit); multi-channel archives (modalities, tumour labels)
give one image per channel, the decoded BraTS label map (a palette PNG: pixel values are the labels 0-3, shown in
the colours of training.grids.LABEL_COLOURS) and a colour overlay, plus an ``.npy`` of the stack. A status line
shows images done, rate and time left.
A volume snapshot writes NIfTI per modality and the tumour labels, and a three-plane montage per seed
(mri.output.volumes.VolumeWriter, docs/volumes.md); one loop (generate_samples) serves both:
  python generate.py --network runs/00001-vol --seeds 0-3 --class ssa --outdir out --native-grid
"""

import os

import click
import numpy as np
import PIL.Image

import dnnlib
from torch_utils.label_channels import onehot_to_labelmap
from training.cli import PATH, bool_option, resolve_network
from training.grids import LABEL_COLOURS, overlay, split_label_channels
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
    from mri.seg import overlay_channel
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
    image_idx, label_idx = split_label_channels(names)
    for i in image_idx:
        written.append(f'{stem}-{names[i]}.png')
        _write_png(img_chw[i], written[-1], bits)
    if label_idx:
        seg = onehot_to_labelmap(img_chw[label_idx], threshold=0).astype(np.uint8)  # mri.seg.decode_seg's rule
        written.append(f'{stem}-seg.png')
        _save_image(label_png(seg), written[-1])  # BraTS values 0-3, exact, with a palette
        anatomy = overlay_channel(names)
        if anatomy is not None:
            base = np.rint((img_chw[names.index(anatomy)] + 1) * 127.5).clip(0, 255).astype(np.uint8)
            written.append(f'{stem}-overlay.png')
            _save_image(PIL.Image.fromarray(overlay(base, seg), 'RGB'), written[-1])
    written.append(stem + '.npy')
    _save_npy(img_chw.astype(np.float32), written[-1])
    return written


class ImageWriter:
    """Writes each generated image (generate_samples hands them over) as PNG/npy files (write_outputs), and with
    class_spec 'all' class_grid.png: a row per class, named in a left margin (training.grids.save_image_grid)."""

    unit = 'images'

    def __init__(
        self,
        outdir,             # output folder
        channels,           # channel names (the snapshot's dataset description)
        fmt='png',          # 'png', 'png16' or 'npy'
        verbose=True,
        class_grid=False,   # keep the images for finish()'s class grid (class_spec 'all'); else memory stays flat
    ):
        self.outdir, self.channels, self.fmt, self.verbose = outdir, channels, fmt, verbose
        self.samples = [] if class_grid else None  # the class grid's cells, in the order written

    def start(self, first):
        """Nothing to check on the first image [C,H,W] before anything is written."""

    def write(self, image, stem, class_name, class_values):
        """Writes one image; returns the paths written."""
        if self.samples is not None:
            self.samples.append(image)
        return write_outputs(image, self.channels, stem, self.fmt)

    def finish(self, classes):
        """class_grid.png (class_spec 'all'); returns the paths written."""
        from training.grids import save_image_grid
        grid = os.path.join(self.outdir, 'class_grid.png')
        save_image_grid(np.stack(self.samples), grid, drange=[-1, 1],
                        grid_size=(len(self.samples) // len(classes), len(classes)), channels=self.channels,
                        row_labels=[name for name, _, _ in classes])
        if self.verbose:
            print(f'Rows of {grid} (named in its left margin): ' + ' | '.join(name for name, _, _ in classes))
        return [grid]


def resolve_classes(G, desc, class_spec) -> list:
    """``[(name or None, label vector, [label names set])]``: every class for class_spec 'all' (a name each), else
    the one class asked for (name None)."""
    label_names = list(desc.get('label_names') or [f'class{i}' for i in range(G.c_dim)])[:G.c_dim] if G.c_dim else []
    label_groups = desc.get('label_groups') or None
    if class_spec == 'all':
        if G.c_dim == 0:
            raise ClassSpecError('--class all: this network is unconditional')
        return [(name, label, name.split(',')) for name, label in all_classes(label_names, label_groups)]
    label = parse_class(class_spec, label_names, label_groups)
    return [(None, label, [n for n, v in zip(label_names, label) if v])]


def generate_samples(
    G,                              # generator: (z, c) -> [N, C, H, W] or [N, C, D, H, W]
    seeds,                          # one sample per seed and class
    classes,                        # resolve_classes()
    writer,                         # ImageWriter or mri.output.volumes.VolumeWriter: start, write, finish, unit
    outdir,                         # output folder, made once the first sample passed writer.start
    truncation_psi=1.0,
    noise_mode='const',
    device='cpu',
    verbose=True,
    class_grid=False,               # finish with the writer's class grid (class_spec 'all')
) -> list:
    """The one seed/class loop of generation: z from each seed, every class for every seed (class-major), G, and the
    writer per sample (stem ``seedNNNN`` or ``seedNNNN-<class>``); returns the paths written."""
    import torch

    def run(seed, label):
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).to(device=device, dtype=torch.float32)
        c = torch.from_numpy(label[None]).to(device)
        with torch.no_grad():
            return G(z, c, truncation_psi=truncation_psi, noise_mode=noise_mode)[0].float().cpu().numpy()

    first = run(seeds[0], classes[0][1])
    writer.start(first)  # a writer refuses before the output folder exists
    os.makedirs(outdir, exist_ok=True)
    written = []
    bar = dnnlib.ProgressBar(len(seeds) * len(classes), desc='Generating', unit=writer.unit, enabled=verbose)
    for k, (name, label, values) in enumerate(classes):
        for j, seed in enumerate(seeds):
            sample = first if k == j == 0 else run(seed, label)
            stem = f'seed{seed:04d}' + (f'-{name.replace(",", "-")}' if name else '')
            written += writer.write(sample, os.path.join(outdir, stem), name, values)
            bar.update(done=k * len(seeds) + j + 1, tail=stem)
    bar.close()
    if class_grid:
        written += writer.finish(classes)
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
    """Generates images (PNG/npy) or volumes (NIfTI/npy and montages, docs/volumes.md) by seed and class from a
    snapshot; returns the paths written."""
    import torch
    from torch_utils import snapshot
    from mri.output.volumes import VolumeOutputError, VolumeWriter, snapshot_kind

    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    data = snapshot.load_snapshot(resolve_network(network), device=device)
    G = data.G_ema if data.G_ema is not None else data.G
    if G is None:
        raise snapshot.SnapshotError(f'{network}: holds no generator')
    from training.paint import is_paint_generator
    if is_paint_generator(G):  # it would run on blank input and paint nothing of use
        raise VolumeOutputError(f'{network}: this is a paint snapshot; use --insert-into CASES (with --labels-from, '
                                f'--heal or --move)')
    desc = data.dataset or {}
    if snapshot_kind(desc) == 'volumes':  # 3D: NIfTI per modality and labels, three-plane montages (docs/volumes.md)
        if fmt not in (None, 'nifti', 'npy'):
            raise VolumeOutputError(f'--format {fmt}: {network} is a volume snapshot; use --format nifti (its default) or npy')
        writer = VolumeWriter(desc, outdir, fmt or 'nifti', native_grid, verbose)
    else:
        if fmt == 'nifti' or native_grid:
            raise VolumeOutputError(f'{"--native-grid" if native_grid else "--format nifti"}: {network} is a 2D (slices) '
                                    f'snapshot; NIfTI output needs a volume snapshot (dataset_tool.py --kind volumes)')
        writer = ImageWriter(outdir, desc.get('channels') or [], fmt or 'png', verbose, class_grid=class_spec == 'all')
    classes = resolve_classes(G, desc, class_spec)
    return generate_samples(G, seeds, classes, writer, outdir, truncation_psi, noise_mode, device, verbose,
                            class_grid=class_spec == 'all')


@click.command()
@click.option('--network', 'network',   help='Snapshot .pt, NVlabs .pkl, or run dir (newest snapshot)', metavar='PATH', type=PATH, required=True)
@click.option('--seeds',                help='Seeds, e.g. 0-3,7 [painting: default 0, one case per seed]', metavar='LIST', type=str)
@click.option('--trunc', 'truncation_psi', help='Truncation psi', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--class', 'class_spec',  help='Class: name(s) one per group (axial,t2w), index (one label group only), or all', metavar='NAME|IDX|all', type=str)
@click.option('--noise-mode',           help='Noise mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True)
@click.option('--outdir',               help='Where to save the output images', metavar='DIR', type=PATH, required=True)
@click.option('--format', 'fmt',        help='Output format [default: png; nifti for volumes]', type=click.Choice(['png', 'png16', 'npy', 'nifti']))
@bool_option('--native-grid',           help='Volumes: NIfTI on the original BraTS grid (240x240x155)')
@bool_option('--allow-pickle',         help='Deprecated, ignored: .pkl files load without running code', hidden=True)
@click.option('--device',               help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@click.option('--insert-into', 'cases', help='Paint snapshot: BraTS case folders (or an archive of them) to paint into', metavar='CASES', type=PATH)
@click.option('--per-case',             help='Painting: new tumours per case', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--labels-from',          help='Painting: label maps: BraTS cases, an archive, a joint snapshot or a NIfTI', metavar='SOURCE', type=PATH)
@bool_option('--heal',                  help='Painting: fill the existing tumour with healthy tissue (seg 0 there)')
@bool_option('--move',                  help='Painting: heal the tumour, then paint it elsewhere')
@bool_option('--labels-as-drawn',       help='Painting: paint a NIfTI label map where it was drawn (on the case\'s grid)')
@click.option('--dilation',             help='Painting: voxels of rim repainted around a tumour', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--margin',               help='Painting: voxels kept between a new tumour and any other', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--scale', 'scale',      help='Painting: range of the random scale of a label map', metavar='MIN,MAX', type=str, default='0.8,1.25', show_default=True)
@click.option('--tries',                help='Painting: shapes tried per tumour before it is reported', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
def main(network, seeds, truncation_psi, class_spec, noise_mode, outdir, fmt, native_grid, allow_pickle, device, cases,
         per_case, labels_from, heal, move, labels_as_drawn, dilation, margin, scale, tries):
    """Generate images by class from a trained network; or, with a paint snapshot, paint tumours into real cases
    (--insert-into), heal them (--heal) or move them (--move): docs/painting.md."""
    from torch_utils.snapshot import SnapshotError, warn_allow_pickle
    from mri.output.volumes import VolumeOutputError
    if allow_pickle:
        warn_allow_pickle()
    try:
        seed_list = dnnlib.parse_range(seeds) if seeds is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--seeds') from None
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')
    painting = cases is not None or heal or move or labels_from is not None or labels_as_drawn
    if painting:
        paint_main(network, cases, outdir, labels_from, per_case, heal, move, labels_as_drawn, seed_list or [0],
                   class_spec, dilation, margin, _scale_range(scale), tries, truncation_psi, noise_mode, device)
        return
    if seed_list is None:
        raise click.UsageError('Missing option \'--seeds\' (e.g. --seeds 0-3)')
    try:
        generate_images(network, seed_list, outdir, class_spec, truncation_psi, noise_mode, fmt, device=device,
                        native_grid=native_grid)
    except (ClassSpecError, SnapshotError, VolumeOutputError) as err:
        raise click.ClickException(str(err)) from None


def _scale_range(text):
    try:
        lo, hi = (float(v) for v in text.split(','))
    except ValueError:
        raise click.BadParameter(f'{text}: expected MIN,MAX, e.g. 0.5,1', param_hint='--scale') from None
    if not 0 < lo <= hi:
        raise click.BadParameter(f'{text}: need 0 < MIN <= MAX', param_hint='--scale')
    return lo, hi


def paint_main(network, cases, outdir, labels_from, per_case, heal, move, labels_as_drawn, seeds, class_spec,
               dilation, margin, scale, tries, truncation_psi, noise_mode, device):
    """generate.py on a paint snapshot (mri.painting.run): checks the switches go together, then paints."""
    from torch_utils.snapshot import SnapshotError
    from mri.output.cases import CaseOutputError
    from mri.painting.run import PaintJobError, PaintOptions, paint_cases
    if cases is None:
        flag = '--heal' if heal else '--move' if move else '--labels-from' if labels_from else '--labels-as-drawn'
        raise click.UsageError(f'{flag} paints into real cases: pass them with --insert-into CASES')
    if heal and move:
        raise click.UsageError('--heal and --move: choose one (--move heals, then paints the tumour elsewhere)')
    if (heal or move) and labels_from:
        raise click.UsageError(f'{"--heal" if heal else "--move"} takes no --labels-from (healing paints healthy tissue; '
                               f'--move paints the case\'s own tumour)')
    opts = PaintOptions(mode='heal' if heal else 'move' if move else 'insert', per_case=per_case, seeds=tuple(seeds),
                        tries=tries, dilation=dilation, margin=margin, as_drawn=labels_as_drawn, scale=scale)
    try:
        paint_cases(resolve_network(network), cases, outdir, labels_from, opts, class_spec, device, noise_mode,
                    truncation_psi)
    except (PaintJobError, SnapshotError, CaseOutputError) as err:
        raise click.ClickException(str(err)) from None


if __name__ == '__main__':
    main()
