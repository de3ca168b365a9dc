"""conv2d_resample: a convolution fused with FIR up- or downsampling, as in StyleGAN2's layers.

StyleGAN2 (Karras et al., CVPR 2020, App. B) upsamples with a transposed convolution followed by a FIR
filter, and downsamples with a FIR filter followed by a strided convolution; both are rewrites of the naive
composition below that skip multiplications by inserted zeros and by discarded outputs.

Semantics (what every path computes), with f the FIR filter (taps fw x fh) and P the total padding:

    up > 1:    t = upfirdn2d(x, f, up=up, padding=P, gain=up**2)     else t = pad(x, P)
               t = conv2d(t, w)                                      (valid, no padding)
    down > 1:  t = upfirdn2d(t, f, down=down)                        (valid, no padding)

    P = padding + [(fw + up - 1) // 2, (fw - up) // 2, ...]    if up > 1    (centre f on the upsampled grid)
                + [(fw - down + 1) // 2, (fw - down) // 2, ...] if down > 1  (centre f on the kept samples)

so that up=2 with padding=k//2 doubles the size and down=2 with padding=k//2 halves it. For up > 1 this is
exactly conv2d(upsample2d(x, f, up, padding), w).
"""

from . import conv2d_gradfix
from . import upfirdn2d
from .upfirdn2d import _parse_padding, _get_filter_size


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    """conv2d (correlation when flip_weight, true convolution otherwise) or its transpose, via gradfix."""
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return conv2d_gradfix.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return conv2d_gradfix.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def conv2d_resample(
    x,                  # Input [N, C_in, H, W].
    w,                  # Weight [C_out, C_in / groups, kh, kw].
    f=None,             # FIR filter from upfirdn2d.setup_filter; None = box of one tap.
    up=1,               # Integer upsampling factor.
    down=1,             # Integer downsampling factor.
    padding=0,          # Padding of the input: int, [x, y] or [x0, x1, y0, y1].
    groups=1,           # Groups of the convolution.
    flip_weight=True,   # True = correlation (torch's conv2d), False = true convolution.
    flip_filter=False,  # Passed on to upfirdn2d.
):
    """Convolve with optional resampling; returns [N, C_out, H', W'] (see the module docstring)."""
    assert x.ndim == 4, f'conv2d_resample: x must be [N, C, H, W], got {tuple(x.shape)}'
    assert w.ndim == 4 and w.dtype == x.dtype, f'conv2d_resample: w must be 4D of the dtype of x, got {tuple(w.shape)} {w.dtype}'
    assert x.shape[1] == w.shape[1] * groups, f'conv2d_resample: x has {x.shape[1]} channels, w expects {w.shape[1] * groups}'
    assert isinstance(up, int) and up >= 1 and isinstance(down, int) and down >= 1, 'conv2d_resample: up/down must be ints >= 1'
    out_channels, _, kh, kw = w.shape
    fw, fh = _get_filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    pad = [px0, px1, py0, py1]

    # 1x1 kernels mix channels pointwise, so they commute with filtering and resampling: convolve at the
    # lower of the two resolutions.
    if kw == 1 and kh == 1 and up == 1 and down > 1:
        x = upfirdn2d.upfirdn2d(x, f, down=down, padding=pad, flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d.upfirdn2d(x, f, up=up, padding=pad, gain=up ** 2, flip_filter=flip_filter)

    # Downsampling: the valid filter and the valid conv of the same padded signal commute, and keeping every
    # down-th sample of the conv is a strided conv.
    if up == 1 and down > 1:
        x = upfirdn2d.upfirdn2d(x, f, padding=pad, flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)

    # Upsampling: a valid conv of the zero-inserted signal is a transposed conv with stride `up` and the
    # spatially flipped kernel (T[t] = sum_i x[i] k'[t - up*i]); output o of the valid conv reads
    # T[o + k - 1 - pad0], and the filter, which commutes with the conv, absorbs that shift as padding.
    if up > 1:
        if groups == 1:
            wt = w.transpose(0, 1)
        else:  # [C_out, C_in/g, kh, kw] -> [C_in, C_out/g, kh, kw], group by group.
            wt = w.reshape(groups, out_channels // groups, -1, kh, kw).transpose(1, 2).reshape(-1, out_channels // groups, kh, kw)
        x = _conv(x, wt, stride=up, groups=groups, transpose=True, flip_weight=(not flip_weight))
        x = upfirdn2d.upfirdn2d(x, f, padding=[px0 - kw + 1, px1 + up - kw, py0 - kh + 1, py1 + up - kh],
                                gain=up ** 2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d.upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x

    # No resampling: let the conv pad when it can (symmetric, non-negative).
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    x = upfirdn2d.upfirdn2d(x, None, padding=pad)
    return _conv(x, w, groups=groups, flip_weight=flip_weight)

