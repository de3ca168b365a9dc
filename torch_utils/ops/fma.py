"""fma: a * b + c as one fused op with a memory-light gradient.

Used by StyleGAN2's modulated convolution with fused_modconv=False (Karras et al., CVPR 2020, Sec. 2.2:
x * styles ... + noise): torch.addcmul skips the a*b temporary, and the backward keeps only a and b.
"""

import torch


def fma(a, b, c):
    """a * b + c with broadcasting; gradients are summed back to each input's shape."""
    return _FusedMultiplyAdd.apply(a, b, c)


def _unbroadcast(x, shape):
    """Sum x over the dims that broadcasting expanded, so that the result has `shape`."""
    extra = x.ndim - len(shape)
    assert extra >= 0, f'fma: gradient of rank {x.ndim} cannot reduce to shape {tuple(shape)}'
    dims = list(range(extra)) + [i + extra for i, n in enumerate(shape) if n == 1 and x.shape[i + extra] != 1]
    if dims:
        x = x.sum(dims, keepdim=True)
    if extra:
        x = x.reshape(shape)
    assert x.shape == shape, f'fma: reduced gradient {tuple(x.shape)} != {tuple(shape)}'
    return x


class _FusedMultiplyAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        out = torch.addcmul(c, a, b)
        ctx.save_for_backward(a, b)
        ctx.c_shape = c.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        # Built from differentiable ops through the saved inputs, so the gradient can be differentiated again.
        a, b = ctx.saved_tensors
        da = db = dc = None
        if ctx.needs_input_grad[0]:
            da = _unbroadcast(dout * b, a.shape)
        if ctx.needs_input_grad[1]:
            db = _unbroadcast(dout * a, b.shape)
        if ctx.needs_input_grad[2]:
            dc = _unbroadcast(dout, ctx.c_shape)
        return da, db, dc
