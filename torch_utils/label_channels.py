"""The label-channel convention of dataset archives, for every room that reads channels.

A channel whose name starts with ``seg_`` holds one class of a label map as a one-hot image. With K such channels,
in the order the archive names them, label k + 1 lives in the k-th label channel and label 0 (background) in none;
mri/seg.py gives the BraTS tumour labels this form (``seg_netc``, ``seg_snfh``, ``seg_et`` = labels 1, 2, 3). The
engine treats such channels as labels, not intensities: ADA moves them with the geometry only and by
nearest-neighbour sampling, grids draw them as a coloured overlay, and image metrics leave them out.

The conversions, for numpy arrays and torch tensors alike, and for any number of classes:

- ``labelmap_to_onehot``: a label map (0..K) -> K channels, ``vmax`` where the voxel has that label, else 0;
- ``onehot_to_labelmap``: K channels (stored, or generated and soft) -> the label map: 0 where every channel is
  below ``threshold``, else 1 + the index of the largest channel. With the threshold at the middle of the value
  range (0 for [-1, 1]) this inverts ``labelmap_to_onehot`` exactly and picks the most confident class of a
  generated image wherever any class is more on than off.

Kept here, below training/ and metrics/, so that neither needs mri/.
"""

import numpy as np

LABEL_PREFIX = 'seg_'


def is_label_channel(name) -> bool:
    """True for a label channel (``seg_*``)."""
    return str(name).startswith(LABEL_PREFIX)


def label_channel_indices(names) -> list:
    """Indices of the label channels in a list of channel names (empty for None)."""
    return [i for i, name in enumerate(names or []) if is_label_channel(name)]


def labelmap_to_onehot(
    labels,                 # integer label map of any shape, values 0..num_classes (numpy array or torch tensor)
    num_classes,            # K: the number of label channels (label 0, the background, has none)
    vmax=1,                 # value where a label is present (255 / 65535 for 8- / 16-bit archives)
    dtype=np.float32,       # numpy output dtype (ignored with `out`); a torch input keeps torch.float32
    out=None,               # numpy only: a (K, *labels.shape) array to fill in place (saves a copy when loading)
):
    """Returns the one-hot channels ``(K, *labels.shape)``: channel k is ``vmax`` where ``labels == k + 1``, else 0."""
    if hasattr(labels, 'detach'):  # torch tensor: stay on its device
        import torch
        return torch.stack([(labels == k + 1).to(torch.float32) * vmax for k in range(num_classes)])
    labels = np.asarray(labels)
    if out is None:
        out = np.empty((num_classes,) + labels.shape, dtype=dtype)
    value = out.dtype.type(vmax)  # a scalar of the output dtype: no int64 / float64 pass over the map
    for k in range(num_classes):
        np.multiply(labels == k + 1, value, out=out[k])
    return out


def onehot_to_labelmap(
    channels,               # the K label channels (numpy array or torch tensor)
    threshold=0,            # a class is on where its channel is >= threshold: the middle of the value range
    axis=0,                 # the axis that holds the K channels (1 for an NCHW / NCDHW batch)
):
    """Returns the label map (int64, the channel axis removed): 0 where all K channels are below ``threshold``,
    else 1 + argmax over the channels. A torch tensor gives a tensor on its device."""
    if hasattr(channels, 'detach'):  # torch tensor: no numpy round trip
        import torch
        best, idx = channels.max(dim=axis)
        return torch.where(best >= threshold, idx + 1, torch.zeros_like(idx))
    channels = np.asarray(channels)
    idx = channels.argmax(axis=axis)
    best = channels.max(axis=axis)
    return np.where(best >= threshold, idx + 1, 0).astype(np.int64)
