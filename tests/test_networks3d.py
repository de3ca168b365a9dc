"""3D networks (mri/networks3d.py) and their resampling (mri/resample3d.py) on tiny volumes (CPU)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mri import resample3d
from mri.networks3d import Discriminator, Generator, ShapeError, volume_geometry
from torch_utils import snapshot
from torch_utils.ops import conv2d_resample, upfirdn2d

TINY = dict(channel_base=256, channel_max=16)


def _nets(res, c_dim=3, channels=2, **kw):
    torch.manual_seed(0)
    G = Generator(z_dim=16, c_dim=c_dim, w_dim=16, img_resolution=res, img_channels=channels,
                  mapping_kwargs=dict(num_layers=2), **TINY, **kw)
    D = Discriminator(c_dim=c_dim, img_resolution=res, img_channels=channels, **TINY, **kw)
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
    assert volume_geometry([160, 192, 160]) == ([160, 192, 160], [5, 6, 5], 5)
    assert volume_geometry(128) == ([128, 128, 128], [4, 4, 4], 5)
    for bad in [100, [240, 240, 155], 4, [8, 8]]:
        with pytest.raises(ShapeError) as err:
            Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=bad, img_channels=1)
        assert '\n' not in str(err.value)


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


def test_resampling_matches_2d_ops():
    """On volumes constant along D, the separable 3D ops reduce to the 2D ones (checked against upfirdn2d)."""
    f = resample3d.setup_filter([1, 3, 3, 1]).double()
    x2 = torch.randn([2, 3, 8, 8], dtype=torch.float64)
    x = x2[:, :, None].expand(-1, -1, 8, -1, -1)
    torch.testing.assert_close(resample3d.upsample3d(x, f)[:, :, 8], upfirdn2d.upsample2d(x2, f))
    torch.testing.assert_close(resample3d.downsample3d(x, f)[:, :, 2], upfirdn2d.downsample2d(x2, f))
    w2 = torch.randn([5, 3, 3, 3], dtype=torch.float64)
    w = torch.zeros([5, 3, 3, 3, 3], dtype=torch.float64)
    w[:, :, 1] = w2
    for kw in [dict(up=2), dict(down=2)]:
        got = resample3d.conv3d_resample(x, w, f, padding=1, **kw)
        want = conv2d_resample.conv2d_resample(x2, w2, f=f, padding=1, **kw)
        torch.testing.assert_close(got[:, :, got.shape[2] // 2], want)
    # up=2 is exactly conv3d(upsample with padding, w).
    x = torch.randn([1, 3, 4, 4, 4], dtype=torch.float64)
    want = F.conv3d(resample3d.upfirdn3d(x, f, up=2, padding=[3, 2], gain=8), w)
    torch.testing.assert_close(resample3d.conv3d_resample(x, w, f, up=2, padding=1), want)


def test_resampling_gradcheck():
    f = resample3d.setup_filter([1, 3, 3, 1]).double()
    x = torch.randn([1, 2, 4, 4, 4], dtype=torch.float64, requires_grad=True)  # 2 channels: the CPU's depthwise form.
    w = torch.randn([1, 2, 3, 3, 3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resample3d.upsample3d(t, f), [x])
    assert torch.autograd.gradcheck(lambda t: resample3d.downsample3d(t, f), [x])
    w = w.detach()  # The weight gradient is plain conv3d's; check the resampling paths w.r.t. the input.
    assert torch.autograd.gradcheck(lambda t: resample3d.conv3d_resample(t, w, f, up=2, padding=1), [x])
    assert torch.autograd.gradcheck(lambda t: resample3d.conv3d_resample(t, w, f, down=2, padding=1), [x])
    x = torch.randn([1, 2, 2, 2, 4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: resample3d.upsample3d(t, f), [x])


@pytest.mark.parametrize('op', ['up', 'down', 'updown', 'conv_up', 'conv_down'])
def test_resampling_pass_forms_agree(monkeypatch, op):
    """The CPU's depthwise filter passes and the folded-batch passes the GPU keeps give the same values, input
    gradients and second derivatives (R1 differentiates through them), per channel (each channel its own data)."""
    f = resample3d.setup_filter([1, 3, 3, 1]).double()
    torch.manual_seed(0)
    x0 = torch.randn([2, 3, 6, 5, 4], dtype=torch.float64)
    w = torch.randn([4, 3, 3, 3, 3], dtype=torch.float64)
    fn = dict(up=lambda t: resample3d.upsample3d(t, f),
              down=lambda t: resample3d.downsample3d(t, f),
              updown=lambda t: resample3d.upfirdn3d(t, f, up=2, down=3, padding=[2, 1]),
              conv_up=lambda t: resample3d.conv3d_resample(t, w, f, up=2, padding=1),
              conv_down=lambda t: resample3d.conv3d_resample(t, w, f, down=2, padding=1))[op]
    results = []
    for form in resample3d._PASS_FORMS:
        monkeypatch.setattr(resample3d, '_pass_form_override', form)
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        g, = torch.autograd.grad((y.square() * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum(), x,
                                 create_graph=True)
        gg, = torch.autograd.grad(g.square().sum(), x)
        results.append((y, g, gg))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][0].abs().sum() > 0 and results[0][2].abs().sum() > 0


def test_fp16_path_with_clamp(monkeypatch):
    """The reduced-precision blocks (CUDA in training) run and clamp when forced on CPU."""
    from training import networks
    monkeypatch.setattr(networks, 'ALLOW_CPU_FP16', True)
    for mp in ('bfloat16',):
        G, D = _nets(16, num_fp16_res=1, conv_clamp=8, mixed_precision=mp)
        img = G(torch.randn([2, 16]), torch.eye(3)[:2])
        assert img.dtype == torch.float32 and torch.isfinite(img).all()
        assert torch.isfinite(D(img, torch.eye(3)[:2])).all()
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
    assert resample3d._pass_form_override is None  # The forced form does not outlive the measurement.
