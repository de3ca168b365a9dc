"""The painting baselines (mri/painting/baselines.py): the ring fill and the L1 U-Net inpainter keep every voxel
outside the mask exactly, the ring fill paints the ring's mean, the U-Net learns (its L1 falls) and survives a
save/load; 2D and 3D, tiny tensors."""

import pytest
import torch

pytest.importorskip('monai')

from mri.painting import baselines  # noqa: E402  (after the skip)

PAINT = ['t1n', 't1c', 't2w', 't2f']
SEG = ['seg_netc', 'seg_snfh', 'seg_et']


def _ball(shape, centre, radius):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing='ij')
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


def _brain_scene(shape, n=2, seed=0):
    """Context [n, 4, *shape]: a brain (ball) on -1 background whose modalities are smooth ramps, and a blob mask."""
    gen = torch.Generator().manual_seed(seed)
    s = shape[0]
    brain = _ball(shape, [s / 2 - 0.5] * len(shape), s * 0.45)
    ramp = torch.linspace(-0.6, 0.6, s).reshape([s] + [1] * (len(shape) - 1)).expand(shape)
    images = torch.stack([torch.stack([ramp * (m + 1) / 4 + 0.05 * torch.randn(shape, generator=gen)
                                       for m in range(4)]) for _ in range(n)]).clamp(-1, 1)
    images = torch.where(brain, images, torch.full_like(images, -1.0))
    mask = torch.stack([_ball(shape, [s / 2 + i] * len(shape), s * 0.15) for i in range(n)])[:, None]
    return images, mask, brain.expand(n, 1, *shape)


@pytest.mark.parametrize('shape', [(16, 16), (12, 12, 12)], ids=['2d', '3d'])
def test_ring_fill_outside_exact_and_ring_mean(shape):
    context, mask, brain = _brain_scene(shape)
    context_in = context.clone()
    context_in[mask.expand_as(context)] = 123.0     # Values inside the mask must be ignored, whatever they are.
    out = baselines.RingFill(width=2).fill(context_in, mask.float())
    outside = ~mask.expand_as(context)
    assert torch.equal(out[outside], context_in[outside])
    ring = baselines.dilate(mask, 2) & ~mask & brain
    for n in range(context.shape[0]):
        for m in range(context.shape[1]):
            expect = context[n, m][ring[n, 0]].mean()
            got = out[n, m][mask[n, 0]]
            assert torch.allclose(got, expect.expand_as(got), atol=1e-6)


def test_ring_fill_stays_inside_the_brain_and_falls_back():
    # A mask at the brain's edge: background voxels (-1) in the ring must not pull the mean down.
    shape = (16, 16)
    context, _, brain = _brain_scene(shape, n=1)
    context = torch.where(brain, torch.full_like(context, 0.5), context)
    edge = _ball(shape, [8, 1], 3)[None, None]
    out = baselines.RingFill(width=3).fill(context, edge)
    assert torch.allclose(out[0, :, edge[0, 0]], torch.tensor(0.5))
    # A mask covering the whole brain: background fill (-1), and no NaN.
    everything = torch.ones(1, 1, *shape, dtype=torch.bool)
    out = baselines.RingFill(width=3).fill(context, everything)
    assert torch.all(out == -1)
    # An explicit brain mask wins over the guess from the context.
    out = baselines.RingFill(width=3).fill(context, edge, brain=torch.zeros_like(edge))
    assert torch.all(out[0, :, edge[0, 0]] == -1)


def test_ring_fill_bad_shapes():
    with pytest.raises(baselines.BaselineError, match='mask must be'):
        baselines.RingFill().fill(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
    with pytest.raises(baselines.BaselineError, match='width'):
        baselines.RingFill(width=0)


def _tiny_unet(dims, **kw):
    torch.manual_seed(0)
    return baselines.UNetInpainter(dims, PAINT, SEG, features=4, levels=2, **kw)


def _sampler(labels, brain):
    """Stand-in for RepaintMasks: a fixed blob per patch, all-zero labels (healthy fill)."""
    shape = labels.shape[2:]
    mask = _ball(shape, [s / 2 for s in shape], shape[0] * 0.2)[None, None].expand(labels.shape[0], 1, *shape)
    return mask.float(), torch.zeros_like(labels)


@pytest.mark.parametrize('shape', [(16, 16), (8, 8, 8)], ids=['2d', '3d'])
def test_unet_trains_saves_loads_and_keeps_outside(shape, tmp_path):
    images, _, brain = _brain_scene(shape, n=4)
    labels = torch.zeros(4, 3, *shape)
    model = _tiny_unet(len(shape))
    record = baselines.train_inpainter(model, images, brain, labels, _sampler, steps=25, batch=4, lr=3e-3,
                                       flips=False, report=5)
    assert record.steps == 25 and record.cpu_seconds > 0
    assert record.last_loss < 0.7 * record.first_loss, record.losses

    path = str(tmp_path / 'unet.pt')
    baselines.save_inpainter(path, model, record)
    data = torch.load(path, map_location='cpu', weights_only=True)
    assert data['format'] == baselines.INPAINTER_FORMAT and 'losses' not in data['training']
    loaded = baselines.load_inpainter(path)
    assert loaded.paint_channels == PAINT and loaded.label_channels == SEG
    assert loaded.training_record.steps == 25

    mask, lab = _sampler(labels, brain)
    context = images.clone()
    context[(mask > 0).expand_as(context)] = 7.0    # ignored inside
    out_a, out_b = model.fill(context, mask, lab), loaded.fill(context, mask, lab)
    assert torch.equal(out_a, out_b)
    outside = (mask == 0).expand_as(context)
    assert torch.equal(out_a[outside], context[outside])
    assert out_a[~outside].abs().max() <= 1


def test_unet_labels_change_the_painting_and_budget_stops():
    shape = (8, 8)
    images, mask, brain = _brain_scene(shape, n=2)
    model = _tiny_unet(2)
    lab = torch.zeros(2, 3, *shape)
    tumour = lab.clone()
    tumour[:, 2][mask[:, 0]] = 1
    assert not torch.equal(model.fill(images, mask, lab), model.fill(images, mask, tumour))
    # Without labels it reads [context, mask] only, and a label map given to it is ignored.
    plain = _tiny_unet(2, use_labels=False)
    assert plain.label_channels == [] and torch.equal(plain.fill(images, mask, lab), plain.fill(images, mask, tumour))
    # A CPU-time budget stops training (at least one step is taken).
    record = baselines.train_inpainter(model, images, brain, lab, _sampler, cpu_seconds=1e-9, batch=2)
    assert record.steps == 1


def test_inpainter_bad_input(tmp_path):
    model = _tiny_unet(2)
    with pytest.raises(baselines.BaselineError, match='multiples of 2'):
        model.fill(torch.zeros(1, 4, 7, 8), torch.zeros(1, 1, 7, 8))
    with pytest.raises(baselines.BaselineError, match='paints 4 channels in 2D'):
        model.fill(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a torch file')
    with pytest.raises(baselines.BaselineError, match='not a readable inpainter'):
        baselines.load_inpainter(str(bad))
    torch.save({'format': 'something else'}, str(bad))
    with pytest.raises(baselines.BaselineError, match='not an inpainter file'):
        baselines.load_inpainter(str(bad))
    with pytest.raises(baselines.BaselineError, match='no such'):
        baselines.load_inpainter(str(tmp_path / 'missing.pt'))


def _patch_archive(path, shape=(8, 8), n=4):
    """A tiny patch archive in the layout of paint_spec.md: stored [t1n, t2w, brain, labelmap] uint16."""
    import io
    import json
    import zipfile
    import numpy as np
    rnd = np.random.RandomState(0)
    meta = dict(kind='patches', channels=['t1n', 't2w', 'brain', 'seg_netc', 'seg_snfh', 'seg_et'],
                seg_storage='labelmap', patch_size=list(shape), spacing=[1.0] * len(shape), patches={},
                cases={'BraTS-TST-00000-000': 'train'}, file_cases={},
                labels=[], label_names=['gli', 'ssa'], label_groups=[dict(name='cohort', values=['gli', 'ssa'])])
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(n):
            labelmap = np.zeros(shape, np.uint16)
            if i % 2 == 0:
                labelmap[2:5, 2:5] = 2
                labelmap[3, 3] = 3
            brain = np.ones(shape, np.uint16) * 65535
            brain[0] = 0
            mods = [rnd.randint(0, 65536, shape), rnd.randint(0, 65536, shape)]
            arr = np.stack(mods + [brain, labelmap]).astype(np.uint16)
            buf = io.BytesIO()
            np.save(buf, arr)
            name = f'BraTS-TST-00000-000/p{i:03d}.npy'
            z.writestr(name, buf.getvalue())
            meta['patches'][name] = dict(case='BraTS-TST-00000-000', centre=[4, 4, 4],
                                         type='tumour' if i % 2 == 0 else 'healthy')
            meta['file_cases'][name] = 'BraTS-TST-00000-000'
            meta['labels'].append([name, [1.0, 0.0]])
        z.writestr('dataset.json', json.dumps(meta))
    return str(path)


def test_patch_tensors_split_channels(tmp_path):
    data = baselines.patch_tensors(_patch_archive(tmp_path / 'p.zip'))
    assert data.paint_channels == ['t1n', 't2w'] and data.label_channels == ['seg_netc', 'seg_snfh', 'seg_et']
    assert list(data.images.shape) == [4, 2, 8, 8] and data.images.min() >= -1 and data.images.max() <= 1
    assert data.brain.dtype == torch.bool and not data.brain[:, :, 0].any() and data.brain[:, :, 1:].all()
    assert data.types == ['tumour', 'healthy', 'tumour', 'healthy']
    assert data.labels.dtype == torch.bool
    assert data.labels[0, 1].sum() == 8 and data.labels[0, 2].sum() == 1 and data.labels[1].sum() == 0
    assert data.c.tolist() == [[1.0, 0.0]] * 4
    # Not a patch archive: one clear line.
    import zipfile
    with zipfile.ZipFile(tmp_path / 'slices.zip', 'w') as z:
        import io
        import numpy as np
        buf = io.BytesIO()
        np.save(buf, np.zeros((1, 8, 8), np.uint16))
        z.writestr('a.npy', buf.getvalue())
    with pytest.raises(baselines.BaselineError, match='not a patch archive'):
        baselines.patch_tensors(str(tmp_path / 'slices.zip'))


def test_unet_on_a_patch_archive_with_the_gans_repaint_masks(tmp_path):
    """The path the benchmark takes: archive -> tensors -> the GAN's RepaintMasks -> a few steps; then the baseline
    behind the generator's call (what the paint metrics score) keeps the outside exact."""
    from mri.painting.masks import RepaintMasks
    data = baselines.patch_tensors(_patch_archive(tmp_path / 'p.zip', shape=(8, 8), n=4))
    torch.manual_seed(0)
    model = baselines.UNetInpainter(2, data.paint_channels, data.label_channels, features=4, levels=2)
    record = baselines.train_inpainter(model, data.images, data.brain, data.labels, RepaintMasks(dilation=1), steps=3,
                                       batch=4)
    assert record.steps == 3 and all(v == v for v in record.losses)
    for painter in (model, baselines.RingFill(width=1)):
        G = baselines.AsGenerator(painter, data.paint_channels, data.label_channels, [8, 8])
        mask, labels = RepaintMasks(dilation=1)(data.labels, data.brain, generator=torch.Generator().manual_seed(0))
        out = G(torch.zeros(4, G.z_dim), torch.zeros(4, G.c_dim), context=data.images, mask=mask, labels=labels,
                noise_mode='const')
        outside = (mask == 0).expand_as(out)
        assert torch.equal(out[outside], data.images[outside])


def test_bench_budget_stops_a_process_after_its_marker(tmp_path):
    """bench/bench_painting.py gives ours a CPU budget counted from train.py's 'Training for' line, then SIGTERM."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location('bench_painting', os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench', 'bench_painting.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = ('import signal, sys, time\n'
            'signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n'
            'time.sleep(1.0)\n'                         # setup: not counted
            'print("Training for 1 kimg...", flush=True)\n'
            'while True: pass\n')
    with open(tmp_path / 'log.txt', 'w') as log:
        wall, cpu = bench.run_phase('spin', ['-c', code], log, budget=1.0, marker='Training for')
    assert 1.0 <= cpu < 4.0 and wall < 60.0, (wall, cpu)  # wall: a shared machine stretches it
    table = bench.format_table({'2d': dict(skipped='real cases absent')})
    assert 'skipped: real cases absent' in table.splitlines()[-1]
