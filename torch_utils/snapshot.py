"""Safe snapshots: networks saved as (class_name, init_kwargs, state_dict), loaded with weights_only=True.

StyleGAN2-ADA pickles whole modules, so loading a snapshot runs whatever code the pickle names. Here a
snapshot holds plain data only; loading rebuilds each network from a class of this project and its recorded
constructor arguments. An NVlabs ``.pkl`` is read by ``torch_utils.legacy``'s restricted unpickler, which runs
no code from the file and hands back the same plain data, so both kinds load through one path.
"""

import copy
import hashlib
import json
import functools
import inspect
import os

import torch

import dnnlib
from torch_utils import legacy
from torch_utils.snapshot_errors import SNAPSHOT_FORMAT, PickleRefused, SnapshotError

__all__ = ['SNAPSHOT_FORMAT', 'SnapshotError', 'PickleRefused', 'CLASS_ALIASES', 'current_class_name', 'upgrade_names',
           'persistent_class', 'build_module', 'save_snapshot', 'load_snapshot', 'read_snapshot_data']

# The classes a snapshot may name (networks, augmentation, and the hooks inside their init_kwargs), and those a run
# dir's training_options.json may name besides. Every ``class_name`` read from a file is checked against these
# strings (after CLASS_ALIASES) before anything is imported: a file cannot make a tool import a module, whose
# import-time code would run, nor build a class of some other library.
SNAPSHOT_CLASSES = frozenset({
    'training.networks.Generator', 'training.networks.Discriminator',
    'training.paint.PaintGenerator', 'training.paint.PaintDiscriminator',
    'training.augment.AugmentPipe',
    'training.attention.SelfAttention', 'training.fq.FeatureQuantizer',
})
CONFIG_CLASSES = SNAPSHOT_CLASSES | frozenset({
    'training.dataset.ImageFolderDataset', 'torch.optim.Adam',
    'training.loss.StyleGAN2Loss', 'training.paint_loss.PaintLoss', 'training.topk.TopK',
    'mri.painting.masks.RepaintMasks',
})

# Names that snapshots and run dirs of earlier versions recorded -> the name of today's class. A class that
# takes over an old one may define ``upgrade_record(old_name, init_kwargs, state_dict)`` to map the recorded
# arguments and tensors (the 3D networks, e.g., became the one network family at spatial_dims=3).
CLASS_ALIASES = {
    'mri.networks3d.Generator':     'training.networks.Generator',
    'mri.networks3d.Discriminator': 'training.networks.Discriminator',
    'mri.augment3d.AugmentPipe3d':  'training.augment.AugmentPipe',
    'mri.attention.SelfAttention':  'training.attention.SelfAttention',
    'mri.fq.FeatureQuantizer':      'training.fq.FeatureQuantizer',
    'mri.topk.TopK':                'training.topk.TopK',
}


def current_class_name(name):
    """Today's name for a class name recorded by an earlier version (the name itself when it is current)."""
    return CLASS_ALIASES.get(name, name) if isinstance(name, str) else name


def upgrade_names(value):
    """A copy of plain data with every nested ``class_name`` mapped through CLASS_ALIASES (hooks inside
    ``init_kwargs``, components of ``training_options.json``)."""
    if isinstance(value, dict):
        return {k: (current_class_name(v) if k == 'class_name' else upgrade_names(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [upgrade_names(v) for v in value]
    return value


def check_class_names(value, allowed: frozenset, source: str) -> None:
    """Raise SnapshotError (one line naming ``source``) when plain data ``value`` names, at any depth, a
    ``class_name`` that is not in ``allowed`` (names of earlier versions mapped through CLASS_ALIASES first)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == 'class_name':
                name = current_class_name(item)
                if not isinstance(name, str) or name not in allowed:
                    raise SnapshotError(f'{source}: names class {item!r}, which is not one of this project\'s '
                                        f'classes; refused before anything was imported')
            else:
                check_class_names(item, allowed, source)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_class_names(item, allowed, source)


def _is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _to_plain(value):
    """Tuples become lists and EasyDicts plain dicts, so init_kwargs survive weights_only loading."""
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def persistent_class(cls):
    """Class decorator: record constructor arguments as ``self.init_kwargs`` and the dotted ``class_name``.

    Arguments must be plain data (numbers, strings, lists, dicts, None) so that the snapshot can rebuild the
    module without unpickling code.
    """
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    orig_init = cls.__init__
    signature = inspect.signature(orig_init)

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()  # Defaults are recorded too: a later change of a default keeps old snapshots intact.
        record = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = signature.parameters[name].kind
            if kind == inspect.Parameter.VAR_KEYWORD:
                record.update(value)
            elif kind == inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f'{cls.__qualname__}: positional *args cannot be recorded in a snapshot')
            else:
                record[name] = value
        for name, value in record.items():
            if not _is_plain(value):
                raise TypeError(f'{cls.__qualname__}: argument {name!r} is {type(value).__name__}; '
                                f'snapshot classes take plain data only')
        orig_init(self, *args, **kwargs)
        # Only the outermost persistent class of an inheritance chain sets the record.
        if type(self) is cls or not hasattr(self, 'init_kwargs'):
            self.init_kwargs = copy.deepcopy(_to_plain(record))
            self.class_name = f'{type(self).__module__}.{type(self).__qualname__}'

    cls.__init__ = __init__
    cls._persistent = True
    return cls


def module_record(module: torch.nn.Module) -> dict:
    if not getattr(module, '_persistent', False):
        raise SnapshotError(f'{type(module).__qualname__} is not a persistent_class; cannot be snapshotted')
    return {
        'class_name': module.class_name,
        'init_kwargs': copy.deepcopy(module.init_kwargs),
        'state_dict': {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
    }


MAX_ARGUMENT = 1 << 20  # No size argument of this project's classes (widths, latents, sides) comes near it.


def _first_too_large(value, key='') -> str:
    """'key=value' of the first integer argument (at any depth) above MAX_ARGUMENT, or ''."""
    if isinstance(value, dict):
        return next((t for k, v in value.items() if (t := _first_too_large(v, k))), '')
    if isinstance(value, (list, tuple)):
        return next((t for v in value if (t := _first_too_large(v, key))), '')
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ARGUMENT:
        return f'{key}={value}'
    return ''


def build_module(record: dict, source: str = '<snapshot>') -> torch.nn.Module:
    recorded_name = record.get('class_name')
    class_name = current_class_name(recorded_name)
    if not isinstance(class_name, str) or class_name not in SNAPSHOT_CLASSES:
        raise SnapshotError(f'{source}: refuses to build {recorded_name!r}: only classes of this project '
                            f'(SNAPSHOT_CLASSES) are built from snapshots')
    check_class_names(record.get('init_kwargs'), SNAPSHOT_CLASSES, source)  # Hooks inside: attention, quantizers.
    cls = dnnlib.get_obj_by_name(class_name)
    if not getattr(cls, '_persistent', False):
        raise SnapshotError(f'{source}: {class_name} is not a snapshot class')
    init_kwargs, state_dict = upgrade_names(record['init_kwargs']), record['state_dict']
    if class_name != recorded_name and hasattr(cls, 'upgrade_record'):
        init_kwargs, state_dict = cls.upgrade_record(recorded_name, init_kwargs, dict(state_dict))
    too_large = _first_too_large(init_kwargs)
    if too_large:  # Before anything is allocated: a claim of 2**40 latents would die in the allocator.
        raise SnapshotError(f'{source}: {class_name} records {too_large}, beyond any network of this project '
                            f'(at most {MAX_ARGUMENT}); a damaged or crafted snapshot')
    try:
        module = cls(**init_kwargs)
    except (TypeError, ValueError) as err:  # Arguments this version of the class does not take.
        raise SnapshotError(f'{source}: cannot build {class_name} from its recorded arguments ({err})') from None
    except (RuntimeError, MemoryError) as err:  # The allocator refusing what the arguments ask for.
        raise SnapshotError(f'{source}: cannot build {class_name}: its recorded arguments ask for more memory '
                            f'than there is ({str(err).splitlines()[0][:120]})') from None
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # Shape mismatches.
        raise SnapshotError(f'{source}: {class_name} state does not fit its constructor '
                            f'({str(err).splitlines()[-1].strip()[:200]})') from None
    if missing or unexpected:
        raise SnapshotError(f'{source}: {class_name} state does not fit its constructor '
                            f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
    return module


def atomic_torch_save(obj, path: str) -> None:
    """torch.save beside the target, then rename: a killed run never leaves half a file."""
    with dnnlib.atomic_output(path, suffix='.pt') as tmp:
        torch.save(obj, tmp)


def modules_checksum(modules: dict) -> str:
    """sha256 of a snapshot's module records: names, constructor arguments, and every tensor's name, dtype, shape
    and bytes. torch.load checks no CRC of the zip members, so a damaged file would otherwise load and be used."""
    h = hashlib.sha256()
    for name in sorted(modules):
        record = modules[name]
        h.update(f'{name}:'.encode())
        if record is None:
            continue
        h.update(json.dumps([record.get('class_name'), record.get('init_kwargs')], sort_keys=True, default=str).encode())
        for key in sorted(record.get('state_dict') or {}):
            t = record['state_dict'][key]
            h.update(f'{key}:{t.dtype}:{list(t.shape)}:'.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_snapshot(path: str, modules: dict, dataset: dict = None, extra: dict = None) -> None:
    """Write ``{format, modules: {name: record or None}, dataset, extra, checksum}`` atomically."""
    records = {name: (module_record(m) if m is not None else None) for name, m in modules.items()}
    data = {
        'format': SNAPSHOT_FORMAT,
        'modules': records,
        'dataset': _to_plain(dict(dataset or {})),
        'extra': _to_plain(dict(extra or {})),
        'checksum': modules_checksum(records),
    }
    atomic_torch_save(data, path)


def is_pickle(path: str) -> bool:
    """True for NVlabs-style pickles: a ``.pkl`` name, or not the zip container that ``torch.save`` writes."""
    with open(path, 'rb') as f:
        head = f.read(2)
    return str(path).endswith('.pkl') or head != b'PK'


def warn_allow_pickle() -> None:
    """--allow-pickle is kept so that old command lines still run; it no longer changes anything."""
    import sys
    print('--allow-pickle is deprecated and ignored: NVlabs .pkl files are read without running code from them',
          file=sys.stderr, flush=True)


def read_snapshot_data(path: str) -> dict:
    """The plain data of a snapshot: a ``.pt`` through ``torch.load(weights_only=True)``, an NVlabs ``.pkl``
    through the restricted unpickler of ``torch_utils.legacy``. Nothing is built yet."""
    path = str(path)
    if not os.path.isfile(path):
        raise SnapshotError(f'{path}: no such snapshot file')
    if is_pickle(path):
        return legacy.read_nvlabs_pickle(path)
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or hostile files.
        raise SnapshotError(f'{path}: not a readable snapshot ({type(err).__name__}: {str(err).splitlines()[0][:200]})') from None
    if isinstance(data, dict) and 'checksum' in data:  # Snapshots written before checksums load as they are.
        try:
            intact = data['checksum'] == modules_checksum(data.get('modules') or {})
        except Exception:  # A damaged record may not even be hashable as one.
            intact = False
        if not intact:
            raise SnapshotError(f'{path}: damaged: its contents do not match the checksum written with them (a disk '
                                f'or copy error?); use another snapshot of the run')
    return data


def load_snapshot(path: str, device='cpu', allow_pickle: bool = None) -> dnnlib.EasyDict:
    """Load a snapshot (ours or an NVlabs pickle): ``EasyDict(G, D, G_ema, augment_pipe, dataset, extra)`` with
    modules on ``device``. ``allow_pickle`` is ignored: pickles are read without running code."""
    path = str(path)
    data = read_snapshot_data(path)
    if not isinstance(data, dict) or data.get('format') != SNAPSHOT_FORMAT:
        raise SnapshotError(f'{path}: not a snapshot of this project (format {data.get("format") if isinstance(data, dict) else None!r})')
    if not isinstance(data.get('modules'), dict) or not all(isinstance(r, dict) or r is None for r in data['modules'].values()):
        raise SnapshotError(f'{path}: damaged: its "modules" is not a table of network records')
    out = dnnlib.EasyDict(G=None, D=None, G_ema=None, augment_pipe=None)
    for name, record in data['modules'].items():
        out[name] = None if record is None else build_module(record, path).to(device).eval().requires_grad_(False)
    out.dataset = dnnlib.EasyDict(data.get('dataset') or {})
    out.extra = dnnlib.EasyDict(data.get('extra') or {})
    return out


def load_generator(path: str, device='cpu', name: str = None):
    """``(snapshot data, G)`` where G is the snapshot's G_ema, else its G (what every tool samples from);
    SnapshotError naming ``name`` (default the path) when it holds neither."""
    data = load_snapshot(path, device=device)
    G = data.G_ema if data.G_ema is not None else data.G
    if G is None:
        raise SnapshotError(f'{name or path}: holds no generator')
    return data, G
