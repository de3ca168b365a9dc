"""Statistics reported from anywhere in training, gathered across ranks and summarised per tick.

``report(name, value)`` is cheap and may be called from losses and hooks; ``Collector.update()`` reduces the
moments (count, sum, sum of squares) over every rank, so each rank logs the same numbers.
"""

import re

import numpy as np
import torch

import dnnlib

_num_moments = 3                # [count, sum, sum of squares]
_reduce_dtype = torch.float64
_rank = 0
_sync_device = None             # Device for all_reduce (cuda for NCCL); None = no reduction.
_sync_called = False
_counters = dict()              # name -> device -> moments tensor
_cumulative = dict()            # name -> moments tensor (float64, cpu)


def init_multiprocessing(rank: int, sync_device) -> None:
    """Set this process's rank and the device used to reduce statistics (None for single-process runs)."""
    global _rank, _sync_device
    assert not _sync_called
    _rank = rank
    _sync_device = sync_device


def reset() -> None:
    """Forget every counter (for tests and for a second run in the same process)."""
    global _sync_called
    _counters.clear()
    _cumulative.clear()
    _sync_called = False


def report(name: str, value):
    """Record one or many scalar values under ``name``; returns ``value`` so it can wrap expressions."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_reduce_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value


def report0(name: str, value):
    """Like ``report`` but only rank 0 contributes (values every rank knows anyway)."""
    report(name, value if _rank == 0 else [])
    return value


def _sync(names):
    global _sync_called
    if len(names) == 0:
        return []
    _sync_called = True
    deltas = []
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_reduce_dtype, device=device)
        for counter in _counters.get(name, {}).values():
            delta.add_(counter.to(device))
            counter.copy_(torch.zeros_like(counter))
        deltas.append(delta)
    deltas = torch.stack(deltas)
    if _sync_device is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_reduce_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]


class Collector:
    """Summarise reported statistics between calls of ``update()``: mean, std and count per name."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self):
        return [name for name in _counters if self._regex.fullmatch(name)]

    def update(self) -> None:
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_reduce_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name):
        assert self._regex.fullmatch(name)
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_reduce_dtype)
        return self._moments[name]

    def num(self, name) -> int:
        return int(self._get_delta(name)[0])

    def mean(self, name) -> float:
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name) -> float:
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - mean ** 2, 0)))

    def as_dict(self) -> dnnlib.EasyDict:
        stats = dnnlib.EasyDict()
        for name in self._moments:
            stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name) -> float:
        return self.mean(name)
