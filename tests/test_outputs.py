"""Legible outputs (issue 11): palette label maps, grids with gaps / seg overlay / row names for images and volumes
(their sheet layout: tests/test_grids.py), the label-channel conversions they share, generate.py progress."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
import generate
from mri.output.images import write_outputs
from torch_utils import label_channels, snapshot
from training import grids
from training.grids import GAP, LABEL_COLOURS, save_image_grid
from training.networks import Generator

CHANNELS = ['t1n', 't1c', 't2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et']


def test_label_map_png_has_a_palette_and_exact_values(tmp_path):
    seg = np.array([[0, 1], [2, 3]], np.uint8)
    img = np.full((7, 2, 2), -1.0, np.float32)
    img[4:][seg[None].repeat(3, 0) == np.arange(1, 4)[:, None, None]] = 1.0  # one-hot channels of `seg`
    written = write_outputs(img, CHANNELS, str(tmp_path / 'seed0000'), 'png')
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
    groups = [('axial', 2), ('sagittal', 2)]
    margin = grids.name_margin(groups)
    plan = grids.plan_sheet([2, 2], (res, 4 * res), margin)  # 4 modality panels per sample, not 7 channels inline
    assert grid.shape == (plan.height, plan.width, 3) and margin > 20
    assert (grid[:GAP] == 255).all() and (grid[:, :GAP] == 255).all()                 # white around the samples
    top, left = plan.names[0][:2]
    assert (grid[top:top + res, left:left + margin] < 128).any()                      # the row names
    top, left = plan.cells[1]                                                         # sample 1
    assert (grid[top:top + res, left - GAP:left] == 255).all()                        # a gap before it
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


@pytest.mark.parametrize('num_classes', [1, 3, 5])
def test_label_channels_round_trip_numpy_and_torch(num_classes):
    labels = np.random.RandomState(num_classes).randint(0, num_classes + 1, size=(4, 5, 6))
    onehot = label_channels.labelmap_to_onehot(labels, num_classes, vmax=65535, dtype=np.uint16)
    assert onehot.shape == (num_classes, 4, 5, 6) and onehot.dtype == np.uint16 and set(np.unique(onehot)) <= {0, 65535}
    scaled = onehot.astype(np.float32) / 65535 * 2 - 1                    # as the networks see them
    assert np.array_equal(label_channels.onehot_to_labelmap(scaled), labels)
    assert np.array_equal(label_channels.onehot_to_labelmap(onehot, threshold=32768), labels)
    t = label_channels.labelmap_to_onehot(torch.from_numpy(labels), num_classes)
    assert t.dtype == torch.float32 and np.array_equal(t.numpy(), onehot / 65535)
    batch = torch.from_numpy(scaled)[None]                                 # [N, K, ...]: channels on axis 1
    assert torch.equal(label_channels.onehot_to_labelmap(batch, axis=1)[0], torch.from_numpy(labels))
    assert label_channels.label_channel_indices(['t1n', 'seg_a', 'x', 'seg_b']) == [1, 3]


def test_volume_grid_has_montage_cells_gaps_and_row_names(tmp_path):
    """Volumes [N,C,D,H,W] go through the same save_image_grid: each cell is the three-plane montage (a row per
    image channel, a row of labels over the first one), cells apart by gaps, row names in a margin."""
    d = 6
    vols = np.full((4, 5, d, d, d), -1.0, np.float32)
    vols[:, :2] = 0.0
    vols[3, 3, 2:4, 2:4, 2:4] = 1.0                                          # label 2 in sample 3 (seg_b)
    names = ['t1n', 't2w', 'seg_a', 'seg_b', 'seg_c']
    path = str(tmp_path / 'grid.png')
    save_image_grid(vols, path, drange=[-1, 1], grid_size=(2, 2), channels=names, row_labels=['gli', 'ssa'])
    grid = np.array(PIL.Image.open(path))
    cell_h, cell_w = 3 * d, 3 * d                                           # 2 channels + labels, 3 planes
    margin = grids.name_margin([('gli', 2), ('ssa', 2)])
    plan = grids.plan_sheet([2, 2], (cell_h, cell_w), margin)
    assert grid.shape == (plan.height, plan.width, 3) and margin > 10
    top, left = plan.cells[3]                                               # sample 3
    cell = grid[top:top + cell_h, left:left + cell_w]
    assert np.array_equal(cell, grids.montage(vols[3], names))
    assert cell[2 * d + 2, 2, 1] > cell[2 * d + 2, 2, 0] + 50                # green (label 2) in the label row
    with pytest.raises(ValueError, match='save_image_grid: expected 4 images'):
        save_image_grid(vols[:3], path, drange=[-1, 1], grid_size=(2, 2))


class _VolumeSet:
    """What setup_snapshot_image_grid reads of a training set, for volumes of one shape and one label per item."""

    def __init__(self, shape, labels):
        self.image_shape, self.labels = list(shape), np.asarray(labels, np.float32)
        self.has_labels = self.labels.shape[1] > 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return np.full(self.image_shape, idx, np.uint8), self.labels[idx]

    def get_details(self, idx):
        return dnnlib.EasyDict(raw_label=self.labels[idx])


def test_volume_grid_setup_fewer_columns_a_row_per_class():
    eye = np.eye(10, dtype=np.float32)
    size, vols, labels = grids.setup_snapshot_image_grid(_VolumeSet([2, 8, 8, 8], eye[np.arange(30) % 10]), 0)
    assert size == (4, 8) and vols.shape == (32, 2, 8, 8, 8)                # 4 columns, at most 8 classes
    assert all(len({tuple(v) for v in labels[r * 4:(r + 1) * 4]}) == 1 for r in range(8))  # one class per row
    size, vols, _ = grids.setup_snapshot_image_grid(_VolumeSet([1, 80, 80, 80], np.zeros((3, 0))), 0)
    assert size == (2, 2) and vols.shape == (4, 1, 80, 80, 80)              # large volumes: 2 columns


def test_a_single_class_fills_the_rows_instead_of_one_strip():
    """A conditional archive with one class (one cohort) once gave a grid of one row: a 2639x72 strip."""
    one = np.ones((20, 1), np.float32)
    size, images, labels = grids.setup_snapshot_image_grid(_VolumeSet([5, 16, 16], one), 0)
    assert size[1] == grids.MAX_ROWS and len(images) == size[0] * size[1]
    assert grids.row_names(['gli'], labels, size) == ['gli'] * grids.MAX_ROWS
    two = np.eye(2, dtype=np.float32)[np.arange(20) % 2]
    assert grids.setup_snapshot_image_grid(_VolumeSet([5, 16, 16], two), 0)[0][1] == 2  # A row per class, as before.


def test_volume_montage_of_generation_is_the_grid_montage():
    """mri.output.volumes draws its montage with training.grids.montage, the labels over FLAIR (mri.seg)."""
    from mri.output import volumes as volume_output
    vol = np.random.RandomState(0).uniform(-1, 1, (7, 6, 7, 5)).astype(np.float32)
    names = ['t1n', 't1c', 't2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et']
    picture = volume_output.montage(vol, names)
    assert picture.shape == (5 * 7, 3 * 7, 3)                               # cells padded to the largest plane
    assert np.array_equal(picture, grids.montage(vol, names, overlay_on='t2f'))
    assert not np.array_equal(picture, grids.montage(vol, names))
