"""Interpolation videos: a walk through W from seed to seed (and from class to class), as StyleGAN users make them.

Examples:
  python interpolate.py --network runs/00000-x --seeds 0-3 --frames 60 --class axial,t1n --outdir out
  python interpolate.py --network net.pt --seeds 7 --class axial,t1n --to-class axial,t2f --outdir out  # one anatomy, t1n -> t2f
  python interpolate.py --network net.pt --seeds 0-5 --class coronal --loop --slerp --outdir out
  python interpolate.py --network runs/00001-vol --seeds 0-3 --class ssa --outdir out     # volumes: mid-planes

The keyframes are the seeds, in order, in the class of ``--class``; with ``--to-class`` the class moves from one to
the other along the keyframes (with one seed: the same seed in both classes). Between two keyframes ``--frames``
frames lerp their ws (training.sampling.map_ws: each keyframe is the w generate.py gives its seed, truncated the
same way); with ``--slerp`` the frames slerp z instead (the direction on the sphere, the length linearly), lerp the
label, and map each frame. ``--loop`` returns to the first keyframe. A frame shows the cell style_mixing.py draws:
one image channel, the tumour labels over it, a volume's three mid-planes.

Output: ``interpolation.mp4`` (needs imageio-ffmpeg: ``pip install 'mri-gan[video]'``; without it, a one-line
notice and ``interpolation.gif``), ``--format gif``, or ``--format frames``: ``interpolation-frames/frameNNNNNN.png``.
"""

import importlib.util
import os
import re
import shutil
import tempfile

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

from style_mixing import (MixingError, check_outdir, class_label, load_generator, parse_seeds, render_cell, run_job,  # noqa: E402
                          sampling_options, shown_channel, synthesize_batches)
from training.cli import bool_option  # noqa: E402
from training.sampling import ClassAverages, map_ws, seed_z  # noqa: E402

FORMATS = ('mp4', 'gif', 'frames')
STEM = 'interpolation'


# ---------------------------------------------------------------------------------------------------------------
# The path through latent space


def frame_count(keyframes: int, frames: int, loop: bool) -> int:
    """Frames of a video through ``keyframes`` keyframes, ``frames`` per step; the last keyframe ends a video that
    does not loop (a loop ends one frame before its start)."""
    steps = keyframes if loop else keyframes - 1
    return steps * frames + (0 if loop else 1)


def frame_positions(keyframes: int, frames: int, loop: bool) -> list:
    """``(i, j, t)`` per frame: the frame lies a fraction t of the way from keyframe i to keyframe j."""
    out = []
    for f in range(frame_count(keyframes, frames, loop)):
        i, t = divmod(f, frames)
        if i == keyframes - 1 and not loop:  # the last frame: the last keyframe itself
            out.append((i, i, 0.0))
        else:
            out.append((i, (i + 1) % keyframes, t / frames))
    return out


def slerp(a, b, t: float):
    """Spherical interpolation of the directions of [N, D] a and b, their lengths lerped (Shoemake 1985)."""
    import torch
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.acos((ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega)
    if float(so.abs().min()) < 1e-6:  # (anti)parallel: the great circle is not defined, lerp instead
        direction = torch.lerp(ua, ub, t)
    else:
        direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so
    return direction / direction.norm(dim=-1, keepdim=True) * torch.lerp(na, nb, t)


def keyframes(G, seeds, label, to_label, device):
    """``(z [K, z_dim], c [K, c_dim])`` of the keyframes: the seeds in order, the class moving from ``label`` to
    ``to_label`` along them (with one seed: that seed in both classes)."""
    import torch
    if to_label is not None and len(seeds) == 1:
        seeds = seeds * 2
    z = torch.cat([seed_z(G, s, device) for s in seeds])
    a = torch.from_numpy(np.asarray(label, np.float32)).to(device)
    b = a if to_label is None else torch.from_numpy(np.asarray(to_label, np.float32)).to(device)
    t = torch.linspace(0, 1, len(seeds), device=device)[:, None]
    return z, torch.lerp(a[None], b[None], t).reshape(len(seeds), -1)


def frame_ws(G, z, c, frames, loop, slerp_z, truncation_psi, center, averages):
    """[F, num_ws, w_dim] ws of every frame: lerp between the keyframes' ws, or map slerped z and lerped labels."""
    import torch
    positions = frame_positions(len(z), frames, loop)
    if not slerp_z:
        key_ws = map_ws(G, z, c, truncation_psi, center, averages)
        return torch.stack([torch.lerp(key_ws[i], key_ws[j], t) for i, j, t in positions])
    zs = torch.cat([slerp(z[i:i + 1], z[j:j + 1], t) for i, j, t in positions])
    cs = torch.cat([torch.lerp(c[i:i + 1], c[j:j + 1], t) for i, j, t in positions])
    return map_ws(G, zs, cs, truncation_psi, center, averages)


# ---------------------------------------------------------------------------------------------------------------
# Writers: MP4 through imageio-ffmpeg, an animated GIF, or a folder of PNGs


def video_format(fmt: str, verbose: bool = True) -> str:
    """``fmt``, or 'gif' (with a one-line notice) when MP4 was asked for and imageio-ffmpeg is not installed."""
    if fmt == 'mp4' and importlib.util.find_spec('imageio_ffmpeg') is None:
        if verbose:
            print("MP4 needs imageio-ffmpeg (pip install 'mri-gan[video]'); writing an animated GIF instead")
        return 'gif'
    return fmt


def _even(frame):
    """[H, W, 3] padded (black) to even sides: H.264 in yuv420p needs them."""
    h, w = frame.shape[:2]
    return np.pad(frame, [(0, h % 2), (0, w % 2), (0, 0)])


def _is_frames_folder(path: str) -> bool:
    """Whether ``path`` is a folder of frameNNNNNN.png files only (an earlier --format frames video)."""
    return os.path.isdir(path) and all(re.fullmatch(r'frame\d{6}\.png', name) for name in os.listdir(path))


class FrameWriter:
    """Takes frames one at a time (`add`), makes the video appear whole at the end (`close`) or not at all."""

    def __init__(self, outdir: str, fmt: str, fps: float):
        self.fmt, self.fps, self.count = fmt, fps, 0
        self.path = os.path.join(outdir, STEM + ('-frames' if fmt == 'frames' else f'.{fmt}'))
        if fmt == 'frames' and os.path.exists(self.path) and not _is_frames_folder(self.path):
            raise MixingError(f'{self.path}: exists and holds more than frames of a video; move it or choose '
                              f'another --outdir')
        self.tmp = tempfile.mkdtemp(dir=outdir, prefix=f'.{STEM}-')  # hidden, renamed (or moved) into place
        self.gif_frames, self.video = [], None
        if fmt == 'mp4':
            import imageio
            self.video = imageio.get_writer(os.path.join(self.tmp, 'video.mp4'), fps=fps, codec='libx264',
                                            quality=8, macro_block_size=1, ffmpeg_log_level='error')

    def add(self, frame: np.ndarray) -> None:
        if self.fmt == 'frames':
            PIL.Image.fromarray(frame, 'RGB').save(os.path.join(self.tmp, f'frame{self.count:06d}.png'))
        elif self.fmt == 'gif':
            self.gif_frames.append(PIL.Image.fromarray(frame, 'RGB'))  # small pictures: a GIF is written at once
        else:
            self.video.append_data(_even(frame))
        self.count += 1

    def close(self) -> str:
        if self.fmt == 'frames':
            if os.path.isdir(self.path):  # an earlier video's frames (checked in __init__): replaced whole
                shutil.rmtree(self.path)
            os.replace(self.tmp, self.path)
            return self.path
        if self.fmt == 'gif':
            first, *rest = self.gif_frames
            first.save(os.path.join(self.tmp, 'video.gif'), save_all=True, append_images=rest, loop=0,
                       duration=max(int(round(1000 / self.fps)), 1))
        else:
            self.video.close()
        os.replace(os.path.join(self.tmp, f'video.{self.fmt}'), self.path)
        self.abort()
        return self.path

    def abort(self) -> None:
        if self.video is not None and not self.video.closed:
            self.video.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The video


def interpolation_video(
    network: str,                   # snapshot file or run dir
    seeds: list,                    # keyframes, in order
    outdir: str,                    # interpolation.mp4 / .gif / -frames go here
    frames: int = 60,               # frames from one keyframe to the next
    class_spec: str = None,         # the class (generate.py's --class); None for unconditional networks
    to_class: str = None,           # the class at the last keyframe; None = --class throughout
    truncation_psi: float = 1.0,    # 1 = none
    trunc_center: str = 'class',    # 'class' or 'global' (training.sampling.map_ws)
    noise_mode: str = 'const',
    slerp_z: bool = False,          # slerp z (and map each frame) instead of lerping w
    loop: bool = False,             # back to the first keyframe at the end
    fps: float = 30,
    fmt: str = 'mp4',               # 'mp4', 'gif' or 'frames'
    channel: str = None,            # image channel shown; None = the first
    overlay: bool = True,           # tumour labels over it
    batch: int = 8,                 # frames per forward pass
    device: str = None,             # None = cuda when available
    verbose: bool = True,
) -> str:
    """Writes the interpolation video; returns its path."""
    import torch
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if len(seeds) < 2 and to_class is None:
        raise MixingError(f'--seeds {",".join(map(str, seeds))}: a video needs two seeds or more, or --to-class')
    G, desc = load_generator(network, device)
    label = class_label(G, desc, class_spec)
    to_label = class_label(G, desc, to_class, '--to-class') if to_class is not None else None
    names, shown = shown_channel(G, desc, channel)
    fmt = video_format(fmt, verbose)

    z, c = keyframes(G, seeds, label, to_label, device)
    ws = frame_ws(G, z, c, frames, loop, slerp_z, truncation_psi, trunc_center, ClassAverages())
    os.makedirs(outdir, exist_ok=True)
    writer = FrameWriter(outdir, fmt, fps)
    bar = dnnlib.ProgressBar(len(ws), desc='Interpolating', unit='frames', enabled=verbose)
    try:
        for i, image in synthesize_batches(G, ws, noise_mode, batch):
            writer.add(render_cell(image, names, shown, overlay))
            bar.update(done=i + 1)
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    bar.close()
    if verbose:
        print(f'{path}: {len(ws)} frames at {fps:g} fps')
    return path


@click.command()
@click.option('--seeds',                help='Keyframe seeds, in order, e.g. 0-3', metavar='LIST', type=str, required=True)
@click.option('--frames',               help='Frames from one keyframe to the next', metavar='INT', type=click.IntRange(min=1), default=60, show_default=True)
@click.option('--to-class',             help='Class at the last keyframe (from --class to this one)', metavar='NAME|IDX', type=str)
@bool_option('--slerp',                 help='Slerp z (and map every frame) instead of lerping w')
@bool_option('--loop',                  help='Return to the first keyframe')
@click.option('--fps',                  help='Frames per second', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=30, show_default=True)
@click.option('--format', 'fmt',        help='mp4 (imageio-ffmpeg, else gif), gif, or a folder of PNG frames', type=click.Choice(FORMATS), default='mp4', show_default=True)
@sampling_options
def main(seeds, frames, to_class, slerp, loop, fps, fmt, network, class_spec, truncation_psi, trunc_center, noise_mode,
         channel, overlay, batch, outdir, device):
    """Interpolation video through W from seed to seed (and from --class to --to-class)."""
    seed_list = parse_seeds(seeds, '--seeds')
    check_outdir(outdir)
    run_job(lambda: interpolation_video(network, seed_list, outdir, frames, class_spec, to_class, truncation_psi,
                                        trunc_center, noise_mode, slerp, loop, fps, fmt, channel, overlay, batch,
                                        device),
            f'no video was written to {outdir}')


if __name__ == '__main__':
    dnnlib.run_cli(main)  # pylint: disable=no-value-for-parameter
