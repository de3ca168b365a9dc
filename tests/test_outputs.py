"""Legible outputs (issue 11): palette label maps, grids with gaps / seg overlay / row names, generate.py progress."""

import os

import numpy as np
import PIL.Image

import generate
from torch_utils import snapshot
from training.grids import GAP, LABEL_COLOURS, save_image_grid
from training.networks import Generator

CHANNELS = ['t1n', 't1c', 't2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et']


def test_label_map_png_has_a_palette_and_exact_values(tmp_path):
    seg = np.array([[0, 1], [2, 3]], np.uint8)
    img = np.full((7, 2, 2), -1.0, np.float32)
    img[4:][seg[None].repeat(3, 0) == np.arange(1, 4)[:, None, None]] = 1.0  # one-hot channels of `seg`
    written = generate.write_outputs(img, CHANNELS, str(tmp_path / 'seed0000'), 'png')
    png = PIL.Image.open(tmp_path / 'seed0000-seg.png')
    assert str(tmp_path / 'seed0000-seg.png') in written and png.mode == 'P'
    assert np.array_equal(np.array(png), seg)  # the values are the labels
    assert np.array_equal(np.array(png.convert('RGB')), LABEL_COLOURS[seg])  # viewers show the colours


def test_grid_gaps_overlay_and_row_names(tmp_path):
    n, res = 4, 8
    images = np.full((n, 7, res, res), 0.0, np.float32)  # grey anatomy, no tumour ...
    images[:, 4:] = -1.0
    images[1, 5, 2:4, 2:4] = 1.0                           # ... except SNFH (green) in sample 1
    path = str(tmp_path / 'grid.png')
    save_image_grid(images, path, drange=[-1, 1], grid_size=(2, 2), channels=CHANNELS, row_labels=['axial', 'sagittal'])
    grid = np.array(PIL.Image.open(path))
    margin = grid.shape[1] - (2 * 4 * res + 3 * GAP)     # 4 modality panels per sample, not 7 channels inline
    assert grid.shape == (2 * res + 3 * GAP, margin + 2 * 4 * res + 3 * GAP, 3) and margin > 20
    assert (grid[:GAP] == 255).all() and (grid[:, margin:margin + GAP] == 255).all()  # gaps between samples
    assert (grid[:, :margin] < 128).any(axis=2).any()                               # the row names
    top, left = GAP, margin + 2 * GAP + 4 * res                                     # sample 1: row 0, column 1
    tile = grid[top:top + res, left:left + res].astype(int)
    assert tile[2, 2, 1] > tile[2, 2, 0] + 50 and tile[0, 0, 0] == tile[0, 0, 1]   # green overlay only on the tumour


def _tiny_snapshot(path):
    G = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=8, img_channels=1, mapping_kwargs=dict(num_layers=1),
                  channel_base=64, channel_max=8)
    snapshot.save_snapshot(path, {'G_ema': G}, dataset=dict(label_names=['axial', 'sagittal'], channels=['t2w'],
                                                           label_groups=[dict(name='plane', values=['axial', 'sagittal'])]))


def test_generate_shows_per_image_progress(tmp_path, capsys):
    net = str(tmp_path / 'net.pt')
    _tiny_snapshot(net)
    written = generate.generate_images(net, [0, 1, 2], str(tmp_path / 'out'), 'all', device='cpu')
    err = capsys.readouterr().err
    assert '6/6 images' in err and 'images/s' in err and 'elapsed' in err
    assert len(written) == 7 and os.path.isfile(tmp_path / 'out' / 'class_grid.png')
