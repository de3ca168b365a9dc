"""Tests of training.networks (StyleGAN2 G and D, Karras et al. 2020) on images at tiny sizes on CPU (the same
family on volumes: tests/test_networks3d.py).

Hooks (attention, feature quantization) are exercised through the stand-ins in tests/_hooks_stub.py, by
class_name, exactly as the MRI classes are reached.
"""

import numpy as np
import pytest
import torch

from tests import _hooks_stub as stub
from torch_utils import snapshot
from torch_utils.ops import conv2d_gradfix
from training import networks
from training.layers import MinibatchStdLayer
from training.layers import modulated_conv

ATTN = 'tests._hooks_stub.RecordingAttention'
FQ = 'tests._hooks_stub.RecordingQuantizer'
TINY = dict(channel_base=256, channel_max=32)  # 4x4: 32, 8x8: 32, 16x16: 16, 32x32: 8 channels.


def make_G(res=16, img_channels=3, c_dim=0, **kwargs):
    kwargs = {**TINY, **kwargs}
    kwargs.setdefault('mapping_kwargs', dict(num_layers=2))
    return networks.Generator(z_dim=16, c_dim=c_dim, w_dim=32, img_resolution=res, img_channels=img_channels,
                              **kwargs)


def make_D(res=16, img_channels=3, c_dim=0, **kwargs):
    return networks.Discriminator(c_dim=c_dim, img_resolution=res, img_channels=img_channels, **{**TINY, **kwargs})


@pytest.fixture(autouse=True)
def _seed_and_clear():
    torch.manual_seed(0)
    stub.CALLS.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Tiny tensors: a second thread only adds synchronisation (and suffers most on a busy CPU).
    yield
    torch.set_num_threads(threads)

# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('img_channels,res', [(1, 16), (3, 16), (4, 32), (7, 16)])
def test_shapes_any_channel_count(img_channels, res):
    G = make_G(res=res, img_channels=img_channels)
    D = make_D(res=res, img_channels=img_channels)
    assert G.num_ws == 2 * int(np.log2(res)) - 2
    img = G(torch.randn([3, 16]), None)
    assert img.shape == (3, img_channels, res, res) and img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert G.synthesis.b4.torgb.weight.shape[0] == img_channels
    logits = D(img, None)
    assert logits.shape == (3, 1) and logits.dtype == torch.float32


@pytest.mark.parametrize('arch', ['orig', 'skip', 'resnet'])
def test_architectures(arch):
    G = make_G(architecture=arch)
    D = make_D(architecture=arch)
    # Only skip has a toRGB per block; orig and resnet have one at the end.
    has_torgb = [hasattr(getattr(G.synthesis, f'b{r}'), 'torgb') for r in (4, 8, 16)]
    assert has_torgb == ([True] * 3 if arch == 'skip' else [False, False, True])
    assert hasattr(G.synthesis.b8, 'skip') == (arch == 'resnet')
    assert hasattr(D.b8, 'skip') == (arch == 'resnet')
    assert hasattr(D.b8, 'fromrgb') == (arch == 'skip')
    img = G(torch.randn([2, 16]), None)
    assert img.shape == (2, 3, 16, 16)
    assert D(img, None).shape == (2, 1)


def test_generator_depends_on_label():
    G = make_G(c_dim=5)
    z = torch.randn([1, 16]).repeat(2, 1)
    c = torch.eye(5)[[0, 3]]
    img = G(z, c, noise_mode='const')
    assert not torch.allclose(img[0], img[1], atol=1e-4)
    again = G(z, c, noise_mode='const')
    assert torch.equal(img, again)


def test_truncation_psi_zero_gives_w_avg_image():
    G = make_G(c_dim=0)
    G.mapping.w_avg.copy_(torch.randn([32]))
    img = G(torch.randn([4, 16]), None, truncation_psi=0, noise_mode='const')
    ref = G.synthesis(G.mapping.w_avg.reshape(1, 1, -1).repeat(1, G.num_ws, 1), noise_mode='const')
    torch.testing.assert_close(img, ref.expand_as(img), atol=1e-5, rtol=1e-5)
    # The cutoff keeps later ws untouched.
    ws = G.mapping(torch.randn([2, 16]), None, truncation_psi=0, truncation_cutoff=2)
    assert torch.allclose(ws[:, :2], G.mapping.w_avg.expand(2, 2, -1))
    assert not torch.allclose(ws[:, 2:], G.mapping.w_avg.expand(2, G.num_ws - 2, -1))


def test_w_avg_tracks_only_with_update_emas():
    G = make_G()
    before = G.mapping.w_avg.clone()
    G.mapping(torch.randn([8, 16]), None)
    assert torch.equal(G.mapping.w_avg, before)
    ws = G.mapping(torch.randn([8, 16]), None, update_emas=True)
    expected = before.lerp(ws[:, 0].mean(0), 1 - G.mapping.w_avg_beta)
    torch.testing.assert_close(G.mapping.w_avg, expected)


def test_noise_modes():
    G = make_G()
    for module in G.modules():
        if hasattr(module, 'noise_strength'):
            module.noise_strength.data.fill_(0.5)
    z = torch.randn([2, 16])
    const1, const2 = G(z, None, noise_mode='const'), G(z, None, noise_mode='const')
    rand1, rand2 = G(z, None, noise_mode='random'), G(z, None, noise_mode='random')
    none = G(z, None, noise_mode='none')
    assert torch.equal(const1, const2)
    assert not torch.allclose(rand1, rand2)
    assert not torch.allclose(none, const1)
    with pytest.raises(ValueError, match='noise_mode'):
        G(z, None, noise_mode='bogus')
    G_quiet = make_G(use_noise=False)
    assert not any(hasattr(m, 'noise_const') for m in G_quiet.modules())
    assert torch.equal(G_quiet(z, None, noise_mode='random'), G_quiet(z, None, noise_mode='random'))


@pytest.mark.parametrize('up', [1, 2])
@pytest.mark.parametrize('demodulate', [True, False])
def test_fused_and_unfused_modconv_agree(up, demodulate):
    x = torch.randn([3, 8, 6, 6])
    weight = torch.randn([5, 8, 3, 3])
    styles = torch.randn([3, 8])
    from torch_utils.ops import upfirdn2d
    f = upfirdn2d.setup_filter([1, 3, 3, 1])
    args = dict(x=x, weight=weight, styles=styles, up=up, padding=1, resample_filter=f, demodulate=demodulate,
                flip_weight=(up == 1))
    fused_cpu = modulated_conv(fused_modconv=True, **args)  # On CPU this dispatches to the unfused form...
    fused = modulated_conv(fused_modconv=True, grouped_on_cpu=True, **args)  # ...so force the grouped conv of CUDA.
    plain = modulated_conv(fused_modconv=False, **args)
    torch.testing.assert_close(fused_cpu, plain)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    # Reference: explicit per-sample weights, one conv per sample.
    if up == 1:
        w = weight[None] * styles[:, None, :, None, None]
        if demodulate:
            w = w / w.square().sum(dim=[2, 3, 4], keepdim=True).add(1e-8).sqrt()
        ref = torch.cat([torch.nn.functional.conv2d(x[n:n + 1], w[n], padding=1) for n in range(3)])
        torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


def test_whole_generator_fused_equals_unfused():
    G = make_G(architecture='resnet')
    z = torch.randn([3, 16])
    a = G(z, None, noise_mode='const', fused_modconv=True, grouped_on_cpu=True)
    b = G(z, None, noise_mode='const', fused_modconv=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_discriminator_conditional_projection():
    D = make_D(c_dim=4)
    assert D.b4.out.out_features == D.b4.cmap_dim == 32
    img = torch.randn([2, 3, 16, 16])
    a = D(img, torch.eye(4)[[0, 0]])
    b = D(img, torch.eye(4)[[1, 2]])
    assert a.shape == (2, 1)
    assert not torch.allclose(a, b)
    D0 = make_D(c_dim=0)
    assert D0.b4.out.out_features == 1 and not hasattr(D0, 'mapping')


@pytest.mark.parametrize('batch', [1, 2, 4, 6, 7, 8])
def test_minibatch_std_any_batch(batch):
    layer = MinibatchStdLayer(group_size=4, num_channels=2)
    x = torch.randn([batch, 6, 4, 4])
    y = layer(x)
    assert y.shape == (batch, 8, 4, 4)
    assert torch.equal(y[:, :6], x)
    # Group size actually used: the largest divisor of the batch that is <= 4.
    G = max(g for g in range(1, 5) if batch % g == 0)
    n = batch // G
    for idx in range(batch):
        members = x[idx % n::n]  # Groups are strided through the batch.
        assert members.shape[0] == G
        std = (members.var(dim=0, unbiased=False) + 1e-8).sqrt()
        expected = std.reshape(2, 3, 4, 4).mean(dim=[1, 2, 3])
        torch.testing.assert_close(y[idx, 6:, 0, 0], expected)
    D = make_D(epilogue_kwargs=dict(mbstd_group_size=4, mbstd_num_channels=1))
    assert D(torch.randn([batch, 3, 16, 16]), None).shape == (batch, 1)


def test_fp16_path_on_cpu():
    G = make_G(num_fp16_res=2, conv_clamp=256)
    D = make_D(num_fp16_res=2, conv_clamp=256)
    z = torch.randn([2, 16])
    ref = G(z, None, noise_mode='const')  # fp16 disabled on CPU by default: this is the fp32 result.
    torch.testing.assert_close(ref, G(z, None, noise_mode='const', force_fp32=True))
    try:
        img = G(z, None, noise_mode='const', cpu_fp16=True)
    except RuntimeError as err:  # A torch build without CPU half kernels.
        pytest.skip(f'float16 convolutions unsupported on this CPU build: {err}')
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
    assert not torch.equal(img, ref)  # The fp16 blocks really ran in half precision...
    torch.testing.assert_close(img, ref, atol=0.05, rtol=0.05)  # ...and agree with fp32.
    torch.testing.assert_close(G(z, None, noise_mode='const', force_fp32=True, cpu_fp16=True), ref)
    logits = D(img, None, cpu_fp16=True)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, D(img, None, force_fp32=True), atol=0.05, rtol=0.05)


def _assert_all_grads(module):
    missing = [name for name, p in module.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f'no gradient for {missing}'


@pytest.mark.parametrize('arch', ['skip', 'resnet'])
def test_gradients_reach_every_parameter(arch):
    G = make_G(c_dim=3, architecture=arch, attn_res=[8], attn_kwargs=dict(class_name=ATTN))
    D = make_D(c_dim=3, architecture=arch, attn_res=[8], attn_kwargs=dict(class_name=ATTN))
    c = torch.eye(3)[[0, 1, 2, 0]]
    img = G(torch.randn([4, 16]), c, noise_mode=('random' if arch == 'skip' else 'const'))
    loss = torch.nn.functional.softplus(-D(img, c)).mean() + img.square().mean()
    loss.backward()
    _assert_all_grads(G)
    _assert_all_grads(D)


def test_r1_double_backward():
    D = make_D(c_dim=2, attn_res=[4], attn_kwargs=dict(class_name=ATTN),
               quantize_kwargs=dict(class_name=FQ, resolutions=[8], dict_size=8, decay=0.8))
    real = torch.randn([4, 3, 16, 16]).requires_grad_(True)
    c = torch.eye(2)[[0, 1, 0, 1]]
    with conv2d_gradfix.no_weight_gradients():
        logits = D(real, c)
        (grad,) = torch.autograd.grad(outputs=[logits.sum()], inputs=[real], create_graph=True, only_inputs=True)
    penalty = grad.square().sum(dim=[1, 2, 3]).mean()
    penalty.backward()
    assert D.b16.conv0.weight.grad is not None and D.b16.conv0.weight.grad.abs().sum() > 0
    assert D.b4.fc.weight.grad.abs().sum() > 0


def test_path_length_double_backward():
    G = make_G(architecture='skip')
    ws = G.mapping(torch.randn([2, 16]), None)
    with conv2d_gradfix.no_weight_gradients():
        img = G.synthesis(ws, noise_mode='random')
        pl_noise = torch.randn_like(img) / np.sqrt(img.shape[2] * img.shape[3])
        (pl_grads,) = torch.autograd.grad(outputs=[(img * pl_noise).sum()], inputs=[ws], create_graph=True,
                                          only_inputs=True)
    pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
    (pl_lengths - 1).square().mean().backward()
    assert G.mapping.fc0.weight.grad.abs().sum() > 0
    assert G.synthesis.b16.conv1.affine.weight.grad.abs().sum() > 0


def test_hooks_at_requested_resolutions_only():
    G = make_G(res=32, attn_res=[8, 32], attn_kwargs=dict(class_name=ATTN, key_ratio=4))
    D = make_D(res=32, attn_res=[16], attn_kwargs=dict(class_name=ATTN),
               quantize_kwargs=dict(class_name=FQ, resolutions=[4, 16], dict_size=16, decay=0.9))
    assert sorted(D.quantizers.keys()) == ['16', '4']
    assert D.quantizers['16'].channels == 16 and D.quantizers['16'].dict_size == 16 and D.quantizers['16'].decay == 0.9
    img = G(torch.randn([2, 16]), None)
    # Attention in G after the block at R, on R x R features of that block's width, in float32.
    assert [(k, r, s) for k, r, s, _, _ in stub.CALLS] == [('attn', 8, (2, 32, 8, 8)), ('attn', 32, (2, 8, 32, 32))]
    assert all(dtype == torch.float32 for _, _, _, dtype, _ in stub.CALLS)
    stub.CALLS.clear()
    logits, aux = D(img, None, update_quant=True, return_aux=True)
    # D: after the block whose output is at R; attention first, then quantization.
    assert [(k, r, s) for k, r, s, _, _ in stub.CALLS] == [
        ('attn', 16, (2, 16, 16, 16)), ('fq', 16, (2, 16, 16, 16)), ('fq', 4, (2, 32, 4, 4))]
    assert [e for k, _, _, _, e in stub.CALLS if k == 'fq'] == [True, True]
    assert logits.shape == (2, 1)
    assert aux['fq_loss'].ndim == 0 and aux['fq_loss'] > 0  # Sum of both quantizers' losses.
    assert aux['fq_perplexity'] == {16: 8.0, 4: 8.0} and aux['fq_usage'] == {16: 0.5, 4: 0.5}
    stub.CALLS.clear()
    assert D(img, None).shape == (2, 1)  # Plain logits without return_aux; quantizers not updated.
    assert [e for k, _, _, _, e in stub.CALLS if k == 'fq'] == [False, False]


def test_no_quantizer_aux_and_bad_hook_resolutions():
    D = make_D()
    logits, aux = D(torch.randn([2, 3, 16, 16]), None, return_aux=True)
    assert float(aux['fq_loss']) == 0 and aux['fq_perplexity'] == {} and aux['fq_usage'] == {}
    with pytest.raises(ValueError, match='attn_res'):
        make_D(attn_res=[16], attn_kwargs=dict(class_name=ATTN))  # No block outputs 16x16 in a 16x16 D.
    with pytest.raises(ValueError, match='quantize'):
        make_D(quantize_kwargs=dict(class_name=FQ, resolutions=[32]))
    with pytest.raises(ValueError, match='attn_res'):
        make_G(attn_res=[64], attn_kwargs=dict(class_name=ATTN))
    with pytest.raises(TypeError, match='not a torch.nn.Module'):  # A snapshot must not name any callable.
        make_D(quantize_kwargs=dict(class_name='os.getcwd', resolutions=[8]))


def test_persistent_init_kwargs_rebuild_same_network():
    G = make_G(c_dim=2, architecture='resnet')
    D = make_D(c_dim=2, quantize_kwargs=None, epilogue_kwargs=dict(mbstd_group_size=2))
    for net in (G, D):
        record = snapshot.module_record(net)
        assert record['class_name'] in ('training.networks.Generator', 'training.networks.Discriminator')
        clone = snapshot.build_module(record)
        assert clone.init_kwargs == net.init_kwargs
    z, c = torch.randn([2, 16]), torch.eye(2)
    G2 = snapshot.build_module(snapshot.module_record(G))
    torch.testing.assert_close(G2(z, c, noise_mode='const'), G(z, c, noise_mode='const'))
    assert G.init_kwargs['channel_base'] == 256 and G.init_kwargs['mapping_kwargs'] == {'num_layers': 2}


def _bench_module():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench', 'bench_networks.py')
    spec = importlib.util.spec_from_file_location('bench_networks', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _baseline_name(name: str) -> str:
    """Our state-dict name -> the name in bench/bench_networks.py's plain rendition of the reference design."""
    parts = name.split('.')
    if parts[0] == 'mapping':
        return '.'.join(parts[1:])
    if parts[0] == 'synthesis':
        res = parts[1][1:]
        if parts[2] == 'const':
            return 'const'
        return f'{parts[2]}_{res}.' + '.'.join(parts[3:])
    if parts[0] == 'b4':
        return {'conv': 'conv4', 'fc': 'fc', 'out': 'out'}[parts[1]] + '.' + '.'.join(parts[2:])
    res = parts[0][1:]
    if parts[1] == 'fromrgb':
        return 'fromrgb.' + '.'.join(parts[2:])
    return f'{parts[1]}_{res}.' + '.'.join(parts[2:])


def test_matches_plain_reference_design():
    """Same weights, same images/logits as the bench's independent plain rendition of StyleGAN2-ADA."""
    bench = _bench_module()
    import argparse
    args = argparse.Namespace(res=16, channels=2, cbase=256, cmax=32, zdim=16, wdim=32, map=2, fp16_res=0,
                              clamp=256, batch=4)
    G, D = bench.build_ours(args, torch.device('cpu'))
    BG, BD = bench.build_baseline(args, torch.device('cpu'))
    for ours, base in ((G, BG), (D, BD)):
        base_state = base.state_dict()
        mapped = {}
        for name, value in ours.state_dict().items():
            if name.endswith('resample_filter') or name == 'mapping.w_avg':
                continue
            target = _baseline_name(name)
            assert target in base_state and base_state[target].shape == value.shape, (name, target)
            mapped[target] = value
        missing = [k for k in base_state if k not in mapped and not k.endswith('.f') and k not in ('f', 'w_avg')]
        assert not missing, missing
        base.load_state_dict(mapped, strict=False)
    for module in G.modules():
        if hasattr(module, 'noise_strength'):
            module.noise_strength.data.fill_(0.3)
    for module in BG.modules():
        if hasattr(module, 'noise_strength'):
            module.noise_strength.data.fill_(0.3)
    z = torch.randn([4, 16])
    G.eval()
    BG.eval()  # The baseline runs the grouped (fused) modconv in eval mode, ours the unfused one on CPU.
    img = G(z, None, noise_mode='const')
    torch.testing.assert_close(img, BG(z, None, noise_mode='const'), atol=1e-4, rtol=1e-4)
    BG.train()
    torch.testing.assert_close(img, BG(z, None, noise_mode='const'), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(D(img, None), BD(img, None), atol=1e-4, rtol=1e-4)


def test_equalized_lr_keeps_unit_scale():
    from training.layers import ConvLayer, FullyConnectedLayer
    x = torch.randn([256, 512])
    assert abs(FullyConnectedLayer(512, 512)(x).std().item() - 1) < 0.1
    assert abs(FullyConnectedLayer(512, 512, lr_multiplier=0.01)(x).std().item() - 1) < 0.1
    y = ConvLayer(64, 64, kernel_size=3, activation='linear')(torch.randn([8, 64, 16, 16]))
    assert abs(y[:, :, 1:-1, 1:-1].std().item() - 1) < 0.1
    y = ConvLayer(16, 16, kernel_size=3, activation='linear', spatial_dims=3)(torch.randn([8, 16, 8, 8, 8]))
    assert abs(y[:, :, 1:-1, 1:-1, 1:-1].std().item() - 1) < 0.1


def test_freeze_layers_makes_buffers():
    D = make_D(block_kwargs=dict(freeze_layers=2))
    frozen = [n for n, _ in D.named_buffers() if n.endswith('weight')]
    assert frozen == ['b16.fromrgb.weight', 'b16.conv0.weight']
    assert D(torch.randn([2, 3, 16, 16]), None).shape == (2, 1)


def test_nested_synthesis_kwargs_as_in_stylegan2_ada_configs():
    nested = networks.Generator(z_dim=16, c_dim=0, w_dim=32, img_resolution=16, img_channels=2,
                                mapping_kwargs=dict(num_layers=2),
                                synthesis_kwargs=dict(channel_base=256, channel_max=32, architecture='orig'))
    assert nested.synthesis.b16.conv1.weight.shape[0] == 16 and not hasattr(nested.synthesis.b8, 'torgb')
    rebuilt = snapshot.build_module(snapshot.module_record(nested))
    assert rebuilt.synthesis.init_kwargs == nested.synthesis.init_kwargs
