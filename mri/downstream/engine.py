"""Training and evaluation of one segmenter: the same loss, optimiser, schedule, sampling and augmentation for every
arm, seeded so that arms differ only in their training items.

Loss: Dice + cross-entropy (MONAI ``DiceCELoss``; Milletari et al., V-Net, 3DV 2016, for the soft Dice), Adam with the
"poly" learning-rate decay (1 - step/steps)^0.9 used by nnU-Net (Isensee et al., Nature Methods 2021).
Augmentation (batched, on the device, for any number of spatial axes): a random patch when the patch is smaller
than the image, a flip along each spatial axis with p = 0.5, and a per-channel intensity scale in [0.9, 1.1] and
shift in [-0.1, 0.1].
"""

import numpy as np
import torch

import dnnlib
from torch_utils import misc

from mri.downstream import regions
from mri.downstream.model import predict_labels


def _crop_and_augment(x, y, patch, augment, gen):
    """x [N, C, *S] float, y [N, *S] int -> augmented patches; ``gen`` is a CPU torch.Generator (the arm's seed)."""
    n, spatial = x.shape[0], list(x.shape[2:])
    if any(p < s for p, s in zip(patch, spatial)):
        xs, ys = [], []
        for i in range(n):
            starts = [int(torch.randint(0, s - p + 1, [1], generator=gen)) for p, s in zip(patch, spatial)]
            window = tuple(slice(a, a + p) for a, p in zip(starts, patch))
            xs.append(x[(i, slice(None)) + window])
            ys.append(y[(i,) + window])
        x, y = torch.stack(xs), torch.stack(ys)
    if not augment:
        return x, y
    flips = torch.rand([n, len(spatial)], generator=gen) < 0.5
    scale = (0.9 + 0.2 * torch.rand([n, x.shape[1]], generator=gen)).to(x.device)
    shift = (-0.1 + 0.2 * torch.rand([n, x.shape[1]], generator=gen)).to(x.device)
    x = x * scale.view(n, -1, *[1] * len(spatial)) + shift.view(n, -1, *[1] * len(spatial))
    xs, ys = [], []
    for i in range(n):
        axes = [a for a in range(len(spatial)) if flips[i, a]]
        xs.append(x[i].flip([1 + a for a in axes]) if axes else x[i])
        ys.append(y[i].flip(axes) if axes else y[i])
    return torch.stack(xs), torch.stack(ys)


def train_segmenter(
    model: torch.nn.Module,     # freshly built (seeded) or pretrained segmenter
    items,                      # torch Dataset of (image [C, *S], labels [*S])
    steps: int,                 # optimiser steps
    batch: int,                 # items per step
    lr: float,                  # Adam learning rate at step 0
    seed: int,                  # seeds the sampling order and the augmentation
    device,                     # torch device
    patch: list,                # training patch per spatial axis
    augment: bool = True,       # flips and intensity jitter
    workers: int = 2,           # DataLoader worker processes (at most the usable cores: torch warns of more)
    on_step=None,               # callback(step, loss) after each step
) -> torch.nn.Module:
    from monai.losses import DiceCELoss
    model = model.to(device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - min(s, steps) / steps) ** 0.9)
    sampler = torch.utils.data.RandomSampler(items, replacement=True, num_samples=steps * batch,
                                             generator=torch.Generator().manual_seed(seed))
    workers = min(workers, dnnlib.usable_cpus())
    loader = torch.utils.data.DataLoader(items, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                                         worker_init_fn=misc.loader_worker_init(then=getattr(items, 'worker_init', None)),
                                         pin_memory=torch.device(device).type == 'cuda')
    gen = torch.Generator().manual_seed(seed + 1)
    for step, (x, y) in enumerate(loader):
        x, y = _crop_and_augment(x.to(device, non_blocking=True), y.to(device, non_blocking=True), patch, augment, gen)
        loss = loss_fn(model(x), y.unsqueeze(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    return model.eval()


def _case_units(real, case, model, patch, device, batch):
    """Prediction and reference label maps of each evaluation unit of a case (a volume, or a stack of slices)."""
    for _plane, members in real.case_stacks(case):
        preds, refs = [], []
        for start in range(0, len(members), batch):
            chunk = [real.load(idx) for _pos, idx in members[start:start + batch]]
            x = torch.stack([c[0] for c in chunk]).to(device)
            preds.append(predict_labels(model, x, patch).cpu())
            refs.append(torch.stack([c[1] for c in chunk]))
        pred, ref = torch.cat(preds), torch.cat(refs)
        if real.spatial_dims == 3:
            for i in range(pred.shape[0]):
                yield pred[i], ref[i]
            continue
        # Slices go back to their positions in the scan; positions not in the archive are empty in both maps.
        pos = torch.tensor([p for p, _ in members])
        depth = int(pos.max() - pos.min()) + 1
        stack_pred = torch.zeros([depth] + list(pred.shape[1:]), dtype=pred.dtype)
        stack_ref = torch.zeros_like(stack_pred)
        stack_pred[pos - pos.min()], stack_ref[pos - pos.min()] = pred, ref
        yield stack_pred, stack_ref


@torch.no_grad()
def evaluate_cases(model, real, cases, patch, device, batch: int = 16) -> dict:
    """``{case: {region: {'dice', 'hd95'}}}``: scores per evaluation unit, averaged over the units of a case."""
    model = model.to(device).eval()
    return {case: regions.mean_scores([regions.region_scores(p, r) for p, r in _case_units(real, case, model, patch,
                                                                                        device, batch)])
            for case in cases}


def fold_means(per_case: dict) -> dict:
    """Mean of the per-case scores of a fold: ``{region: {metric: value}}``."""
    return regions.mean_scores(list(per_case.values()))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
