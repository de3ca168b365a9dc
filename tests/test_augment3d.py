"""3D ADA (mri/augment3d.py): identity at p=0, label channels stay one-hot, borders, gradients, the controller."""

import pytest
import torch

from mri.augment3d import AUGMENT3D_KEYS, AugmentPipe3d
from training.augment import AdaController, augpipe_specs

NAMES = ['t1n', 't2w', 'seg_netc', 'seg_snfh', 'seg_et']


def _volumes(n=4, size=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand([n, len(NAMES), size, size, size], generator=gen) * 2 - 1
    labels = torch.randint(0, 4, [n, size, size, size], generator=gen)
    for k in range(3):
        x[:, 2 + k] = torch.where(labels == k + 1, 1.0, -1.0)
    return x


def _pipe(preset='bgcfnc', **kw):
    spec = {k: v for k, v in augpipe_specs[preset].items() if k in AUGMENT3D_KEYS}
    return AugmentPipe3d(**spec, channel_names=NAMES, **kw)


def test_identity_at_p0():
    pipe = _pipe()
    x = _volumes()
    assert torch.equal(pipe(x), x)
    assert torch.equal(pipe(x, debug_percentile=0.7), x)


@pytest.mark.parametrize('q', [None, 0.1, 0.9])
def test_labels_stay_onehot_and_images_change(q):
    pipe = _pipe()
    pipe.p.fill_(1.0)
    x = _volumes()
    y = pipe(x, debug_percentile=q)
    seg = y[:, 2:]
    assert set(torch.unique(seg).tolist()) <= {-1.0, 1.0}
    assert bool(((seg > 0).sum(dim=1) <= 1).all())
    assert (y[:, :2] - x[:, :2]).abs().max() > 0.1
    # Labels moved with the images: where the geometry is a pure gather, the images follow the same map.


def test_geometry_moves_labels_with_images():
    """With geometric transforms only, a label channel that equals an image channel stays equal to it where
    the sampling is exact (flips and integer shifts), and reflected borders carry no zero fill."""
    pipe = AugmentPipe3d(xflip=1, xint=1, flip_axes=[0, 1, 2], channel_names=['t1n', 'seg_netc'])
    pipe.p.fill_(1.0)
    lab = (torch.rand([4, 1, 8, 8, 8]) > 0.5).float() * 2 - 1
    x = torch.cat([lab, lab], dim=1)
    y = pipe(x)
    assert torch.equal(y[:, 0], y[:, 1])
    assert set(torch.unique(y).tolist()) <= {-1.0, 1.0}  # No zero padding at the borders.


def test_untouched_samples_and_flip_default():
    """Only samples that drew a transform are resampled; the default flip mirrors axis 0 (left-right) only."""
    pipe = AugmentPipe3d(xflip=1, channel_names=NAMES)
    pipe.p.fill_(1.0)
    x = _volumes(n=16)
    y = pipe(x)
    flipped = [bool(torch.equal(y[i], x[i].flip(1))) for i in range(16)]
    same = [bool(torch.equal(y[i], x[i])) for i in range(16)]
    assert all(a or b for a, b in zip(flipped, same)) and any(flipped) and any(same)


def test_rotation_scaling_smooth_and_bounded():
    pipe = AugmentPipe3d(rotate=1, scale=1, aniso=1, channel_names=NAMES)
    pipe.p.fill_(1.0)
    x = _volumes(n=2)
    y = pipe(x, debug_percentile=0.8)
    assert y[:, :2].abs().max() <= 1.0 + 1e-5  # Trilinear weights are convex: no overshoot.
    assert set(torch.unique(y[:, 2:]).tolist()) <= {-1.0, 1.0}


def test_second_order_gradients():
    """R1 differentiates D(augment(x)) w.r.t. x and then again w.r.t. D's weights."""
    pipe = _pipe()
    pipe.p.fill_(0.8)
    x = _volumes(n=2, size=8).requires_grad_(True)
    w = torch.randn([1, len(NAMES), 1, 1, 1], requires_grad=True)
    out = (pipe(x) * w).sum()
    g, = torch.autograd.grad(out, x, create_graph=True)
    g.square().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_controller_reused():
    pipe = _pipe()
    ada = AdaController(target=0.6, interval=4, kimg=1, batch_size=250)
    ada.accumulate(10, 10)
    assert ada.update_from_accumulated(pipe) == pytest.approx(1.0)


def test_bad_input():
    pipe = _pipe()
    with pytest.raises(ValueError, match=r'\[N, C, D, H, W\]'):
        pipe(torch.zeros([2, 5, 8, 8]))
    with pytest.raises(ValueError, match='channel_names'):
        pipe(torch.zeros([2, 3, 8, 8, 8]))
    with pytest.raises(ValueError, match='flip_axes'):
        AugmentPipe3d(flip_axes=[3])
