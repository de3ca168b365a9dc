"""bias_act: add a bias, apply an activation, scale and clamp, fused in one op.

Every StyleGAN2 layer (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020)
ends in `clamp(act(x + b) * gain)`: the gain keeps activations at unit variance (equalized learning rate,
Karras et al. 2018, Sec. 4.1: sqrt(2) for (leaky) ReLU) and the clamp bounds fp16 activations (StyleGAN2-ADA,
Karras et al. 2020, App. D.2).

Two implementations agree to float tolerance: a pure-PyTorch reference and a CUDA plugin (bias_act.cpp /
.cu, one elementwise kernel with three modes: value, first and second derivative). The plugin's autograd
Functions support gradients of second order (R1 and path-length regularisation need them).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib

from .. import custom_ops

def _swish(x, **_):
    return torch.sigmoid(x) * x


activation_funcs = {
    # cuda_idx: the activation's index in bias_act.h. ref: the saved tensor the plugin's gradient is computed
    # from ('x', the input; y is recomputed in the kernel, so nothing of the output's size is kept).
    # has_2nd_grad: whether the second derivative is nonzero somewhere (False = piecewise linear).
    'linear':   dnnlib.EasyDict(func=lambda x, **_: x,                          def_alpha=0,   def_gain=1,          cuda_idx=1, ref='x', has_2nd_grad=False),
    'relu':     dnnlib.EasyDict(func=lambda x, **_: F.relu(x),                  def_alpha=0,   def_gain=np.sqrt(2), cuda_idx=2, ref='x', has_2nd_grad=False),
    'lrelu':    dnnlib.EasyDict(func=lambda x, alpha, **_: F.leaky_relu(x, alpha), def_alpha=0.2, def_gain=np.sqrt(2), cuda_idx=3, ref='x', has_2nd_grad=False),
    'tanh':     dnnlib.EasyDict(func=lambda x, **_: torch.tanh(x),              def_alpha=0,   def_gain=1,          cuda_idx=4, ref='x', has_2nd_grad=True),
    'sigmoid':  dnnlib.EasyDict(func=lambda x, **_: torch.sigmoid(x),           def_alpha=0,   def_gain=1,          cuda_idx=5, ref='x', has_2nd_grad=True),
    'elu':      dnnlib.EasyDict(func=lambda x, alpha, **_: F.elu(x, alpha),     def_alpha=1.0, def_gain=1,          cuda_idx=6, ref='x', has_2nd_grad=True),
    'selu':     dnnlib.EasyDict(func=lambda x, **_: F.selu(x),                  def_alpha=0,   def_gain=1,          cuda_idx=7, ref='x', has_2nd_grad=True),
    'softplus': dnnlib.EasyDict(func=lambda x, **_: F.softplus(x),              def_alpha=0,   def_gain=1,          cuda_idx=8, ref='x', has_2nd_grad=True),
    'swish':    dnnlib.EasyDict(func=_swish,                                    def_alpha=0,   def_gain=np.sqrt(2), cuda_idx=9, ref='x', has_2nd_grad=True),
}

_plugin = custom_ops.LazyPlugin(
    op_name='bias_act',
    module_name='mri_gan_bias_act_plugin',
    sources=['bias_act.cpp', 'bias_act.cu'],
    headers=['bias_act.h'],
    source_dir=os.path.dirname(__file__),
    extra_cuda_cflags=['--use_fast_math'],
)

_null_tensors = dict()  # device -> empty tensor standing for "absent" in plugin calls.


def _null(x):
    key = (x.device, x.dtype)
    if key not in _null_tensors:
        _null_tensors[key] = torch.empty([0], device=x.device, dtype=x.dtype)
    return _null_tensors[key]


def _resolve(x, b, dim, act, alpha, gain, clamp):
    """Validate and fill in the defaults; returns (dim, spec, alpha, gain, clamp) as plain Python numbers."""
    assert isinstance(x, torch.Tensor), 'bias_act: x must be a tensor'
    assert act in activation_funcs, f'bias_act: unknown activation {act!r}; one of {sorted(activation_funcs)}'
    spec = activation_funcs[act]
    dim = dim % x.ndim if x.ndim > 0 else 0
    if b is not None:
        assert isinstance(b, torch.Tensor) and b.ndim == 1, 'bias_act: b must be a 1D tensor'
        assert b.shape[0] == x.shape[dim], f'bias_act: b has {b.shape[0]} entries, x has {x.shape[dim]} along dim {dim}'
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    clamp = float(clamp if clamp is not None else -1)
    return dim, spec, alpha, gain, clamp


def bias_act(
    x,              # Input tensor, any shape and float dtype.
    b=None,         # Bias [x.shape[dim]], broadcast along `dim`; None = no bias.
    dim=1,          # The dim of x that b runs along.
    act='linear',   # Name of the activation (a key of activation_funcs).
    alpha=None,     # Activation parameter (lrelu slope, elu scale); None = its default.
    gain=None,      # Scaling after the activation; None = the activation's default gain.
    clamp=None,     # Clamp the output to [-clamp, clamp]; None = no clamping.
    impl='cuda',    # 'cuda' = plugin for CUDA tensors when available, else reference; 'ref' = reference.
):
    """clamp(act(x + b) * gain, -clamp, clamp); returns a tensor shaped and typed like x."""
    assert impl in ('ref', 'cuda'), f"bias_act: impl must be 'ref' or 'cuda', got {impl!r}"
    if impl == 'cuda' and x.is_cuda and x.ndim > 0 and _plugin.get() is not None:
        dim, spec, alpha, gain, clamp = _resolve(x, b, dim, act, alpha, gain, clamp)
        if b is not None:
            b = b.to(x.dtype)
        return _BiasActCuda.apply(x, b, spec.cuda_idx, spec.has_2nd_grad, alpha, gain, clamp, dim)
    return _bias_act_ref(x, b, dim, act, alpha, gain, clamp)


def _bias_act_ref(x, b=None, dim=1, act='linear', alpha=None, gain=None, clamp=None):
    """Pure-PyTorch bias_act; differentiable to any order."""
    dim, spec, alpha, gain, clamp = _resolve(x, b, dim, act, alpha, gain, clamp)
    # Without autograd (generation, metrics) gain and clamp may work in place on a tensor this function made:
    # two fewer full-size allocations.
    no_graph = not (torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)))
    input_tensor = x
    if b is not None:
        x = x + b.to(x.dtype).reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha=alpha)
    in_place = no_graph and x is not input_tensor
    if gain != 1:
        x = x.mul_(gain) if in_place else x * gain
    if clamp >= 0:
        # hardtanh is clamp with a one-kernel backward (clamp's backward builds masks): ~5% of a CPU training step.
        # Its gradient is 0 at exactly +-clamp where clamp's (and the plugin's, bias_act.h) is 1: a measure-zero
        # difference that the plugin-vs-reference tests on random data do not reach.
        x = F.hardtanh_(x, -clamp, clamp) if in_place else F.hardtanh(x, -clamp, clamp)
    return x


# ----------------------------------------------------------------------------------------------------------
# CUDA implementation. Only x and b are saved; the kernel recomputes z = x + b, the activation and the clamp
# mask in each mode, so the backward keeps nothing of the output's size besides the input itself.


def _reduce_to_bias(dz, dim):
    return dz.sum([i for i in range(dz.ndim) if i != dim])


def _plugin_call(x, b, g, h, act_idx, alpha, gain, clamp, mode, dim):
    null = _null(x)
    return _plugin.module.bias_act(x, null if b is None else b, null if g is None else g, null if h is None else h,
                                   act_idx, alpha, gain, clamp, mode, dim)


class _BiasActCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, act_idx, has_2nd_grad, alpha, gain, clamp, dim):
        x = x.contiguous()
        b = b.contiguous() if b is not None else None
        y = _plugin_call(x, b, None, None, act_idx, alpha, gain, clamp, 0, dim)
        ctx.save_for_backward(x, b)
        ctx.args = (act_idx, has_2nd_grad, alpha, gain, clamp, dim)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        dz = _BiasActCudaGrad.apply(dy.contiguous(), x, b, *ctx.args)  # dL/d(x + b)
        dx = dz if ctx.needs_input_grad[0] else None
        db = _reduce_to_bias(dz, ctx.args[-1]) if ctx.needs_input_grad[1] else None
        return dx, db, None, None, None, None, None, None


class _BiasActCudaGrad(torch.autograd.Function):
    """dz = dy * act'(x + b) * gain * mask: linear in dy, so its own gradient w.r.t. dy is the same kernel
    (mode 1); w.r.t. x and b it is dy * act''(x + b) * gain * mask (mode 2), zero for piecewise-linear
    activations. Third-order gradients are not provided (once_differentiable raises if asked)."""

    @staticmethod
    def forward(ctx, dy, x, b, act_idx, has_2nd_grad, alpha, gain, clamp, dim):
        dz = _plugin_call(x, b, dy, None, act_idx, alpha, gain, clamp, 1, dim)
        ctx.save_for_backward(dy, x, b)
        ctx.args = (act_idx, has_2nd_grad, alpha, gain, clamp, dim)
        return dz

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ddz):
        dy, x, b = ctx.saved_tensors
        act_idx, has_2nd_grad, alpha, gain, clamp, dim = ctx.args
        ddz = ddz.contiguous()
        d_dy = d_x = d_b = None
        if ctx.needs_input_grad[0]:
            d_dy = _plugin_call(x, b, ddz, None, act_idx, alpha, gain, clamp, 1, dim)
        if has_2nd_grad and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            d_z = _plugin_call(x, b, ddz, dy, act_idx, alpha, gain, clamp, 2, dim)
            d_x = d_z if ctx.needs_input_grad[1] else None
            d_b = _reduce_to_bias(d_z, dim) if ctx.needs_input_grad[2] else None
        return d_dy, d_x, d_b, None, None, None, None, None, None
