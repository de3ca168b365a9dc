"""Tumour label maps as one-hot image channels, and back.

BraTS labels (Menze et al., "The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI 2015;
Baid et al., "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark", arXiv:2107.02314): 1 = necrotic / non-enhancing tumour
core (NETC), 2 = surrounding non-enhancing FLAIR hyperintensity (SNFH, oedema), 3 = enhancing tumour (ET; label 4 in
the 2021 release, remapped to 3 when a case is loaded).

To the networks the map is three exclusive channels `seg_netc, seg_snfh, seg_et`: vmax where the voxel has that
label, 0 elsewhere; after the usual `v / vmax * 2 - 1` mapping they are +1 / -1. `decode_seg` inverts this for real
and for generated (soft) channels: 0 where all three channels are below 0, else 1 + argmax.

An archive stores the map itself, as one last channel of values 0-3 (dataset.json "seg_storage": "labelmap"), which
the dataset loader expands into the three channels: a third of the bytes, and it deflates to almost nothing.
Archives without "seg_storage" hold the three one-hot channels and load as before.
"""

import numpy as np

SEG_CHANNELS = ('seg_netc', 'seg_snfh', 'seg_et')  # channel names, label k+1 lives in channel k
SEG_LABELS = (0, 1, 2, 3)                           # the label set after loading (2021's 4 already mapped to 3)
SEG_STORAGE = 'labelmap'                            # dataset.json "seg_storage" of archives that store the map


def encode_seg(
    labels,                 # integer label map of any shape, values in {0, 1, 2, 3}
    vmax=1,                 # value written where a label is present (65535 for 16-bit, 255 for 8-bit archives)
    dtype=np.float32,       # output dtype
):
    """Returns a one-hot array of shape `(3, *labels.shape)`: channel k is `vmax` where `labels == k + 1`, else 0."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 3):
        raise ValueError(f'encode_seg: label values must be in 0..3, got range {labels.min()}..{labels.max()}')
    out = np.zeros((len(SEG_CHANNELS),) + labels.shape, dtype=dtype)
    for k in range(len(SEG_CHANNELS)):
        out[k][labels == k + 1] = vmax
    return out


def decode_seg(
    channels,               # the three seg channels in [-1, 1] (numpy array or torch tensor), float
    axis=0,                 # the axis that holds the three channels (1 for an NCHW / NCDHW batch)
):
    """Returns the label map (int64, channel axis removed): 0 where all three channels are < 0, else 1 + argmax.

    Exact inverse of `encode_seg` after the archive's `v / vmax * 2 - 1` mapping; for generated images it picks the
    most confident tumour class wherever any class is more on than off.
    """
    if hasattr(channels, 'detach'):  # torch tensor: stay on its device, no numpy round trip
        import torch
        if channels.shape[axis] != len(SEG_CHANNELS):
            raise ValueError(f'decode_seg: expected {len(SEG_CHANNELS)} channels on axis {axis}, got shape {tuple(channels.shape)}')
        best, idx = channels.max(dim=axis)
        return torch.where(best >= 0, idx + 1, torch.zeros_like(idx))
    channels = np.asarray(channels)
    if channels.shape[axis] != len(SEG_CHANNELS):
        raise ValueError(f'decode_seg: expected {len(SEG_CHANNELS)} channels on axis {axis}, got shape {channels.shape}')
    idx = channels.argmax(axis=axis)
    best = channels.max(axis=axis)
    return np.where(best >= 0, idx + 1, 0).astype(np.int64)


def onehot_to_labelmap(
    channels,               # the three one-hot seg channels as stored (0 / vmax), axis 0
):
    """Label map (uint8, values 0-3) of stored one-hot channels: 1 + the channel that is set, 0 where none is."""
    channels = np.asarray(channels)
    if channels.shape[0] != len(SEG_CHANNELS):
        raise ValueError(f'onehot_to_labelmap: expected {len(SEG_CHANNELS)} channels, got shape {channels.shape}')
    return np.where(channels.max(axis=0) > 0, channels.argmax(axis=0) + 1, 0).astype(np.uint8)

