"""conv2d / conv_transpose2d with a backward that is itself differentiable, and that can skip weight gradients.

R1 regularisation (Mescheder et al., "Which Training Methods for GANs do actually Converge?", ICML 2018) and
path-length regularisation (Karras et al., CVPR 2020, Sec. 3.2) differentiate a gradient: the first backward
(d output / d input) runs with create_graph=True and a second backward goes through it. That first backward
never needs weight gradients; inside `no_weight_gradients()` this module skips them, which saves a third
of the convolution work of those passes (the StyleGAN2-ADA trick, Karras et al., NeurIPS 2020).

The gradient w.r.t. the input of a convolution is a transposed convolution with the same weight (and vice
versa); both are computed through this module's own Function, so gradients of any order exist. Weight
gradients use torch's own `aten.convolution_backward` (found by feature test; `torch.nn.grad` and plain
autograd as fallbacks), which torch can differentiate again.
"""

import contextlib

import torch
import torch.nn.functional as F

enabled = True                      # False = plain F.conv2d / F.conv_transpose2d (no weight-gradient skipping).
weight_gradients_disabled = False   # Set by no_weight_gradients().

_HAS_CONVOLUTION_BACKWARD = hasattr(torch.ops.aten, 'convolution_backward')
_HAS_NN_GRAD = hasattr(torch.nn, 'grad') and hasattr(torch.nn.grad, 'conv2d_weight')


@contextlib.contextmanager
def no_weight_gradients(disable=True):
    """Within the block, the convolutions of this module return no gradient for their weights."""
    global weight_gradients_disabled
    old = weight_gradients_disabled
    if disable:
        weight_gradients_disabled = True
    try:
        yield
    finally:
        weight_gradients_disabled = old


def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    assert isinstance(v, (tuple, list)) and len(v) == 2, f'conv2d_gradfix: {name} must be an int or a pair, got {v!r}'
    return (int(v[0]), int(v[1]))


def conv2d(
    input,          # [N, C_in, H, W].
    weight,         # [C_out, C_in / groups, kh, kw].
    bias=None,      # [C_out] or None.
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
):
    """Same result as F.conv2d."""
    if not enabled:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _ConvOp.apply(input, weight, bias, False, _pair(stride, 'stride'), _pair(padding, 'padding'), (0, 0),
                         _pair(dilation, 'dilation'), groups)


def conv_transpose2d(
    input,              # [N, C_in, H, W].
    weight,             # [C_in, C_out / groups, kh, kw].
    bias=None,          # [C_out] or None.
    stride=1,
    padding=0,
    output_padding=0,
    groups=1,
    dilation=1,
):
    """Same result as F.conv_transpose2d (same argument order)."""
    if not enabled:
        return F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _ConvOp.apply(input, weight, bias, True, _pair(stride, 'stride'), _pair(padding, 'padding'),
                         _pair(output_padding, 'output_padding'), _pair(dilation, 'dilation'), groups)


def _forward(x, w, b, transpose, stride, padding, output_padding, dilation, groups):
    if transpose:
        return F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _weight_grad(dy, x, w, transpose, stride, padding, output_padding, dilation, groups):
    """dL/dw for y = conv(x, w); differentiable again when torch's op is (it is in torch 2.x)."""
    if _HAS_CONVOLUTION_BACKWARD:
        return torch.ops.aten.convolution_backward(
            dy, x, w, None, list(stride), list(padding), list(dilation), transpose, list(output_padding), groups,
            [False, True, False])[1]
    if _HAS_NN_GRAD:
        if not transpose:
            return torch.nn.grad.conv2d_weight(x, w.shape, dy, stride, padding, dilation, groups)
        # y = A_w^T x (A_w = conv2d with w), so <g, A_w^T x> = <A_w g, x>: the roles of input and gradient swap.
        return torch.nn.grad.conv2d_weight(dy, w.shape, x, stride, padding, dilation, groups)
    with torch.enable_grad():  # Last resort: differentiate the forward op itself.
        w_ = w.detach().requires_grad_(True)
        y = _forward(x.detach(), w_, None, transpose, stride, padding, output_padding, dilation, groups)
        return torch.autograd.grad(y, w_, dy, create_graph=torch.is_grad_enabled())[0]


class _ConvOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, transpose, stride, padding, output_padding, dilation, groups):
        assert x.ndim == 4 and w.ndim == 4, f'conv2d_gradfix: input and weight must be 4D, got {tuple(x.shape)}, {tuple(w.shape)}'
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        ctx.args = (transpose, stride, padding, output_padding, dilation, groups)
        ctx.x_shape = x.shape
        return _forward(x, w, b, transpose, stride, padding, output_padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        transpose, stride, padding, output_padding, dilation, groups = ctx.args
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if transpose:
                # The adjoint of a transposed conv is the plain conv with the same weight and geometry.
                dx = _ConvOp.apply(dy, w, None, False, stride, padding, (0, 0), dilation, groups)
            else:
                # The adjoint of a conv is the transposed conv; output_padding restores the exact input size
                # (a strided conv maps several input sizes to one output size).
                op = [ctx.x_shape[i + 2] - ((dy.shape[i + 2] - 1) * stride[i] - 2 * padding[i]
                                            + dilation[i] * (w.shape[i + 2] - 1) + 1) for i in range(2)]
                dx = _ConvOp.apply(dy, w, None, True, stride, padding, tuple(op), dilation, groups)
            assert dx.shape == ctx.x_shape, f'conv2d_gradfix: input gradient {tuple(dx.shape)} != input {tuple(ctx.x_shape)}'
        if ctx.needs_input_grad[1] and not weight_gradients_disabled:
            dw = _weight_grad(dy, x, w, transpose, stride, padding, output_padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            db = dy.sum([0, 2, 3])
        return dx, dw, db, None, None, None, None, None, None
