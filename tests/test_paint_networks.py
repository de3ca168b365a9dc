"""The painting family (training.paint), its loss (training.paint_loss) and repaint masks (mri.painting.masks)."""

import pytest
import torch

from mri.painting.masks import RepaintMasks, dilate, shift
from torch_utils import snapshot
from training.paint import PaintDiscriminator, PaintGenerator, is_paint_generator, paint_layout

CHANNELS = ['t1n', 't2w', 'brain', 'seg_netc', 'seg_snfh', 'seg_et']
TINY = dict(channel_base=64, channel_max=16, num_fp16_res=0, conv_clamp=None)


def _nets(res, c_dim=2):
    G = PaintGenerator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=res, img_channels=len(CHANNELS),
                       channels=CHANNELS, mapping_kwargs=dict(num_layers=1), **TINY)
    D = PaintDiscriminator(c_dim=c_dim, img_resolution=res, img_channels=len(CHANNELS), channels=CHANNELS, **TINY)
    return G, D


def _batch(shape, n=4, seed=0):
    """Archive-layout patches in [-1, 1]: even ones hold a cubic tumour (SNFH around ET) in a brain box."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.rand([n, len(CHANNELS)] + shape, generator=gen) * 2 - 1
    inner = (slice(None), slice(None)) + tuple(slice(2, s - 2) for s in shape)
    brain = torch.zeros([n, 1] + shape)
    brain[inner] = 1
    labels = torch.zeros([n, 3] + shape)
    for i in range(0, n, 2):
        labels[(i, 1) + tuple(slice(s // 2 - 3, s // 2 + 3) for s in shape)] = 1
        labels[(i, 1) + tuple(slice(s // 2 - 1, s // 2 + 1) for s in shape)] = 0
        labels[(i, 2) + tuple(slice(s // 2 - 1, s // 2 + 1) for s in shape)] = 1
    real[:, 2:3] = brain * 2 - 1
    real[:, 3:] = labels * 2 - 1
    return real, labels, brain


@pytest.mark.parametrize('res', [16, [16, 16, 16]], ids=['2d', '3d'])
def test_outside_the_mask_is_exactly_the_input(res):
    torch.manual_seed(0)
    G, _ = _nets(res)
    shape = G.img_shape
    real, labels, brain = _batch(shape)
    mask, target = RepaintMasks(dilation=1)(labels, brain)
    z, c = torch.randn([4, G.z_dim]), torch.eye(2)[[0, 1, 0, 1]]
    out = G(z, c, context=real[:, :2], mask=mask, labels=target, noise_mode='random')
    assert out.shape == (4, 2, *shape)
    outside = (mask < 0.5).expand_as(out)
    assert torch.equal(out[outside], real[:, :2][outside])
    assert not torch.equal(out[~outside], real[:, :2][~outside])  # It painted something.
    # A value in the region of the context does not reach the output (the encoder sees the region blanked).
    ctx = real[:, :2].clone()
    ctx[(mask > 0.5).expand_as(ctx)] = 5.0
    G.eval()  # No dropout on the code.
    again = G(z, c, context=ctx, mask=mask, labels=target, noise_mode='const')
    ref = G(z, c, context=real[:, :2], mask=mask, labels=target, noise_mode='const')
    torch.testing.assert_close(again, ref)


@pytest.mark.parametrize('res', [16, [16, 16, 16]], ids=['2d', '3d'])
def test_the_label_map_changes_what_is_painted(res):
    torch.manual_seed(1)
    G, _ = _nets(res)
    G.eval()
    real, labels, brain = _batch(G.img_shape)
    mask, target = RepaintMasks(dilation=1)(labels, brain)
    z, c = torch.randn([4, G.z_dim]), torch.zeros([4, 2])
    tumour = G(z, c, context=real[:, :2], mask=mask, labels=target, noise_mode='const')
    healthy = G(z, c, context=real[:, :2], mask=mask, labels=torch.zeros_like(target), noise_mode='const')
    assert not torch.allclose(tumour[0], healthy[0])


def test_plain_call_and_discriminator_layouts():
    """G(z, c) repaints everything (the loop's module summary calls it so); D takes [image, mask, labels] as
    parts or as one tensor, with the mask and labels named as label channels for ADA."""
    G, D = _nets(16)
    z, c = torch.randn([2, G.z_dim]), torch.zeros([2, 2])
    img = G(z, c)
    assert img.shape == (2, 2, 16, 16)
    assert D.input_channels == ['t1n', 't2w', 'seg_repaint', 'seg_netc', 'seg_snfh', 'seg_et']
    mask, labels = torch.ones([2, 1, 16, 16]), torch.zeros([2, 3, 16, 16])
    torch.testing.assert_close(D(img, c, mask=mask, labels=labels), D(torch.cat([img, mask, labels], 1), c))
    assert is_paint_generator(G)
    with pytest.raises(ValueError, match='nothing to paint'):
        paint_layout(['brain', 'seg_et'], 2)


def test_snapshot_round_trip(tmp_path):
    G, D = _nets([16, 16, 16])
    path = str(tmp_path / 'snap.pt')
    snapshot.save_snapshot(path, dict(G=G, D=D, G_ema=G, augment_pipe=None), dataset=dict(kind='patches'))
    data = snapshot.load_snapshot(path)
    assert data.G_ema.class_name == 'training.paint.PaintGenerator'
    assert data.G_ema.paint_channels == ['t1n', 't2w'] and data.G_ema.label_channels == CHANNELS[3:]
    for a, b in zip(G.state_dict().values(), data.G_ema.state_dict().values()):
        assert torch.equal(a, b)


def test_masks_tumour_and_healthy_patches():
    real, labels, brain = _batch([24, 24], n=4)
    gen = torch.Generator().manual_seed(0)
    mask, target = RepaintMasks(dilation=2)(labels, brain, generator=gen)
    tumour = labels.any(1, keepdim=True)
    # Tumour patches: the tumour and its rim, its own labels.
    assert torch.equal(target[0], labels[0])
    assert bool(mask[0][tumour[0]].all()) and mask[0].sum() > tumour[0].sum()
    assert torch.equal(mask[0].bool(), dilate(tumour[:1], 2)[0] & (brain[0] > 0))
    # Healthy patches: a borrowed tumour shape inside the brain, all-zero labels.
    for i in (1, 3):
        assert target[i].sum() == 0 and mask[i].sum() > 0
        assert not bool((mask[i] > 0)[brain[i] == 0].any())
    # The same generator seed draws the same masks; 'healthy' mode never repaints a tumour with its labels.
    again, _ = RepaintMasks(dilation=2)(labels, brain, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    healthy, target = RepaintMasks(dilation=2)(labels, brain, mode='healthy', generator=gen)
    assert target.sum() == 0 and not bool((healthy > 0)[dilate(tumour, 2)].any())


def test_healthy_masks_without_a_tumour_in_the_batch():
    _, labels, brain = _batch([16, 16, 16], n=3)
    labels.zero_()
    mask, target = RepaintMasks(dilation=1)(labels, brain, generator=torch.Generator().manual_seed(3))
    assert target.sum() == 0
    assert all(mask[i].sum() > 0 for i in range(3))  # Blobs stand in for the shapes.
    assert not bool((mask > 0)[brain == 0].any())


def test_shift_drops_what_leaves():
    m = torch.zeros([6, 6], dtype=torch.bool)
    m[0:2, 0:2] = True
    assert shift(m, [1, 1])[1:3, 1:3].all() and shift(m, [1, 1]).sum() == 4
    assert shift(m, [-1, 0]).sum() == 2
    assert shift(m, [6, 0]).sum() == 0


@pytest.mark.parametrize('res', [16, [16, 16, 16]], ids=['2d', '3d'])
def test_loss_trains_tumour_and_healthy_patches(res):
    """One G and D step of every phase on a batch with tumour and healthy patches: finite gradients everywhere,
    R1 on the image channels only, the L1 term reported, ADA moving mask and labels as label channels."""
    from torch_utils import training_stats
    from training.augment import AugmentPipe
    from training.paint_loss import PaintLoss
    torch.manual_seed(2)
    G, D = _nets(res)
    real, _, _ = _batch(G.img_shape)
    pipe = AugmentPipe(xflip=1, rotate90=1, brightness=1, channel_names=D.input_channels)
    pipe.p.fill_(1.0)
    loss = PaintLoss(device=torch.device('cpu'), G=G, D=D, channels=CHANNELS, augment_pipe=pipe, r1_gamma=1,
                     style_mixing_prob=0.5, pl_weight=0, paint_l1=1.0,
                     mask_kwargs=dict(class_name='mri.painting.masks.RepaintMasks', dilation=1))
    c = torch.eye(2)[[0, 1, 0, 1]]
    collector = training_stats.Collector(regex='Loss/G/l1|Paint/.*')
    for phase, module in [('Gmain', G), ('Dmain', D), ('Dreg', D)]:
        module.requires_grad_(True)
        loss.accumulate_gradients(phase, real, c, torch.randn([4, G.z_dim]), c, gain=1, cur_nimg=0)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), phase
        module.requires_grad_(False)
        for p in module.parameters():
            p.grad = None
    collector.update()
    assert collector.num('Loss/G/l1') == 4 and collector.mean('Paint/region_fraction') > 0


def test_grid_fakes_keep_the_archive_layout():
    from training.paint_loss import PaintLoss
    G, D = _nets(16)
    G.eval()  # As the loop's G_ema.
    real, labels, _ = _batch([16, 16])
    loss = PaintLoss(device=torch.device('cpu'), G=G, D=D, channels=CHANNELS, pl_weight=0,
                     mask_kwargs=dict(class_name='mri.painting.masks.RepaintMasks'))
    z, c = torch.randn([4, G.z_dim]), torch.zeros([4, 2])
    a = loss.grid_fakes(G, z, c, real)
    assert a.shape == real.shape
    assert torch.equal(a[:, 2], real[:, 2])                 # The brain channel as it was.
    assert torch.equal(a[0, 3:], real[0, 3:])               # A tumour patch keeps its labels as the target.
    assert torch.equal(a, loss.grid_fakes(G, z, c, real))   # Every tick repaints the same regions.


def test_large_borrowed_shapes_are_shrunk():
    from mri.painting.masks import shrink
    m = torch.zeros([20, 20, 20], dtype=torch.bool)
    m[1:19, 2:18, 1:19] = True
    small = shrink(m, 0.2)
    assert 0.1 * m.numel() < small.sum() <= 0.2 * m.numel()
    assert torch.equal(shrink(small, 0.2), small)            # Small enough: unchanged.
    _, labels, brain = _batch([16, 16], n=2)
    labels[0, 1, 1:15, 1:15] = 1                              # A tumour that fills the patch.
    mask, _ = RepaintMasks(dilation=0, max_fraction=0.3)(labels, brain, generator=torch.Generator().manual_seed(0))
    assert mask[1].mean() <= 0.3
