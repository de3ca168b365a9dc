"""Stand-in hook classes for tests/test_networks.py: they record where and how the networks call them.

The real hooks (training.attention.SelfAttention, training.fq.FeatureQuantizer) are tested in tests/test_hooks.py;
the networks reach any hook only through a class_name string, so these stubs exercise the same path while
recording each call. Both stubs accept [N, C, H, W] and [N, C, D, H, W] features.
"""

import torch

CALLS = []  # (kind, resolution-or-None, input shape, dtype, extra) in call order; tests clear it.


class RecordingAttention(torch.nn.Module):
    """Near-identity layer with parameters, so gradient flow through the hook can be checked."""

    def __init__(self, channels: int, resolution: int = None, key_ratio: int = 8):
        super().__init__()
        self.channels = channels
        self.resolution = resolution
        self.gain = torch.nn.Parameter(torch.full([], 0.1))
        self.proj = torch.nn.Parameter(torch.ones([channels]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append(('attn', self.resolution, tuple(x.shape), x.dtype, self.channels))
        return x + self.gain * (x * self.proj.reshape(-1, *[1] * (x.ndim - 2)))


class RecordingQuantizer(torch.nn.Module):
    """Straight-through identity with a commitment-like loss; reports fixed perplexity and usage."""

    def __init__(self, channels: int, dict_size: int = 256, decay: float = 0.8, eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.dict_size = dict_size
        self.decay = decay
        self.register_buffer('embed', torch.randn([channels, dict_size]))
        self.updates = 0

    def forward(self, x: torch.Tensor, update: bool = False):
        CALLS.append(('fq', max(x.shape[2:]), tuple(x.shape), x.dtype, update))   # resolution = largest side
        if update:
            self.updates += 1
        loss = 0.25 * x.square().mean()
        return x, loss

    def perplexity(self) -> float:
        return float(self.dict_size) / 2

    def usage(self) -> float:
        return 0.5
