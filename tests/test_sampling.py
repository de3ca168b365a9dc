"""training.sampling (issue 19): a seed's sample, truncation around the tracked global w_avg (StyleGAN2-ADA's) or
around the class's own average w, the cached class averages."""

import numpy as np
import pytest
import torch

from training import sampling
from training.networks import Generator

AXIAL, CORONAL = np.array([1, 0], np.float32), np.array([0, 1], np.float32)


def _generator(c_dim=2, img_resolution=8, seed=0):
    torch.manual_seed(seed)
    G = Generator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=img_resolution, img_channels=1,
                  mapping_kwargs=dict(num_layers=2), channel_base=64, channel_max=8).eval()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn_like(G.mapping.w_avg))  # a trained G's tracked average is not zero
    return G


def _c(label):
    return torch.from_numpy(np.asarray(label, np.float32)[None])


@pytest.mark.parametrize('psi', [0.5, 1.0, -0.3])
def test_global_center_is_stylegan2_ada_truncation(psi):
    G = _generator()
    z = sampling.seed_z(G, 3)
    expected = G(z, _c(AXIAL), truncation_psi=psi, noise_mode='const')[0].detach().numpy()
    got = sampling.sample(G, 3, AXIAL, psi, 'const', center='global')
    assert got.dtype == np.float32 and np.array_equal(got, expected)


def test_seed_z_is_stylegan2_ada_generate_seed():
    G = _generator()
    z = sampling.seed_z(G, 7)
    assert z.shape == (1, 8) and z.dtype == torch.float32
    assert np.array_equal(z.numpy(), np.random.RandomState(7).randn(1, 8).astype(np.float32))


def test_psi_one_is_the_same_for_both_centers():
    G = _generator()
    a = sampling.sample(G, 5, CORONAL, 1.0, center='class')
    b = sampling.sample(G, 5, CORONAL, 1.0, center='global')
    assert np.array_equal(a, b)


def test_class_center_pulls_w_towards_the_class_average():
    G = _generator()
    averages = sampling.ClassAverages(num=200)
    avg = {name: averages(G, _c(label)) for name, label in [('axial', AXIAL), ('coronal', CORONAL)]}
    assert (avg['axial'] - avg['coronal']).norm() > 1e-3 * avg['axial'].norm()  # one average per class
    z = torch.cat([sampling.seed_z(G, s) for s in range(4)])
    c = _c(CORONAL).expand(4, -1)
    w = sampling.map_ws(G, z, c, 1, 'class', averages)
    w_half = sampling.map_ws(G, z, c, 0.5, 'class', averages)
    assert w.shape == w_half.shape == (4, G.num_ws, 8)
    far, near = (w - avg['coronal']).norm(dim=-1), (w_half - avg['coronal']).norm(dim=-1)
    assert torch.allclose(near, 0.5 * far, rtol=1e-4, atol=1e-6)  # the distance shrinks by psi
    near_global = (sampling.map_ws(G, z, c, 0.5, 'global') - avg['coronal']).norm(dim=-1)
    assert (near < near_global).all()  # the global average lies elsewhere: the class average is closer
    w_zero = sampling.map_ws(G, z, c, 0, 'class', averages)
    assert torch.allclose(w_zero, avg['coronal'][:, None].expand_as(w_zero))  # psi 0: every seed is the average


def test_class_center_mixes_classes_in_one_batch():
    G = _generator()
    averages = sampling.ClassAverages(num=100)
    z = torch.cat([sampling.seed_z(G, s) for s in (0, 1)])
    both = sampling.map_ws(G, z, torch.cat([_c(AXIAL), _c(CORONAL)]), 0.7, 'class', averages)
    one = sampling.map_ws(G, z[1:], _c(CORONAL), 0.7, 'class', averages)
    assert torch.allclose(both[1:], one)


def test_class_averages_are_cached_and_deterministic(monkeypatch):
    G = _generator()
    calls = []
    mapping = G.mapping.forward
    monkeypatch.setattr(G.mapping, 'forward', lambda *a, **k: calls.append(1) or mapping(*a, **k))
    averages = sampling.ClassAverages(num=60, batch=25)
    first = averages(G, _c(AXIAL))
    assert len(calls) == 3 and first.shape == (1, 8)  # 60 latents in batches of 25
    assert averages(G, _c(AXIAL)) is first and len(calls) == 3  # kept
    again = sampling.ClassAverages(num=60, batch=7)(G, _c(AXIAL))
    assert torch.allclose(again, first, atol=1e-6)  # the same latents, whatever the batch
    assert torch.equal(sampling.ClassAverages(num=60, batch=25)(G, _c(AXIAL)), first)  # bit for bit on a rerun
    assert not torch.allclose(sampling.ClassAverages(num=60, seed=1)(G, _c(AXIAL)), first)
    a = sampling.sample(G, 2, AXIAL, 0.5, averages=averages)
    assert np.array_equal(a, sampling.sample(G, 2, AXIAL, 0.5, averages=averages))


def test_unconditional_generator_falls_back_to_global():
    G = _generator(c_dim=0)
    z = sampling.seed_z(G, 1)
    expected = G(z, torch.zeros([1, 0]), truncation_psi=0.6, noise_mode='const')[0].detach().numpy()
    assert np.array_equal(sampling.sample(G, 1, np.zeros(0), 0.6, center='class'), expected)


def test_volume_generator_samples():
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=[8, 8, 8], img_channels=2,
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8).eval()
    out = sampling.sample(G, 0, AXIAL, 0.5, averages=sampling.ClassAverages(num=20))
    assert out.shape == (2, 8, 8, 8)


def test_bad_center_is_a_one_line_value_error():
    G = _generator()
    with pytest.raises(ValueError) as err:
        sampling.map_ws(G, sampling.seed_z(G, 0), _c(AXIAL), 0.5, center='mean')
    assert "'mean'" in str(err.value) and 'class' in str(err.value) and '\n' not in str(err.value)
    with pytest.raises(ValueError):  # refused whatever psi is: a typo is not silently ignored at psi 1
        sampling.map_ws(G, sampling.seed_z(G, 0), _c(AXIAL), 1, center='mean')
