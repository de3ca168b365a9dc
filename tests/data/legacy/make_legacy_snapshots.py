"""Writes the tiny 2D and 3D snapshots that tests/test_legacy_snapshots.py loads, with the outputs they gave.

Run once, with the code of commit 0f33175 (before the 2D and 3D networks became one family), from the
repository root: `python tests/data/legacy/make_legacy_snapshots.py`. The files it wrote are kept as they are:
they stand for the snapshots users already have (class names such as ``mri.networks3d.Generator`` and
``mri.attention.SelfAttention`` inside them); the test checks that today's code rebuilds them and that the
same outputs come out. Running it again with today's code would write today's names and defeat the test (and
cannot: mri.networks3d and mri.augment3d no longer exist; it needs a checkout of that commit).
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
import dnnlib  # noqa: E402
from torch_utils import snapshot  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _perturb(module, seed):
    """Every float tensor gets a reproducible non-trivial value, so that a mapped-wrong tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or name.endswith('resample_filter'):
                continue
            t.add_(torch.randn(t.shape, generator=gen) * 0.2)


def _outputs(G, D, c_dim, seeds=(0, 1, 2)):
    out = {}
    for seed in seeds:
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float()
        c = torch.zeros([1, c_dim])
        c[0, seed % c_dim] = 1
        img = G(z, c, noise_mode='const')
        out[f'img{seed}'] = img.numpy()
        out[f'logit{seed}'] = D(img, c).numpy()
    return out


def main():
    torch.manual_seed(0)
    # 2D: a conditional 16x16 two-channel network with attention in G and D and feature quantization in D.
    common = dict(c_dim=2, img_resolution=16, img_channels=2)
    G = dnnlib.construct_class_by_name(
        class_name='training.networks.Generator', z_dim=16, w_dim=16, mapping_kwargs=dict(num_layers=2),
        channel_base=256, channel_max=16, num_fp16_res=0, conv_clamp=None, attn_res=[8],
        attn_kwargs=dict(class_name='mri.attention.SelfAttention'), **common)
    D = dnnlib.construct_class_by_name(
        class_name='training.networks.Discriminator', architecture='resnet', channel_base=256, channel_max=16,
        num_fp16_res=0, conv_clamp=None, attn_res=[8], attn_kwargs=dict(class_name='mri.attention.SelfAttention'),
        epilogue_kwargs=dict(mbstd_group_size=1),
        quantize_kwargs=dict(class_name='mri.fq.FeatureQuantizer', resolutions=[8], dict_size=8, decay=0.8,
                             mode='forward'), **common)
    from training.augment import augpipe_specs
    pipe = dnnlib.construct_class_by_name(class_name='training.augment.AugmentPipe', **augpipe_specs['bgc'])
    pipe.p.fill_(0.25)
    _perturb(G, 1)
    _perturb(D, 2)
    G.eval(), D.eval()
    snapshot.save_snapshot(os.path.join(HERE, 'snapshot2d.pt'), dict(G=G, D=D, G_ema=G, augment_pipe=pipe),
                           dataset=dict(kind='slices', resolution=16, channels=['t2w', 't2f'], label_names=['a', 'b']))
    with torch.no_grad():
        np.savez(os.path.join(HERE, 'outputs2d.npz'), **_outputs(G, D, 2))

    # 3D: a conditional 8x16x8 two-channel volume network (one modality and one label channel).
    common = dict(c_dim=2, img_resolution=[8, 16, 8], img_channels=2)
    G = dnnlib.construct_class_by_name(
        class_name='mri.networks3d.Generator', z_dim=16, w_dim=16, mapping_kwargs=dict(num_layers=2),
        channel_base=128, channel_max=16, num_fp16_res=0, conv_clamp=None, checkpointing=False,
        mixed_precision='float16', **common)
    D = dnnlib.construct_class_by_name(
        class_name='mri.networks3d.Discriminator', architecture='resnet', channel_base=128, channel_max=16,
        num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=1), checkpointing=False,
        mixed_precision='float16', **common)
    spec = {k: v for k, v in augpipe_specs['bgc'].items() if k in dnnlib.get_obj_by_name('mri.augment3d.AUGMENT3D_KEYS')}
    pipe = dnnlib.construct_class_by_name(class_name='mri.augment3d.AugmentPipe3d', channel_names=['t2f', 'seg_netc'],
                                          **spec)
    pipe.p.fill_(0.5)
    _perturb(G, 3)
    _perturb(D, 4)
    G.eval(), D.eval()
    snapshot.save_snapshot(os.path.join(HERE, 'snapshot3d.pt'), dict(G=G, D=D, G_ema=G, augment_pipe=pipe),
                           dataset=dict(kind='volumes', image_shape=[2, 8, 16, 8], channels=['t2f', 'seg_netc'],
                                        label_names=['gli', 'ssa']))
    with torch.no_grad():
        np.savez(os.path.join(HERE, 'outputs3d.npz'), **_outputs(G, D, 2))


if __name__ == '__main__':
    main()
