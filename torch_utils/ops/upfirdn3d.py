"""upfirdn3d: separable FIR up/downsampling of 5-D tensors [N, C, D, H, W] and convolutions fused with it.

The 3D counterpart of ``torch_utils.ops.upfirdn2d`` and ``conv2d_resample`` (StyleGAN2, Karras et al. 2020,
App. B: upsample with a transposed convolution followed by a low-pass FIR filter, downsample with the filter
followed by a strided convolution), in plain PyTorch so it runs on any device and is differentiable to any
order (R1 and path length take second derivatives through it).

Semantics of ``upfirdn3d`` per axis (the 1D filter is applied along D, H and W in turn, i.e. the 3D filter
is the outer product f x f x f):

    1. upsample by inserting up-1 zeros after every sample,
    2. pad with zeros (negative padding crops),
    3. convolve with the FIR filter (a true convolution),
    4. keep every down-th sample.

Output size per axis: (in * up + pad0 + pad1 - taps) // down + 1, as in upfirdn2d. No CUDA plugin: each pass
is one 1D convolution along an axis, written in one of two equivalent forms (``_PASS_FORMS``), picked by device:

- ``'depthwise'`` (CPU): one grouped conv3d with a filter per channel (``groups=C``). Measured on the 2-core dev
  CPU (torch 2.13, oneDNN), one pass over [8, 8, 64^3]: 0.10 s forward + 0.12 s backward, against 0.33 + 0.89 s
  for the channels-folded-into-batch form, which oneDNN runs as a single-channel convolution on a slow path;
  the 64^3 training step of docs/volumes.md's phantom run got about 3x faster with it (docs/benchmarks.md).
- ``'folded'`` (CUDA and others): the channels folded into the batch and one single-channel conv3d, which cuDNN
  serves; PyTorch's 3D depthwise kernel has a known slow backward on CUDA (pytorch/pytorch#37406), so the GPU
  keeps this form until bench/gpu_check.sh measures otherwise.

Both forms compute the same numbers (tests/test_ops.py checks them against each other, to second order);
``upfirdn3d(..., pass_form=...)`` or, around whole networks, ``forced_pass_form(...)`` picks one for a comparison.
``torch_utils.ops.resample`` dispatches to this module for 5-D tensors and to upfirdn2d/conv2d_resample for 4-D.
"""

import contextlib


import torch
import torch.nn.functional as F

from torch_utils.ops import upfirdn2d

__all__ = ['setup_filter', 'upfirdn3d', 'upsample3d', 'downsample3d', 'conv3d_resample']


def setup_filter(f, device=torch.device('cpu')) -> torch.Tensor:
    """1D taps normalised to sum 1 (the separable 3D filter then has unit DC gain): upfirdn2d's helper."""
    f = upfirdn2d.setup_filter(f, device=device, separable=True)
    if f.ndim != 1:
        raise ValueError(f'upfirdn3d: a 3D resampling filter must be 1D (separable), got shape {tuple(f.shape)}')
    return f


def _pad_or_crop(y, axis, lo, hi):
    """Zero-pad (positive) or crop (negative) spatial ``axis`` of a 5-D tensor by ``lo`` in front, ``hi`` behind."""
    if lo > 0 or hi > 0:
        pads = [0] * 6
        pads[2 * (2 - axis)] = max(lo, 0)  # F.pad lists the last axis first.
        pads[2 * (2 - axis) + 1] = max(hi, 0)
        y = F.pad(y, pads)
    if lo < 0 or hi < 0:
        length = y.shape[2 + axis]
        y = y.narrow(2 + axis, -min(lo, 0), length + min(hi, 0) + min(lo, 0))
    return y


PASS_FORMS = ('depthwise', 'folded')
_forced = []  # The innermost forced_pass_form(); empty = choose by device.


@contextlib.contextmanager
def forced_pass_form(form):
    """Within the block every pass takes ``form`` (one of PASS_FORMS), whatever the device; for benchmarks that
    compare the two forms through whole networks. ``None`` keeps the choice by device."""
    if form is not None and form not in PASS_FORMS:
        raise ValueError(f'upfirdn3d: pass form {form!r} is not one of {", ".join(PASS_FORMS)}')
    _forced.append(form)
    try:
        yield
    finally:
        _forced.pop()


def _pass_form(device, form=None) -> str:
    if form is None and _forced:
        form = _forced[-1]
    if form is not None:
        if form not in PASS_FORMS:
            raise ValueError(f'upfirdn3d: pass form {form!r} is not one of {", ".join(PASS_FORMS)}')
        return form
    return 'depthwise' if device.type == 'cpu' else 'folded'


def _axis_pass(x, k, axis, up, down, pad0, pad1, form):
    """One upfirdn pass along spatial ``axis`` (0, 1, 2 = D, H, W) of x [N, C, D, H, W] with true-convolution
    taps k [K], as a depthwise conv3d or a single-channel conv3d over the folded batch (module docstring)."""
    N, C = x.shape[:2]
    K = k.numel()
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = K
    stride = [1, 1, 1]
    if form == 'depthwise':
        y, groups = x, C
    else:
        y, groups = x.reshape(N * C, 1, *x.shape[2:]), 1
    # Either way the weight is [groups, 1, ...]: one filter per channel, or the single channel of the folded batch.
    if up > 1:
        # Zero insertion + full convolution is a transposed convolution with stride `up` (length up*(L-1)+K);
        # output sample o of the op reads it at o + K - 1 - pad0, hence the pads below (negative = crop).
        stride[axis] = up
        y = F.conv_transpose3d(y, k.reshape(shape).expand(groups, -1, -1, -1, -1), stride=stride, groups=groups)
        y = _pad_or_crop(y, axis, pad0 - (K - 1), pad1 + up - K)
        if down > 1:
            index = [slice(None)] * 5
            index[2 + axis] = slice(None, None, down)
            y = y[tuple(index)]
    else:
        # Pad, correlate with the flipped taps, and let the stride keep every down-th sample.
        stride[axis] = down
        y = F.conv3d(_pad_or_crop(y, axis, pad0, pad1), k.flip(0).reshape(shape).expand(groups, -1, -1, -1, -1),
                     stride=stride, groups=groups)
    return y.reshape(N, C, *y.shape[2:])


def upfirdn3d(
    x: torch.Tensor,                    # Volumes [N, C, D, H, W].
    f: torch.Tensor,                    # 1D taps from setup_filter(); None = no filtering (one tap of 1).
    up: int = 1,                        # Integer upsampling factor (all axes).
    down: int = 1,                      # Integer downsampling factor (all axes).
    padding=0,                          # int (both sides of every axis) or [p0, p1] (every axis).
    gain: float = 1,                    # Overall gain of the 3D filter (up**3 keeps the mean for up > 1).
    flip_filter: bool = False,          # Correlate instead of convolving.
    pass_form: str = None,              # 'depthwise' or 'folded' (module docstring); None = by device.
) -> torch.Tensor:
    """Upsample, FIR-filter and downsample every spatial axis of a batch of volumes (module docstring)."""
    if x.ndim != 5:
        raise ValueError(f'upfirdn3d: needs [N, C, D, H, W], got {tuple(x.shape)}')
    form = _pass_form(x.device, pass_form)
    if f is None:
        f = torch.ones([1])
    pad0, pad1 = (padding, padding) if isinstance(padding, int) else (int(padding[0]), int(padding[1]))
    k = f.to(device=x.device, dtype=x.dtype)
    if flip_filter:
        k = k.flip(0)
    k = k * (float(gain) ** (1 / 3))
    for axis in range(3):
        x = _axis_pass(x, k, axis, up, down, pad0, pad1, form)
    return x


def upsample3d(x, f, up=2, padding=0, gain=1):
    """Upsample by ``up`` with filter ``f`` centred on the fine grid (output size in * up)."""
    taps = f.numel() if f is not None else 1
    return upfirdn3d(x, f, up=up, padding=[padding + (taps + up - 1) // 2, padding + (taps - up) // 2],
                     gain=gain * up ** 3)


def downsample3d(x, f, down=2, padding=0, gain=1):
    """Low-pass filter with ``f`` and keep every ``down``-th sample (output size in // down)."""
    taps = f.numel() if f is not None else 1
    return upfirdn3d(x, f, down=down, padding=[padding + (taps - down + 1) // 2, padding + (taps - down) // 2],
                     gain=gain)


def conv3d_resample(
    x: torch.Tensor,                    # Input [N, C_in, D, H, W].
    w: torch.Tensor,                    # Weight [C_out, C_in / groups, k, k, k] (cubic kernel).
    f: torch.Tensor = None,             # 1D FIR filter for up/down; None = no filtering.
    up: int = 1,                        # 1 or an integer upsampling factor.
    down: int = 1,                      # 1 or an integer downsampling factor.
    padding: int = 0,                   # Padding of the convolution (k // 2 keeps the size).
    groups: int = 1,                    # Groups of the convolution.
    flip_weight: bool = True,           # True = correlation (torch's conv3d), False = true convolution.
) -> torch.Tensor:
    """A 3D convolution fused with FIR resampling, with the semantics of conv2d_resample:

    up > 1:   conv3d(upsample3d(x, f, up, padding), w) computed as a transposed convolution + filter;
    down > 1: conv3d(filter(pad(x)), w, stride=down) (the filter and the valid conv commute).
    """
    if x.ndim != 5 or w.ndim != 5:
        raise ValueError(f'conv3d_resample: needs 5-D x and w, got {tuple(x.shape)}, {tuple(w.shape)}')
    if up > 1 and down > 1:
        raise ValueError('conv3d_resample: does either up or down, not both')
    out_channels, _, k = w.shape[:3]
    taps = f.numel() if f is not None else 1
    if not flip_weight:
        w = w.flip([2, 3, 4])

    if up == 1 and down == 1:
        return F.conv3d(x, w, padding=padding, groups=groups)

    if down > 1:
        p0, p1 = padding + (taps - down + 1) // 2, padding + (taps - down) // 2
        if k == 1:  # Pointwise: filter and decimate first, then mix channels at the low resolution.
            x = upfirdn3d(x, f, down=down, padding=[p0, p1])
            return F.conv3d(x, w, groups=groups)
        x = upfirdn3d(x, f, padding=[p0, p1])
        return F.conv3d(x, w, stride=down, groups=groups)

    p0, p1 = padding + (taps + up - 1) // 2, padding + (taps - up) // 2
    if k == 1:  # Pointwise: mix channels at the low resolution, then upsample.
        x = F.conv3d(x, w, groups=groups)
        return upfirdn3d(x, f, up=up, padding=[p0, p1], gain=up ** 3)
    # Valid conv of the zero-inserted signal = transposed conv with the flipped kernel; the filter absorbs the
    # offset of the transposed conv's output as padding (see torch_utils/ops/conv2d_resample.py).
    if groups == 1:
        wt = w.transpose(0, 1)
    else:
        wt = w.reshape(groups, out_channels // groups, -1, k, k, k).transpose(1, 2).reshape(-1, out_channels // groups, k, k, k)
    x = F.conv_transpose3d(x, wt.flip([2, 3, 4]), stride=up, groups=groups)
    return upfirdn3d(x, f, padding=[p0 - k + 1, p1 + up - k], gain=up ** 3)
