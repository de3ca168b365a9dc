"""Adaptive discriminator augmentation (ADA) for images [N, C, H, W] and volumes [N, C, D, H, W].

Karras, Aittala, Hellsten, Laine, Lehtinen, Aila: "Training Generative Adversarial Networks with Limited
Data", NeurIPS 2020 (arXiv:2006.06676). Appendix B lists the augmentations and their parameter
distributions; Section 3 gives the adaptive heuristic that `AdaController` implements.

Every augmentation is applied to each sample independently with probability ``p * multiplier`` (the
multiplier is the constructor argument of the same name, 1 in the paper's presets), so that the
discriminator sees an augmented distribution that is still invertible ("non-leaking") as long as p < ~0.8.
One `AugmentPipe` serves both spatial ranks: the random draws, the gating by p, noise, cutout and the label
channels are written once; the transforms that differ by rank are named in the table `_RANKS`.

Images [N, C, H, W], in the paper's order:

1. pixel blitting: x-flip, rotation by a multiple of 90 degrees, integer translation;
2. general geometric: isotropic scale, pre-rotation, anisotropic scale, post-rotation, fractional
   translation. Blitting and geometric transforms are composed into one 3x3 matrix per sample and
   executed once, per sample: an integer mapping (no transform drawn, or blits only) by exact pixel
   gathering, any other by reflection padding, 2x upsampling with the sym6 wavelet low-pass, bilinear
   `grid_sample` and 2x downsampling, over a grid wide enough that no zero padding reaches the output
   (a constant image stays constant up to its corners, as in StyleGAN2-ADA);
3. colour: brightness, contrast, luma flip, hue rotation, saturation, composed into a 4x4 matrix. Luma
   flip, hue and saturation are defined around the luma axis (1, 1, 1) of a 3-channel image and are
   skipped for any other channel count; brightness and contrast apply to every channel of any image;
4. image-space filtering: four frequency bands, each amplified or attenuated by a log-normal gain;
5. corruptions: additive Gaussian noise, cutout (a rectangle set to 0).

Volumes [N, C, D, H, W] (brain MRI) take the transforms of `VOLUME_TRANSFORMS` and skip the others (rotate90,
xfrac, lumaflip, hue, saturation, imgfilter), so any 2D preset can be passed:

1. geometric, composed into one 4x4 matrix per sample: axis flips (``flip_axes``; axis 0, left-right in the
   archives' RAS array order, by default), integer translation, isotropic and anisotropic (volume-preserving)
   scaling, small rotations about the three axes (+-10 degrees by default). Integer-only mappings are exact
   voxel gathers, others trilinear; borders are mirrored and samples that drew the identity are untouched;
2. intensity: brightness (additive) and contrast (multiplicative), drawn independently for every channel
   (MRI modalities are normalised separately);
3. corruptions: additive Gaussian noise, cutout (a box set to 0).

Label channels (``channel_names`` that `torch_utils.label_channels` calls labels: ``seg_*``) take the geometric
transforms only, by nearest-pixel (voxel) sampling, so they stay exact one-hot labels, at either rank.

Everything is plain differentiable PyTorch (gathers, convolutions, `grid_sample_gradfix`, `upfirdn2d`), so
gradients reach the images, including the second-order path that R1 on augmented reals takes.
"""

import math
from typing import NamedTuple

import numpy as np
import torch

from torch_utils import label_channels as label_rule
from torch_utils import misc
from torch_utils import snapshot
from torch_utils.ops import upfirdn2d
from training import augment_ops as ops
from training.augment_ops import SYM6_LOWPASS
from training.augment_ops import band_filters as _band_filters

__all__ = ['AugmentPipe', 'AdaController', 'augpipe_specs', 'VOLUME_TRANSFORMS', 'SYM6_LOWPASS']

# The multipliers that act on volumes; a volume pipe skips the others of a 2D preset.
VOLUME_TRANSFORMS = ('xflip', 'xint', 'scale', 'rotate', 'aniso', 'brightness', 'contrast', 'noise', 'cutout')


class _Rank(NamedTuple):
    """What the pipeline does at one spatial rank (methods of AugmentPipe by name)."""
    layout: str                         # The input layout, for messages.
    flip_axes: tuple                    # Default of flip_axes.
    rotate_max: float                   # Default of rotate_max.
    matrix: str                         # Inverse geometric transform per sample, [N, R+1, R+1].
    geometric: str                      # Execute it.
    color: str                          # Colour (2D) or per-channel intensity (3D).
    filter: str                         # Image-space filtering; None = none at this rank.
    cutout_draw_order: tuple            # Axes in the order their cutout centres are drawn.


_RANKS = {
    # StyleGAN2-ADA's pipeline: x-flip mirrors the last axis; cutout draws its x centre before its y centre.
    2: _Rank(layout='[N, C, H, W]', flip_axes=(1,), rotate_max=1.0, matrix='_geometric_matrix2d',
             geometric='_geometric2d', color='_color2d', filter='_filter2d', cutout_draw_order=(1, 0)),
    # Brain MRI: left-right flips (axis 0 in RAS order), rotations of +-10 degrees, per-channel intensity.
    # Its methods read only the multipliers of VOLUME_TRANSFORMS.
    3: _Rank(layout='[N, C, D, H, W]', flip_axes=(0,), rotate_max=1 / 18, matrix='_geometric_matrix3d',
             geometric='_geometric3d', color='_intensity3d', filter=None, cutout_draw_order=(0, 1, 2)),
}


def _on_image_channels(x, image_index, fn):
    """``fn`` applied to the image channels of ``x`` only (to all of it when there are no label channels)."""
    if image_index is None:
        return fn(x)
    if image_index.numel() == 0:
        return x
    return x.index_copy(1, image_index, fn(x.index_select(1, image_index)))


# ----------------------------------------------------------------------------------------------------------

@snapshot.persistent_class
class AugmentPipe(torch.nn.Module):
    """The ADA pipeline for images [N, C, H, W] and volumes [N, C, D, H, W] of any channel count C (see the
    module docstring for what acts at which rank).

    Each multiplier (xflip ... cutout) scales the probability ``p`` with which that transform is applied to a
    sample; 0 disables it. ``p`` is a scalar buffer that the training loop sets (fixed, or by `AdaController`).
    Volumes skip the multipliers outside `VOLUME_TRANSFORMS` (rotate90, xfrac, lumaflip, hue, saturation,
    imgfilter). ``flip_axes`` and ``rotate_max`` default to what suits the rank of the input.
    """

    def __init__(self,
        xflip=0,                        # Probability multiplier for flips.
        flip_axes=None,                 # Spatial array axes a flip may mirror, each drawn on its own; None = [1]
                                        # (x) for images, [0] (left-right in RAS) for volumes.
        rotate90=0,                     # Probability multiplier for rotation by a multiple of 90 degrees (2D).
        xint=0,                         # Probability multiplier for integer translation.
        xint_max=0.125,                 # Range of integer translation, relative to image size.
        scale=0,                        # Probability multiplier for isotropic scaling.
        rotate=0,                       # Probability multiplier for arbitrary rotation (2D: pre and post; 3D:
                                        # about each axis).
        aniso=0,                        # Probability multiplier for anisotropic scaling.
        xfrac=0,                        # Probability multiplier for fractional translation (2D).
        scale_std=0.2,                  # Log2 standard deviation of isotropic scaling.
        rotate_max=None,                # Range of arbitrary rotation, 1 = full circle; None = 1 for images,
                                        # 1/18 (+-10 degrees about each axis) for volumes.
        aniso_std=0.2,                  # Log2 standard deviation of anisotropic scaling.
        xfrac_std=0.125,                # Standard deviation of fractional translation, relative to image size.
        brightness=0,                   # Probability multiplier for brightness.
        contrast=0,                     # Probability multiplier for contrast.
        lumaflip=0,                     # Probability multiplier for luma flip (2D, 3 image channels only).
        hue=0,                          # Probability multiplier for hue rotation (2D, 3 image channels only).
        saturation=0,                   # Probability multiplier for saturation (2D, 3 image channels only).
        brightness_std=0.2,             # Standard deviation of brightness (additive, image units).
        contrast_std=0.5,               # Log2 standard deviation of contrast.
        hue_max=1,                      # Range of hue rotation, 1 = full circle.
        saturation_std=1,               # Log2 standard deviation of saturation.
        imgfilter=0,                    # Probability multiplier for image-space filtering (2D).
        imgfilter_bands=[1, 1, 1, 1],   # Probability multipliers for the four bands, lowest first.
        imgfilter_std=1,                # Log2 standard deviation of the band gains.
        noise=0,                        # Probability multiplier for additive noise (image channels).
        cutout=0,                       # Probability multiplier for cutout.
        noise_std=0.1,                  # Standard deviation of the noise amplitude.
        cutout_size=0.5,                # Side of the cutout rectangle (box), relative to the image side.
        channel_names=None,             # Channel names (dataset.json); seg_* channels are labels. None = none.
    ):
        super().__init__()
        if len(imgfilter_bands) != 4:
            raise ValueError(f'AugmentPipe: imgfilter_bands needs 4 entries, got {list(imgfilter_bands)}')
        self.flip_axes = None if flip_axes is None else sorted({int(a) for a in flip_axes})
        if self.flip_axes is not None and any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f'AugmentPipe: flip_axes {list(flip_axes)} must be among 0, 1, 2')
        self.register_buffer('p', torch.zeros([]))  # Overall strength; the loop sets it.
        self._debug = None  # debug_percentile of the forward pass in progress.

        self.xflip, self.rotate90, self.xint = float(xflip), float(rotate90), float(xint)
        self.xint_max = float(xint_max)
        self.scale, self.rotate, self.aniso, self.xfrac = float(scale), float(rotate), float(aniso), float(xfrac)
        self.scale_std = float(scale_std)
        self.rotate_max = None if rotate_max is None else float(rotate_max)
        self.aniso_std, self.xfrac_std = float(aniso_std), float(xfrac_std)
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)
        self.imgfilter, self.imgfilter_bands = float(imgfilter), [float(b) for b in imgfilter_bands]
        self.imgfilter_std = float(imgfilter_std)
        self.noise, self.cutout = float(noise), float(cutout)
        self.noise_std, self.cutout_size = float(noise_std), float(cutout_size)
        self.channel_names = None if channel_names is None else [str(name) for name in channel_names]
        self.label_channels = label_rule.label_channel_indices(self.channel_names)

        # Filters are buffers so that .to(device) moves them, but not persistent: they are constants of the
        # code, not state, and must not bloat or pin down snapshots.
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(SYM6_LOWPASS), persistent=False)
        self.register_buffer('band_filters', torch.as_tensor(_band_filters(), dtype=torch.float32), persistent=False)

        # DC group delay of the sym6 filter, in fine (2x) pixels. upfirdn2d centres a filter at (len - 1) / 2, so
        # an asymmetric filter shifts the upsampled image by this much; the downsampling uses the mirrored filter
        # (zero total phase) and the sampling grid compensates both shifts.
        self._filter_delay = ops.filter_delay(SYM6_LOWPASS)

    def extra_repr(self):
        return ', '.join(f'{k}={v}' for k, v in self.init_kwargs.items() if v) if hasattr(self, 'init_kwargs') else ''

    @staticmethod
    def upgrade_record(old_name, init_kwargs, state_dict):
        """Map a snapshot record of an earlier class to this one: returns (init_kwargs, state_dict).

        'mri.augment3d.AugmentPipe3d' augmented volumes only and took the volume transforms' arguments, which
        mean the same here for 5-D input; its defaults (flip_axes [0], rotate_max 1/18) are written out so that
        a record without them keeps its behaviour. The state (``p``) is unchanged.
        """
        init_kwargs = dict(init_kwargs)
        if old_name == 'mri.augment3d.AugmentPipe3d':
            init_kwargs.setdefault('flip_axes', list(_RANKS[3].flip_axes))
            init_kwargs.setdefault('rotate_max', _RANKS[3].rotate_max)
        return init_kwargs, state_dict

    # ------------------------------------------------------------------------------------------------------
    # Random draws. With debug_percentile every draw is the percentile q of its distribution and every
    # transform with a nonzero probability is applied, so tests and visual checks are deterministic.

    def _uniform(self, n, device):
        if self._debug is not None:
            return torch.full([n], self._debug, device=device)
        return torch.rand([n], device=device)

    def _normal(self, n, device):
        if self._debug is not None:
            q = min(max(self._debug, 1e-6), 1 - 1e-6)  # Keep the inverse CDF finite at q = 0 or 1.
            return torch.full([n], math.sqrt(2) * torch.special.erfinv(torch.tensor(2 * q - 1)).item(), device=device)
        return torch.randn([n], device=device)

    def _randint(self, high, n, device):
        return torch.clamp(torch.floor(self._uniform(n, device) * high), max=high - 1)

    def _gate(self, prob, n, device):
        """Boolean [N]: which samples receive a transform applied with probability ``prob`` (a tensor)."""
        if self._debug is not None:
            return (prob > 0).expand(n)
        return torch.rand([n], device=device) < prob

    def _lognormal(self, log2_std, n, device):
        return torch.exp2(self._normal(n, device) * log2_std)

    def _symmetric(self, half_range, n, device):
        return (self._uniform(n, device) * 2 - 1) * half_range

    def _draw(self, prob, value, default):
        """Per sample: ``value`` [N] with probability ``prob``, else the scalar ``default``."""
        n, device = value.shape[0], value.device
        return torch.where(self._gate(prob, n, device), value, torch.full_like(value, default))

    # ------------------------------------------------------------------------------------------------------

    def forward(self,
        images,                         # [N, C, H, W] or [N, C, D, H, W] float, roughly in [-1, 1].
        debug_percentile=None,          # None = random; q in [0, 1] = every draw at its q-th percentile.
    ):
        """Augment each sample independently; returns a tensor of the same shape and dtype.

        With ``debug_percentile`` every transform whose probability ``p * multiplier`` is nonzero is applied
        to every sample (so p = 0 stays the identity), with its parameter at that percentile: e.g. q = 0.75
        flips, turns by 270 degrees, and translates by +0.5 * xint_max. Per-pixel noise then comes from a
        fixed seed, so the whole output is reproducible.
        """
        rank = self._check_input(images, debug_percentile)
        self._debug = None if debug_percentile is None else float(debug_percentile)
        p = self.p.to(images.device, torch.float32)
        image_index = self._image_index(images)

        x = getattr(self, rank.geometric)(images, p, image_index)
        x = getattr(self, rank.color)(x, p, image_index)
        if rank.filter is not None:
            x = getattr(self, rank.filter)(x, p, image_index)
        x = self._corrupt(x, p, rank)
        misc.assert_shape(x, list(images.shape))
        return x

    def _check_input(self, images, debug_percentile):
        """The rank table entry for ``images``; a one-line ValueError for anything the pipe cannot take."""
        if not (isinstance(images, torch.Tensor) and images.ndim in (4, 5) and images.is_floating_point()):
            raise ValueError(f'AugmentPipe: expected a float [N, C, H, W] or [N, C, D, H, W] tensor, got '
                             f'{getattr(images, "shape", type(images))}')
        rank = _RANKS[images.ndim - 2]
        if self.channel_names is not None and len(self.channel_names) != images.shape[1]:
            raise ValueError(f'AugmentPipe: {images.shape[1]} channels, but channel_names has '
                             f'{len(self.channel_names)} ({", ".join(self.channel_names)})')
        if self.flip_axes is not None and max(self.flip_axes, default=0) >= images.ndim - 2:
            raise ValueError(f'AugmentPipe: flip_axes {self.flip_axes} do not exist in {rank.layout} input')
        if debug_percentile is not None and not 0 <= debug_percentile <= 1:
            raise ValueError(f'AugmentPipe: debug_percentile must be in [0, 1], got {debug_percentile}')
        return rank

    def _image_index(self, images):
        """Indices [C'] of the channels that are not labels; None when there are no label channels."""
        if not self.label_channels:
            return None
        labels = set(self.label_channels)
        return torch.tensor([i for i in range(images.shape[1]) if i not in labels], dtype=torch.long,
                            device=images.device)

    def _default(self, name, rank):
        """The argument ``name`` (flip_axes, rotate_max), or the rank's default where it was left None."""
        value = getattr(self, name)
        return getattr(rank, name) if value is None else value

    def _geometric_matrix(self, p, n, size, device):
        """Inverse transform [N, R+1, R+1]: maps output pixel coordinates (centred, in pixels) to input ones.

        Each transform T moves content from position x to T x, so applying T after the transforms so far
        right-multiplies the inverse by T^-1. ``size`` is the spatial shape (R sides).
        """
        return getattr(self, _RANKS[len(size)].matrix)(p, n, size, device)

    # ------------------------------------------------------------------------------------------------------
    # Images, groups 1 and 2: pixel blitting and general geometric transforms, in (x, y) coordinates.

    def _geometric_matrix2d(self, p, n, size, device):
        height, width = size
        g_inv = torch.eye(3, device=device).repeat(n, 1, 1)
        zero = torch.zeros([n], device=device)

        # As in the paper, a blit that fires draws its parameter uniformly, the identity included: x-flip
        # fires with p * xflip and then flips half the time.
        if self.xflip > 0:
            for axis in self._default('flip_axes', _RANKS[2]):
                i = self._draw(p * self.xflip, self._randint(2, n, device), 0)
                g_inv = g_inv @ ops.scale([1 - 2 * i, 1] if axis == 1 else [1, 1 - 2 * i], n, device)
        if self.rotate90 > 0:
            i = self._draw(p * self.rotate90, self._randint(4, n, device), 0)
            g_inv = g_inv @ ops.rotate2d(-math.pi / 2 * i, n, device)
        if self.xint > 0:
            gate = self._gate(p * self.xint, n, device)
            tx = torch.where(gate, self._symmetric(self.xint_max, n, device), zero)
            ty = torch.where(gate, self._symmetric(self.xint_max, n, device), zero)
            g_inv = g_inv @ ops.translate([-torch.round(tx * width), -torch.round(ty * height)], n, device)

        if self.scale > 0:
            s = self._draw(p * self.scale, self._lognormal(self.scale_std, n, device), 1)
            g_inv = g_inv @ ops.scale([1 / s, 1 / s], n, device)
        # Pre- and post-rotation each fire with p_rot such that at least one fires with p * rotate.
        p_rot = 1 - torch.sqrt(torch.clamp(1 - p * self.rotate, min=0))
        rotate_max = self._default('rotate_max', _RANKS[2])
        if self.rotate > 0:
            theta = self._draw(p_rot, self._symmetric(math.pi * rotate_max, n, device), 0)
            g_inv = g_inv @ ops.rotate2d(-theta, n, device)
        if self.aniso > 0:
            s = self._draw(p * self.aniso, self._lognormal(self.aniso_std, n, device), 1)
            g_inv = g_inv @ ops.scale([1 / s, s], n, device)
        if self.rotate > 0:
            theta = self._draw(p_rot, self._symmetric(math.pi * rotate_max, n, device), 0)
            g_inv = g_inv @ ops.rotate2d(-theta, n, device)
        if self.xfrac > 0:
            gate = self._gate(p * self.xfrac, n, device)
            tx = torch.where(gate, self._normal(n, device) * self.xfrac_std, zero)
            ty = torch.where(gate, self._normal(n, device) * self.xfrac_std, zero)
            g_inv = g_inv @ ops.translate([-tx * width, -ty * height], n, device)
        return g_inv

    def _geometric2d(self, images, p, image_index):
        n, _, h, w = images.shape
        device = images.device
        if max(self.xflip, self.rotate90, self.xint, self.scale, self.rotate, self.aniso, self.xfrac) <= 0:
            return images
        g_inv = self._geometric_matrix(p, n, [h, w], device)
        if torch.equal(g_inv, torch.eye(3, device=device).expand(n, 3, 3)):
            return images

        # Per sample: a mapping that is integer everywhere (no transform drawn, blitting only, or geometric
        # draws that happen to be integer) is an exact, lossless gather; only the other samples are resampled,
        # so a sample that drew no geometric transform comes back bit-identical. Label channels keep the
        # gather (the nearest pixel) in every sample: interpolation would blur them into non-labels.
        out, fractional = ops.gather_nearest_2d(images, g_inv)
        if bool(fractional.any()):
            idx = fractional.nonzero()[:, 0]
            f, delay = self.resample_filter.to(device), self._filter_delay / 2  # Delay in coarse pixels.
            if image_index is None:
                moved = ops.resample_sym6_2d(images[idx], g_inv[idx], f, delay)
            else:  # The label channels keep their gathered (nearest) pixels.
                moved = out[idx]
                if image_index.numel() > 0:
                    resampled = ops.resample_sym6_2d(images[idx].index_select(1, image_index), g_inv[idx], f, delay)
                    moved = moved.index_copy(1, image_index, resampled)
            out = out.index_copy(0, idx, moved)
        return out

    # ------------------------------------------------------------------------------------------------------
    # Volumes: the geometric group, in (d, h, w) array coordinates.

    def _geometric_matrix3d(self, p, n, size, device):
        g_inv = torch.eye(4, device=device).repeat(n, 1, 1)
        zero = torch.zeros([n], device=device)
        one = torch.ones([n], device=device)
        if self.xflip > 0:
            for axis in self._default('flip_axes', _RANKS[3]):
                i = self._draw(p * self.xflip, self._randint(2, n, device), 0)
                g_inv = g_inv @ ops.scale([1 - 2 * i if a == axis else one for a in range(3)], n, device)
        if self.xint > 0:
            gate = self._gate(p * self.xint, n, device)
            t = [torch.where(gate, torch.round(self._symmetric(self.xint_max, n, device) * s), zero) for s in size]
            g_inv = g_inv @ ops.translate([-v for v in t], n, device)
        if self.scale > 0:
            s = self._draw(p * self.scale, self._lognormal(self.scale_std, n, device), 1)
            g_inv = g_inv @ ops.scale([1 / s] * 3, n, device)
        if self.rotate > 0:
            gate = self._gate(p * self.rotate, n, device)
            half_range = math.pi * self._default('rotate_max', _RANKS[3])
            for axis in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
                theta = torch.where(gate, self._symmetric(half_range, n, device), zero)
                g_inv = g_inv @ ops.rotate3d(axis, -theta, n, device)
        if self.aniso > 0:
            gate = self._gate(p * self.aniso, n, device)
            s = [torch.where(gate, self._lognormal(self.aniso_std, n, device), one) for _ in range(3)]
            mean = (s[0] * s[1] * s[2]) ** (1 / 3)  # Keep the volume: only the proportions change.
            g_inv = g_inv @ ops.scale([mean / v for v in s], n, device)
        return g_inv

    def _geometric3d(self, images, p, image_index):
        if max(self.xflip, self.xint, self.scale, self.rotate, self.aniso) <= 0:
            return images
        n = images.shape[0]
        device = images.device
        g_inv = self._geometric_matrix(p, n, list(images.shape[2:]), device)
        moved = (g_inv - torch.eye(4, device=device)).abs().flatten(1).amax(dim=1) > 1e-6
        if not bool(moved.any()):
            return images
        idx = moved.nonzero()[:, 0]
        out = ops.resample_trilinear_3d(images.index_select(0, idx), g_inv.index_select(0, idx), self.label_channels)
        return images.index_copy(0, idx, out)  # Samples that drew the identity are untouched.

    # ------------------------------------------------------------------------------------------------------
    # Images, group 3: colour transforms, on the image channels.

    def _color2d(self, images, p, image_index):
        return _on_image_channels(images, image_index, lambda x: self._color_matrix(x, p))

    def _color_matrix(self, images, p):
        n, c, h, w = images.shape
        device = images.device
        is_rgb = c == 3
        rgb_only = max(self.lumaflip, self.hue, self.saturation) if is_rgb else 0
        if max(self.brightness, self.contrast, rgb_only) <= 0:
            return images
        m = torch.eye(4, device=device).repeat(n, 1, 1)
        axis = [1 / math.sqrt(3)] * 3  # Luma axis; the paper's v = (1, 1, 1, 0) / sqrt(3).
        v = torch.tensor(axis + [0], device=device)
        vvt = torch.outer(v, v)

        if self.brightness > 0:
            b = self._draw(p * self.brightness, self._normal(n, device) * self.brightness_std, 0)
            m = ops.translate([b, b, b], n, device) @ m
        if self.contrast > 0:
            s = self._draw(p * self.contrast, self._lognormal(self.contrast_std, n, device), 1)
            m = ops.scale([s, s, s], n, device) @ m
        if is_rgb and self.lumaflip > 0:
            i = self._draw(p * self.lumaflip, self._randint(2, n, device), 0)
            m = (torch.eye(4, device=device) - 2 * vvt * i[:, None, None]) @ m  # Householder reflection.
        if is_rgb and self.hue > 0:
            theta = self._draw(p * self.hue, self._symmetric(math.pi * self.hue_max, n, device), 0)
            m = ops.rotate3d(axis, theta, n, device) @ m
        if is_rgb and self.saturation > 0:
            s = self._draw(p * self.saturation, self._lognormal(self.saturation_std, n, device), 1)
            ortho = torch.eye(4, device=device) - vvt
            ortho[3, 3] = 0  # Keep the homogeneous coordinate out of the scaled complement.
            m = (torch.eye(4, device=device) - ortho + ortho * s[:, None, None]) @ m

        if torch.equal(m, torch.eye(4, device=device).expand(n, 4, 4)):
            return images
        m = m.to(images.dtype)
        if is_rgb:
            out = torch.einsum('nij,njhw->nihw', m[:, :3, :3], images) + m[:, :3, 3, None, None]
        else:
            # Only brightness and contrast were composed, so the 3x3 block is s * I: apply it per channel.
            out = images * m[:, 0, 0, None, None, None] + m[:, 0, 3, None, None, None]
        return out

    # ------------------------------------------------------------------------------------------------------
    # Volumes: intensity per channel (each MRI modality is normalised on its own), image channels only.

    def _intensity3d(self, images, p, image_index):
        if max(self.brightness, self.contrast) <= 0:
            return images
        n, c = images.shape[:2]
        device = images.device
        image_mask = torch.ones([c], dtype=torch.bool, device=device)
        image_mask[self.label_channels] = False
        shift = torch.zeros([n, c], device=device)
        gain = torch.ones([n, c], device=device)
        # One draw for every channel, labels included (and then masked), as the first volume pipe drew them.
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

    # ------------------------------------------------------------------------------------------------------
    # Images, group 4: image-space filtering, on the image channels.

    def _filter2d(self, images, p, image_index):
        if self.imgfilter <= 0:
            return images
        return _on_image_channels(images, image_index, lambda x: self._filter_bands(x, p))

    def _filter_bands(self, images, p):
        n, device = images.shape[0], images.device
        num_bands = len(self.imgfilter_bands)
        expected_power = torch.tensor(ops.BAND_EXPECTED_POWER, device=device)
        gains = torch.ones([n, num_bands], device=device)
        for band, band_mult in enumerate(self.imgfilter_bands):
            if band_mult <= 0:
                continue
            t = torch.ones([n, num_bands], device=device)
            t[:, band] = torch.exp2(self._normal(n, device) * self.imgfilter_std)
            t = t / (expected_power * t.square()).sum(dim=1, keepdim=True).sqrt()  # Preserve expected power.
            gate = self._gate(p * self.imgfilter * band_mult, n, device)
            gains = gains * torch.where(gate[:, None], t, torch.ones_like(t))
        if torch.equal(gains, torch.ones_like(gains)):
            return images

        # One 1D filter per sample: the weighted sum of the bands.
        return ops.filter_separable_2d(images, (gains @ self.band_filters.to(device)).to(images.dtype))

    # ------------------------------------------------------------------------------------------------------
    # Both ranks, last group: additive noise and cutout, on the image channels.

    def _corrupt(self, images, p, rank):
        n = images.shape[0]
        device = images.device
        x = images
        keep_channel = None  # 1 for the label channels, which no corruption touches.
        if self.label_channels:
            keep_channel = torch.zeros([x.shape[1]], dtype=x.dtype, device=device)
            keep_channel[self.label_channels] = 1
            keep_channel = keep_channel.reshape([1, -1] + [1] * (x.ndim - 2))
        per_sample = [n] + [1] * (x.ndim - 1)
        if self.noise > 0:
            sigma = torch.where(self._gate(p * self.noise, n, device), self._normal(n, device).abs() * self.noise_std,
                                torch.zeros([n], device=device))
            if bool((sigma != 0).any()):
                # Per-pixel noise at a constant percentile would be a mere offset; in debug mode it is drawn
                # from a fixed seed instead, so the output is still deterministic and still looks like noise.
                gen = None
                if self._debug is not None:
                    gen = torch.Generator(device=device).manual_seed(0)
                noise = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype)
                noise = noise * sigma.to(x.dtype).reshape(per_sample)
                x = x + (noise if keep_channel is None else noise * (1 - keep_channel))
        if self.cutout > 0:
            gate = self._gate(p * self.cutout, n, device)
            if bool(gate.any()):
                x = x * self._cutout_keep(gate, list(x.shape[2:]), rank, keep_channel).to(x.dtype)
        return x

    def _cutout_keep(self, gate, size, rank, keep_channel):
        """Mask [N, 1 or C, *size]: 0 inside each gated sample's cutout box (side cutout_size of each axis,
        centred at a uniform position), 1 elsewhere and on the label channels."""
        n, device = gate.shape[0], gate.device
        centres = {axis: self._uniform(n, device) for axis in rank.cutout_draw_order}
        inside = gate.reshape([n] + [1] * len(size))
        for axis, side in enumerate(size):
            pos = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
            near = (pos[None, :] - centres[axis][:, None]).abs() < self.cutout_size / 2  # [N, side]
            shape = [n] + [1] * len(size)
            shape[1 + axis] = side
            inside = inside & near.reshape(shape)
        keep = (~inside)[:, None]
        return keep if keep_channel is None else torch.maximum(keep.to(keep_channel.dtype), keep_channel)


# ----------------------------------------------------------------------------------------------------------
# The ADA paper's presets (Section 2.3, Figure 4): cumulative groups b(lit), g(eom), c(olor), f(ilter),
# n(oise), c(utout).

_BLIT = dict(xflip=1, rotate90=1, xint=1)
_GEOM = dict(scale=1, rotate=1, aniso=1, xfrac=1)
_COLOR = dict(brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
_FILTER = dict(imgfilter=1)
_NOISE = dict(noise=1)
_CUTOUT = dict(cutout=1)

augpipe_specs = {
    'blit':   dict(**_BLIT),
    'geom':   dict(**_GEOM),
    'color':  dict(**_COLOR),
    'filter': dict(**_FILTER),
    'noise':  dict(**_NOISE),
    'cutout': dict(**_CUTOUT),
    'bg':     dict(**_BLIT, **_GEOM),
    'bgc':    dict(**_BLIT, **_GEOM, **_COLOR),
    'bgcf':   dict(**_BLIT, **_GEOM, **_COLOR, **_FILTER),
    'bgcfn':  dict(**_BLIT, **_GEOM, **_COLOR, **_FILTER, **_NOISE),
    'bgcfnc': dict(**_BLIT, **_GEOM, **_COLOR, **_FILTER, **_NOISE, **_CUTOUT),
}


# ----------------------------------------------------------------------------------------------------------

class AdaController:
    """The ADA heuristic (Section 3): nudge p so that r_t = E[sign(D(real))] tracks ``target``.

    Every ``interval`` discriminator steps: p <- clamp(p + sign(r_t - target) * batch_size * interval /
    (kimg * 1000), 0, 1), i.e. p can go from 0 to 1 in ``kimg`` thousand images. The loop feeds the sum and
    count of sign(D(real)) through `accumulate` (plain floats, so it can all-reduce them across ranks first),
    then calls `update_from_accumulated`, or computes the mean itself and calls `update`.
    """

    def __init__(self,
        target=0.6,                     # Target value of r_t = E[sign(D(real))].
        interval=4,                     # Discriminator steps between updates.
        kimg=500,                       # Thousands of images for p to traverse [0, 1].
        batch_size=None,                # Images per discriminator step (all ranks together); required.
    ):
        if batch_size is None or batch_size <= 0:
            raise ValueError(f'AdaController: needs a positive batch_size, got {batch_size}')
        if interval <= 0 or kimg <= 0:
            raise ValueError(f'AdaController: needs interval > 0 and kimg > 0, '
                             f'got {interval} and {kimg}')
        self.target = float(target)
        self.interval = int(interval)
        self.kimg = float(kimg)
        self.batch_size = int(batch_size)
        self.last_sign_mean = None  # r_t of the latest update, for logging.
        self.reset()

    @property
    def step_size(self) -> float:
        return self.batch_size * self.interval / (self.kimg * 1000)

    def reset(self) -> None:
        self.sign_sum = 0.0
        self.count = 0.0

    def accumulate(self, sign_sum: float, count: float) -> None:
        """Add the sum of sign(D(real)) over ``count`` logits."""
        self.sign_sum += float(sign_sum)
        self.count += float(count)

    def update(self, real_sign_mean: float, augment_pipe: AugmentPipe) -> float:
        """Adjust ``augment_pipe.p`` in place from r_t = ``real_sign_mean``; return the new p."""
        self.last_sign_mean = float(real_sign_mean)
        adjust = float(np.sign(self.last_sign_mean - self.target)) * self.step_size
        new_p = min(max(float(augment_pipe.p) + adjust, 0.0), 1.0)
        with torch.no_grad():
            augment_pipe.p.copy_(torch.as_tensor(new_p, dtype=augment_pipe.p.dtype))
        return new_p

    def update_from_accumulated(self, augment_pipe: AugmentPipe):
        """`update` with the mean of what was accumulated, then reset; None (p untouched) if nothing was."""
        if self.count <= 0:
            return None
        mean = self.sign_sum / self.count
        self.reset()
        return self.update(mean, augment_pipe)
