"""training.loss: top-k through the real loss keeps exactly the k fakes D scores as most real; R1 and G losses."""

import math

import torch

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
    loss = StyleGAN2Loss(device=torch.device('cpu'), G=G, D=D, topk_kwargs=dict(class_name='mri.topk.TopK', gamma=0.5, min_frac=0.25),
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
