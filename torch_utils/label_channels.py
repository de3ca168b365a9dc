"""The label-channel convention of dataset archives, for every room that reads channels.

A channel whose name starts with ``seg_`` holds one class of a label map as a one-hot image (the tumour labels of
mri/seg.py: ``seg_netc``, ``seg_snfh``, ``seg_et``). The engine treats such channels as labels, not intensities:
ADA moves them with the geometry only and by nearest-neighbour sampling, grids draw them as a coloured overlay,
and image metrics leave them out. Kept here, below training/ and metrics/, so that neither needs mri/.
"""

LABEL_PREFIX = 'seg_'


def is_label_channel(name) -> bool:
    """True for a label channel (``seg_*``)."""
    return str(name).startswith(LABEL_PREFIX)


def label_channel_indices(names) -> list:
    """Indices of the label channels in a list of channel names (empty for None)."""
    return [i for i, name in enumerate(names or []) if is_label_channel(name)]
