"""PNG and .npy output of generated 2D images (generate.py hands them to ImageWriter): a grey PNG per image channel
(8 or 16 bit), the decoded BraTS label map as a palette PNG (pixel values are the labels 0-3, shown in the colours of
training.grids.LABEL_COLOURS), a colour overlay, and an ``.npy`` of the stack; with ``--class all`` a class grid.
Every output is clipped to [-1, 1], the range of the training archive."""

import os

import numpy as np
import PIL.Image

import dnnlib
from torch_utils.label_channels import onehot_to_labelmap
from training.grids import LABEL_COLOURS, overlay, split_label_channels

CLASS_GRID_CELLS = 64      # images per class in a class grid (kept until the end: memory stays flat beyond them)


def label_png(seg: np.ndarray) -> PIL.Image.Image:
    """[H,W] labels 0-3 as a palette ('P') image: the pixel values stay the labels, viewers show the colours."""
    image = PIL.Image.fromarray(seg.astype(np.uint8), 'P')
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(LABEL_COLOURS)] = LABEL_COLOURS  # NETC red, SNFH green, ET yellow
    image.putpalette(palette.ravel().tolist())
    return image


def _write_png(array, path, bit_depth):
    """[H,W] grey or [H,W,3] RGB from [-1,1] floats; written atomically."""
    x = (np.asarray(array, dtype=np.float64) + 1) / 2
    if bit_depth == 16 and x.ndim == 2:
        image = PIL.Image.fromarray(np.rint(x.clip(0, 1) * 65535).astype(np.uint16))
    else:
        image = PIL.Image.fromarray(np.rint(x.clip(0, 1) * 255).astype(np.uint8), 'RGB' if x.ndim == 3 else 'L')
    _save_image(image, path)


def _save_image(image, path):
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        image.save(tmp)


def _save_npy(array, path):
    with dnnlib.atomic_output(path, suffix='.npy') as tmp:
        np.save(tmp, array)


def write_outputs(img_chw: np.ndarray, channels: list, stem: str, fmt: str) -> list:
    """Write one generated image [C,H,W] (clipped to [-1,1]); returns the paths written."""
    from mri.seg import overlay_channel
    written = []
    img_chw = np.clip(img_chw, -1, 1)  # G may overshoot; every format writes the range [-1, 1] the archive had
    if fmt == 'npy':  # any number of channels, one channel included: [C, H, W] float32
        _save_npy(img_chw.astype(np.float32), stem + '.npy')
        return [stem + '.npy']
    bits = 16 if fmt == 'png16' else 8
    names = list(channels) if channels and len(channels) == img_chw.shape[0] else [f'ch{i}' for i in range(img_chw.shape[0])]
    if img_chw.shape[0] == 1:
        _write_png(img_chw[0], stem + '.png', bits)
        return [stem + '.png']
    if names == ['red', 'green', 'blue']:
        _write_png(img_chw.transpose(1, 2, 0), stem + '.png', 8)
        return [stem + '.png']
    image_idx, label_idx = split_label_channels(names)
    for i in image_idx:
        written.append(f'{stem}-{names[i]}.png')
        _write_png(img_chw[i], written[-1], bits)
    if label_idx:
        seg = onehot_to_labelmap(img_chw[label_idx], threshold=0).astype(np.uint8)  # mri.seg.decode_seg's rule
        written.append(f'{stem}-seg.png')
        _save_image(label_png(seg), written[-1])  # BraTS values 0-3, exact, with a palette
        anatomy = overlay_channel(names)
        if anatomy is not None:
            base = np.rint((img_chw[names.index(anatomy)] + 1) * 127.5).clip(0, 255).astype(np.uint8)
            written.append(f'{stem}-overlay.png')
            _save_image(PIL.Image.fromarray(overlay(base, seg), 'RGB'), written[-1])
    written.append(stem + '.npy')
    _save_npy(img_chw.astype(np.float32), written[-1])
    return written


class ImageWriter:
    """Writes each generated image (generate.generate_samples hands them over) as PNG/npy files (write_outputs), and
    with class_spec 'all' class_grid.png: a sheet near 16:9 with a band per class, its seeds in order (wrapped onto
    several rows when there are many), named in a left margin (training.grids.save_sheet); the first
    CLASS_GRID_CELLS images of each class (only those are kept)."""

    unit = 'images'

    def __init__(
        self,
        outdir,             # output folder
        channels,           # channel names (the snapshot's dataset description)
        fmt='png',          # 'png', 'png16' or 'npy'
        verbose=True,
        class_grid=False,   # keep the images for finish()'s class grid (class_spec 'all'); else memory stays flat
    ):
        self.outdir, self.channels, self.fmt, self.verbose = outdir, channels, fmt, verbose
        self.samples = [] if class_grid else None  # the class grid's (class name, image), in the order written
        self.kept = {}                              # class name -> images kept for the class grid

    def start(self, first):
        """Nothing to check on the first image [C,H,W] before anything is written."""

    def write(self, image, stem, class_name, class_values):
        """Writes one image; returns the paths written."""
        if self.samples is not None and self.kept.get(class_name, 0) < CLASS_GRID_CELLS:
            self.kept[class_name] = self.kept.get(class_name, 0) + 1
            self.samples.append((class_name, image))
        return write_outputs(image, self.channels, stem, self.fmt)

    def finish(self, classes):
        """class_grid.png (class_spec 'all'): a band per class of the images written (a class the privacy gate
        thinned keeps fewer cells, one it emptied has no band); returns the paths written."""
        from training.grids import save_sheet
        if not self.samples:
            return []
        groups = []
        for name, _ in self.samples:  # class-major order (plan_items): a class's images are consecutive
            if groups and groups[-1][0] == name:
                groups[-1] = (name, groups[-1][1] + 1)
            else:
                groups.append((name, 1))
        grid = os.path.join(self.outdir, 'class_grid.png')
        save_sheet(np.stack([image for _, image in self.samples]), grid, [-1, 1], groups, self.channels)
        if self.verbose:
            print(f'Classes of {grid} (each named left of its band): ' + ' | '.join(name for name, _ in groups))
        return [grid]
