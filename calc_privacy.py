"""Privacy checks of a trained generator: the membership signal of projection, and the privacy gate's report for a
folder of generated samples (docs/privacy.md).

Membership (``--held-out``): a generator that memorised its training patients reproduces them better than patients
it never saw. ``--num`` training items and ``--num`` held-out items (another archive of cases not trained on, or
``val``: the training archive's own held-out cases) are each projected into W (projector.py) and their
reconstruction SSIM and MSE inside the brain compared. The attack "member if the reconstruction SSIM is high" is
scored by its AUC (0.5: no signal; 1: every training item reconstructs better than every held-out one), after
Webster et al. ("Detecting Overfitting of Deep Generative Networks via Latent Recovery", CVPR 2019). Results:
``membership.json`` (per item and summary) and a table on stdout.

Samples (``--samples DIR``): every ``.npy`` sample in DIR ([C, *spatial], as ``generate.py --format npy`` writes it:
float in [-1, 1], or uint8/uint16) goes through metrics.privacy.PrivacyGate against the training archive, which
writes ``privacy-report.json`` and ``privacy-pairs.png``; with ``--max-nn-ssim`` the report lists which samples the
gate would drop (the files are left alone).

  python calc_privacy.py --network runs/00000-x --held-out heldout.zip --num 50 --num-steps 500 --outdir privacy
  python calc_privacy.py --network runs/00000-x --held-out val --outdir privacy     # the archive's val cases
  python calc_privacy.py --network runs/00000-x --samples out --max-nn-ssim 0.9 --outdir privacy
"""

import glob
import json
import os

import dnnlib

if __name__ == '__main__':  # Before the heavy imports: Ctrl-C or SIGTERM while they load is one line, exit 130/143.
    dnnlib.exit_on_interrupt()  # (Run as a script only: importing this module changes no handler.)

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import projector  # noqa: E402
from training.cli import PATH  # noqa: E402

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class PrivacyRunError(ValueError):
    """Inputs the privacy checks cannot use; the message names the file or option and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Membership


def attack_auc(members, others) -> float:
    """AUC of scoring members above others (Mann-Whitney U / (m n); ties count half)."""
    a, b = np.asarray(members, np.float64), np.asarray(others, np.float64)
    if a.size == 0 or b.size == 0:
        return float('nan')
    greater = (a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()
    return float(greater / (a.size * b.size))


def _open_archive(path, subset='all', what='--data'):
    from training.dataset import DatasetError, ImageFolderDataset
    if not path or not os.path.exists(path):
        raise PrivacyRunError(f'{what} {path}: archive not found')
    try:
        return ImageFolderDataset(path, subset=subset, use_labels=True)
    except DatasetError as err:
        raise PrivacyRunError(str(err)) from None


def pick_items(ds, num: int, seed: int) -> list:
    """``num`` item indices, from as many different cases as the archive has (random, seeded)."""
    order = np.random.RandomState(seed).permutation(len(ds))
    seen, first, rest = set(), [], []
    for i in order:
        case = ds.file_case(int(i)) or f'#{i}'
        (rest if case in seen else first).append(int(i))
        seen.add(case)
    return (first + rest)[:num]


def _check_archive(ds, G, names, path):
    """One line when an archive's image channels, shape or labels do not fit the generator."""
    image_names = [names[i] for i in projector.image_channel_indices(names)]
    theirs = [ds.channels[i] for i in projector.image_channel_indices(ds.channels)]
    if theirs != image_names:
        raise PrivacyRunError(f'{path}: image channels {theirs} differ from the generator\'s {image_names}')
    if list(ds.image_shape[1:]) != list(G.img_shape):
        raise PrivacyRunError(f'{path}: items of shape {list(ds.image_shape[1:])} differ from the generator\'s '
                              f'{list(G.img_shape)}')
    if G.c_dim and ds.label_dim != G.c_dim:
        raise PrivacyRunError(f'{path}: labels of {ds.label_dim} entries, but the generator is conditioned on {G.c_dim}')


def _items(ds, indices, names, group):
    for i in indices:
        image, label = ds[i]
        image = image.astype(np.float32) / ds.dtype_max * 2 - 1
        info = dict(group=group, name=ds.image_fname(i), case=ds.file_case(i))
        yield info, projector.fit_channels(image, names, ds.path), label


def _quantiles(values) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {}
    return {'mean': float(v.mean()), **{f'q{int(q * 100):02d}': float(np.quantile(v, q)) for q in QUANTILES}}


def membership(
    G, desc,                        # generator and its dataset description
    data: str,                      # training archive
    held_out: str,                  # another archive of cases not trained on, or 'val'
    num: int = 16,                  # items projected per group
    num_steps: int = 300,           # projection steps per item
    seed: int = 0,
    device='cpu',
    verbose: bool = True,
    done=(),                        # items of an earlier run of the same job (membership.json): not projected again
    on_item=None,                   # callback(results so far) after each item (calc_privacy.py saves them)
) -> dict:
    """Projects ``num`` training and ``num`` held-out items; returns ``{'items': [...], 'summary': {...}}``. An
    interruption (Ctrl-C, SIGTERM) ends it early with the items done (``summary.complete`` false). Each item's
    projection is seeded by its place in the list, so items taken from ``done`` are those a run never stopped
    would compute, and a resumed run ends with the same results."""
    names = projector.channel_names(G, desc)
    idx = projector.image_channel_indices(names)
    if held_out == 'val' and desc.get('subset') != 'train':
        raise PrivacyRunError(f'--held-out val: this generator was trained on the {desc.get("subset") or "all"} items of '
                              f'{data}, so its val cases are not held out; pass an archive of cases it never saw')
    train_subset = 'train' if desc.get('subset') == 'train' else 'all'
    train = _open_archive(data, train_subset)
    if held_out == 'val':
        held = _open_archive(data, 'val', '--held-out val:')
    else:
        held = _open_archive(held_out, 'all', '--held-out')
    for ds in (train, held):
        _check_archive(ds, G, names, ds.path)
    todo = list(_items(train, pick_items(train, num, seed), names, 'train'))
    todo += list(_items(held, pick_items(held, num, seed + 1), names, 'held-out'))
    from training.sampling import ClassAverages
    averages = ClassAverages()
    results, complete = [], True
    earlier = {(r['group'], r['name']): r for r in done}
    bar = dnnlib.ProgressBar(len(todo) * num_steps, desc='membership', unit='step', enabled=verbose)
    try:
        for k, (info, image, label) in enumerate(todo):
            if (info['group'], info['name']) in earlier:
                results.append(earlier[(info['group'], info['name'])])
                bar.update(num_steps, tail=f'{info["name"]}  done before')
                continue
            c = np.asarray(label, np.float32) if G.c_dim else np.zeros([0], np.float32)
            step = lambda s, d, ss, m, name=info['name']: bar.update(1, tail=f'{name}  SSIM {ss:.3f}')  # noqa: E731
            r = projector.project(G, image, idx, c, num_steps, seed + k, device, on_step=step, averages=averages)
            if r.interrupted:
                raise KeyboardInterrupt
            results.append(dict(info, ssim=r.ssim, mse=r.mse, steps=r.steps))
            if on_item is not None:
                on_item(results)
    except KeyboardInterrupt:
        complete = False
    finally:
        bar.close()
    return dict(items=results, summary=_membership_summary(results, num_steps, complete, data, held_out))


def _membership_summary(results, num_steps, complete, data, held_out) -> dict:
    groups = {g: [r for r in results if r['group'] == g] for g in ('train', 'held-out')}
    ssim = {g: [r['ssim'] for r in rs] for g, rs in groups.items()}
    mse = {g: [r['mse'] for r in rs] for g, rs in groups.items()}
    return dict(complete=complete, data=os.path.abspath(data), held_out=held_out, num_steps=num_steps,
                counts={g: len(rs) for g, rs in groups.items()},
                ssim={g: _quantiles(v) for g, v in ssim.items()}, mse={g: _quantiles(v) for g, v in mse.items()},
                auc_ssim=attack_auc(ssim['train'], ssim['held-out']),
                auc_mse=attack_auc([-v for v in mse['train']], [-v for v in mse['held-out']]))


def membership_table(summary: dict) -> str:
    lines = [f'{"group":10} {"n":>4} {"SSIM median":>12} {"SSIM mean":>10} {"MSE median":>11} {"MSE mean":>10}']
    for g in ('train', 'held-out'):
        s, m = summary['ssim'].get(g, {}), summary['mse'].get(g, {})
        nan = float('nan')
        lines.append(f'{g:10} {summary["counts"][g]:4d} {s.get("q50", nan):12.4f} {s.get("mean", nan):10.4f} '
                     f'{m.get("q50", nan):11.5f} {m.get("mean", nan):10.5f}')
    lines.append(f'membership attack AUC: {summary["auc_ssim"]:.3f} by SSIM, {summary["auc_mse"]:.3f} by MSE '
                 f'(0.5 = no signal, 1 = every training item reconstructs better)')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Samples


def _sample_channels(array, archive_channels, path):
    if array.shape[0] == len(archive_channels):
        return archive_channels
    image = [archive_channels[i] for i in projector.image_channel_indices(archive_channels)]
    if array.shape[0] == len(image):
        return image
    raise PrivacyRunError(f'{path}: {array.shape[0]} channels, but the training archive has {len(archive_channels)} '
                          f'({", ".join(archive_channels)}), {len(image)} of them image channels')


def samples_report(samples: str, data: str, outdir: str, max_nn_ssim=None, device='cpu', verbose=True) -> dict:
    """The privacy gate over every .npy in ``samples``; writes its report into ``outdir``; returns the summary."""
    from metrics.privacy import PrivacyGate
    files = sorted(glob.glob(os.path.join(samples, '**', '*.npy'), recursive=True))
    files = [f for f in files if os.path.basename(f) not in ('proj.npy', 'target.npy')]
    if not files:
        raise PrivacyRunError(f'--samples {samples}: no .npy samples (write them with generate.py --format npy)')
    gate = PrivacyGate(data, max_nn_ssim=max_nn_ssim, device=device, verbose=verbose)
    with dnnlib.ProgressBar(len(files), desc='privacy gate', unit='sample', enabled=verbose) as bar:
        for path in files:
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise PrivacyRunError(f'{path}: unreadable sample ({err})') from None
            if array.dtype in (np.uint8, np.uint16):
                array = array.astype(np.float32) / np.iinfo(array.dtype).max * 2 - 1
            names = _sample_channels(array, gate.pool.channels, path)
            gate.check(array.astype(np.float32), names, os.path.relpath(path, samples))
            bar.update(1)
    gate.report(outdir)
    return gate.summary()


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _membership_job(G, desc, network, data, held_out, num, num_steps, seed, device, outdir) -> dict:
    """calc_privacy.py --held-out: the membership run, saved to OUTDIR/membership.json after every item, so a run
    stopped any way (Ctrl-C, SIGTERM, a kill) continues where it stopped when started again with the same
    settings; a membership.json of other settings is started over."""
    path = os.path.join(outdir, 'membership.json')
    job = dict(network_sha256=dnnlib.util.sha256_file(projector.resolve_network(network)), data=os.path.abspath(data),
               held_out=held_out if held_out == 'val' else os.path.abspath(held_out), num=num, num_steps=num_steps,
               seed=seed)
    done = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = {}
        if earlier.get('job') == job:
            done = earlier.get('items') or []
            click.echo(f'Resuming {path}: {len(done)} of {2 * num} items done')
        else:
            click.echo(f'{path} was made with other settings; starting over')

    def save(results, complete=False):  # the folder is made with the first result: a refused run leaves none
        os.makedirs(outdir, exist_ok=True)
        summary = _membership_summary(results, num_steps, complete, data, held_out)
        _write_json(path, dict(job=job, items=list(results), summary=summary))
    result = membership(G, desc, data, held_out, num, num_steps, seed, device, done=done, on_item=save)
    result['job'] = job
    os.makedirs(outdir, exist_ok=True)
    _write_json(path, result)
    return result


def _write_json(path, data):
    with dnnlib.atomic_output(path, suffix='.json') as tmp:
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=1)


@click.command()
@click.option('--network', 'network',   help='Snapshot .pt, NVlabs .pkl, or run dir (newest snapshot)', metavar='PATH', type=PATH, required=True)
@click.option('--data',                 help='Training archive [default: the snapshot\'s]', metavar='PATH', type=PATH)
@click.option('--held-out', 'held_out', help='Membership: archive of cases not trained on, or val (the training archive\'s val cases)', metavar='PATH|val', type=str)
@click.option('--num',                  help='Membership: items projected per group', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--num-steps',            help='Membership: projection steps per item', metavar='INT', type=click.IntRange(min=1), default=300, show_default=True)
@click.option('--samples',              help='Privacy report for the .npy samples in this folder', metavar='DIR', type=PATH)
@click.option('--max-nn-ssim',          help='Samples: report those whose nearest-neighbour SSIM is above it as dropped', metavar='FLOAT', type=click.FloatRange(-1, 1))
@click.option('--seed',                 help='Seed of the item choice and projections', metavar='INT', type=int, default=0, show_default=True)
@click.option('--outdir',               help='Where to write membership.json / privacy-report.json, privacy-pairs.png', metavar='DIR', type=PATH, required=True)
@click.option('--device',               help='Device [default: cuda if available]', type=click.Choice(['cuda', 'cpu']))
@dnnlib.sigterm_as_interrupt()  # SIGTERM stops it like Ctrl-C (also run in-process); the caller's handler is restored
def main(network, data, held_out, num, num_steps, samples, max_nn_ssim, seed, outdir, device):
    """Privacy checks: how much better the generator reproduces training cases than held-out ones (--held-out), and
    the privacy gate's report for a folder of generated samples (--samples). docs/privacy.md."""
    from metrics.metric_utils import MetricError
    from torch_utils.snapshot import SnapshotError
    if held_out is None and samples is None:
        raise click.UsageError('give --held-out (membership signal) or --samples (privacy report), or both')
    if samples is not None and not os.path.isdir(samples):
        raise click.BadParameter(f'{samples}: no such folder', param_hint='--samples')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.BadParameter(f'{outdir} exists and is not a folder', param_hint='--outdir')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        G, desc = projector.load_generator(network, device)
        data = data or desc.get('path')
        if samples is not None:
            summary = samples_report(samples, data, outdir, max_nn_ssim, device)
            click.echo(f'privacy gate: {summary["checked"]} samples, {summary["dropped"]} above --max-nn-ssim; '
                       f'nearest-neighbour SSIM median {summary["nn_ssim"].get("q50", float("nan")):.4f}; wrote '
                       f'{os.path.join(outdir, "privacy-report.json")}')
        if held_out is not None:
            result = _membership_job(G, desc, network, data, held_out, num, num_steps, seed, device, outdir)
            click.echo(membership_table(result['summary']))
            if not result['summary']['complete']:
                dnnlib.exit_interrupted(f'membership.json holds the {len(result["items"])} items done', newline=False)
    except (PrivacyRunError, projector.ProjectorError, SnapshotError, MetricError) as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        dnnlib.exit_interrupted()


if __name__ == '__main__':
    dnnlib.run_cli(main)  # pylint: disable=no-value-for-parameter
