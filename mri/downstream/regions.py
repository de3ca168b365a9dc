"""BraTS evaluation regions and their scores: Dice and the 95th-percentile Hausdorff distance (HD95).

Regions (Menze et al., IEEE TMI 2015; Baid et al., arXiv:2107.02314), from the label map 0-3 of `mri.seg`:
whole tumour WT = labels 1, 2, 3; tumour core TC = labels 1 and 3; enhancing tumour ET = label 3.

Dice and HD95 come from MONAI (`compute_dice`, `compute_hausdorff_distance` with percentile 95, symmetric). The
empty cases follow the BraTS challenge convention, decided here because MONAI leaves them open: reference and
prediction both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0 and HD95 = the diagonal of the image extent
(the largest distance there can be; BraTS uses 373.13 mm, the diagonal of its 240x240x155 grid).
Distances are in voxels of the archive unless a spacing is given.
"""

import math
import warnings

import numpy as np
import torch

REGIONS = ('WT', 'TC', 'ET')
REGION_LABELS = {'WT': (1, 2, 3), 'TC': (1, 3), 'ET': (3,)}
REGION_NAMES = {'WT': 'whole tumour (1+2+3)', 'TC': 'tumour core (1+3)', 'ET': 'enhancing tumour (3)'}


def region_mask(labels, region: str):
    """Boolean mask of one region from an integer label map (numpy or torch, any shape)."""
    members = REGION_LABELS[region]
    if isinstance(labels, torch.Tensor):
        return torch.isin(labels, torch.tensor(members, device=labels.device))
    return np.isin(np.asarray(labels), members)


def _diagonal(shape, spacing) -> float:
    spacing = [1.0] * len(shape) if spacing is None else list(spacing)
    return float(math.sqrt(sum((s * d) ** 2 for s, d in zip(shape, spacing))))


def mask_scores(
    pred,                   # boolean mask [*spatial] (numpy or torch): the prediction
    ref,                    # boolean mask of the same shape: the reference
    spacing=None,           # voxel size per spatial axis; None = 1 (distances in voxels)
) -> dict:
    """``{'dice': float, 'hd95': float}`` of one binary mask pair, with the BraTS conventions for empty masks."""
    from monai.metrics import compute_dice, compute_hausdorff_distance
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).bool()
    ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).bool()
    if pred.shape != ref.shape:
        raise ValueError(f'mask_scores: prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape')
    p_any, r_any = bool(pred.any()), bool(ref.any())
    if not p_any and not r_any:
        return dict(dice=1.0, hd95=0.0)
    if p_any != r_any:
        return dict(dice=0.0, hd95=_diagonal(pred.shape, spacing))
    y_pred = pred[None, None].float().cpu()  # [B=1, C=1, *spatial], MONAI's layout
    y = ref[None, None].float().cpu()
    dice = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # MONAI's own deprecated internal argument, not ours.
        hd95 = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                spacing=None if spacing is None else list(spacing))[0, 0])
    return dict(dice=dice, hd95=hd95)


def region_scores(
    pred_labels,            # integer label map 0-3 [*spatial]: the prediction
    ref_labels,             # integer label map 0-3 of the same shape: the reference
    spacing=None,           # voxel size per spatial axis; None = 1
) -> dict:
    """``{region: {'dice', 'hd95'}}`` for WT, TC and ET."""
    return {r: mask_scores(region_mask(pred_labels, r), region_mask(ref_labels, r), spacing) for r in REGIONS}


def mean_scores(per_item: list) -> dict:
    """Mean over items of ``{region: {metric: value}}`` dicts (e.g. over the planes of a case, or the cases of a fold)."""
    if not per_item:
        raise ValueError('mean_scores: nothing to average')
    return {r: {m: float(np.mean([item[r][m] for item in per_item])) for m in per_item[0][r]} for r in per_item[0]}


def pooled_dice(pred_labels, ref_labels, regions=REGIONS) -> dict:
    """Dice per region pooled over a whole batch (sums of overlaps over sums of sizes), e.g. over generated images.

    Both empty counts as 1, as in `mask_scores`. Works on torch tensors on any device, any shape.
    """
    out = {}
    for r in regions:
        p, t = region_mask(pred_labels, r), region_mask(ref_labels, r)
        inter = float((p & t).sum())
        total = float(p.sum() + t.sum())
        out[r] = 1.0 if total == 0 else 2 * inter / total
    return out
