"""Snapshots written before the 2D and 3D networks became one family still load and give the same outputs.

tests/data/legacy holds a tiny 2D snapshot (attention and feature quantization hooks inside) and a tiny 3D one,
written by the code of commit 0f33175 with class names such as ``mri.networks3d.Generator`` and
``mri.attention.SelfAttention``, and the outputs they gave then (tests/data/legacy/make_legacy_snapshots.py).
"""

import os

import numpy as np
import pytest
import torch

from torch_utils import snapshot

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'legacy')


@pytest.mark.parametrize('kind', ['2d', '3d'])
def test_old_snapshot_reproduces_its_outputs(kind):
    snap = snapshot.load_snapshot(os.path.join(DATA, f'snapshot{kind}.pt'))
    expected = np.load(os.path.join(DATA, f'outputs{kind}.npz'))
    G, D = snap.G_ema, snap.D
    assert snap.augment_pipe is not None and float(snap.augment_pipe.p) == (0.25 if kind == '2d' else 0.5)
    with torch.no_grad():
        for seed in (0, 1, 2):
            z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float()
            c = torch.zeros([1, G.c_dim])
            c[0, seed % G.c_dim] = 1
            img = G(z, c, noise_mode='const')
            np.testing.assert_allclose(img.numpy(), expected[f'img{seed}'], rtol=0, atol=1e-5)
            logits = D(torch.from_numpy(expected[f'img{seed}']), c)
            np.testing.assert_allclose(logits.numpy(), expected[f'logit{seed}'], rtol=1e-5, atol=1e-5)
