"""Training grids for volumes: three-plane montages (mid-axial, mid-coronal, mid-sagittal) per sample.

The training loop names its grid functions in the config (``grid_kwargs``), so a ``kind: volumes`` run writes
``reals.png`` and ``fakes*.png`` as montages without training/ knowing about volumes. Layout: one row of samples
per class (the 2D grid's rule, training/grids.py), each sample the montage of mri/volume_output.py (a row per image
channel in the three planes, and the tumour labels over an anatomy channel when the archive has seg channels).
"""

import numpy as np

from mri.volume_output import _tile, montage, save_png
from training.grids import setup_snapshot_image_grid

MAX_CLASSES = 8             # Rows of a volume grid (a class each).
MAX_VOXELS_4_COLS = 64 ** 3  # Up to this size a row shows 4 samples; larger volumes show 2 (memory of the grid).


def setup_volume_grid(training_set, random_seed: int = 0):
    """``(grid_size, volumes [N, C, D, H, W] uint, labels [N, L])``: a row per class, 2-4 samples per row."""
    cols = 4 if int(np.prod(training_set.image_shape[1:])) <= MAX_VOXELS_4_COLS else 2
    return setup_snapshot_image_grid(training_set, random_seed=random_seed, max_cols=cols, max_rows=2,
                                     max_pixels=0, max_classes=MAX_CLASSES, slice_volumes=False)


def save_volume_grid(images, path: str, drange, grid_size, channels=None) -> str:
    """Save volumes [N, C, D, H, W] (N = cols * rows, row-major, values in ``drange``) as one montage PNG, atomically."""
    lo, hi = drange
    volumes = (np.asarray(images, dtype=np.float32) - lo) * (2 / (hi - lo)) - 1
    cols, rows = grid_size
    if volumes.ndim != 5 or volumes.shape[0] != cols * rows:
        raise ValueError(f'mri/grid3d.py: expected {cols * rows} volumes [N, C, D, H, W], got {volumes.shape}')
    cells = [montage(v, channels) for v in volumes]
    return save_png(_tile([cells[r * cols:(r + 1) * cols] for r in range(rows)]), path)
