"""The numerical parts of ADA (training.augment): filters, batched matrices, mirrored borders, and the samplers
that execute a geometric transform at each spatial rank.

- images [N, C, H, W]: an exact nearest-pixel gather where a mapping is integer, else reflection padding, 2x
  upsampling with the sym6 wavelet low-pass, bilinear `grid_sample` and 2x downsampling (Karras et al. 2020,
  Appendix B.2);
- volumes [N, C, D, H, W]: the same exact gather where the mapping is integer, else trilinear interpolation as
  eight weighted voxel gathers with mirrored indices.

Also the separable filtering of the image-space filter bank (2D).
Both are plain differentiable PyTorch, to any order, so R1 can take its gradient through them.
"""

import math

import numpy as np
import torch

from torch_utils import misc
from torch_utils.ops import grid_sample_gradfix
from torch_utils.ops import upfirdn2d

# ----------------------------------------------------------------------------------------------------------
# Filters.

# Symlet-6 low-pass (scaling) coefficients: Daubechies' 6-vanishing-moment wavelet with the least asymmetric
# root choice, computed here by spectral factorisation of the Daubechies polynomial (sum = sqrt 2, unit
# energy, orthogonal to its even shifts; tests check this). Used as the resampling filter of the 2D geometric
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
BAND_EXPECTED_POWER = [10 / 13, 1 / 13, 1 / 13, 1 / 13]


def band_filters() -> np.ndarray:
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


def filter_delay(f) -> float:
    """DC group delay of filter ``f`` relative to its nominal centre (len - 1) / 2, in its own samples."""
    f = np.asarray(f)
    return float((np.arange(len(f)) * f).sum() / f.sum() - (len(f) - 1) / 2)


# ----------------------------------------------------------------------------------------------------------
# Batched homogeneous matrices: every entry is a scalar or an [N] tensor.

def matrix(rows, batch_size, device):
    entries = [[torch.as_tensor(v, dtype=torch.float32, device=device).expand(batch_size) for v in row]
               for row in rows]
    return torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)


def scale(values, n, device):
    """Diagonal matrix of size len(values) + 1: scales each coordinate by its value."""
    k = len(values)
    rows = [[values[r] if col == r else 0 for col in range(k)] + [0] for r in range(k)]
    return matrix(rows + [[0] * k + [1]], n, device)


def translate(values, n, device):
    """Shift of each coordinate by its value, as a matrix of size len(values) + 1."""
    k = len(values)
    rows = [[1 if col == r else 0 for col in range(k)] + [values[r]] for r in range(k)]
    return matrix(rows + [[0] * k + [1]], n, device)


def rotate2d(theta, n, device):
    c, s = torch.cos(theta), torch.sin(theta)
    return matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], n, device)


def rotate3d(axis, theta, n, device):
    """Rodrigues' rotation about the unit vector ``axis`` (3 floats) by ``theta`` [N], as a 4x4 matrix."""
    x, y, z = axis
    c, s = torch.cos(theta), torch.sin(theta)
    d = 1 - c
    return matrix([[x * x * d + c, x * y * d - z * s, x * z * d + y * s, 0],
                   [y * x * d + z * s, y * y * d + c, y * z * d - x * s, 0],
                   [z * x * d - y * s, z * y * d + x * s, z * z * d + c, 0],
                   [0, 0, 0, 1]], n, device)


# ----------------------------------------------------------------------------------------------------------
# Mirrored borders.

def reflect_pad(x, left, right, top, bottom):
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


def reflect_index(idx, size):
    """Mirror integer coordinates into [0, size) with the same convention as `reflect_pad`."""
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * size - 2
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


# ----------------------------------------------------------------------------------------------------------
# Samplers.

def gather_nearest_2d(images, g_inv):
    """Images [N, C, H, W] under ``g_inv`` [N, 3, 3] (centred pixel units, (x, y) order) by the nearest pixel of
    every source position, with mirrored borders; and which samples [N] have a source position that is not
    integer (those need `resample_sym6_2d`)."""
    n, c, h, w = images.shape
    device = images.device
    # Source position of every output pixel centre, in centred pixel units.
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2,
                            torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2, indexing='ij')
    dst = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, h * w, 3)
    src = (dst @ g_inv.transpose(1, 2))[..., :2]  # [N, H*W, 2]
    sx, sy = src[..., 0] + (w - 1) / 2, src[..., 1] + (h - 1) / 2
    rx, ry = torch.round(sx), torch.round(sy)
    fractional = torch.maximum((sx - rx).abs().amax(dim=1), (sy - ry).abs().amax(dim=1)) >= 1e-3  # [N]
    index = reflect_index(ry.long(), h) * w + reflect_index(rx.long(), w)
    out = torch.gather(images.reshape(n, c, h * w), 2, index[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)
    return out, fractional


def resample_sym6_2d(images, g_inv, f, delay):
    """Images [N, C, H, W] under the inverse transforms ``g_inv`` [N, 3, 3] (centred pixel units, (x, y)
    order): reflection padding, 2x upsampling with filter ``f`` (sym6, DC delay ``delay`` in coarse pixels),
    bilinear sampling and 2x downsampling with the mirrored filter, so that scaling and rotation neither alias
    nor blur much."""
    n, c, h, w = images.shape
    device = images.device

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
    x = reflect_pad(images, pad_l, pad_r, pad_t, pad_b)
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


def resample_trilinear_3d(images, g_inv, label_channels):
    """Volumes [N, C, D, H, W] under the inverse transforms ``g_inv`` [N, 4, 4] (centred voxel units, (d, h, w)
    order) with mirrored borders: an exact voxel gather where every source position is integer (flips, integer
    shifts), else trilinear interpolation, the ``label_channels`` taking the nearest voxel instead."""
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
        index = (reflect_index(coords[0], size[0]) * size[1] + reflect_index(coords[1], size[1])) * size[2] \
            + reflect_index(coords[2], size[2])
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
    if label_channels:
        labels = torch.zeros([c], dtype=torch.bool, device=device)
        labels[label_channels] = True
        out = torch.where(labels[None, :, None], gather([r.long() for r in nearest]), out)
    return out.reshape(images.shape)


def filter_separable_2d(images, filt):
    """Images [N, C, H, W] convolved along both axes with one zero-phase 1D filter per sample ``filt`` [N, L]
    (a grouped convolution over the N*C planes), borders mirrored."""
    n, c, h, w = images.shape
    taps = filt.shape[1]
    filt = filt.repeat_interleave(c, dim=0)  # [N*C, L]
    x = images.reshape(1, n * c, h, w)
    x = reflect_pad(x, taps // 2, taps // 2, taps // 2, taps // 2)
    x = torch.nn.functional.conv2d(x, filt[:, None, None, :], groups=n * c)
    x = torch.nn.functional.conv2d(x, filt[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)
