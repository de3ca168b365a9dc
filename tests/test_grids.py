"""Grid sheets (training.grids.plan_sheet / draw_sheet, issue 21): every grid wraps to near 16:9, a band per class
in the given order, never split across panels, its samples in order, the cells' pixels unchanged, gaps between cells
and wider ones between bands; generate.py's class grids (2D and volumes) are such sheets with the class names."""

import os

import numpy as np
import PIL.Image
import pytest

import generate
from mri.output.images import ImageWriter
from training import grids
from training.grids import BAND_GAP, GAP

WIDE = (1.2, 2.4)  # "near 16:9" (1.78) where the counts allow it


def _aspect(plan):
    return plan.width / plan.height


def _boxes(plan, cell):
    return [(top, left, top + cell[0], left + cell[1]) for top, left in plan.cells]


def _check_plan(plan, counts, cell, margin):
    """Every cell inside the sheet and apart from the others by a gap; each group's cells in reading order in one
    panel (right of its name margin), the groups in the given order (panel by panel, top to bottom)."""
    boxes = _boxes(plan, cell)
    for i, (t, l, b, r) in enumerate(boxes):
        assert GAP <= t and b <= plan.height - GAP and GAP <= l and r <= plan.width - GAP
        for t2, l2, b2, r2 in boxes[i + 1:]:
            assert t2 >= b + GAP or b2 + GAP <= t or l2 >= r + GAP or r2 + GAP <= l  # apart by GAP at least
    starts = np.cumsum([0] + list(counts))
    assert plan.names == sorted(plan.names)  # panels left to right, bands top to bottom: the given order
    for g, (left, top, _) in enumerate(plan.names):
        mine = plan.cells[starts[g]:starts[g + 1]]
        assert mine == sorted(mine) and mine[0] == (top, left + margin)  # reading order, from the first sub-row
        assert all(left + margin <= x < left + margin + plan.cols * (cell[1] + GAP) for _, x in mine)  # one panel
        assert len({y for y, _ in mine}) == -(-counts[g] // plan.cols)  # its sub-rows, no more
    return boxes


@pytest.mark.parametrize('counts, cell, margin', [
    ([100], (64, 64), 40),          # one class, 100 seeds (generate --class all on a one-class net)
    ([4] * 32, (64, 64), 40),       # 32 classes of 4
    ([64], (64, 64), 40),           # a single class filling a training grid
    ([64], (64, 64), 0),            # unconditional
    ([64], (64, 256), 0),           # 4-channel cells, 4x wider than tall
    ([8] * 8, (192, 192), 40),      # volume montages
])
def test_sheets_land_near_16_9(counts, cell, margin):
    plan = grids.plan_sheet(counts, cell, margin)
    assert WIDE[0] <= _aspect(plan) <= WIDE[1], (plan.width, plan.height, plan.cols, plan.panels)
    _check_plan(plan, counts, cell, margin)


def test_many_classes_go_into_panels_and_bands_stand_apart():
    counts, cell, margin = [4] * 32, (64, 64), 40
    plan = grids.plan_sheet(counts, cell, margin)
    assert plan.panels > 1 and plan.cols == 4  # a row per class, the classes in panels side by side
    lefts = sorted({left for left, _, _ in plan.names})
    assert len(lefts) == plan.panels
    panel_width = margin + plan.cols * (cell[1] + GAP) - GAP
    assert all(b - a == panel_width + BAND_GAP for a, b in zip(lefts, lefts[1:]))  # a wider gap between panels
    tops = sorted({top for left, top, _ in plan.names if left == lefts[0]})
    assert all(b - a == cell[0] + BAND_GAP for a, b in zip(tops, tops[1:]))  # and between bands


def test_pairs_stay_side_by_side_and_one_row_per_name():
    plan = grids.plan_sheet([2] * 10, (64, 64), 250)  # privacy pairs, projector's target | projection
    assert plan.cols == 2
    assert grids.plan_sheet([2], (64, 64), 200).cols == 2
    assert grids.row_groups(['gli'] * 3 + ['ssa', 'gli'], (4, 5)) == [('gli', 12), ('ssa', 4), ('gli', 4)]
    assert grids.row_groups(None, (8, 8)) == [(None, 64)]


def test_cells_land_unchanged_with_names_and_gaps(tmp_path):
    rnd = np.random.RandomState(0)
    cells = [rnd.randint(0, 256, (12, 10, 3)).astype(np.uint8) for _ in range(23)]
    groups = [('first', 15), ('second', 1), ('third', 7)]
    sheet = grids.draw_sheet(cells, groups)
    margin = grids.name_margin(groups)
    plan = grids.plan_sheet([15, 1, 7], (12, 10), margin)
    assert sheet.shape == (plan.height, plan.width, 3)
    mask = np.zeros(sheet.shape[:2], bool)
    for cell, (top, left) in zip(cells, plan.cells):
        assert np.array_equal(sheet[top:top + 12, left:left + 10], cell)
        mask[top:top + 12, left:left + 10] = True
    for left, top, h in plan.names:  # each name once, in its margin beside the first sub-row
        assert (sheet[top:top + h, left:left + margin] < 100).all(axis=2).any()
        mask[top:top + h, left:left + margin] = True
    assert (sheet[~mask] == grids.BACKGROUND).all()  # everything else is white gap
    with pytest.raises(ValueError, match='draw_sheet: the groups count 24 cells, got 23'):
        grids.draw_sheet(cells, groups + [('x', 1)])


def test_unconditional_grid_wraps_without_a_margin(tmp_path):
    images = np.random.RandomState(1).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)
    path = str(tmp_path / 'fakes.png')
    grids.save_image_grid(images, path, drange=[-1, 1], grid_size=(8, 8))
    sheet = np.array(PIL.Image.open(path))
    plan = grids.plan_sheet([64], (8, 8))
    assert sheet.shape == (plan.height, plan.width, 3) and plan.cells[0] == (GAP, GAP)
    assert WIDE[0] <= _aspect(plan) <= WIDE[1]
    assert np.array_equal(sheet[GAP:GAP + 8, GAP:GAP + 8, 0], grids.to_uint8(images[0, 0], [-1, 1]))


def test_generate_class_all_makes_a_wide_class_grid(tmp_path, capsys):
    from tests.test_outputs import _tiny_snapshot
    net = str(tmp_path / 'net.pt')
    _tiny_snapshot(net)
    generate.generate_images(net, list(range(40)), str(tmp_path / 'out'), 'all', device='cpu', verbose=True)
    assert 'Classes of' in capsys.readouterr().out
    sheet = np.array(PIL.Image.open(tmp_path / 'out' / 'class_grid.png'))
    assert 1.4 <= sheet.shape[1] / sheet.shape[0] <= 2.2, sheet.shape  # once an 80:1 strip of 2 rows of 40
    groups = [('axial', 40), ('sagittal', 40)]
    plan = grids.plan_sheet([40, 40], (8, 8), grids.name_margin(groups))
    assert sheet.shape == (plan.height, plan.width, 3)
    one = np.array(PIL.Image.open(tmp_path / 'out' / 'seed0007-sagittal.png'))  # sample 47: sagittal, seed 7
    top, left = plan.cells[47]
    assert np.array_equal(sheet[top:top + 8, left:left + 8, 0], one)


def test_volume_class_grid_names_its_classes_and_keeps_few_cells(tmp_path):
    from mri.output.volumes import CLASS_GRID_CELLS, VolumeWriter, montage
    names = ['t1n', 'seg_et']
    desc = dict(channels=names, image_shape=[2, 6, 6, 6])
    writer = VolumeWriter(desc, str(tmp_path), fmt='npy', verbose=False)
    rnd = np.random.RandomState(2)
    vols = rnd.uniform(-1, 1, (2 * (CLASS_GRID_CELLS + 2), 2, 6, 6, 6)).astype(np.float32)
    writer.start(vols[0])
    classes = [('gli', None, ['gli']), ('ssa', None, ['ssa'])]
    for i, vol in enumerate(vols):
        name = classes[i // (CLASS_GRID_CELLS + 2)][0]
        writer.write(vol, str(tmp_path / f'seed{i:04d}-{name}'), name, [name])
    assert [len(c) for c in writer.cells.values()] == [CLASS_GRID_CELLS] * 2  # flat memory: the first seeds only
    (path,) = writer.finish(classes)
    sheet = np.array(PIL.Image.open(path))
    cell = montage(vols[CLASS_GRID_CELLS + 2], names)  # ssa's first seed
    groups = [('gli', CLASS_GRID_CELLS), ('ssa', CLASS_GRID_CELLS)]
    margin = grids.name_margin(groups)
    plan = grids.plan_sheet([CLASS_GRID_CELLS] * 2, cell.shape[:2], margin)
    assert sheet.shape == (plan.height, plan.width, 3) and WIDE[0] <= _aspect(plan) <= WIDE[1]
    top, left = plan.cells[CLASS_GRID_CELLS]
    assert np.array_equal(sheet[top:top + cell.shape[0], left:left + cell.shape[1]], cell)
    left, top, h = plan.names[1]
    assert (sheet[top:top + h, left:left + margin] < 100).all(axis=2).any()  # the class name, as in 2D


def test_class_grid_of_classes_the_privacy_gate_thinned(tmp_path):
    """Dropped samples leave classes of unequal size (once a ValueError): each keeps the band of what was written."""
    writer = ImageWriter(str(tmp_path), ['t2w'], verbose=False, class_grid=True)
    images = np.random.RandomState(3).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    for i, (image, name) in enumerate(zip(images, ['axial', 'axial', 'axial', 'sagittal'])):
        writer.write(image, str(tmp_path / f'seed{i:04d}-{name}'), name, [name])
    (path,) = writer.finish([('axial', None, ['axial']), ('sagittal', None, ['sagittal'])])
    sheet = np.array(PIL.Image.open(path))
    groups = [('axial', 3), ('sagittal', 1)]
    plan = grids.plan_sheet([3, 1], (8, 8), grids.name_margin(groups))
    assert sheet.shape == (plan.height, plan.width, 3)
    top, left = plan.cells[3]
    assert np.array_equal(sheet[top:top + 8, left:left + 8, 0], grids.to_uint8(images[3, 0], [-1, 1]))


def test_image_class_grid_keeps_the_first_cells_of_each_class(tmp_path, monkeypatch):
    """Memory stays flat however many seeds: the class grid keeps the first CLASS_GRID_CELLS images of each class
    (every image is still written)."""
    import mri.output.images as images_out
    monkeypatch.setattr(images_out, 'CLASS_GRID_CELLS', 2)
    writer = ImageWriter(str(tmp_path), ['t2w'], verbose=False, class_grid=True)
    images = np.random.RandomState(4).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    names = ['axial'] * 4 + ['sagittal'] * 2
    for i, (image, name) in enumerate(zip(images, names)):
        writer.write(image, str(tmp_path / f'seed{i:04d}-{name}'), name, [name])
    assert [name for name, _ in writer.samples] == ['axial', 'axial', 'sagittal', 'sagittal']
    assert np.array_equal(writer.samples[1][1], images[1])
    assert len([p for p in os.listdir(tmp_path) if p.startswith('seed')]) == 6
