"""The painting job behind `generate.py --insert-into` (insert, --heal, --move): cases in, BraTS case folders out.

For every source case and every seed, one output case `BraTS-SYN-<case number>-<seed>` (mri.output.cases): the case
number is the source case's place in the sorted list of cases (the sidecar and painting-summary.json name the source),
the seed fixes everything random about it (shapes, transforms, positions, latents: a numpy Generator seeded with
the seed and the source case id). A finished case is skipped by a rerun. Cases where nothing could be done (no
tumour fitted, no tumour to heal) are reported and get no folder; the job fails (`PaintJobError`) only when nothing
at all could be done, or on bad input, which is found before anything is written where it can be.
"""

import dataclasses
import json
import os
import sys
import time
import zlib

import numpy as np

import dnnlib
from mri.output import cases as case_output
from mri.painting import insert as paint
from mri.painting.label_sources import LabelSourceError, NiftiSource, open_label_source, read_archive_meta
from mri.sources import brats

SUMMARY = 'painting-summary.json'


class PaintJobError(ValueError):
    """A painting job that cannot run or did nothing; one line."""


@dataclasses.dataclass
class PaintOptions:
    mode: str = 'insert'            # 'insert', 'heal' or 'move'
    per_case: int = 1               # new tumours per case (insert)
    seeds: tuple = (0,)             # one output case per seed and source case; 0-999 (the -yyy of the name)
    tries: int = 10                 # shapes tried per tumour
    dilation: int = 3               # voxels of rim repainted around a tumour (as the model was trained)
    edge: int = 3                   # voxels between a repaint region and the brain's edge
    margin: int = 3                 # voxels between a repaint region and any tumour or other region
    as_drawn: bool = False          # a NIfTI label source is painted where it was drawn
    transform: bool = True          # random flips, turns, rotations and scales of the shapes
    scale: tuple = (0.8, 1.25)      # range of the random scale of a shape
    montage: bool = True
    balance_sizes: bool = False     # tumour sizes in turn: seed k paints with the (k mod 3)-th third of `scale`


SIZE_BINS = ('small', 'medium', 'large')


def size_bin_scale(scale, seed):
    """(bin name, scale range) of a seed under balance_sizes: the thirds of `scale` (geometric, so each third
    grows a shape by the same factor) taken in turn, so small, medium and large tumours come in equal numbers (+-1)."""
    lo, hi = float(scale[0]), float(scale[1])
    k = int(seed) % len(SIZE_BINS)
    edges = [lo * (hi / lo) ** (i / len(SIZE_BINS)) for i in range(len(SIZE_BINS) + 1)]
    return SIZE_BINS[k], (edges[k], edges[k + 1])


def find_cases(spec):
    """The CaseFiles of --insert-into: a folder of BraTS cases, or an archive of this project (its cases, read from
    the folder it was converted from)."""
    path = os.path.expanduser(str(spec))
    if not os.path.exists(path):
        raise PaintJobError(f'{path}: no such folder or archive (--insert-into)')
    meta = read_archive_meta(path) if os.path.isdir(path) or path.endswith('.zip') else None
    if meta is None and not os.path.isdir(path):
        raise PaintJobError(f'{path}: not a folder of BraTS cases nor an archive with dataset.json (--insert-into)')
    try:
        if meta is None:
            return brats.discover_cases(path)
        folder = (meta.get('source') or {}).get('path')
        ids = set(meta.get('cases') or {})
        if not folder or not os.path.isdir(folder):
            raise PaintJobError(f'{path}: the archive was converted from {folder or "an unrecorded folder"}, which is '
                                f'not there; pass that folder of BraTS cases to --insert-into')
        found = [c for c in brats.discover_cases(folder) if not ids or c.case_id in ids]
        if not found:
            raise PaintJobError(f'{path}: none of its cases is in {folder}')
        return found
    except brats.BratsError as err:
        raise PaintJobError(str(err)) from None


def load_painter(network, device, class_spec=None, dilation=3, noise_mode='const', truncation_psi=1):
    """(Painter, snapshot description) of a paint snapshot; one line for any other kind."""
    from torch_utils import snapshot
    data, G = snapshot.load_generator(network, device=device)
    try:
        painter = paint.Painter(G, device, noise_mode, truncation_psi, dilation, data.dataset, class_spec, name=network)
    except paint.PaintError as err:
        raise PaintJobError(str(err)) from None
    missing = [m for m in brats.MODALITIES if m not in painter.paint_channels]
    if missing:
        raise PaintJobError(f'{network}: paints {", ".join(painter.paint_channels)} but not {", ".join(missing)}; a '
                            f'painted BraTS case needs all four (dataset_tool.py --kind patches --modalities all)')
    return painter, dict(data.dataset or {})


def _rng(seed, case_id):
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])


def _check_existing(outdir, out_id, case_id):
    with open(case_output.sidecar_path(os.path.join(outdir, out_id), out_id)) as f:
        source = json.load(f).get('source_case')
    if source != case_id:
        raise PaintJobError(f'{os.path.join(outdir, out_id)}: holds a painting of {source}, not {case_id}: the list '
                            f'of cases changed since it was written; use another --outdir')


def paint_cases(
    network,                # paint snapshot path
    cases_spec,             # --insert-into: BraTS folder or archive
    outdir,                 # output folder
    labels_from=None,       # --labels-from (insert): label source spec
    opts=None,              # PaintOptions
    class_spec=None,        # --class
    device=None,            # None = cuda when available
    noise_mode='const',
    truncation_psi=1,
    verbose=True,
    rank=0,                 # torchrun: this process paints jobs rank, rank + world_size, ... of (case, seed)
    world_size=1,
) -> dict:
    """Runs the job; returns the summary (also written to outdir/painting-summary.json, per process under
    torchrun: painting-summary-rank<r>.json)."""
    import torch
    from dnnlib.util import sha256_file
    from mri.sources.patches import load_native
    opts = opts or PaintOptions()
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if opts.mode not in ('insert', 'heal', 'move'):
        raise PaintJobError(f'unknown painting mode {opts.mode!r}')
    bad = [s for s in opts.seeds if not 0 <= int(s) <= 999]
    if bad:
        raise PaintJobError(f'--seeds {bad[0]}: painting seeds name the case variant (BraTS-SYN-xxxxx-yyy): use 0-999')
    painter, desc = load_painter(network, device, class_spec, opts.dilation, noise_mode, truncation_psi)
    source = None
    if opts.mode == 'insert':
        if not labels_from:
            raise PaintJobError('--insert-into: pass --labels-from (BraTS cases, an archive, a joint snapshot or a '
                                'NIfTI label map), or --heal / --move')
        try:
            source = open_label_source(labels_from, painter.ndim, device)
        except LabelSourceError as err:
            raise PaintJobError(str(err)) from None
        if opts.as_drawn and not isinstance(source, NiftiSource):
            raise PaintJobError(f'--labels-as-drawn: {labels_from} is not a NIfTI label map')
    case_files = find_cases(cases_spec)
    norm = desc.get('normalization') or {}
    snapshot_record = {'path': os.path.abspath(network), 'sha256': sha256_file(network)}
    jobs = [(n, cf, seed) for n, cf in enumerate(case_files) for seed in opts.seeds][rank::world_size]
    summary = {'outdir': os.path.abspath(outdir), 'snapshot': snapshot_record, 'mode': opts.mode,
               'label_source': source.describe() if source else None, 'cases': [], 'placed': 0, 'not_placed': 0,
               'healed': 0, 'skipped_done': 0, 'no_output': 0}
    bar = dnnlib.ProgressBar(len(jobs), desc='Painting', unit='cases', enabled=verbose)
    t0 = time.time()
    loaded = (None, None)
    for k, (number, cf, seed) in enumerate(jobs):
        out_id = case_output.synthetic_case_id(number, seed)
        entry = {'case': out_id, 'source_case': cf.case_id, 'seed': int(seed)}
        if case_output.case_done(outdir, out_id):
            _check_existing(outdir, out_id, cf.case_id)
            summary['skipped_done'] += 1
            summary['cases'].append(dict(entry, status='already done'))
            bar.update(done=k + 1, tail=f'{out_id} already done')
            continue
        try:
            if loaded[0] != cf.case_id:
                loaded = (cf.case_id, load_native(cf, brats.MODALITIES, norm.get('method', 'percentile'),
                                                  norm.get('low', 0.5), norm.get('high', 99.5)))
            native = loaded[1]
            rng = _rng(seed, cf.case_id)
            if opts.mode == 'heal':
                result = paint.heal_case(painter, native, rng)
            elif opts.mode == 'move':
                result = paint.move_tumour(painter, native, rng, tries=opts.tries, edge=opts.edge, margin=opts.margin)
            elif opts.as_drawn:
                result = paint.insert_drawn(painter, native, source, rng, margin=opts.margin)
            else:
                scale = size_bin_scale(opts.scale, seed)[1] if opts.balance_sizes else tuple(opts.scale)
                result = paint.insert_tumours(painter, native, source, opts.per_case, rng, tries=opts.tries,
                                              edge=opts.edge, margin=opts.margin, transform=opts.transform,
                                              scale=scale)
        except (brats.BratsError, LabelSourceError, paint.PaintError) as err:
            bar.close()
            raise PaintJobError(str(err)) from None
        placed = len(result.placements)
        summary['placed'] += placed
        summary['not_placed'] += sum(1 for f in result.failures if ' not placed' in f or ' not painted' in f)
        summary['healed'] += int(bool(result.healed and result.healed.get('voxels')))
        entry.update(placed=placed, failures=result.failures)
        if result.changed and (opts.mode != 'move' or placed):
            sidecar = {'source_case': cf.case_id, 'source_files': {m: str(p) for m, p in cf.files.items()},
                       'source_seg': str(cf.seg) if cf.seg else None, 'snapshot': snapshot_record, 'seed': int(seed),
                       'mode': opts.mode, 'label_source': source.describe() if source else None,
                       'painter': painter.describe(), 'class': class_spec,
                       'options': {k: v for k, v in dataclasses.asdict(opts).items() if k not in ('seeds', 'montage')}}
            if opts.balance_sizes and opts.mode == 'insert' and not opts.as_drawn:
                sidecar['size_bin'] = size_bin_scale(opts.scale, seed)[0]
            case_output.write_case(outdir, out_id, native, result, sidecar, opts.montage)
            entry['status'] = 'written'
        else:
            summary['no_output'] += 1
            entry['status'] = 'nothing painted'
        summary['cases'].append(entry)
        bar.update(done=k + 1, tail=f'{out_id} <- {cf.case_id}: {placed} placed' if opts.mode != 'heal' else
                   f'{out_id} <- {cf.case_id}')
    bar.close()
    summary['seconds'] = round(time.time() - t0, 2)
    # --move counts as done only where the tumour landed again (a case healed but not moved gets no folder)
    did = summary['placed'] + (summary['healed'] if opts.mode == 'heal' else 0) + summary['skipped_done']
    if jobs and not did:
        first = next((f for c in summary['cases'] for f in c.get('failures', [])), 'no reason recorded')
        raise PaintJobError(f'nothing could be painted in {len(jobs)} case(s); first: {first}')
    os.makedirs(outdir, exist_ok=True)
    name = SUMMARY if world_size == 1 else SUMMARY.replace('.json', f'-rank{rank}.json')
    with dnnlib.atomic_output(os.path.join(outdir, name), suffix='.json') as tmp:
        with open(tmp, 'w') as f:
            json.dump(summary, f, indent=1)
    if verbose:
        print_summary(summary)
    return summary


def print_summary(summary, stream=None):
    stream = stream or sys.stdout
    written = sum(1 for c in summary['cases'] if c.get('status') == 'written')
    line = f'{written} case(s) written to {summary["outdir"]}'
    if summary['mode'] != 'heal':
        line += f': {summary["placed"]} tumour(s) placed, {summary["not_placed"]} not placed'
    if summary['healed']:
        line += f', {summary["healed"]} healed'
    if summary['skipped_done']:
        line += f'; {summary["skipped_done"]} already done'
    print(line, file=stream)
    for c in summary['cases']:
        for f in c.get('failures', []):
            print(f'  {c["source_case"]} (seed {c["seed"]}): {f}', file=stream)
