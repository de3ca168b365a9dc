"""Tests of torch_utils.ops and torch_utils.custom_ops.

Each reference op is compared with an independent computation (scipy / numpy loops / torch's own ops), the
CUDA autograd wrappers are exercised on CPU with stand-in kernels (so their adjoint and second-order logic
is checked everywhere), and the real plugins are compared with the references where a GPU exists.
"""

import itertools
import os
import types
import warnings

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from torch_utils import custom_ops
from torch_utils.ops import bias_act as bias_act_mod
from torch_utils.ops import conv2d_gradfix, conv2d_resample, fma, grid_sample_gradfix, resample, upfirdn2d, upfirdn3d

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _gradcheck(fn, inputs):
    # fast_mode checks random projections of the Jacobian: the same bugs, at a fraction of the cost.
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _gradgradcheck(fn, inputs):
    return torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------------------------------------
# upfirdn2d


def _numpy_upfirdn2d(x, f2d, up, down, pad, flip_filter, gain):
    """Zero insertion, pad/crop, scipy true 2D convolution, subsampling: the op's definition, literally."""
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, pad
    N, C, H, W = x.shape
    z = np.zeros([N, C, H * upy, W * upx])
    z[:, :, ::upy, ::upx] = x
    z = np.pad(z, [(0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))])
    z = z[:, :, max(-py0, 0):z.shape[2] - max(-py1, 0), max(-px0, 0):z.shape[3] - max(-px1, 0)]
    k = f2d[::-1, ::-1] if flip_filter else f2d
    out = np.stack([np.stack([scipy.signal.convolve2d(z[n, c], k, mode='valid') for c in range(C)]) for n in range(N)])
    return out[:, :, ::downy, ::downx] * gain


_UFD_CASES = [
    # up, down, padding, filter kind
    ((1, 1), (1, 1), (0, 0, 0, 0), '2d'),
    ((2, 2), (1, 1), (2, 1, 2, 1), 'sep4'),
    ((1, 1), (2, 2), (1, 1, 1, 1), 'sep4'),
    ((3, 1), (1, 2), (2, -1, 0, 3), '2d'),
    ((2, 3), (3, 2), (-1, 2, 3, -2), 'sep9'),
    ((2, 2), (2, 2), (1, 2, 2, 1), 'none'),
    ((1, 2), (1, 1), (3, 3, 0, 0), 'sep9'),
]


def _filter(kind, rng):
    if kind == 'none':
        return None, np.ones([1, 1])
    if kind == '2d':
        f = rng.standard_normal([3, 5])
        return torch.tensor(f), f
    taps = rng.standard_normal(int(kind[3:]))
    return torch.tensor(taps), np.outer(taps, taps)


@pytest.mark.parametrize('channels', [1, 3, 7])
@pytest.mark.parametrize('flip_filter', [False, True])
def test_upfirdn2d_matches_scipy(channels, flip_filter):
    rng = np.random.default_rng(channels)
    for up, down, pad, kind in _UFD_CASES:
        f, f2d = _filter(kind, rng)
        x = rng.standard_normal([2, channels, 10, 11])
        expected = _numpy_upfirdn2d(x, f2d, up, down, pad, flip_filter, gain=1.7)
        y = upfirdn2d.upfirdn2d(torch.tensor(x), f, up=list(up), down=list(down), padding=list(pad),
                                flip_filter=flip_filter, gain=1.7, impl='ref')
        assert y.shape == expected.shape, (up, down, pad, kind)
        np.testing.assert_allclose(y.numpy(), expected, atol=1e-10, err_msg=str((up, down, pad, kind)))


def test_upfirdn2d_many_channels_and_fp16():
    # 16+ channels take another upsampling branch; fp16 must be accepted (CUDA nets run in fp16).
    rng = np.random.default_rng(5)
    x = rng.standard_normal([1, 17, 6, 7])
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    expected = _numpy_upfirdn2d(x, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64, (2, 2), (1, 1), (2, 1, 2, 1), False, 4)
    y = upfirdn2d.upsample2d(torch.tensor(x), f.double(), impl='ref')
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-10)
    y16 = upfirdn2d.upsample2d(torch.tensor(x, dtype=torch.float16), f, impl='ref')
    assert y16.dtype == torch.float16
    np.testing.assert_allclose(y16.float().numpy(), expected, atol=2e-2)


def test_resampling_helpers_sizes_and_means():
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 3, 8, 12)
    assert upfirdn2d.filter2d(x, f).shape == (2, 3, 8, 12)
    assert upfirdn2d.upsample2d(x, f).shape == (2, 3, 16, 24)
    assert upfirdn2d.downsample2d(x, f).shape == (2, 3, 4, 6)
    assert upfirdn2d.upsample2d(x, f, up=[2, 1], padding=[1, 1, 0, 0]).shape == (2, 3, 8, 26)
    # A normalised filter preserves a constant image away from the borders (upsample2d includes gain up**2).
    ones = torch.ones(1, 1, 8, 8)
    for y in (upfirdn2d.filter2d(ones, f), upfirdn2d.upsample2d(ones, f), upfirdn2d.downsample2d(ones, f)):
        assert torch.allclose(y[..., 2:-2, 2:-2], torch.ones([]))
    # The identity filter with no resampling is a pure gain.
    assert torch.allclose(upfirdn2d.upfirdn2d(x, None, gain=3), 3 * x)


def test_setup_filter():
    f = upfirdn2d.setup_filter([1, 2, 1])
    assert f.shape == (3,) and torch.allclose(f.sum(), torch.tensor(1.0))
    f2 = upfirdn2d.setup_filter([1, 2, 1], separable=False, gain=4)
    assert f2.shape == (3, 3) and torch.allclose(f2.sum(), torch.tensor(4.0))
    assert torch.equal(upfirdn2d.setup_filter([1, 2, 3], normalize=False, flip_filter=True), torch.tensor([3.0, 2.0, 1.0]))
    assert upfirdn2d.setup_filter(None).shape == (1,)
    with pytest.raises(AssertionError):
        upfirdn2d.setup_filter(np.ones([2, 2]), separable=True)


def test_upfirdn2d_gradcheck_second_order():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    for f, up, down, pad in [(torch.rand(4, dtype=torch.float64), 2, 1, [2, 1, 2, 1]),
                             (torch.rand(3, 3, dtype=torch.float64), 1, 2, [1, 1, 0, 2])]:
        fn = lambda x: upfirdn2d.upfirdn2d(x, f, up=up, down=down, padding=pad, impl='ref')  # noqa: E731
        assert _gradcheck(fn, (x,))
        assert _gradgradcheck(fn, (x,))


def _ref_kernel(x, f, up, down, padding, flip_filter, gain):
    with torch.no_grad():
        return upfirdn2d._upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)


def test_upfirdn2d_adjoint_function_matches_reference_gradients():
    # The CUDA path's autograd Function, with the reference standing in for the kernel: its backward
    # (the derived adjoint upfirdn2d) must give the reference's first and second derivatives.
    rng = np.random.default_rng(0)
    for (up, down, pad, kind), flip in itertools.product(_UFD_CASES, [False, True]):
        f, _ = _filter(kind, rng)
        x = torch.randn(1, 2, 10, 11, dtype=torch.float64, requires_grad=True)
        args = (up, down, pad, flip, 1.3)
        y = upfirdn2d._Upfirdn2dFunction.apply(x, f, *args, _ref_kernel)
        r = upfirdn2d._upfirdn2d_ref(x, f, *args)
        g = torch.randn_like(r, requires_grad=True)
        gy, = torch.autograd.grad(y, x, g, create_graph=True)
        gr, = torch.autograd.grad(r, x, g, create_graph=True)
        torch.testing.assert_close(y, r)
        torch.testing.assert_close(gy, gr)
        h = torch.randn_like(gy)
        torch.testing.assert_close(torch.autograd.grad((gy * h).sum(), g)[0], torch.autograd.grad((gr * h).sum(), g)[0])
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    f = torch.rand(4, dtype=torch.float64)
    fn = lambda x: upfirdn2d._Upfirdn2dFunction.apply(x, f, (2, 2), (1, 1), (2, 1, 2, 1), False, 2.0, _ref_kernel)  # noqa: E731
    assert _gradgradcheck(fn, (x,))


def test_plugin_kernel_wrapper_with_stand_in_module(monkeypatch):
    # _plugin_kernel splits separable filters into two launches and folds flip and gain into the taps; a
    # stand-in module with the plugin's signature (2D true-convolution kernel, no flip, no gain) checks it.
    def fake_upfirdn2d(x, k, upx, upy, downx, downy, px0, px1, py0, py1):
        assert k.ndim == 2 and k.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        return upfirdn2d._upfirdn2d_ref(x, k, (upx, upy), (downx, downy), (px0, px1, py0, py1), False, 1)
    monkeypatch.setattr(upfirdn2d._plugin, 'module', types.SimpleNamespace(upfirdn2d=fake_upfirdn2d))
    for f in (torch.rand(4), torch.rand(3, 5), None):
        for flip in (False, True):
            x = torch.randn(2, 3, 9, 8)
            a = upfirdn2d._plugin_kernel(x, f, (2, 1), (1, 2), (1, 2, 3, 0), flip, 2.5)
            b = upfirdn2d._upfirdn2d_ref(x, f, (2, 1), (1, 2), (1, 2, 3, 0), flip, 2.5)
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------
# bias_act

_TORCH_ACTS = {
    'linear': lambda x: x, 'relu': torch.relu, 'lrelu': lambda x: F.leaky_relu(x, 0.2), 'tanh': torch.tanh,
    'sigmoid': torch.sigmoid, 'elu': F.elu, 'selu': torch.selu, 'softplus': F.softplus, 'swish': F.silu,
}


@pytest.mark.parametrize('act', sorted(_TORCH_ACTS))
def test_bias_act_matches_torch(act):
    spec = bias_act_mod.activation_funcs[act]
    assert set(spec) >= {'func', 'def_alpha', 'def_gain', 'cuda_idx', 'ref', 'has_2nd_grad'}
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64) * 3
    b = torch.randn(5, dtype=torch.float64)
    z = x + b[None, :, None, None]
    expected = _TORCH_ACTS[act](z) * spec.def_gain
    torch.testing.assert_close(bias_act_mod.bias_act(x, b, act=act), expected)
    # Explicit gain and clamp; bias along another dim.
    b3 = torch.randn(4, dtype=torch.float64)
    expected = torch.clamp(_TORCH_ACTS[act](x + b3[:, None]) * 0.7, -0.5, 0.5)
    torch.testing.assert_close(bias_act_mod.bias_act(x, b3, dim=2, act=act, gain=0.7, clamp=0.5), expected)
    # No bias, fp16 accepted.
    y16 = bias_act_mod.bias_act(x.half(), None, act=act)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.double(), _TORCH_ACTS[act](x.half().double()) * spec.def_gain, atol=2e-2, rtol=2e-2)


def test_bias_act_defaults_and_alpha():
    x = torch.randn(4, 6)
    torch.testing.assert_close(bias_act_mod.bias_act(x, act='lrelu', alpha=0.1, gain=1), F.leaky_relu(x, 0.1))
    torch.testing.assert_close(bias_act_mod.bias_act(x, act='lrelu'), F.leaky_relu(x, 0.2) * np.sqrt(2))
    torch.testing.assert_close(bias_act_mod.bias_act(x, act='elu', alpha=0.5), F.elu(x, 0.5))
    with pytest.raises(AssertionError):
        bias_act_mod.bias_act(x, torch.zeros(5))
    # The in-place shortcut without autograd never writes into the caller's tensor.
    before = x.clone()
    with torch.no_grad():
        for act in bias_act_mod.activation_funcs:
            bias_act_mod.bias_act(x, None, act=act, gain=2, clamp=0.5)
    assert torch.equal(x, before)


def test_bias_act_gradcheck_second_order():
    for act in ['tanh', 'sigmoid', 'elu', 'selu', 'softplus', 'swish', 'lrelu']:
        x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
        fn = lambda x, b: bias_act_mod.bias_act(x, b, act=act, gain=1.3, clamp=2.0)  # noqa: E731
        assert _gradcheck(fn, (x, b)), act
        assert _gradgradcheck(fn, (x, b)), act


def _derivatives(act, z, alpha):
    """Value, first and second derivative of an activation, by torch autograd (independent of bias_act.h)."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        v = bias_act_mod.activation_funcs[act].func(zz, alpha=alpha)
        d1, = torch.autograd.grad(v.sum(), zz, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), zz, allow_unused=True)[0] if d1.requires_grad else None
    return v.detach(), d1.detach(), (torch.zeros_like(z) if d2 is None else d2)


def _fake_bias_act_plugin():
    acts = {spec.cuda_idx: name for name, spec in bias_act_mod.activation_funcs.items()}

    def fake(x, b, g, h, act_idx, alpha, gain, clamp, mode, dim):
        z = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)]) if b.numel() else x
        v, d1, d2 = _derivatives(acts[act_idx], z, alpha)
        y = v * gain
        if mode == 0:
            return y.clamp(-clamp, clamp) if clamp >= 0 else y
        mask = (y.abs() <= clamp) if clamp >= 0 else torch.ones_like(y, dtype=torch.bool)
        out = g * d1 * gain if mode == 1 else g * h * d2 * gain
        return torch.where(mask, out, torch.zeros_like(out))
    return types.SimpleNamespace(bias_act=fake)


def test_bias_act_cuda_functions_with_stand_in_kernel(monkeypatch):
    # The plugin's autograd Functions (first and second order), driven by a stand-in for the kernel's three
    # modes, must reproduce the reference's gradients for every activation, with and without clamping.
    monkeypatch.setattr(bias_act_mod._plugin, 'module', _fake_bias_act_plugin())
    for act, clamp in itertools.product(sorted(_TORCH_ACTS), [None, 0.8]):
        x = (torch.randn(3, 4, 5, dtype=torch.float64) * 2).requires_grad_(True)
        b = torch.randn(4, dtype=torch.float64, requires_grad=True)
        dim, spec, alpha, gain, clamp_ = bias_act_mod._resolve(x, b, 1, act, None, None, clamp)
        y = bias_act_mod._BiasActCuda.apply(x, b, spec.cuda_idx, spec.has_2nd_grad, alpha, gain, clamp_, dim)
        r = bias_act_mod._bias_act_ref(x, b, 1, act, None, None, clamp)
        torch.testing.assert_close(y, r)
        g = torch.randn_like(y, requires_grad=True)
        gy = torch.autograd.grad(y, [x, b], g, create_graph=True)
        gr = torch.autograd.grad(r, [x, b], g, create_graph=True)
        torch.testing.assert_close(gy, gr)
        h = torch.randn_like(x)
        wrt = [g, x, b] if spec.has_2nd_grad else [g]
        a = torch.autograd.grad((gy[0] * h).sum() + gy[1].square().sum(), wrt, allow_unused=True)
        e = torch.autograd.grad((gr[0] * h).sum() + gr[1].square().sum(), wrt, allow_unused=True)
        for ai, ei in zip(a, e):
            torch.testing.assert_close(ai if ai is not None else torch.zeros_like(ei), ei if ei is not None else torch.zeros_like(ai))


# ----------------------------------------------------------------------------------------------------------
# Plugin loading and fallback


def test_forced_build_failure_warns_once_and_falls_back(monkeypatch):
    calls = []

    def failing_get_plugin(*args, **kwargs):
        calls.append(args)
        raise RuntimeError('forced failure for the test')
    monkeypatch.setattr(custom_ops, 'get_plugin', failing_get_plugin)
    for plugin in (upfirdn2d._plugin, bias_act_mod._plugin):
        monkeypatch.setattr(plugin, 'module', None)
        monkeypatch.setattr(plugin, 'failure', None)
        calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            assert plugin.get() is None
            assert plugin.get() is None
            assert plugin.get() is None
        assert len(calls) == 1, 'a failed build must not be retried'
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and 'forced failure for the test' in messages[0]


def test_cpu_tensors_never_touch_the_plugin(monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError('the plugin must not be built for CPU tensors')
    monkeypatch.setattr(custom_ops, 'get_plugin', must_not_build)
    monkeypatch.setattr(upfirdn2d._plugin, 'failure', None)
    monkeypatch.setattr(bias_act_mod._plugin, 'failure', None)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        upfirdn2d.upsample2d(torch.randn(1, 2, 4, 4), upfirdn2d.setup_filter([1, 3, 3, 1]), impl='cuda')
        bias_act_mod.bias_act(torch.randn(2, 3), torch.zeros(3), act='lrelu', impl='cuda')


def test_get_plugin_digest_and_failure_reason(tmp_path):
    src = tmp_path / 'a.cu'
    src.write_text('// one')
    d1 = custom_ops._source_digest([str(src)], 'gpu=A')
    assert d1 == custom_ops._source_digest([str(src)], 'gpu=A')
    assert d1 != custom_ops._source_digest([str(src)], 'gpu=B')
    src.write_text('// two')
    assert d1 != custom_ops._source_digest([str(src)], 'gpu=A')
    with pytest.raises(RuntimeError, match='does not exist'):
        custom_ops.get_plugin('mri_gan_missing_plugin', ['missing.cu'], source_dir=str(tmp_path))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='no CUDA device'):
            custom_ops.get_plugin('mri_gan_test_plugin', [str(src)])


def test_get_plugin_build_dirs_per_source_and_gpu(tmp_path, monkeypatch, capsys):
    # Simulated GPU and toolkit: the build goes under $MRI_GAN_CACHE/torch_extensions, in a folder per
    # digest (same sources and GPU = same folder), and the loaded module is cached in-process.
    gpu = {'name': 'GPU A'}
    loads = []
    monkeypatch.setenv('MRI_GAN_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda index=None: gpu['name'])
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda index=None: (9, 0))
    monkeypatch.setattr(torch.utils.cpp_extension, 'CUDA_HOME', '/fake/cuda')
    monkeypatch.setattr(torch.utils.cpp_extension, 'verify_ninja_availability', lambda: None)
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', lambda **kw: loads.append(kw) or types.SimpleNamespace(**kw))
    src_dir = tmp_path / 'src'
    src_dir.mkdir()
    (src_dir / 'op.cu').write_text('#include "op.h"')
    (src_dir / 'op.h').write_text('// v1')

    def build(name):
        custom_ops._loaded_plugins.pop(name, None)
        return custom_ops.get_plugin(name, ['op.cu'], headers=['op.h'], source_dir=str(src_dir), extra_cuda_cflags=['-O3'])
    first = build('mri_gan_fake_plugin')
    assert 'Setting up PyTorch plugin "mri_gan_fake_plugin"... Done.' in capsys.readouterr().out
    assert first.build_directory.startswith(str(tmp_path / 'cache' / 'torch_extensions'))
    assert sorted(os.listdir(first.build_directory)) == ['op.cu', 'op.h']
    assert custom_ops.get_plugin('mri_gan_fake_plugin', ['op.cu'], source_dir=str(src_dir)) is first
    assert build('mri_gan_fake_plugin').build_directory == first.build_directory
    gpu['name'] = 'GPU B'
    other_gpu = build('mri_gan_fake_plugin').build_directory
    (src_dir / 'op.h').write_text('// v2')
    other_header = build('mri_gan_fake_plugin').build_directory
    assert len({first.build_directory, other_gpu, other_header}) == 3
    assert loads[0]['extra_cuda_cflags'] == ['-O3'] and loads[0]['name'] == 'mri_gan_fake_plugin'
    custom_ops._loaded_plugins.pop('mri_gan_fake_plugin', None)


# ----------------------------------------------------------------------------------------------------------
# conv2d_gradfix


@pytest.mark.parametrize('stride,padding,groups', [(1, 1, 1), (2, 0, 1), (2, 1, 2)])
def test_conv2d_gradfix_matches_torch(stride, padding, groups):
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = conv2d_gradfix.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
    r = F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)
    torch.testing.assert_close(y, r)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, [x, w, b], g), torch.autograd.grad(r, [x, w, b], g))
    # Transposed conv (weight [C_in, C_out / groups, kh, kw]).
    wt = torch.randn(4, 6 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    yt = conv2d_gradfix.conv_transpose2d(x, wt, None, stride=stride, padding=padding, output_padding=stride - 1, groups=groups)
    rt = F.conv_transpose2d(x, wt, None, stride=stride, padding=padding, output_padding=stride - 1, groups=groups)
    torch.testing.assert_close(yt, rt)
    gt = torch.randn_like(yt)
    torch.testing.assert_close(torch.autograd.grad(yt, [x, wt], gt), torch.autograd.grad(rt, [x, wt], gt))
    fn = lambda x, w, b: conv2d_gradfix.conv2d(x, w, b, stride=stride, padding=padding, groups=groups)  # noqa: E731
    xs = x.detach()[:1, :, :5, :5].clone().requires_grad_(True)
    ws = w.detach()[:2].clone().requires_grad_(True)
    assert _gradgradcheck(fn, (xs, ws, b.detach()[:2].clone().requires_grad_(True)))
    fnt = lambda x, w: conv2d_gradfix.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)  # noqa: E731
    assert _gradgradcheck(fnt, (xs, wt.detach()[:, :1].clone().requires_grad_(True)))


def _r1_grads(conv, x, w, b, skip_weight_grads):
    img = x.detach().requires_grad_(True)
    score = (torch.tanh(conv(img, w, b, padding=1)) ** 2).sum()
    with conv2d_gradfix.no_weight_gradients(skip_weight_grads):
        grad_img, = torch.autograd.grad(score, img, create_graph=True)
    penalty = grad_img.square().sum()
    return torch.autograd.grad(penalty, [w, b])


def test_conv2d_gradfix_gradient_penalty_double_backward():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    expected = _r1_grads(F.conv2d, x, w, b, False)
    torch.testing.assert_close(_r1_grads(conv2d_gradfix.conv2d, x, w, b, True), expected)
    torch.testing.assert_close(_r1_grads(conv2d_gradfix.conv2d, x, w, b, False), expected)
    # Inside no_weight_gradients the weight gets no gradient at all.
    img = x.clone().requires_grad_(True)
    y = conv2d_gradfix.conv2d(img, w, b, padding=1).sum()
    with conv2d_gradfix.no_weight_gradients():
        gi, gw = torch.autograd.grad(y, [img, w], allow_unused=True)
    assert gi is not None and gw is None
    assert not conv2d_gradfix.weight_gradients_disabled


def test_conv2d_gradfix_disabled_is_plain_torch(monkeypatch):
    monkeypatch.setattr(conv2d_gradfix, 'enabled', False)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(conv2d_gradfix.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))


def test_conv2d_gradfix_weight_grad_fallbacks(monkeypatch):
    # Where torch lacks aten.convolution_backward, torch.nn.grad (and then plain autograd) must agree.
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    dy_shape = F.conv2d(x, torch.zeros(6, 2, 3, 3, dtype=torch.float64), stride=2, padding=1, groups=2).shape
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    dy = torch.randn(dy_shape, dtype=torch.float64)
    wt = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    dyt = torch.randn(F.conv_transpose2d(x, wt, stride=2, padding=1, output_padding=1, groups=2).shape, dtype=torch.float64)
    args = ((2, 2), (1, 1), (0, 0), (1, 1), 2)
    argst = ((2, 2), (1, 1), (1, 1), (1, 1), 2)
    ref = conv2d_gradfix._weight_grad(dy, x, w, False, *args)
    reft = conv2d_gradfix._weight_grad(dyt, x, wt, True, *argst)
    for has_cb, has_nn in [(False, True), (False, False)]:
        monkeypatch.setattr(conv2d_gradfix, '_HAS_CONVOLUTION_BACKWARD', has_cb)
        monkeypatch.setattr(conv2d_gradfix, '_HAS_NN_GRAD', has_nn)
        torch.testing.assert_close(conv2d_gradfix._weight_grad(dy, x, w, False, *args), ref)
        torch.testing.assert_close(conv2d_gradfix._weight_grad(dyt, x, wt, True, *argst), reft)


# ----------------------------------------------------------------------------------------------------------
# conv2d_resample


def _naive_resample(x, w, f, up, down, padding, groups, flip_weight, flip_filter):
    # The padding that centres the downsampling filter goes in front, with the user's padding.
    w = w if flip_weight else w.flip([2, 3])
    fw, fh = upfirdn2d._get_filter_size(f)
    a = [(fw - down + 1) // 2, (fw - down) // 2, (fh - down + 1) // 2, (fh - down) // 2] if down > 1 else [0] * 4
    padding = [p + q for p, q in zip(upfirdn2d._parse_padding(padding), a)]
    if up > 1:
        x = upfirdn2d.upsample2d(x, f, up=up, padding=padding, flip_filter=flip_filter, impl='ref')
    else:
        x = F.pad(x, padding)
    x = F.conv2d(x, w, groups=groups)
    if down > 1:
        x = upfirdn2d.upfirdn2d(x, f, down=down, flip_filter=flip_filter, impl='ref')
    return x


def test_conv2d_resample_matches_naive_composition():
    torch.manual_seed(0)
    filters = [upfirdn2d.setup_filter([1, 3, 3, 1]).double(), (torch.rand(3, 4) + 0.1).double(), None]
    cases = itertools.product([1, 2], [1, 2], [1, 3], [1, [1, 0, 2, -1]], [1, 2], [True, False], [False, True], filters)
    checked = 0
    for up, down, k, pad, groups, flip_weight, flip_filter, f in cases:
        x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
        w = torch.randn(6, 4 // groups, k, k, dtype=torch.float64)
        expected = _naive_resample(x, w, f, up, down, pad, groups, flip_weight, flip_filter)
        y = conv2d_resample.conv2d_resample(x, w, f, up=up, down=down, padding=pad, groups=groups,
                                            flip_weight=flip_weight, flip_filter=flip_filter)
        assert y.shape == expected.shape, (up, down, k, pad, groups)
        torch.testing.assert_close(y, expected, msg=str((up, down, k, pad, groups, flip_weight, flip_filter)))
        checked += 1
    assert checked == 2 * 2 * 2 * 2 * 2 * 2 * 2 * 3
    # StyleGAN2's layer geometry: 3x3 kernels with padding 1 double or halve the resolution.
    x, w, f = torch.randn(1, 5, 8, 8), torch.randn(7, 5, 3, 3), upfirdn2d.setup_filter([1, 3, 3, 1])
    assert conv2d_resample.conv2d_resample(x, w, f, up=2, padding=1).shape == (1, 7, 16, 16)
    assert conv2d_resample.conv2d_resample(x, w, f, down=2, padding=1).shape == (1, 7, 4, 4)


def test_conv2d_resample_gradcheck():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    f = upfirdn2d.setup_filter([1, 3, 3, 1]).double()
    for up, down in [(2, 1), (1, 2)]:
        fn = lambda x, w: conv2d_resample.conv2d_resample(x, w, f, up=up, down=down, padding=1)  # noqa: E731
        assert _gradcheck(fn, (x, w))
        assert _gradgradcheck(fn, (x, w))


# ----------------------------------------------------------------------------------------------------------
# fma and grid_sample


def test_fma_matches_and_reduces_broadcast_grads():
    a = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = fma.fma(a, b, c)
    r = a * b + c
    torch.testing.assert_close(y, r)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, [a, b, c], g)
    gr = torch.autograd.grad(r, [a, b, c], g)
    torch.testing.assert_close(ga, gr)
    assert [t.shape for t in ga] == [a.shape, b.shape, c.shape]
    assert _gradcheck(fma.fma, (a, b, c))
    assert _gradgradcheck(fma.fma, (a, b, c))


def test_grid_sample_matches_torch_and_double_backward():
    torch.manual_seed(1)
    inp = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    grid = torch.rand(2, 5, 4, 2, dtype=torch.float64) * 2.4 - 1.2  # Some samples fall outside: zero padding.
    y = grid_sample_gradfix.grid_sample(inp, grid)
    r = F.grid_sample(inp, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    torch.testing.assert_close(y, r)
    g = torch.randn_like(y)
    gy, = torch.autograd.grad((y * g).sum().square(), inp, create_graph=True)
    gr, = torch.autograd.grad((r * g).sum().square(), inp, create_graph=True)
    torch.testing.assert_close(gy, gr)
    h = torch.randn_like(gy)
    torch.testing.assert_close(torch.autograd.grad((gy * h).sum(), inp), torch.autograd.grad((gr * h).sum(), inp))
    fn = lambda i: grid_sample_gradfix.grid_sample(i, grid)  # noqa: E731
    assert _gradcheck(fn, (inp,))
    assert _gradgradcheck(fn, (inp,))
    # First-order gradients w.r.t. the grid still work.
    grid.requires_grad_(True)
    assert _gradcheck(lambda i, gr_: grid_sample_gradfix.grid_sample(i, gr_), (inp, grid))


# ----------------------------------------------------------------------------------------------------------
# The kernels' C++ math on the host (opt-in: compiling against torch takes a minute or two).


@pytest.mark.skipif(os.environ.get('MRI_GAN_TEST_PLUGIN_HEADERS') != '1',
                    reason='set MRI_GAN_TEST_PLUGIN_HEADERS=1 to compile the plugin math for the CPU (slow)')
def test_plugin_math_on_host(tmp_path, monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))
    harness = torch.utils.cpp_extension.load(
        name='mri_gan_ops_host_harness', sources=[os.path.join(here, 'ops_host_harness.cpp')],
        extra_include_paths=[os.path.join(os.path.dirname(here), 'torch_utils', 'ops')],
        build_directory=str(tmp_path), verbose=False)
    monkeypatch.setattr(upfirdn2d._plugin, 'module', harness)
    monkeypatch.setattr(bias_act_mod._plugin, 'module', harness)
    rng = np.random.default_rng(0)
    for (up, down, pad, kind), flip, dtype in itertools.product(_UFD_CASES, [False, True], [torch.float64, torch.float32]):
        f, _ = _filter(kind, rng)
        x = torch.randn(2, 3, 10, 11, dtype=dtype).permute(0, 1, 3, 2)  # Non-contiguous: strides are honoured.
        y = upfirdn2d._plugin_kernel(x, f, up, down, pad, flip, 1.5)
        torch.testing.assert_close(y, upfirdn2d._upfirdn2d_ref(x, f, up, down, pad, flip, 1.5))
    for act, clamp, dtype in itertools.product(sorted(_TORCH_ACTS), [None, 0.8], [torch.float64, torch.float32]):
        x = (torch.randn(3, 4, 5, dtype=dtype) * 3).requires_grad_(True)
        b = torch.randn(4, dtype=dtype, requires_grad=True)
        dim, spec, alpha, gain, clamp_ = bias_act_mod._resolve(x, b, 1, act, None, None, clamp)
        y = bias_act_mod._BiasActCuda.apply(x, b, spec.cuda_idx, spec.has_2nd_grad, alpha, gain, clamp_, dim)
        r = bias_act_mod._bias_act_ref(x, b, 1, act, None, None, clamp)
        torch.testing.assert_close(y, r)
        g = torch.randn_like(y)
        gy = torch.autograd.grad(y, [x, b], g, create_graph=True)
        gr = torch.autograd.grad(r, [x, b], g, create_graph=True)
        torch.testing.assert_close(gy, gr)
        if spec.has_2nd_grad:
            h = torch.randn_like(x)
            torch.testing.assert_close(torch.autograd.grad((gy[0] * h).sum(), x), torch.autograd.grad((gr[0] * h).sum(), x))


# ----------------------------------------------------------------------------------------------------------
# CUDA plugins vs references (skipped without a GPU).


def _assert_plugin_built(plugin):
    if torch.utils.cpp_extension.CUDA_HOME is None:
        pytest.skip('no CUDA toolkit to build the plugin with')
    if plugin.get() is None:
        pytest.fail(f'CUDA plugin did not build: {plugin.failure}')


@cuda_only
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64])
def test_cuda_upfirdn2d_plugin_matches_reference(dtype):
    _assert_plugin_built(upfirdn2d._plugin)
    rng = np.random.default_rng(0)
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    for shape in [(1, 1, 5, 6), (2, 3, 16, 16), (3, 7, 33, 20)]:
        for up, down, pad, kind in _UFD_CASES:
            f, _ = _filter(kind, rng)
            f = None if f is None else f.float().cuda()
            x = torch.randn(shape, device='cuda', dtype=dtype, requires_grad=True)
            try:
                r = upfirdn2d.upfirdn2d(x, f, up=list(up), down=list(down), padding=list(pad), gain=1.5, impl='ref')
            except RuntimeError:
                continue  # Too small for this filter; the plugin is not asked either.
            y = upfirdn2d.upfirdn2d(x, f, up=list(up), down=list(down), padding=list(pad), gain=1.5, impl='cuda')
            torch.testing.assert_close(y, r, atol=tol * 10, rtol=tol)
            g = torch.randn_like(y, requires_grad=True)
            gy, = torch.autograd.grad(y, x, g, create_graph=True)
            gr, = torch.autograd.grad(r, x, g, create_graph=True)
            torch.testing.assert_close(gy, gr, atol=tol * 10, rtol=tol)
            h = torch.randn_like(gy)  # Second order: through the adjoint, w.r.t. the incoming gradient.
            torch.testing.assert_close(torch.autograd.grad((gy * h).sum(), g)[0], torch.autograd.grad((gr * h).sum(), g)[0],
                                       atol=tol * 10, rtol=tol)
    x = torch.randn(1, 2, 5, 6, device='cuda', dtype=torch.float64, requires_grad=True)
    f = upfirdn2d.setup_filter([1, 3, 3, 1], device='cuda')
    assert _gradgradcheck(lambda x: upfirdn2d.upsample2d(x, f), (x,))


@cuda_only
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64])
def test_cuda_bias_act_plugin_matches_reference(dtype):
    _assert_plugin_built(bias_act_mod._plugin)
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    for shape, dim in [((4, 5), 1), ((2, 8, 6, 6), 1), ((3, 4, 5), 2)]:
        for act, clamp in itertools.product(sorted(_TORCH_ACTS), [None, 0.7]):
            x = (torch.randn(shape, device='cuda', dtype=dtype) * 2).requires_grad_(True)
            b = torch.randn(shape[dim], device='cuda', dtype=dtype, requires_grad=True)
            y = bias_act_mod.bias_act(x, b, dim=dim, act=act, clamp=clamp, impl='cuda')
            r = bias_act_mod.bias_act(x, b, dim=dim, act=act, clamp=clamp, impl='ref')
            torch.testing.assert_close(y, r, atol=tol * 10, rtol=tol)
            g = torch.randn_like(y)
            gy = torch.autograd.grad(y, [x, b], g, create_graph=True)
            gr = torch.autograd.grad(r, [x, b], g, create_graph=True)
            torch.testing.assert_close(gy[0], gr[0], atol=tol * 10, rtol=tol)
            torch.testing.assert_close(gy[1], gr[1], atol=tol * 100, rtol=tol * 10)
            if bias_act_mod.activation_funcs[act].has_2nd_grad and dtype != torch.float16:
                h = torch.randn_like(x)
                a = torch.autograd.grad((gy[0] * h).sum(), x)[0]
                e = torch.autograd.grad((gr[0] * h).sum(), x)[0]
                torch.testing.assert_close(a, e, atol=tol * 100, rtol=tol * 10)
    x = torch.randn(2, 3, 4, device='cuda', dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device='cuda', dtype=torch.float64, requires_grad=True)
    assert _gradgradcheck(lambda x, b: bias_act_mod.bias_act(x, b, act='swish', clamp=1.5), (x, b))


@cuda_only
def test_cuda_gradfix_ops_match_torch():
    x = torch.randn(2, 3, 8, 8, device='cuda', dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, device='cuda', dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device='cuda', dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_r1_grads(conv2d_gradfix.conv2d, x, w, b, True), _r1_grads(F.conv2d, x, w, b, False))
    inp = torch.randn(1, 2, 5, 5, device='cuda', dtype=torch.float64, requires_grad=True)
    grid = torch.rand(1, 4, 4, 2, device='cuda', dtype=torch.float64) * 2 - 1
    assert _gradgradcheck(lambda i: grid_sample_gradfix.grid_sample(i, grid), (inp,))

# ----------------------------------------------------------------------------------------------------------------
# Volumes: the separable 3D filter (upfirdn3d) and the rank dispatch the networks call (resample).


def test_resampling_matches_2d_ops():
    """On volumes constant along D, the separable 3D ops reduce to the 2D ones (checked against upfirdn2d)."""
    f = upfirdn3d.setup_filter([1, 3, 3, 1]).double()
    x2 = torch.randn([2, 3, 8, 8], dtype=torch.float64)
    x = x2[:, :, None].expand(-1, -1, 8, -1, -1)
    torch.testing.assert_close(upfirdn3d.upsample3d(x, f)[:, :, 8], upfirdn2d.upsample2d(x2, f))
    torch.testing.assert_close(upfirdn3d.downsample3d(x, f)[:, :, 2], upfirdn2d.downsample2d(x2, f))
    w2 = torch.randn([5, 3, 3, 3], dtype=torch.float64)
    w = torch.zeros([5, 3, 3, 3, 3], dtype=torch.float64)
    w[:, :, 1] = w2
    for kw in [dict(up=2), dict(down=2)]:
        got = upfirdn3d.conv3d_resample(x, w, f, padding=1, **kw)
        want = conv2d_resample.conv2d_resample(x2, w2, f=f, padding=1, **kw)
        torch.testing.assert_close(got[:, :, got.shape[2] // 2], want)
    # up=2 is exactly conv3d(upsample with padding, w).
    x = torch.randn([1, 3, 4, 4, 4], dtype=torch.float64)
    want = F.conv3d(upfirdn3d.upfirdn3d(x, f, up=2, padding=[3, 2], gain=8), w)
    torch.testing.assert_close(upfirdn3d.conv3d_resample(x, w, f, up=2, padding=1), want)


def test_resampling_gradcheck():
    f = upfirdn3d.setup_filter([1, 3, 3, 1]).double()
    x = torch.randn([1, 2, 4, 4, 4], dtype=torch.float64, requires_grad=True)  # 2 channels: the CPU's depthwise form.
    w = torch.randn([1, 2, 3, 3, 3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: upfirdn3d.upsample3d(t, f), [x])
    assert torch.autograd.gradcheck(lambda t: upfirdn3d.downsample3d(t, f), [x])
    w = w.detach()  # The weight gradient is plain conv3d's; check the resampling paths w.r.t. the input.
    assert torch.autograd.gradcheck(lambda t: upfirdn3d.conv3d_resample(t, w, f, up=2, padding=1), [x])
    assert torch.autograd.gradcheck(lambda t: upfirdn3d.conv3d_resample(t, w, f, down=2, padding=1), [x])
    x = torch.randn([1, 2, 2, 2, 4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: upfirdn3d.upsample3d(t, f), [x])


@pytest.mark.parametrize('op', ['up', 'down', 'updown', 'conv_up', 'conv_down'])
def test_resampling_pass_forms_agree(op):
    """The CPU's depthwise filter passes and the folded-batch passes the GPU keeps give the same values, input
    gradients and second derivatives (R1 differentiates through them), per channel (each channel its own data)."""
    f = upfirdn3d.setup_filter([1, 3, 3, 1]).double()
    torch.manual_seed(0)
    x0 = torch.randn([2, 3, 6, 5, 4], dtype=torch.float64)
    w = torch.randn([4, 3, 3, 3, 3], dtype=torch.float64)
    fn = dict(up=lambda t: upfirdn3d.upsample3d(t, f),
              down=lambda t: upfirdn3d.downsample3d(t, f),
              updown=lambda t: upfirdn3d.upfirdn3d(t, f, up=2, down=3, padding=[2, 1]),
              conv_up=lambda t: upfirdn3d.conv3d_resample(t, w, f, up=2, padding=1),
              conv_down=lambda t: upfirdn3d.conv3d_resample(t, w, f, down=2, padding=1))[op]
    results = []
    for form in upfirdn3d.PASS_FORMS:
        x = x0.clone().requires_grad_(True)
        with upfirdn3d.forced_pass_form(form):
            y = fn(x)
        g, = torch.autograd.grad((y.square() * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum(), x,
                                 create_graph=True)
        gg, = torch.autograd.grad(g.square().sum(), x)
        results.append((y, g, gg))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][0].abs().sum() > 0 and results[0][2].abs().sum() > 0


def test_resample_dispatches_on_rank():
    """resample.* runs the 2D ops on [N, C, H, W] (their CUDA plugin where present) and the 3D ones on volumes."""
    f = resample.setup_filter([1, 3, 3, 1])
    assert f.ndim == 1 and abs(float(f.sum()) - 1) < 1e-6
    x2, x3 = torch.randn([2, 3, 8, 8]), torch.randn([2, 3, 8, 8, 8])
    assert torch.equal(resample.upsample(x2, f), upfirdn2d.upsample2d(x2, f))
    assert torch.equal(resample.downsample(x2, f), upfirdn2d.downsample2d(x2, f))
    assert torch.equal(resample.upsample(x3, f), upfirdn3d.upsample3d(x3, f))
    assert torch.equal(resample.downsample(x3, f), upfirdn3d.downsample3d(x3, f))
    w2, w3 = torch.randn([4, 3, 3, 3]), torch.randn([4, 3, 3, 3, 3])
    assert torch.equal(resample.conv_resample(x2, w2, f, up=2, padding=1, flip_weight=False),
                       conv2d_resample.conv2d_resample(x2, w2, f=f, up=2, padding=1, flip_weight=False))
    assert torch.equal(resample.conv_resample(x3, w3, f, down=2, padding=1),
                       upfirdn3d.conv3d_resample(x3, w3, f, down=2, padding=1))
    with pytest.raises(ValueError, match=r'upsample: needs \[N, C, H, W\] or \[N, C, D, H, W\]'):
        resample.upsample(torch.randn([2, 3, 8]), f)
    with pytest.raises(ValueError, match='rank'):
        resample.conv_resample(x3, w2, f)
    with pytest.raises(ValueError, match='pass form'):
        with upfirdn3d.forced_pass_form('strided'):
            pass
