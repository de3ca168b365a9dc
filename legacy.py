"""StyleGAN2-ADA's ``legacy.load_network_pkl`` for scripts written against NVlabs' repositories.

    import dnnlib, legacy
    with dnnlib.open_url('runs/00000-brats/network-snapshot-000200000.pt') as f:
        G = legacy.load_network_pkl(f)['G_ema']          # an NVlabs network-snapshot-*.pkl works the same way

Both kinds of file load through ``torch_utils.snapshot`` and nothing else: a ``.pt`` of this project with
``torch.load(weights_only=True)``, an NVlabs ``.pkl`` with the restricted unpickler, which reads the recorded
arguments and weights as data and never runs code stored in the pickle (README, "Safety of snapshots"). The
networks come back as this project's classes, which keep NVlabs' call signatures (``G(z, c)``, ``G.mapping``,
``G.synthesis``, ``D(img, c)``) and state-dict names.
"""

import copy
import os
import tempfile

import dnnlib
from torch_utils import snapshot

FP16_RES = 4            # force_fp16: the highest resolutions in float16, as NVlabs' legacy loader sets it.
FP16_CONV_CLAMP = 256   # ... with their conv clamping.


def load_network_pkl(
    f,                          # An open binary file (or a path) of a .pt snapshot or an NVlabs .pkl.
    force_fp16: bool = False,   # Rebuild G, D and G_ema with fp16 in the FP16_RES highest resolutions.
) -> dict:
    """``{'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'}`` of a snapshot, as NVlabs' loader returns
    it (a network the file does not hold is None; ``training_set_kwargs`` is the recorded dataset config, or
    None). Also ``'dataset'``: this project's description of the training data. Raises
    ``torch_utils.snapshot.SnapshotError`` (one line) for a file that is not such a snapshot."""
    path, temp = _as_path(f)
    try:
        data = snapshot.read_snapshot_data(path)
        if not isinstance(data, dict) or data.get('format') != snapshot.SNAPSHOT_FORMAT:
            raise snapshot.SnapshotError(f'{_name(f)}: not a network snapshot (.pt of this project or an NVlabs .pkl)')
        modules = data.get('modules') or {}
        out = dict(G=None, D=None, G_ema=None, augment_pipe=None)
        for key, record in modules.items():
            if key not in out or record is None:
                continue
            if force_fp16 and key in ('G', 'D', 'G_ema'):
                record = _with_fp16(record)
            out[key] = snapshot.build_module(record, _name(f)).eval().requires_grad_(False)
    finally:
        if temp is not None:
            os.remove(temp)
    extra = dict(data.get('extra') or {})
    train_kwargs = extra.get('training_set_kwargs') or (extra.get('config') or {}).get('training_set_kwargs')
    out['training_set_kwargs'] = dnnlib.EasyDict(train_kwargs) if train_kwargs else None
    out['dataset'] = dnnlib.EasyDict(data.get('dataset') or {})
    return out


def _name(f) -> str:
    return f if isinstance(f, (str, os.PathLike)) else getattr(f, 'name', '<file object>')


def _as_path(f):
    """``(path, temp)``: the file's own path when it has one on disk, else its bytes in a temporary file (``temp``,
    removed by the caller), since snapshot files are read by path."""
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f), None
    name = getattr(f, 'name', None)
    if isinstance(name, str) and os.path.isfile(name) and f.tell() == 0:
        return name, None
    data = f.read()
    fd, temp = tempfile.mkstemp(suffix='.pkl' if data[:2] != b'PK' else '.pt')
    with os.fdopen(fd, 'wb') as out:
        out.write(data)
    return temp, temp


def _with_fp16(record: dict) -> dict:
    """The record with fp16 in the highest resolutions and conv clamping, the rest as recorded."""
    record = copy.deepcopy(record)
    kwargs = record.setdefault('init_kwargs', {})
    target = kwargs.get('synthesis_kwargs') if isinstance(kwargs.get('synthesis_kwargs'), dict) else kwargs
    target['num_fp16_res'] = FP16_RES
    target['conv_clamp'] = FP16_CONV_CLAMP
    return record
