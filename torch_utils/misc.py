"""Shape checks, cached constants, distributed and data-loading helpers and module summaries used across the
project."""

import contextlib
import functools
import os
import re
import signal
import threading
import warnings

import numpy as np
import torch

import dnnlib

_constant_cache = dict()


def constant(value, shape=None, dtype=None, device=None, memory_format=None) -> torch.Tensor:
    """A tensor built once per (value, shape, dtype, device) and reused: saves small allocations per step."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


@contextlib.contextmanager
def suppress_tracer_warnings():
    """Shape asserts compare traced values with python ints on purpose; keep the tracer quiet about it."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield


def assert_shape(tensor: torch.Tensor, ref_shape) -> None:
    """Assert ``tensor.shape`` matches ``ref_shape``; None entries match any size.

    Example: ``assert_shape(x, [None, C, H, W])  # [NCHW]``.
    """
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)} '
                             f'(shape {tuple(tensor.shape)} vs {tuple(ref_shape)})')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)), f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size} '
                                 f'(shape {tuple(tensor.shape)} vs {tuple(ref_shape)})')



def shift(x: torch.Tensor, offset) -> torch.Tensor:
    """``x`` moved by the integer ``offset``, one per trailing axis (``x [C, *S]`` with an offset per spatial axis
    leaves C alone); what leaves the array is dropped, zeros enter."""
    out = torch.zeros_like(x)
    src = dst = [slice(None)] * (x.ndim - len(offset))
    for size, d in zip(x.shape[x.ndim - len(offset):], offset):
        d = int(d)
        if abs(d) >= size:
            return out
        src = src + [slice(max(0, -d), size - max(0, d))]
        dst = dst + [slice(max(0, d), size - max(0, -d))]
    out[tuple(dst)] = x[tuple(src)]
    return out

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless index stream for the data loader: shuffled, sharded by rank, with a moving shuffle window.

    A window (fraction of the dataset) swaps each index with a nearby one so that epochs blend instead of
    restarting, as StyleGAN2-ADA's loader does; ``start_index`` lets a resumed run continue the stream.
    """

    def __init__(self, dataset, rank: int = 0, num_replicas: int = 1, shuffle: bool = True, seed: int = 0,
                 window_size: float = 0.5, start_index: int = 0):
        assert len(dataset) > 0
        assert num_replicas > 0 and 0 <= rank < num_replicas
        assert 0 <= window_size <= 1
        super().__init__()
        self.dataset_len = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size
        self.start_index = start_index

    def __iter__(self):
        order = np.arange(self.dataset_len)
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
            window = int(np.rint(order.size * self.window_size))
        idx = 0
        while True:
            i = idx % order.size
            if idx >= self.start_index and idx % self.num_replicas == self.rank:
                yield int(order[i])
            if window >= 2:
                j = (i - rnd.randint(window)) % order.size
                order[i], order[j] = order[j], order[i]
            idx += 1


# ---------------------------------------------------------------------------------------------------------------
# DataLoader workers and SIGTERM.

WORKER_SIGTERM_GRACE = 5.0  # seconds a DataLoader worker keeps serving after a SIGTERM


def _worker_sigterm(_signum, _frame):
    timer = threading.Timer(WORKER_SIGTERM_GRACE, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def _worker_init(worker_id, then=None):
    signal.signal(signal.SIGTERM, _worker_sigterm)
    if then is not None:
        then(worker_id)


def loader_worker_init(then=None):
    """The ``worker_init_fn`` of every DataLoader here (``then``: the dataset's own, called after).

    A SIGTERM sent to the whole process group (``timeout``, Slurm's ``scancel``, ``kill -- -PGID``) reaches the
    DataLoader workers too. By default a worker dies at once; the main process's DataLoader then raises "worker
    killed by signal: Terminated" before the main process's own SIGTERM handling (a snapshot and the training state,
    or one ``Interrupted (SIGTERM)`` line) can run. With this, a worker keeps serving for WORKER_SIGTERM_GRACE
    seconds, so a batch the main process is waiting for still arrives, then exits with status 0, which the
    DataLoader does not report. A worker never outlives its parent (torch's watchdog ends it)."""
    return functools.partial(_worker_init, then=then)


def close_loader(batches) -> None:
    """Stop the worker processes of a DataLoader's iterator now (an endless training stream never ends on its own):
    each worker is told to finish and joined, instead of being terminated by SIGTERM when the process exits."""
    shutdown = getattr(batches, '_shutdown_workers', None)  # torch's own shutdown of a multi-process iterator
    if shutdown is not None:
        shutdown()


def params_and_buffers(module: torch.nn.Module):
    return list(module.parameters()) + list(module.buffers())


def named_params_and_buffers(module: torch.nn.Module):
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False) -> None:
    """Copy every same-named tensor; used for G_ema, resume and --freezed transfers."""
    src = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name in src and src[name].shape == tensor.shape:
            tensor.copy_(src[name])
        elif require_all:
            raise KeyError(f'copy_params_and_buffers: {name} missing or of another shape in the source')


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce for all but the last accumulation round."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield


def check_ddp_consistency(module: torch.nn.Module, ignore_regex: str = None) -> None:
    """Assert every rank holds the same parameters and buffers (NaN-aware)."""
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            raise AssertionError(f'DDP ranks disagree on {fullname}')


def print_module_summary(module: torch.nn.Module, inputs, max_nesting: int = 3, skip_redundant: bool = True):
    """Print a table of submodule outputs, parameter and buffer counts after one forward pass."""
    assert isinstance(module, torch.nn.Module)
    assert isinstance(inputs, (tuple, list))
    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=outputs))

    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    outputs = module(*inputs)
    for hook in hooks:
        hook.remove()

    tensors_seen = set()
    for e in entries:
        e.unique_params = [t for t in e.mod.parameters() if id(t) not in tensors_seen]
        e.unique_buffers = [t for t in e.mod.buffers() if id(t) not in tensors_seen]
        e.unique_outputs = [t for t in e.outputs if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e.unique_params + e.unique_buffers + e.unique_outputs}
    if skip_redundant:
        entries = [e for e in entries if len(e.unique_params) or len(e.unique_buffers) or len(e.unique_outputs)]

    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    param_total = buffer_total = 0
    submodule_names = {mod: name for name, mod in module.named_modules()}
    for e in entries:
        name = '<top-level>' if e.mod is module else submodule_names[e.mod]
        param_size = sum(t.numel() for t in e.unique_params)
        buffer_size = sum(t.numel() for t in e.unique_buffers)
        output_shapes = [str(list(t.shape)) for t in e.outputs]
        output_dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs]
        rows.append([name + (':0' if len(e.outputs) >= 2 else ''), str(param_size) if param_size else '-',
                     str(buffer_size) if buffer_size else '-', (output_shapes + ['-'])[0], (output_dtypes + ['-'])[0]])
        for idx in range(1, len(e.outputs)):
            rows.append([name + f':{idx}', '-', '-', output_shapes[idx], output_dtypes[idx]])
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * 5, ['Total', str(param_total), str(buffer_total), '-', '-']]
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs
