"""NVlabs StyleGAN2-ADA network pickles (``network-snapshot-*.pkl``), read without running code from the file.

NVlabs' ``torch_utils.persistence`` pickles every network as a call ``_reconstruct_persistent_obj(meta)``;
``meta`` records the class's module source, the class name and the object's ``__dict__`` (parameters,
buffers, sub-modules, constructor arguments). A plain ``pickle.load`` would ``exec`` that source, and any
pickle may name any callable. Here a restricted unpickler admits only the globals that rebuild tensors,
numpy scalars/arrays and containers, each replaced by a checked function of this file; a persistent object
becomes a plain record of its meta (the source is kept as text and never executed). The networks are then
rebuilt as classes of this project from the recorded constructor arguments and tensors, so what comes back is
the same ``{format, modules, dataset, extra}`` data that ``torch_utils.snapshot`` builds from a ``.pt``.

Our state-dict names are StyleGAN2-ADA's (``mapping.fc0.weight``, ``synthesis.b8.conv0.affine.bias``,
``b4.out.weight``, ...), so tensors copy by name; only constants that NVlabs keeps as buffers and we
recompute (the augmentation filters) are dropped, and the low-pass ``resample_filter`` buffers, which NVlabs
stores as 4x4 outer products, become the 1-D taps our separable filters keep (checked to be such a product).
"""

import collections
import io
import pickle
import warnings

import numpy as np
import torch

import dnnlib
from torch_utils.snapshot_errors import SNAPSHOT_FORMAT, PickleRefused, SnapshotError

# NVlabs class (the ``class_name`` in a persistent record) -> the class of this project that replaces it.
NVLABS_CLASSES = {
    'Generator':     'training.networks.Generator',
    'Discriminator': 'training.networks.Discriminator',
    'AugmentPipe':   'training.augment.AugmentPipe',
}

# NVlabs' positional order of constructor arguments: a persistent record keeps ``args`` as they were passed.
_POSITIONAL = {
    'Generator': ['z_dim', 'c_dim', 'w_dim', 'img_resolution', 'img_channels', 'mapping_kwargs', 'synthesis_kwargs'],
    'Discriminator': ['c_dim', 'img_resolution', 'img_channels', 'architecture', 'channel_base', 'channel_max',
                      'num_fp16_res', 'conv_clamp', 'cmap_dim', 'block_kwargs', 'mapping_kwargs', 'epilogue_kwargs'],
    'AugmentPipe': ['xflip', 'rotate90', 'xint', 'xint_max', 'scale', 'rotate', 'aniso', 'xfrac', 'scale_std',
                    'rotate_max', 'aniso_std', 'xfrac_std', 'brightness', 'contrast', 'lumaflip', 'hue', 'saturation',
                    'brightness_std', 'contrast_std', 'hue_max', 'saturation_std', 'imgfilter', 'imgfilter_bands',
                    'imgfilter_std', 'noise', 'cutout', 'noise_std', 'cutout_size'],
}

# Where NVlabs' defaults differ from ours, a record that omits the argument meant NVlabs' default.
_NVLABS_DEFAULTS = {
    'Generator': {'synthesis_kwargs': {'num_fp16_res': 0, 'conv_clamp': None}},
    'Discriminator': {'num_fp16_res': 0, 'conv_clamp': None},
}

# Buffers NVlabs stores that are constants of its code (ours are recomputed and not saved).
_DROPPED_STATE = {'AugmentPipe': {'Hz_geom', 'Hz_fbank'}}

_NETWORK_KEYS = ('G', 'D', 'G_ema', 'augment_pipe')


# ----------------------------------------------------------------------------------------------------------------
# The admitted globals. Each is a function of this file that checks its arguments; none runs code of the file.

class PersistentRecord:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` would have built, kept as data."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or not isinstance(meta.get('class_name'), str) or not isinstance(meta.get('state'), dict):
            raise SnapshotError('persistent object without a class name and a state dict')
        if meta.get('type', 'class') != 'class':
            raise SnapshotError(f'persistent object of type {meta.get("type")!r}; only classes are supported')
        self.class_name = meta['class_name']
        self.version = meta.get('version')
        self.module_src = meta.get('module_src')  # Text only: never compiled or executed.
        self.state = meta['state']

    def __repr__(self):
        return f'PersistentRecord({self.class_name})'


def _reconstruct_persistent_obj(meta):
    return PersistentRecord(meta)


def _load_storage(data):
    """A storage pickled by ``TypedStorage.__reduce__``: bytes in torch's legacy format, read with weights_only."""
    if not isinstance(data, (bytes, bytearray)):
        raise SnapshotError(f'tensor storage given as {type(data).__name__}, expected bytes')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TypedStorage deprecation notices.
        try:
            storage = torch.load(io.BytesIO(bytes(data)), map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            raise SnapshotError('a tensor storage in the pickle names code; refused by torch.load(weights_only=True)') from None
        except Exception as err:  # torch raises many types for a corrupt payload.
            raise SnapshotError(f'unreadable tensor storage ({type(err).__name__}: {str(err).splitlines()[0][:160]})') from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise SnapshotError(f'tensor storage holds {type(storage).__name__}')
    return storage


def _no_hooks(hooks):
    if hooks:
        raise SnapshotError('a tensor in the pickle carries backward hooks (code); refused')


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise SnapshotError(f'tensor rebuilt from {type(storage).__name__}, not a storage')
    _no_hooks(backward_hooks)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch._utils._rebuild_tensor_v2(storage, int(storage_offset), tuple(size), tuple(stride), bool(requires_grad),
                                               collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise SnapshotError(f'parameter rebuilt from {type(data).__name__}, not a tensor')
    _no_hooks(backward_hooks)
    if state:
        raise SnapshotError('a parameter in the pickle carries extra state; refused')
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _rebuild_from_type(func, new_type, args, state):
    if func is not _rebuild_tensor or new_type not in (torch.Tensor, torch.nn.Parameter) or state:
        raise SnapshotError('a tensor subclass or a tensor with extra state in the pickle; refused')
    return func(*args)


def _numpy_dtype(*args):
    dtype = np.dtype(*args[:1])
    if dtype.kind not in 'biufc':
        raise SnapshotError(f'numpy dtype {dtype} in the pickle; only numeric dtypes are admitted')
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, (bytes, bytearray)):
        raise SnapshotError('numpy scalar that is not a number; refused')
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _numpy_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise SnapshotError('numpy array subclass in the pickle; refused')
    return np.ndarray.__new__(np.ndarray, shape, _numpy_dtype(dtype) if not isinstance(dtype, np.dtype) else dtype)


def _codecs_encode(text, encoding='utf-8'):
    # Protocol 2 writes bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise SnapshotError('_codecs.encode with anything but a latin1 string; refused')
    return text.encode('latin1')


def _numpy_globals():
    found = {}
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # numpy 1.x and 2.x pickles.
        found[(module, 'scalar')] = _numpy_scalar
        found[(module, '_reconstruct')] = _numpy_reconstruct
    found[('numpy', 'dtype')] = _numpy_dtype
    found[('numpy', 'ndarray')] = np.ndarray
    return found


ADMITTED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type,
    ('torch.storage', '_load_from_bytes'): _load_storage,
    ('torch', 'Tensor'): torch.Tensor,
    ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('__builtin__', 'set'): set,
    ('__builtin__', 'frozenset'): frozenset,
    ('_codecs', 'encode'): _codecs_encode,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('dnnlib', 'EasyDict'): dnnlib.EasyDict,
    **_numpy_globals(),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        found = ADMITTED.get((module, name))
        if found is None:
            raise PickleRefused(f'{self.source}: refuses to unpickle {module}.{name}: only tensors, numpy arrays and '
                                f'containers are admitted (anything else could run code from the file)')
        return found

    def persistent_load(self, pid):
        raise PickleRefused(f'{self.source}: refuses a persistent id in the pickle ({str(pid)[:60]!r})')


def restricted_load(path: str):
    """Unpickle ``path`` with only the admitted globals; raises PickleRefused or SnapshotError (one line)."""
    with open(path, 'rb') as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except PickleRefused:
            raise
        except SnapshotError as err:
            raise SnapshotError(f'{path}: {err}') from None
        except Exception as err:  # Truncated or malformed streams raise many types.
            raise SnapshotError(f'{path}: not a readable pickle ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ""})') from None


# ----------------------------------------------------------------------------------------------------------------
# Records -> this project's snapshot data.

def _plain(value, where: str):
    """Constructor arguments as plain data (EasyDicts become dicts, numpy scalars numbers, tuples lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise SnapshotError(f'{where}: constructor argument of type {type(value).__name__} is not plain data')


def _tensors(record: PersistentRecord, prefix: str, out: dict) -> None:
    """Parameters and persistent buffers of a record and its sub-modules, under state-dict names."""
    state = record.state
    skip = set(state.get('_non_persistent_buffers_set') or ())
    for kind in ('_parameters', '_buffers'):
        for name, tensor in (state.get(kind) or {}).items():
            if tensor is None or (kind == '_buffers' and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise SnapshotError(f'{record.class_name}.{prefix}{name} is {type(tensor).__name__}, not a tensor')
            out[prefix + name] = tensor.detach()
    for name, child in (state.get('_modules') or {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise SnapshotError(f'sub-module {prefix}{name} is {type(child).__name__}, not a persistent object')
        _tensors(child, f'{prefix}{name}.', out)


def _init_kwargs(record: PersistentRecord, where: str) -> dict:
    cls = record.class_name
    args = list(record.state.get('_init_args') or ())
    kwargs = dict(record.state.get('_init_kwargs') or {})
    if len(args) > len(_POSITIONAL[cls]):
        raise SnapshotError(f'{where}: {cls} records {len(args)} positional arguments; NVlabs\' takes at most {len(_POSITIONAL[cls])}')
    kwargs.update(zip(_POSITIONAL[cls], args))
    kwargs = _plain(kwargs, where)
    for key, default in _NVLABS_DEFAULTS.get(cls, {}).items():
        if isinstance(default, dict):
            kwargs[key] = {**default, **(kwargs.get(key) or {})}
        else:
            kwargs.setdefault(key, default)
    return kwargs


def _separable_taps(f2d: torch.Tensor, where: str) -> torch.Tensor:
    """NVlabs stores a short low-pass filter as its 2-D outer product (``setup_filter`` expands filters of fewer
    than 8 taps); ours keep the 1-D taps g of the separable filter. f2d = outer(g, g) with sum(g) > 0, so the row
    sums are g * sum(g) and sum(f2d) = sum(g)^2: g = rowsum / sqrt(sum). Anything that is not such an outer product
    is refused, since the networks here filter separably."""
    k = f2d.shape[0]
    total = float(f2d.double().sum())
    if f2d.shape != (k, k) or not total > 0:
        raise SnapshotError(f'{where}: filter of shape {tuple(f2d.shape)} is not a separable low-pass (square, positive sum)')
    taps = (f2d.double().sum(dim=1) / total ** 0.5)
    if not torch.allclose(torch.outer(taps, taps), f2d.double(), rtol=1e-5, atol=1e-8):
        raise SnapshotError(f'{where}: the {k}x{k} filter is not the outer product of one 1-D filter; only separable '
                            f'filters are rebuilt')
    return taps.to(f2d.dtype)


def module_from_record(record, where: str) -> dict:
    """A persistent record of an NVlabs network -> ``{class_name, init_kwargs, state_dict}`` of ours."""
    if not isinstance(record, PersistentRecord):
        raise SnapshotError(f'{where} is {type(record).__name__}, not an NVlabs persistent network')
    if isinstance(record.module_src, str) and 'class SynthesisInput' in record.module_src:  # Read as text only.
        raise SnapshotError(f'{where} is a StyleGAN3 {record.class_name}; only StyleGAN2-ADA networks are rebuilt')
    if record.class_name not in NVLABS_CLASSES:
        raise SnapshotError(f'{where} is an NVlabs {record.class_name}; only {", ".join(NVLABS_CLASSES)} '
                            f'(StyleGAN2-ADA) are rebuilt')
    state_dict = {}
    _tensors(record, '', state_dict)
    for name in _DROPPED_STATE.get(record.class_name, ()):
        state_dict.pop(name, None)
    for name, tensor in list(state_dict.items()):
        if name.split('.')[-1] == 'resample_filter' and tensor.ndim == 2:
            state_dict[name] = _separable_taps(tensor, f'{where}: {name}')
    return dict(class_name=NVLABS_CLASSES[record.class_name], init_kwargs=_init_kwargs(record, where),
                state_dict=state_dict)


def _channel_names(num_channels: int) -> list:
    return {1: ['gray'], 3: ['red', 'green', 'blue']}.get(num_channels, [f'ch{i}' for i in range(num_channels)])


def read_nvlabs_pickle(path: str) -> dict:
    """An NVlabs snapshot pickle -> ``{format, modules, dataset, extra}`` as ``torch_utils.snapshot`` saves it.

    Nothing from the file is executed; a global outside the admitted set raises ``PickleRefused`` naming it.
    """
    data = restricted_load(path)
    if not isinstance(data, dict):
        raise SnapshotError(f'{path}: pickle holds {type(data).__name__}, expected a dict of networks')
    modules = {}
    for key in _NETWORK_KEYS:
        if data.get(key) is not None:
            modules[key] = module_from_record(data[key], f'{path}: {key}')
    if not modules:
        raise SnapshotError(f'{path}: holds none of {", ".join(_NETWORK_KEYS)}')
    generator = modules.get('G_ema') or modules.get('G')
    dataset = {}
    if generator is not None:
        kw = generator['init_kwargs']
        dataset = dict(resolution=kw.get('img_resolution'), channels=_channel_names(int(kw.get('img_channels', 3))),
                       label_names=[f'class{i}' for i in range(int(kw.get('c_dim', 0)))])
    train_kwargs = data.get('training_set_kwargs')
    extra = dict(source='nvlabs-pickle')
    if isinstance(train_kwargs, dict):
        try:
            extra['training_set_kwargs'] = _plain(train_kwargs, f'{path}: training_set_kwargs')
        except SnapshotError:
            pass  # Informational only; the networks do not depend on it.
    return dict(format=SNAPSHOT_FORMAT, modules=modules, dataset=dataset, extra=extra)
