"""Self-attention layer for G and D feature maps (SAGAN), on images [N, C, H, W] and volumes [N, C, D, H, W].

Zhang, Goodfellow, Metaxas, Odena, "Self-Attention Generative Adversarial Networks", ICML 2019
(arXiv:1805.08318), section 3: every position attends to every (pooled) position of the same feature map,

    f = W_f x,  g = W_g x,  h = W_h x                 (1x1 convolutions)
    beta_{j,i} = softmax_i(f_j . g_i)                 (SAGAN eq. 1, over key positions i)
    o_j = W_v sum_i beta_{j,i} h_i                    (SAGAN eq. 2)
    y = x + gain * o                                   (SAGAN eq. 3, gain initialised to 0)

so the layer is exactly the identity when it is created and the network learns how much non-local evidence
to mix in.

Choices made here (see docs/hooks.md):
- Query/key width C // key_ratio (SAGAN: C/8), value width C // 2 projected back to C by W_v (SAGAN and
  BigGAN do this; it halves the memory of the weighted sum). Both widths are at least 1, so any C >= 1 works.
- Logits are scaled by 1/sqrt(C // key_ratio). SAGAN has no scale, but there the 1x1 convs are spectrally
  normalised; here they use the equalised learning rate of StyleGAN (weights N(0, 1) times 1/sqrt(fan_in) at
  run time), which makes f and g roughly unit-variance per channel, and without the scale the softmax would
  start almost one-hot for wide layers.
- Any number of spatial axes: all of them are flattened into one sequence of L positions (L = H*W for images,
  D*H*W for volumes), so a voxel attends to every voxel of the volume.
- Keys and values are max-pooled by 2 along every spatial axis (2x2 for images as in SAGAN/BigGAN, 2x2x2 for
  volumes) by default from pool_min_pixels = 4096 positions up (64x64, 16x16x16), where the L x L attention
  matrix would otherwise dominate memory; smaller maps attend at full resolution.
- Two paths give the same result: torch's fused scaled_dot_product_attention (flash / memory-efficient kernels,
  no L x L' matrix kept for backward), used by default, and the math path (matmul + softmax), used inside
  `training.autograd_passes.double_backward()` (D's R1 pass, G's path-length pass), because the fused kernels
  have no double backward. `fused=False` forces the math path everywhere.
- Memory: the math path keeps the logits and the softmax, 2 * N * L * L' float32 values per layer
  (`memory_bytes()`), L' = L / 2^dims when pooled; the fused path keeps O(N * L * C).
- All arithmetic is in float32 whatever the input dtype; the result is cast back to the input dtype.
"""

import math

import torch
from torch.nn import functional as F

from training.autograd_passes import double_backward_needed

_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}  # Spatial dims -> pooling of keys/values.

#----------------------------------------------------------------------------

class EqualLinear1x1(torch.nn.Module):
    """1x1 convolution on [N, C, L] tensors with StyleGAN's equalised learning rate (no bias).

    The stored weight is N(0, 1) / lr_multiplier and is multiplied by lr_multiplier / sqrt(in_channels) at
    run time, so every layer learns at the same speed under Adam whatever its fan-in (Karras et al. 2018,
    "Progressive Growing of GANs", section 4.1).
    """

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        lr_multiplier   = 1,            # Learning-rate multiplier.
    ):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.weight = torch.nn.Parameter(torch.randn([self.out_channels, self.in_channels]) / lr_multiplier)
        self.weight_gain = lr_multiplier / math.sqrt(self.in_channels)

    def forward(self, x):
        w = self.weight.to(torch.float32) * self.weight_gain
        return torch.matmul(w, x)       # [O, I] @ [N, I, L] -> [N, O, L]

    def extra_repr(self):
        return f'in_channels={self.in_channels}, out_channels={self.out_channels}'

#----------------------------------------------------------------------------

class SelfAttention(torch.nn.Module):
    """SAGAN self-attention block: `y = x + gain * attention(x)`, identity at initialisation.

    Built by training.networks as `construct_class_by_name(class_name='training.attention.SelfAttention',
    channels=C, resolution=R, **attn_kwargs)` and applied to a block's [N, C, *spatial] features (2 or 3
    spatial axes), R being the largest spatial side of that block.
    """

    def __init__(self,
        channels,                       # Number of input (= output) channels, >= 1.
        resolution      = None,         # Largest spatial side expected of the input; None = any size.
        key_ratio       = 8,            # Query/key width is channels // key_ratio (at least 1).
        value_ratio     = 2,            # Value width is channels // value_ratio (at least 1), projected back to channels.
        pool            = None,         # Max-pool keys/values by 2 per axis: True, False, None = from pool_min_pixels on.
        pool_min_pixels = 64 * 64,      # Positions (pixels or voxels, all axes multiplied) at which pool=None pools.
        lr_multiplier   = 1,            # Learning-rate multiplier of the 1x1 convolutions.
        fused           = True,         # Fused SDPA kernel outside double_backward(); False = math path always.
    ):
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f'SelfAttention: channels must be >= 1, got {channels}')
        if int(key_ratio) < 1 or int(value_ratio) < 1:
            raise ValueError(f'SelfAttention: key_ratio and value_ratio must be >= 1, got {key_ratio}, {value_ratio}')
        if pool not in (None, True, False):
            raise ValueError(f'SelfAttention: pool must be True, False or None, got {pool!r}')
        self.channels = int(channels)
        self.resolution = None if resolution is None else int(resolution)
        self.key_channels = max(self.channels // int(key_ratio), 1)
        self.value_channels = max(self.channels // int(value_ratio), 1)
        self.pool = pool
        self.pool_min_pixels = int(pool_min_pixels)
        self.fused = bool(fused)

        self.query = EqualLinear1x1(self.channels, self.key_channels, lr_multiplier=lr_multiplier)
        self.key = EqualLinear1x1(self.channels, self.key_channels, lr_multiplier=lr_multiplier)
        self.value = EqualLinear1x1(self.channels, self.value_channels, lr_multiplier=lr_multiplier)
        self.out = EqualLinear1x1(self.value_channels, self.channels, lr_multiplier=lr_multiplier)
        # SAGAN eq. 3: gamma = 0 at the start, so the block begins as the identity and G/D first rely on local
        # convolutions, then learn to add non-local evidence.
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def uses_pool(self, *spatial):
        """Whether keys/values are max-pooled for an input of this spatial size (uses_pool(H, W), uses_pool(D, H, W))."""
        return _uses_pool(self.pool, self.pool_min_pixels, spatial)

    def uses_fused(self):
        """Whether the next forward takes the fused kernel (False inside training.autograd_passes.double_backward())."""
        return self.fused and not double_backward_needed()

    @staticmethod
    def memory_bytes(batch, resolution, pool=None, pool_min_pixels=64 * 64, spatial_dims=2):
        """Bytes the math path keeps per layer for backward: logits and softmax, 2 * N * L * L' float32.

        `resolution` is the side of a square (spatial_dims=2) or cube (spatial_dims=3) feature map, or a list
        with one size per spatial axis ([H, W], [D, H, W]; spatial_dims is then its length).
        """
        if isinstance(resolution, (list, tuple)):
            spatial = [int(s) for s in resolution]
        else:
            spatial = [int(resolution)] * int(spatial_dims)
        length = math.prod(spatial)
        keys = math.prod(math.ceil(s / 2) for s in spatial) if _uses_pool(pool, pool_min_pixels, spatial) else length
        return 2 * 4 * int(batch) * length * keys

    def forward(self, x):
        spatial = self._check_input(x)
        N, C = x.shape[:2]
        dtype = x.dtype
        x32 = x.to(torch.float32)

        kv = x32
        if self.uses_pool(*spatial):
            # ceil_mode: odd sides keep their edge; a side of 1 is left as it is.
            kernel = [min(s, 2) for s in spatial]
            kv = _MAX_POOL[len(spatial)](x32, kernel_size=kernel, stride=kernel, ceil_mode=True)
        q = self.query(x32.reshape(N, C, -1))                          # [N, Ck, L]
        k = self.key(kv.reshape(N, C, -1))                              # [N, Ck, L']
        v = self.value(kv.reshape(N, C, -1))                            # [N, Cv, L']

        if self.uses_fused():
            # Same scale 1/sqrt(Ck), softmax over keys; [N, 1, L, Ck] x [N, 1, L', Ck] x [N, 1, L', Cv] -> [N, 1, L, Cv].
            o = F.scaled_dot_product_attention(q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None],
                                               v.transpose(1, 2)[:, None])[:, 0].transpose(1, 2)       # [N, Cv, L]
        else:
            logits = torch.matmul(q.transpose(1, 2), k) * (1 / math.sqrt(self.key_channels))    # [N, L, L']
            beta = torch.softmax(logits, dim=2)                         # SAGAN eq. 1: over key positions
            o = torch.matmul(v, beta.transpose(1, 2))                   # [N, Cv, L]: SAGAN eq. 2
        o = self.out(o).reshape(x.shape)

        y = x32 + self.gain.to(torch.float32) * o                      # SAGAN eq. 3
        assert y.shape == x.shape
        return y.to(dtype)

    def _check_input(self, x):
        """The spatial sizes of an [N, C, H, W] or [N, C, D, H, W] input; ValueError for any other input."""
        if x.ndim not in (4, 5) or x.shape[1] != self.channels:
            raise ValueError(f'SelfAttention: expected input [N, {self.channels}, H, W] or [N, {self.channels}, D, H, W], '
                             f'got {list(x.shape)}')
        spatial = list(x.shape[2:])
        if self.resolution is not None and max(spatial) != self.resolution:
            raise ValueError(f'SelfAttention: layer built for feature maps of largest side {self.resolution}, '
                             f'got {"x".join(map(str, spatial))}')
        return spatial

    def extra_repr(self):
        return (f'channels={self.channels}, resolution={self.resolution}, key_channels={self.key_channels}, '
                f'value_channels={self.value_channels}, pool={self.pool}, fused={self.fused}')


def _uses_pool(pool, pool_min_pixels, spatial):
    if pool is None:
        return math.prod(spatial) >= pool_min_pixels and min(spatial) >= 2
    return bool(pool)

#----------------------------------------------------------------------------
