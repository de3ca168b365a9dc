"""Build pickles in NVlabs' ``torch_utils.persistence`` format from our networks, without NVlabs' code.

Each network becomes what NVlabs' ``pickle.dump`` writes: a call ``torch_utils.persistence.
_reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src, class_name, state}``, where
``state`` is the module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules`` of further persistent
objects, hook dicts, scalar attributes such as numpy ``weight_gain``s, ``_init_args``/``_init_kwargs``).
The ``torch_utils.persistence`` module exists only while the pickle is written (a stand-in in
``sys.modules``), so a loader that tried to import or run it would fail or leave the marker file.
"""

import collections
import pickle
import sys
import types

import numpy as np
import torch

import dnnlib

PERSISTENCE = 'torch_utils.persistence'


def module_source(marker: str) -> str:
    """A module source that, if anyone executed it, would create ``marker``."""
    return (f'import pathlib\npathlib.Path({marker!r}).touch()\n'
            f'class Generator: pass\nclass Discriminator: pass\nclass AugmentPipe: pass\n')


class _Persistent:
    """Pickles as NVlabs' Decorator.__reduce__ does: (_reconstruct_persistent_obj, (meta,))."""

    def __init__(self, reconstruct, meta):
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return (self.reconstruct, (self.meta,))


def _as_nvlabs(param):
    """NVlabs keeps the weights of fp16 blocks channels_last: store 4-D weights so (same values, other strides)."""
    if param is None or param.ndim != 4:
        return param
    return torch.nn.Parameter(param.detach().contiguous(memory_format=torch.channels_last), requires_grad=param.requires_grad)


def _nvlabs_buffer(name, tensor):
    """NVlabs' setup_filter expands a low-pass of fewer than 8 taps into its 2-D outer product, and its layers
    store that: our 1-D ``resample_filter`` [1,3,3,1]/8 is stored as the 4x4 [1,3,3,1]^T[1,3,3,1]/64."""
    if name == 'resample_filter' and tensor.ndim == 1 and tensor.numel() < 8:
        return torch.outer(tensor, tensor)
    return tensor


def _module_state(module, reconstruct, src, init_kwargs):
    state = {
        'training': module.training,
        '_parameters': collections.OrderedDict((k, _as_nvlabs(v)) for k, v in module._parameters.items()),
        '_buffers': collections.OrderedDict((k, _nvlabs_buffer(k, v)) for k, v in module._buffers.items()
                                            if k not in module._non_persistent_buffers_set),
        '_non_persistent_buffers_set': set(),
        '_backward_hooks': collections.OrderedDict(),
        '_forward_hooks': collections.OrderedDict(),
        '_forward_pre_hooks': collections.OrderedDict(),
        '_state_dict_hooks': collections.OrderedDict(),
        '_load_state_dict_pre_hooks': collections.OrderedDict(),
        '_modules': collections.OrderedDict(),
        'weight_gain': np.float64(0.125),  # NVlabs layers keep numpy scalars in __dict__.
        '_init_args': (),
        '_init_kwargs': init_kwargs if init_kwargs is not None else dnnlib.EasyDict(),
    }
    for name, child in module._modules.items():
        state['_modules'][name] = None if child is None else _wrap(child, reconstruct, src, type(child).__name__, None)
    return state


def _wrap(module, reconstruct, src, class_name, init_kwargs):
    meta = dict(type='class', version=6, module_src=src, class_name=class_name,
                state=_module_state(module, reconstruct, src, init_kwargs))
    return _Persistent(reconstruct, meta)


def nvlabs_record(module, class_name, init_kwargs, reconstruct, src, extra_buffers=None):
    obj = _wrap(module, reconstruct, src, class_name, dnnlib.EasyDict(init_kwargs))
    for name, value in (extra_buffers or {}).items():
        obj.meta['state']['_buffers'][name] = value
    return obj


def write_nvlabs_pickle(path, nets: dict, marker: str, protocol: int = 4, training_set_kwargs=None, extra_src=''):
    """``nets``: key -> (module, NVlabs class name, init kwargs[, extra buffers]). Writes ``path``."""
    fake = types.ModuleType(PERSISTENCE)

    def _reconstruct_persistent_obj(meta):  # Never to be called by a loader: it leaves the marker.
        open(marker, 'w').close()

    _reconstruct_persistent_obj.__module__ = PERSISTENCE
    _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    previous = sys.modules.get(PERSISTENCE)
    sys.modules[PERSISTENCE] = fake
    try:
        src = module_source(marker) + extra_src
        data = {key: nvlabs_record(spec[0], spec[1], spec[2], _reconstruct_persistent_obj, src,
                                   spec[3] if len(spec) > 3 else None)
                for key, spec in nets.items()}
        data['training_set_kwargs'] = dnnlib.EasyDict(training_set_kwargs or {})
        with open(path, 'wb') as f:
            pickle.dump(data, f, protocol=protocol)
    finally:
        if previous is None:
            del sys.modules[PERSISTENCE]
        else:
            sys.modules[PERSISTENCE] = previous
    return path


def tiny_nvlabs_nets(img_channels=3, c_dim=2, res=8, seed=0):
    """A tiny G, G_ema, D and augment pipe of ours with NVlabs-style constructor arguments."""
    from training.augment import AugmentPipe
    from training.networks import Discriminator, Generator
    torch.manual_seed(seed)
    g_kwargs = dict(z_dim=8, c_dim=c_dim, w_dim=8, img_resolution=res, img_channels=img_channels,
                    mapping_kwargs=dnnlib.EasyDict(num_layers=2),
                    synthesis_kwargs=dnnlib.EasyDict(channel_base=64, channel_max=8, num_fp16_res=0, conv_clamp=None))
    d_kwargs = dict(c_dim=c_dim, img_resolution=res, img_channels=img_channels, architecture='resnet',
                    channel_base=64, channel_max=8, num_fp16_res=0, conv_clamp=None,
                    block_kwargs=dnnlib.EasyDict(), mapping_kwargs=dnnlib.EasyDict(num_layers=2),
                    epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=2))
    a_kwargs = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1)
    G = Generator(**g_kwargs).eval()
    G_ema = Generator(**g_kwargs).eval()
    with torch.no_grad():  # Non-trivial values everywhere (noise strengths and w_avg start at zero).
        for net in (G, G_ema):
            for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
                if tensor.is_floating_point() and not name.endswith('resample_filter'):  # Filters are constants.
                    tensor.add_(torch.randn_like(tensor) * 0.1)
    D = Discriminator(**d_kwargs).eval()
    pipe = AugmentPipe(**a_kwargs)
    pipe.p.fill_(0.3)
    extra = {'Hz_geom': torch.randn(12), 'Hz_fbank': torch.randn(4, 23)}  # NVlabs' filter constants.
    return dict(G=(G, 'Generator', g_kwargs), G_ema=(G_ema, 'Generator', g_kwargs), D=(D, 'Discriminator', d_kwargs),
                augment_pipe=(pipe, 'AugmentPipe', a_kwargs, extra))
