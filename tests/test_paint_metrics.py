"""Metrics of tumour-painting generators (metrics/paint.py, metrics/insert_dice.py): the BraTS inpainting scores
against hand-computed values, repeatability, a perfect painter against a ring fill, insert_dice with a tiny
segmenter, and a snapshot of the wrong family in one line. Tiny patch archives in dataset_tool.py's patch format."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from metrics import metric_main
from metrics import metric_utils
from metrics import paint
from tests.helpers import blob_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODS = ['t1n', 't2w']
CHANNELS = MODS + ['brain', 'seg_netc', 'seg_snfh', 'seg_et']


# ----------------------------------------------------------------------------
# A tiny patch archive: a brain ball with smooth texture; tumour patches hold a layered blob (brighter per label).

def _patch(shape, rnd, tumour):
    grids = np.meshgrid(*[np.arange(s) / s for s in shape], indexing='ij')
    centre = [s / 2 - 0.5 for s in shape]
    brain = np.sqrt(sum((g * s - c) ** 2 for g, s, c in zip(grids, shape, centre))) < 0.47 * shape[0]
    labels = blob_labels(shape, [s * rnd.uniform(0.4, 0.6) for s in shape], shape[0] * 0.25) if tumour else np.zeros(shape, np.uint8)
    labels = np.where(brain, labels, 0).astype(np.uint8)
    mods = []
    for m in range(len(MODS)):
        phase = rnd.uniform(0, 2 * np.pi, size=len(shape))
        tissue = 0.45 + 0.15 * np.prod([np.sin(2 * np.pi * (1 + m) * g + p) for g, p in zip(grids, phase)], axis=0)
        tissue = tissue + 0.03 * rnd.randn(*shape) + np.array([0, 0.4, 0.2, 0.3])[labels]
        mods.append(np.where(brain, np.clip(tissue, 0.05, 1), 0))
    stored = np.stack(mods + [brain.astype(np.float64)])
    out = np.rint(stored * 65535).astype(np.uint16)
    return np.concatenate([out, labels[None].astype(np.uint16)])  # the label map as the last stored channel


def make_patch_archive(path, dims=2, side=16, healthy=6, tumour=6, seed=0, cohorts=False):
    rnd = np.random.RandomState(seed)
    shape = (side,) * dims
    meta = dict(kind='patches', channels=CHANNELS, seg_storage='labelmap', patch_size=list(shape), spacing=[1.0] * dims,
                labels=[], label_names=['gli', 'ssa'] if cohorts else [], patches={}, cases={}, file_cases={})
    if cohorts:
        meta['label_groups'] = [dict(name='cohort', values=['gli', 'ssa'])]
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(healthy + tumour):
            kind = 'tumour' if i >= healthy else 'healthy'
            case = f'BraTS-TST-{i % 3:05d}-000'
            name = f'{case}/{kind}-{i:03d}.npy'
            buf = io.BytesIO()
            np.save(buf, _patch(shape, rnd, kind == 'tumour'))
            z.writestr(name, buf.getvalue())
            meta['patches'][name] = dict(case=case, centre=[side] * dims, type=kind)
            meta['cases'][case] = 'train'
            meta['file_cases'][name] = case
            if cohorts:
                meta['labels'].append([name, [1.0, 0.0] if i % 2 else [0.0, 1.0]])
        if not cohorts:
            del meta['labels'], meta['label_names']
        z.writestr('dataset.json', json.dumps(meta))
    return str(path)


def paint_generator(dims=2, side=16, c_dim=0, seed=0):
    """A real, tiny, untrained paint generator."""
    from training.paint import PaintGenerator
    torch.manual_seed(seed)
    return PaintGenerator(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=side, img_channels=len(CHANNELS),
                          channels=CHANNELS, spatial_dims=dims, mapping_kwargs=dict(num_layers=1), channel_base=32,
                          channel_max=8)


class _StandIn(torch.nn.Module):
    """The paint interface with a chosen fill: ``fill(context, mask, labels) -> values inside the mask``."""

    def __init__(self, fill, dims, side):
        super().__init__()
        self.fill = fill
        self.paint_channels, self.label_channels = MODS, CHANNELS[3:]
        self.img_shape, self.z_dim, self.c_dim = [side] * dims, 4, 0

    def forward(self, z, c, context=None, mask=None, labels=None, **_kwargs):
        return torch.where(mask > 0.5, self.fill(context * (1 - mask), mask, labels), context)


def perfect_painter(archive, dims, side, tumour_like=False):
    """Returns the real tissue: finds the archive patch whose context (outside the mask) the input is (``tumour_like``:
    plus the brightness each tumour label has in the archive, i.e. a tumour drawn as the archive draws its own)."""
    from training.dataset import ImageFolderDataset
    ds = ImageFolderDataset(path=archive)
    reals = torch.stack([torch.from_numpy(ds[i][0][:len(MODS)].astype(np.float32)) / 65535 * 2 - 1 for i in range(len(ds))])

    def fill(context, mask, labels):
        out = []
        for x, m in zip(context, mask):
            err = ((reals * (1 - m) - x) ** 2).flatten(1).sum(1)
            out.append(reals[int(err.argmin())])
        out = torch.stack(out)
        if tumour_like:
            out = out + 2 * (torch.tensor([0.4, 0.2, 0.3]).view(1, 3, *[1] * dims) * labels).sum(1, keepdim=True)
        return out
    return _StandIn(fill, dims, side)


def ring_fill(dims, side):
    """The trivial baseline: the mean of a ring of context around the mask, per channel."""
    pool = torch.nn.functional.max_pool3d if dims == 3 else torch.nn.functional.max_pool2d

    def fill(context, mask, _labels):
        ring = (pool(mask, 5, 1, 2) - mask).clamp(0, 1)
        mean = (context * ring).flatten(2).sum(2) / ring.flatten(2).sum(2).clamp(min=1)
        return mean.view(*mean.shape, *[1] * dims).expand_as(context)
    return _StandIn(fill, dims, side)


def _kwargs(archive, **extra):
    return dict(dataset_kwargs=dict(path=archive, use_labels=True), device='cpu', cache=False, batch_size=4, **extra)


@pytest.fixture(scope='module')
def archives(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('paint')
    return {2: make_patch_archive(tmp / 'p2.zip', dims=2), 3: make_patch_archive(tmp / 'p3.zip', dims=3, healthy=3, tumour=3),
            'tmp': tmp}


# ----------------------------------------------------------------------------
# The scores themselves.

def test_ssim_matches_the_gaussian_formula_and_scores_are_masked():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 20, 20)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(paint.ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    # Against a direct evaluation at one interior pixel (window fully inside, no padding involved).
    w = paint._gaussian_window(2, 'cpu')[0, 0]
    px, py = x[0, 0, 5:16, 5:16], y[0, 0, 5:16, 5:16]
    mx, my = (w * px).sum(), (w * py).sum()
    vx, vy = (w * px * px).sum() - mx ** 2, (w * py * py).sum() - my ** 2
    cov = (w * px * py).sum() - mx * my
    rng = max(float(x[0].max() - x[0].min()), float(y[0].max() - y[0].min()))
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    expect = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert float(paint.ssim_map(y, x)[0, 0, 10, 10]) == pytest.approx(float(expect), abs=1e-5)

    # brats_scores: what happens outside the mask never counts; MSE and PSNR by hand on a constant offset.
    real = torch.rand(1, 2, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:10, 5:11] = 1
    noisy_outside = torch.where(mask > 0, real, torch.rand_like(real))
    assert torch.allclose(paint.brats_scores(real, noisy_outside, mask)[..., 0], torch.ones(1, 2), atol=1e-5)
    s = paint.brats_scores(real, real, mask)
    assert torch.allclose(s[..., 2], torch.zeros(1, 2)) and torch.all(s[..., 1] == paint.PSNR_CAP)
    lo, hi = np.percentile(((real[0, 0] + 1) / 2 * (1 - mask[0, 0])).numpy(), [0.5, 99.5])
    shifted = torch.where(mask > 0, real - 0.1, real)  # 0.05 lower in [0, 1]
    inside = ((real[0, 0] + 1) / 2)[mask[0, 0] > 0].numpy().astype(np.float64)
    norm = lambda v: (np.clip(v, max(lo, 0), hi) - max(lo, 0)) / (hi - max(lo, 0))  # noqa: E731
    mse = np.mean((norm(inside - 0.05) - norm(inside)) ** 2)
    got = paint.brats_scores(real, shifted, mask)[0, 0]
    assert float(got[2]) == pytest.approx(mse, rel=1e-4) and float(got[1]) == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    assert paint.brats_scores(real, real, torch.zeros_like(mask)).isnan().all()  # no region: no score


# ----------------------------------------------------------------------------
# paint_ssim / paint_psnr / paint_mse.

@pytest.mark.parametrize('dims', [2, 3])
def test_perfect_painter_scores_best_and_ring_fill_worse(archives, dims):
    archive = archives[dims]
    perfect = metric_main.calc_metrics(['paint_ssim', 'paint_psnr', 'paint_mse'], G=perfect_painter(archive, dims, 16),
                                       **_kwargs(archive))
    res = {k: v for r in perfect for k, v in r.results.items()}
    assert set(res) == {f'paint_{m}{s}' for m in ('ssim', 'psnr', 'mse') for s in ('', '_t1n', '_t2w')}
    assert res['paint_ssim'] == pytest.approx(1, abs=1e-5) and res['paint_mse'] == pytest.approx(0, abs=1e-10)
    assert res['paint_psnr'] == paint.PSNR_CAP
    ring = metric_main.calc_metrics(['paint_ssim', 'paint_psnr', 'paint_mse'], G=ring_fill(dims, 16), **_kwargs(archive))
    worse = {k: v for r in ring for k, v in r.results.items()}
    for mod in ('', '_t1n', '_t2w'):
        assert worse[f'paint_ssim{mod}'] < 0.99 and worse[f'paint_mse{mod}'] > 1e-4
        assert worse[f'paint_psnr{mod}'] < 60
    assert res['paint_ssim'] == pytest.approx((res['paint_ssim_t1n'] + res['paint_ssim_t2w']) / 2)


@pytest.mark.parametrize('dims', [2, 3])
def test_paint_metrics_are_repeatable_with_a_real_paint_generator(archives, dims):
    archive = archives[dims]
    G = paint_generator(dims)
    kwargs = _kwargs(archive, num_gen=5)
    first = metric_main.calc_metric('paint_ssim', G=G, **kwargs).results
    assert set(first) == {'paint_ssim', 'paint_ssim_t1n', 'paint_ssim_t2w'}
    assert all(np.isfinite(v) and -1 <= v <= 1 for v in first.values()), first
    again = metric_main.calc_metric('paint_ssim', G=G, **dict(kwargs, batch_size=2)).results  # other batching
    assert again == first
    other = metric_main.calc_metric('paint_ssim', G=G, **dict(kwargs, seed=1)).results
    assert other != first  # the seed picks other masks and latents
    mse = metric_main.calc_metric('paint_mse', G=G, **kwargs).results
    assert mse.paint_mse > 0


def test_cohort_conditioned_generator_paints_with_the_patch_label(tmp_path):
    archive = make_patch_archive(tmp_path / 'c.zip', cohorts=True, healthy=3, tumour=3)
    res = metric_main.calc_metric('paint_psnr', G=paint_generator(c_dim=2), **_kwargs(archive)).results
    assert np.isfinite(res.paint_psnr)
    with pytest.raises(metric_utils.MetricError, match='conditional on 3 labels'):
        metric_main.calc_metric('paint_psnr', G=paint_generator(c_dim=3), **_kwargs(archive))


# ----------------------------------------------------------------------------
# Wrong family, wrong data: one line each.

def test_wrong_generator_family_or_data_is_one_line(archives, tmp_path):
    from training.networks import Generator
    joint = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=2, mapping_kwargs=dict(num_layers=1),
                      channel_base=32, channel_max=8)
    with pytest.raises(metric_utils.MetricError, match='measures tumour-painting generators') as err:
        metric_main.calc_metric('paint_ssim', G=joint, **_kwargs(archives[2]))
    assert '\n' not in str(err.value)
    with pytest.raises(metric_utils.MetricError, match='measures whole-image generators; this snapshot paints') as err:
        metric_main.calc_metrics(['paint_ssim', 'fid10k_full'], G=paint_generator(), **_kwargs(archives[2]))
    assert '\n' not in str(err.value)
    with pytest.raises(metric_utils.MetricError, match='paints 16x16x16'):
        metric_main.calc_metric('paint_mse', G=paint_generator(3), **_kwargs(archives[2]))
    # A slice archive is not a patch archive.
    sys.path.insert(0, os.path.dirname(__file__))
    from test_segmentation import make_seg_archive
    slices = make_seg_archive(tmp_path / 'slices.zip', cases=2, per_case=2)
    with pytest.raises(metric_utils.MetricError, match='holds slices, not patches'):
        metric_main.calc_metric('paint_mse', G=paint_generator(), **_kwargs(slices))
    # Before training: paint runs take paint metrics only, other runs none of them.
    assert 'measure whole-image generators' in metric_main.metrics_problem(['fid50k_full'], False, is_paint=True)
    assert metric_main.metrics_problem(['paint_ssim', 'paint_mse'], True, is_paint=True) is None
    assert 'measure tumour-painting generators' in metric_main.metrics_problem(['paint_ssim'], False, is_paint=False)
    assert metric_main.metrics_problem(['paint_ssim'], True) is None  # not known: the caller checks the family


def test_calc_metrics_cli_wrong_snapshot_kind_is_one_line(archives, tmp_path):
    from torch_utils import snapshot
    from training.dataset import ImageFolderDataset
    desc = ImageFolderDataset(path=archives[2]).describe()
    G = paint_generator()
    path = str(tmp_path / 'network-snapshot-000000000.pt')
    snapshot.save_snapshot(path, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    proc = subprocess.run([sys.executable, 'calc_metrics.py', '--network', path, '--metrics', 'fid10k_full',
                           '--device', 'cpu'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'paints tumours into patches' in lines[0], proc.stderr
    ok = subprocess.run([sys.executable, 'calc_metrics.py', '--network', path, '--metrics', 'paint_mse,paint_psnr',
                         '--device', 'cpu', '--num-gen', '3'], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert os.path.isfile(tmp_path / 'metric-paint_mse.jsonl') and os.path.isfile(tmp_path / 'metric-paint_psnr.jsonl')


# ----------------------------------------------------------------------------
# insert_dice.

def _segmenter(archive, path, steps=150):
    """A tiny 2D U-Net trained on the archive's patches (as calc_segmentation.py trains and saves one)."""
    pytest.importorskip('monai')
    from mri.downstream import engine
    from mri.downstream.model import build_segmenter, save_segmenter
    from training.dataset import ImageFolderDataset
    ds = ImageFolderDataset(path=archive)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            x = torch.from_numpy(ds[i][0].astype(np.float32)) / 65535 * 2 - 1
            onehot = x[3:] > 0
            return x[:2], torch.where(onehot.any(0), onehot.to(torch.uint8).argmax(0) + 1, 0).to(torch.int64)
    engine.seed_everything(0)
    model = build_segmenter('unet', 2, 2, features=8, levels=2)
    model = engine.train_segmenter(model, Items(), steps=steps, batch=8, lr=1e-2, seed=0, device='cpu', patch=[16, 16])
    save_segmenter(path, model, dict(arch='unet', spatial_dims=2, in_channels=2, input_names=MODS, features=8, levels=2,
                                     patch=[16, 16]))
    return path


def test_insert_dice_reports_inserted_and_real(archives):
    archive = make_patch_archive(archives['tmp'] / 'ins.zip', healthy=8, tumour=12, seed=3)
    seg = _segmenter(archive, str(archives['tmp'] / 'seg.pt'))
    kwargs = _kwargs(archive, segmenter=seg)
    G = paint_generator()
    res = metric_main.calc_metric('insert_dice', G=G, **kwargs).results
    keys = {'insert_dice', 'insert_dice_real', 'insert_dice_ratio', 'insert_dice_placed'}
    keys |= {f'insert_dice_{s}{c}' for s in ('', 'real_') for c in ('wt', 'tc', 'et', 'netc', 'snfh')}
    assert set(res) == keys
    assert res.insert_dice_real > 0.5, res  # the segmenter learnt the real tumours
    assert 0 <= res.insert_dice <= 1 and res.insert_dice_placed > 0.5
    assert res.insert_dice_ratio == pytest.approx(res.insert_dice / res.insert_dice_real)
    assert metric_main.calc_metric('insert_dice', G=G, **kwargs).results == res  # repeatable
    # A painter that paints each label as bright as the archive's tumours: its tumours are found about as well.
    good = metric_main.calc_metric('insert_dice', G=perfect_painter(archive, 2, 16, tumour_like=True), **kwargs).results
    assert good.insert_dice_real == res.insert_dice_real
    assert good.insert_dice_ratio > 0.85 and good.insert_dice > res.insert_dice + 0.3, (good, res)
    with pytest.raises(metric_utils.MetricError, match='needs a segmenter'):
        metric_main.calc_metric('insert_dice', G=G, **_kwargs(archive))


def test_insertion_never_leaves_the_brain():
    from metrics.insert_dice import place
    rng = np.random.RandomState(0)
    labels = torch.from_numpy(np.stack([blob_labels((16, 16), (8, 8), 4) == k for k in (1, 2, 3)]))
    brain = torch.zeros(16, 16, dtype=torch.bool)
    brain[2:14, 3:13] = True
    for _ in range(20):
        moved = place(labels, brain, rng)
        assert moved is not None and not (moved.any(0) & ~brain).any()
        assert int(moved.any(0).sum()) >= 0.9 * int(labels.any(0).sum())
    assert place(labels, torch.zeros_like(brain), rng) is None


# ----------------------------------------------------------------------------
# calc_segmentation.py: the real+inserted arm.

class StandInInserter:
    """The insertion library's interface (painter, insert) with a trivial painter: the shape goes to a random box
    of the case and is drawn brighter there. Records every case it paints into."""

    def __init__(self):
        self.cases = []

    def painter(self, G, device, truncation_psi, desc):
        from training.paint import is_paint_generator
        assert is_paint_generator(G)
        return type('P', (), dict(planes=None))()

    def insert(self, painter, case, label_source, rng):
        self.cases.append(case.case_id)
        shape = label_source.draw(rng, painter.planes[0] if painter.planes else None).labels
        corner = [int(rng.integers(0, s - t + 1)) for s, t in zip(case.shape, shape.shape)]
        box = tuple(slice(c, c + t) for c, t in zip(corner, shape.shape))
        images, seg, region = case.images.copy(), case.seg.copy(), np.zeros(case.shape, bool)
        new = shape > 0
        seg[box][new] = shape[new]
        region[box] = new
        images[:, region] = np.clip(images[:, region] + 0.8, -1, 1)
        return type('R', (), dict(images=images, seg=seg, region=region, failures=[],
                                  placements=[dict(corner=corner)]))()


def _paint_snapshot(path, archive, channels, dims=2, side=16):
    from torch_utils import snapshot
    from training.dataset import ImageFolderDataset
    from training.paint import PaintGenerator
    torch.manual_seed(0)
    G = PaintGenerator(z_dim=8, c_dim=0, w_dim=8, img_resolution=side, img_channels=len(channels), channels=channels,
                       spatial_dims=dims, mapping_kwargs=dict(num_layers=1), channel_base=32, channel_max=8)
    desc = dict(ImageFolderDataset(path=archive).describe(), channels=list(channels))
    snapshot.save_snapshot(str(path), dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    return str(path)


def test_real_inserted_never_inserts_into_a_test_case(tmp_path):
    pytest.importorskip('monai')
    sys.path.insert(0, os.path.dirname(__file__))
    from test_segmentation import SEG, make_seg_archive, make_snapshot
    from mri.downstream.data import SegmentationError
    from mri.downstream.protocol import Plan, default_config, run_protocol
    archive = make_seg_archive(tmp_path / 'seg.zip', cases=6, per_case=6)
    snap = _paint_snapshot(tmp_path / 'paint.pt', archive, ['t2w'] + SEG)
    outdir = tmp_path / 'out'
    cfg = default_config(data=archive, paint_networks=[snap], outdir=str(outdir), folds=3, arms=['real', 'real+inserted'],
                         ratios=[1.0], features=4, levels=2, steps=2, batch=4, device='cpu', progress=False)
    inserter = StandInInserter()
    out = run_protocol(cfg, inserter=inserter)
    assert out['arms'] == ['real', 'real+inserted@1']
    for k, fold in enumerate(out['folds']):
        test = set(fold['test_cases'])
        with open(outdir / 'synthetic' / f'inserted-fold{k}.json') as f:
            meta = json.load(f)
        assert len(meta['sources']) == fold['num_real_train_items']  # ratio 1
        assert not {s['case'] for s in meta['sources']} & test  # painted into training items only
        assert not {d['case'] for s in meta['sources'] for d in s['shapes_drawn']} & test  # shapes from them only
        labels = np.load(outdir / 'synthetic' / f'inserted-fold{k}-labels.npy')
        assert all(m.any() for m in labels)  # every item holds a tumour (the new one at least)
        record = out['per_fold']['real+inserted@1'][k]
        assert record['num_synthetic'] == record['num_real'] == fold['num_real_train_items']
    assert len(inserter.cases) == sum(f['num_real_train_items'] for f in out['folds'])  # one painting per item
    # A rerun reuses the pools and the finished folds.
    inserter2 = StandInInserter()
    run_protocol(cfg, inserter=inserter2)
    assert inserter2.cases == []
    # A joint snapshot where a paint one is expected (and the reverse): one line each.
    joint = make_snapshot(tmp_path / 'joint.pt', archive)
    with pytest.raises(SegmentationError, match='is not a paint snapshot') as err:
        Plan(default_config(**dict(cfg, paint_networks=[joint], outdir=str(tmp_path / 'x'))), inserter=StandInInserter())
    assert '\n' not in str(err.value)
    with pytest.raises(SegmentationError, match='is a paint snapshot'):
        Plan(default_config(**dict(cfg, networks=[snap], arms=['real', 'real+synthetic'], outdir=str(tmp_path / 'x'))))
    with pytest.raises(SegmentationError, match='needs a paint snapshot'):
        Plan(default_config(**dict(cfg, paint_networks=[], outdir=str(tmp_path / 'x'))))


def test_shift_moves_the_trailing_axes_only():
    from torch_utils.misc import shift
    x = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    moved = shift(x, [1, -2])              # [C, H, W]: the channels stay, H and W move
    assert torch.equal(moved[:, 1:, :2], x[:, :2, 2:]) and (moved[:, 0] == 0).all() and (moved[:, :, 2:] == 0).all()
    assert torch.equal(shift(x[0], [1, -2]), moved[0])  # [H, W] alike (mri.painting.masks)
    assert (shift(x, [0, 4]) == 0).all() and torch.equal(shift(x, [0, 0, 0]), x)
