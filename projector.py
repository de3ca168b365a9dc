"""Project a real slice or volume into a generator's W: the w (and noise maps) whose image is closest to it.

StyleGAN2's projector (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020, Sec. 5 and
Appendix D), written here for 2D and 3D generators:

- one w for every layer, starting at the average w of the target's class (training.sampling.ClassAverages, the
  centre that generate.py's truncation uses; the average over every z for an unconditional generator); the noise
  maps of the synthesis layers are optimised too;
- Adam with a learning rate ramped up over the first 5% of the steps and down (cosine) over the last 25%; Gaussian
  noise of ``0.05 x`` the spread of w (the root mean square distance of mapped w to their average) is added to w,
  fading out quadratically over the first 75% of the steps, so that the search does not settle early;
- the noise maps are regularised (the paper's Eq. in App. D): at every level of a pyramid (halving down to 8 a
  side), the squared autocorrelation of each map with itself shifted by one pixel along each axis, weight 1e5, and
  each map is renormalised to zero mean and unit variance after every step, so that the noise cannot carry the image;
- the distance is not LPIPS (a VGG trained on photographs, which sees neither 1-7 channel MRI nor volumes, and costs
  a download and most of the time on a CPU) but ``(1 - SSIM) + 10 x MSE`` on the image channels inside the target's
  brain, in [0, 1] (metrics.privacy's masked SSIM and MSE, the privacy gate's measures): SSIM matches structure, the
  MSE term anchors intensities, and the background that every scan shares does not count. Tumour-label channels are
  not part of the target.

Outputs in ``--outdir``: ``projected_w.npz`` (``w [1, num_ws, w_dim]``, the class vector ``c``, the noise maps
``noise/<layer>``, and ``ssim``, ``mse``, ``steps``), ``proj.npy`` (the reconstruction, every channel, in [-1, 1]),
``target.npy``, and ``proj.png``: target | reconstruction (a 2D image's channels, a volume's three-plane montage).
The projection kept is the best one seen (lowest distance), so Ctrl-C or SIGTERM stops with it saved.

  python projector.py --network runs/00000-x --target 12 --outdir proj          # item 12 of the training archive
  python projector.py --network net.pt --target slice.png --class axial,t1n --num-steps 500 --outdir proj
  python projector.py --network vol.pt --target t1n.nii.gz,t2w.nii.gz --outdir proj   # a volume on the generator's grid
"""

import copy
import os
import sys
import time

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.cli import PATH, resolve_network  # noqa: E402

NUM_STEPS = 1000
INITIAL_LR = 0.1
LR_RAMPDOWN = 0.25          # fraction of the steps at the end over which the learning rate falls to 0 (cosine)
LR_RAMPUP = 0.05            # ... and at the start over which it rises
W_NOISE = 0.05              # noise added to w, times its spread, at the start ...
W_NOISE_RAMP = 0.75         # ... fading to 0 at this fraction of the steps
NOISE_REG_WEIGHT = 1e5
MSE_WEIGHT = 10.0
W_SAMPLES = 2000            # mapped z behind the average w and its spread
NOISE_MIN_SIDE = 8          # coarsest pyramid level of the noise regularisation


class ProjectorError(ValueError):
    """A target or option the projector cannot use; the message names it and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def load_generator(network: str, device):
    """``(G, dataset description)`` of a snapshot or run dir (G_ema where the snapshot has it)."""
    from training import sampling
    return sampling.load_generator(network, device, ProjectorError,
                                   'a paint generator has no W to project into; use a slice or volume snapshot')


def channel_names(G, desc) -> list:
    names = list(desc.get('channels') or [])
    return names if len(names) == G.img_channels else [f'ch{i}' for i in range(G.img_channels)]


def image_channel_indices(names) -> list:
    from torch_utils.label_channels import is_label_channel
    return [i for i, n in enumerate(names) if not is_label_channel(n)]


def _read_png(path) -> np.ndarray:
    import PIL.Image
    with PIL.Image.open(path) as im:
        a = np.array(im)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    vmax = 65535 if a.dtype in (np.uint16, np.int32) or a.max() > 255 else 255
    return a.astype(np.float32) / vmax * 2 - 1


def _scale_float(a, path) -> np.ndarray:
    """Float data to [-1, 1]: kept when already in it, [0, 1] (generate.py's NIfTI) doubled, else each channel over
    its 99.5th percentile of non-zero voxels (a rough stand-in for the archive's normalisation: prefer archive items)."""
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ProjectorError(f'{path}: holds NaN or infinite values')
    if a.min() >= -1 and a.max() <= 1:
        return a if a.min() < 0 else a * 2 - 1
    out = np.empty_like(a)
    for k, ch in enumerate(a):
        nz = ch[ch > 0]
        top = np.percentile(nz, 99.5) if nz.size else 1.0
        out[k] = np.clip(ch / max(top, 1e-8), 0, 1) * 2 - 1
    return out


def _read_nifti(path) -> np.ndarray:
    try:
        import nibabel
    except ImportError:
        raise ProjectorError(f'{path}: reading NIfTI needs nibabel (pip install nibabel)') from None
    a = np.asarray(nibabel.load(path).dataobj)
    a = a.reshape(a.shape[:3] + (-1,)) if a.ndim > 3 else a[..., None]  # [X, Y, Z, C] (5-D vector images too)
    return _scale_float(np.moveaxis(a, -1, 0), path)


def _read_npy(path) -> np.ndarray:
    a = np.load(path, allow_pickle=False)
    if a.dtype in (np.uint8, np.uint16):
        return a.astype(np.float32) / np.iinfo(a.dtype).max * 2 - 1
    return _scale_float(a, path)


def read_target_file(path: str) -> np.ndarray:
    """[C, *spatial] float32 in [-1, 1] from a PNG, ``.npy`` or NIfTI file."""
    if not os.path.isfile(path):
        raise ProjectorError(f'--target {path}: no such file (give a PNG, .npy or NIfTI, or an archive item index)')
    low = path.lower()
    try:
        if low.endswith('.png'):
            return _read_png(path)
        if low.endswith('.npy'):
            return _read_npy(path)
        if low.endswith(('.nii', '.nii.gz')):
            return _read_nifti(path)
    except (OSError, ValueError) as err:
        if isinstance(err, ProjectorError):
            raise
        raise ProjectorError(f'--target {path}: unreadable ({err})') from None
    raise ProjectorError(f'--target {path}: not a .png, .npy, .nii or .nii.gz file')


def read_target_files(spec: str) -> np.ndarray:
    """One file, or several separated by commas (a BraTS case's modalities, one NIfTI each) stacked as channels."""
    parts = [read_target_file(p) for p in spec.split(',')]
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise ProjectorError(f'--target {spec}: the files have different shapes '
                             f'({", ".join(str(list(p.shape[1:])) for p in parts)})')
    return np.concatenate(parts)


def read_archive_item(archive: str, index: int):
    """``(image [C, *spatial] in [-1, 1], label vector, item name)`` of item ``index`` of an archive."""
    from training.dataset import DatasetError, ImageFolderDataset
    if not archive or not os.path.exists(archive):
        raise ProjectorError(f'--data {archive}: training archive not found (an item index needs the archive)')
    try:
        ds = ImageFolderDataset(archive, use_labels=True)
    except DatasetError as err:
        raise ProjectorError(str(err)) from None
    if not 0 <= index < len(ds):
        raise ProjectorError(f'--target {index}: {archive} holds items 0-{len(ds) - 1}')
    image, label = ds[index]
    name = ds.image_fname(index)
    ds.close()
    return image.astype(np.float32) / ds.dtype_max * 2 - 1, label, name


def fit_channels(image: np.ndarray, names: list, what: str) -> np.ndarray:
    """The target's image channels [Ci, *spatial]: from every channel of the generator, or only its image channels."""
    idx = image_channel_indices(names)
    if image.shape[0] == len(names):
        return image[idx]
    if image.shape[0] == len(idx):
        return image
    if len(idx) == 1 and image.shape[0] == 3:  # an RGB PNG of a grey image
        return image.mean(axis=0, keepdims=True)
    raise ProjectorError(f'{what}: {image.shape[0]} channels, but the generator makes {len(names)} ({", ".join(names)}), '
                         f'{len(idx)} of them image channels')


def check_shape(G, target: np.ndarray) -> None:
    if list(target.shape[1:]) != list(G.img_shape):
        raise ProjectorError(f'target of shape {list(target.shape[1:])} differs from the generator\'s '
                             f'{list(G.img_shape)}; resample it to the generator\'s grid first')


def class_vector(G, desc, class_spec, default=None) -> np.ndarray:
    """The class label vector: ``--class`` by name, else ``default`` (an archive item's own label)."""
    if not G.c_dim:
        return np.zeros([0], np.float32)
    from training.labels import parse_class
    if class_spec is None:
        if default is not None and len(default) == G.c_dim:
            return np.asarray(default, np.float32)
        raise ProjectorError('--class: this generator is conditional; name the target\'s class (e.g. --class axial,t1n)')
    names = list(desc.get('label_names') or [f'class{i}' for i in range(G.c_dim)])[:G.c_dim]
    return np.asarray(parse_class(class_spec, names, desc.get('label_groups') or None), np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The optimisation


@torch.no_grad()
def w_statistics(G, c: torch.Tensor, num: int = W_SAMPLES, averages=None):
    """``(w_avg [1, 1, w_dim], w_spread)``: the class's average w (training.sampling.ClassAverages) and the root mean
    square distance of mapped w to it."""
    from training.sampling import ClassAverages
    averages = averages if averages is not None else ClassAverages(num=num)
    w_avg = averages(G, c)[:, None]
    z = torch.from_numpy(np.random.RandomState(averages.seed).randn(num, G.z_dim)).to(c.device, torch.float32)
    w = G.mapping(z, c.expand(num, -1), truncation_psi=1)[:, :1]
    return w_avg, float(((w - w_avg).square().sum() / num).sqrt())


def noise_buffers(G) -> dict:
    """The synthesis layers' constant noise maps, by name."""
    return {name: buf for name, buf in G.synthesis.named_buffers() if name.endswith('noise_const')}


def noise_regularisation(buffers) -> torch.Tensor:
    """Sum over maps and pyramid levels of the squared mean product of a map with itself shifted by one along each
    axis (StyleGAN2, App. D)."""
    total = 0.0
    for n in buffers:
        x = n[None, None]
        while True:
            for axis in range(2, x.ndim):
                total = total + (x * torch.roll(x, shifts=1, dims=axis)).mean() ** 2
            if min(x.shape[2:]) <= NOISE_MIN_SIDE:
                break
            x = (torch.nn.functional.avg_pool2d if x.ndim == 4 else torch.nn.functional.avg_pool3d)(x, 2)
    return total


def distance(synth: torch.Tensor, target_unit: torch.Tensor, mask: torch.Tensor):
    """``(distance, ssim, mse)`` [N] of generated image channels ``synth`` in [-1, 1] to the target in [0, 1]."""
    from metrics.privacy import masked_mse, masked_ssim
    x = (synth + 1) / 2
    ssim, mse = masked_ssim(x, target_unit, mask), masked_mse(x, target_unit, mask)
    return (1 - ssim) + MSE_WEIGHT * mse, ssim, mse


def _learning_rate(t: float) -> float:
    down = 0.5 - 0.5 * np.cos(min(1.0, (1.0 - t) / LR_RAMPDOWN) * np.pi)
    up = min(1.0, t / LR_RAMPUP)
    return INITIAL_LR * down * up


def project(
    G,                              # generator (mapping + synthesis)
    target: np.ndarray,             # [Ci, *spatial] image channels in [-1, 1]
    image_idx: list,                # which of G's channels the target's are
    c: np.ndarray,                  # class vector [c_dim]
    num_steps: int = NUM_STEPS,
    seed: int = 0,                  # seed of the w noise
    device='cpu',
    on_step=None,                   # called (step, dist, ssim, mse) after each step
    averages=None,                  # a kept training.sampling.ClassAverages (one per generator)
) -> dnnlib.EasyDict:
    """Finds w and the noise maps that reproduce ``target``; returns the best seen: ``EasyDict(w [1, num_ws, w_dim],
    noise {name: array}, image [C, *spatial] in [-1, 1], ssim, mse, distance, steps, interrupted)``. Ctrl-C (or a
    SIGTERM turned into KeyboardInterrupt) ends the search early with the best so far (``interrupted=True``)."""
    check_shape(G, target)
    G = copy.deepcopy(G).eval().requires_grad_(False).to(device)
    target_u = ((torch.from_numpy(np.asarray(target, np.float32)).to(device) + 1) / 2).clamp(0, 1)[None]
    from metrics.privacy import brain_mask
    mask = brain_mask(target_u)
    c_t = torch.from_numpy(np.asarray(c, np.float32)[None]).to(device)
    w_avg, w_spread = w_statistics(G, c_t, averages=averages)
    buffers = noise_buffers(G)
    gen = torch.Generator(device=device).manual_seed(seed)
    w_opt = w_avg.clone().requires_grad_(True)
    for buf in buffers.values():
        buf.copy_(torch.randn(buf.shape, generator=gen, device=device)).requires_grad_(True)
    opt = torch.optim.Adam([w_opt] + list(buffers.values()), betas=(0.9, 0.999), lr=INITIAL_LR)

    best = dnnlib.EasyDict(distance=float('inf'), w=w_avg.clone(), noise={k: b.detach().clone() for k, b in buffers.items()})
    steps, interrupted = 0, False
    try:
        for step in range(num_steps):
            t = step / num_steps
            for group in opt.param_groups:
                group['lr'] = _learning_rate(t)
            w_noise_scale = w_spread * W_NOISE * max(0.0, 1 - t / W_NOISE_RAMP) ** 2
            w_noise = torch.randn(w_opt.shape, generator=gen, device=device) * w_noise_scale
            synth = G.synthesis((w_opt + w_noise).expand(-1, G.num_ws, -1), noise_mode='const', force_fp32=True)
            dist, ssim, mse = distance(synth[:, image_idx], target_u, mask)
            loss = dist.sum() + NOISE_REG_WEIGHT * noise_regularisation(buffers.values())
            d = float(dist.detach())
            if d < best.distance:  # the w before this step's update produced this distance
                best = dnnlib.EasyDict(distance=d, w=w_opt.detach().clone(),
                                       noise={k: b.detach().clone() for k, b in buffers.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # keep the maps noise: zero mean, unit variance
                for buf in buffers.values():
                    buf -= buf.mean()
                    buf *= buf.square().mean().rsqrt()
            steps = step + 1
            if on_step is not None:
                on_step(step + 1, d, float(ssim.detach()), float(mse.detach()))
    except KeyboardInterrupt:
        interrupted = True
    return _finish(G, best, buffers, image_idx, target_u, mask, steps, interrupted)


@torch.no_grad()
def _finish(G, best, buffers, image_idx, target_u, mask, steps, interrupted) -> dnnlib.EasyDict:
    """The best w and noise, its image (no w noise) and its SSIM/MSE to the target."""
    for name, buf in buffers.items():
        buf.requires_grad_(False).copy_(best.noise[name])
    ws = best.w.expand(-1, G.num_ws, -1)
    image = G.synthesis(ws, noise_mode='const', force_fp32=True)
    dist, ssim, mse = distance(image[:, image_idx], target_u, mask)
    return dnnlib.EasyDict(w=ws.cpu().numpy(), noise={k: v.cpu().numpy() for k, v in best.noise.items()},
                           image=image[0].cpu().numpy(), ssim=float(ssim), mse=float(mse), distance=float(dist),
                           steps=steps, interrupted=interrupted)


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def save_projection(outdir: str, result, target: np.ndarray, c: np.ndarray, names: list, image_idx: list) -> list:
    """Writes projected_w.npz, proj.npy, target.npy and proj.png (target | reconstruction) atomically; returns paths."""
    from training.grids import save_image_grid
    os.makedirs(outdir, exist_ok=True)
    paths = []
    npz = os.path.join(outdir, 'projected_w.npz')
    with dnnlib.atomic_output(npz, suffix='.npz') as tmp:
        np.savez(tmp, w=result.w, c=np.asarray(c, np.float32), ssim=result.ssim, mse=result.mse, steps=result.steps,
                 **{f'noise/{k}': v for k, v in result.noise.items()})
    paths.append(npz)
    for name, array in (('proj.npy', result.image), ('target.npy', target)):
        with dnnlib.atomic_output(os.path.join(outdir, name), suffix='.npy') as tmp:
            np.save(tmp, np.asarray(array, np.float32))
        paths.append(os.path.join(outdir, name))
    shown = [names[i] for i in image_idx]
    png = os.path.join(outdir, 'proj.png')
    save_image_grid(np.stack([target, result.image[image_idx]]), png, drange=(-1, 1), grid_size=(2, 1), channels=shown,
                    row_labels=[f'target | projection  SSIM {result.ssim:.3f}'])
    paths.append(png)
    return paths


class StepLine:
    """A progress line per projection step: step, rate, time left, distance, SSIM, MSE."""

    def __init__(self, total: int, desc: str = 'projecting', enabled: bool = True):
        self.bar = dnnlib.ProgressBar(total, desc=desc, unit='step', enabled=enabled)

    def __call__(self, step, dist, ssim, mse):
        self.bar.update(1, tail=f'dist {dist:.4f}  SSIM {ssim:.4f}  MSE {mse:.5f}')

    def close(self):
        self.bar.close()


def resolve_target(G, desc, target: str, data: str, class_spec: str):
    """``(target image channels [Ci, *S], class vector, name)`` of ``--target``: an archive item index or a file."""
    names = channel_names(G, desc)
    if target.isdigit():
        archive = data or desc.get('path')
        image, label, name = read_archive_item(archive, int(target))
        image = fit_channels(image, names, f'{archive} item {target}')
    else:
        image, label, name = read_target_files(target), None, os.path.basename(target.split(',')[0])
        image = fit_channels(image, names, f'--target {target}')
    check_shape(G, image)
    return image, class_vector(G, desc, class_spec, label), name


@click.command()
@click.option('--network', 'network',   help='Snapshot .pt, NVlabs .pkl, or run dir (newest snapshot)', metavar='PATH', type=PATH, required=True)
@click.option('--target',               help='PNG, .npy or NIfTI on the generator\'s grid (several: comma-separated channels), or an item index of --data', metavar='FILE[,FILE]|INDEX', type=str, required=True)
@click.option('--data',                 help='Archive of an item --target [default: the snapshot\'s training archive]', metavar='PATH', type=PATH)
@click.option('--class', 'class_spec',  help='Class of the target (conditional generators; an archive item has its own)', metavar='NAME', type=str)
@click.option('--num-steps',            help='Optimisation steps', metavar='INT', type=click.IntRange(min=1), default=NUM_STEPS, show_default=True)
@click.option('--seed',                 help='Seed of the noise added to w', metavar='INT', type=int, default=0, show_default=True)
@click.option('--outdir',               help='Where to save projected_w.npz, proj.npy, target.npy, proj.png', metavar='DIR', type=PATH, required=True)
@click.option('--device',               help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@dnnlib.sigterm_as_interrupt()  # SIGTERM stops it like Ctrl-C (also run in-process); the caller's handler is restored
def main(network, target, data, class_spec, num_steps, seed, outdir, device):
    """Project a real slice or volume into the generator's W (StyleGAN2's projector; distance: SSIM + MSE inside the
    brain). Ctrl-C or SIGTERM stops and saves the best projection so far."""
    from torch_utils.snapshot import SnapshotError
    from training.labels import ClassSpecError
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        G, desc = load_generator(network, device)
        image, c, name = resolve_target(G, desc, target, data, class_spec)
    except (ProjectorError, SnapshotError, ClassSpecError) as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:  # before the optimisation: nothing to save
        dnnlib.exit_interrupted('nothing was written')
    names = channel_names(G, desc)
    idx = image_channel_indices(names)
    line = StepLine(num_steps, desc=f'projecting {name}')
    start = time.time()
    try:
        result = project(G, image, idx, c, num_steps, seed, device, on_step=line)  # stopped: the best so far
    except ProjectorError as err:
        raise click.ClickException(str(err)) from None
    finally:
        line.close()
    paths = save_projection(outdir, result, image, c, names, idx)
    click.echo(f'{"" if not result.interrupted else dnnlib.stop_reason() + " after "}{result.steps} steps in '
               f'{dnnlib.format_time(time.time() - start)}: SSIM {result.ssim:.4f}, MSE {result.mse:.5f} inside the '
               f'brain; wrote {", ".join(os.path.basename(p) for p in paths)} to {outdir}')
    if result.interrupted:
        sys.exit(dnnlib.interrupt_exit_code())


if __name__ == '__main__':
    dnnlib.run_cli(main)  # pylint: disable=no-value-for-parameter
