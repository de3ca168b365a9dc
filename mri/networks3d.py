"""3D StyleGAN2 generator and discriminator for MRI volumes [N, C, D, H, W].

The 2D design of ``training/networks.py`` (Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN": skip generator, resnet discriminator, modulated/demodulated convolutions with noise inputs,
minibatch-std; "Training GANs with Limited Data": mixed precision with clamped activations, conditioning by a
label embedding in the mapping network and by projection in D) lifted to volumes, as 3D-StyleGAN (Hong et al.
2021, "3D-StyleGAN: A Style-Based Generative Adversarial Network for Generative Modeling of Three-Dimensional
Medical Images") did for brain MRI. The mapping network, the equalized-lr dense layers, the modulation
coefficients, minibatch-std, the mixed-precision rule and the channel schedule are the 2D room's, imported.

Constructor arguments and forward signatures are those of the 2D classes (``z, c -> [N, C, D, H, W]``;
``img, c -> logits``), so the training loop, the loss and the snapshots treat both alike. ``img_resolution`` is
an int (a cube R^3, R a power of two >= 8) or a shape [D, H, W] = base x 2^k with base sides 4..8, e.g.
[160, 192, 160] = [5, 6, 5] x 32: a brain-shaped box at native 1 mm instead of a padded cube.

Memory: ``checkpointing=True`` recomputes each block's activations in the backward pass instead of storing
them (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"); bench/bench_3d.py measures it.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mri import resample3d
from torch_utils import misc
from torch_utils import snapshot
from torch_utils.ops import bias_act
from training.layers import FullyConnectedLayer
from training.layers import MappingNetwork
from training.layers import MinibatchStdLayer
from training.layers import modulation_coefficients
from training.networks import _block_dtype
from training.networks import _channels_per_resolution

__all__ = ['Generator', 'Discriminator', 'volume_geometry', 'ShapeError']

MIN_BASE, MAX_BASE = 4, 8


class ShapeError(ValueError):
    """A volume shape the networks cannot build (not base x 2^k)."""


def volume_geometry(img_resolution):
    """Split a volume shape into (shape [D, H, W], base [d, h, w], k) with shape = base * 2^k.

    k is the largest power of two that divides every side while the base stays >= 4 per side; the base may
    then not exceed 8 per side, and k must be >= 1 (the discriminator needs one downsampling block).
    """
    shape = [int(img_resolution)] * 3 if np.ndim(img_resolution) == 0 else [int(s) for s in img_resolution]
    if len(shape) != 3 or min(shape) < 1:
        raise ShapeError(f'volume shape {shape} is not [D, H, W]')
    k = 0
    while all(s % 2 ** (k + 1) == 0 and s // 2 ** (k + 1) >= MIN_BASE for s in shape):
        k += 1
    base = [s // 2 ** k for s in shape]
    if k < 1 or max(base) > MAX_BASE or min(base) < MIN_BASE:
        text = 'x'.join(str(s) for s in shape)
        raise ShapeError(f'volume shape {text} is not a base shape (sides {MIN_BASE}..{MAX_BASE}) times 2^k with k >= 1; '
                         f'use e.g. 64x64x64 or 160x192x160 (= 5x6x5 x 32)')
    return shape, base, k


def _level_shapes(base, k):
    return [[b * 2 ** j for b in base] for j in range(k + 1)]


def _mixed_dtype(use_fp16, force_fp32, device, mixed_precision):
    """The 2D rule (fp16 blocks on CUDA only), with bfloat16 as the alternative low-precision type."""
    dtype = _block_dtype(use_fp16, force_fp32, device)
    if dtype == torch.float16 and mixed_precision == 'bfloat16':
        return torch.bfloat16
    return dtype


def _check_mixed_precision(mixed_precision):
    if mixed_precision not in ('float16', 'bfloat16'):
        raise ValueError(f'mri/networks3d.py: mixed_precision {mixed_precision!r} is not float16 or bfloat16')


def _maybe_checkpoint(enabled, fn, *args):
    """Run ``fn(*args)``; with ``enabled`` and gradients on, keep only its inputs and recompute in backward.
    The non-reentrant variant supports the double backward of R1 and path length, and restores the RNG state
    so that the noise inputs are the same in the recomputation."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return fn(*args)

# ----------------------------------------------------------------------------------------------------------------
# Layers.


def modulated_conv3d(
    x: torch.Tensor,                    # Input features [N, I, D, H, W].
    weight: torch.Tensor,               # Shared weight [O, I, k, k, k].
    styles: torch.Tensor,               # Per-sample input scales [N, I].
    noise: torch.Tensor = None,         # Added after the convolution, broadcast to [N, 1, D', H', W']; None = off.
    up: int = 1,                        # 1 or 2.
    padding: int = 0,                   # Padding of the convolution.
    resample_filter: torch.Tensor = None,  # 1D FIR filter for up > 1.
    demodulate: bool = True,            # Normalise each output channel to unit expected variance (Eq. 3).
    fused_modconv: bool = True,         # Per-sample weights in one grouped conv (CUDA); CPU always scales activations.
) -> torch.Tensor:
    """The modulated convolution of StyleGAN2 (Eq. 1-3) in 3D; see training.layers.modulated_conv2d."""
    N = x.shape[0]
    O, I = weight.shape[:2]
    k = weight.shape[2]
    misc.assert_shape(x, [N, I, None, None, None])  # [NIDHW]
    misc.assert_shape(styles, [N, I])
    weight, styles, dcoefs = modulation_coefficients(weight, styles, demodulate, x.dtype)

    if k == 1 and up == 1:  # Pointwise (toRGB): per-sample weights as one batched matrix product.
        w = weight.reshape(1, O, I) * styles.to(weight.dtype).reshape(N, 1, I)
        if dcoefs is not None:
            w = w * dcoefs.to(w.dtype).reshape(N, O, 1)
        spatial = x.shape[2:]
        x = torch.bmm(w.to(x.dtype), x.reshape(N, I, -1)).reshape(N, O, *spatial)
        return x if noise is None else x + noise.to(x.dtype)

    if fused_modconv and x.device.type != 'cpu':
        w = weight.unsqueeze(0) * styles.to(weight.dtype).reshape(N, 1, I, 1, 1, 1)
        if dcoefs is not None:
            w = w * dcoefs.to(w.dtype).reshape(N, O, 1, 1, 1, 1)
        x = resample3d.conv3d_resample(x.reshape(1, N * I, *x.shape[2:]), w.reshape(N * O, I, k, k, k).to(x.dtype),
                                       f=resample_filter, up=up, padding=padding, groups=N)
        x = x.reshape(N, O, *x.shape[2:])
        return x if noise is None else x + noise.to(x.dtype)

    x = x * styles.to(x.dtype).reshape(N, I, 1, 1, 1)
    x = resample3d.conv3d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, padding=padding)
    if dcoefs is not None:
        x = x * dcoefs.to(x.dtype).reshape(N, O, 1, 1, 1)
    return x if noise is None else x + noise.to(x.dtype)


class Conv3dLayer(torch.nn.Module):
    """3D convolution with equalized learning rate, optional FIR up/downsampling and activation clamping."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels.
        out_channels: int,              # Number of output channels.
        kernel_size: int,               # Side of the cubic kernel.
        bias: bool = True,              # Add a learned bias?
        activation: str = 'linear',     # Name of a bias_act activation.
        up: int = 1,                    # Integer upsampling factor.
        down: int = 1,                  # Integer downsampling factor.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for up/downsampling (1D, applied per axis).
        conv_clamp: float = None,       # Clamp the output to +-X; None = no clamping.
        trainable: bool = True,         # False = weight and bias are buffers (frozen layers).
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', resample3d.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / np.sqrt(in_channels * kernel_size ** 3)
        self.act_gain = bias_act.activation_funcs[activation].def_gain
        weight = torch.randn([out_channels, in_channels] + [kernel_size] * 3)
        b = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(b) if b is not None else None
        else:
            self.register_buffer('weight', weight)
            self.register_buffer('bias', b)

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        x = resample3d.conv3d_resample(x, w, f=self.resample_filter, up=self.up, down=self.down, padding=self.padding,
                                       flip_weight=(self.up == 1))
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act.bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=act_clamp)

    def extra_repr(self) -> str:
        return (f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, '
                f'activation={self.activation:s}, up={self.up}, down={self.down}')


class SynthesisLayer3d(torch.nn.Module):
    """Modulated 3x3x3 convolution + per-voxel noise + bias + activation (StyleGAN2, Fig. 2d, in 3D)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels.
        out_channels: int,              # Number of output channels.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        shape: list,                    # Output shape [D, H, W].
        kernel_size: int = 3,           # Side of the cubic kernel.
        up: int = 1,                    # 1 or 2.
        use_noise: bool = True,         # Enable per-voxel noise inputs?
        activation: str = 'lrelu',      # Name of a bias_act activation.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for upsampling.
        conv_clamp: float = None,       # Clamp the output to +-X; None = no clamping.
    ):
        super().__init__()
        self.shape = list(shape)
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', resample3d.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = bias_act.activation_funcs[activation].def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels] + [kernel_size] * 3))
        if use_noise:
            self.register_buffer('noise_const', torch.randn(self.shape))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x, w, noise_mode='random', fused_modconv=True, gain=1):
        if noise_mode not in ('random', 'const', 'none'):
            raise ValueError(f"mri/networks3d.py: noise_mode {noise_mode!r} is not 'random', 'const' or 'none'")
        misc.assert_shape(x, [None, self.weight.shape[1]] + [s // self.up for s in self.shape])  # [NCDHW]
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == 'random':
            noise = torch.randn([x.shape[0], 1] + self.shape, device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == 'const':
            noise = self.noise_const * self.noise_strength
        x = modulated_conv3d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, fused_modconv=fused_modconv)
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act.bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain,
                                 clamp=act_clamp)

    def extra_repr(self) -> str:
        return f'shape={self.shape}, up={self.up}, use_noise={self.use_noise}'


class ToVolumeLayer(torch.nn.Module):
    """Modulated 1x1x1 convolution to the volume channels, without demodulation (StyleGAN2's toRGB)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, 1, 1, 1]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels)

    def forward(self, x, w, fused_modconv=True):
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv3d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)

# ----------------------------------------------------------------------------------------------------------------
# Generator.


class SynthesisBlock3d(torch.nn.Module):
    """One level of the 3D synthesis network: (const | upsampling conv0) + conv1 + toVolume (skip architecture)."""

    def __init__(
        self,
        in_channels: int,               # Input channels, 0 = first block (learned constant).
        out_channels: int,              # Output channels.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        shape: list,                    # Shape [D, H, W] of this block's output.
        img_channels: int,              # Volume channels.
        is_last: bool,                  # Last block?
        architecture: str = 'skip',     # 'skip' or 'resnet'.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for upsampling.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        use_fp16: bool = False,         # Run in reduced precision (CUDA)?
        mixed_precision: str = 'float16',  # 'float16' or 'bfloat16'.
        fused_modconv_default: bool = True,  # True, False or 'inference_only', when forward() gets None.
        **layer_kwargs,                 # use_noise, activation.
    ):
        if architecture not in ('skip', 'resnet'):
            raise ValueError(f'mri/networks3d.py: synthesis architecture {architecture!r} is not skip or resnet')
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.shape = list(shape)
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.mixed_precision = mixed_precision
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer('resample_filter', resample3d.setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        common = dict(w_dim=w_dim, shape=shape, conv_clamp=conv_clamp, resample_filter=resample_filter, **layer_kwargs)
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels] + self.shape))
        else:
            self.conv0 = SynthesisLayer3d(in_channels, out_channels, up=2, **common)
            self.num_conv += 1
        self.conv1 = SynthesisLayer3d(out_channels, out_channels, **common)
        self.num_conv += 1
        if is_last or architecture == 'skip':
            self.torgb = ToVolumeLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == 'resnet':
            self.skip = Conv3dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter)

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, update_emas=False, **layer_kwargs):
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        w_iter = iter(ws.unbind(dim=1))
        dtype = _mixed_dtype(self.use_fp16, force_fp32, ws.device, self.mixed_precision)
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == 'inference_only':
            fused_modconv = not self.training
        fused_modconv = bool(fused_modconv) and (dtype == torch.float32 or ws.shape[0] == 1)
        half = [s // 2 for s in self.shape]

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype).unsqueeze(0).expand(ws.shape[0], *self.const.shape)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        else:
            misc.assert_shape(x, [None, self.in_channels] + half)
            x = x.to(dtype=dtype)
            if self.architecture == 'resnet':
                y = self.skip(x, gain=np.sqrt(0.5))
                x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
                x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=np.sqrt(0.5), **layer_kwargs)
                x = y.add_(x)
            else:
                x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
                x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)

        if img is not None:
            misc.assert_shape(img, [None, self.img_channels] + half)
            img = resample3d.upsample3d(img, self.resample_filter)
        if self.is_last or self.architecture == 'skip':
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img.add_(y) if img is not None else y
        return x, img

    def extra_repr(self) -> str:
        return f'shape={self.shape}, architecture={self.architecture}, use_fp16={self.use_fp16}'


@snapshot.persistent_class
class SynthesisNetwork3d(torch.nn.Module):
    """Synthesis network w -> volume: blocks from the base shape to img_resolution, doubling every side."""

    def __init__(
        self,
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        img_resolution,                 # Output side (a cube) or shape [D, H, W] (see volume_geometry).
        img_channels: int,              # Volume channels.
        channel_base: int = 4096,       # Channels at a level = min(channel_base // largest side, channel_max).
        channel_max: int = 256,         # Maximum number of channels in any layer.
        num_fp16_res: int = 2,          # Reduced precision in the N highest levels (CUDA).
        conv_clamp: float = 256,        # Clamp the outputs of convolutions to +-X; None = no clamping.
        mixed_precision: str = 'float16',  # Reduced-precision type: 'float16' or 'bfloat16'.
        checkpointing: bool = False,    # Recompute each block in backward instead of storing its activations.
        **block_kwargs,                 # architecture, resample_filter, use_noise, fused_modconv_default, ...
    ):
        super().__init__()
        _check_mixed_precision(mixed_precision)
        self.img_shape, self.base_shape, self.num_levels = volume_geometry(img_resolution)
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.checkpointing = bool(checkpointing)
        shapes = _level_shapes(self.base_shape, self.num_levels)
        self.block_sides = [max(s) for s in shapes]
        channels = _channels_per_resolution(self.block_sides, channel_base, channel_max)
        self.num_ws = 0
        for level, (side, shape) in enumerate(zip(self.block_sides, shapes)):
            in_channels = channels[self.block_sides[level - 1]] if level > 0 else 0
            block = SynthesisBlock3d(in_channels, channels[side], w_dim=w_dim, shape=shape, img_channels=img_channels,
                                     is_last=(level == self.num_levels), conv_clamp=conv_clamp,
                                     use_fp16=(level > 0 and level > self.num_levels - num_fp16_res),
                                     mixed_precision=mixed_precision, **block_kwargs)
            self.num_ws += block.num_conv
            if level == self.num_levels:
                self.num_ws += block.num_torgb
            setattr(self, f'b{side}', block)

    def forward(self, ws, noise_mode='random', force_fp32=False, update_emas=False, **block_kwargs):
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim])
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for side in self.block_sides:
            block = getattr(self, f'b{side}')
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv  # toVolume shares its w with the next block's first conv.
            run = functools.partial(block, force_fp32=force_fp32, noise_mode=noise_mode, update_emas=update_emas,
                                    **block_kwargs)
            x, img = _maybe_checkpoint(self.checkpointing and self.training, run, x, img, block_ws)
        misc.assert_shape(img, [None, self.img_channels] + self.img_shape)
        return img

    def extra_repr(self) -> str:
        return (f'w_dim={self.w_dim:d}, num_ws={self.num_ws:d}, img_shape={self.img_shape}, '
                f'base_shape={self.base_shape}, img_channels={self.img_channels:d}, checkpointing={self.checkpointing}')


@snapshot.persistent_class
class Generator(torch.nn.Module):
    """3D StyleGAN2 generator: mapping z, c -> ws (training.layers.MappingNetwork), synthesis ws -> volume."""

    def __init__(
        self,
        z_dim: int,                     # Input latent (Z) dimensionality.
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = unconditional.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        img_resolution,                 # Output side (cube) or shape [D, H, W].
        img_channels: int,              # Volume channels (modalities + label channels).
        mapping_kwargs: dict = {},      # Arguments for MappingNetwork.
        attn_res: list = [],            # Not available in 3D; accepted so 2D configs fail with a clear message.
        attn_kwargs: dict = {},         # Unused (see attn_res).
        **synthesis_kwargs,             # Arguments for SynthesisNetwork3d.
    ):
        if attn_res:
            raise ValueError('mri/networks3d.py: self-attention (--attn-res) is 2D only')
        super().__init__()
        synthesis_kwargs = {**synthesis_kwargs.pop('synthesis_kwargs', {}), **synthesis_kwargs}
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork3d(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                            **synthesis_kwargs)
        self.img_shape = self.synthesis.img_shape
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    @staticmethod
    def check_resolution(img_resolution):
        """Raise ShapeError (one line) for a shape these networks cannot build; config validation calls this."""
        volume_geometry(img_resolution)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False, noise_mode='random',
                force_fp32=False, **synthesis_kwargs):
        """z [N, z_dim], c [N, c_dim] -> volumes [N, img_channels, D, H, W] in roughly [-1, 1]."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, update_emas=update_emas,
                              **synthesis_kwargs)

# ----------------------------------------------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock3d(torch.nn.Module):
    """One level of the 3D discriminator: [fromVolume] + conv0 + downsampling conv1 + 1x1x1 resnet skip."""

    def __init__(
        self,
        in_channels: int,               # Input channels, 0 = first block.
        tmp_channels: int,              # Intermediate channels.
        out_channels: int,              # Output channels.
        shape: list,                    # Input shape [D, H, W] of this block.
        img_channels: int,              # Volume channels.
        first_layer_idx: int,           # Index of the first layer, for freeze_layers.
        architecture: str = 'resnet',   # 'orig' or 'resnet'.
        activation: str = 'lrelu',      # Name of a bias_act activation.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for downsampling.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        use_fp16: bool = False,         # Run in reduced precision (CUDA)?
        mixed_precision: str = 'float16',  # 'float16' or 'bfloat16'.
        freeze_layers: int = 0,         # Freeze the first this many layers of D (transfer learning).
    ):
        if architecture not in ('orig', 'resnet'):
            raise ValueError(f'mri/networks3d.py: discriminator architecture {architecture!r} is not orig or resnet')
        super().__init__()
        self.in_channels = in_channels
        self.shape = list(shape)
        self.img_channels = img_channels
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.mixed_precision = mixed_precision
        self.num_layers = 0
        layer_idx = [first_layer_idx]

        def trainable() -> bool:
            result = layer_idx[0] >= freeze_layers
            layer_idx[0] += 1
            self.num_layers += 1
            return result

        common = dict(activation=activation, conv_clamp=conv_clamp)
        if in_channels == 0:
            self.fromrgb = Conv3dLayer(img_channels, tmp_channels, kernel_size=1, trainable=trainable(), **common)
        self.conv0 = Conv3dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=trainable(), **common)
        self.conv1 = Conv3dLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=trainable(),
                                 resample_filter=resample_filter, **common)
        if architecture == 'resnet':
            self.skip = Conv3dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter)

    def forward(self, x, img, force_fp32=False):
        device = (x if x is not None else img).device
        dtype = _mixed_dtype(self.use_fp16, force_fp32, device, self.mixed_precision)
        if self.in_channels == 0:
            misc.assert_shape(img, [None, self.img_channels] + self.shape)  # [NCDHW]
            x = self.fromrgb(img.to(dtype))
        else:
            misc.assert_shape(x, [None, self.in_channels] + self.shape)
            x = x.to(dtype)
        if self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=np.sqrt(0.5))
            return y.add_(x)
        return self.conv1(self.conv0(x))

    def extra_repr(self) -> str:
        return f'shape={self.shape}, architecture={self.architecture}, use_fp16={self.use_fp16}'


class DiscriminatorEpilogue3d(torch.nn.Module):
    """The head at the base shape: minibatch-std, conv, fc, output; conditioning by projection (Miyato &
    Koyama 2018), as in the 2D epilogue."""

    def __init__(self, in_channels, cmap_dim, shape, mbstd_group_size=4, mbstd_num_channels=1, activation='lrelu',
                 conv_clamp=None):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.shape = list(shape)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv3dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * int(np.prod(self.shape)), in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x, cmap):
        misc.assert_shape(x, [None, self.in_channels] + self.shape)
        x = x.to(torch.float32)  # The head always runs in fp32.
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:
            misc.assert_shape(cmap, [None, self.cmap_dim])
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return x


@snapshot.persistent_class
class Discriminator(torch.nn.Module):
    """3D StyleGAN2 discriminator (resnet), conditional by projection; forward(img, c) -> logits [N, 1]."""

    def __init__(
        self,
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = unconditional.
        img_resolution,                 # Input side (cube) or shape [D, H, W].
        img_channels: int,              # Volume channels.
        architecture: str = 'resnet',   # 'orig' or 'resnet'.
        channel_base: int = 4096,       # Channels at a level = min(channel_base // largest side, channel_max).
        channel_max: int = 256,         # Maximum number of channels in any layer.
        num_fp16_res: int = 2,          # Reduced precision in the N highest levels (CUDA).
        conv_clamp: float = 256,        # Clamp the outputs of convolutions to +-X; None = no clamping.
        cmap_dim: int = None,           # Dimensionality of the projected label; None = channels at the base.
        block_kwargs: dict = {},        # Arguments for DiscriminatorBlock3d.
        mapping_kwargs: dict = {},      # Arguments for the label MappingNetwork.
        epilogue_kwargs: dict = {},     # mbstd_group_size, mbstd_num_channels.
        mixed_precision: str = 'float16',  # 'float16' or 'bfloat16'.
        checkpointing: bool = False,    # Recompute each block in backward instead of storing its activations.
        attn_res: list = [],            # Not available in 3D (2D hook); must be empty.
        attn_kwargs: dict = {},         # Unused.
        quantize_kwargs: dict = None,   # Not available in 3D (2D hook); must be None.
    ):
        if attn_res or quantize_kwargs:
            raise ValueError('mri/networks3d.py: self-attention (--attn-res) and feature quantization (--fq-res) are 2D only')
        super().__init__()
        _check_mixed_precision(mixed_precision)
        self.img_shape, self.base_shape, self.num_levels = volume_geometry(img_resolution)
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.checkpointing = bool(checkpointing)
        shapes = _level_shapes(self.base_shape, self.num_levels)
        sides = [max(s) for s in shapes]
        channels = _channels_per_resolution(sides, channel_base, channel_max)
        if cmap_dim is None:
            cmap_dim = channels[sides[0]]
        if c_dim == 0:
            cmap_dim = 0
        self.block_sides = sides[:0:-1]  # Highest level first; the base level is the epilogue.
        cur_layer_idx = 0
        for level in range(self.num_levels, 0, -1):
            side = sides[level]
            block = DiscriminatorBlock3d(channels[side] if level < self.num_levels else 0, channels[side],
                                         channels[sides[level - 1]], shape=shapes[level], img_channels=img_channels,
                                         first_layer_idx=cur_layer_idx, architecture=architecture,
                                         conv_clamp=conv_clamp, use_fp16=(level > self.num_levels - num_fp16_res),
                                         mixed_precision=mixed_precision, **block_kwargs)
            setattr(self, f'b{side}', block)
            cur_layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **mapping_kwargs)
        self.epilogue = DiscriminatorEpilogue3d(channels[sides[0]], cmap_dim=cmap_dim, shape=shapes[0],
                                                conv_clamp=conv_clamp, **epilogue_kwargs)

    def forward(self, img, c, update_emas=False, update_quant=False, return_aux=False, force_fp32=False):
        """img [N, C, D, H, W], c [N, c_dim] -> logits [N, 1] (and the 2D aux dict, empty here, on request)."""
        misc.assert_shape(img, [None, self.img_channels] + self.img_shape)  # [NCDHW]
        x = None
        for side in self.block_sides:
            block = getattr(self, f'b{side}')
            x = _maybe_checkpoint(self.checkpointing and self.training, functools.partial(block, force_fp32=force_fp32),
                                  x, img)
        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        x = self.epilogue(x, cmap)
        if not return_aux:
            return x
        return x, {'fq_loss': torch.zeros([], device=x.device), 'fq_perplexity': {}, 'fq_usage': {}}

    def extra_repr(self) -> str:
        return (f'c_dim={self.c_dim:d}, img_shape={self.img_shape}, base_shape={self.base_shape}, '
                f'img_channels={self.img_channels:d}, checkpointing={self.checkpointing}')
