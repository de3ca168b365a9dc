"""Style mixing (StyleGAN, Karras et al. 2019, Sec. 3.1 and Fig. 3): the styles of one seed at some layers, of
another at the rest.

Examples:
  python style_mixing.py --network runs/00000-x --rows 0-3 --cols 10-13 --styles 0-6 --class axial,t2f --outdir out
  python style_mixing.py --network net.pt --rows 0-3 --cols 10-13 --styles 4-9 --class axial --trunc 0.7 --outdir out
  python style_mixing.py --network runs/00001-vol --rows 0-1 --cols 5-7 --styles 0-3 --class ssa --outdir out

Each row seed's ws (training.sampling.map_ws: the same w a seed gets in generate.py) keep their styles except at the
layer indices ``--styles``, where the column seed's ws replace them: the coarse indices carry layout and anatomy,
the fine ones texture and contrast. ``grid.png`` shows the column sources along the top, the row sources down the
left and the mixed images inside, with the seeds named in the margins; each mixed image is also written as
``ROW-COL.png`` (with ``--npy``, its array as ``ROW-COL.npy`` [C, *spatial] in [-1, 1]). A cell shows one image
channel (``--channel``, default the first image channel) with the tumour labels overlaid when the archive has label
channels (``--overlay``); a volume's cell shows the mid-planes of its three axes. Interpolation videos:
interpolate.py, which shares this file's loading and cells.
"""

import os

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import PIL.ImageDraw  # noqa: E402
import PIL.ImageFont  # noqa: E402

from training import grids  # noqa: E402
from training.cli import PATH, bool_option  # noqa: E402
from training.labels import ClassSpecError, parse_class  # noqa: E402
from training.sampling import TRUNC_CENTERS, ClassAverages, map_ws, seed_z, synthesize  # noqa: E402


class MixingError(ValueError):
    """Bad input to style mixing or an interpolation video: a one-line message naming the option."""


# ---------------------------------------------------------------------------------------------------------------
# Loading: the generator, its class, the channel a cell shows


def load_generator(network: str, device):
    """``(G, dataset description)`` of a snapshot file or run dir (its newest snapshot); G_ema when it has one."""
    from training import sampling
    G, desc = sampling.load_generator(network, device, MixingError, 'this is a paint snapshot (it paints into real '
                                      'cases); style mixing needs an image or volume generator')
    return G.eval().requires_grad_(False), desc


def class_label(G, desc: dict, class_spec: str, flag: str = '--class') -> np.ndarray:
    """The label vector of one class (names one per group, as generate.py's --class); [0] for unconditional G."""
    label_names = list(desc.get('label_names') or [f'class{i}' for i in range(G.c_dim)])[:G.c_dim] if G.c_dim else []
    if class_spec == 'all':
        raise MixingError(f'{flag} all: this draws one class; name one (e.g. {flag} {",".join(label_names[:1])})')
    try:
        return parse_class(class_spec, label_names, desc.get('label_groups') or None)
    except ClassSpecError as err:  # its message names --class
        message, prefix = str(err), f'--class {class_spec}: '
        if flag != '--class':
            message = f'{flag} {class_spec}: {message[len(prefix):] if message.startswith(prefix) else message}'
        raise MixingError(message) from None


def shown_channel(G, desc: dict, channel: str = None) -> tuple:
    """``(channel names, index of the channel a cell shows)``: ``channel`` by name, else the first image channel."""
    names = grids.channel_names(desc.get('channels'), G.img_channels)
    image_idx, _ = grids.split_label_channels(names)
    if channel is None:
        return names, (image_idx[0] if image_idx else None)
    if channel not in names or names.index(channel) not in image_idx:
        raise MixingError(f'--channel {channel}: not an image channel of this network '
                          f'(image channels: {", ".join(names[i] for i in image_idx) or "none"})')
    return names, names.index(channel)


def parse_styles(text: str, num_ws: int) -> list:
    """Layer indices of ``--styles`` (e.g. '0-6'; '' = none), each below ``num_ws``."""
    try:
        styles = sorted(set(dnnlib.parse_range(text)))
    except ValueError as err:
        raise MixingError(f'--styles {text}: {err}') from None
    bad = [s for s in styles if s >= num_ws]
    if bad:
        raise MixingError(f'--styles {text}: index {bad[0]} is out of range; this network has num_ws={num_ws} '
                          f'(styles 0-{num_ws - 1})')
    return styles


# ---------------------------------------------------------------------------------------------------------------
# Cells: what a person sees of one sample


def render_cell(
    image,                  # [C, H, W] or [C, D, H, W] in [-1, 1]
    names,                  # the C channel names
    shown,                  # index of the image channel shown; None = the label map alone
    overlay: bool = True,   # draw the tumour labels over it (when the channels hold labels)
) -> np.ndarray:
    """[H, W, 3] uint8: one channel in grey (RGB when the channels are red, green, blue), the labels in colour on it;
    a volume's three mid-planes side by side (training.grids.montage), the overlay in a second row."""
    image = np.asarray(image, np.float32)
    _, label_idx = grids.split_label_channels(names)
    keep = ([] if shown is None else [shown]) + (label_idx if overlay or shown is None else [])
    if image.ndim == 4:
        return grids.montage(image[keep], [names[i] for i in keep], drange=(-1, 1))
    if list(names) == ['red', 'green', 'blue']:
        return grids.to_uint8(image, (-1, 1)).transpose(1, 2, 0)
    labels = grids.label_map(image[label_idx], (-1, 1)) if label_idx else None
    if shown is None:
        return grids.label_colours(labels)
    grey = grids.to_uint8(image[shown], (-1, 1))
    return grids.overlay(grey, labels) if overlay and labels is not None else np.repeat(grey[..., None], 3, axis=2)


def _text_size(texts, font) -> tuple:
    probe = PIL.ImageDraw.Draw(PIL.Image.new('RGB', (1, 1)))
    boxes = [probe.textbbox((0, 0), str(t), font=font) for t in texts] or [(0, 0, 0, 0)]
    return max(b[2] - b[0] for b in boxes), max(b[3] - b[1] for b in boxes)


def mixing_grid(row_cells, col_cells, mixed_cells, row_names, col_names) -> PIL.Image.Image:
    """StyleGAN's style-mixing figure: an empty corner, the column sources along the top, the row sources down the
    left, ``mixed_cells[r][c]`` inside; the sources' names in margins and a wider gap around the sources."""
    gap, gap2 = grids.GAP, 3 * grids.GAP
    th, tw = row_cells[0].shape[:2]
    font = PIL.ImageFont.load_default()
    left = _text_size(row_names, font)[0] + 2 * gap
    top = _text_size(col_names, font)[1] + 2 * gap
    rows, cols = len(row_cells), len(col_cells)
    height = top + th + gap2 + rows * th + (rows - 1) * gap + gap
    width = left + tw + gap2 + cols * tw + (cols - 1) * gap + gap
    canvas = np.full([height, width, 3], grids.BACKGROUND, np.uint8)
    ys = [top] + [top + th + gap2 + r * (th + gap) for r in range(rows)]
    xs = [left] + [left + tw + gap2 + c * (tw + gap) for c in range(cols)]
    for c, cell in enumerate(col_cells):
        canvas[ys[0]:ys[0] + th, xs[c + 1]:xs[c + 1] + tw] = cell
    for r, cell in enumerate(row_cells):
        canvas[ys[r + 1]:ys[r + 1] + th, xs[0]:xs[0] + tw] = cell
        for c in range(cols):
            canvas[ys[r + 1]:ys[r + 1] + th, xs[c + 1]:xs[c + 1] + tw] = mixed_cells[r][c]
    image = PIL.Image.fromarray(canvas, 'RGB')
    draw = PIL.ImageDraw.Draw(image)
    for c, text in enumerate(col_names):
        draw.text((xs[c + 1] + tw // 2, top // 2), str(text), fill=(0, 0, 0), font=font, anchor='mm')
    for r, text in enumerate(row_names):
        draw.text((gap, ys[r + 1] + th // 2), str(text), fill=(0, 0, 0), font=font, anchor='lm')
    return image


# ---------------------------------------------------------------------------------------------------------------
# Mixing


def mix_ws(row_ws, col_ws, styles):
    """``[R, K, num_ws, w_dim]``: row r's ws with column k's at the layer indices ``styles``."""
    mixed = row_ws[:, None].repeat(1, len(col_ws), 1, 1)
    if styles:
        mixed[:, :, styles] = col_ws[None, :, styles]
    return mixed


def seed_ws(G, seeds, label, truncation_psi, center, averages, device):
    """[N, num_ws, w_dim] ws of the seeds in one class (training.sampling: the w generate.py gives a seed)."""
    import torch
    z = torch.cat([seed_z(G, s, device) for s in seeds])
    c = torch.from_numpy(np.asarray(label, np.float32)[None]).to(device).expand(len(seeds), -1)
    return map_ws(G, z, c, truncation_psi, center, averages)


def synthesize_batches(G, ws, noise_mode, batch):
    """Yields (index, image [C, *spatial] numpy) for each of ws [N, num_ws, w_dim], ``batch`` per forward pass."""
    for start in range(0, len(ws), batch):
        images = synthesize(G, ws[start:start + batch], noise_mode).cpu().numpy()
        for k, image in enumerate(images):
            yield start + k, image


def style_mix(
    network: str,                   # snapshot file or run dir
    row_seeds: list,                # seeds of the rows (their ws are kept outside `styles`)
    col_seeds: list,                # seeds of the columns (their ws replace the rows' at `styles`)
    styles: str,                    # layer indices, e.g. '0-6'; '' = none (every mixed image is its row source)
    outdir: str,                    # grid.png and ROW-COL.png (.npy) go here
    class_spec: str = None,         # one class (generate.py's --class); None for unconditional networks
    truncation_psi: float = 1.0,    # 1 = none
    trunc_center: str = 'class',    # 'class' or 'global' (training.sampling.map_ws)
    noise_mode: str = 'const',
    channel: str = None,            # image channel shown; None = the first
    overlay: bool = True,           # tumour labels over it
    save_npy: bool = False,         # each mixed image's array too
    batch: int = 8,                 # images per forward pass
    device: str = None,             # None = cuda when available
    verbose: bool = True,
) -> list:
    """Writes the style-mixing grid and each mixed image; returns the paths written."""
    import torch
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if not row_seeds or not col_seeds:
        raise MixingError(f'--{"rows" if not row_seeds else "cols"}: name at least one seed')
    G, desc = load_generator(network, device)
    label = class_label(G, desc, class_spec)
    layers = parse_styles(styles, G.num_ws)
    names, shown = shown_channel(G, desc, channel)

    averages = ClassAverages()
    row_ws = seed_ws(G, row_seeds, label, truncation_psi, trunc_center, averages, device)
    col_ws = seed_ws(G, col_seeds, label, truncation_psi, trunc_center, averages, device)
    mixed = mix_ws(row_ws, col_ws, layers).flatten(0, 1)
    sources = torch.cat([row_ws, col_ws])

    cells = [render_cell(img, names, shown, overlay) for _, img in synthesize_batches(G, sources, noise_mode, batch)]
    row_cells, col_cells = cells[:len(row_seeds)], cells[len(row_seeds):]
    os.makedirs(outdir, exist_ok=True)
    written, mixed_cells = [], [[None] * len(col_seeds) for _ in row_seeds]
    bar = dnnlib.ProgressBar(len(mixed), desc='Style mixing', unit='images', enabled=verbose)
    for i, image in synthesize_batches(G, mixed, noise_mode, batch):
        r, k = divmod(i, len(col_seeds))
        stem = os.path.join(outdir, f'{row_seeds[r]}-{col_seeds[k]}')
        mixed_cells[r][k] = render_cell(image, names, shown, overlay)
        written.append(grids.save_png(mixed_cells[r][k], stem + '.png'))
        if save_npy:
            with dnnlib.atomic_output(stem + '.npy', suffix='.npy') as tmp:
                np.save(tmp, image.astype(np.float32))
            written.append(stem + '.npy')
        bar.update(done=i + 1, tail=os.path.basename(stem))
    bar.close()
    grid = os.path.join(outdir, 'grid.png')
    with dnnlib.atomic_output(grid, suffix='.png') as tmp:
        mixing_grid(row_cells, col_cells, mixed_cells, row_seeds, col_seeds).save(tmp)
    if verbose:
        print(f'{grid}: rows keep seeds {",".join(map(str, row_seeds))}; columns {",".join(map(str, col_seeds))} '
              f'give styles {styles or "(none)"} of num_ws={G.num_ws}')
    return written + [grid]


# ---------------------------------------------------------------------------------------------------------------
# Command line (options shared with interpolate.py)


def sampling_options(f):
    """The options every sampling script shares with generate.py: network, class, truncation, noise, device."""
    for option in reversed([
        click.option('--network', 'network',    help='Snapshot .pt, NVlabs .pkl, or run dir (newest snapshot)', metavar='PATH', type=PATH, required=True),
        click.option('--class', 'class_spec',   help='Class: name(s) one per group (axial,t2w), or index (one label group)', metavar='NAME|IDX', type=str),
        click.option('--trunc', 'truncation_psi', help='Truncation psi', metavar='FLOAT', type=float, default=1, show_default=True),
        click.option('--trunc-center',          help='Truncate towards the class\'s own average w, or the global one', type=click.Choice(TRUNC_CENTERS), default='class', show_default=True),
        click.option('--noise-mode',            help='Noise mode', type=click.Choice(['const', 'random', 'none']), default='const', show_default=True),
        click.option('--channel',               help='Image channel shown [default: the first]', metavar='NAME', type=str),
        bool_option('--overlay', default=True,  help='Draw the tumour labels over the shown channel'),
        click.option('--batch',                 help='Images per forward pass', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True),
        click.option('--outdir',                help='Output folder', metavar='DIR', type=PATH, required=True),
        click.option('--device',                help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu'])),
    ]):
        f = option(f)
    return f


def run_job(job, interrupted: str) -> None:
    """Runs ``job()`` for a command: its errors as one line, SIGTERM treated like Ctrl-C (the writers clean up on the
    way out), then ``interrupted`` said and the usual exit status (130, or 143 for SIGTERM)."""
    from torch_utils.snapshot import SnapshotError
    try:
        with dnnlib.sigterm_as_interrupt():
            job()
    except (MixingError, SnapshotError) as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        dnnlib.exit_interrupted(interrupted)


def parse_seeds(text: str, flag: str) -> list:
    try:
        return dnnlib.parse_range(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=flag) from None


def check_outdir(outdir: str) -> None:
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')


@click.command()
@click.option('--rows', 'row_seeds',    help='Seeds of the rows, e.g. 0-3', metavar='LIST', type=str, required=True)
@click.option('--cols', 'col_seeds',    help='Seeds of the columns, e.g. 10-13', metavar='LIST', type=str, required=True)
@click.option('--styles',               help='Layer indices the columns give (0 = coarsest; \'\' = none)', metavar='LIST', type=str, default='0-6', show_default=True)
@bool_option('--npy',                   help='Also save each mixed image\'s array (.npy, [C, *spatial] in [-1, 1])')
@sampling_options
def main(row_seeds, col_seeds, styles, npy, network, class_spec, truncation_psi, trunc_center, noise_mode, channel,
         overlay, batch, outdir, device):
    """Style mixing: the rows' seeds with the columns' styles at --styles (StyleGAN's figure)."""
    rows, cols = parse_seeds(row_seeds, '--rows'), parse_seeds(col_seeds, '--cols')
    check_outdir(outdir)
    run_job(lambda: style_mix(network, rows, cols, styles, outdir, class_spec, truncation_psi, trunc_center,
                              noise_mode, channel, overlay, npy, batch, device),
            f'the mixed images in {outdir} are whole; grid.png is written last')


if __name__ == '__main__':
    dnnlib.run_cli(main)
