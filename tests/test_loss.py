"""training.loss: top-k over the whole batch (any --batch-gpu, minibatch-std leak-free), R1, G losses, FQ terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from torch_utils import training_stats
from training import networks
from training.augment import AugmentPipe
from training.loss import StyleGAN2Loss


class _Mapping(torch.nn.Module):
    def forward(self, z, c, update_emas=False):
        return z[:, None, :]                                  # ws = z, one w per sample


class _Synthesis(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(n))        # one parameter per sample: its grad says who was kept

    def forward(self, ws, update_emas=False):
        return (self.scale * ws[:, 0, 0]).reshape(-1, 1, 1, 1)


class _G(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.mapping = _Mapping()
        self.synthesis = _Synthesis(n)


class _D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones([]))

    def forward(self, img, c, update_emas=False, update_quant=False, return_aux=False):
        logits = self.w * img.reshape(-1, 1)                  # logit = w * the image value
        return (logits, {}) if return_aux else logits


def test_topk_backpropagates_only_through_the_k_most_real_fakes():
    n = 8
    G, D = _G(n), _D()
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, topk_kwargs=dict(class_name='training.topk.TopK', gamma=0.5, min_frac=0.25),
                         dataset_size=16, pl_weight=0, r1_gamma=0)
    z = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3, 1.5, -2.0, 0.8])[:, None].repeat(1, 4)
    c = torch.zeros(n, 0)
    loss.accumulate_gradients('Gmain', real_img=None, real_c=None, gen_z=z, gen_c=c, gain=1, cur_nimg=16)
    # epoch 1: fraction 0.5, k = 4; the largest logits are samples 2, 5, 7, 0.
    assert loss.topk_fraction == 0.5
    grad = G.synthesis.scale.grad
    kept = set(torch.nonzero(grad).flatten().tolist())
    assert kept == {2, 5, 7, 0}
    # The kept samples' gradients are those of mean over k of softplus(-logit).
    expected = torch.zeros(n)
    for i in kept:
        x = z[i, 0]
        expected[i] = -torch.sigmoid(-x) * x / 4
    torch.testing.assert_close(grad, expected)


def test_without_topk_every_fake_counts_and_r1_penalises_slope():
    n = 4
    G, D = _G(n), _D()
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, pl_weight=0, r1_gamma=2.0)
    z = torch.randn(n, 3)
    loss.accumulate_gradients('Gmain', None, None, z, torch.zeros(n, 0), gain=1, cur_nimg=0)
    assert torch.count_nonzero(G.synthesis.scale.grad) == n
    # D(x) = w x: |dD/dx|^2 = w^2 per sample, so the R1 loss gamma/2 * w^2 has gradient gamma * w = 2 at w = 1.
    real = torch.randn(n, 1, 1, 1)
    D.w.grad = None  # The loop freezes D during G's phase; this stub does not.
    loss.accumulate_gradients('Dreg', real, torch.zeros(n, 0), z, torch.zeros(n, 0), gain=1, cur_nimg=0)
    assert math.isclose(float(D.w.grad), 2.0, rel_tol=1e-6)
    assert math.isclose(float(loss.real_sign_acc[1]), n)  # ADA statistics counted the real logits


# ------------------------------------------------------------------------------------------------------------
# The hooks through the real tiny networks: batch-level top-k, minibatch-std, FQ in G's loss and in R1.


TINY = dict(channel_base=128, channel_max=16, num_fp16_res=0, conv_clamp=None)
TOPK = dict(class_name='training.topk.TopK', gamma=0.5, min_frac=0.25)


def _nets(mbstd=4, noise=True, quantize_kwargs=None, seed=0):
    torch.manual_seed(seed)
    G = networks.Generator(z_dim=8, c_dim=0, w_dim=16, img_resolution=8, img_channels=1,
                           mapping_kwargs=dict(num_layers=1), use_noise=noise, **TINY)
    D = networks.Discriminator(c_dim=0, img_resolution=8, img_channels=1, quantize_kwargs=quantize_kwargs,
                               epilogue_kwargs=dict(mbstd_group_size=mbstd, mbstd_num_channels=1 if mbstd else 0), **TINY)
    D.requires_grad_(False)             # The loop freezes the module a phase does not train.
    return G, D


def _rounds(z, batch_gpu):
    c = torch.zeros([z.shape[0], 0])
    return [(None, None, zz, cc) for zz, cc in zip(z.split(batch_gpu), c.split(batch_gpu))]


@pytest.mark.parametrize('batch_gpu', [1, 3, 12])
def test_topk_keeps_exactly_the_k_best_of_the_whole_batch_whatever_batch_gpu(batch_gpu):
    # Without minibatch-std, noise and style mixing each fake's score is its own: the kept set must be the k best
    # of all 12, however the batch is split into rounds (per-round top-k kept 1 of 1 at --batch-gpu 1).
    G, D = _nets(mbstd=0, noise=False)
    z = torch.randn([12, 8], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores = D(G(z, None), None).flatten()
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, topk_kwargs=TOPK, dataset_size=12,
                         style_mixing_prob=0, pl_weight=0, r1_gamma=0)
    z.requires_grad_(True)
    loss.accumulate_phase('Gmain', _rounds(z, batch_gpu), gain=1 / (12 // batch_gpu), cur_nimg=12)
    k = math.ceil(12 * 0.5)             # epoch 1: fraction 0.5
    best = set(torch.topk(scores, k).indices.tolist())
    assert loss.topk_last['k'] == k and set(torch.nonzero(loss.topk_last['keep']).flatten().tolist()) == best
    assert set(torch.nonzero(z.grad.abs().sum(1)).flatten().tolist()) == best
    # The gradient is that of the mean G loss over the kept fakes.
    G2, D2 = _nets(mbstd=0, noise=False)
    z2 = z.detach().clone().requires_grad_(True)
    logits = D2(G2(z2, None), None).flatten()
    F.softplus(-logits[sorted(best)]).mean().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('batch_gpu', [4, 8])   # replayed rounds; one round
def test_topk_discarded_fakes_get_exactly_zero_gradient_with_minibatch_std_noise_mixing_and_ada(batch_gpu):
    # Minibatch-std groups of 4 mix kept and discarded fakes; noise, style mixing and ADA draw random numbers,
    # which the gradient pass replays: its logits equal the scores exactly, and no gradient reaches a discarded
    # fake, not even through the group statistic (z.grad rows exactly 0).
    G, D = _nets(mbstd=4, noise=True)
    pipe = AugmentPipe(xflip=1, rotate90=1, xint=1, brightness=1, contrast=1)
    pipe.p.fill_(0.8)
    z = torch.randn([8, 8], generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, augment_pipe=pipe, topk_kwargs=TOPK, dataset_size=8,
                         style_mixing_prob=0.9, pl_weight=0, r1_gamma=0)
    loss.accumulate_phase('Gmain', _rounds(z, batch_gpu), gain=batch_gpu / 8, cur_nimg=8)
    keep = loss.topk_last['keep']
    assert int(keep.sum()) == 4 and float(loss.topk_last['replay_error']) == 0
    row = z.grad.abs().sum(1)
    assert torch.equal(row[~keep], torch.zeros_like(row[~keep]))
    assert bool((row[keep] > 0).all())


def test_topk_global_selects_over_the_batch_of_all_ranks(monkeypatch):
    # Two ranks of 4 fakes each: rank 1's scores are all higher, so at fraction 0.5 the global rule keeps none
    # of rank 0's fakes and the weight is 8 / 4 (all ranks' batch over k).
    G, D = _nets(mbstd=0, noise=False)
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, topk_kwargs=TOPK, dataset_size=8, topk_global=True)
    dist = torch.distributed
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(dist, 'get_rank', lambda: 0)
    monkeypatch.setattr(dist, 'all_gather', lambda out, t: [out[0].copy_(t), out[1].copy_(t + 10)])
    keep, weight, k = loss._topk_select(torch.tensor([0.5, 3.0, -1.0, 2.0]), cur_nimg=8)
    assert k == 4 and weight == 2.0 and not bool(keep.any())
    monkeypatch.setattr(dist, 'get_rank', lambda: 1)
    monkeypatch.setattr(dist, 'all_gather', lambda out, t: [out[0].copy_(t - 10), out[1].copy_(t)])
    keep, _, _ = loss._topk_select(torch.tensor([0.5, 3.0, -1.0, 2.0]), cur_nimg=8)
    assert keep.tolist() == [True, True, True, True]


def _fq(mode, decay=0.8):
    return dict(class_name='training.fq.FeatureQuantizer', resolutions=[4], dict_size=8, decay=decay, mode=mode)


@pytest.mark.parametrize('mode', ['forward', 'loss'])
def test_generator_loss_contains_the_fakes_commitment_term(mode, monkeypatch):
    G, D = _nets(mbstd=0, noise=False, quantize_kwargs=_fq(mode))
    reported = {}
    monkeypatch.setattr(training_stats, 'report', lambda name, value: reported.setdefault(name, value))
    z = torch.randn([4, 8], generator=torch.Generator().manual_seed(3))
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, fq_weight=2.5, style_mixing_prob=0, pl_weight=0)
    loss.accumulate_phase('Gmain', _rounds(z, 4), gain=1, cur_nimg=0)
    assert 'Loss/G_fake/fq' in reported and float(reported['Loss/G_fake/fq'].detach()) > 0
    got = [p.grad.clone() for p in G.parameters()]
    # Reference: mean softplus(-D(G(z))) + 2.5 * commitment of the fakes' features.
    G.zero_grad(set_to_none=True)
    logits, aux = D(G(z, None), None, return_aux=True)
    (F.softplus(-logits).mean() + 2.5 * aux['fq_loss']).backward()
    for a, p in zip(got, G.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
    G.zero_grad(set_to_none=True)
    F.softplus(-D(G(z, None), None)).mean().backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(got, G.parameters()))  # the term matters


def test_fq_forward_mode_r1_matches_finite_differences(monkeypatch):
    # In forward mode D is piecewise constant in its input past the quantizer: its finite-difference slope is ~0
    # and autograd would give the straight-through stand-in. R1 is therefore taken on the unquantized D (same
    # weights); the penalty the loss reports must match central differences of that D over every pixel.
    G, D = _nets(mbstd=0, noise=False, quantize_kwargs=_fq('forward'))
    x = torch.randn([1, 1, 8, 8], generator=torch.Generator().manual_seed(4))
    reported = {}
    monkeypatch.setattr(training_stats, 'report', lambda name, value: reported.setdefault(name, value))
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, r1_gamma=1.0, pl_weight=0)
    loss.accumulate_phase('Dreg', [(x, torch.zeros([1, 0]), None, None)], gain=1, cur_nimg=0)
    eps = 1e-3                          # D runs in float32; lrelu is piecewise linear, so a small step is exact
    basis = torch.eye(64).reshape(64, 1, 8, 8)
    with torch.no_grad():
        up = D(x + eps * basis, None, quantize=False).flatten()
        down = D(x - eps * basis, None, quantize=False).flatten()
        slope = (up - down) / (2 * eps)
        q_up, q_down = D(x + eps * basis, None).flatten(), D(x - eps * basis, None).flatten()
    assert float(reported['Loss/r1_penalty'].detach()) == pytest.approx(float(slope.square().sum()), rel=1e-2)
    assert float(((q_up - q_down) / (2 * eps)).abs().max()) < 1e-3 * float(slope.abs().max())  # quantized D: flat


def test_fq_dictionary_steps_once_per_d_step_whatever_the_rounds():
    # One D step = fake and real passes of every round; the dictionary takes one EMA step with their summed
    # statistics, so sum(N_k) goes from K to decay * K + (1 - decay) * positions, the decay the user set.
    G, D = _nets(mbstd=0, noise=False, quantize_kwargs=_fq('forward', decay=0.8))
    q = D.quantizers['4']
    D.requires_grad_(True)
    G.requires_grad_(False)
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, fq_weight=1.0, style_mixing_prob=0, pl_weight=0)
    real = torch.randn([6, 1, 8, 8])
    z = torch.randn([6, 8])
    c = torch.zeros([6, 0])
    rounds = list(zip(real.split(2), c.split(2), z.split(2), c.split(2)))
    loss.accumulate_phase('Dmain', rounds, gain=1 / 3, cur_nimg=0)
    positions = 2 * 6 * 4 * 4          # fake + real, 6 images each, 4x4 positions
    assert float(q.cluster_size.sum()) == pytest.approx(0.8 * 8 + 0.2 * positions, rel=1e-6)
    assert q._pending is None and not q.deferred
