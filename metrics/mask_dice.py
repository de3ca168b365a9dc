"""Mask fidelity of a joint image+mask generator: does the generated image show the tumour where its mask says?

A segmenter trained on real images and masks (a checkpoint written by ``calc_segmentation.py``, e.g.
``seg-eval/checkpoints/fold0-real.pt``) segments the generated images; the Dice between its labels and the generated
mask, pooled over all generated images, is reported per BraTS region (WT, TC, ET) and for the labels NETC and SNFH
(the ET label is the ET region). Near the segmenter's own Dice on real held-out cases: images and masks agree as
well as real ones do; near 0: the masks do not describe the images. Works for slices and volumes ([N, C, *spatial]).

The MRI side (segmenter, channel layout, BraTS labels) is reached by name, as training reaches MRI hooks:
metrics/ never imports mri/.
"""

import numpy as np
import torch

import dnnlib
from metrics import metric_utils

SCORER = 'mri.downstream.model.load_mask_scorer'


def _dataset(opts):
    """The real archive (2D or 3D), for conditioning labels and channel names."""
    if not opts.dataset_kwargs:
        raise metric_utils.MetricError('mask_dice: no real data given (dataset_kwargs is empty); pass --data')
    kwargs = dict(opts.dataset_kwargs)
    kwargs.setdefault('class_name', 'training.dataset.ImageFolderDataset')
    return dnnlib.construct_class_by_name(**kwargs)


def compute_mask_dice(opts, num_gen: int) -> dict:
    """``{class: pooled Dice}`` over ``num_gen`` generated images (all ranks together)."""
    if not opts.get('segmenter'):
        raise metric_utils.MetricError('mask_dice needs a segmenter checkpoint written by calc_segmentation.py; '
                                       'pass --segmenter (e.g. seg-eval/checkpoints/fold0-real.pt)')
    scorer = dnnlib.call_func_by_name(opts.segmenter, device=opts.device, func_name=SCORER)
    dataset = _dataset(opts)
    sampler = metric_utils.GeneratorSampler(opts, dataset, seed_offset=0x3A5)
    names = list(dataset.channels)
    sums = torch.zeros([len(scorer.CLASSES), 2], dtype=torch.float64, device=opts.device)  # [overlap, size sum]
    per_rank = (num_gen - 1) // opts.num_gpus + 1
    with dnnlib.ProgressBar(num_gen, desc='mask_dice', unit='images', enabled=opts.progress) as bar:
        for start in range(0, per_rank, opts.batch_size):
            n = min(opts.batch_size, per_rank - start)
            with torch.no_grad():
                images = sampler.G(sampler.latents(n), sampler.labels_batch(n), **sampler.G_kwargs).float()
            inputs, masks = scorer.split(images, names)
            pred = scorer.segment(inputs).to(masks.device)
            for j, labels in enumerate(scorer.CLASSES.values()):
                members = torch.tensor(labels, device=masks.device)
                p, t = torch.isin(pred, members), torch.isin(masks, members)
                sums[j, 0] += float((p & t).sum())
                sums[j, 1] += float(p.sum() + t.sum())
            bar.update(min(n * opts.num_gpus, num_gen - bar.done))
    if opts.num_gpus > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    sums = sums.cpu().numpy()
    # Both empty everywhere: nothing to disagree about (the BraTS convention for empty masks).
    return {name: float(1.0 if s[1] == 0 else 2 * s[0] / s[1]) for name, s in zip(scorer.CLASSES, sums)}


def results(per_class: dict) -> dict:
    """Registry results: ``mask_dice`` (mean over WT, TC, ET) and ``mask_dice_<class>``."""
    out = {'mask_dice': float(np.mean([per_class[r] for r in ('wt', 'tc', 'et')]))}
    out.update({f'mask_dice_{name}': value for name, value in per_class.items()})
    return out
