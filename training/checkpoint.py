"""Snapshots and the exact-resume training state.

Snapshots and image grids are named by the number of real images shown so far (``network-snapshot-
000000200.pt``, ``fakes000000200.png``; nine digits, more past 10^9), so short runs never reuse a name. Runs
made before kept the kimg (``network-snapshot-000012.pt``, six digits, also NVlabs' ``.pkl`` naming); both
kinds are still found and ordered. Beside the newest snapshot the loop writes ``training-state.pt``:
optimizer states, the image counter, tick, augment probability, top-k fraction, path-length mean, ADA
accumulators and the RNG states, and the snapshot it belongs to. ``--resume RUN_DIR`` reloads both and
continues the run where it stopped; every write is atomic.
"""

import glob
import os
import random
import re

import numpy as np
import torch

import dnnlib
from torch_utils import snapshot

STATE_NAME = 'training-state.pt'
_SNAPSHOT_RE = re.compile(r'network-snapshot-(\d+)\.(pt|pkl)$')


def snapshot_path(run_dir: str, cur_nimg: int) -> str:
    return os.path.join(run_dir, f'network-snapshot-{int(cur_nimg):09d}.pt')


def grid_path(run_dir: str, cur_nimg: int) -> str:
    return os.path.join(run_dir, f'fakes{int(cur_nimg):09d}.png')


def snapshot_nimg(path: str):
    """Images seen at a snapshot, from its name: nine or more digits count images, six (older runs and NVlabs'
    pickles) count kimg. None for other names."""
    m = _SNAPSHOT_RE.search(os.path.basename(path))
    if m is None:
        return None
    digits = m.group(1)
    return int(digits) * 1000 if len(digits) <= 6 else int(digits)


def latest_snapshot(run_dir: str):
    """The newest ``network-snapshot-*.pt`` (or NVlabs ``.pkl``) of a run dir by images seen, or None.
    On a tie our ``.pt`` wins over a ``.pkl``, and the new naming over the old."""
    ranked = []
    for f in glob.glob(os.path.join(glob.escape(run_dir), 'network-snapshot-*')):
        nimg = snapshot_nimg(f)
        if nimg is not None:
            ranked.append((nimg, f.endswith('.pt'), len(os.path.basename(f)), f))
    return max(ranked)[-1] if ranked else None


def transfer_weights(data: dict, modules: dict):
    """Copy every tensor of a snapshot's plain data (``snapshot.read_snapshot_data``) into ``modules`` whose
    name and shape match. Returns ``(copied, total, first_mismatch)``: counts over the modules' state-dict
    tensors, and a description of the first tensor left as it was (None when all were copied)."""
    copied = total = 0
    first = None
    records = data.get('modules') or {}
    with torch.no_grad():
        for key, module in modules.items():
            if module is None:
                continue
            record = records.get(key)
            source = (record or {}).get('state_dict') or {}
            for name, tensor in module.state_dict(keep_vars=True).items():
                total += 1
                src = source.get(name)
                if src is not None and tuple(src.shape) == tuple(tensor.shape):
                    tensor.copy_(src)
                    copied += 1
                elif first is None:
                    found = 'absent' if src is None else f'{list(src.shape)} in the snapshot'
                    first = f'{key}.{name} {list(tensor.shape)} here, {found}'
    return copied, total, first


def rng_states() -> dict:
    state = {
        'torch': torch.get_rng_state(),
        'numpy': torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        'numpy_pos': int(np.random.get_state()[2]),
        'python': torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), state['numpy_pos'], 0, 0.0))
    py = tuple(int(v) for v in state['python'].tolist())
    random.setstate((3, py, None))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state['cuda']))


def save_training_state(run_dir: str, state: dict) -> None:
    snapshot.atomic_torch_save(state, os.path.join(run_dir, STATE_NAME))


def load_training_state(run_dir: str) -> dict:
    path = os.path.join(run_dir, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no training state to resume from (was the run stopped before its first snapshot?)')
    return torch.load(path, map_location='cpu', weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# One trainer per run dir.

LOCK_NAME = 'run.lock'


class RunDirBusy(RuntimeError):
    """Another process trains in this run dir (one line naming its PID)."""


class RunLock:
    """An exclusive lock on a run dir while a process trains in it: ``run.lock`` holds the trainer's PID and an
    ``fcntl.flock`` that the kernel releases when the process ends, however it ends, so a lock left by a dead
    process (SIGKILL, power loss) is taken over by the next trainer without a word. A second trainer or a
    ``--resume`` of a run still training is refused instead of training beside it (duplicate ticks, lost work).

    Holding the lock, the temporary files of atomic writes (``dnnlib.atomic_output``'s ``.tmp-*``) in the run dir
    and in ``temp_dirs`` (its subfolders that a job writes into) are what a killed writer left (SIGKILL, a full
    disk during a snapshot): nobody will finish them, so they go. ``doing`` completes the refusal's sentence
    "another process (PID N) is ..." for jobs other than training (calc_segmentation.py's outdir)."""

    def __init__(self, run_dir: str, temp_dirs=(), doing: str = 'training in this run dir',
                 hint: str = 'wait for it to stop, or stop it (Ctrl-C / SIGTERM saves its state) first'):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.temp_dirs = [run_dir] + [os.path.join(run_dir, d) for d in temp_dirs]
        self.doing, self.hint = doing, hint
        self.lock = None

    def __enter__(self):
        lock = dnnlib.PidLock(self.path, remove=False)  # the file stays: a later trainer overwrites the PID
        try:
            lock.__enter__()
        except dnnlib.LockBusy as err:
            raise RunDirBusy(f'{self.run_dir}: another process (PID {err.pid}) is {self.doing}; {self.hint}') from None
        self.lock = lock
        remove_stale_temps(self.temp_dirs)
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.__exit__(*exc)
            self.lock = None


def remove_stale_temps(folders) -> list:
    """Remove the ``.tmp-*`` files of atomic writes in ``folders`` (missing folders skipped); returns their paths.
    Call only while holding the folders' lock: then no live writer owns them."""
    removed = []
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.startswith('.tmp-'):
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
                except OSError:
                    pass
    return removed


def claim_run_dir(outdir: str, desc: str, next_name) -> str:
    """Create the next free run dir ``NNNNN-desc`` under ``outdir`` atomically (``os.mkdir`` fails when another
    process made it first; then the next number is tried), so two trainers started at once never share one."""
    os.makedirs(outdir, exist_ok=True)
    for _ in range(1000):
        path = next_name(outdir, desc)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f'{outdir}: could not create a run dir (1000 names taken while trying)')
