"""upfirdn2d: upsample, FIR-filter and downsample a batch of 2D images in one op.

The resampling filters of StyleGAN2 (Karras et al., CVPR 2020, Sec. 2 and App. B) and of the ADA
augmentation pipeline (Karras et al., NeurIPS 2020, App. C) are all built from this op:

    1. upsample by inserting up-1 zeros after every sample (per axis),
    2. pad with zeros (negative padding crops),
    3. convolve with the FIR filter f (a true convolution; flip_filter=True makes it a correlation),
    4. downsample by keeping every down-th sample.

Output size per axis: (in * up + pad0 + pad1 - taps) // down + 1.

Two implementations agree to float tolerance: a pure-PyTorch reference (runs anywhere, differentiable to
any order) and a CUDA plugin (upfirdn2d.cpp / .cu) used for CUDA tensors when impl='cuda' and it builds.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from .. import custom_ops

_plugin = custom_ops.LazyPlugin(
    op_name='upfirdn2d',
    module_name='mri_gan_upfirdn2d_plugin',
    sources=['upfirdn2d.cpp', 'upfirdn2d.cu'],
    headers=['upfirdn2d.h'],
    source_dir=os.path.dirname(__file__),
    extra_cuda_cflags=['--use_fast_math'],
)

# ----------------------------------------------------------------------------------------------------------
# Argument parsing.


def _parse_scaling(scaling):
    """int or [sx, sy] -> (sx, sy)."""
    if isinstance(scaling, int):
        scaling = [scaling, scaling]
    assert isinstance(scaling, (list, tuple)) and len(scaling) == 2, f'upfirdn2d: bad up/down factor {scaling!r}'
    sx, sy = (int(s) for s in scaling)
    assert sx >= 1 and sy >= 1, f'upfirdn2d: up/down factors must be >= 1, got {scaling!r}'
    return sx, sy


def _parse_padding(padding):
    """int, [px, py] or [px0, px1, py0, py1] -> (px0, px1, py0, py1)."""
    if isinstance(padding, int):
        padding = [padding, padding]
    assert isinstance(padding, (list, tuple)) and len(padding) in (2, 4), f'upfirdn2d: bad padding {padding!r}'
    if len(padding) == 2:
        padx, pady = padding
        padding = [padx, padx, pady, pady]
    return tuple(int(p) for p in padding)


def _get_filter_size(f):
    """(width, height) in taps of a filter from setup_filter (None = 1x1)."""
    if f is None:
        return 1, 1
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2), 'upfirdn2d: filter must be a 1D or 2D tensor'
    fw = f.shape[-1]
    fh = f.shape[0]
    return int(fw), int(fh)


def setup_filter(
    f,                              # Taps: list, array or tensor, 1D [taps] or 2D [taps, taps]; None = [1].
    device=torch.device('cpu'),     # Device of the result.
    normalize=True,                 # Scale so that the taps sum to 1 (a 2D separable filter to 1 overall).
    flip_filter=False,              # Flip the taps (turns the convolution into a correlation).
    gain=1,                         # Overall gain of the 2D filter; a 1D filter carries gain**0.5 per axis.
    separable=None,                 # True = 1D separable, False = 2D; None = keep 1D input separable.
):
    """Return a float32 filter tensor for upfirdn2d: 1D [taps] (separable) or 2D [taps_y, taps_x].

    A 1D filter stays separable by default (unlike the original StyleGAN2 code, which expands short ones):
    the result is the same and two 1D passes cost 2*taps instead of taps**2 per pixel on every backend.
    """
    if f is None:
        f = 1
    f = torch.as_tensor(np.asarray(f, dtype=np.float32) if not isinstance(f, torch.Tensor) else f,
                        dtype=torch.float32)
    assert f.ndim in (0, 1, 2), f'setup_filter: filter must have 0, 1 or 2 dims, got shape {tuple(f.shape)}'
    assert f.numel() > 0, 'setup_filter: filter is empty'
    if f.ndim == 0:
        f = f[np.newaxis]
    if separable is None:
        separable = (f.ndim == 1)
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    assert f.ndim == (1 if separable else 2), f'setup_filter: a 2D filter cannot be separable, shape {tuple(f.shape)}'
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f * (gain ** (f.ndim / 2))
    return f.to(device=device)


# ----------------------------------------------------------------------------------------------------------
# Reference implementation.


def _depthwise(x, k, stride=(1, 1)):
    """Correlate every channel of x [N, C, H, W] with each of the M kernels k [M, kh, kw] -> [N, C*M, H', W'].

    A grouped conv keeps all channels in one call (no Python loop); oneDNN/cuDNN have fast depthwise paths.
    """
    C = x.shape[1]
    M, kh, kw = k.shape
    w = k.reshape(M, 1, kh, kw).repeat(C, 1, 1, 1)  # Output channel c*M + m = channel c through kernel m.
    return F.conv2d(x, w, stride=(stride[1], stride[0]), groups=C)


def _pad_or_crop(x, pads):
    """F.pad with [x0, x1, y0, y1]; a pure crop is a view (no copy of a possibly large upsampled tensor)."""
    if all(p <= 0 for p in pads):
        x0, x1, y0, y1 = (-p for p in pads)
        return x[:, :, y0:x.shape[2] - y1, x0:x.shape[3] - x1]
    return F.pad(x, pads)


def _ref_pass(x, k, up, down, padding):
    """One upfirdn pass over x [N, C, H, W] with a true-convolution kernel k [kh, kw] (kh or kw may be 1).

    Without upsampling: pad (negative crops), correlate with the flipped kernel, and let the conv stride do
    the downsampling, so that only kept samples are computed.

    With upsampling, per axis (s = up, K taps): zero insertion followed by a full convolution is
    T[t] = sum_i x[i] k[t - s*i], a transposed convolution with stride s (length s*(H-1) + K). Output o of
    the op reads T[o + K - 1 - pad0], so T is padded by pad0 - (K - 1) in front and by pad1 + s - K behind
    (negative = crop). For few channels the polyphase form is faster on CPU (measured): writing t = s*a + r,
    T[s*a + r] = sum_j x[a - j] k_r[j] with phase kernels k_r[j] = k[s*j + r] (Kp = ceil(K / s) taps):
    s plain convolutions at the input resolution, interleaved (length s*(H + Kp - 1); back pad
    pad1 - s*(Kp - 1)), which never multiply the inserted zeros.
    """
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    kh, kw = k.shape
    N, C = x.shape[:2]
    if kh == 1 and kw == 1 and upx == 1 and upy == 1:
        x = F.pad(x, [px0, px1, py0, py1]) * k.reshape([])
        return x[:, :, ::downy, ::downx] if (downx > 1 or downy > 1) else x
    if upx == 1 and upy == 1:
        return _depthwise(F.pad(x, [px0, px1, py0, py1]), k.flip([0, 1])[np.newaxis], stride=(downx, downy))

    if C >= _POLYPHASE_MAX_CHANNELS:
        # Many channels: a depthwise transposed conv (zero insertion + full convolution in one op).
        w = k[np.newaxis, np.newaxis].repeat(C, 1, 1, 1)
        t = F.conv_transpose2d(x, w, stride=(upy, upx), groups=C)  # Length s*(H-1) + K per axis.
        t = _pad_or_crop(t, [px0 - (kw - 1), px1 + upx - kw, py0 - (kh - 1), py1 + upy - kh])
    else:
        # Few channels (images): the polyphase form as one grouped conv producing all phases, interleaved.
        kpw, kph = -(-kw // upx), -(-kh // upy)
        kpad = F.pad(k, [0, kpw * upx - kw, 0, kph * upy - kh])
        phases = kpad.reshape(kph, upy, kpw, upx).permute(1, 3, 0, 2).flip([2, 3])  # [upy, upx, kph, kpw]
        y = _depthwise(F.pad(x, [kpw - 1, kpw - 1, kph - 1, kph - 1]), phases.reshape(upy * upx, kph, kpw))
        Ha, Wa = y.shape[2:]
        t = y.reshape(N, C, upy, upx, Ha, Wa).permute(0, 1, 4, 2, 5, 3).reshape(N, C, Ha * upy, Wa * upx)
        t = _pad_or_crop(t, [px0 - (kw - 1), px1 - upx * (kpw - 1), py0 - (kh - 1), py1 - upy * (kph - 1)])
    return t[:, :, ::downy, ::downx] if (downx > 1 or downy > 1) else t


def _upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain):
    """Pure-PyTorch upfirdn2d, differentiable to any order (pads, grouped convs, reshapes, slices)."""
    assert isinstance(x, torch.Tensor) and x.ndim == 4, f'upfirdn2d: x must be [N, C, H, W], got {tuple(x.shape)}'
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    assert isinstance(f, torch.Tensor) and f.ndim in (1, 2), 'upfirdn2d: filter must be a 1D or 2D tensor'
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    # True-convolution kernel in the compute dtype (fp16 stays fp16 on CUDA; CPU convs accept fp16 too).
    k = f.to(device=x.device, dtype=x.dtype)
    if flip_filter:
        k = k.flip(list(range(k.ndim)))
    if k.ndim == 1 and k.numel() < _SEPARABLE_MIN_TAPS:
        k = torch.outer(k, k)  # Short filters: one 2D depthwise pass beats two 1D passes (measured on CPU).
    if k.ndim == 1:
        k = k * (gain ** 0.5)
        x = _ref_pass(x, k[np.newaxis, :], (upx, 1), (downx, 1), (px0, px1, 0, 0))
        return _ref_pass(x, k[:, np.newaxis], (1, upy), (1, downy), (0, 0, py0, py1))
    return _ref_pass(x, k * gain, (upx, upy), (downx, downy), (px0, px1, py0, py1))


_POLYPHASE_MAX_CHANNELS = 8  # Below this channel count upsampling uses the polyphase form (see _ref_pass).
_SEPARABLE_MIN_TAPS = 8  # From this length on, two 1D passes (2*taps MACs) beat one 2D pass (taps**2).


# ----------------------------------------------------------------------------------------------------------
# CUDA implementation: the plugin kernel wrapped in an autograd Function that is its own adjoint.


def _plugin_kernel(x, f, up, down, padding, flip_filter, gain):
    """Run the compiled kernel (no autograd). A separable filter is two launches, one per axis."""
    plugin = _plugin.module
    upx, upy = up
    downx, downy = down
    px0, px1, py0, py1 = padding
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    k = f.to(device=x.device, dtype=(torch.float64 if x.dtype == torch.float64 else torch.float32))
    if flip_filter:
        k = k.flip(list(range(k.ndim)))
    if k.ndim == 1:
        k = k * (gain ** 0.5)
        y = plugin.upfirdn2d(x, k[np.newaxis, :].contiguous(), upx, 1, downx, 1, px0, px1, 0, 0)
        return plugin.upfirdn2d(y, k[:, np.newaxis].contiguous(), 1, upy, 1, downy, 0, 0, py0, py1)
    return plugin.upfirdn2d(x, (k * gain).contiguous(), upx, upy, downx, downy, px0, px1, py0, py1)


class _Upfirdn2dFunction(torch.autograd.Function):
    """upfirdn2d as a linear map U; backward applies the adjoint U^T, itself an upfirdn2d, through this same
    Function, so gradients of any order exist.

    Derivation, per axis, with s = up, d = down, K taps, input length H, output length Ho. The op is
        y[o] = sum_i x[i] * f[o*d + K - 1 - p0 - s*i]           (f the true-convolution kernel)
    because output o reads padded position o*d + j (j = 0..K-1) against tap K-1-j, and padded position m
    holds x[i] when m - p0 = s*i. Hence
        dL/dx[i] = sum_o g[o] * f[o*d + K - 1 - p0 - s*i] = sum_o g[o] * fflip[s*i + p0 - o*d],
    with fflip[t] = f[K-1-t]. That is the same formula with g as input, fflip as kernel, up = d, down = s
    and front padding q0 where K - 1 - q0 = p0, i.e. q0 = K - 1 - p0. The back padding only sets the length:
    q1 = H*s - Ho*d + p0 makes the pre-downsampling length exactly H*s, so the result has H samples. The
    gain is a scalar, its own adjoint; flipping the kernel is toggling flip_filter.
    """

    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain, kernel):
        y = kernel(x, f, up, down, padding, flip_filter, gain)
        ctx.save_for_backward(f)
        ctx.args = (up, down, padding, flip_filter, gain, kernel, x.shape, y.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        f, = ctx.saved_tensors
        up, down, padding, flip_filter, gain, kernel, x_shape, y_shape = ctx.args
        dx = None
        if ctx.needs_input_grad[0]:
            fw, fh = _get_filter_size(f)
            (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, padding
            H, W = x_shape[2], x_shape[3]
            Ho, Wo = y_shape[2], y_shape[3]
            adjoint_padding = (fw - 1 - px0, W * upx - Wo * downx + px0,
                               fh - 1 - py0, H * upy - Ho * downy + py0)
            dx = _Upfirdn2dFunction.apply(dy, f, down, up, adjoint_padding, not flip_filter, gain, kernel)
            assert dx.shape == x_shape, f'upfirdn2d: adjoint shape {tuple(dx.shape)} != input shape {tuple(x_shape)}'
        return dx, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Public API.


def _use_plugin(x, f, impl):
    assert impl in ('ref', 'cuda'), f"upfirdn2d: impl must be 'ref' or 'cuda', got {impl!r}"
    if impl != 'cuda' or not x.is_cuda:
        return False
    if f is not None and f.requires_grad:
        return False  # The plugin has no gradient for the taps; the reference does.
    return _plugin.get() is not None


def upfirdn2d(
    x,                  # Images [N, C, H, W], any float dtype.
    f,                  # Filter from setup_filter: 1D [taps] separable or 2D [taps_y, taps_x]; None = identity.
    up=1,               # Upsampling factor: int or [x, y].
    down=1,             # Downsampling factor: int or [x, y].
    padding=0,          # Padding after upsampling: int, [x, y] or [x0, x1, y0, y1]; negative crops.
    flip_filter=False,  # False = convolution, True = correlation.
    gain=1,             # Overall scaling of the signal.
    impl='cuda',        # 'cuda' = plugin for CUDA tensors when available, else reference; 'ref' = reference.
):
    """Upsample, pad, FIR-filter and downsample; returns [N, C, H', W'] in the dtype of x."""
    up, down, padding = _parse_scaling(up), _parse_scaling(down), _parse_padding(padding)
    assert isinstance(x, torch.Tensor) and x.ndim == 4, f'upfirdn2d: x must be [N, C, H, W], got {getattr(x, "shape", x)!r}'
    if _use_plugin(x, f, impl):
        return _Upfirdn2dFunction.apply(x, f, up, down, padding, flip_filter, gain, _plugin_kernel)
    return _upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)


def filter2d(x, f, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Filter without resampling; the output has the size of the input plus the given padding."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, flip_filter=flip_filter, gain=gain, impl=impl)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Upsample by `up` (output size in * up plus padding), with gain up**2 so the mean is preserved."""
    upx, upy = _parse_scaling(up)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    # Pads that centre the filter on the upsampled grid: (in*up + pad0 + pad1 - taps + 1) == in*up.
    p = [px0 + (fw + upx - 1) // 2, px1 + (fw - upx) // 2, py0 + (fh + upy - 1) // 2, py1 + (fh - upy) // 2]
    return upfirdn2d(x, f, up=(upx, upy), padding=p, flip_filter=flip_filter, gain=gain * upx * upy, impl=impl)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1, impl='cuda'):
    """Downsample by `down` (output size in / down for divisible sizes, plus padding / down)."""
    downx, downy = _parse_scaling(down)
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _get_filter_size(f)
    p = [px0 + (fw - downx + 1) // 2, px1 + (fw - downx) // 2, py0 + (fh - downy + 1) // 2, py1 + (fh - downy) // 2]
    return upfirdn2d(x, f, down=(downx, downy), padding=p, flip_filter=flip_filter, gain=gain, impl=impl)
