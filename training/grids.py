"""Image grids for people to look at: reals, fakes per tick, one row per class for conditional runs.

Any channel count: 1 channel is grey, 3 (red, green, blue) are RGB, other counts show each image channel side by
side in grey. The tumour channels (seg_netc, seg_snfh, seg_et) are not shown as channels of their own: they are
decoded to a label map (0 where all three are below the middle of the range, else 1 + argmax) and drawn as a colour
overlay on the first image channel (LABEL_COLOURS: NETC red, SNFH green, ET yellow). Samples are separated by a gap;
with row labels, each row's name is written into a margin on the left (PIL's default font).
"""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

import dnnlib

SEG_NAMES = ('seg_netc', 'seg_snfh', 'seg_et')  # the tumour channels (mri.seg.SEG_CHANNELS; training does not import mri)
LABEL_COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 0], [255, 255, 0]], dtype=np.uint8)  # label 0-3
OVERLAY_ALPHA = 0.5
GAP = 4                                         # pixels between samples
BACKGROUND = 255                                # gaps and margin: white, so that black MRI backgrounds stay apart


def to_uint8(images: np.ndarray, drange) -> np.ndarray:
    lo, hi = drange
    images = (np.asarray(images, dtype=np.float32) - lo) * (255 / (hi - lo))
    return np.rint(images).clip(0, 255).astype(np.uint8)


def label_map(seg: np.ndarray, drange) -> np.ndarray:
    """[3,H,W] tumour channels in `drange` -> [H,W] uint8 labels 0-3: 0 where all three are below the middle of
    the range (-1 / +1 after the usual mapping to [-1, 1]), else 1 + argmax."""
    mid = (drange[0] + drange[1]) / 2
    seg = np.asarray(seg, dtype=np.float32)
    return np.where(seg.max(axis=0) >= mid, seg.argmax(axis=0) + 1, 0).astype(np.uint8)


def overlay(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[H,W] uint8 grey + [H,W] labels 0-3 -> [H,W,3] uint8: the label colour blended in where the label is > 0."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    mask = labels > 0
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * LABEL_COLOURS[labels[mask]]
    return np.rint(rgb).astype(np.uint8)


def tile_channels(image_chw: np.ndarray, channels=None, labels=None) -> np.ndarray:
    """[C,H,W] uint8 -> [H,W,3] RGB tile: grey, RGB, or the image channels side by side, with the label map
    `labels` ([H,W] 0-3, or None) overlaid on the first channel. `channels`: names of the C channels."""
    c = image_chw.shape[0]
    if c == 3 and labels is None and (channels is None or list(channels) == ['red', 'green', 'blue']):
        return image_chw.transpose(1, 2, 0)
    panels = [np.repeat(ch[..., None], 3, axis=2) for ch in image_chw]
    if labels is not None:
        panels[0] = overlay(image_chw[0], labels)
    return np.concatenate(panels, axis=1)


def row_names(label_names, labels: np.ndarray, grid_size) -> list:
    """A name per grid row from its first sample's label vector: the names of the entries that are set, joined
    with ','; None for an unconditional grid."""
    gw, gh = grid_size
    if labels is None or labels.ndim != 2 or labels.shape[1] == 0 or not label_names:
        return None
    names = []
    for row in range(gh):
        vec = labels[row * gw]
        names.append(','.join(label_names[i] for i in np.flatnonzero(vec > 0.5) if i < len(label_names)) or '-')
    return names


def save_image_grid(
    images,                 # [N,C,H,W] (N = gw * gh, row-major), values in drange
    path: str,              # output .png, written atomically
    drange,                 # [lo, hi] of the values
    grid_size,              # (gw, gh)
    channels=None,          # names of the C channels (dataset.json "channels"); tumour channels become an overlay
    row_labels=None,        # gh names written left of the rows, or None
) -> None:
    """Saves the images as one RGB PNG grid with gaps between samples (and a margin with row names)."""
    images = np.asarray(images)
    gw, gh = grid_size
    n = images.shape[0]
    assert n == gw * gh, (n, grid_size)
    names = list(channels) if channels is not None and len(channels) == images.shape[1] else None
    seg_idx = [names.index(s) for s in SEG_NAMES] if names and all(s in names for s in SEG_NAMES) else None
    keep = [i for i in range(images.shape[1]) if not seg_idx or i not in seg_idx]
    shown = to_uint8(images[:, keep], drange)
    kept_names = [names[i] for i in keep] if names else None
    tiles = [tile_channels(img, kept_names, label_map(images[k, seg_idx], drange) if seg_idx else None)
             for k, img in enumerate(shown)]
    th, tw = tiles[0].shape[:2]
    font = PIL.ImageFont.load_default()
    margin = 0
    if row_labels:
        probe = PIL.ImageDraw.Draw(PIL.Image.new('RGB', (1, 1)))
        margin = max(int(np.ceil(probe.textlength(str(t), font=font))) for t in row_labels) + 2 * GAP
    canvas = np.full([gh * th + (gh + 1) * GAP, margin + gw * tw + (gw + 1) * GAP, 3], BACKGROUND, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        y, x = divmod(i, gw)
        top, left = GAP + y * (th + GAP), margin + GAP + x * (tw + GAP)
        canvas[top:top + th, left:left + tw] = tile
    image = PIL.Image.fromarray(canvas, 'RGB')
    if row_labels:
        draw = PIL.ImageDraw.Draw(image)
        for y, text in enumerate(row_labels):
            draw.text((GAP, GAP + y * (th + GAP) + th // 2), str(text), fill=(0, 0, 0), font=font, anchor='lm')
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        image.save(tmp)


def grid_style(training_set, labels, grid_size) -> dict:
    """The keyword arguments of save_image_grid that describe a training set's grid: channel names and, for a
    conditional grid, one name per row (setup_snapshot_image_grid puts one class per row)."""
    names = training_set.label_names if training_set.has_labels else None
    return dict(channels=training_set.channels, row_labels=row_names(names, labels, grid_size))


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
