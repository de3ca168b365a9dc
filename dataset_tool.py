#!/usr/bin/env python
"""Convert BraTS MRI (or a StyleGAN2-ADA image folder) into a training archive: a thin CLI over mri.sources.convert.

The archive format extends StyleGAN2-ADA's (Karras et al., NeurIPS 2020); see docs/data.md for every option,
the archive layout and the normalisation.

Examples:

\b
  python dataset_tool.py --source ~/data/BraTS2023 --dest ~/datasets/brats-t2w-256.zip
  python dataset_tool.py --source brats-africa --brats-root ~/data/BraTS-Africa --dest africa.zip \\
      --modalities all --with-seg --labels tumour --split val=0.1
  python dataset_tool.py --source phantom --phantom-cases 8 --dest phantom-vol64.zip --kind volumes --volume-size 64
  python dataset_tool.py --source ~/data/BraTS2023 --dest patches64.zip --kind patches --patch-size 64,64,64
"""

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402

from mri.sources import archive, brats, convert, preprocess  # noqa: E402
from mri.sources import download as brats_africa  # noqa: E402
from training.cli import PATH, bool_option, shape_problem  # noqa: E402


def _parse_list(value, allowed, name, all_value=None):
    items = [v.strip() for v in value.split(',') if v.strip()]
    if all_value is not None and items == ['all']:
        return tuple(all_value)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f'expected a comma-separated list of {", ".join(allowed)}, got {value!r}', param_hint=name)
    return tuple(items)


def _parse_split(values):
    out = {}
    for v in values:
        name, sep, frac = v.partition('=')
        try:
            out[name.strip()] = float(frac)
        except ValueError:
            raise click.BadParameter(f'expected NAME=FRACTION such as val=0.1, got {v!r}', param_hint='--split') from None
        if not sep or not name.strip():
            raise click.BadParameter(f'expected NAME=FRACTION such as val=0.1, got {v!r}', param_hint='--split')
    return out


def _check_resolution(kind, resolution):
    """Refuse before converting a slice side the trainer cannot use (it checks the same shape_problem)."""
    problem = shape_problem((resolution, resolution)) if kind == 'slices' else None
    if problem:
        raise click.BadParameter(f'slices of {problem}; train.py could not use them', param_hint='--resolution')


def _parse_percentiles(value):
    try:
        low, high = (float(x) for x in value.split(','))
    except ValueError:
        raise click.BadParameter(f'expected LOW,HIGH such as 0.5,99.5, got {value!r}', param_hint='--percentiles') from None
    return low, high


@click.command(help=__doc__)
@click.option('--source',             metavar='PATH|WORD', type=PATH, required=True, help='Folder of BraTS cases, image folder/zip, brats-africa or phantom')
@click.option('--dest',               metavar='PATH', type=PATH, required=True, help='Output archive: .zip or folder')
@click.option('--kind',               type=click.Choice(['slices', 'volumes', 'patches']), default='slices', show_default=True, help='2D slices, 3D cubes or patches for tumour painting')
@click.option('--planes',             metavar='LIST', default='axial,coronal,sagittal', show_default=True, help='Slice planes')
@click.option('--resolution',         metavar='INT', type=click.IntRange(min=4), default=256, show_default=True, help='Slice side (pixels), a power of two')
@click.option('--volume-size',        metavar='INT', type=click.IntRange(min=4), default=128, show_default=True, help='Volume cube side (voxels)')
@click.option('--patch-size',         metavar='X,Y,Z|H,W', default='64,64,64', show_default=True, help='Patch sides in native voxels: 3 = 3D, 2 = 2D crops in --planes')
@click.option('--patches-per-case',   metavar='INT', type=click.IntRange(min=0), default=8, show_default=True, help='Tumour patches per case (2D: per plane)')
@click.option('--healthy-per-case',   metavar='INT', type=click.IntRange(min=0), default=None, show_default='as --patches-per-case', help='Healthy patches per case (2D: per plane)')
@click.option('--modalities',         metavar='LIST', default='t2w', show_default=True, help='t1n,t1c,t2w,t2f or all (patches: all)')
@bool_option('--with-seg',            help='Add tumour channels seg_netc,seg_snfh,seg_et (implied by patches)')
@click.option('--labels',             metavar='GROUP', type=PATH, multiple=True, help='Extra label group: modality, tumour, cohort[=gli,ssa,...] or a CSV path (repeatable)')
@click.option('--normalize',          type=click.Choice(['percentile', 'minmax']), default='percentile', show_default=True, help='Per-case intensity range')
@click.option('--percentiles',        metavar='LOW,HIGH', default='0.5,99.5', show_default=True, help='For --normalize percentile')
@click.option('--denoise',            metavar='SIGMA', type=click.FloatRange(min=0, min_open=True), default=None, help='Gaussian denoising sigma (voxels)')
@click.option('--bit-depth',          type=click.Choice(['8', '16']), default='16', show_default=True, help='Image bit depth')
@click.option('--min-brain-fraction', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.1, show_default=True, help='Skip slices with less brain')
@click.option('--split',              metavar='NAME=FRAC', multiple=True, help='Case-level split, e.g. val=0.1 (repeatable)')
@click.option('--split-seed',         metavar='INT', type=int, default=0, show_default=True, help='Seed of the split')
@click.option('--max-cases',          metavar='INT', type=click.IntRange(min=1), default=None, help='Convert at most this many cases')
@click.option('--workers',            metavar='INT', type=click.IntRange(min=1), default=1, show_default=True, help='Worker processes')
@click.option('--on-error',           type=click.Choice(['fail', 'skip']), default='fail', show_default=True, help='Stop at a bad case, or skip it')
@click.option('--compress-level',     metavar='INT', type=click.IntRange(0, 9), default=0, show_default=True, help='PNG deflate: 0 store, 1 fast RLE, 2-9 zlib (and the level of --codec deflate, 1 if 0)')
@click.option('--codec',              type=click.Choice(['blosc2', 'deflate', 'stored']), default=None, help='Form of .npy members: blosc2 (shuffle + LZ4HC), deflate, stored [default: blosc2 in a zip --dest, stored in a folder]')
@click.option('--brats-root',         metavar='DIR', type=PATH, default=None, help='BraTS-Africa folder (else $BRATS_AFRICA_DIR)')
@click.option('--download',           metavar='URL', default=None, help='Fetch and extract a BraTS-Africa archive')
@click.option('--sha256',             metavar='HEX', default=None, help='Expected sha256 of --download')
@bool_option('--keep-download',       help='Keep the fetched --download archive after extracting it (else it is removed)')
@click.option('--phantom-cases',      metavar='INT', type=click.IntRange(min=1), default=8, show_default=True, help='Cases for --source phantom')
@click.option('--seed',               metavar='INT', type=int, default=0, show_default=True, help='Seed for --source phantom and the patch centres')
@bool_option('--progress',            default=True, help='Show a progress line')
@click.option('--no-progress',        is_flag=True, help='Same as --progress=0')
@bool_option('--overwrite',           help='Replace an existing --dest')
def main(source, dest, kind, planes, resolution, volume_size, patch_size, patches_per_case, healthy_per_case,
         modalities, with_seg, labels, normalize, percentiles, denoise, bit_depth, min_brain_fraction, split,
         split_seed, max_cases, workers, on_error, compress_level, codec, brats_root, download, sha256, keep_download, phantom_cases,
         seed, progress, no_progress, overwrite):
    _check_resolution(kind, resolution)
    patch_size = _parse_patch_size(patch_size) if kind == 'patches' else (64, 64, 64)
    if kind == 'patches':
        with_seg = True  # a patch archive always holds the labels: the painter is told what to paint by them
        if _is_default('modalities'):
            modalities = 'all'
    progress = progress and not no_progress
    low, high = _parse_percentiles(percentiles)
    resolution, volume_size = _cube_side(kind, resolution, volume_size)
    problem = _volume_problem((volume_size,) * 3) if kind == 'volumes' else None
    if problem:  # As slices refuse a --resolution the trainer cannot use, before converting anything.
        raise click.BadParameter(f'{problem}; train.py could not use them', param_hint='--volume-size')
    opts = convert.ConvertOptions(
        kind=kind,
        planes=_parse_list(planes, preprocess.PLANES, '--planes'),
        resolution=resolution,
        volume_size=volume_size,
        modalities=_parse_list(modalities, brats.MODALITIES, '--modalities', all_value=brats.MODALITIES),
        with_seg=with_seg,
        labels=tuple(labels),
        normalize=normalize,
        low=low,
        high=high,
        denoise=denoise,
        bit_depth=int(bit_depth),
        min_brain_fraction=min_brain_fraction,
        split=_parse_split(split),
        split_seed=split_seed,
        max_cases=max_cases,
        workers=workers,
        on_error=on_error,
        compress_level=compress_level,
        codec=codec,
        overwrite=overwrite,
        patch_size=patch_size,
        patches_per_case=patches_per_case,
        healthy_per_case=healthy_per_case,
        seed=seed,
    )
    try:
        with dnnlib.sigterm_as_interrupt():  # a terminated conversion cleans up as on Ctrl-C
            summary = convert.convert_source(source, dest, opts, brats_root=brats_root, download=download,
                                             sha256=sha256, phantom_cases=phantom_cases, seed=seed, progress=progress,
                                             keep_download=keep_download)
    except (brats.BratsError, convert.ConversionError, archive.ArchiveError, brats_africa.NotFound,
            brats_africa.DownloadError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        message = dnnlib.disk_full_message(e, dest)
        if message is None:
            raise
        raise click.ClickException(f'{message}; nothing was written (the temporary archive is removed)') from None
    except KeyboardInterrupt:
        # The writers' cleanup ran on the way out: no temporary archive, spool or phantom folder is left.
        dnnlib.exit_interrupted(f'nothing was written to {dest}')
    click.echo(convert.format_summary(summary))
    for line in summary.get('warnings', []):
        click.echo(f'warning: {line}', err=True)


def _parse_patch_size(value):
    """X,Y,Z (3D patches) or H,W (2D crops, square sides the trainer can use, as slices)."""
    try:
        size = tuple(int(x) for x in value.split(','))
    except ValueError:
        size = ()
    if len(size) not in (2, 3) or min(size) < 4:
        raise click.BadParameter(f'expected 3 sides (3D) or 2 (2D crops), each >= 4, such as 64,64,64 or 64,64; '
                                 f'got {value!r}', param_hint='--patch-size')
    problem = shape_problem(size) if len(size) == 2 else _volume_problem(size)
    if problem:
        raise click.BadParameter(f'{"2D crops of " if len(size) == 2 else ""}{problem}; train.py could not use them',
                                 param_hint='--patch-size')
    return size


def _volume_problem(shape):
    """Why the network family cannot build volumes of ``shape`` (a base of 4..8 per axis times 2^k), or None."""
    from training.networks import ShapeError, network_geometry  # Lazy: --help stays fast.
    try:
        network_geometry(list(shape), 3, min_levels=1)
    except ShapeError as err:
        return str(err)
    return None


def _is_default(name):
    """True when the option `name` was not given on the command line (nor by an environment variable)."""
    ctx = click.get_current_context(silent=True)
    return ctx is None or ctx.get_parameter_source(name) in (click.core.ParameterSource.DEFAULT, None)


def _cube_side(kind, resolution, volume_size):
    """For volumes, an explicit --resolution is the cube side (as --volume-size); both, differing, are refused."""
    ctx = click.get_current_context(silent=True)
    if kind != 'volumes' or ctx is None:
        return resolution, volume_size
    given = {name: ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)
             for name in ('resolution', 'volume_size')}
    if given['resolution'] and given['volume_size'] and resolution != volume_size:
        raise click.UsageError(f'--kind volumes: --resolution {resolution} and --volume-size {volume_size} disagree; '
                               f'give one of them (the cube side)')
    if given['resolution']:
        volume_size = resolution
    return resolution, volume_size


if __name__ == '__main__':
    dnnlib.run_cli(main)
