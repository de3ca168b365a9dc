"""Adaptive discriminator augmentation (ADA).

Karras, Aittala, Hellsten, Laine, Lehtinen, Aila: "Training Generative Adversarial Networks with Limited
Data", NeurIPS 2020 (arXiv:2006.06676). Appendix B lists the augmentations and their parameter
distributions; Section 3 gives the adaptive heuristic that `AdaController` implements.

Every augmentation is applied to each sample independently with probability ``p * multiplier`` (the
multiplier is the constructor argument of the same name, 1 in the paper's presets), so that the
discriminator sees an augmented distribution that is still invertible ("non-leaking") as long as p < ~0.8.
The pipeline, in the paper's order:

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

Everything is plain differentiable PyTorch (gathers, convolutions, `grid_sample_gradfix`, `upfirdn2d`), so
gradients reach the images, including the second-order path that R1 on augmented reals takes.
"""

import math

import numpy as np
import torch

from torch_utils import misc
from torch_utils import snapshot
from torch_utils.ops import grid_sample_gradfix
from torch_utils.ops import upfirdn2d

# ----------------------------------------------------------------------------------------------------------
# Filters.

# Symlet-6 low-pass (scaling) coefficients: Daubechies' 6-vanishing-moment wavelet with the least asymmetric
# root choice, computed here by spectral factorisation of the Daubechies polynomial (sum = sqrt 2, unit
# energy, orthogonal to its even shifts; tests check this). Used as the resampling filter of the geometric
# group: its steep transition suppresses the aliasing that bilinear sampling alone would leave.
SYM6_LOWPASS = [
    0.01540410932704479, 0.0034907120842221444, -0.11799011114851972, -0.04831174258569752,
    0.49105594192797364, 0.7876411410286503, 0.33792942172816565, -0.07263752278637634,
    -0.021060292512370862, 0.04472490177078125, 0.0017677118642539839, -0.007800708325032369,
]

# Maximally flat half-band filter (|H(w)|^2 of the Daubechies-2 low-pass, normalised to unit DC gain): the
# zero-phase building block of the image-space filter bank below.
_HALFBAND = [-1 / 32, 0, 9 / 32, 16 / 32, 9 / 32, 0, -1 / 32]

# Expected share of image power per band (lowest first), assuming a roughly 1/f spectrum: used to renormalise
# the band gains so that a random filter neither brightens nor darkens an image on average.
_BAND_EXPECTED_POWER = [10 / 13, 1 / 13, 1 / 13, 1 / 13]


def _band_filters() -> np.ndarray:
    """Four zero-phase 1D band-pass filters, lowest band first, that sum to a unit impulse.

    With A_k(w) = prod_{j<k} H(2^j w) (cut-offs pi/2, pi/4, pi/8 for k = 1, 2, 3), the bands are
    A_3, A_2 - A_3, A_1 - A_2 and 1 - A_1, i.e. [0, pi/8], [pi/8, pi/4], [pi/4, pi/2], [pi/2, pi].
    """
    def dilate(f, factor):
        out = np.zeros((len(f) - 1) * factor + 1)
        out[::factor] = f
        return out
    lowpass = [np.array([1.0])]
    for k in range(3):
        lowpass.append(np.convolve(lowpass[-1], dilate(np.array(_HALFBAND), 2 ** k)))
    length = len(lowpass[-1])
    def centred(f):
        pad = (length - len(f)) // 2
        return np.pad(f, [pad, pad])
    a = [centred(f) for f in lowpass]  # a[0] is the unit impulse.
    return np.stack([a[3], a[2] - a[3], a[1] - a[2], a[0] - a[1]])


# ----------------------------------------------------------------------------------------------------------
# Batched matrix helpers: every entry is a scalar or an [N] tensor.

def _matrix(rows, batch_size, device):
    entries = [[torch.as_tensor(v, dtype=torch.float32, device=device).expand(batch_size) for v in row]
               for row in rows]
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


def _translate2d(tx, ty, n, device):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], n, device)


def _scale2d(sx, sy, n, device):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], n, device)


def _rotate2d(theta, n, device):
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], n, device)


def _translate3d(t, n, device):
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], n, device)


def _scale3d(s, n, device):
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], n, device)


def _rotate3d(axis, theta, n, device):
    """Rodrigues' rotation about the unit vector ``axis`` (3 floats) by ``theta`` [N], as a 4x4 matrix."""
    x, y, z = axis
    c, s = torch.cos(theta), torch.sin(theta)
    d = 1 - c
    return _matrix([[x * x * d + c, x * y * d - z * s, x * z * d + y * s, 0],
                    [y * x * d + z * s, y * y * d + c, y * z * d - x * s, 0],
                    [z * x * d - y * s, z * y * d + x * s, z * z * d + c, 0],
                    [0, 0, 0, 1]], n, device)


def _reflect_pad(x, left, right, top, bottom):
    """Mirror padding (edge pixel not repeated) of any width: torch's reflect pad is limited to size - 1,
    so wide pads are applied in steps, which tiles the image with mirrored copies."""
    pads = [left, right, top, bottom]
    while any(pads):
        h, w = x.shape[2], x.shape[3]
        step = [min(pads[0], w - 1), min(pads[1], w - 1), min(pads[2], h - 1), min(pads[3], h - 1)]
        if not any(step):  # A 1-pixel axis cannot be mirrored; repeat it instead.
            return torch.nn.functional.pad(x, pads, mode='replicate')
        x = torch.nn.functional.pad(x, step, mode='reflect')
        pads = [p - s for p, s in zip(pads, step)]
    return x


def _reflect_index(idx, size):
    """Mirror integer coordinates into [0, size) with the same convention as `_reflect_pad`."""
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * size - 2
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


# ----------------------------------------------------------------------------------------------------------

@snapshot.persistent_class
class AugmentPipe(torch.nn.Module):
    """The ADA augmentation pipeline for images [N, C, H, W] of any channel count C (see module docstring).

    Each multiplier (xflip ... cutout) scales the probability ``p`` with which that transform is applied to a
    sample; 0 disables it. ``p`` is a scalar buffer that the training loop sets (fixed, or by `AdaController`).
    """

    def __init__(self,
        xflip=0,                        # Probability multiplier for x-flip.
        rotate90=0,                     # Probability multiplier for rotation by a multiple of 90 degrees.
        xint=0,                         # Probability multiplier for integer translation.
        xint_max=0.125,                 # Range of integer translation, relative to image size.
        scale=0,                        # Probability multiplier for isotropic scaling.
        rotate=0,                       # Probability multiplier for arbitrary rotation (pre and post).
        aniso=0,                        # Probability multiplier for anisotropic scaling.
        xfrac=0,                        # Probability multiplier for fractional translation.
        scale_std=0.2,                  # Log2 standard deviation of isotropic scaling.
        rotate_max=1,                   # Range of arbitrary rotation, 1 = full circle.
        aniso_std=0.2,                  # Log2 standard deviation of anisotropic scaling.
        xfrac_std=0.125,                # Standard deviation of fractional translation, relative to image size.
        brightness=0,                   # Probability multiplier for brightness.
        contrast=0,                     # Probability multiplier for contrast.
        lumaflip=0,                     # Probability multiplier for luma flip (3 channels only).
        hue=0,                          # Probability multiplier for hue rotation (3 channels only).
        saturation=0,                   # Probability multiplier for saturation (3 channels only).
        brightness_std=0.2,             # Standard deviation of brightness (additive, image units).
        contrast_std=0.5,               # Log2 standard deviation of contrast.
        hue_max=1,                      # Range of hue rotation, 1 = full circle.
        saturation_std=1,               # Log2 standard deviation of saturation.
        imgfilter=0,                    # Probability multiplier for image-space filtering.
        imgfilter_bands=[1, 1, 1, 1],   # Probability multipliers for the four bands, lowest first.
        imgfilter_std=1,                # Log2 standard deviation of the band gains.
        noise=0,                        # Probability multiplier for additive noise (all channels).
        cutout=0,                       # Probability multiplier for cutout.
        noise_std=0.1,                  # Standard deviation of the noise amplitude.
        cutout_size=0.5,                # Side of the cutout rectangle, relative to image size.
    ):
        super().__init__()
        if len(imgfilter_bands) != 4:
            raise ValueError(f'training/augment.py: imgfilter_bands needs 4 entries, got {list(imgfilter_bands)}')
        self.register_buffer('p', torch.zeros([]))  # Overall strength; the loop sets it.
        self._debug = None  # debug_percentile of the forward pass in progress.

        self.xflip, self.rotate90, self.xint = float(xflip), float(rotate90), float(xint)
        self.xint_max = float(xint_max)
        self.scale, self.rotate, self.aniso, self.xfrac = float(scale), float(rotate), float(aniso), float(xfrac)
        self.scale_std, self.rotate_max = float(scale_std), float(rotate_max)
        self.aniso_std, self.xfrac_std = float(aniso_std), float(xfrac_std)
        self.brightness, self.contrast, self.lumaflip = float(brightness), float(contrast), float(lumaflip)
        self.hue, self.saturation = float(hue), float(saturation)
        self.brightness_std, self.contrast_std = float(brightness_std), float(contrast_std)
        self.hue_max, self.saturation_std = float(hue_max), float(saturation_std)
        self.imgfilter, self.imgfilter_bands = float(imgfilter), [float(b) for b in imgfilter_bands]
        self.imgfilter_std = float(imgfilter_std)
        self.noise, self.cutout = float(noise), float(cutout)
        self.noise_std, self.cutout_size = float(noise_std), float(cutout_size)

        # Filters are buffers so that .to(device) moves them, but not persistent: they are constants of the
        # code, not state, and must not bloat or pin down snapshots.
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(SYM6_LOWPASS), persistent=False)
        self.register_buffer('band_filters', torch.as_tensor(_band_filters(), dtype=torch.float32), persistent=False)

        # DC group delay of the sym6 filter relative to its nominal centre, in fine (2x) pixels. upfirdn2d
        # centres a filter at (len - 1) / 2, so an asymmetric filter shifts the upsampled image by this much;
        # the downsampling uses the mirrored filter (zero total phase) and the grid compensates both shifts.
        f = np.asarray(SYM6_LOWPASS)
        self._filter_delay = float((np.arange(len(f)) * f).sum() / f.sum() - (len(f) - 1) / 2)

    def extra_repr(self):
        return ', '.join(f'{k}={v}' for k, v in self.init_kwargs.items() if v) if hasattr(self, 'init_kwargs') else ''

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
        images,                         # [N, C, H, W] float, any channel count, roughly in [-1, 1].
        debug_percentile=None,          # None = random; q in [0, 1] = every draw at its q-th percentile.
    ):
        """Augment each sample independently; returns a tensor of the same shape and dtype.

        With ``debug_percentile`` every transform whose probability ``p * multiplier`` is nonzero is applied
        to every sample (so p = 0 stays the identity), with its parameter at that percentile: e.g. q = 0.75
        flips, turns by 270 degrees, and translates by +0.5 * xint_max. Per-pixel noise then comes from a
        fixed seed, so the whole output is reproducible.
        """
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point()):
            raise ValueError(f'training/augment.py: expected a float [N, C, H, W] tensor, got '
                             f'{getattr(images, "shape", type(images))}')
        if debug_percentile is not None and not 0 <= debug_percentile <= 1:
            raise ValueError(f'training/augment.py: debug_percentile must be in [0, 1], got {debug_percentile}')
        batch_size, num_channels, height, width = images.shape
        self._debug = None if debug_percentile is None else float(debug_percentile)
        p = self.p.to(images.device, torch.float32)

        x = self._geometric(images, p)
        x = self._color(x, p)
        x = self._filter(x, p)
        x = self._corrupt(x, p)
        misc.assert_shape(x, [batch_size, num_channels, height, width])
        return x

    # ------------------------------------------------------------------------------------------------------
    # Groups 1 and 2: pixel blitting and general geometric transforms.

    def _geometric_matrix(self, p, n, height, width, device):
        """Inverse transform [N, 3, 3]: maps output pixel coordinates (centred, in pixels) to input ones.

        Each transform T moves content from position x to T x, so applying T after the transforms so far
        right-multiplies the inverse by T^-1.
        """
        g_inv = torch.eye(3, device=device).repeat(n, 1, 1)
        zero = torch.zeros([n], device=device)

        # As in the paper, a blit that fires draws its parameter uniformly, the identity included: x-flip
        # fires with p * xflip and then flips half the time.
        if self.xflip > 0:
            i = self._draw(p * self.xflip, self._randint(2, n, device), 0)
            g_inv = g_inv @ _scale2d(1 - 2 * i, 1, n, device)
        if self.rotate90 > 0:
            i = self._draw(p * self.rotate90, self._randint(4, n, device), 0)
            g_inv = g_inv @ _rotate2d(-math.pi / 2 * i, n, device)
        if self.xint > 0:
            gate = self._gate(p * self.xint, n, device)
            tx = torch.where(gate, self._symmetric(self.xint_max, n, device), zero)
            ty = torch.where(gate, self._symmetric(self.xint_max, n, device), zero)
            g_inv = g_inv @ _translate2d(-torch.round(tx * width), -torch.round(ty * height), n, device)

        if self.scale > 0:
            s = self._draw(p * self.scale, self._lognormal(self.scale_std, n, device), 1)
            g_inv = g_inv @ _scale2d(1 / s, 1 / s, n, device)
        # Pre- and post-rotation each fire with p_rot such that at least one fires with p * rotate.
        p_rot = 1 - torch.sqrt(torch.clamp(1 - p * self.rotate, min=0))
        if self.rotate > 0:
            theta = self._draw(p_rot, self._symmetric(math.pi * self.rotate_max, n, device), 0)
            g_inv = g_inv @ _rotate2d(-theta, n, device)
        if self.aniso > 0:
            s = self._draw(p * self.aniso, self._lognormal(self.aniso_std, n, device), 1)
            g_inv = g_inv @ _scale2d(1 / s, s, n, device)
        if self.rotate > 0:
            theta = self._draw(p_rot, self._symmetric(math.pi * self.rotate_max, n, device), 0)
            g_inv = g_inv @ _rotate2d(-theta, n, device)
        if self.xfrac > 0:
            gate = self._gate(p * self.xfrac, n, device)
            tx = torch.where(gate, self._normal(n, device) * self.xfrac_std, zero)
            ty = torch.where(gate, self._normal(n, device) * self.xfrac_std, zero)
            g_inv = g_inv @ _translate2d(-tx * width, -ty * height, n, device)
        return g_inv

    def _geometric(self, images, p):
        n, c, h, w = images.shape
        device = images.device
        if max(self.xflip, self.rotate90, self.xint, self.scale, self.rotate, self.aniso, self.xfrac) <= 0:
            return images
        g_inv = self._geometric_matrix(p, n, h, w, device)
        if torch.equal(g_inv, torch.eye(3, device=device).expand(n, 3, 3)):
            return images

        # Source position of every output pixel centre, in centred pixel units.
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2,
                                torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2, indexing='ij')
        dst = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, h * w, 3)
        src = (dst @ g_inv.transpose(1, 2))[..., :2]  # [N, H*W, 2]
        sx, sy = src[..., 0] + (w - 1) / 2, src[..., 1] + (h - 1) / 2
        rx, ry = torch.round(sx), torch.round(sy)

        # Per sample: a mapping that is integer everywhere (no transform drawn, blitting only, or geometric
        # draws that happen to be integer) is an exact, lossless gather; only the other samples are resampled,
        # so a sample that drew no geometric transform comes back bit-identical.
        fractional = torch.maximum((sx - rx).abs().amax(dim=1), (sy - ry).abs().amax(dim=1)) >= 1e-3  # [N]
        index = _reflect_index(ry.long(), h) * w + _reflect_index(rx.long(), w)
        out = torch.gather(images.reshape(n, c, h * w), 2, index[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)
        if bool(fractional.any()):
            idx = fractional.nonzero()[:, 0]
            out = out.index_copy(0, idx, self._resample(images[idx], g_inv[idx]))
        return out

    def _resample(self, images, g_inv):
        """Execute the geometric transform with reflection padding, 2x sym6 upsampling, bilinear sampling
        and 2x sym6 downsampling (Appendix B.2), so that scaling and rotation neither alias nor blur much."""
        n, c, h, w = images.shape
        device = images.device
        f = self.resample_filter.to(device)
        delay = self._filter_delay / 2  # In coarse pixels.

        # Output positions at 2x resolution, centred coarse units. Downsampling reads the fine image at
        # i + delay for output pixel i, so fine sample t must hold the result for t - delay. The fine grid
        # extends `ext` fine samples beyond the output on every side, where the downsampling filter of the
        # outermost output pixels reads: those samples come from the (mirror-padded) image like all others,
        # not from zeros, and the downsampling crops them away again. Without them every border pixel was
        # pulled toward 0 (a constant 0.8 came back 0.46 at the corners).
        ext = (len(SYM6_LOWPASS) - 2 + 1) // 2 + 1  # Filter reach of downsample2d, rounded up to even.
        ext += ext % 2
        fy = (torch.arange(-ext, 2 * h + ext, device=device, dtype=torch.float32) + 0.5) / 2 - h / 2 - delay
        fx = (torch.arange(-ext, 2 * w + ext, device=device, dtype=torch.float32) + 0.5) / 2 - w / 2 - delay
        ys, xs = torch.meshgrid(fy, fx, indexing='ij')
        fh, fw = len(fy), len(fx)
        dst = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, fh * fw, 3)
        src = (dst @ g_inv.transpose(1, 2))[..., :2]  # [N, fh*fw, 2]

        # Pad (by mirroring) far enough to cover every source position plus the upsampling filter's support;
        # capped so a freak draw cannot allocate without bound (beyond the cap grid_sample reads zeros).
        margin = len(SYM6_LOWPASS) // 4 + 1
        lo = src.amin(dim=(0, 1)).tolist()
        hi = src.amax(dim=(0, 1)).tolist()
        def need(v):
            return int(min(max(math.ceil(v), 0) + margin, 4 * max(h, w)))
        pad_l, pad_r = need(-w / 2 - lo[0]), need(hi[0] - w / 2)
        pad_t, pad_b = need(-h / 2 - lo[1]), need(hi[1] - h / 2)
        x = _reflect_pad(images, pad_l, pad_r, pad_t, pad_b)
        hp, wp = x.shape[2], x.shape[3]

        x = upfirdn2d.upsample2d(x, f, up=2)
        misc.assert_shape(x, [n, c, 2 * hp, 2 * wp])
        # Edge coordinates in the padded image (coarse units), plus the upsampling delay (the upsampled image
        # at u holds the input at u - delay); then [-1, 1] with grid_sample's align_corners=False convention
        # (-1 and 1 are the outer pixel edges).
        gx = (src[..., 0] + w / 2 + pad_l + delay) / wp * 2 - 1
        gy = (src[..., 1] + h / 2 + pad_t + delay) / hp * 2 - 1
        grid = torch.stack([gx, gy], dim=-1).reshape(n, fh, fw, 2).to(x.dtype)
        x = grid_sample_gradfix.grid_sample(x, grid)
        x = upfirdn2d.downsample2d(x, f, down=2, padding=-ext, flip_filter=True)
        misc.assert_shape(x, [n, c, h, w])
        return x

    # ------------------------------------------------------------------------------------------------------
    # Group 3: colour transforms.

    def _color(self, images, p):
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
            m = _translate3d(b, n, device) @ m
        if self.contrast > 0:
            s = self._draw(p * self.contrast, self._lognormal(self.contrast_std, n, device), 1)
            m = _scale3d(s, n, device) @ m
        if is_rgb and self.lumaflip > 0:
            i = self._draw(p * self.lumaflip, self._randint(2, n, device), 0)
            m = (torch.eye(4, device=device) - 2 * vvt * i[:, None, None]) @ m  # Householder reflection.
        if is_rgb and self.hue > 0:
            theta = self._draw(p * self.hue, self._symmetric(math.pi * self.hue_max, n, device), 0)
            m = _rotate3d(axis, theta, n, device) @ m
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
    # Group 4: image-space filtering.

    def _filter(self, images, p):
        if self.imgfilter <= 0:
            return images
        n, c, h, w = images.shape
        device = images.device
        num_bands = len(self.imgfilter_bands)
        expected_power = torch.tensor(_BAND_EXPECTED_POWER, device=device)
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

        # One 1D filter per sample (weighted sum of the bands), applied separably to every channel with a
        # grouped convolution over the N*C planes.
        filt = (gains @ self.band_filters.to(device)).to(images.dtype)  # [N, L]
        taps = filt.shape[1]
        filt = filt.repeat_interleave(c, dim=0)  # [N*C, L]
        x = images.reshape(1, n * c, h, w)
        x = _reflect_pad(x, taps // 2, taps // 2, taps // 2, taps // 2)
        x = torch.nn.functional.conv2d(x, filt[:, None, None, :], groups=n * c)
        x = torch.nn.functional.conv2d(x, filt[:, None, :, None], groups=n * c)
        return x.reshape(n, c, h, w)

    # ------------------------------------------------------------------------------------------------------
    # Group 5: additive noise and cutout.

    def _corrupt(self, images, p):
        n, c, h, w = images.shape
        device = images.device
        x = images
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
                x = x + noise * sigma.to(x.dtype)[:, None, None, None]
        if self.cutout > 0:
            gate = self._gate(p * self.cutout, n, device)
            if bool(gate.any()):
                cx, cy = self._uniform(n, device), self._uniform(n, device)
                px = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
                py = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
                outside_x = (px[None, :] - cx[:, None]).abs() >= self.cutout_size / 2  # [N, W]
                outside_y = (py[None, :] - cy[:, None]).abs() >= self.cutout_size / 2  # [N, H]
                keep = outside_x[:, None, :] | outside_y[:, :, None] | ~gate[:, None, None]
                x = x * keep[:, None, :, :].to(x.dtype)
        return x


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
            raise ValueError(f'training/augment.py: AdaController needs a positive batch_size, got {batch_size}')
        if interval <= 0 or kimg <= 0:
            raise ValueError(f'training/augment.py: AdaController needs interval > 0 and kimg > 0, '
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
