"""Tumour label maps as one-hot image channels, and back.

BraTS labels (Menze et al., "The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI 2015;
Baid et al., "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark", arXiv:2107.02314): 1 = necrotic / non-enhancing tumour
core (NETC), 2 = surrounding non-enhancing FLAIR hyperintensity (SNFH, oedema), 3 = enhancing tumour (ET; label 4 in
the 2021 release, remapped to 3 when a case is loaded).

To the networks the map is three exclusive channels `seg_netc, seg_snfh, seg_et`: vmax where the voxel has that
label, 0 elsewhere; after the usual `v / vmax * 2 - 1` mapping they are +1 / -1. `decode_seg` inverts this for real
and for generated (soft) channels: 0 where all three channels are below 0, else 1 + argmax. These are the generic
rules of torch_utils.label_channels (label k + 1 in the k-th `seg_*` channel) for three classes; this module gives
them their BraTS meaning.

An archive stores the map itself, as one last channel of values 0-3 (dataset.json "seg_storage": "labelmap"), which
the dataset loader expands into the three channels: a third of the bytes, and it deflates to almost nothing.
Archives without "seg_storage" hold the three one-hot channels and load as before.
"""

import numpy as np

from torch_utils import label_channels

SEG_CHANNELS = ('seg_netc', 'seg_snfh', 'seg_et')  # channel names, label k+1 lives in channel k
SEG_LABELS = (0, 1, 2, 3)                           # the label set after loading (2021's 4 already mapped to 3)
SEG_STORAGE = 'labelmap'                            # dataset.json "seg_storage" of archives that store the map
ANATOMY_ORDER = ('t2f', 't1c', 't2w', 't1n')        # the channel under a label overlay: FLAIR shows oedema best


def overlay_channel(names):
    """The name of the image channel to draw the tumour labels over: the first of ANATOMY_ORDER in `names`, else
    the first channel that is no label channel; None when there is none."""
    names = list(names)
    return next((n for n in ANATOMY_ORDER if n in names),
                next((n for n in names if not label_channels.is_label_channel(n)), None))


def encode_seg(
    labels,                 # integer label map of any shape, values in {0, 1, 2, 3}
    vmax=1,                 # value written where a label is present (65535 for 16-bit, 255 for 8-bit archives)
    dtype=np.float32,       # output dtype
):
    """Returns a one-hot array of shape `(3, *labels.shape)`: channel k is `vmax` where `labels == k + 1`, else 0."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 3):
        raise ValueError(f'encode_seg: label values must be in 0..3, got range {labels.min()}..{labels.max()}')
    return label_channels.labelmap_to_onehot(labels, len(SEG_CHANNELS), vmax=vmax, dtype=dtype)


def decode_seg(
    channels,               # the three seg channels in [-1, 1] (numpy array or torch tensor), float
    axis=0,                 # the axis that holds the three channels (1 for an NCHW / NCDHW batch)
):
    """Returns the label map (int64, channel axis removed): 0 where all three channels are < 0, else 1 + argmax.

    Exact inverse of `encode_seg` after the archive's `v / vmax * 2 - 1` mapping; for generated images it picks the
    most confident tumour class wherever any class is more on than off (torch_utils.label_channels, threshold 0).
    """
    if not hasattr(channels, 'detach'):
        channels = np.asarray(channels)
    if channels.shape[axis] != len(SEG_CHANNELS):
        raise ValueError(f'decode_seg: expected {len(SEG_CHANNELS)} channels on axis {axis}, got shape '
                         f'{tuple(channels.shape)}')
    return label_channels.onehot_to_labelmap(channels, threshold=0, axis=axis)


def onehot_to_labelmap(
    channels,               # the three one-hot seg channels as stored (0 / vmax), axis 0
):
    """Label map (uint8, values 0-3) of stored one-hot channels: 1 + the channel that is set, 0 where none is."""
    channels = np.asarray(channels)
    if channels.shape[0] != len(SEG_CHANNELS):
        raise ValueError(f'onehot_to_labelmap: expected {len(SEG_CHANNELS)} channels, got shape {channels.shape}')
    # "Set" is any value > 0; `>= the dtype's smallest positive value` is that comparison for integers and floats.
    dtype = channels.dtype
    above_zero = 1 if np.issubdtype(dtype, np.integer) or dtype == bool else np.finfo(dtype).smallest_subnormal
    return label_channels.onehot_to_labelmap(channels, threshold=above_zero).astype(np.uint8)
