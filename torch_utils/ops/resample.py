"""Resampling for any number of spatial dimensions: the FIR filter ops of StyleGAN2, dispatched on tensor rank.

The networks of ``training/`` call these and never name a dimension: 4-D tensors [N, C, H, W] go to
``upfirdn2d`` / ``conv2d_resample`` (CUDA plugin with a pure-PyTorch reference, unchanged), 5-D tensors
[N, C, D, H, W] to ``upfirdn3d`` / ``conv3d_resample`` (separable pure-PyTorch passes). Filters are 1-D taps
(``setup_filter``), applied along every spatial axis, so one buffer serves both ranks.

Semantics are those of the 2D ops (Karras et al. 2020, App. B): ``upsample`` by an integer factor with the filter
centred on the fine grid, ``downsample`` by filtering and keeping every ``down``-th sample, and
``conv_resample`` a convolution fused with either.
"""

import torch

from torch_utils.ops import conv2d_resample as _conv2d
from torch_utils.ops import upfirdn2d as _upfirdn2d
from torch_utils.ops import upfirdn3d as _upfirdn3d

__all__ = ['setup_filter', 'upsample', 'downsample', 'conv_resample', 'SPATIAL_RANKS']

SPATIAL_RANKS = (4, 5)  # Tensor ranks the ops take: images [N, C, H, W] and volumes [N, C, D, H, W].


def _check_rank(x: torch.Tensor, op: str) -> None:
    if x.ndim not in SPATIAL_RANKS:
        raise ValueError(f'{op}: needs [N, C, H, W] or [N, C, D, H, W], got shape {tuple(x.shape)}')


def setup_filter(f, device=torch.device('cpu')) -> torch.Tensor:
    """1-D taps normalised to sum 1 (so the separable filter of any dimension has unit DC gain)."""
    return _upfirdn2d.setup_filter(f, device=device, separable=True)


def upsample(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Upsample every spatial axis by ``up`` with the low-pass ``f`` (output size in * up); keeps the mean."""
    _check_rank(x, 'upsample')
    if x.ndim == 4:
        return _upfirdn2d.upsample2d(x, f, up=up)
    return _upfirdn3d.upsample3d(x, f, up=up)


def downsample(x: torch.Tensor, f: torch.Tensor, down: int = 2) -> torch.Tensor:
    """Low-pass every spatial axis with ``f`` and keep every ``down``-th sample (output size in // down)."""
    _check_rank(x, 'downsample')
    if x.ndim == 4:
        return _upfirdn2d.downsample2d(x, f, down=down)
    return _upfirdn3d.downsample3d(x, f, down=down)


def conv_resample(
    x: torch.Tensor,                    # Input [N, C_in, *spatial] (2 or 3 spatial axes).
    w: torch.Tensor,                    # Weight [C_out, C_in / groups, *kernel], of x's rank and dtype.
    f: torch.Tensor = None,             # 1-D FIR filter for up/down; None = no filtering.
    up: int = 1,                        # Integer upsampling factor.
    down: int = 1,                      # Integer downsampling factor.
    padding: int = 0,                   # Padding of the convolution (k // 2 keeps the size).
    groups: int = 1,                    # Groups of the convolution.
    flip_weight: bool = True,           # True = correlation (torch's convNd), False = true convolution.
) -> torch.Tensor:
    """A convolution fused with FIR up- or downsampling (see conv2d_resample for the exact semantics)."""
    _check_rank(x, 'conv_resample')
    if w.ndim != x.ndim:
        raise ValueError(f'conv_resample: weight of rank {w.ndim} for input of rank {x.ndim}')
    if x.ndim == 4:
        return _conv2d.conv2d_resample(x=x, w=w, f=f, up=up, down=down, padding=padding, groups=groups,
                                       flip_weight=flip_weight)
    return _upfirdn3d.conv3d_resample(x, w, f=f, up=up, down=down, padding=padding, groups=groups,
                                      flip_weight=flip_weight)
