"""BraTS cases -> a labelled slice or volume archive for training (the engine behind dataset_tool.py).

One function, `convert_brats`, runs discovery, per-case loading/validation/preprocessing (mri.sources.brats,
mri.sources.preprocess) in worker processes, and the atomic archive writer (mri.sources.archive). Slices are labelled with their
plane (one-hot group "plane"), optionally by modality, tumour presence and per-case CSV metadata, so a conditional
StyleGAN2-ADA generator (Karras et al., NeurIPS 2020) can be asked for e.g. an axial T2w slice with tumour.
Volumes are cubes with the affine of their grid, for 3D generators and NIfTI export (mri.output.nifti).
"""

import contextlib
import csv
import dataclasses
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import dnnlib
from mri.sources import archive, brats, cohort, patches, preprocess
from mri import volume_space
from mri.seg import SEG_CHANNELS, SEG_STORAGE

TUMOUR_VALUES = ('tumour', 'no_tumour')


class ConversionError(ValueError):
    """A conversion cannot proceed (bad options, nothing converted); one line."""


@dataclasses.dataclass
class ConvertOptions:
    kind: str = 'slices'                    # 'slices', 'volumes' or 'patches' (mri.sources.patches)
    planes: tuple = preprocess.PLANES       # slice planes, a subset of axial, coronal, sagittal
    resolution: int = 256                   # slice side in pixels
    volume_size: int = 128                  # volume cube side in voxels
    modalities: tuple = ('t2w',)            # channels (or, with labels 'modality', one image per modality)
    with_seg: bool = False                  # add seg_netc, seg_snfh, seg_et channels
    labels: tuple = ()                      # extra label groups: 'modality', 'tumour', 'cohort[=a,b]' or CSV paths
    normalize: str = 'percentile'           # 'percentile' or 'minmax'
    low: float = 0.5                        # percentiles for normalize='percentile'
    high: float = 99.5
    denoise: float = None                   # Gaussian sigma in input voxels, None = off
    bit_depth: int = 16                     # 8 or 16
    min_brain_fraction: float = 0.1         # skip slices whose brain covers less of the square slice
    split: dict = dataclasses.field(default_factory=dict)  # {'val': 0.1, ...}; the rest is 'train'
    split_seed: int = 0
    max_cases: int = None                   # None = all
    workers: int = 1                        # processes
    on_error: str = 'fail'                  # 'fail' or 'skip'
    compress_level: int = 0                 # PNG deflate: 0 stored (fastest), 1 fast RLE, 2-9 zlib; deflated .npy's level
    codec: str = None                       # form of .npy members: blosc2, deflate (at compress_level, 1 if 0), stored;
                                            # None = blosc2 in a zip, stored in a folder (files np.load opens)
    overwrite: bool = False                 # replace an existing --dest
    patch_size: tuple = (64, 64, 64)        # patches: 3 sides = 3D (x, y, z), 2 = 2D crops (H, W) in `planes`
    patches_per_case: int = 8               # patches: tumour patches per case (2D: per case and plane)
    healthy_per_case: int = None            # patches: healthy patches per case, None = patches_per_case
    seed: int = 0                           # patches: seed of the patch centres (per case with its id)

    def validate(self):
        if self.codec is not None and self.codec not in archive.NPY_CODECS:
            raise ConversionError(f'--codec must be one of {", ".join(archive.NPY_CODECS)}, got {self.codec!r}')
        if self.kind not in ('slices', 'volumes', 'patches'):
            raise ConversionError(f'--kind must be slices, volumes or patches, got {self.kind!r}')
        problem = patches.check_options(self) if self.kind == 'patches' else None
        if problem:
            raise ConversionError(problem)
        bad = [p for p in self.planes if p not in preprocess.PLANES]
        if bad or not self.planes:
            raise ConversionError(f'--planes must be a non-empty subset of {",".join(preprocess.PLANES)}, got {",".join(self.planes)}')
        bad = [m for m in self.modalities if m not in brats.MODALITIES]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConversionError(f'--modalities must be distinct names from {",".join(brats.MODALITIES)} (or all), got {",".join(self.modalities)}')
        if self.bit_depth not in (8, 16):
            raise ConversionError(f'--bit-depth must be 8 or 16, got {self.bit_depth}')
        if not 0 <= self.low < self.high <= 100:
            raise ConversionError(f'percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}')
        if sum(self.split.values()) >= 1 or any(f < 0 for f in self.split.values()) or 'train' in self.split:
            raise ConversionError(f'--split fractions must be >= 0, sum below 1 and not name train, got {self.split}')
        for spec in self.labels:
            if cohort.is_cohort_spec(spec):
                try:
                    cohort.parse_spec(spec)
                except cohort.CohortError as e:
                    raise ConversionError(str(e)) from None
        if self.on_error not in ('fail', 'skip'):
            raise ConversionError(f'--on-error must be fail or skip, got {self.on_error!r}')
        for size, name in ((self.resolution, '--resolution'), (self.volume_size, '--volume-size')):
            if size < 4:
                raise ConversionError(f'{name} must be at least 4, got {size}')


# ---------------------------------------------------------------------------------------------------------------
# Label groups


def read_label_csv(path):
    """Per-case metadata: {'groups': {column: [values]}, 'cases': {case_id: {column: value}}}."""
    path = Path(path)
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise brats.BratsError(path, f'cannot read the label CSV ({e})') from None
    if not rows or 'case_id' not in rows[0] or len(rows[0]) < 2:
        raise brats.BratsError(path, 'a label CSV needs a header with case_id and at least one more column')
    columns = [c for c in rows[0] if c != 'case_id']
    cases = {}
    for i, row in enumerate(rows, start=2):
        cid = (row.get('case_id') or '').strip()
        if not cid:
            raise brats.BratsError(path, f'line {i}: empty case_id')
        if cid in cases:
            raise brats.BratsError(path, f'line {i}: case {cid} appears twice')
        values = {c: (row.get(c) or '').strip() for c in columns}
        empty = [c for c, v in values.items() if not v]
        if empty:
            raise brats.BratsError(path, f'line {i}: case {cid} has no value for {",".join(empty)}')
        cases[cid] = values
    groups = {c: sorted({v[c] for v in cases.values()}) for c in columns}
    return {'path': str(path), 'groups': groups, 'cases': cases}


def build_groups(opts, csvs, cohorts=None):
    """The label groups in order (plane first): list of {'name', 'values'}; values are unique label names.
    `cohorts`: the values of the cohort group (mri.sources.cohort.cohort_values), for --labels cohort."""
    groups = []
    if opts.kind == 'slices' or (opts.kind == 'patches' and len(opts.patch_size) == 2):
        groups.append({'name': 'plane', 'values': [p for p in preprocess.PLANES if p in opts.planes]})
    for spec in opts.labels:
        if spec == 'modality':
            groups.append({'name': 'modality', 'values': list(opts.modalities)})
        elif spec == 'tumour':
            groups.append({'name': 'tumour', 'values': list(TUMOUR_VALUES)})
        elif cohort.is_cohort_spec(spec):
            groups.append({'name': 'cohort', 'values': list(cohorts)})
    taken = {v for g in groups for v in g['values']}
    for table in csvs:
        for column, values in table['groups'].items():
            if any(g['name'] == column for g in groups):
                raise brats.BratsError(table['path'], f'column {column} duplicates an existing label group')
            # A value that would be ambiguous in label_names (e.g. 'yes' in two columns) is qualified as column=value.
            if taken & set(values) or len(values) != len(set(values)):
                values = [f'{column}={v}' for v in values]
            taken |= set(values)
            groups.append({'name': column, 'values': values, 'csv': table['path']})
    return groups


def label_vector(groups, assignment):
    """Concatenated one-hot vector from {group name: value name}."""
    vec = []
    for g in groups:
        onehot = [0.0] * len(g['values'])
        onehot[g['values'].index(assignment[g['name']])] = 1.0
        vec += onehot
    return vec


def assign_split(case_ids, split, seed):
    """Case-level split: a seeded shuffle of the sorted ids, the first round(f * N) to each named subset."""
    ids = sorted(case_ids)
    order = np.random.RandomState(seed).permutation(len(ids))
    result = {cid: 'train' for cid in ids}
    pos = 0
    for name, frac in split.items():
        count = int(round(frac * len(ids)))
        for i in order[pos:pos + count]:
            result[ids[i]] = name
        pos += count
    return result


# ---------------------------------------------------------------------------------------------------------------
# One case (runs in a worker process)


def _case_assignment(case_id, groups):
    """Group values of a case that come from the CSVs."""
    out = {}
    for g in groups:
        table = g.get('csv')
        if table is None:
            continue
        row = _CSV_ROWS[table].get(case_id)
        if row is None:
            raise brats.BratsError(table, f'no row for case {case_id}', case_id)
        raw = row[g['name']]
        out[g['name']] = raw if raw in g['values'] else f"{g['name']}={raw}"
    return out


_CSV_ROWS = {}  # csv path -> {case_id: row}; set in each process by _init_worker


def _init_worker(csv_rows):
    # A forked worker inherits the parent's Python signal handlers; it should have none. SIGTERM (Pool.terminate, at
    # the end of every conversion) must kill it even while it waits on the task queue's lock: with a Python handler
    # that is up to the interpreter, and a worker once outlived terminate() and hung the parent's join forever.
    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates the pool), so a worker
    # prints no traceback of its own.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_csv_rows(csv_rows)


def _set_csv_rows(csv_rows):
    _CSV_ROWS.clear()
    _CSV_ROWS.update(csv_rows)


def convert_case(case_files, opts, groups, threads=None, loading=None):
    """Loads, validates and converts one case. Returns a dict with 'entries' [(relpath, bytes-like, CRC-32 or None,
    deflated size or None)],
    'labels' [(relpath, {group: value})] (one per entry, same order), 'affines', 'counts' and 'skipped_slices' per
    plane, 'ranges'. `loading`: a future of the brats.Case when the caller reads the files ahead."""
    cid = case_files.case_id
    need_seg = opts.with_seg or 'tumour' in opts.labels
    base = _case_assignment(cid, groups)
    if any(g['name'] == 'cohort' and 'csv' not in g for g in groups):
        base['cohort'] = cohort.cohort_of(cid)
    if loading is not None:
        case = loading.result()  # read ahead in a background thread (see _convert_in_process); raises its BratsError
    else:
        case = brats.load_case(case_files, load_seg=need_seg, threads=threads or 1)
    if opts.kind == 'patches':
        return patches.patch_case(case, opts, base)
    prep = preprocess.prepare_case(case, opts.modalities, opts.normalize, opts.low, opts.high, opts.denoise)
    native_grid = (next(iter(case.images.values())).shape, case.affine)  # for volumes: the way back (mri.volume_space)
    del case  # the full-size arrays are no longer needed
    vmax = (1 << opts.bit_depth) - 1
    dtype = np.uint8 if opts.bit_depth == 8 else np.uint16
    per_modality = 'modality' in opts.labels
    images = [(m, (m,)) for m in opts.modalities] if per_modality else [(None, tuple(opts.modalities))]
    result = {'case_id': cid, 'entries': [], 'labels': [], 'affines': {}, 'counts': {}, 'skipped_slices': {},
              'ranges': {m: list(r) for m, r in prep.ranges.items()}}

    if opts.kind == 'volumes':
        vols, seg = preprocess.extract_volume(prep, opts.volume_size)
        affine = preprocess.grid_affine(prep, opts.volume_size).tolist()
        for tag, mods in images:
            chans = [preprocess.quantize(vols[m], vmax, dtype) for m in mods]
            if opts.with_seg:
                chans.append(seg.astype(dtype))  # one label-map channel, values 0-3 (SEG_STORAGE)
            array = np.stack(chans)
            relpath = f'{cid}/{cid}-{tag}.npy' if tag else f'{cid}/{cid}.npy'
            assign = dict(base, **({'modality': tag} if tag else {}))
            if 'tumour' in opts.labels:
                assign['tumour'] = TUMOUR_VALUES[0] if seg.any() else TUMOUR_VALUES[1]
            result['entries'].append((relpath, *_npy_entry(array, opts)))
            result['labels'].append((relpath, assign))
            result['affines'][relpath] = affine
        result['counts']['volumes'] = len(images)
        result['native'] = volume_space.native_record(prep, *native_grid, opts.volume_size)
        return result

    png_only = len(images[0][1]) == 1 and not opts.with_seg
    stored = png_only and opts.compress_level == 0

    def chunk(plane, indices):
        """Entries and labels of the slices `indices` of `plane`: chunks run in parallel threads (numpy, scipy.sparse
        and zlib release the GIL), each resampling and encoding its slices in one go."""
        slices, seg = preprocess.extract_slices(prep, plane, opts.resolution, indices, gain=vmax if png_only else 1)
        tumour = seg.reshape(len(indices), -1).any(axis=1) if seg is not None else None
        axis = preprocess.PLANE_AXIS[plane]
        names = [f'{plane}-{int(i) + prep.start[axis]:03d}' for i in indices]  # index in the canonical scan
        out = []
        for tag, mods in images:
            entries, labels = [], []
            out.append((entries, labels))
            prefix = f'{cid}/{tag}-' if tag else f'{cid}/'
            crcs, sizes = [None] * len(names), [None] * len(names)
            if stored:
                data, crcs = archive.encode_stored_pngs(slices[mods[0]], opts.bit_depth, prescaled=True)
                ext = 'png'
            elif png_only:
                data = archive.encode_pngs(slices[mods[0]], opts.bit_depth, opts.compress_level, threads=1,
                                           prescaled=True)
                ext = 'png'
            else:
                chans = [preprocess.quantize(slices[m], vmax, dtype) for m in mods]
                if opts.with_seg:
                    chans.append(seg.astype(dtype))  # one label-map channel, values 0-3 (SEG_STORAGE)
                stack = np.stack(chans, axis=1)  # (n, C, H, W)
                data, crcs, sizes = zip(*[_npy_entry(s, opts) for s in stack])
                ext = 'npy'
            for k, name in enumerate(names):
                relpath = f'{prefix}{name}.{ext}'
                assign = dict(base, plane=plane, **({'modality': tag} if tag else {}))
                if tumour is not None and 'tumour' in opts.labels:
                    assign['tumour'] = TUMOUR_VALUES[0] if tumour[k] else TUMOUR_VALUES[1]
                entries.append((relpath, data[k], crcs[k], sizes[k]))
                labels.append((relpath, assign))
        return out  # per image tag

    # Work items: each plane's slices in `parts` contiguous runs, so that two threads stay busy with three planes.
    parts = 1 if (threads or 1) == 1 else 2 * threads
    jobs = []
    for plane in opts.planes:
        indices, frac = preprocess.slice_indices(prep, plane, opts.min_brain_fraction)
        result['skipped_slices'][plane] = int(np.count_nonzero(frac > 0) - len(indices))
        result['counts'][plane] = len(indices) * len(images)
        if len(indices):
            jobs += [(plane, run) for run in np.array_split(indices, min(parts, len(indices))) if len(run)]
    if (threads or 1) > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(lambda job: chunk(*job), jobs))
    else:
        done = [chunk(*job) for job in jobs]
    # Entries in a fixed order (plane, image tag, slice) however the slices were split: identical archives for any
    # thread and worker count.
    for plane in opts.planes:
        for t in range(len(images)):
            for (p, _), out in zip(jobs, done):
                if p == plane:
                    result['entries'] += out[t][0]
                    result['labels'] += out[t][1]
    return result


def _npy_entry(array, opts):
    """(data, CRC-32 or None, deflated size or None): an entry of `entries` after its relpath, in the form
    opts.codec."""
    entry = archive.npy_entry(array, opts.codec, opts.compress_level)
    return entry if len(entry) == 3 else (entry[0], None, None)


def _convert_safe(args, loading=None):
    """Worker entry: a bad case comes back as an error record instead of killing the pool.

    With a spool folder the encoded files go to one spool file per case and only their offsets travel back:
    pickling tens of MB of bytes through the pool's pipe costs more CPU than converting the case."""
    case_files, opts, groups, threads, spool = args
    try:
        result = convert_case(case_files, opts, groups, threads, **({'loading': loading} if loading else {}))
    except brats.BratsError as e:
        return {'case_id': case_files.case_id, 'error': str(e), 'file': e.path, 'problem': e.problem}
    if spool is not None:
        path = os.path.join(spool, f'{os.getpid()}-{case_files.case_id}.bin')
        index, offset = [], 0
        try:
            with open(path, 'wb') as f:
                for relpath, data, crc, size in result['entries']:
                    length = memoryview(data).nbytes
                    f.write(data)
                    index.append((relpath, offset, length, crc, size))
                    offset += length
        except OSError as e:  # Crosses the pool's pipe as one line, not as a worker's traceback.
            if dnnlib.disk_full_message(e) is not None:
                raise dnnlib.DiskFullError(path) from None
            raise archive.ArchiveError(f'{path}: cannot write the workers\' spool beside the archive '
                                       f'({e.strerror or e})') from None
        result['entries'] = None
        result['spool'] = (path, index)
    return result


def _convert_in_process(jobs):
    """Converts the jobs one after another in this process, reading the next case's files in a background thread
    while the current case is processed: inflating gzip releases the GIL, so with two or more cores the reading of
    case k + 1 overlaps the resampling, encoding and writing of case k. Yields what _convert_safe returns."""
    threads = jobs[0][3] if jobs else 1
    if threads < 2 or len(jobs) < 2:
        yield from map(_convert_safe, jobs)
        return

    def load(job):
        case_files, opts = job[0], job[1]
        need_seg = opts.with_seg or 'tumour' in opts.labels
        return brats.load_case(case_files, load_seg=need_seg, threads=threads)
    reader = ThreadPoolExecutor(1)
    try:
        ahead = reader.submit(load, jobs[0])
        for k, job in enumerate(jobs):
            loading, ahead = ahead, (reader.submit(load, jobs[k + 1]) if k + 1 < len(jobs) else None)
            yield _convert_safe(job, loading)
            del loading  # the case's arrays can go as soon as it is converted
    finally:
        if ahead is not None:
            ahead.cancel()
        reader.shutdown(wait=True)


def _entries(result):
    """Yields (relpath, bytes-like, CRC-32 or None, deflated size or None) of a case result; a spool file is read once
    and sliced without copies."""
    if result.get('spool') is None:
        yield from result['entries']
        return
    path, index = result['spool']
    try:
        with open(path, 'rb') as f:
            view = memoryview(f.read())
    finally:
        os.remove(path)
    for relpath, offset, length, crc, size in index:
        yield relpath, view[offset:offset + length], crc, size


# ---------------------------------------------------------------------------------------------------------------
# The whole conversion


def convert_brats(
    source,                 # folder of BraTS cases (any depth)
    dest,                   # .zip or folder
    opts=None,              # ConvertOptions
    progress=True,          # status line on stderr
    source_info=None,       # extra dict recorded in dataset.json "source"
):
    """Converts every case under `source` into the archive `dest`. Returns a summary dict.

    With on_error='fail' the first bad case raises BratsError (nothing is written); with 'skip' the bad cases are
    listed in the summary and in `skipped.json` beside the archive."""
    opts = opts or ConvertOptions()
    opts.validate()
    dest = Path(dest)
    csvs = [read_label_csv(p) for p in opts.labels if p not in ('modality', 'tumour') and not cohort.is_cohort_spec(p)]
    csv_rows = {t['path']: t['cases'] for t in csvs}
    unreadable = [] if opts.on_error == 'skip' else None  # folders that cannot be listed: an error, or skipped
    cases = brats.discover_cases(source, unreadable)
    if opts.max_cases is not None:
        cases = cases[:opts.max_cases]
    groups = build_groups(opts, csvs, _cohort_values(opts, cases))
    split = assign_split([c.case_id for c in cases], opts.split, opts.split_seed)
    workers = max(1, min(opts.workers, len(cases)))
    threads = max(1, (os.cpu_count() or 1) // workers)  # threads per worker: file reads, planes, deflate
    spool = None  # with workers, their outputs pass through files beside the archive (see _convert_safe)

    t0 = time.time()
    labels, file_cases, affines, case_split, ranges = [], {}, {}, {}, {}
    skipped = [{'case': e.case_id, 'file': e.path, 'problem': e.problem} for e in unreadable or []]
    counts, skipped_slices, natives = {}, {}, {}
    patch_records, spacings = {}, {}  # kind 'patches': dataset.json "patches", and each case's voxel size
    bar = dnnlib.ProgressBar(len(cases), unit='cases', enabled=progress)
    pool = results = pending = None

    def store(res):
        for relpath, data, crc, size in _entries(res):
            writer.add(relpath, data, crc, size)
    # Files are written to the archive in a thread of their own, while the next case converts; one case at a time,
    # in case order, so the archive is the same as if written inline.
    storing = ThreadPoolExecutor(1)
    with archive.ArchiveWriter(dest, opts.overwrite) as writer:
        try:
            if workers > 1:
                try:
                    spool = tempfile.mkdtemp(prefix=f'.{dest.name}.', suffix='.spool', dir=dest.parent)
                except OSError as e:
                    raise archive.ArchiveError(f'{dest}: cannot write beside the archive ({e.strerror or e})') from None
            jobs = [(c, opts, groups, threads, spool) for c in cases]
            if workers > 1:
                ctx = multiprocessing.get_context('fork' if sys.platform.startswith('linux') else 'spawn')
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(csv_rows,))
                results = pool.imap(_convert_safe, jobs, chunksize=1)
            else:
                _set_csv_rows(csv_rows)
                results = _convert_in_process(jobs)
            for done, res in enumerate(results, start=1):
                cid = res['case_id']
                if 'error' in res:
                    if opts.on_error == 'fail':
                        raise brats.BratsError(res['file'], res['problem'], cid)
                    skipped.append({'case': cid, 'file': res['file'], 'problem': res['problem']})
                else:
                    if pending is not None:
                        pending.result()  # raises the previous case's write error, if any
                    pending = storing.submit(store, res)
                    for relpath, assign in res['labels']:  # one label per file, in file order
                        file_cases[relpath] = cid
                        labels.append([relpath, label_vector(groups, assign)])
                    affines.update(res['affines'])
                    if res.get('native'):
                        natives[cid] = res['native']
                    if 'patches' in res:
                        patch_records.update(res['patches'])
                        spacings[cid] = res['spacing']
                    case_split[cid] = split[cid]
                    ranges[cid] = res['ranges']
                    for k, v in res['counts'].items():
                        counts[k] = counts.get(k, 0) + v
                    for k, v in res['skipped_slices'].items():
                        skipped_slices[k] = skipped_slices.get(k, 0) + v
                bar.update(done=done, tail=f'{len(labels)} images, {len(skipped)} skipped')
            if pending is not None:
                pending.result()
        except dnnlib.DiskFullError:  # the spool of a worker: the file the user asked for is the archive
            raise dnnlib.DiskFullError(str(dest)) from None
        finally:
            storing.shutdown(wait=True)  # before the writer is committed or cleaned up
            if hasattr(results, 'close'):
                results.close()  # stops the read-ahead thread of _convert_in_process
            if pool is not None:
                pool.terminate()
                pool.join()
            if spool is not None:
                shutil.rmtree(spool, ignore_errors=True)
            bar.close()
        if not case_split:
            raise ConversionError(f'{source}: no case could be converted ({len(skipped)} skipped; first: {skipped[0]["file"]}: {skipped[0]["problem"]})'
                                  if skipped else f'{source}: no cases')
        channels = ['modality'] if 'modality' in opts.labels else list(opts.modalities)
        if opts.with_seg:
            channels += list(SEG_CHANNELS)
        meta = {
            'labels': labels,
            'label_names': [v for g in groups for v in g['values']],
            'label_groups': [{'name': g['name'], 'values': g['values']} for g in groups],
            'channels': channels,
            'kind': opts.kind,
            'normalization': {'method': opts.normalize, 'low': opts.low if opts.normalize == 'percentile' else 0.0,
                              'high': opts.high if opts.normalize == 'percentile' else 100.0, 'range': [-1, 1],
                              'bit_depth': opts.bit_depth, 'denoise': opts.denoise,
                              'scope': 'per case and modality, over brain voxels; background -1',
                              'case_ranges': ranges},
            'cases': case_split,
            'file_cases': file_cases,
        }
        if opts.with_seg:
            meta['seg_storage'] = SEG_STORAGE
        if any(relpath.endswith('.npy') for relpath, _ in labels):
            meta['codec'] = archive.codec_record(opts.codec, opts.compress_level)  # of the .npy members
        if opts.kind == 'volumes':
            meta['affines'] = affines
            meta['space'] = volume_space.archive_space(natives)  # the frame of generated volumes (generate.py)
            meta['native_grids'] = natives                       # per case: crop, padding and zoom to undo
        meta['resolution'] = opts.volume_size if opts.kind == 'volumes' else opts.resolution
        patch_warnings = []
        if opts.kind == 'patches':
            patch_meta, patch_warnings = patches.archive_meta(opts, patch_records, spacings)
            meta.update(patch_meta)
        meta['source'] = dict(source_info or {}, path=str(source), tool='dataset_tool.py',
                              # every option that shapes the content; not the worker count, so that the archive
                              # is byte-identical however many processes wrote it
                              options=_jsonable({k: v for k, v in dataclasses.asdict(opts).items()
                                                 if k not in ('workers', 'overwrite')}),
                              naming=sorted({c.naming for c in cases}))
        writer.commit(meta)
    skipped_json = dest.parent / 'skipped.json'
    if skipped:
        archive.write_json_atomic(skipped_json, skipped)
    else:
        skipped_json.unlink(missing_ok=True)  # a list from an earlier run would describe cases this run converted
    counts_by_split = {s: sum(1 for v in case_split.values() if v == s) for s in sorted(set(case_split.values()))}
    warnings = [f'--split {name}={frac:g} of {len(case_split)} cases gives no {name} cases (round({frac:g} x '
                f'{len(case_split)}) = 0); use a larger fraction or more cases'
                for name, frac in opts.split.items() if not counts_by_split.get(name)] + patch_warnings
    return {
        'dest': str(dest), 'cases': len(case_split), 'images': len(labels), 'counts': counts,
        'skipped_slices': skipped_slices, 'skipped_cases': skipped, 'skipped_json': str(skipped_json) if skipped else '',
        'split': counts_by_split, 'warnings': warnings,
        'seconds': time.time() - t0, 'min_brain_fraction': opts.min_brain_fraction, 'kind': opts.kind,
        'cohorts': _cohort_counts(case_split, groups),
    }


def _cohort_counts(case_split, groups):
    """{cohort: number of converted cases} for --labels cohort, else {}."""
    group = next((g for g in groups if g['name'] == 'cohort' and 'csv' not in g), None)
    if group is None:
        return {}
    counts = {v: 0 for v in group['values']}
    for cid in case_split:
        counts[cohort.cohort_of(cid)] += 1
    return counts


def _cohort_values(opts, cases):
    """Values of the cohort group (None without --labels cohort); a bad case id is a ConversionError."""
    specs = [s for s in opts.labels if cohort.is_cohort_spec(s)]
    if not specs:
        return None
    if len(specs) > 1:
        raise ConversionError(f'--labels {specs[0]} and --labels {specs[1]}: give the cohort group once')
    try:
        return cohort.cohort_values([c.case_id for c in cases], specs[0])
    except cohort.CohortError as e:
        raise ConversionError(str(e)) from None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)


def format_summary(summary):
    """The human summary printed at the end: cases, images per plane, skipped slices and cases with reasons."""
    lines = [f"wrote {summary['dest']}: {summary['cases']} cases, {summary['images']} images "
             f"in {summary['seconds']:.1f} s"]
    if summary['split']:
        lines.append('  split: ' + ', '.join(f'{k} {v} cases' for k, v in summary['split'].items()))
    for k, v in summary['counts'].items():
        extra = ''
        if k in summary['skipped_slices']:
            extra = (f"  ({summary['skipped_slices'][k]} brain slices skipped: brain < "
                     f"{summary['min_brain_fraction']:g} of the slice)")
        lines.append(f'  {k}: {v}{extra}')
    if summary.get('cohorts'):
        unknown = cohort.unknown_prefixes(summary['cohorts'])
        lines.append('  cohort: ' + ', '.join(f'{k} {v} cases' for k, v in summary['cohorts'].items())
                     + (f" (not a known BraTS prefix, named from the case ids: {', '.join(unknown)})" if unknown else ''))
    if summary['skipped_cases']:
        lines.append(f"  skipped {len(summary['skipped_cases'])} cases (listed in {summary['skipped_json']}):")
        lines += [f"    {s['case']}: {s['file']}: {s['problem']}" for s in summary['skipped_cases']]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Source words


def check_dest_apart(source, dest):
    """Refuse (ConversionError, one line) a --dest that is the source, contains it or sits inside it: replacing
    the destination (--overwrite) would delete the source's files, or the archive would land among its cases."""
    src, dst = Path(os.path.realpath(source)), Path(os.path.realpath(dest))
    if dst == src:
        where = 'is'
    elif src.is_relative_to(dst):
        where = 'contains'
    elif dst.is_relative_to(src):
        where = 'sits inside'
    else:
        return
    raise ConversionError(f'{dest}: --dest {where} --source {source}; nothing was written, the source is untouched '
                          f'(write the archive outside the source folder)')


@contextlib.contextmanager
def locked_dest(dest):
    """Hold ``.DEST.lock`` beside ``dest`` while a conversion writes it (dnnlib.PidLock: flock and PID).

    A second dataset_tool.py to the same --dest is refused in one line naming the first one's PID (both once
    wrote and said "wrote", the later archive silently replacing the earlier); the lock of a killed run is
    taken over. Holding it, the temporary archive and spool that a killed run left beside ``dest`` are removed.
    A parent folder made only for the lock is removed again when no archive came of it."""
    dest = Path(os.path.abspath(dest))
    top = dest.parent  # the highest folder made here, to remove again if nothing is written
    while not top.parent.exists():
        top = top.parent
    made = not top.exists()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise archive.ArchiveError(f'{dest}: cannot write beside the archive ({e.strerror or e})') from None
    lock = dnnlib.PidLock(str(dest.parent / f'.{dest.name}.lock'))
    try:
        lock.__enter__()
    except dnnlib.LockBusy as e:
        raise ConversionError(f'{dest}: another dataset_tool.py (PID {e.pid}) is writing this --dest; wait for it '
                              f'to finish, or stop it first') from None
    except OSError as e:
        raise archive.ArchiveError(f'{dest}: cannot write beside the archive ({e.strerror or e})') from None
    try:
        remove_stale_temps(dest)
        yield
    finally:
        lock.__exit__()
        if made and not dest.exists():
            folder = dest.parent
            while True:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == top:
                    break
                folder = folder.parent


# What ArchiveWriter and convert_brats leave beside DEST while writing: '.DEST.XXXXXXXX.tmp' (the archive),
# '.DEST.XXXXXXXX.spool' (the workers' outputs), '.DEST.tmp-PID' (skipped.json). Not '.DEST.old-PID': that may
# be the previous archive, moved aside by a commit that was killed before the new one took its place.
_STALE_TEMP = r'(\w{8}\.tmp|\w{8}\.spool|tmp-\d+)'


def remove_stale_temps(dest) -> list:
    """Remove the temporary files and folders that a killed conversion to ``dest`` left beside it; call only
    while holding ``locked_dest(dest)``. Returns their paths."""
    dest = Path(dest)
    removed = []
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return removed
    stale = re.compile(re.escape(f'.{dest.name}.') + _STALE_TEMP)
    for name in names:
        if stale.fullmatch(name):
            path = dest.parent / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def convert_source(
    source,                 # folder / zip / 'brats-africa' / 'phantom'
    dest,
    opts=None,              # ConvertOptions
    brats_root=None,        # for 'brats-africa'
    download=None,          # URL for 'brats-africa'
    sha256=None,
    phantom_cases=8,        # for 'phantom'
    seed=0,
    progress=True,
    keep_download=False,    # for 'brats-africa' with download: keep the fetched archive after extracting it
):
    """Dispatches on the source and converts, holding the destination's lock; returns the summary dict (see
    format_summary)."""
    opts = opts or ConvertOptions()
    if opts.codec is None:  # zip archives get the compact form; a folder's .npy files stay what np.load opens
        opts = dataclasses.replace(opts, codec='blosc2' if str(dest).lower().endswith('.zip') else 'stored')
    with locked_dest(dest):
        return _convert_source(source, dest, opts, brats_root, download, sha256, phantom_cases, seed, progress, keep_download)


def _convert_source(source, dest, opts, brats_root, download, sha256, phantom_cases, seed, progress, keep_download):
    opts = opts or ConvertOptions()
    src = str(source)
    if src == 'brats-africa':
        from mri.sources import download as dl
        root = dl.resolve_brats_africa(brats_root, download, sha256, progress, keep_download=keep_download)
        check_dest_apart(root, dest)
        return convert_brats(root, dest, opts, progress, {'type': 'brats-africa', 'doi': dl.DOI})
    if src == 'phantom':
        from mri.sources.phantom import write_phantom_cases
        archive.ArchiveWriter(dest, opts.overwrite).abort()  # fail on a bad --dest before generating anything
        tmp = tempfile.mkdtemp(prefix='mri-phantom-')
        try:
            write_phantom_cases(tmp, phantom_cases, seed=seed, workers=opts.workers, progress=progress)
            return convert_brats(tmp, dest, opts, progress, {'type': 'phantom', 'num_cases': phantom_cases, 'seed': seed})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not Path(src).exists():
        raise brats.BratsError(src, 'no such file or folder (use a folder of BraTS cases, an image folder or zip, '
                                    'brats-africa or phantom)')
    check_dest_apart(src, dest)
    from mri.sources import image_folder
    if image_folder.is_image_source(src):
        if opts.kind == 'patches':
            raise ConversionError(f'{src}: --kind patches cuts patches from BraTS cases (a folder of case folders, '
                                  f'brats-africa or phantom), not from an image folder or archive')
        return image_folder.convert_image_folder(src, dest, opts, progress)
    return convert_brats(src, dest, opts, progress, {'type': 'brats'})
