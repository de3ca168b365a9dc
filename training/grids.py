"""Image grids for people to look at: reals, fakes per tick, a band per class for conditional runs; 2D images and
volumes alike.

A grid cell is one sample. An image [C,H,W] shows its channels: 1 channel is grey, 3 (red, green, blue) are RGB,
other counts show each image channel side by side in grey. A volume [C,D,H,W] shows a three-plane montage
(``montage``): the mid-planes of its three axes side by side, a row per image channel. Label channels (``seg_*``,
torch_utils.label_channels) are not shown as channels of their own: they are decoded to a label map (0 where every
label channel is below the middle of the value range, else 1 + argmax) and drawn as a colour overlay on the first
image channel (LABEL_COLOURS: label 1 red, 2 green, 3 yellow; the BraTS NETC, SNFH, ET), in a row of its own in a
montage.

The sheet (``plan_sheet``, drawn by ``draw_sheet``): the samples come in groups, a class each (consecutive grid rows
with the same name are one group; an unconditional grid is one group without a name). Every group is a band of
sub-rows of `cols` cells, filled in the given order (a class with many samples wraps onto several sub-rows, its
name written once, in a left margin beside its first sub-row); bands stack in the given order into `panels`
columns side by side, each panel with its own name margin, a group never split across panels. `plan_sheet` tries
every `cols` and number of panels and keeps, of the sheets whose width:height is within ASPECT_SLACK (about 20 %,
in log terms) of the one nearest 16:9 (SHEET_ASPECT), the one with the fewest empty places at the ends of the bands
(8 samples as rows of 4 and 4 rather than 5 and 3), then the fewest panels, then the nearest. Cells are GAP pixels
apart, bands and panels BAND_GAP (wider, so the classes stand apart); gaps and margins are white, the cells' pixels
are copied unchanged. A group of two or more keeps at least two columns (MIN_COLS), so pairs (target | projection,
a sample and its nearest real) stay side by side.
"""

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

import dnnlib
from torch_utils.label_channels import label_channel_indices, onehot_to_labelmap

LABEL_COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 0], [255, 255, 0]], dtype=np.uint8)  # label 0-3
OVERLAY_ALPHA = 0.5
GAP = 4                                         # pixels between samples
BAND_GAP = 3 * GAP                              # pixels between class bands and between panels
SHEET_ASPECT = 16 / 9                           # the width:height a sheet aims at
MIN_COLS = 2                                    # a group of two or more is never narrower than this
ASPECT_SLACK = 0.2                              # log-aspect within which full rows and fewer panels win
BACKGROUND = 255                                # gaps and margin: white, so that black MRI backgrounds stay apart

# Grid shape: 2D images get up to MAX_COLS samples per row (fewer for large images: MAX_PIXELS), and one row per
# class for up to MAX_CLASSES classes. A volume costs a montage per sample and its whole array in memory: rows of
# VOLUME_COLS samples (2 above VOLUME_SMALL_VOXELS voxels), up to VOLUME_MAX_CLASSES classes.
MAX_COLS = 8
MAX_ROWS = 8
MAX_PIXELS = 1 << 21
MAX_CLASSES = 32
VOLUME_COLS = 4
VOLUME_SMALL_VOXELS = 64 ** 3
VOLUME_ROWS = 2                                 # rows of an unconditional volume grid
VOLUME_MAX_CLASSES = 8


# ---------------------------------------------------------------------------------------------------------------
# Pixels


def to_uint8(images, drange) -> np.ndarray:
    lo, hi = drange
    images = (np.asarray(images, dtype=np.float32) - lo) * (255 / (hi - lo))
    return np.rint(images).clip(0, 255).astype(np.uint8)


def label_map(channels, drange) -> np.ndarray:
    """[K,...] label channels in `drange` -> [...] uint8 labels 0..K: 0 where all K are below the middle of the
    range (-1 / +1 after the usual mapping to [-1, 1]), else 1 + argmax."""
    mid = (drange[0] + drange[1]) / 2
    return onehot_to_labelmap(np.asarray(channels), threshold=mid).astype(np.uint8)


def label_colours(labels) -> np.ndarray:
    """[...] labels -> [..., 3] uint8 RGB: 0 black, 1-3 LABEL_COLOURS; labels above 3 reuse the colours of 1-3."""
    labels = np.asarray(labels)
    n = len(LABEL_COLOURS) - 1
    return LABEL_COLOURS[np.where(labels > 0, (labels.astype(np.int64) - 1) % n + 1, 0)]


def overlay(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[H,W] uint8 grey + [H,W] labels -> [H,W,3] uint8: the label colour blended in where the label is > 0."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    mask = labels > 0
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * label_colours(labels[mask])
    return np.rint(rgb).astype(np.uint8)


def _grey_rgb(grey_u8):
    return np.repeat(grey_u8[..., None], 3, axis=2)


def channel_names(channels, num_channels) -> list:
    """The names of an array's channels: `channels` when it names each of them, else ch0, ch1, ..."""
    if channels is not None and len(channels) == num_channels:
        return [str(name) for name in channels]
    return [f'ch{i}' for i in range(num_channels)]


def split_label_channels(names) -> tuple:
    """``(image channel indices, label channel indices)`` of a list of channel names."""
    labels = label_channel_indices(names)
    return [i for i in range(len(names)) if i not in labels], labels


# ---------------------------------------------------------------------------------------------------------------
# Cells: a 2D image's channels side by side, a volume's three-plane montage


def tile_channels(image_chw: np.ndarray, channels=None, labels=None) -> np.ndarray:
    """[C,H,W] uint8 -> [H,W,3] RGB tile: grey, RGB, or the image channels side by side, with the label map
    `labels` ([H,W], or None) overlaid on the first channel. `channels`: names of the C channels."""
    c = image_chw.shape[0]
    if c == 0:
        return label_colours(labels)
    if c == 3 and labels is None and (channels is None or list(channels) == ['red', 'green', 'blue']):
        return image_chw.transpose(1, 2, 0)
    panels = [_grey_rgb(ch) for ch in image_chw]
    if labels is not None:
        panels[0] = overlay(image_chw[0], labels)
    return np.concatenate(panels, axis=1)


def mid_planes(volume, at=None) -> list:
    """(D, H, W) -> its [axial, coronal, sagittal] mid-planes in display order (the planes through the voxel `at`
    instead of the middle when given: a painted region, say).

    The axes are the archives' voxel order [x, y, z] (RAS: dataset.json "space"); a plane shows rows anterior to
    posterior (axial) or superior to inferior (coronal, sagittal), and the patient's left on the right of the
    picture (radiological convention), as the 2D slices of the archives do.
    """
    x, y, z = (s // 2 for s in volume.shape) if at is None else (int(a) for a in at)
    return [volume[:, ::-1, z].T, volume[:, y, ::-1].T, volume[x, ::-1, ::-1].T]


def tile_cells(rows) -> np.ndarray:
    """Rows of [H, W, 3] uint8 cells (sizes may differ: anisotropic grids) -> one canvas, cells padded black."""
    h = max(c.shape[0] for r in rows for c in r)
    w = max(c.shape[1] for r in rows for c in r)
    canvas = np.zeros([h * len(rows), w * max(len(r) for r in rows), 3], np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            canvas[i * h:i * h + cell.shape[0], j * w:j * w + cell.shape[1]] = cell
    return canvas


def montage(
    volume,                 # (C, D, H, W) array
    channels=None,          # names of the C channels; label channels (seg_*) become the overlay row
    drange=(-1, 1),         # [lo, hi] of the values
    overlay_on=None,        # name of the channel under the labels; None = the first image channel
) -> np.ndarray:
    """Three-plane montage [H, W, 3] uint8 of one volume: a row per image channel (mid_planes, grey), and a row of
    the label map over the `overlay_on` channel when the volume has label channels (the label colours alone when
    it has no image channel)."""
    volume = np.asarray(volume)
    names = channel_names(channels, volume.shape[0])
    image_idx, label_idx = split_label_channels(names)
    grey = {i: [to_uint8(p, drange) for p in mid_planes(volume[i])] for i in image_idx}
    rows = [[_grey_rgb(p) for p in grey[i]] for i in image_idx]
    if label_idx:
        planes = zip(*[mid_planes(volume[i]) for i in label_idx])
        labels = [label_map(np.stack(p), drange) for p in planes]
        if image_idx:
            base = names.index(overlay_on) if overlay_on in names and names.index(overlay_on) in grey else image_idx[0]
            rows.append([overlay(g, l) for g, l in zip(grey[base], labels)])
        else:
            rows.append([label_colours(l) for l in labels])
    return tile_cells(rows)


def _cells(images, drange, channels):
    """The grid cells [H, W, 3] uint8 of a batch of images [N,C,H,W] or volumes [N,C,D,H,W]."""
    names = [str(n) for n in channels] if channels is not None and len(channels) == images.shape[1] else None
    if images.ndim == 5:
        return [montage(v, names, drange) for v in images]
    keep, label_idx = split_label_channels(names) if names else (list(range(images.shape[1])), [])
    shown = to_uint8(images[:, keep], drange)
    kept_names = [names[i] for i in keep] if names else None
    return [tile_channels(img, kept_names, label_map(images[k, label_idx], drange) if label_idx else None)
            for k, img in enumerate(shown)]


# ---------------------------------------------------------------------------------------------------------------
# Grids


def save_png(rgb, path: str) -> str:
    """Writes [H, W, 3] uint8 as an RGB PNG, atomically; returns the path."""
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        PIL.Image.fromarray(rgb, 'RGB').save(tmp)
    return path


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


def row_groups(row_labels, grid_size) -> list:
    """``[(name, count)]`` of a (gw, gh) grid, row-major: consecutive rows with the same name make one group (a class
    that fills several rows), an unconditional grid (no row_labels) is one unnamed group of every sample."""
    gw, gh = grid_size
    if not row_labels:
        return [(None, gw * gh)]
    groups = []
    for name in row_labels:
        if groups and groups[-1][0] == name:
            groups[-1] = (name, groups[-1][1] + gw)
        else:
            groups.append((name, gw))
    return groups


def _split_bands(heights, panels):
    """Contiguous runs of the band heights into at most `panels` panels, the tallest panel as short as it can be
    (the smallest height limit that greedy filling meets, by bisection); returns lists of band indices."""
    def fill(limit):
        out, used = [[]], 0
        for i, h in enumerate(heights):
            if out[-1] and used + BAND_GAP + h > limit:
                out.append([])
                used = 0
            used += h + (BAND_GAP if out[-1] else 0)
            out[-1].append(i)
        return out
    lo, hi = max(heights), sum(heights) + BAND_GAP * (len(heights) - 1)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(fill(mid)) <= panels else (mid + 1, hi)
    return fill(lo)


def plan_sheet(
    counts,                 # samples per group, in order (a class each; one group for an unconditional grid)
    cell,                   # (height, width) of a cell in pixels
    margin=0,               # width of a panel's name margin (0 without names)
    aspect=SHEET_ASPECT,    # the width:height aimed at
) -> dnnlib.EasyDict:
    """Where every cell and name of a sheet goes (module docstring), without pixels: ``EasyDict(width, height, cols,
    panels, cells=[(top, left)] per sample in order, names=[(left, top, height)] per group: the box beside its first
    sub-row)``."""
    counts = [int(n) for n in counts]
    if not counts or min(counts) < 1:
        raise ValueError(f'plan_sheet: every group needs a sample, got counts {counts}')
    th, tw = cell
    options, nearest = [], math.inf
    for cols in range(min(max(counts), MIN_COLS), max(counts) + 1):
        heights = [-(-n // cols) * (th + GAP) - GAP for n in counts]
        empty = sum(-(-n // cols) * cols - n for n in counts)
        for panels in range(1, len(counts) + 1):
            split = _split_bands(heights, panels)
            if len(split) < panels:  # more panels would not shorten the tallest one
                break
            widths = [margin + c * (tw + GAP) - GAP for c in (min(cols, max(counts[i] for i in p)) for p in split)]
            width = 2 * GAP + sum(widths) + BAND_GAP * (len(split) - 1)
            height = 2 * GAP + max(sum(heights[i] for i in p) + BAND_GAP * (len(p) - 1) for p in split)
            wide = math.log(width / height / aspect)
            nearest = min(nearest, abs(wide))
            options.append((empty, len(split), abs(wide), cols, split, widths, width, height))
            if wide > nearest + ASPECT_SLACK:  # more panels only widen it
                break
        if panels == 1 and wide > nearest + ASPECT_SLACK:  # one panel too wide already: more columns only widen it
            break
    # Near-ties in aspect go to full rows, then to fewer panels: the classes read more easily.
    *_, cols, split, widths, width, height = min(o for o in options if o[2] <= nearest + ASPECT_SLACK)
    return _place(counts, cell, margin, cols, split, widths, width, height)


def _place(counts, cell, margin, cols, split, widths, width, height):
    """The pixel positions of plan_sheet's chosen columns and panels."""
    th, tw = cell
    starts = np.cumsum([0] + counts)
    cells, names = [None] * int(starts[-1]), [None] * len(counts)
    left = GAP
    for panel, panel_width in zip(split, widths):
        top = GAP
        for g in panel:
            names[g] = (left, top, th)
            for k in range(counts[g]):
                row, col = divmod(k, cols)
                cells[starts[g] + k] = (top + row * (th + GAP), left + margin + col * (tw + GAP))
            top += -(-counts[g] // cols) * (th + GAP) - GAP + BAND_GAP
        left += panel_width + BAND_GAP
    return dnnlib.EasyDict(width=width, height=height, cols=cols, panels=len(split), cells=cells, names=names)


def name_margin(groups) -> int:
    """The width of a panel's name margin for these groups: the longest name in PIL's default font and a GAP either
    side; 0 when no group has a name."""
    named = [str(name) for name, _ in groups if name is not None]
    if not named:
        return 0
    probe = PIL.ImageDraw.Draw(PIL.Image.new('RGB', (1, 1)))
    return max(int(np.ceil(probe.textlength(t, font=PIL.ImageFont.load_default()))) for t in named) + 2 * GAP


def draw_sheet(
    cells,                  # [H, W, 3] uint8 cells in order (smaller ones sit top-left in the largest one's place)
    groups,                 # [(name or None, count)] in order, counts summing to len(cells) (row_groups)
    aspect=SHEET_ASPECT,
) -> np.ndarray:
    """The cells wrapped into a sheet near `aspect` (plan_sheet), a class's name beside its first sub-row; [H, W, 3]
    uint8."""
    if not cells or sum(n for _, n in groups) != len(cells):
        raise ValueError(f'draw_sheet: the groups count {sum(n for _, n in groups)} cells, got {len(cells)}')
    th, tw = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    plan = plan_sheet([n for _, n in groups], (th, tw), name_margin(groups), aspect)
    canvas = np.full([plan.height, plan.width, 3], BACKGROUND, dtype=np.uint8)
    for cell, (top, left) in zip(cells, plan.cells):
        canvas[top:top + cell.shape[0], left:left + cell.shape[1]] = cell
    image = PIL.Image.fromarray(canvas, 'RGB')
    draw, font = PIL.ImageDraw.Draw(image), PIL.ImageFont.load_default()
    for (name, _), (left, top, h) in zip(groups, plan.names):
        if name is not None:
            draw.text((left + GAP, top + h // 2), str(name), fill=(0, 0, 0), font=font, anchor='lm')
    return np.asarray(image)


def annotate(
    image,                  # [H, W, 3] uint8 sheet of `len(row_labels)` equal rows (e.g. a montage)
    row_labels=(),          # a name per row, written in a left margin
    title=None,             # a line above the sheet (e.g. the sample and its class)
) -> np.ndarray:
    """The sheet with a white left margin naming its rows and a title line above it (PIL's default font)."""
    font = PIL.ImageFont.load_default()
    probe = PIL.ImageDraw.Draw(PIL.Image.new('RGB', (1, 1)))
    margin = max([int(np.ceil(probe.textlength(str(t), font=font))) + 2 * GAP for t in row_labels] or [0])
    top = 12 + 2 * GAP if title else 0
    width = max(margin + image.shape[1], int(np.ceil(probe.textlength(str(title), font=font))) + 2 * GAP if title else 0)
    canvas = np.full([top + image.shape[0], width, 3], BACKGROUND, dtype=np.uint8)
    canvas[top:, margin:margin + image.shape[1]] = image
    out = PIL.Image.fromarray(canvas, 'RGB')
    draw = PIL.ImageDraw.Draw(out)
    if title:
        draw.text((GAP, top // 2), str(title), fill=(0, 0, 0), font=font, anchor='lm')
    row_h = image.shape[0] / max(len(row_labels), 1)
    for y, text in enumerate(row_labels):
        draw.text((GAP, top + int((y + 0.5) * row_h)), str(text), fill=(0, 0, 0), font=font, anchor='lm')
    return np.asarray(out)


def save_image_grid(
    images,                 # [N,C,H,W] images or [N,C,D,H,W] volumes (N = gw * gh, row-major), values in drange
    path: str,              # output .png, written atomically
    drange,                 # [lo, hi] of the values
    grid_size,              # (gw, gh): gh rows of gw samples (a class per row when conditional)
    channels=None,          # names of the C channels (dataset.json "channels"); label channels become an overlay
    row_labels=None,        # gh names (rows with the same name in a row are one class), or None
) -> None:
    """Saves the samples as one RGB PNG sheet near 16:9 (module docstring: draw_sheet): a band per class, named at
    its left, gaps between the cells; a volume's cell is its three-plane montage."""
    images = np.asarray(images)
    gw, gh = grid_size
    if images.ndim not in (4, 5) or images.shape[0] != gw * gh:
        raise ValueError(f'save_image_grid: expected {gw * gh} images [N, C, H, W] or volumes [N, C, D, H, W] for a '
                         f'{gw}x{gh} grid, got shape {images.shape}')
    if row_labels is not None and len(row_labels) != gh:
        raise ValueError(f'save_image_grid: expected {gh} row labels for a {gw}x{gh} grid, got {len(row_labels)}')
    save_sheet(images, path, drange, row_groups(row_labels, grid_size), channels)


def save_sheet(
    images,                 # [N,C,H,W] images or [N,C,D,H,W] volumes, in order, values in drange
    path: str,              # output .png, written atomically
    drange,                 # [lo, hi] of the values
    groups,                 # [(name or None, count)] in order, counts summing to N (classes of unequal size too)
    channels=None,          # names of the C channels; label channels become an overlay
) -> None:
    """save_image_grid for groups of any size: the samples as one RGB PNG sheet near 16:9 (draw_sheet)."""
    save_png(draw_sheet(_cells(np.asarray(images), drange, channels), groups), path)


def grid_style(training_set, labels, grid_size) -> dict:
    """The keyword arguments of save_image_grid that describe a training set's grid: channel names and, for a
    conditional grid, one name per row (setup_snapshot_image_grid puts one class per row, or a single class in
    every row: one band)."""
    names = training_set.label_names if training_set.has_labels else None
    return dict(channels=training_set.channels, row_labels=row_names(names, labels, grid_size))


def _grid_shape(training_set):
    """``(columns, rows of an unconditional grid, most rows of a conditional one)`` for a training set."""
    shape = training_set.image_shape
    if len(shape) == 4:  # [C,D,H,W] volumes
        cols = VOLUME_COLS if int(np.prod(shape[1:])) <= VOLUME_SMALL_VOXELS else VOLUME_COLS // 2
        return cols, VOLUME_ROWS, VOLUME_MAX_CLASSES
    cols = int(np.clip(MAX_PIXELS // max(shape[-1] * shape[-2] * MAX_ROWS, 1), 4, MAX_COLS))
    return cols, (MAX_ROWS if len(training_set) >= 8 else 4), MAX_CLASSES


def setup_snapshot_image_grid(training_set, random_seed: int = 0):
    """Pick reals and labels for the grid: one row per distinct label (class) when conditional (a single class
    fills the rows of an unconditional grid).

    Returns ``(grid_size, images [N,C,H,W] or volumes [N,C,D,H,W] uint, labels [N,L] float32)``. Volumes get
    fewer columns and classes than images (_grid_shape); save_image_grid draws them as montages.
    """
    rnd = np.random.RandomState(random_seed)
    cols, rows, max_classes = _grid_shape(training_set)
    n = len(training_set)
    if not training_set.has_labels:
        indices = [rnd.randint(n) for _ in range(cols * rows)]
    else:
        by_label = {}
        for idx in range(n):
            by_label.setdefault(tuple(training_set.get_details(idx).raw_label.flatten()), []).append(idx)
        keys = sorted(by_label.keys(), reverse=True)[:max_classes]
        # One class (e.g. one cohort) fills the rows of an unconditional grid instead of one long strip.
        per_class = rows if len(keys) == 1 else 1
        rows = len(keys) * per_class
        indices = []
        for key in keys:
            pool = by_label[key]
            rnd.shuffle(pool)
            indices += [pool[i % len(pool)] for i in range(cols * per_class)]
    images, labels = zip(*[training_set[i] for i in indices])
    return (cols, rows), np.stack(images), np.stack(labels)
