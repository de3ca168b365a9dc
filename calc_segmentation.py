#!/usr/bin/env python
"""Does synthetic data help tumour segmentation? k-fold cross-validation by case, real vs real+synthetic.

Trains a MONAI segmenter per fold and arm (real, real+synthetic@R, real+inserted@R, synthetic, pretrained+finetune)
and reports Dice and HD95 per BraTS region (WT, TC, ET), mean +- std over folds and the paired difference to `real`
with its tests.
See docs/segmentation.md for the protocol and how to read the numbers.

Examples:

\b
  python calc_segmentation.py --data africa-seg.zip --network runs/00003-africa-seg --folds 5 \\
      --synthetic-ratio 0.5,1,2 --steps 2000 --outdir seg-eval
  python calc_segmentation.py --data africa-seg.zip --network runs/00003-africa-seg --outdir seg-eval \\
      --arms real,real+synthetic,pretrained+finetune --pretrained gli-eval/checkpoints/fold0-real.pt
  python calc_segmentation.py --data africa-vol.zip --paint-network runs/00004-africa-patches --outdir ins-eval \\
      --arms real,real+inserted --synthetic-ratio 1

A stopped run resumes from its finished folds when the same command is run again.
"""

import os
import sys

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402

from mri.downstream.data import SegmentationError  # noqa: E402
from training.cli import PATH, bool_option  # noqa: E402
from mri.downstream.model import ARCHS  # noqa: E402
from mri.downstream.protocol import ARM_KINDS, default_config, run_protocol  # noqa: E402

def _split(value):
    """A comma list of paths, each with ~ expanded (as PATH options do)."""
    return [os.path.expanduser(v.strip()) for v in (value or '').split(',') if v.strip()]


def _ratios(_ctx, _param, value):
    try:
        ratios = [float(v) for v in _split(value)]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated numbers such as 0.5,1,2, got {value!r}') from None
    if not ratios or any(r <= 0 for r in ratios):
        raise click.BadParameter(f'ratios must be positive, got {value!r}')
    return ratios


def _arms(_ctx, _param, value):
    arms = _split(value)
    bad = [a for a in arms if a not in ARM_KINDS]
    if bad or not arms:
        raise click.BadParameter(f'expected some of {",".join(ARM_KINDS)}, got {value!r}')
    return arms


@click.command(help=__doc__)
@click.option('--data',            metavar='ZIP|DIR', type=PATH, required=True, help='Real archive with seg_* channels (dataset_tool.py --with-seg)')
@click.option('--network',         metavar='PATH[,PATH..]', default='', help='Joint image+mask snapshot or run dir; or one per fold')
@click.option('--paint-network',   'paint_network', metavar='PATH[,PATH..]', default='',
              help='Paint snapshot or run dir for real+inserted (train.py --cfg paint); or one per fold')
@click.option('--outdir',          metavar='DIR', type=PATH, required=True, help='Where results, checkpoints and pools go (resumable)')
@click.option('--folds',           metavar='INT', type=click.IntRange(min=2), default=5, show_default=True, help='Cross-validation folds (by case)')
@click.option('--test-subset',     type=click.Choice(['all', 'val', 'train']), default='all', show_default=True,
              help='Cases the folds test on (a case-level split of --data); the others always train')
@click.option('--arms',            metavar='LIST', default='real,real+synthetic,synthetic', show_default=True, callback=_arms,
              help=f'Arms among {",".join(ARM_KINDS)} (real is always run)')
@click.option('--synthetic-ratio', 'ratios', metavar='LIST', default='1', show_default=True, callback=_ratios,
              help='Synthetic (or inserted) items per real item, one real+synthetic (real+inserted) arm each')
@click.option('--pretrained',      metavar='PATH', type=PATH, default=None, help='Segmenter checkpoint for pretrained+finetune')
@click.option('--arch',            type=click.Choice(ARCHS), default='unet', show_default=True, help='MONAI network')
@click.option('--features',        metavar='INT', type=click.IntRange(min=1), default=16, show_default=True, help='Channels of the first level')
@click.option('--levels',          metavar='INT', type=click.IntRange(2, 6), default=4, show_default=True, help='Resolution levels')
@click.option('--steps',           metavar='INT', type=click.IntRange(min=1), default=2000, show_default=True, help='Optimiser steps per fold and arm')
@click.option('--batch',           metavar='INT', type=click.IntRange(min=1), default=16, show_default=True, help='Items per step')
@click.option('--lr',              metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help='Adam learning rate')
@click.option('--patch',           metavar='INT', type=click.IntRange(min=4), default=None, help='Training/inference patch side [default: slice size; 96 for volumes]')
@bool_option('--augment',          default=True, help='Flips and intensity jitter')
@click.option('--no-augment',      is_flag=True, help='Same as --augment=0')
@click.option('--seed',            metavar='INT', type=int, default=0, show_default=True, help='Seed of folds, weights, sampling, augmentation')
@click.option('--trunc',           metavar='FLOAT', type=float, default=1.0, show_default=True, help='Truncation psi of the generator')
@click.option('--workers',         metavar='INT', type=click.IntRange(min=0), default=2, show_default=True, help='DataLoader worker processes (at most the usable cores)')
@click.option('--device',          type=click.Choice(['cuda', 'cpu']), default=None, help='Device [default: cuda if available]')
@bool_option('--progress',         default=True, help='Show a progress line')
@click.option('--no-progress',     is_flag=True, help='Same as --progress=0')
def main(data, network, paint_network, outdir, folds, test_subset, arms, ratios, pretrained, arch, features, levels, steps, batch, lr,
         patch, augment, no_augment, seed, trunc, workers, device, progress, no_progress):
    augment, progress = augment and not no_augment, progress and not no_progress
    if pretrained and 'pretrained+finetune' not in arms:
        arms = arms + ['pretrained+finetune']
    cfg = default_config(data=data, networks=_split(network), paint_networks=_split(paint_network), outdir=outdir, folds=folds, test_subset=test_subset,
                         arms=arms, ratios=ratios, pretrained=pretrained, arch=arch, features=features, levels=levels, steps=steps, batch=batch,
                         lr=lr, patch=patch, augment=augment, seed=seed, trunc=trunc, workers=workers, device=device,
                         progress=progress)
    from training.checkpoint import RunDirBusy
    try:
        run_protocol(cfg)  # locks the outdir once it exists (a second run into it is refused in one line)
    except (SegmentationError, RunDirBusy) as err:
        raise click.ClickException(str(err).splitlines()[0]) from None
    except OSError as err:
        message = dnnlib.disk_full_message(err)
        if message is None:
            raise
        raise click.ClickException(f'{message}; finished folds are kept in {outdir}: free some space and run the '
                                   f'same command to resume') from None
    except KeyboardInterrupt:  # SIGTERM too (dnnlib.exit_on_interrupt).
        click.echo(f'\ninterrupted; finished folds are kept in {outdir}: run the same command to resume', err=True)
        sys.exit(dnnlib.interrupt_exit_code())
    click.echo(f'wrote {outdir}/results.json, results.md, results.png')


if __name__ == '__main__':
    dnnlib.run_cli(main)
