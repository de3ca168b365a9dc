"""The network family of training/networks.py on volumes [N, C, D, H, W]: tiny sizes, CPU (the resampling ops
under it: tests/test_ops.py)."""

import numpy as np
import pytest
import torch

from tests import _hooks_stub as stub
from torch_utils import snapshot
from torch_utils.ops import upfirdn3d
from training.networks import Discriminator, Generator, ShapeError, network_geometry

TINY = dict(channel_base=256, channel_max=16)


def _nets(res, c_dim=3, channels=2, **kw):
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=c_dim, w_dim=16, img_resolution=res, img_channels=channels, spatial_dims=3,
                  mapping_kwargs=dict(num_layers=2), **TINY, **kw)
    D = Discriminator(c_dim=c_dim, img_resolution=res, img_channels=channels, spatial_dims=3, **TINY, **kw)
    return G, D


@pytest.mark.parametrize('res, shape', [(8, [8, 8, 8]), (16, [16, 16, 16]), ([10, 12, 10], [10, 12, 10]),
                                        ([16, 8, 8], [16, 8, 8])])
def test_output_shapes(res, shape):
    G, D = _nets(res)
    z, c = torch.randn([3, 16]), torch.eye(3)
    img = G(z, c)
    assert list(img.shape) == [3, 2] + shape and torch.isfinite(img).all()
    logits = D(img, c)
    assert list(logits.shape) == [3, 1]
    logits, aux = D(img, c, return_aux=True)
    assert float(aux['fq_loss']) == 0


def test_geometry_and_bad_shapes():
    assert network_geometry([160, 192, 160]) == ([160, 192, 160], [5, 6, 5], 5)
    assert network_geometry(128, spatial_dims=3) == ([128, 128, 128], [4, 4, 4], 5)
    assert network_geometry(256) == ([256, 256], [4, 4], 6)  # An int alone is a square: the 2D family.
    for bad in [100, [240, 240, 155], 4, [8, 8, 8, 8]]:
        with pytest.raises(ShapeError) as err:
            Generator.check_resolution(bad, spatial_dims=None if np.ndim(bad) else 3)
        assert '\n' not in str(err.value)
    with pytest.raises(ShapeError):
        Discriminator(c_dim=0, img_resolution=[240, 240, 155], img_channels=1)


def test_one_family_for_images_and_volumes():
    """The same classes build both; the dimension follows img_resolution or spatial_dims, block names follow the
    largest side of each level, and D's epilogue is b{base side} in both (b4 at a cube of 4 * 2^k)."""
    G2 = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=1, **TINY)
    G3, D3 = _nets(16)
    assert G2.img_shape == [16, 16] and G3.img_shape == [16, 16, 16] and type(G2) is type(G3)
    assert G3.synthesis.b4.const.shape[1:] == (4, 4, 4) and G3.synthesis.b16.conv1.weight.shape[2:] == (3, 3, 3)
    assert hasattr(D3, 'b4') and D3.b4.fc.in_features == D3.b4.in_channels * 64
    _G, D = _nets([10, 12, 10])
    assert D.block_resolutions == [12] and D.b6.shape == [5, 6, 5]


def test_hooks_in_volumes():
    """Attention (G and D) and feature quantization (D) hooks run on volume features too."""
    stub.CALLS.clear()
    G, D = _nets(16, attn_res=[8], attn_kwargs=dict(class_name='tests._hooks_stub.RecordingAttention'))
    D = Discriminator(c_dim=3, img_resolution=16, img_channels=2, spatial_dims=3, **TINY,
                      quantize_kwargs=dict(class_name='tests._hooks_stub.RecordingQuantizer', resolutions=[4]))
    c = torch.eye(3)[:2]
    img = G(torch.randn([2, 16]), c)
    logits, aux = D(img, c, return_aux=True, update_quant=True)
    assert [(k, r, s) for k, r, s, _, _ in stub.CALLS] == [('attn', 8, (2, 16, 8, 8, 8)), ('fq', 4, (2, 16, 4, 4, 4))]
    assert logits.shape == (2, 1) and aux['fq_loss'] > 0


def test_conditional_output_depends_on_class():
    G, _D = _nets(8)
    z = torch.randn([1, 16]).repeat(3, 1)
    img = G(z, torch.eye(3), noise_mode='const')
    assert (img[0] - img[1]).abs().max() > 1e-3 and (img[1] - img[2]).abs().max() > 1e-3
    again = G(z, torch.eye(3), noise_mode='const')
    assert torch.equal(img, again)


def test_snapshot_round_trip(tmp_path):
    G, D = _nets([10, 12, 10], checkpointing=True)
    path = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(path, dict(G=G, D=D))
    data = snapshot.load_snapshot(path)
    G.eval(), data.G.eval()
    z, c = torch.randn([2, 16]), torch.eye(3)[:2]
    assert torch.equal(G(z, c, noise_mode='const'), data.G(z, c, noise_mode='const'))
    assert data.G.synthesis.checkpointing and data.G.img_shape == [10, 12, 10]


def test_checkpointing_same_gradients():
    """Activation checkpointing changes memory, not results: same loss, same gradients, R1 included."""
    grads = []
    for ckpt in (False, True):
        G, D = _nets(8, checkpointing=ckpt)
        G.train(), D.train()
        torch.manual_seed(1)
        z, c = torch.randn([2, 16]), torch.eye(3)[:2]
        img = G(z, c)  # Random noise inputs: the recomputation must see the same noise.
        real = img.detach().requires_grad_(True)
        r1, = torch.autograd.grad(D(real, c).sum(), real, create_graph=True)
        (D(img, c).sum() + r1.square().sum()).backward()
        grads.append([p.grad.clone() for p in list(G.parameters()) + list(D.parameters()) if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fp16_path_with_clamp():
    """The reduced-precision blocks (CUDA in training) run and clamp when forced on CPU."""
    for mp in ('bfloat16',):
        G, D = _nets(16, num_fp16_res=1, conv_clamp=8, mixed_precision=mp)
        z, c = torch.randn([2, 16]), torch.eye(3)[:2]
        img = G(z, c, noise_mode='const', cpu_fp16=True)
        assert img.dtype == torch.float32 and torch.isfinite(img).all()
        assert not torch.equal(img, G(z, c, noise_mode='const'))  # The bfloat16 block really ran.
        assert torch.isfinite(D(img, c, cpu_fp16=True)).all()
    with pytest.raises(ValueError, match='mixed_precision'):
        _nets(8, mixed_precision='float8')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_fp16_matches_fp32():
    G, D = _nets(16, num_fp16_res=2, conv_clamp=256)
    G, D = G.cuda(), D.cuda()
    z, c = torch.randn([2, 16], device='cuda'), torch.eye(3, device='cuda')[:2]
    a = G(z, c, noise_mode='const')
    b = G(z, c, noise_mode='const', force_fp32=True)
    assert (a - b).abs().max() < 0.05
    assert (D(a, c) - D(a, c, force_fp32=True)).abs().max() < 0.05


def test_bench_3d_dry_run(tmp_path):
    """bench/bench_3d.py's tiny mode measures every task and writes its JSON."""
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench', 'bench_3d.py')
    spec = importlib.util.spec_from_file_location('bench_3d', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = str(tmp_path / 'b.json')
    bench.main(['--dry-run', '--device', 'cpu', '--out', out, '--pass-form', 'auto,folded'])
    results = json.load(open(out))['results']
    assert [r['pass_form'] for r in results] == ['depthwise', 'folded']  # auto on CPU = depthwise.
    for result in results:
        for key in ['G_fwd_vol_per_s', 'D_fwd_bwd_vol_per_s', 'bare_fwd_bwd_vol_per_s', 'step_vol_per_s',
                    'step_over_bare', 'per_volume_gb']:
            assert np.isfinite(result[key]), key
    assert not upfirdn3d._forced  # The forced form does not outlive the measurement.
