"""Adaptive discriminator augmentation (ADA) for volumes [N, C, D, H, W].

Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data" (App. B, Sec. 3), carried to
3D: the transforms that make sense for brain MRI, each applied per sample with probability ``p * multiplier``,
so p = 0 is exactly the identity and the augmented distribution stays invertible ("non-leaking") for p < ~0.8.
The ADA controller (``training.augment.AdaController``) and the random draws of the 2D pipeline are reused:
``AugmentPipe3d`` derives from ``training.augment.AugmentPipe`` for them and for the ``p`` buffer.

1. geometric, composed into one 4x4 matrix per sample and executed once: axis flips (left-right by default;
   the archive's volumes are in RAS array order, so axis 0 is left-right), integer translation, isotropic and
   anisotropic (volume-preserving) scaling, small rotations about the three axes. Integer-only mappings are
   exact voxel gathers; others sample trilinearly. Borders are reflected (mirror without repeating the edge
   voxel, as the 2D pipeline), never zero-filled, and samples that drew the identity are left untouched.
2. intensity, per image channel (MRI modalities are normalised separately): brightness (additive) and
   contrast (multiplicative), drawn independently for every channel.
3. corruptions on the image channels: additive Gaussian noise, cutout (a box set to 0).

Label channels (the archive's one-hot tumour channels ``seg_*``, see mri/seg.py) take the geometric transforms
only, and by nearest-voxel sampling, so they stay exact one-hot labels (+1 / -1).

Everything is gathers and elementwise arithmetic in plain PyTorch, differentiable to any order, so R1 can take
its gradient through the pipeline on any device.
"""

import math

import torch

from mri.seg import SEG_CHANNELS
from torch_utils import misc
from torch_utils import snapshot
from training.augment import AugmentPipe
from training.augment import _matrix
from training.augment import _reflect_index
from training.augment import _rotate3d

__all__ = ['AugmentPipe3d', 'AUGMENT3D_KEYS']

# The multipliers a 3D pipeline understands: the 2D presets (training.augment.augpipe_specs) keep these keys.
AUGMENT3D_KEYS = ('xflip', 'xint', 'scale', 'rotate', 'aniso', 'brightness', 'contrast', 'noise', 'cutout')


def _diag4(values, n, device):
    d0, d1, d2 = values
    return _matrix([[d0, 0, 0, 0], [0, d1, 0, 0], [0, 0, d2, 0], [0, 0, 0, 1]], n, device)


def _translate4(t, n, device):
    t0, t1, t2 = t
    return _matrix([[1, 0, 0, t0], [0, 1, 0, t1], [0, 0, 1, t2], [0, 0, 0, 1]], n, device)


@snapshot.persistent_class
class AugmentPipe3d(AugmentPipe):
    """ADA for volumes of any channel count; ``channel_names`` marks the label channels (module docstring)."""

    def __init__(self,
        xflip=0,                        # Probability multiplier for axis flips.
        flip_axes=[0],                  # Spatial axes (0, 1, 2 = D, H, W) a flip may mirror; 0 = left-right in RAS.
        xint=0,                         # Probability multiplier for integer translation.
        xint_max=0.125,                 # Range of integer translation, relative to the side.
        scale=0,                        # Probability multiplier for isotropic scaling.
        rotate=0,                       # Probability multiplier for rotation.
        aniso=0,                        # Probability multiplier for anisotropic (volume-preserving) scaling.
        scale_std=0.2,                  # Log2 standard deviation of isotropic scaling.
        rotate_max=1 / 18,              # Range of the rotation about each axis, 1 = full circle (1/18 = +-10 deg).
        aniso_std=0.2,                  # Log2 standard deviation of anisotropic scaling.
        brightness=0,                   # Probability multiplier for brightness.
        contrast=0,                     # Probability multiplier for contrast.
        brightness_std=0.2,             # Standard deviation of brightness (additive, image units).
        contrast_std=0.5,               # Log2 standard deviation of contrast.
        noise=0,                        # Probability multiplier for additive noise.
        noise_std=0.1,                  # Standard deviation of the noise amplitude.
        cutout=0,                       # Probability multiplier for cutout.
        cutout_size=0.5,                # Side of the cutout box, relative to the volume side.
        channel_names=None,             # Names of the channels (dataset.json); seg_* channels are labels. None = none.
    ):
        super().__init__()
        self.flip_axes = sorted({int(a) for a in flip_axes})
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f'mri/augment3d.py: flip_axes {list(flip_axes)} must be among 0, 1, 2')
        self.xflip, self.xint, self.xint_max = float(xflip), float(xint), float(xint_max)
        self.scale, self.rotate, self.aniso = float(scale), float(rotate), float(aniso)
        self.scale_std, self.rotate_max, self.aniso_std = float(scale_std), float(rotate_max), float(aniso_std)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.noise, self.noise_std = float(noise), float(noise_std)
        self.cutout, self.cutout_size = float(cutout), float(cutout_size)
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.label_channels = [i for i, name in enumerate(self.channel_names or []) if name in SEG_CHANNELS]

    def forward(self,
        images,                         # [N, C, D, H, W] float, roughly in [-1, 1].
        debug_percentile=None,          # None = random; q in [0, 1] = every draw at its q-th percentile.
    ):
        if not (isinstance(images, torch.Tensor) and images.ndim == 5 and images.is_floating_point()):
            raise ValueError(f'mri/augment3d.py: expected a float [N, C, D, H, W] tensor, got '
                             f'{getattr(images, "shape", type(images))}')
        if self.channel_names is not None and len(self.channel_names) != images.shape[1]:
            raise ValueError(f'mri/augment3d.py: {images.shape[1]} channels, but channel_names has '
                             f'{len(self.channel_names)} ({", ".join(self.channel_names)})')
        if debug_percentile is not None and not 0 <= debug_percentile <= 1:
            raise ValueError(f'mri/augment3d.py: debug_percentile must be in [0, 1], got {debug_percentile}')
        shape = list(images.shape)
        self._debug = None if debug_percentile is None else float(debug_percentile)
        p = self.p.to(images.device, torch.float32)
        image_mask = torch.ones([shape[1]], dtype=torch.bool, device=images.device)
        image_mask[self.label_channels] = False

        x = self._geometric3d(images, p)
        x = self._intensity3d(x, p, image_mask)
        x = self._corrupt3d(x, p, image_mask)
        misc.assert_shape(x, shape)
        return x

    # ------------------------------------------------------------------------------------------------------
    # Geometric group.

    def _geometric_matrix3d(self, p, n, size, device):
        """Inverse transform [N, 4, 4] from output voxel coordinates (centred, in voxels) to input ones."""
        g_inv = torch.eye(4, device=device).repeat(n, 1, 1)
        zero = torch.zeros([n], device=device)
        one = torch.ones([n], device=device)
        if self.xflip > 0:
            for axis in self.flip_axes:
                i = self._draw(p * self.xflip, self._randint(2, n, device), 0)
                g_inv = g_inv @ _diag4([1 - 2 * i if a == axis else one for a in range(3)], n, device)
        if self.xint > 0:
            gate = self._gate(p * self.xint, n, device)
            t = [torch.where(gate, torch.round(self._symmetric(self.xint_max, n, device) * s), zero) for s in size]
            g_inv = g_inv @ _translate4([-v for v in t], n, device)
        if self.scale > 0:
            s = self._draw(p * self.scale, self._lognormal(self.scale_std, n, device), 1)
            g_inv = g_inv @ _diag4([1 / s] * 3, n, device)
        if self.rotate > 0:
            gate = self._gate(p * self.rotate, n, device)
            for axis in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
                theta = torch.where(gate, self._symmetric(math.pi * self.rotate_max, n, device), zero)
                g_inv = g_inv @ _rotate3d(axis, -theta, n, device)
        if self.aniso > 0:
            gate = self._gate(p * self.aniso, n, device)
            s = [torch.where(gate, self._lognormal(self.aniso_std, n, device), one) for _ in range(3)]
            mean = (s[0] * s[1] * s[2]) ** (1 / 3)  # Keep the volume: only the proportions change.
            g_inv = g_inv @ _diag4([mean / v for v in s], n, device)
        return g_inv

    def _geometric3d(self, images, p):
        if max(self.xflip, self.xint, self.scale, self.rotate, self.aniso) <= 0:
            return images
        n, c = images.shape[:2]
        size = list(images.shape[2:])
        device = images.device
        g_inv = self._geometric_matrix3d(p, n, size, device)
        moved = (g_inv - torch.eye(4, device=device)).abs().flatten(1).amax(dim=1) > 1e-6
        if not bool(moved.any()):
            return images
        idx = moved.nonzero()[:, 0]
        out = self._resample(images.index_select(0, idx), g_inv.index_select(0, idx))
        return images.index_copy(0, idx, out)  # Samples that drew the identity are untouched.

    def _resample(self, images, g_inv):
        n, c = images.shape[:2]
        size = list(images.shape[2:])
        device = images.device
        axes = [torch.arange(s, device=device, dtype=torch.float32) - (s - 1) / 2 for s in size]
        grid = torch.meshgrid(*axes, indexing='ij')
        dst = torch.stack(list(grid) + [torch.ones_like(grid[0])], dim=-1).reshape(1, -1, 4)
        src = (dst @ g_inv.transpose(1, 2))[..., :3]  # [n, V, 3]
        src = [src[..., a] + (size[a] - 1) / 2 for a in range(3)]  # Voxel indices, fractional.
        flat = images.reshape(n, c, -1)

        def gather(coords):
            index = (_reflect_index(coords[0], size[0]) * size[1] + _reflect_index(coords[1], size[1])) * size[2] \
                + _reflect_index(coords[2], size[2])
            return torch.gather(flat, 2, index[:, None, :].expand(n, c, index.shape[1]))

        nearest = [torch.round(v) for v in src]
        if all(bool((v - r).abs().max() < 1e-3) for v, r in zip(src, nearest)):
            return gather([r.long() for r in nearest]).reshape(images.shape)  # Flips, integer shifts: exact.

        # Trilinear interpolation as 8 weighted gathers (any-order differentiable); labels take the nearest voxel.
        low = [torch.floor(v) for v in src]
        frac = [(v - lo).to(images.dtype)[:, None, :] for v, lo in zip(src, low)]
        low = [lo.long() for lo in low]
        out = 0
        for corner in range(8):
            bits = [(corner >> a) & 1 for a in range(3)]
            weight = 1
            for a in range(3):
                weight = weight * (frac[a] if bits[a] else 1 - frac[a])
            out = out + weight * gather([low[a] + bits[a] for a in range(3)])
        if self.label_channels:
            labels = torch.zeros([c], dtype=torch.bool, device=device)
            labels[self.label_channels] = True
            out = torch.where(labels[None, :, None], gather([r.long() for r in nearest]), out)
        return out.reshape(images.shape)

    # ------------------------------------------------------------------------------------------------------
    # Intensity and corruptions: image channels only.

    def _intensity3d(self, images, p, image_mask):
        if max(self.brightness, self.contrast) <= 0:
            return images
        n, c = images.shape[:2]
        device = images.device
        shift = torch.zeros([n, c], device=device)
        gain = torch.ones([n, c], device=device)
        if self.brightness > 0:
            gate = self._gate(p * self.brightness, n, device)
            b = torch.stack([self._normal(n, device) * self.brightness_std for _ in range(c)], dim=1)
            shift = torch.where(gate[:, None] & image_mask[None], b, shift)
        if self.contrast > 0:
            gate = self._gate(p * self.contrast, n, device)
            s = torch.stack([self._lognormal(self.contrast_std, n, device) for _ in range(c)], dim=1)
            gain = torch.where(gate[:, None] & image_mask[None], s, gain)
        if bool((shift == 0).all() & (gain == 1).all()):
            return images
        shift, gain = shift.to(images.dtype), gain.to(images.dtype)
        return (images + shift[:, :, None, None, None]) * gain[:, :, None, None, None]

    def _corrupt3d(self, images, p, image_mask):
        n, c = images.shape[:2]
        size = list(images.shape[2:])
        device = images.device
        x = images
        keep_channel = (~image_mask).to(x.dtype)[None, :, None, None, None]
        if self.noise > 0:
            sigma = torch.where(self._gate(p * self.noise, n, device), self._normal(n, device).abs() * self.noise_std,
                                torch.zeros([n], device=device))
            if bool((sigma != 0).any()):
                gen = torch.Generator(device=device).manual_seed(0) if self._debug is not None else None
                noise = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype)
                x = x + noise * sigma.to(x.dtype)[:, None, None, None, None] * (1 - keep_channel)
        if self.cutout > 0:
            gate = self._gate(p * self.cutout, n, device)
            if bool(gate.any()):
                inside = gate[:, None, None, None]
                for a, s in enumerate(size):
                    centre = self._uniform(n, device)
                    pos = (torch.arange(s, device=device, dtype=torch.float32) + 0.5) / s
                    near = (pos[None, :] - centre[:, None]).abs() < self.cutout_size / 2  # [N, s]
                    shape = [n, 1, 1, 1]
                    shape[1 + a] = s
                    inside = inside & near.reshape(shape)
                keep = (~inside)[:, None].to(x.dtype)  # [N, 1, D, H, W]
                x = x * torch.maximum(keep, keep_channel)
        return x
