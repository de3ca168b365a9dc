#!/usr/bin/env python
"""Stress script: replays the reliability audit's fault classes (issue 20) and prints passed/failed per class.

Classes, each a list of cases run the way a user meets them:

- ``bad_inputs``: malformed NIfTI, PNG, zip members, snapshots, labels, size claims, run dirs and options; each
  must end in one line naming the file or option (no traceback), a non-zero exit, and nothing written.
- ``signals``: SIGTERM, SIGINT and SIGKILL at random moments (seeded) of a training run; the run resumes and its
  last snapshot equals an uninterrupted run's (atol 1e-6), and no temporary file is left.
- ``concurrent``: two trainers into one --outdir, a --resume of a run that is training, two dataset_tool.py to
  one --dest.
- ``disk_full``: a tiny tmpfs (``unshare -rm``: a user and mount namespace, no root) fills under train.py,
  dataset_tool.py with and without workers, generate.py and calc_segmentation's pools: one line each, log.txt
  ends with the error, no temporary file left, no SIGBUS. Skipped, with the reason, where namespaces are off.
- ``interrupts``: Ctrl-C (and SIGTERM) while a script imports torch: ``Interrupted``, exit 130 (143), no traceback.

Every case runs the real scripts in fresh processes (the bad inputs in this process through click's runner,
which is what a script's ``main`` gets), on tiny sizes. Prints one table and writes JSON.

    OMP_NUM_THREADS=1 python bench/stress.py --json stress.json           # everything, a few minutes on 2 cores
    OMP_NUM_THREADS=1 python bench/stress.py --quick                     # one or two cases per class
"""

import glob
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training.cli import PATH, bool_option, json_option  # noqa: E402

CLASSES = ('bad_inputs', 'signals', 'concurrent', 'disk_full', 'interrupts')
# A 16-px conditional run on 16 images: 4 images per round, a tick (and snapshot) every 16 images.
TINY = ['--cbase', '256', '--cmax', '16', '--map-depth', '1', '--batch', '4', '--metrics', 'none', '--device', 'cpu',
        '--tick', '0.016', '--snap', '1', '--aug', 'noaug', '--seed', '3']
RUN_KIMG = '0.096'


class Failed(AssertionError):
    """The case found a fault: the message says what happened instead of what was expected."""


class Skipped(Exception):
    """The case cannot run here; the message says why."""


def check(cond, message):
    if not cond:
        raise Failed(message)


def env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))


def run(args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env(),
                          timeout=timeout, **kwargs)


def one_line_error(output, *fragments, code=None, returncode=None):
    """The output holds exactly one 'Error' line, containing every fragment, and no traceback."""
    check('Traceback' not in output, f'a traceback: ...{output[-600:]!r}')
    errors = [ln for ln in output.splitlines() if ln.startswith('Error')]
    check(len(errors) == 1, f'{len(errors)} error lines: ...{output[-400:]!r}')
    for text in fragments:
        check(text in errors[0], f'{text!r} not in {errors[0]!r}')
    if code is not None:
        check(returncode == code, f'exit {returncode}, expected {code}')
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------
# Inputs shared by the cases (built once per run, tiny).

class Inputs:
    def __init__(self, root: Path):
        from tests.helpers import make_png_folder, zip_folder
        self.root = root
        self.pngs = make_png_folder(str(root / 'pngs'), n=16, res=16, num_classes=2)
        self.zip = zip_folder(self.pngs, str(root / 'pngs.zip'))
        self.snapshot = str(root / 'network-snapshot-000000000.pt')
        self._write_snapshot()

    def _write_snapshot(self):
        from torch_utils import snapshot
        from training.networks import Generator
        G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=1, mapping_kwargs=dict(num_layers=1),
                      channel_base=64, channel_max=8, num_fp16_res=0)
        snapshot.save_snapshot(self.snapshot, dict(G=G, D=None, G_ema=G, augment_pipe=None),
                               dataset=dict(channels=['t2w']))

    def fresh(self, name: str) -> Path:
        path = self.root / 'cases' / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def png_copy(self, name: str) -> Path:
        dst = self.fresh(name) / 'pngs'
        shutil.copytree(self.pngs, dst)
        return dst

    def phantom_source(self, name: str) -> Path:
        from mri.sources.phantom import write_phantom_cases
        src = self.fresh(name) / 'cases'
        write_phantom_cases(str(src), 1, seed=0, shape=(40, 40, 28), progress=False)
        return src


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims another size (its CRC fixed), the rest unchanged."""
    at = data.index(b'IHDR')
    ihdr = b'IHDR' + width.to_bytes(4, 'big') + height.to_bytes(4, 'big') + data[at + 12:at + 17]
    return data[:at] + ihdr + zlib.crc32(ihdr).to_bytes(4, 'big') + data[at + 21:]


def invoke(command, args):
    """A script's click command in this process, as `python script.py ARGS` runs it (output and exit code)."""
    from click.testing import CliRunner
    from torch_utils import training_stats
    training_stats.reset()
    result = CliRunner().invoke(command, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = ''.join(traceback.format_exception(result.exception))
        return 1, result.output + '\nTraceback (uncaught in the command)\n' + tb
    return result.exit_code, result.output


# ---------------------------------------------------------------------------------------------------------------
# bad_inputs

def _dataset_tool(args):
    import dataset_tool
    return invoke(dataset_tool.main, ['--no-progress', *args])


def _train_dry(inputs, data):
    import train
    out = inputs.root / 'cases' / 'never'
    return invoke(train.main, ['--data', data, '--outdir', out, *TINY, '--kimg', '0.1', '--dry-run'])


def _generate(inputs, network, *extra, name='gen'):
    import generate
    out = inputs.fresh(name) / 'out'
    code, output = invoke(generate.main, ['--network', network, '--seeds', '0', '--outdir', out, '--device', 'cpu',
                                          *extra])
    return code, output, out


def nifti_header_claim(inputs):
    import gzip
    import nibabel as nib
    src = inputs.phantom_source('nifti_claim')
    (t2w,) = glob.glob(str(src / '*' / '*t2w.nii.gz'))
    raw = gzip.decompress(open(t2w, 'rb').read())
    header = nib.load(t2w).header.copy()
    header.set_data_shape((32767, 32767, 32767))
    open(t2w, 'wb').write(gzip.compress(header.binaryblock + raw[348:]))
    dest = src.parent / 'a.zip'
    code, out = _dataset_tool(['--source', src, '--dest', dest])
    one_line_error(out, os.path.basename(t2w), 'beyond any brain scan')
    check(code != 0 and not dest.exists(), 'an archive was written')


def nifti_truncated(inputs):
    src = inputs.phantom_source('nifti_truncated')
    (t1c,) = glob.glob(str(src / '*' / '*t1c.nii.gz'))
    data = open(t1c, 'rb').read()
    open(t1c, 'wb').write(data[:len(data) // 2])
    dest = src.parent / 'a.zip'
    code, out = _dataset_tool(['--source', src, '--dest', dest])
    one_line_error(out, os.path.basename(t1c))
    check(code != 0 and not dest.exists(), 'an archive was written')


def dest_inside_source(inputs):
    src = inputs.phantom_source('dest_inside')
    before = sorted(p.name for p in src.rglob('*'))
    code, out = _dataset_tool(['--source', src, '--dest', src / 'archive.zip', '--overwrite'])
    one_line_error(out, 'sits inside')
    code2, out2 = _dataset_tool(['--source', src, '--dest', src, '--overwrite'])
    one_line_error(out2, '--dest is --source')
    check(sorted(p.name for p in src.rglob('*')) == before, 'the source folder changed')


def png_mixed_sizes(inputs):
    import PIL.Image
    root = inputs.png_copy('png_mixed')
    PIL.Image.new('L', (32, 32)).save(root / 'img0002.png')
    code, out = _train_dry(inputs, root)
    one_line_error(out, 'img0002.png', 'differs')


def png_bomb(inputs):
    root = inputs.png_copy('png_bomb')
    path = root / 'img0003.png'
    path.write_bytes(png_with_size(path.read_bytes(), 60000, 60000))
    code, out = _train_dry(inputs, root)
    one_line_error(out, 'img0003.png')


def _train_briefly(inputs, data, name):
    import train
    out = inputs.fresh(name) / 'runs'
    code, output = invoke(train.main, ['--data', data, '--outdir', out, *TINY, '--kimg', '0.032'])
    return code, output, out


def png_truncated_pixels(inputs):
    from tests.helpers import zip_folder
    root = inputs.png_copy('png_truncated')
    for i in range(1, 16):
        path = root / f'img{i:04d}.png'
        data = path.read_bytes()
        path.write_bytes(data[:data.index(b'IDAT') + 8])
    archive = zip_folder(str(root), str(root.parent / 'broken.zip'))
    code, out, runs = _train_briefly(inputs, archive, 'png_truncated_run')
    line = one_line_error(out, 'broken.zip/img00', 'unreadable image')
    (run_dir,) = glob.glob(str(runs / '*'))
    log = open(os.path.join(run_dir, 'log.txt')).read()
    check(log.rstrip().splitlines()[-1] == line, 'log.txt does not end with the error line')


def zip_corrupt_member(inputs):
    import zipfile
    from tests.helpers import make_png_folder
    root = Path(make_png_folder(str(inputs.fresh('zip_corrupt') / 'src'), n=16, res=64, num_classes=2, channels=2,
                                bit16=True))
    archive = str(root.parent / 'deflated.zip')
    with zipfile.ZipFile(archive, 'w', compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(os.listdir(root)):
            z.write(root / name, name)
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo('img0005.npy')
    with open(archive, 'r+b') as f:
        f.seek(info.header_offset + 26)
        start = info.header_offset + 30 + int.from_bytes(f.read(2), 'little') + int.from_bytes(f.read(2), 'little')
        f.seek(start + info.compress_size - 12)
        flipped = bytes(b ^ 0x5A for b in f.read(8))
        f.seek(start + info.compress_size - 12)
        f.write(flipped)
    code, out, _ = _train_briefly(inputs, archive, 'zip_corrupt_run')
    one_line_error(out, 'deflated.zip/img0005.npy')


def npy_size_claim(inputs):
    import io
    import zipfile
    import numpy as np
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 8, 8), np.uint16))
    header['shape'] = (1, 40000, 40000)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(bytes(128))
    archive = inputs.fresh('npy_claim') / 'claim.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('a.npy', buf.getvalue())
        z.writestr('b.npy', buf.getvalue())
    code, out = _train_dry(inputs, archive)
    one_line_error(out, 'a.npy', '40000')


def _labels(inputs, name, labels):
    root = inputs.png_copy(name)
    meta = json.loads((root / 'dataset.json').read_text())
    meta['labels'] = [[fname, labels(i)] for i, (fname, _) in enumerate(meta['labels'])]
    (root / 'dataset.json').write_text(json.dumps(meta))
    import train
    return invoke(train.main, ['--data', root, '--outdir', root.parent / 'runs', *TINY, '--kimg', '0.1', '--cond=1',
                               '--dry-run'])


def labels_nan(inputs):
    code, out = _labels(inputs, 'labels_nan', lambda i: [float('nan'), 1.0] if i == 4 else [1.0, 0.0])
    one_line_error(out, 'dataset.json')


def labels_negative(inputs):
    code, out = _labels(inputs, 'labels_negative', lambda i: -1 if i == 4 else i % 2)
    one_line_error(out, 'dataset.json', 'negative')


def labels_strings(inputs):
    code, out = _labels(inputs, 'labels_strings', lambda i: 'axial')
    one_line_error(out, 'dataset.json')


def _crafted_snapshot(inputs, name, change):
    import torch
    data = torch.load(inputs.snapshot, weights_only=True)
    change(data)
    data.pop('checksum', None)
    path = str(inputs.fresh(name) / 'net.pt')
    torch.save(data, path)
    return path


def snapshot_flipped_bytes(inputs):
    import torch
    data = bytearray(open(inputs.snapshot, 'rb').read())
    weight = torch.load(inputs.snapshot, weights_only=True)['modules']['G']['state_dict']
    probe = next(t for k, t in weight.items() if t.numel() >= 32 and 'weight' in k).numpy().tobytes()[:64]
    at = bytes(data).find(probe)
    check(at > 0, 'no tensor bytes found to damage')
    data[at:at + len(probe)] = bytes(b ^ 0xFF for b in probe)
    path = inputs.fresh('snap_flipped') / 'net.pt'
    path.write_bytes(bytes(data))
    code, out, outdir = _generate(inputs, path, name='snap_flipped_gen')
    one_line_error(out, 'net.pt', 'damaged')
    check(not outdir.exists() or not any(outdir.iterdir()), 'images were written')


def snapshot_hook_class(inputs):
    def change(data):
        data['modules']['G']['init_kwargs']['attn_kwargs'] = dict(class_name='this.Nothing')
    path = _crafted_snapshot(inputs, 'snap_hook', change)
    code = (f'import sys, generate, dnnlib\nfrom click.testing import CliRunner\n'
            f'r = CliRunner().invoke(generate.main, ["--network", {path!r}, "--seeds", "0", "--outdir", '
            f'{path + "-out"!r}, "--device", "cpu"])\nprint(r.output)\n'
            f'print("IMPORTED" if "this" in sys.modules else "not imported")')
    res = run(['-c', code])
    check(res.stdout.strip().endswith('not imported') and 'Zen of Python' not in res.stdout,
          f'the module was imported: {res.stdout[-300:]!r}')
    one_line_error(res.stdout, "'this.Nothing'")


def snapshot_size_claim(inputs):
    def change(data):
        data['modules']['G']['init_kwargs']['z_dim'] = 2 ** 40
    code, out, _ = _generate(inputs, _crafted_snapshot(inputs, 'snap_claim', change), name='snap_claim_gen')
    one_line_error(out, 'z_dim=1099511627776')


def snapshot_modules_list(inputs):
    def change(data):
        data['modules'] = [data['modules']['G']]
    code, out, _ = _generate(inputs, _crafted_snapshot(inputs, 'snap_list', change), name='snap_list_gen')
    one_line_error(out, 'net.pt', 'modules')


def pickle_with_code(inputs):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f'touch {inputs.root}/pwned',))
    path = inputs.fresh('pickle') / 'network-snapshot-000000.pkl'
    path.write_bytes(pickle.dumps({'G_ema': Boom()}))
    code, out, _ = _generate(inputs, path, name='pickle_gen')
    one_line_error(out, 'network-snapshot-000000.pkl')
    check(not (inputs.root / 'pwned').exists(), 'the pickle ran its command')


def run_dir_class_name(inputs):
    import train
    run_dir = inputs.fresh('run_dir_code') / 'run'
    run_dir.mkdir()
    marker = run_dir.parent / 'ran'
    (run_dir / 'training-state.pt').write_bytes(b'')
    (run_dir / 'training_options.json').write_text(json.dumps(dict(
        run_dir=str(run_dir), augment_kwargs=dict(class_name='os.system', command=f'touch {marker}'))))
    code, out = invoke(train.main, ['--resume', run_dir])
    one_line_error(out, "'os.system'")
    check(not marker.exists(), 'the run dir ran its command')


def seeds_too_many(inputs):
    code, out, outdir = _generate(inputs, inputs.snapshot, '--seeds', '0-999999999999', name='seeds')
    one_line_error(out, '--seeds', 'at most')


BAD_INPUTS = [nifti_header_claim, nifti_truncated, dest_inside_source, png_mixed_sizes, png_bomb,
              png_truncated_pixels, zip_corrupt_member, npy_size_claim, labels_nan, labels_negative, labels_strings,
              snapshot_flipped_bytes, snapshot_hook_class, snapshot_size_claim, snapshot_modules_list,
              pickle_with_code, run_dir_class_name, seeds_too_many]
BAD_INPUTS_QUICK = [png_truncated_pixels, snapshot_flipped_bytes]


# ---------------------------------------------------------------------------------------------------------------
# signals

def train_args(inputs, outdir, kimg=RUN_KIMG):
    return ['train.py', '--data', inputs.zip, '--outdir', outdir, '--cond=1', *TINY, '--kimg', kimg]


def _last_snapshot_tensors(run_dir):
    """(file name, {net: state dict}) of a run dir's newest snapshot."""
    from torch_utils import snapshot
    from training import checkpoint
    path = checkpoint.latest_snapshot(run_dir)
    check(path is not None, f'{run_dir}: no snapshot')
    nets = snapshot.load_snapshot(path)
    return os.path.basename(path), {k: nets[k].state_dict() for k in ('G', 'D', 'G_ema')}


class Baseline:
    """An uninterrupted run, made once, that every interrupted run must end equal to."""
    cache = {}

    @classmethod
    def get(cls, inputs):
        if 'run' not in cls.cache:
            res = run(train_args(inputs, inputs.root / 'baseline'))
            check(res.returncode == 0, f'the uninterrupted run failed: {res.stderr[-500:]!r}')
            (run_dir,) = glob.glob(str(inputs.root / 'baseline' / '*'))
            cls.cache['run'] = _last_snapshot_tensors(run_dir)
        return cls.cache['run']


def default_ctrl_c():
    """preexec_fn of a child that is sent SIGINT: Ctrl-C back to its default action. A job a non-interactive shell
    starts in the background (`cmd &`, CI runners) ignores SIGINT and its children inherit that; Python then sets
    up no KeyboardInterrupt at all, and a SIGINT case would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_training(args):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=default_ctrl_c)


def _wait_for(proc, prefix, timeout=240):
    """Read the process's output until a line starting with ``prefix``; returns what was read."""
    seen, deadline = '', time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if line.startswith(prefix):
            break
    return seen


def _interrupt_and_resume(inputs, name, sig, rnd):
    base_name, base = Baseline.get(inputs)
    outdir = inputs.fresh(name) / 'runs'
    proc = _start_training(train_args(inputs, outdir))
    seen = _wait_for(proc, 'tick 0')
    delay = rnd.uniform(0, 4.0)
    time.sleep(delay)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    seen += out
    (run_dir,) = glob.glob(str(outdir / '*'))
    if sig == signal.SIGKILL:
        check(proc.returncode == -signal.SIGKILL, f'exit {proc.returncode} after SIGKILL')
    else:
        check(proc.returncode == 0 and 'Traceback' not in seen, f'exit {proc.returncode} after {sig.name}: '
                                                                 f'{seen[-500:]!r}')
    if not os.path.isfile(os.path.join(run_dir, 'training-state.pt')):
        res = run(['train.py', '--resume', run_dir])
        one_line_error(res.stderr, 'no training state', returncode=res.returncode)
        return f'{sig.name} after {delay:.1f} s, before the first state: the resume is refused in one line'
    # Tick 0 comes after the first step, so a late signal can find the short run already finished ('Exiting...'):
    # then there is nothing to resume, and its result is compared as it stands.
    finished = 'Exiting...' in seen
    if not finished:
        res = run(['train.py', '--resume', run_dir, '--kimg', RUN_KIMG])
        check(res.returncode == 0, f'the resume failed: {res.stderr[-600:]!r}')
    got_name, got = _last_snapshot_tensors(run_dir)
    check(got_name == base_name, f'last snapshot {got_name}, uninterrupted {base_name}')
    for net in base:
        for key, t in base[net].items():
            diff = float((got[net][key].float() - t.float()).abs().max()) if t.numel() else 0.0
            check(diff <= 1e-6, f'{net}.{key} differs from the uninterrupted run by {diff:g}')
    left = [n for n in os.listdir(run_dir) if n.startswith('.tmp-')]
    check(not left, f'temporary files left: {left}')
    if finished:
        return f'{sig.name} after tick 0 + {delay:.1f} s came after the end: equal to the uninterrupted run'
    return f'{sig.name} after tick 0 + {delay:.1f} s: resumed, equal to the uninterrupted run'


def signals_cases(quick):
    plan = [('sigterm', signal.SIGTERM)] if quick else [
        ('sigterm_1', signal.SIGTERM), ('sigterm_2', signal.SIGTERM), ('sigint', signal.SIGINT),
        ('sigkill_1', signal.SIGKILL), ('sigkill_2', signal.SIGKILL)]
    cases = []
    for name, sig in plan:
        def case(inputs, rnd, name=name, sig=sig):
            return _interrupt_and_resume(inputs, name, sig, rnd)
        case.__name__ = name
        cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------------------------
# concurrent

def two_trainers_one_outdir(inputs, rnd):
    outdir = inputs.fresh('two_trainers') / 'runs'
    procs = [_start_training(train_args(inputs, outdir, kimg='0.032')) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    check([p.returncode for p in procs] == [0, 0], f'exits {[p.returncode for p in procs]}: {outs[0][-300:]!r}')
    runs = sorted(glob.glob(str(outdir / '*')))
    check(len(runs) == 2, f'{len(runs)} run dirs for two trainers')
    for r in runs:
        check(any(n.startswith('network-snapshot-') for n in os.listdir(r)), f'{r}: no snapshot')


def resume_while_training(inputs, rnd):
    outdir = inputs.fresh('resume_while') / 'runs'
    proc = _start_training(train_args(inputs, outdir, kimg='50'))
    try:
        _wait_for(proc, 'tick 0')
        (run_dir,) = glob.glob(str(outdir / '*'))
        res = run(['train.py', '--resume', run_dir])
        one_line_error(res.stderr, f'PID {proc.pid}', 'training in this run dir')
        check(res.returncode == 2, f'exit {res.returncode}')
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    check(proc.returncode == 0, f'the first trainer ended with {proc.returncode}')


def two_dataset_tools_one_dest(inputs, rnd):
    dest = inputs.fresh('two_dataset_tools') / 'd.zip'
    args = ['dataset_tool.py', '--source', 'phantom', '--phantom-cases', '2', '--resolution', '32', '--planes',
            'axial', '--dest', dest, '--no-progress']
    first = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = dest.parent / '.d.zip.lock'
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)  # Frozen while holding the lock: the second surely meets it.
    try:
        second = run(args + ['--overwrite'])
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    one_line_error(second.stderr, f'PID {first.pid}', 'is writing this --dest')
    check(first.returncode == 0 and 'wrote' in out, f'the first run: exit {first.returncode} {err[-300:]!r}')


CONCURRENT = [two_trainers_one_outdir, resume_while_training, two_dataset_tools_one_dest]
CONCURRENT_QUICK = [two_dataset_tools_one_dest]


# ---------------------------------------------------------------------------------------------------------------
# disk_full

def tmpfs_problem():
    """Why a tiny tmpfs cannot be mounted here, or None."""
    if shutil.which('unshare') is None:
        return 'no unshare command'
    probe = subprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs -o size=64k tmpfs /mnt'],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f'unshare -rm / mount tmpfs refused ({probe.stderr.strip()[:120]})'
    return None


def on_tmpfs(mnt: Path, size: str, command: str, timeout=300):
    """Run ``command`` (sh) with a ``size`` tmpfs mounted at ``mnt``, in a user and mount namespace of its own."""
    mnt.mkdir(parents=True, exist_ok=True)
    return subprocess.run(['unshare', '-rm', 'sh', '-c', f'mount -t tmpfs -o size={size} tmpfs {mnt} && {command}'],
                          cwd=ROOT, capture_output=True, text=True, env=env(), timeout=timeout)


def train_disk_full(inputs, rnd):
    case = inputs.fresh('train_full')
    mnt = case / 'small'
    res = on_tmpfs(mnt, '600k', f'{sys.executable} {" ".join(map(str, train_args(inputs, mnt / "runs")))}; rc=$?; '
                                f'cat {mnt}/runs/*/log.txt > {case}/log.txt; ls -a {mnt}/runs/* > {case}/ls; exit $rc')
    line = one_line_error(res.stderr, 'No space left on device while writing', code=1, returncode=res.returncode)
    log = (case / 'log.txt').read_text()
    check(log.rstrip().splitlines()[-1] == line, f'log.txt ends with {log.rstrip().splitlines()[-1]!r}')
    check('.tmp-' not in (case / 'ls').read_text(), 'a temporary file is left in the run dir')


def _dataset_tool_disk_full(inputs, name, workers):
    case = inputs.fresh(name)
    mnt = case / 'small'
    res = on_tmpfs(mnt, '3m', f'{sys.executable} dataset_tool.py --source phantom --phantom-cases 4 --workers {workers} '
                              f'--modalities all --with-seg --dest {mnt}/p.zip --no-progress; rc=$?; '
                              f'ls -a {mnt} > {case}/ls; exit $rc')
    one_line_error(res.stderr, 'p.zip', 'No space left on device', code=1, returncode=res.returncode)
    left = [n for n in (case / 'ls').read_text().split() if n not in ('.', '..')]
    check(not left, f'left on the full disk: {left}')


def dataset_tool_disk_full(inputs, rnd):
    _dataset_tool_disk_full(inputs, 'dt_full_1', 1)


def dataset_tool_workers_disk_full(inputs, rnd):
    _dataset_tool_disk_full(inputs, 'dt_full_2', 2)


def generate_disk_full(inputs, rnd):
    case = inputs.fresh('generate_full')
    mnt = case / 'small'
    res = on_tmpfs(mnt, '64k', f'{sys.executable} generate.py --network {inputs.snapshot} --seeds 0-99 '
                               f'--outdir {mnt}/out --device cpu; rc=$?; ls -a {mnt}/out > {case}/ls; exit $rc')
    one_line_error(res.stderr, 'No space left on device while writing', returncode=res.returncode)
    check(res.returncode == 1, f'exit {res.returncode}')
    check('.tmp-' not in (case / 'ls').read_text(), 'a temporary file is left')


def segmentation_pool_disk_full(inputs, rnd):
    case = inputs.fresh('pool_full')
    mnt = case / 'small'
    code = ('import numpy as np, dnnlib\nfrom mri.downstream import data\n'
            'class S:\n    path, psi = __file__, 1.0\n'
            '    def sample(self, first, n):\n'
            '        return np.ones((n, 4, 64, 64), np.uint16), np.zeros((n, 64, 64), np.uint8)\n'
            f'try:\n    data.ensure_pool(S(), 200, "{mnt}/synthetic", "pool0", progress=False)\n'
            'except dnnlib.DiskFullError as e:\n    print("Error:", e)\n')
    (case / 'pool.py').write_text(code)
    res = on_tmpfs(mnt, '1m', f'{sys.executable} {case}/pool.py; rc=$?; ls -a {mnt}/synthetic > {case}/ls; exit $rc')
    check(res.returncode != -signal.SIGBUS and res.returncode != 128 + signal.SIGBUS, 'died of SIGBUS')
    one_line_error(res.stdout + res.stderr, 'No space left on device while writing', 'pool0-')
    left = [n for n in (case / 'ls').read_text().split() if n not in ('.', '..')]
    check(not left, f'left on the full disk: {left}')


DISK_FULL = [train_disk_full, dataset_tool_disk_full, dataset_tool_workers_disk_full, generate_disk_full,
             segmentation_pool_disk_full]
DISK_FULL_QUICK = [train_disk_full, segmentation_pool_disk_full]


# ---------------------------------------------------------------------------------------------------------------
# interrupts

def signal_while_importing(script, sig):
    """Start ``script --help`` with -X importtime (every finished import is a stderr line) and send ``sig`` as soon
    as click is imported (before torch); returns (exit code, stderr lines that are not import timings)."""
    proc = subprocess.Popen([sys.executable, '-X', 'importtime', script, '--help'], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)
    text = ''
    for line in proc.stderr:
        text += line
        if line.startswith('import time:') and line.rstrip().endswith('| click'):
            proc.send_signal(sig)
            break
    text += proc.stderr.read()
    proc.wait(timeout=120)
    return proc.returncode, [ln for ln in text.splitlines() if ln.strip() and not ln.startswith('import time:')]


def interrupt_case(script, sig):
    def case(inputs, rnd):
        code, lines = signal_while_importing(script, sig)
        expected = (128 + sig, ['Interrupted' + (' (SIGTERM)' if sig == signal.SIGTERM else '')])
        check((code, lines) == expected, f'exit {code}, stderr {lines[-3:]!r}; expected {expected}')
    case.__name__ = f'{script[:-3]}_{sig.name.lower()}'
    return case


INTERRUPTS = [interrupt_case(s, signal.SIGINT) for s in
              ('train.py', 'dataset_tool.py', 'calc_segmentation.py', 'generate.py', 'calc_metrics.py')]
INTERRUPTS += [interrupt_case('train.py', signal.SIGTERM)]
INTERRUPTS_QUICK = [INTERRUPTS[0], INTERRUPTS[-1]]


# ---------------------------------------------------------------------------------------------------------------

def plan(quick: bool, only):
    cases = {
        'bad_inputs': [lambda inputs, rnd, f=f: f(inputs) for f in (BAD_INPUTS_QUICK if quick else BAD_INPUTS)],
        'signals': signals_cases(quick),
        'concurrent': CONCURRENT_QUICK if quick else CONCURRENT,
        'disk_full': DISK_FULL_QUICK if quick else DISK_FULL,
        'interrupts': INTERRUPTS_QUICK if quick else INTERRUPTS,
    }
    names = {'bad_inputs': [f.__name__ for f in (BAD_INPUTS_QUICK if quick else BAD_INPUTS)]}
    out = []
    for cls in CLASSES:
        if only and cls not in only:
            continue
        for k, fn in enumerate(cases[cls]):
            out.append((cls, names[cls][k] if cls in names else fn.__name__, fn))
    return out


@click.command()
@bool_option('--quick', help='One or two cases per class (about a minute or two)')
@click.option('--faults', 'classes', metavar='LIST', default='', help=f'Only these fault classes, of {",".join(CLASSES)}')
@click.option('--seed', metavar='INT', type=int, default=0, show_default=True, help='Seed of the signal moments')
@json_option(help='Write the results (JSON) here')
@click.option('--workdir', metavar='DIR', type=PATH, default=None,
              help='Keep the cases here [default: a temporary folder, removed]')
def main(quick, classes, seed, json_path, workdir):
    """Replay the audit's fault classes; exit 1 when any case fails."""
    only = [c.strip() for c in classes.split(',') if c.strip()]
    bad = [c for c in only if c not in CLASSES]
    if bad:
        raise click.BadParameter(f'unknown classes {bad}; choose from {",".join(CLASSES)}', param_hint='--faults')
    rnd = random.Random(seed)
    root = Path(workdir or tempfile.mkdtemp(prefix='mri-stress-'))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    inputs = Inputs(root)
    tmpfs = tmpfs_problem()
    results = []
    try:
        for cls, name, fn in plan(quick, only):
            start = time.time()
            try:
                if cls == 'disk_full' and tmpfs:
                    raise Skipped(tmpfs)
                note = fn(inputs, rnd)
                status, detail = 'passed', note or ''
            except Skipped as err:
                status, detail = 'skipped', str(err)
            except Failed as err:
                status, detail = 'failed', str(err)
            except Exception as err:  # noqa: BLE001 - the harness itself broke on this case: a failure too.
                status, detail = 'failed', f'{type(err).__name__}: {err}'
            results.append(dict(cls=cls, case=name, status=status, seconds=round(time.time() - start, 1),
                                detail=detail))
            print(f'{cls:<11} {name:<32} {status:<8} {time.time() - start:6.1f} s  {detail[:150]}', flush=True)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    table = summarize(results)
    print()
    print(f'{"class":<11} {"passed":>6} {"failed":>6} {"skipped":>7}')
    for cls, row in table.items():
        print(f'{cls:<11} {row["passed"]:>6} {row["failed"]:>6} {row["skipped"]:>7}')
    total = {k: sum(r[k] for r in table.values()) for k in ('passed', 'failed', 'skipped')}
    print(f'{"total":<11} {total["passed"]:>6} {total["failed"]:>6} {total["skipped"]:>7}   '
          f'({time.time() - t0:.0f} s, {"quick" if quick else "full"}, seed {seed})')
    if json_path:
        report = dict(quick=quick, seed=seed, seconds=round(time.time() - t0, 1), classes=table, total=total,
                      cases=results, machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                                  python=platform.python_version()))
        Path(json_path).write_text(json.dumps(report, indent=1))
    sys.exit(1 if total['failed'] else 0)


def summarize(results):
    table = {}
    for r in results:
        row = table.setdefault(r['cls'], dict(passed=0, failed=0, skipped=0))
        row[r['status']] += 1
    return table


if __name__ == '__main__':
    main()
