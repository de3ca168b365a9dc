"""Image grids for people to look at: reals, fakes per tick, one row per class for conditional runs.

Any channel count: 1 channel is grey, 3 are RGB, other counts show each channel side by side in grey.
"""

import numpy as np
import PIL.Image

import dnnlib


def to_uint8(images: np.ndarray, drange) -> np.ndarray:
    lo, hi = drange
    images = (np.asarray(images, dtype=np.float32) - lo) * (255 / (hi - lo))
    return np.rint(images).clip(0, 255).astype(np.uint8)


def tile_channels(image_chw: np.ndarray) -> np.ndarray:
    """[C,H,W] -> [H,W] grey, [H,W,3] RGB, or [H, C*W] grey strip of channels."""
    c = image_chw.shape[0]
    if c == 1:
        return image_chw[0]
    if c == 3:
        return image_chw.transpose(1, 2, 0)
    return np.concatenate(list(image_chw), axis=1)


def save_image_grid(images, path: str, drange, grid_size) -> None:
    """Save ``images`` [N,C,H,W] (N = gw*gh, row-major) as one PNG, atomically."""
    images = to_uint8(images, drange)
    gw, gh = grid_size
    n = images.shape[0]
    assert n == gw * gh, (n, grid_size)
    tiles = [tile_channels(img) for img in images]
    th, tw = tiles[0].shape[:2]
    channels = 3 if tiles[0].ndim == 3 else 1
    canvas = np.zeros([gh * th, gw * tw] + ([3] if channels == 3 else []), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        y, x = divmod(i, gw)
        canvas[y * th:(y + 1) * th, x * tw:(x + 1) * tw] = tile
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        PIL.Image.fromarray(canvas, 'RGB' if channels == 3 else 'L').save(tmp)


def setup_snapshot_image_grid(training_set, random_seed: int = 0, max_cols: int = 8, max_rows: int = 8,
                              max_pixels: int = 1 << 21, max_classes: int = 32, slice_volumes: bool = True):
    """Pick reals and labels for the grid: one row per distinct label (class) when conditional.

    Returns ``(grid_size, images [N,C,H,W] uint, labels [N,L] float32)``. Volumes use their middle slice, or
    stay whole ([N,C,D,H,W]) with ``slice_volumes=False`` (for three-plane montages, mri/grid3d.py).
    """
    rnd = np.random.RandomState(random_seed)
    shape = training_set.image_shape
    res_h, res_w = shape[-2], shape[-1]
    cols = int(np.clip(max_pixels // max(res_w * res_h * max_rows, 1), 4, max_cols))
    n = len(training_set)
    if not training_set.has_labels:
        rows = max_rows if n >= 8 else 4
        indices = [rnd.randint(n) for _ in range(cols * rows)]
    else:
        by_label = {}
        for idx in range(n):
            by_label.setdefault(tuple(training_set.get_details(idx).raw_label.flatten()), []).append(idx)
        keys = sorted(by_label.keys(), reverse=True)[:max_classes]
        rows = len(keys)
        indices = []
        for key in keys:
            pool = by_label[key]
            rnd.shuffle(pool)
            indices += [pool[i % len(pool)] for i in range(cols)]
    images, labels = zip(*[training_set[i] for i in indices])
    images = np.stack(images)
    if images.ndim == 5 and slice_volumes:  # [N,C,D,H,W]: show the middle slice.
        images = images[:, :, images.shape[2] // 2]
    return (cols, rows), images, np.stack(labels)
