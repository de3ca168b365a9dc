"""Snapshots and the exact-resume training state.

Beside each ``network-snapshot-NNNNNN.pt`` the loop writes ``training-state.pt``: optimizer states, the
image counter, tick, augment probability, top-k fraction, path-length mean, ADA accumulators and the RNG
states. ``--resume RUN_DIR`` reloads both and continues the run where it stopped; every write is atomic.
"""

import glob
import os
import random
import re

import numpy as np
import torch

from torch_utils import snapshot

STATE_NAME = 'training-state.pt'


def snapshot_path(run_dir: str, cur_nimg: int) -> str:
    return os.path.join(run_dir, f'network-snapshot-{cur_nimg // 1000:06d}.pt')


def latest_snapshot(run_dir: str):
    """The newest ``network-snapshot-*.pt`` of a run dir by its kimg number, or None."""
    files = glob.glob(os.path.join(run_dir, 'network-snapshot-*.pt'))
    numbered = [(int(m.group(1)), f) for f in files if (m := re.search(r'network-snapshot-(\d+)\.pt$', f))]
    return max(numbered)[1] if numbered else None


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
