"""Tests of the training hooks (training/attention.py, fq.py, topk.py): SAGAN self-attention on images and volumes,
FQ-GAN feature quantization, top-k training."""

import math
import os

import pytest
import torch
from torch.nn import functional as F

from training.attention import SelfAttention
from training.autograd_passes import double_backward
from training.fq import FeatureQuantizer
from training.topk import TopK, topk_loss

#----------------------------------------------------------------------------
# Self-attention.

@pytest.mark.parametrize('channels,res,pool', [(1, 4, None), (3, 5, True), (8, 8, False), (16, 8, True), (4, 64, None)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_attention_identity_at_init(channels, res, pool, dtype):
    torch.manual_seed(0)
    layer = SelfAttention(channels=channels, resolution=res, pool=pool)
    x = torch.randn([2, channels, res, res]).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)


def test_attention_nonidentity_and_gradients():
    torch.manual_seed(1)
    layer = SelfAttention(channels=16, resolution=8, key_ratio=8)
    assert layer.key_channels == 2 and layer.value_channels == 8
    x = torch.randn([2, 16, 8, 8])

    # At gain 0 only the gain itself gets a gradient: that is how the layer leaves the identity.
    layer(x).square().sum().backward()
    assert layer.gain.grad is not None and layer.gain.grad.abs() > 0
    for conv in (layer.query, layer.key, layer.value, layer.out):
        assert conv.weight.grad is None or conv.weight.grad.abs().max() == 0
    layer.zero_grad(set_to_none=True)

    with torch.no_grad():
        layer.gain.fill_(0.5)
    y = layer(x)
    assert not torch.allclose(y, x, atol=1e-3)
    y.square().sum().backward()
    for name in ('query', 'key', 'value', 'out'):
        grad = getattr(layer, name).weight.grad
        assert grad is not None and grad.abs().max() > 0, name


def test_attention_matches_direct_formula():
    # SAGAN eqs. 1-3 written out per position, without pooling, against the batched implementation.
    torch.manual_seed(2)
    layer = SelfAttention(channels=8, resolution=4, key_ratio=4, pool=False)
    with torch.no_grad():
        layer.gain.fill_(0.7)
    x = torch.randn([1, 8, 4, 4])
    xs = x[0].reshape(8, 16)                                            # [C, L]
    w = lambda conv: conv.weight * conv.weight_gain
    f, g, h = w(layer.query) @ xs, w(layer.key) @ xs, w(layer.value) @ xs
    beta = torch.softmax((f.t() @ g) / math.sqrt(2), dim=1)            # [L query, L key]
    o = w(layer.out) @ (h @ beta.t())
    expected = x + 0.7 * o.reshape(1, 8, 4, 4)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize('coarse', [[4, 4], [2, 3, 4]])
def test_attention_pool_is_exact_on_block_constant_input(coarse):
    # With 2x2 (2x2x2) constant blocks, pooled keys hold each block once instead of 4 (8) times; the softmax
    # weights of the copies add up, so pooled and unpooled attention agree. Catches a wrong pooling axis or reshape,
    # on images and on volumes with three different sides.
    torch.manual_seed(3)
    a = SelfAttention(channels=8, resolution=8, pool=True)
    b = SelfAttention(channels=8, resolution=8, pool=False)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.gain.fill_(1.0)
        b.gain.fill_(1.0)
    x = F.interpolate(torch.randn([2, 8] + coarse), scale_factor=2, mode='nearest')
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_attention_float16_and_double_backward():
    torch.manual_seed(4)
    layer = SelfAttention(channels=8, resolution=8)
    with torch.no_grad():
        layer.gain.fill_(0.3)
    x = torch.randn([2, 8, 8, 8])
    y16 = layer(x.half())
    assert y16.dtype == torch.float16
    assert torch.allclose(y16.float(), layer(x.half().float()), atol=1e-2)

    # R1 differentiates D twice: the penalty's gradient must reach the attention weights.
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    g.square().sum().backward()
    assert layer.query.weight.grad.abs().max() > 0 and layer.gain.grad.abs() > 0


def test_attention_rejects_bad_input():
    layer = SelfAttention(channels=4, resolution=8)
    with pytest.raises(ValueError, match='SelfAttention: expected input'):
        layer(torch.zeros([1, 3, 8, 8]))
    with pytest.raises(ValueError, match='largest side 8, got 16x16'):
        layer(torch.zeros([1, 4, 16, 16]))
    with pytest.raises(ValueError, match='channels'):
        SelfAttention(channels=0)

def test_attention_fused_path_matches_math_path_and_double_backward_context_takes_math():
    # Outside training.autograd_passes.double_backward() the fused kernel runs; inside, the math path (R1 / path length
    # differentiate twice, which the fused GPU kernels cannot). Both give the same result.
    torch.manual_seed(6)
    layer = SelfAttention(channels=8, resolution=8, pool=True)
    with torch.no_grad():
        layer.gain.fill_(0.7)
    x = torch.randn([3, 8, 8, 8])
    assert layer.uses_fused()
    fused = layer(x)
    with double_backward():
        assert not layer.uses_fused()
        math_path = layer(x)
    assert not torch.equal(fused, x)
    torch.testing.assert_close(fused, math_path, rtol=1e-5, atol=1e-5)
    assert not SelfAttention(channels=8, fused=False).uses_fused()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA: the fused kernels are GPU kernels')
def test_attention_on_gpu_fused_outside_and_twice_differentiable_inside_double_backward():
    torch.manual_seed(7)
    layer = SelfAttention(channels=64, resolution=32).cuda()
    with torch.no_grad():
        layer.gain.fill_(0.5)
    x = torch.randn([4, 64, 32, 32], device='cuda', requires_grad=True)
    with double_backward():
        y = layer(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        g.square().sum().backward()
    assert layer.query.weight.grad.abs().max() > 0
    torch.testing.assert_close(layer(x), y, rtol=1e-3, atol=1e-3)  # fused (tf32/flash) vs math path


def test_attention_memory_formula():
    # Math path: logits + softmax, 2 * N * L * L' float32. 64x64 pools keys (L' = L / 4): 1 GiB at batch 32.
    assert SelfAttention.memory_bytes(32, 64) == 2 ** 30
    assert SelfAttention.memory_bytes(32, 128) == 16 * 2 ** 30
    assert SelfAttention.memory_bytes(8, 32) == 2 * 4 * 8 * 1024 * 1024          # 32x32: no pooling
    assert SelfAttention.memory_bytes(8, 32, pool=True) == 2 * 4 * 8 * 1024 * 256


#----------------------------------------------------------------------------
# Self-attention on volumes [N, C, D, H, W]: all voxels form one sequence.

@pytest.mark.parametrize('channels,shape,pool', [(1, [4, 4, 4], None), (3, [3, 5, 4], True), (8, [2, 8, 8], False),
                                                 (4, [16, 16, 16], None)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_attention_3d_identity_at_init(channels, shape, pool, dtype):
    torch.manual_seed(20)
    layer = SelfAttention(channels=channels, resolution=max(shape), pool=pool)
    x = torch.randn([2, channels, *shape]).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, x)                    # gain = 0 at init: exactly the identity


def _direct_attention(layer, x, gain):
    """SAGAN eqs. 1-3 for one sample, all spatial axes flattened, no pooling."""
    C = x.shape[1]
    xs = x[0].reshape(C, -1)                                            # [C, L]
    w = lambda conv: conv.weight * conv.weight_gain
    f, g, h = w(layer.query) @ xs, w(layer.key) @ xs, w(layer.value) @ xs
    beta = torch.softmax((f.t() @ g) / math.sqrt(layer.key_channels), dim=1)   # [L query, L key]
    o = w(layer.out) @ (h @ beta.t())
    return x + gain * o.reshape(x.shape)


def test_attention_3d_matches_direct_formula_on_both_paths():
    torch.manual_seed(21)
    layer = SelfAttention(channels=8, resolution=5, key_ratio=4, pool=False)
    with torch.no_grad():
        layer.gain.fill_(0.7)
    x = torch.randn([1, 8, 3, 4, 5])                                   # D != H != W: catches a wrong flattening
    expected = _direct_attention(layer, x, 0.7)
    assert layer.uses_fused()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with double_backward():
        assert not layer.uses_fused()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_volume_of_depth_one_equals_the_image():
    # One sequence of positions whatever the rank: [N, C, 1, H, W] is attended exactly as [N, C, H, W].
    torch.manual_seed(23)
    for pool in (False, True):
        layer = SelfAttention(channels=8, resolution=6, pool=pool)
        with torch.no_grad():
            layer.gain.fill_(0.6)
        x = torch.randn([2, 8, 6, 5])
        torch.testing.assert_close(layer(x[:, :, None])[:, :, 0], layer(x), rtol=1e-6, atol=1e-6)


def test_attention_3d_gradients_and_double_backward_through_math_path():
    torch.manual_seed(24)
    layer = SelfAttention(channels=8, resolution=4, pool=True)
    x = torch.randn([2, 8, 4, 4, 4], requires_grad=True)

    # At gain 0 only the gain itself gets a gradient, as in 2D.
    layer(x).square().sum().backward()
    assert layer.gain.grad.abs() > 0
    for conv in (layer.query, layer.key, layer.value, layer.out):
        assert conv.weight.grad is None or conv.weight.grad.abs().max() == 0
    layer.zero_grad(set_to_none=True)

    # R1-style: a penalty on the input gradient, differentiated again, inside double_backward() (math path).
    with torch.no_grad():
        layer.gain.fill_(0.3)
    with double_backward():
        assert not layer.uses_fused()
        y = layer(x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        g.square().sum().backward()
    for name in ('query', 'key', 'value', 'out'):
        grad = getattr(layer, name).weight.grad
        assert grad is not None and grad.abs().max() > 0, name
    assert layer.gain.grad.abs() > 0
    # The second-order gradient is the true one: d/d gain of the R1-style penalty against central differences
    # (the layer computes in float32, so the check is on a smooth scalar with a float32 tolerance).
    def penalty(gain):
        with torch.no_grad():
            layer.gain.fill_(gain)
        with double_backward():
            (g,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
        return g.square().sum()
    layer.zero_grad(set_to_none=True)
    penalty(0.3).backward()
    analytic = float(layer.gain.grad)
    numeric = (penalty(0.3 + 1e-2).item() - penalty(0.3 - 1e-2).item()) / 2e-2
    assert analytic == pytest.approx(numeric, rel=1e-3)


def test_attention_3d_rejects_bad_input():
    layer = SelfAttention(channels=4, resolution=8)
    layer(torch.zeros([1, 4, 4, 8, 8]))                                 # largest side 8: accepted
    with pytest.raises(ValueError, match='largest side 8, got 8x16x16'):
        layer(torch.zeros([1, 4, 8, 16, 16]))
    with pytest.raises(ValueError, match='SelfAttention: expected input'):
        layer(torch.zeros([1, 4, 2, 2, 2, 2]))
    with pytest.raises(ValueError, match='SelfAttention: expected input'):
        layer(torch.zeros([1, 4, 8]))
    with pytest.raises(ValueError, match='SelfAttention: expected input'):
        layer(torch.zeros([1, 3, 8, 8, 8]))


def test_attention_3d_memory_formula():
    # Volumes: L = side^3; from 16^3 = 4096 voxels keys are pooled 2x2x2 (L' = L / 8).
    assert SelfAttention.memory_bytes(1, 32, spatial_dims=3) == 2 * 4 * 32 ** 3 * 16 ** 3 == 2 ** 30
    assert SelfAttention.memory_bytes(2, 8, spatial_dims=3) == 2 * 4 * 2 * 512 * 512          # 8^3: no pooling
    assert SelfAttention.memory_bytes(1, 16, spatial_dims=3) == 2 * 4 * 4096 * 512
    assert SelfAttention.memory_bytes(1, 8, pool=True, spatial_dims=3) == 2 * 4 * 512 * 64
    # One size per axis (non-cubic volumes); a list of two is an image, as the int form with spatial_dims=2.
    assert SelfAttention.memory_bytes(1, [16, 32, 32]) == 2 * 4 * (16 * 32 * 32) * (8 * 16 * 16)
    assert SelfAttention.memory_bytes(4, [64, 64]) == SelfAttention.memory_bytes(4, 64)
    assert SelfAttention.memory_bytes(4, 64) == SelfAttention.memory_bytes(4, 64, spatial_dims=2)


def _tiny_G_D(attn_res_g, attn_res_d, img_resolution=16, spatial_dims=None, channel_base=128, channel_max=16):
    """A tiny G and D of the one network family (images, or volumes with spatial_dims=3) with attention hooks."""
    from training import networks
    tiny = dict(channel_base=channel_base, channel_max=channel_max, num_fp16_res=0, conv_clamp=None,
                spatial_dims=spatial_dims)
    attn = dict(class_name='training.attention.SelfAttention')
    G = networks.Generator(z_dim=8, c_dim=0, w_dim=16, img_resolution=img_resolution, img_channels=1,
                           mapping_kwargs=dict(num_layers=1), attn_res=attn_res_g, attn_kwargs=attn, **tiny)
    D = networks.Discriminator(c_dim=0, img_resolution=img_resolution, img_channels=1, attn_res=attn_res_d,
                               attn_kwargs=attn, **tiny)
    return G, D


def _tiny_G_D_3d(attn_res_g, attn_res_d, img_resolution=8):
    return _tiny_G_D(attn_res_g, attn_res_d, img_resolution, spatial_dims=3, channel_base=64, channel_max=8)


@pytest.mark.parametrize('dims, res, seed', [(2, 4, 8), (2, 8, 8), (2, 16, 8), (3, 4, 10), (3, 8, 10)])
def test_attention_in_G_changes_the_output_at_every_accepted_resolution(dims, res, seed):
    # Attention runs before the block's toRGB, so even at the output resolution it changes the image; the same
    # hook in the volume generator: identity at init, then gain != 0 changes the volume and trains.
    torch.manual_seed(seed)
    G, _ = _tiny_G_D([res], []) if dims == 2 else _tiny_G_D_3d([res], [])
    layer = getattr(G.synthesis, f'attn{res}')
    assert isinstance(layer, SelfAttention) and layer.resolution == res
    z = torch.randn([2, 8])
    base = G(z, None, noise_mode='const')
    assert base.shape == ((2, 1, 16, 16) if dims == 2 else (2, 1, 8, 8, 8))
    with torch.no_grad():
        layer.gain.fill_(5.0)
    changed = G(z, None, noise_mode='const')
    assert (changed - base).abs().max() > 1e-4
    changed.square().sum().backward()
    assert layer.query.weight.grad.abs().max() > 0


@pytest.mark.parametrize('res', [4, 8])
def test_attention_in_D_changes_the_output_at_every_accepted_resolution(res):
    torch.manual_seed(9)
    _, D = _tiny_G_D([], [res])
    layer = getattr(D, f'attn{res}')
    img = torch.randn([2, 1, 16, 16])
    base = D(img, None)
    with torch.no_grad():
        layer.gain.fill_(5.0)
    assert (D(img, None) - base).abs().max() > 1e-4

def test_attention_in_volume_D_changes_the_output_and_survives_r1():
    torch.manual_seed(11)
    _, D = _tiny_G_D_3d([], [4])
    layer = D.attn4
    assert isinstance(layer, SelfAttention) and layer.resolution == 4
    img = torch.randn([2, 1, 8, 8, 8], requires_grad=True)
    base = D(img, None)
    with torch.no_grad():
        layer.gain.fill_(5.0)
    assert (D(img, None) - base).abs().max() > 1e-4
    with double_backward():                                             # R1 through the attention math path
        (g,) = torch.autograd.grad(D(img, None).sum(), img, create_graph=True)
        g.square().sum().backward()
    assert layer.query.weight.grad.abs().max() > 0


def test_attention_in_non_cubic_volume_G_is_built_for_the_largest_side():
    torch.manual_seed(12)
    G, _ = _tiny_G_D_3d([16], [], img_resolution=[8, 16, 16])
    assert G.synthesis.attn16.resolution == 16
    with torch.no_grad():
        G.synthesis.attn16.gain.fill_(1.0)
    assert G(torch.randn([1, 8]), None, noise_mode='const').shape == (1, 1, 8, 16, 16)

#----------------------------------------------------------------------------
# Feature quantization.

def _nearest_brute(flat, embed):
    return torch.cdist(flat.double(), embed.double()).argmin(dim=1)


def test_fq_forward_values_loss_and_straight_through():
    torch.manual_seed(5)
    fq = FeatureQuantizer(channels=6, dict_size=32, init_std=1.0)
    x = torch.randn([3, 6, 4, 5], requires_grad=True)
    x_q, loss = fq(x)
    assert x_q.shape == x.shape and x_q.dtype == x.dtype and loss.dtype == torch.float32 and loss.ndim == 0

    flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    idx = _nearest_brute(flat, fq.embed)
    q = fq.embed[idx]
    # Forward values are the nearest codes.
    assert torch.allclose(x_q.detach().permute(0, 2, 3, 1).reshape(-1, 6), q, atol=1e-6)
    # Commitment loss = mean squared distance to the chosen codes.
    assert torch.allclose(loss, (flat - q).square().mean(), rtol=1e-6)

    # Straight-through: the upstream gradient passes unchanged (d x_q / d x = identity).
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(x_q, x, upstream, retain_graph=True)
    assert torch.equal(grad, upstream)
    # Commitment gradient pulls x toward sg(q) only: 2 (x - q) / numel.
    (grad_loss,) = torch.autograd.grad(loss, x)
    expected = 2 * (x.detach() - q.reshape(3, 4, 5, 6).permute(0, 3, 1, 2)) / x.numel()
    assert torch.allclose(grad_loss, expected, atol=1e-7)


def test_fq_3d_values_loss_straight_through_and_ema():
    # Volumes [N, C, D, H, W]: every voxel's C-vector is quantized, as every pixel's is in 2D.
    torch.manual_seed(13)
    fq = FeatureQuantizer(channels=6, dict_size=32, init_std=1.0)
    x = torch.randn([2, 6, 3, 4, 5], requires_grad=True)
    x_q, loss = fq(x)
    assert x_q.shape == x.shape and x_q.dtype == x.dtype and loss.ndim == 0
    flat = x.detach().permute(0, 2, 3, 4, 1).reshape(-1, 6)
    q = fq.embed[_nearest_brute(flat, fq.embed)]
    torch.testing.assert_close(x_q.detach().permute(0, 2, 3, 4, 1).reshape(-1, 6), q, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, (flat - q).square().mean())
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(x_q, x, upstream, retain_graph=True)
    assert torch.equal(grad, upstream)
    (grad_loss,) = torch.autograd.grad(loss, x)
    expected = 2 * (x.detach() - q.reshape(2, 3, 4, 5, 6).permute(0, 4, 1, 2, 3)) / x.numel()
    torch.testing.assert_close(grad_loss, expected, rtol=0, atol=1e-7)

    # The EMA step from a volume equals the step from the same positions laid out as an image.
    img = FeatureQuantizer(channels=6, dict_size=32, init_std=1.0).train()
    img.load_state_dict(fq.state_dict())
    fq.train()
    fq(x.detach(), update=True)
    img(x.detach().reshape(2, 6, 12, 5), update=True)
    for k, v in fq.state_dict().items():
        torch.testing.assert_close(v, img.state_dict()[k], rtol=1e-6, atol=1e-6)
    assert fq.usage() == img.usage() and fq.perplexity() == pytest.approx(img.perplexity())


def _clustered_case(decay=0.8):
    """3 of 8 codes near 3 well-separated cluster means; 5 codes far away and never used."""
    torch.manual_seed(6)
    C, K = 4, 8
    means = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    counts = torch.tensor([10, 20, 30])
    feats = torch.cat([m + 0.3 * torch.randn([n, C]) for m, n in zip(means, counts)])   # [60, C]
    fq = FeatureQuantizer(channels=C, dict_size=K, decay=decay, eps=1e-5)
    with torch.no_grad():
        fq.embed[:3] = means + 0.5 * torch.randn([3, C])               # near, not at, the cluster means
        fq.embed[3:] = 100 + torch.randn([K - 3, C])                    # out of reach
        fq.embed_sum.copy_(fq.embed)                                    # keep the default EMA state consistent
    x = feats.t().reshape(1, C, 60, 1)                                  # [N=1, C, H=60, W=1]
    return fq, x, feats, counts


def test_fq_ema_moves_codes_toward_cluster_means():
    fq, x, feats, counts = _clustered_case(decay=0.8)
    # Steady state for the used codes (N_k = n_k, m_k = n_k e_k): one EMA step then moves each code exactly
    # (1 - decay) of the way to its cluster's mean, e <- 0.8 e + 0.2 mean.
    with torch.no_grad():
        fq.cluster_size[:3] = counts.float()
        fq.embed_sum[:3] = counts.float()[:, None] * fq.embed[:3]
        fq.cluster_size[3:] = 1.0
        fq.embed_sum[3:] = fq.embed[3:]
    before = fq.embed.clone()
    cluster_means = torch.stack([c.mean(dim=0) for c in feats.split(counts.tolist())])

    fq.train()
    fq(x, update=True)
    expected_used = 0.8 * before[:3] + 0.2 * cluster_means
    assert torch.allclose(fq.embed[:3], expected_used, atol=1e-4)      # Laplace smoothing (eps=1e-5) is below atol
    dist_before = (before[:3] - cluster_means).norm(dim=1)
    dist_after = (fq.embed[:3] - cluster_means).norm(dim=1)
    assert torch.allclose(dist_after, 0.8 * dist_before, atol=1e-4)
    assert torch.allclose(fq.cluster_size[:3], counts.float(), atol=1e-5)
    # Unused codes keep their place (count and sum decay together).
    assert torch.allclose(fq.embed[3:], before[3:], rtol=1e-3)
    assert fq.usage() == pytest.approx(3 / 8)


def test_fq_ema_first_update_from_default_state_follows_formula():
    fq, x, feats, counts = _clustered_case(decay=0.8)
    e0 = fq.embed.clone()
    N0, m0 = fq.cluster_size.clone(), fq.embed_sum.clone()
    assert torch.equal(N0, torch.ones(8)) and torch.equal(m0, e0)       # "each code seen once where it stands"
    fq.train()
    fq(x, update=True)
    n = torch.zeros(8)
    n[:3] = counts.float()
    s = torch.zeros(8, 4)
    s[:3] = torch.stack([c.sum(dim=0) for c in feats.split(counts.tolist())])
    N = 0.8 * N0 + 0.2 * n
    m = 0.8 * m0 + 0.2 * s
    smoothed = (N + 1e-5) / (N.sum() + 8e-5) * N.sum()
    assert torch.allclose(fq.cluster_size, N) and torch.allclose(fq.embed_sum, m)
    assert torch.allclose(fq.embed, m / smoothed[:, None], rtol=1e-5)


def test_fq_no_update_in_eval_or_without_flag():
    fq, x, _, _ = _clustered_case()
    state = {k: v.clone() for k, v in fq.state_dict().items()}
    fq.train()
    fq(x, update=False)
    fq.eval()
    fq(x, update=True)
    for k, v in fq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fq_loss_mode_passes_features_on_and_still_learns_the_dictionary():
    fq, x, _, _ = _clustered_case()
    fq.mode = 'loss'
    before = fq.embed.clone()
    fq.train()
    y, loss = fq(x, update=True)
    assert y is x and loss > 0                  # D continues with x itself; the commitment loss is computed
    assert not torch.equal(fq.embed, before)    # and the dictionary moves
    with pytest.raises(ValueError, match='mode'):
        FeatureQuantizer(channels=2, mode='both')


def test_fq_deferred_updates_apply_as_one_ema_step():
    # Two passes accumulated then one ema_step() == one update from both batches together.
    fq_a, x, _, _ = _clustered_case()
    fq_b, _, _, _ = _clustered_case()
    fq_b.load_state_dict(fq_a.state_dict())
    x1, x2 = x[:, :, :25], x[:, :, 25:]
    fq_a.train()
    fq_b.train()
    fq_a.deferred = True
    fq_a(x1, update=True)
    fq_a(x2, update=True)
    assert torch.equal(fq_a.embed, fq_b.embed)  # nothing applied yet
    fq_a.ema_step()
    fq_b(x, update=True)
    for k, v in fq_a.state_dict().items():
        torch.testing.assert_close(v, fq_b.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_fq_usage_and_perplexity():
    torch.manual_seed(7)
    fq = FeatureQuantizer(channels=4, dict_size=16, init_std=1.0)
    assert math.isnan(fq.usage()) and math.isnan(fq.perplexity())
    codes = fq.embed[[2, 5, 11]]
    x = codes.repeat(10, 1).t().reshape(1, 4, 30, 1)                    # 3 codes, 10 positions each
    fq(x)
    assert fq.usage() == pytest.approx(3 / 16)
    assert fq.perplexity() == pytest.approx(3.0, rel=1e-5)             # uniform over 3 codes
    x = codes[[0] * 27 + [1, 2, 2]].t().reshape(1, 4, 30, 1)           # skewed usage: lower perplexity
    fq(x)
    assert 1.0 < fq.perplexity() < 3.0 and fq.usage() == pytest.approx(3 / 16)


def test_fq_state_dict_round_trip():
    torch.manual_seed(8)
    a = FeatureQuantizer(channels=4, dict_size=8)
    a.train()
    a(torch.randn([2, 4, 4, 4]), update=True)                           # state differs from the initial one
    sd = a.state_dict()
    assert set(sd) == {'embed', 'cluster_size', 'embed_sum'}
    assert sd['embed'].shape == (8, 4) and sd['cluster_size'].shape == (8,) and sd['embed_sum'].shape == (8, 4)
    torch.manual_seed(9)
    b = FeatureQuantizer(channels=4, dict_size=8)
    assert not torch.equal(b.embed, a.embed)
    b.load_state_dict(sd)
    for k in sd:
        assert torch.equal(b.state_dict()[k], sd[k])
    x = torch.randn([2, 4, 4, 4])
    assert torch.equal(a(x)[0], b(x)[0])


def test_fq_float16_and_3d_input():
    torch.manual_seed(10)
    fq = FeatureQuantizer(channels=8, dict_size=16, init_std=1.0)
    x = torch.randn([2, 8, 4, 4])
    x16 = x.half().requires_grad_(True)
    # Same codes chosen as the float32 path on the same values (x + (q - x) may differ from q by an ulp).
    x_q32, loss32 = fq(x16.detach().float())
    x_q16, loss16 = fq(x16)
    assert x_q16.dtype == torch.float16 and loss16.dtype == torch.float32
    assert torch.allclose(x_q16.float(), x_q32, atol=2e-3) and torch.allclose(loss16, loss32)
    x_q16.float().sum().backward()
    assert torch.equal(x16.grad, torch.ones_like(x16))
    # The EMA update from float16 features keeps float32 buffers.
    fq.train()
    before = fq.embed.clone()
    fq(x16.detach(), update=True)
    assert fq.embed.dtype == torch.float32 and torch.isfinite(fq.embed).all() and not torch.equal(fq.embed, before)
    # Volumes: [N, C, D, H, W].
    v = torch.randn([1, 8, 2, 3, 4])
    v_q, _ = fq(v)
    assert v_q.shape == v.shape
    with pytest.raises(ValueError, match='FeatureQuantizer: expected input'):
        fq(torch.zeros([1, 3, 4, 4]))

#----------------------------------------------------------------------------
# FQ across two processes (gloo): the all-reduced update keeps dictionaries identical.

def _fq_ddp_worker(rank, world_size, init_file, out_dir):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)                                            # same initial dictionary on every rank
        fq = FeatureQuantizer(channels=4, dict_size=16, init_std=1.0).train()
        for step in range(2):
            gen = torch.Generator().manual_seed(100 * step + rank)      # different data per rank
            x = torch.randn([2, 4, 4, 4], generator=gen) + rank
            fq(x, update=True)
        torch.save(fq.state_dict(), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_fq_distributed_dictionaries_identical(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_fq_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    sd0 = torch.load(tmp_path / 'rank0.pt', weights_only=True)
    sd1 = torch.load(tmp_path / 'rank1.pt', weights_only=True)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k

    # And the result is the update on the union of both ranks' batches, as one process would compute it.
    torch.manual_seed(0)
    ref = FeatureQuantizer(channels=4, dict_size=16, init_std=1.0).train()
    init = ref.embed.clone()
    for step in range(2):
        xs = [torch.randn([2, 4, 4, 4], generator=torch.Generator().manual_seed(100 * step + r)) + r for r in range(2)]
        ref(torch.cat(xs), update=True)
    assert not torch.allclose(ref.embed, init)
    for k in sd0:
        assert torch.allclose(sd0[k], ref.state_dict()[k], atol=1e-5), k

#----------------------------------------------------------------------------
# Top-k.

def test_topk_schedule():
    t = TopK(gamma=0.99, min_frac=0.5)
    assert t.fraction(0) == 1.0
    assert t.fraction(1) == pytest.approx(0.99)
    assert t.fraction(10) == pytest.approx(0.99 ** 10)
    assert t.fraction(10) / t.fraction(9) == pytest.approx(0.99)
    assert t.fraction(68) == pytest.approx(0.99 ** 68)                  # 0.505: still above the floor
    assert t.fraction(69) == 0.5 and t.fraction(1000) == 0.5            # 0.99^69 = 0.4998: floored
    t = TopK(gamma=0.5, min_frac=0.3)
    assert [t.fraction(e) for e in (0, 1, 2, 3)] == [1.0, 0.5, 0.3, 0.3]
    assert t.fraction(0.5) == pytest.approx(0.5 ** 0.5)                 # fractional epochs are fine
    with pytest.raises(ValueError, match='TopK: '):
        t.fraction(-1)


def test_topk_k_rounds_up_and_clamps():
    t = TopK(gamma=0.99, min_frac=0.5)
    assert t.k(32, 0) == 32
    assert t.k(32, 1) == 32                                             # 31.68 -> 32
    assert t.k(32, 5) == math.ceil(32 * 0.99 ** 5) == 31                # 30.43 -> 31
    assert t.k(32, 1000) == 16 and t.k(7, 1000) == 4                    # floor: ceil(3.5) = 4
    assert t.last_fraction == 0.5
    assert TopK(gamma=0.8, min_frac=0.1).k(25, 2) == 16                 # 25 * 0.8**2 = 16.000000000000004 keeps 16
    assert TopK(gamma=0.5, min_frac=0.01).k(4, 10) == 1                  # at least one sample
    assert TopK().k(1, 1000) == 1
    with pytest.raises(ValueError, match='TopK: '):
        TopK(gamma=0)
    with pytest.raises(ValueError, match='TopK: '):
        TopK(min_frac=1.5)


def test_topk_select_keeps_best_scored():
    torch.manual_seed(11)
    scores = torch.randn([16, 1])                                       # D logits on fakes
    for k in (1, 5, 16):
        idx = TopK.select(scores, k)
        expected = torch.argsort(scores[:, 0], descending=True)[:k]
        assert idx.dtype == torch.long and torch.equal(idx, expected)
    with pytest.raises(ValueError, match='TopK: '):
        TopK.select(scores, 0)
    with pytest.raises(ValueError, match='TopK: '):
        TopK.select(scores, 17)


def test_topk_loss_sign_convention_and_gradient():
    torch.manual_seed(12)
    logits = torch.randn([8, 1], requires_grad=True)
    per_sample = F.softplus(-logits)                                    # non-saturating G loss: larger logit = more real
    loss = topk_loss(per_sample, logits, 3)
    # The kept samples are the 3 with the smallest G loss.
    assert torch.allclose(loss, torch.sort(per_sample[:, 0]).values[:3].mean())
    loss.backward()
    kept = torch.argsort(logits.detach()[:, 0], descending=True)[:3]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[kept] = True
    assert (logits.grad[mask] != 0).all() and (logits.grad[~mask] == 0).all()
    assert torch.equal(TopK().topk_loss(per_sample, logits, 3), loss)


def test_topk_state_round_trip():
    a = TopK(gamma=0.9, min_frac=0.6)
    a.k(10, 3)
    state = a.state_dict()
    assert state == {'gamma': 0.9, 'min_frac': 0.6, 'last_fraction': pytest.approx(0.729)}
    b = TopK(gamma=0.9, min_frac=0.6)
    b.load_state_dict(state)
    assert b.last_fraction == a.last_fraction
    with pytest.raises(KeyError, match='TopK: '):
        b.load_state_dict({})

#----------------------------------------------------------------------------
# Construction by class name, as training.networks does it (skipped until dnnlib exists).

def test_construct_by_class_name():
    dnnlib = pytest.importorskip('dnnlib')
    if not hasattr(dnnlib, 'construct_class_by_name'):
        pytest.skip('dnnlib.construct_class_by_name not written yet')
    attn = dnnlib.construct_class_by_name(class_name='training.attention.SelfAttention', channels=8, resolution=8)
    fq = dnnlib.construct_class_by_name(class_name='training.fq.FeatureQuantizer', channels=8, dict_size=256, decay=0.8)
    topk = dnnlib.construct_class_by_name(class_name='training.topk.TopK', gamma=0.99, min_frac=0.5)
    assert isinstance(attn, SelfAttention) and isinstance(fq, FeatureQuantizer) and isinstance(topk, TopK)

#----------------------------------------------------------------------------
