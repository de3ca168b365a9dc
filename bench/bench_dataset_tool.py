#!/usr/bin/env python
"""Benchmark: BraTS -> archive conversion time against merely loading the same NIfTI files with nibabel.

The target (issue 3): converting a case costs at most twice the time of loading its files, because loading
.nii.gz is dominated by gzip inflation and the conversion is meant to add little on top. Both are measured in the
same run on the same files (warm page cache, best of --repeats, each measurement in a fresh interpreter with
its imports untimed, so neither inherits the other's allocator state): the load baseline reads each file the conversion
reads (the four modalities, plus the labels when a configuration uses them) with `np.asarray(nib.load(f).dataobj)`
in one process; the conversion runs `mri.sources.convert.convert_brats` end to end (discovery, validation, preprocessing,
PNG/npy encoding, the zip written and moved into place) with the configuration's worker count.

Cases: the real case from ../shared/data/brats, repeated --cases times under distinct case ids (symlinks), or
--source phantom cases from mri.sources.phantom. Prints a table and writes JSON.

    python bench/bench_dataset_tool.py --cases 4 --json bench_dataset_tool.json

--storage compares archive layouts of one configuration (default: all four modalities + seg, 256^2, three planes)
in one run (issue 11): the layout archives had before label maps (three one-hot uint16 seg channels, stored; rebuilt
here from the new archive, pixel for pixel), the label-map layout stored (--codec stored) and deflated
(--codec deflate, level 1); bench/bench_archive_codec.py measures the blosc2 default. Per layout: archive size, conversion time, and training-time loading: every image read
through training.dataset.ImageFolderDataset (what each DataLoader worker runs), wall and CPU img/s, best of
--repeats, the layouts interleaved within each repeat. "before" rows read the old layout with the reader the project
had before (np.load on the member's bytes), i.e. what training cost until now.

    python bench/bench_dataset_tool.py --storage --repeats 5 --json bench_storage.json
"""

import io
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import click
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mri.sources import brats, convert  # noqa: E402
from training.cli import bool_option, json_option  # noqa: E402

REAL = Path(__file__).resolve().parents[1].parent / 'shared/data/brats'

CONFIGS = {
    # name: (ConvertOptions kwargs, needs labels)
    'slices256-t2w-3planes':        (dict(kind='slices', resolution=256, modalities=('t2w',)), False),  # defaults
    'slices256-t2w-3planes-rle':    (dict(kind='slices', resolution=256, modalities=('t2w',), compress_level=1), False),
    'slices128-all+seg-npy':        (dict(kind='slices', resolution=128, modalities=brats.MODALITIES, with_seg=True), True),
    'volumes128-t2w':               (dict(kind='volumes', volume_size=128, modalities=('t2w',)), False),
    'volumes64-all+seg':            (dict(kind='volumes', volume_size=64, modalities=brats.MODALITIES, with_seg=True), True),
}


def make_sources(tmp, source, cases):
    """A folder of `cases` cases: symlinks to the real case under new ids, or phantom cases."""
    root = Path(tmp) / 'cases'
    root.mkdir()
    if source == 'phantom':
        from mri.sources.phantom import write_phantom_cases
        write_phantom_cases(root, cases, seed=0, progress=False)
        return root
    found = brats.discover_cases(REAL)
    for k in range(cases):
        cf = found[k % len(found)]
        cid = f'BraTS-BENCH-{k:05d}-000'
        folder = root / cid
        folder.mkdir()
        for m, p in list(cf.files.items()) + [('seg', cf.seg)]:
            if p is not None:
                (folder / f'{cid}-{m}.nii.gz').symlink_to(p.resolve())
    return root


def cpu_seconds():
    """CPU time of this process (all threads) and of its finished children (worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _fresh(kind, *args):
    """Run one measurement in a fresh interpreter (timed inside, so imports are excluded).

    Both the load baseline and the conversion start from the same clean memory state: measured in one long-lived
    process, each leaves the allocator warm (or not) for the next, which moved the ratio by up to 2x.
    """
    import subprocess
    res = subprocess.run([sys.executable, __file__, '--measure', json.dumps([kind] + list(args))],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure(spec):
    kind, *args = json.loads(spec)
    if kind == 'load':
        out = time_load(*args)
    else:
        root, dest, kwargs, workers = args
        out = time_convert(root, dest, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}, workers)
    print(json.dumps(list(out)))


def time_load(root, with_seg):
    """(wall, cpu) seconds to read every file the conversion reads, with nibabel, in one process."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    for cf in brats.discover_cases(root):
        paths = [cf.files[m] for m in brats.MODALITIES] + ([cf.seg] if with_seg else [])
        for p in paths:
            np.asarray(nib.load(str(p)).dataobj)
    return time.perf_counter() - t0, cpu_seconds() - c0


def time_convert(root, dest, kwargs, workers):
    opts = convert.ConvertOptions(**kwargs, workers=workers)
    t0, c0 = time.perf_counter(), cpu_seconds()
    summary = convert.convert_brats(root, dest, opts, progress=False)
    return time.perf_counter() - t0, cpu_seconds() - c0, summary['images'], os.path.getsize(dest)


# ---------------------------------------------------------------------------------------------------------------
# --storage: archive layouts, size and loading speed


def write_onehot_layout(src, dest):
    """The archive `src` (label-map layout) rewritten in the layout archives had before: the seg channels as three
    stored one-hot uint16 channels, no "seg_storage". The images are what the loader yields for `src`, so both
    archives hold the same pixels."""
    import zipfile
    from training.dataset import ImageFolderDataset
    d = ImageFolderDataset(str(src))
    with zipfile.ZipFile(src) as z:
        meta = json.loads(z.read('dataset.json'))
    meta.pop('seg_storage', None)
    with zipfile.ZipFile(dest, 'w', zipfile.ZIP_STORED) as z:
        for i in range(len(d)):
            buf = io.BytesIO()
            np.save(buf, d[i][0])
            z.writestr(d.image_fname(i), buf.getvalue())
        z.writestr('dataset.json', json.dumps(meta))


def _legacy_read_npy(f, size=None):
    """How training.dataset read a .npy member before issue 11."""
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


def time_loading(path, legacy_reader):
    """(images, wall s, CPU s) to read every image of the archive through ImageFolderDataset.__getitem__."""
    import training.dataset as td
    reader = td.read_npy_member
    td.read_npy_member = _legacy_read_npy if legacy_reader else reader
    try:
        d = td.ImageFolderDataset(str(path))
        d[0]  # open the zip
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(len(d)):
            d[i]
        return len(d), time.perf_counter() - t0, time.process_time() - c0
    finally:
        td.read_npy_member = reader


def run_storage(root, tmp, kwargs, repeats):
    """Rows of the storage comparison (see the module docstring)."""
    layouts = {}
    for name, level in (('labelmap-stored', 0), ('labelmap-deflate1', 1)):
        dest = Path(tmp) / f'{name}.zip'
        t0 = time.perf_counter()
        opts = convert.ConvertOptions(**kwargs, compress_level=level, codec='deflate' if level else 'stored')
        convert.convert_brats(root, dest, opts, progress=False)
        layouts[name] = dict(path=dest, convert_s=time.perf_counter() - t0)
    onehot = Path(tmp) / 'onehot-stored.zip'
    write_onehot_layout(layouts['labelmap-stored']['path'], onehot)
    layouts = {'onehot-stored': dict(path=onehot, convert_s=None), **layouts}
    readers = [('onehot-stored', True), ('onehot-stored', False), ('labelmap-stored', False), ('labelmap-deflate1', False)]
    best = {}
    for _ in range(repeats):
        for name, legacy in readers:
            n, wall, cpu = time_loading(layouts[name]['path'], legacy)
            w, c = best.get((name, legacy), (0.0, 0.0))
            best[(name, legacy)] = (max(w, n / wall), max(c, n / cpu))
    base_size = onehot.stat().st_size
    base_wall, base_cpu = best[('onehot-stored', True)]
    rows = []
    for name, legacy in readers:
        size = layouts[name]['path'].stat().st_size
        wall, cpu = best[(name, legacy)]
        rows.append(dict(layout=name, reader='before' if legacy else 'now', archive_mb=size / 1e6,
                         size_vs_before=size / base_size, convert_s=layouts[name]['convert_s'], images=n,
                         load_img_s=wall, load_cpu_img_s=cpu, load_vs_before=wall / base_wall,
                         load_cpu_vs_before=cpu / base_cpu))
    return rows


def print_storage(rows, repeats):
    header = (f'{"layout":18s} {"reader":>6s} {"MB":>7s} {"size":>6s} {"convert s":>9s} {"img/s":>7s} '
              f'{"x":>5s} {"cpu img/s":>9s} {"x":>5s}')
    print(f'loading: every image through ImageFolderDataset, best of {repeats}; x = against the old layout read as '
          f'before; size = against the old layout')
    print(header)
    print('-' * len(header))
    for r in rows:
        conv = f'{r["convert_s"]:9.1f}' if r['convert_s'] is not None else f'{"-":>9s}'
        print(f'{r["layout"]:18s} {r["reader"]:>6s} {r["archive_mb"]:7.1f} {r["size_vs_before"]:6.3f} {conv} '
              f'{r["load_img_s"]:7.0f} {r["load_vs_before"]:5.2f} {r["load_cpu_img_s"]:9.0f} '
              f'{r["load_cpu_vs_before"]:5.2f}')


@click.command()
@click.option('--source',  type=click.Choice(['real', 'phantom']), default='real', show_default=True, help='Which cases')
@click.option('--cases',   metavar='INT', type=click.IntRange(min=1), default=4, show_default=True, help='Cases to convert')
@click.option('--workers', metavar='LIST', default='1,2', show_default=True, help='Worker counts to time')
@click.option('--configs', metavar='LIST', default=','.join(CONFIGS), show_default=True, help='Configurations')
@click.option('--repeats', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True, help='Best of')
@json_option(default='bench_dataset_tool.json')
@bool_option('--storage',  help='Compare archive layouts: size and loading (see the docstring)')
@click.option('--resolution', metavar='INT', type=click.IntRange(min=4), default=256, show_default=True, help='For --storage')
@click.option('--measure', hidden=True, help='internal: one measurement in this fresh process')
def main(source, cases, workers, configs, repeats, json_path, storage, resolution, measure):
    if measure:
        _measure(measure)
        return
    if source == 'real' and not REAL.is_dir():
        print(f'skipped: {REAL} not found (use --source phantom)')
        return
    if storage:
        with tempfile.TemporaryDirectory(prefix='bench-storage-') as tmp:
            root = make_sources(tmp, source, cases)
            kwargs = dict(kind='slices', resolution=resolution, modalities=brats.MODALITIES, with_seg=True, workers=1)
            rows = run_storage(root, tmp, kwargs, repeats)
        print_storage(rows, repeats)
        load_avg = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
        Path(json_path).write_text(json.dumps({'mode': 'storage', 'source': source, 'cases': cases, 'repeats': repeats,
                                         'resolution': resolution, 'cpu_count': os.cpu_count(),
                                         'load_average_1min': load_avg, 'rows': rows}, indent=1))
        print(f'wrote {json_path}')
        return
    workers = [int(w) for w in workers.split(',')]
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench-dataset-tool-') as tmp:
        root = make_sources(tmp, source, cases)
        time_load(root, True)  # warm the page cache and the imports
        for name in configs.split(','):
            kwargs, with_seg = CONFIGS[name]
            # Load and conversions are interleaved per repeat, so that both see the same machine load; the ratio
            # is the median over repeats of conversion time / load time of the same repeat.
            runs = {w: [] for w in workers}
            for r in range(repeats):
                load = _fresh('load', str(root), with_seg)
                for w in workers:
                    dest = Path(tmp) / f'{name}-{w}-{r}.zip'
                    runs[w].append((load, _fresh('convert', str(root), str(dest), kwargs, w)))
                    dest.unlink()
            for w in workers:
                loads = [l for l, _ in runs[w]]
                convs = [c for _, c in runs[w]]
                ratio = float(np.median([c[0] / l[0] for l, c in runs[w]]))
                cpu_ratio = float(np.median([c[1] / l[1] for l, c in runs[w]]))
                seconds = min(c[0] for c in convs)
                rows.append(dict(config=name, workers=w, cases=cases, load_s=min(l[0] for l in loads),
                                 convert_s=seconds, ratio=ratio, load_cpu_s=min(l[1] for l in loads),
                                 convert_cpu_s=min(c[1] for c in convs), cpu_ratio=cpu_ratio, images=convs[0][2],
                                 archive_mib=convs[0][3] / 2**20, ms_per_case=1000 * seconds / cases))
                print(f'{name:30s} workers={w}  load {rows[-1]["load_s"]:6.2f} s  convert {seconds:6.2f} s  '
                      f'ratio {ratio:5.2f}  (cpu ratio {cpu_ratio:5.2f})', file=sys.stderr)
    header = (f'{"config":30s} {"workers":>7s} {"cases":>5s} {"load s":>7s} {"convert s":>9s} {"ratio":>6s} '
              f'{"cpu ratio":>9s} {"images":>6s} {"MiB":>7s}')
    print(f'times: best of {repeats}; ratio: median over repeats of convert/load measured back to back, each in a fresh '
          f'process (imports not timed); load = nibabel only; cpu ratio: the same for CPU seconds (all threads and '
          f'worker processes)')
    print(header)
    print('-' * len(header))
    for r in rows:
        print(f'{r["config"]:30s} {r["workers"]:7d} {r["cases"]:5d} {r["load_s"]:7.2f} {r["convert_s"]:9.2f} '
              f'{r["ratio"]:6.2f} {r["cpu_ratio"]:9.2f} {r["images"]:6d} {r["archive_mib"]:7.1f}')
    load_avg = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    result = {'source': source, 'cases': cases, 'repeats': repeats, 'cpu_count': os.cpu_count(),
              'load_average_1min': load_avg, 'rows': rows}
    Path(json_path).write_text(json.dumps(result, indent=1))
    print(f'wrote {json_path}')


if __name__ == '__main__':
    main()
