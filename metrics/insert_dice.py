"""``insert_dice``: do painted tumours look like the tumours their labels say? A segmenter trained on real cases (a
checkpoint written by ``calc_segmentation.py``) segments tumours the paint generator inserted into healthy patches,
and its Dice against the inserted labels is set beside its Dice on the archive's real tumour patches.

Insertion, per item (seeded from ``opts.seed`` and the item's number, so repeatable and independent of batching):
a healthy patch without any tumour voxel is the target; the label map of one of the archive's tumour patches (a pool
of up to ``paint.DONOR_POOL``, seeded), scaled down when it covers more than ``MAX_FRACTION`` of the patch, is flipped
at random per axis and moved so that its centre lands on a random brain voxel of the target, until at least
``MIN_ON_BRAIN`` of it lies on brain (``PLACE_TRIES`` tries; an item that finds no place is skipped and counted), then
clipped to the brain. The repaint region is the one training uses for a
tumour (``RepaintMasks(...)(labels, brain, mode='auto')``: the tumour dilated, inside the brain); the generator
paints it from the moved labels. The segmenter's label map of the painted patch is scored against the moved labels.

Dice is pooled over all items (the sums of overlaps over the sums of sizes, as ``mask_dice``), per BraTS region (WT,
TC, ET) and for the labels NETC and SNFH. Keys: ``insert_dice`` (mean of WT, TC, ET on inserted tumours),
``insert_dice_real`` (the same segmenter on the real tumour patches), ``insert_dice_ratio`` (their quotient: near 1,
painted tumours are segmented as well as real ones), the per-class values of both, and ``insert_dice_placed`` (the
fraction of items that found a place). The segmenter and the BraTS regions are reached by name, as ``mask_dice``
reaches them: metrics/ does not import mri/.
"""

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from metrics import metric_utils
from metrics import paint

SCORER = 'mri.downstream.model.load_mask_scorer'
MIN_ON_BRAIN = 0.9          # fraction of a moved tumour that must land on brain
PLACE_TRIES = 16            # placements tried per item
MAX_FRACTION = 0.35         # a donor tumour covering more of the patch is scaled down to it (as the healthy masks)


def _shrink(labels: torch.Tensor) -> torch.Tensor:
    """``labels bool [K, *S]`` scaled down about its bounding box (nearest neighbour) to cover at most
    ``MAX_FRACTION`` of the patch: a glioma with its oedema can fill a whole small patch, leaving nowhere to put it."""
    tumour = labels.any(0)
    count = int(tumour.sum())
    if count <= MAX_FRACTION * tumour.numel():
        return labels
    factor = (MAX_FRACTION * tumour.numel() / count) ** (1 / tumour.ndim)
    voxels = tumour.nonzero()
    lo, hi = voxels.min(0).values, voxels.max(0).values + 1
    box = labels[(slice(None),) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    size = [max(1, int(int(n) * factor)) for n in box.shape[1:]]
    small = torch.nn.functional.interpolate(box[None].to(torch.float32), size=size, mode='nearest')[0] > 0.5
    out = torch.zeros_like(labels)
    out[(slice(None),) + tuple(slice(0, m) for m in size)] = small  # Anywhere: place() moves it.
    return out


def place(labels: torch.Tensor, brain: torch.Tensor, rng) -> torch.Tensor:
    """``labels bool [K, *S]`` (a donor tumour, scaled down when it covers more than ``MAX_FRACTION`` of the patch)
    flipped and moved into ``brain bool [*S]``, clipped to it; None when no placement puts ``MIN_ON_BRAIN`` of it on
    brain in ``PLACE_TRIES`` tries."""
    labels = _shrink(labels)
    size = int(labels.any(0).sum())
    spots = brain.nonzero()
    if size == 0 or len(spots) == 0:
        return None
    for _ in range(PLACE_TRIES):
        flips = [1 + a for a in range(brain.ndim) if rng.randint(2)]
        shape = labels.flip(flips) if flips else labels
        centre = shape.any(0).nonzero().to(torch.float32).mean(0).round().to(torch.int64)
        moved = misc.shift(shape, (spots[rng.randint(len(spots))] - centre).tolist())
        if int((moved.any(0) & brain).sum()) >= MIN_ON_BRAIN * size:
            return moved & brain
    return None


class _Pooled:
    """Pooled Dice per class: sums of overlaps and of sizes."""

    def __init__(self, classes: dict):
        self.classes = classes
        self.sums = torch.zeros([len(classes), 2], dtype=torch.float64)

    def add(self, pred: torch.Tensor, ref: torch.Tensor) -> None:
        pred, ref = pred.cpu(), ref.cpu()
        for j, members in enumerate(self.classes.values()):
            members = torch.tensor(members)
            p, t = torch.isin(pred, members), torch.isin(ref, members)
            self.sums[j, 0] += float((p & t).sum())
            self.sums[j, 1] += float(p.sum() + t.sum())

    def dice(self, opts) -> dict:
        sums = paint._all_reduce(self.sums.to(opts.device), opts).cpu()
        return {name: float(1.0 if s[1] == 0 else 2 * s[0] / s[1]) for name, s in zip(self.classes, sums.tolist())}


def _labelmap(onehot: torch.Tensor) -> torch.Tensor:
    """One-hot ``[N, K, *S]`` (bool) -> label map ``[N, *S]``: 1 + the channel that is on, 0 where none is."""
    return torch.where(onehot.any(1), onehot.to(torch.uint8).argmax(1) + 1, 0)


def _scorer(opts, archive: paint.PatchArchive, G):
    if not opts.get('segmenter'):
        raise metric_utils.MetricError('insert_dice needs a segmenter checkpoint written by calc_segmentation.py; '
                                       'pass --segmenter (e.g. seg-eval/checkpoints/fold0-real.pt)')
    scorer = dnnlib.call_func_by_name(opts.segmenter, device=opts.device, func_name=SCORER)
    inputs = list(scorer.spec.input_names)
    missing = [n for n in inputs if n not in G.paint_channels]
    if missing:
        raise metric_utils.MetricError(f'{opts.segmenter}: segments {inputs}, but the generator paints '
                                       f'{list(G.paint_channels)} ({", ".join(missing)} missing)')
    if int(scorer.spec.spatial_dims) != len(archive.spatial):
        raise metric_utils.MetricError(f'{opts.segmenter}: segments {scorer.spec.spatial_dims}D images; the patches are '
                                       f'{len(archive.spatial)}D')
    if [str(n) for n in G.label_channels] != ['seg_netc', 'seg_snfh', 'seg_et']:
        raise metric_utils.MetricError(f'insert_dice scores the BraTS labels seg_netc, seg_snfh, seg_et; the generator '
                                       f'paints from {list(G.label_channels)}')
    scorer.input_order = [list(G.paint_channels).index(n) for n in inputs]
    return scorer


def _segment(scorer, images: torch.Tensor) -> torch.Tensor:
    return scorer.segment(images[:, scorer.input_order].clamp(-1, 1))


@torch.no_grad()
def compute_insert_dice(opts, num_items: int = None) -> dict:
    """``{'inserted': {class: Dice}, 'real': {class: Dice}, 'placed': fraction}`` over ``num_items`` items (None =
    every healthy patch without tumour, at most 1000) and as many real tumour patches (at most all of them)."""
    G = opts.G
    archive = paint.PatchArchive(opts, G)
    scorer = _scorer(opts, archive, G)
    pool = paint.donor_pool(archive, opts.seed)
    if not pool:
        raise metric_utils.MetricError(f'{archive.path}: holds no tumour patch; insert_dice takes the shapes it inserts '
                                       f'and its real reference from tumour patches')
    targets = [i for i in archive.healthy if not archive.load(i)[1].any()]
    if not targets:
        raise metric_utils.MetricError(f'{archive.path}: holds no healthy patch free of tumour to insert into')
    num_items = metric_utils.num_generated(opts, min(len(targets), 1000)) if num_items is None else num_items
    sampler = paint.mask_sampler(opts)
    painter = paint.Painter(opts, archive)
    order = archive.order(targets, opts.seed, 0x1D5)
    inserted, real = _Pooled(scorer.CLASSES), _Pooled(scorer.CLASSES)
    placed = torch.zeros([2], dtype=torch.float64)  # [placed, tried]
    mine = list(range(opts.rank, num_items, opts.num_gpus))
    with dnnlib.ProgressBar(num_items, desc='insert_dice', unit='patches', enabled=opts.progress) as bar:
        for start in range(0, len(mine), painter.batch):
            batch = []
            for k in mine[start:start + painter.batch]:
                image, _labels, brain, c = archive.load(order[k % len(order)])
                rng, gen = paint.item_rng(opts.seed, k, 0x1D5)
                moved = place(pool[rng.randint(len(pool))], brain[0], rng)
                placed[1] += 1
                if moved is None:
                    continue
                placed[0] += 1
                mask, target = sampler(moved[None], brain[None], mode='auto', generator=gen)
                batch.append((painter.latent(rng), c, image, mask[0], target[0] > 0))
            if batch:
                z, c, images, mask, target = (torch.stack(x) for x in zip(*batch))
                painted = painter(z, c, images, mask, target)
                inserted.add(_segment(scorer, painted), _labelmap(target))
            bar.update(min(len(mine[start:start + painter.batch]) * opts.num_gpus, num_items - bar.done))
        # The same segmenter on real tumours: the reference the inserted ones are read against.
        tumours = archive.order(archive.tumour, opts.seed, 0x7E)[:num_items]
        for start in range(opts.rank * painter.batch, len(tumours), painter.batch * opts.num_gpus):
            items = [archive.load(i) for i in tumours[start:start + painter.batch]]
            images = torch.stack([x[0] for x in items]).to(opts.device)
            real.add(_segment(scorer, images), _labelmap(torch.stack([x[1] for x in items])))
    placed = paint._all_reduce(placed.to(opts.device), opts).cpu()
    if placed[0] == 0:
        raise metric_utils.MetricError(f'{archive.path}: no tumour could be placed in a healthy patch (at least '
                                       f'{MIN_ON_BRAIN:.0%} on brain, {PLACE_TRIES} tries each)')
    return dict(inserted=inserted.dice(opts), real=real.dice(opts), placed=float(placed[0] / placed[1]))


def results(out: dict) -> dict:
    """Registry results: ``insert_dice`` (mean of WT, TC, ET), ``insert_dice_real``, ``insert_dice_ratio``, per class
    ``insert_dice_<class>`` and ``insert_dice_real_<class>``, and ``insert_dice_placed``."""
    mean = {side: float(np.mean([out[side][r] for r in ('wt', 'tc', 'et')])) for side in ('inserted', 'real')}
    res = dict(insert_dice=mean['inserted'], insert_dice_real=mean['real'],
               insert_dice_ratio=mean['inserted'] / mean['real'] if mean['real'] > 0 else float('nan'),
               insert_dice_placed=out['placed'])
    res.update({f'insert_dice_{name}': v for name, v in out['inserted'].items()})
    res.update({f'insert_dice_real_{name}': v for name, v in out['real'].items()})
    return res
