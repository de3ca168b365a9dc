"""StyleGAN2 generator and discriminator for images and volumes: one network family for any spatial dimension.

Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (skip generator, resnet
discriminator, modulated convolutions with noise inputs, minibatch-std), with the mixed-precision and
configuration conventions of StyleGAN2-ADA (Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data": fp16 blocks with clamped activations, a label embedding in the mapping network, projection in D),
written for this project. In 3D it is the design of 3D-StyleGAN (Hong et al. 2021, "3D-StyleGAN: A Style-Based
Generative Adversarial Network for Generative Modeling of Three-Dimensional Medical Images").

Dimensionality follows from ``img_resolution``, as MONAI's networks follow ``spatial_dims``: an int is a square
(2D) or, with ``spatial_dims=3``, a cube; a list gives one size per axis ([H, W] or [D, H, W]). Every size is a
base of 4..8 per axis times 2^k (``network_geometry``): 256 = 4 x 2^6, [160, 192, 160] = [5, 6, 5] x 2^5, a
brain-shaped box at native 1 mm instead of a padded cube. Blocks are named ``b{side}`` by the largest side of
their level (``b4`` .. ``b256`` in 2D, as NVlabs names them), so 2D state dicts are StyleGAN2-ADA's.

Constructor arguments and forward signatures are those of StyleGAN2-ADA (see docs/internals.md), so its configs
port unchanged. Two generic hook points take classes by name (``dnnlib.construct_class_by_name``; they must be
``torch.nn.Module`` classes): self-attention (Zhang et al. 2019, SAGAN) at the resolutions in ``attn_res``, in G
and D; feature quantization in D (Zhao et al. 2020, "Feature Quantization Improves GAN Training") at the
resolutions in ``quantize_kwargs['resolutions']``.

Mixed precision: blocks at the ``num_fp16_res`` highest levels run in float16 (or bfloat16, ``mixed_precision``)
on CUDA, with activations clamped to +-``conv_clamp``. On CPU, half-precision convolutions are emulated and
slower than float32, so those blocks run in float32 there unless forward() gets ``cpu_fp16=True`` (tests use it
to exercise the reduced-precision path). Memory: ``checkpointing=True`` recomputes each block's activations in
the backward pass instead of storing them (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
"""

import functools
import re

import numpy as np
import torch
import torch.utils.checkpoint

import dnnlib
from torch_utils import misc
from torch_utils import snapshot
from torch_utils.ops import resample
from training.layers import ConvLayer
from training.layers import FullyConnectedLayer
from training.layers import MappingNetwork
from training.layers import MinibatchStdLayer
from training.layers import SynthesisLayer
from training.layers import ToRGBLayer
from training.layers import spatial_shape

__all__ = ['Generator', 'Discriminator', 'MappingNetwork', 'SynthesisNetwork', 'ShapeError', 'network_geometry']

DEFAULT_ATTENTION = 'training.attention.SelfAttention'
DEFAULT_QUANTIZER = 'training.fq.FeatureQuantizer'
CPU_CHANNELS_LAST = True   # 2D D blocks on CPU use channels_last activations (measured faster; see bench_networks).
MIN_BASE, MAX_BASE = 4, 8  # Sides of the base level (G's constant, D's epilogue), per axis.
MIXED_PRECISION = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


class ShapeError(ValueError):
    """An image or volume size the networks cannot build (not a base size times 2^k)."""


def network_geometry(img_resolution, spatial_dims: int = None, min_levels: int = 1):
    """Split a size into (shape, base, k) with shape = base * 2^k, base 4..8 per axis.

    k is the largest power of two that divides every side while the base stays >= 4 per side; the base may then
    not exceed 8 per side, and k must be >= ``min_levels`` (D needs one downsampling block, so training does).
    """
    if spatial_dims is None:
        spatial_dims = 2 if np.ndim(img_resolution) == 0 else len(img_resolution)
    try:
        shape = spatial_shape(img_resolution, spatial_dims)
    except ValueError as err:
        raise ShapeError(f'img_resolution: {err}') from None
    if spatial_dims not in (2, 3) or min(shape) < 1:
        raise ShapeError(f'img_resolution {shape}: the networks build 2 or 3 positive spatial axes')
    k = 0
    while all(s % 2 ** (k + 1) == 0 and s // 2 ** (k + 1) >= MIN_BASE for s in shape):
        k += 1
    base = [s // 2 ** k for s in shape]
    if k < min_levels or max(base) > MAX_BASE or min(base) < MIN_BASE:
        text = 'x'.join(str(s) for s in shape)
        raise ShapeError(f'shape {text} is not a base shape ({MIN_BASE}..{MAX_BASE} per axis) times 2^k with '
                         f'k >= {min_levels}; use e.g. 64, 256, 64x64x64 or 160x192x160 (= 5x6x5 x 32)')
    return shape, base, k


def _level_shapes(base, k) -> list:
    return [[b * 2 ** j for b in base] for j in range(k + 1)]


def _channels_per_resolution(resolutions, channel_base: int, channel_max: int) -> dict:
    return {res: min(channel_base // res, channel_max) for res in resolutions}


def _check_mixed_precision(mixed_precision: str) -> None:
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f'mixed_precision {mixed_precision!r} is not one of {", ".join(MIXED_PRECISION)}')


def _block_dtype(use_fp16: bool, force_fp32: bool, device: torch.device, mixed_precision: str = 'float16',
                 cpu_fp16: bool = False) -> torch.dtype:
    if use_fp16 and not force_fp32 and (device.type == 'cuda' or cpu_fp16):
        return MIXED_PRECISION[mixed_precision]
    return torch.float32


def _activation_format(channels_last: bool, ndim: int):
    """channels_last exists for 4-D tensors only: volumes stay contiguous."""
    return torch.channels_last if channels_last and ndim == 4 else torch.contiguous_format


def _maybe_checkpoint(enabled: bool, fn, *args):
    """Run ``fn(*args)``; with ``enabled`` and gradients on, keep only its inputs and recompute in backward.
    The non-reentrant variant supports the double backward of R1 and path length, and restores the RNG state
    so that the noise inputs are the same in the recomputation."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return fn(*args)


def _construct_hook(class_name: str, **kwargs) -> torch.nn.Module:
    """Build a hook module by class name. Snapshots carry these names inside init_kwargs, so refuse anything that
    is not a torch.nn.Module class: a snapshot must not be able to name an arbitrary callable to run."""
    cls = dnnlib.get_obj_by_name(class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f'hook class_name {class_name!r} is not a torch.nn.Module class')
    return cls(**kwargs)


def _build_attention(attn_res, attn_kwargs: dict, channels: dict, valid, where: str) -> dict:
    """One attention layer per requested resolution (a level's largest side), built by class name."""
    layers = {}
    kwargs = dict(attn_kwargs)
    kwargs.setdefault('class_name', DEFAULT_ATTENTION)
    for res in attn_res:
        res = int(res)
        if res not in valid:
            raise ValueError(f'{where} attn_res {res} is not one of {sorted(valid)}')
        layers[res] = _construct_hook(channels=channels[res], resolution=res, **kwargs)
    return layers


def _upgrade_3d_record(init_kwargs: dict, state_dict: dict):
    """Records of the former mri.networks3d classes: volumes were implied, and their upsampling conv0 correlated
    where this family convolves (flip_weight=False for up=2, as in 2D), which a flipped kernel undoes exactly."""
    init_kwargs = dict(init_kwargs, spatial_dims=3)
    for name in state_dict:
        if re.fullmatch(r'synthesis\.b\d+\.conv0\.weight', name):
            state_dict[name] = state_dict[name].flip(list(range(2, state_dict[name].ndim)))
    return init_kwargs, state_dict

# ----------------------------------------------------------------------------------------------------------------
# Generator.


class SynthesisBlock(torch.nn.Module):
    """One level of the synthesis network: (const | upsampling conv0) + conv1 + toRGB (StyleGAN2, Fig. 7)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels, 0 = first block (learned constant input).
        out_channels: int,              # Number of output channels.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        resolution,                     # Size of this block's output: an int (square, cube) or one per axis.
        img_channels: int,              # Number of output image channels.
        is_last: bool,                  # Is this the last block?
        architecture: str = 'skip',     # 'orig', 'skip' or 'resnet'.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for upsampling.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        use_fp16: bool = False,         # Run this block in reduced precision (on CUDA)?
        fp16_channels_last: bool = False,  # Use channels_last memory format with float16 (2D)?
        fused_modconv_default: bool = True,  # True, False or 'inference_only', when forward() gets None.
        mixed_precision: str = 'float16',  # Reduced-precision type: 'float16' or 'bfloat16'.
        spatial_dims: int = 2,          # 2 = images, 3 = volumes.
        **layer_kwargs,                 # Arguments for SynthesisLayer (use_noise, activation, kernel_size).
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f'synthesis architecture {architecture!r} is not orig, skip or resnet')
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.shape = spatial_shape(resolution, spatial_dims)
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.mixed_precision = mixed_precision
        self.channels_last = (use_fp16 and fp16_channels_last and spatial_dims == 2)
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer('resample_filter', resample.setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0

        common = dict(w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, channels_last=self.channels_last,
                      spatial_dims=spatial_dims)
        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels] + self.shape))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, resample_filter=resample_filter, **common,
                                        **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, **common, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == 'skip':
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last, spatial_dims=spatial_dims)
            self.num_torgb += 1
        if in_channels != 0 and architecture == 'resnet':
            self.skip = ConvLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                  resample_filter=resample_filter, channels_last=self.channels_last,
                                  spatial_dims=spatial_dims)

    def forward(
        self,
        x: torch.Tensor,                # Features from the previous block [N, I, *shape / 2], None for the first.
        img: torch.Tensor,              # Image so far [N, img_channels, *shape / 2] (skip), or None.
        ws: torch.Tensor,               # Latents of this block [N, num_conv + num_torgb, w_dim].
        force_fp32: bool = False,       # Ignore use_fp16?
        fused_modconv: bool = None,     # None = fused_modconv_default.
        update_emas: bool = False,      # Unused; accepted for signature compatibility.
        attn: torch.nn.Module = None,   # Self-attention on this block's features, before toRGB; None = none.
        cpu_fp16: bool = False,         # Honour use_fp16 on CPU too (slow; tests of the reduced-precision path).
        grouped_on_cpu: bool = False,   # Honour fused_modconv on CPU too (see layers.modulated_conv).
        skip: torch.Tensor = None,      # Encoder features [N, O, *shape] added before toRGB (training.paint); None = none.
        **layer_kwargs,                 # noise_mode.
    ):
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        w_iter = iter(ws.unbind(dim=1))
        dtype = _block_dtype(self.use_fp16, force_fp32, ws.device, self.mixed_precision, cpu_fp16)
        memory_format = _activation_format(self.channels_last and not force_fp32, len(self.shape) + 2)
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == 'inference_only':
            fused_modconv = not self.training
        # Per-sample fp16 weights lose precision in the demodulation; ADA keeps fp16 batches unfused too.
        fused_modconv = bool(fused_modconv) and (dtype == torch.float32 or ws.shape[0] == 1)
        conv_kwargs = dict(fused_modconv=fused_modconv, grouped_on_cpu=grouped_on_cpu)
        half = [s // 2 for s in self.shape]

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype).unsqueeze(0).expand(ws.shape[0], *self.const.shape)
            x = self.conv1(x, next(w_iter), **conv_kwargs, **layer_kwargs)
        else:
            misc.assert_shape(x, [None, self.in_channels] + half)
            x = x.to(dtype=dtype, memory_format=memory_format)
            if self.architecture == 'resnet':
                y = self.skip(x, gain=np.sqrt(0.5))
                x = self.conv0(x, next(w_iter), **conv_kwargs, **layer_kwargs)
                x = self.conv1(x, next(w_iter), gain=np.sqrt(0.5), **conv_kwargs, **layer_kwargs)
                x = y.add_(x)
            else:
                x = self.conv0(x, next(w_iter), **conv_kwargs, **layer_kwargs)
                x = self.conv1(x, next(w_iter), **conv_kwargs, **layer_kwargs)
        if skip is not None:
            # Co-modulated GANs' skip connections (Zhao et al. 2021): the encoder's features of this level.
            x = x + skip.to(dtype=x.dtype, memory_format=memory_format)
        if attn is not None:
            # Before toRGB, so that the image this block adds (and, at the last block, the output) sees it.
            x = attn(x.to(dtype=torch.float32, memory_format=torch.contiguous_format))
            x = x.to(dtype=dtype, memory_format=memory_format)

        if img is not None:
            misc.assert_shape(img, [None, self.img_channels] + half)
            img = resample.upsample(img, self.resample_filter)
        if self.is_last or self.architecture == 'skip':
            y = self.torgb(x, next(w_iter), **conv_kwargs)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = img.add_(y) if img is not None else y
        return x, img

    def extra_repr(self) -> str:
        return f'shape={self.shape}, architecture={self.architecture:s}, use_fp16={self.use_fp16}'


@snapshot.persistent_class
class SynthesisNetwork(torch.nn.Module):
    """Synthesis network w -> image or volume: blocks from the base size to img_resolution, doubling every side
    (StyleGAN2, Fig. 7, 'skip' by default)."""

    def __init__(
        self,
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        img_resolution,                 # Output size: an int (square, or cube with spatial_dims=3) or one per axis.
        img_channels: int,              # Number of output image channels.
        channel_base: int = 32768,      # Channels at a level = min(channel_base // largest side, channel_max).
        channel_max: int = 512,         # Maximum number of channels in any layer.
        num_fp16_res: int = 4,          # Use reduced precision for the N highest levels (CUDA).
        conv_clamp: float = 256,        # Clamp the outputs of convolutions to +-X; None = no clamping.
        attn_res: list = [],            # Levels (largest side) whose block runs self-attention, before toRGB.
        attn_kwargs: dict = {},         # Attention options; class_name defaults to DEFAULT_ATTENTION.
        spatial_dims: int = None,       # 2 or 3; None = 2 for an int img_resolution, else its length.
        mixed_precision: str = 'float16',  # Reduced-precision type: 'float16' or 'bfloat16'.
        checkpointing: bool = False,    # Recompute each block in backward instead of storing its activations.
        **block_kwargs,                 # Arguments for SynthesisBlock (architecture, use_noise, resample_filter, ...).
    ):
        super().__init__()
        _check_mixed_precision(mixed_precision)
        self.img_shape, self.base_shape, self.num_levels = network_geometry(img_resolution, spatial_dims, min_levels=0)
        self.spatial_dims = len(self.img_shape)
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.checkpointing = bool(checkpointing)
        shapes = _level_shapes(self.base_shape, self.num_levels)
        self.block_resolutions = [max(s) for s in shapes]
        channels = _channels_per_resolution(self.block_resolutions, channel_base, channel_max)

        self.num_ws = 0
        for level, (res, shape) in enumerate(zip(self.block_resolutions, shapes)):
            in_channels = channels[self.block_resolutions[level - 1]] if level > 0 else 0
            block = SynthesisBlock(in_channels, channels[res], w_dim=w_dim, resolution=shape,
                                   img_channels=img_channels, is_last=(level == self.num_levels),
                                   use_fp16=(level > 0 and level > self.num_levels - num_fp16_res),
                                   conv_clamp=conv_clamp, mixed_precision=mixed_precision,
                                   spatial_dims=self.spatial_dims, **block_kwargs)
            self.num_ws += block.num_conv
            if level == self.num_levels:
                self.num_ws += block.num_torgb
            setattr(self, f'b{res}', block)

        self.attn_res = sorted(int(r) for r in attn_res)
        for res, layer in _build_attention(self.attn_res, attn_kwargs, channels, self.block_resolutions, 'G').items():
            setattr(self, f'attn{res}', layer)

    def forward(
        self,
        ws: torch.Tensor,               # Latents [N, num_ws, w_dim].
        noise_mode: str = 'random',     # 'random', 'const' or 'none'.
        force_fp32: bool = False,       # Run every block in float32?
        update_emas: bool = False,      # Passed to the blocks (unused there).
        skips: dict = None,             # {level side: features} added in the blocks (training.paint); None = none.
        **block_kwargs,                 # fused_modconv, cpu_fp16, grouped_on_cpu.
    ) -> torch.Tensor:
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim])
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f'b{res}')
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv  # toRGB shares its w with the next block's first conv.
            attn = getattr(self, f'attn{res}') if res in self.attn_res else None
            if skips is not None:
                block_kwargs['skip'] = skips.get(res)
            run = functools.partial(block, force_fp32=force_fp32, noise_mode=noise_mode, update_emas=update_emas,
                                    attn=attn, **block_kwargs)
            x, img = _maybe_checkpoint(self.checkpointing and self.training, run, x, img, block_ws)
        misc.assert_shape(img, [None, self.img_channels] + self.img_shape)
        return img

    def extra_repr(self) -> str:
        return (f'w_dim={self.w_dim:d}, num_ws={self.num_ws:d}, img_shape={self.img_shape}, '
                f'img_channels={self.img_channels:d}, attn_res={self.attn_res}, checkpointing={self.checkpointing}')


@snapshot.persistent_class
class Generator(torch.nn.Module):
    """StyleGAN2 generator: mapping network z, c -> ws, then synthesis ws -> image or volume in roughly [-1, 1]."""

    def __init__(
        self,
        z_dim: int,                     # Input latent (Z) dimensionality.
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = unconditional.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        img_resolution,                 # Output size: an int (square, or cube with spatial_dims=3) or one per axis.
        img_channels: int,              # Number of output image channels (1, 3, 4, 7, ...).
        mapping_kwargs: dict = {},      # Arguments for MappingNetwork.
        spatial_dims: int = None,       # 2 or 3; None = 2 for an int img_resolution, else its length.
        **synthesis_kwargs,             # Arguments for SynthesisNetwork.
    ):
        super().__init__()
        # StyleGAN2-ADA's configs pass a nested synthesis_kwargs={...}; StyleGAN3's pass them flat. Take both.
        synthesis_kwargs = {**synthesis_kwargs.pop('synthesis_kwargs', {}), **synthesis_kwargs}
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          spatial_dims=spatial_dims, **synthesis_kwargs)
        self.img_shape = self.synthesis.img_shape
        self.spatial_dims = self.synthesis.spatial_dims
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    @staticmethod
    def check_resolution(img_resolution, spatial_dims: int = None) -> None:
        """Raise ShapeError (one line) for a size that G and D cannot both build; config validation calls this."""
        network_geometry(img_resolution, spatial_dims, min_levels=1)

    @staticmethod
    def upgrade_record(old_name: str, init_kwargs: dict, state_dict: dict):
        """(init_kwargs, state_dict) of a record written under an earlier class name (torch_utils.snapshot)."""
        if old_name == 'mri.networks3d.Generator':
            return _upgrade_3d_record(init_kwargs, state_dict)
        return init_kwargs, state_dict

    def forward(
        self,
        z: torch.Tensor,                # Latents [N, z_dim].
        c: torch.Tensor,                # Labels [N, c_dim].
        truncation_psi: float = 1,      # Truncation strength; 1 = off.
        truncation_cutoff: int = None,  # Truncate only the first this many ws; None = all.
        update_emas: bool = False,      # Update w_avg?
        noise_mode: str = 'random',     # 'random' (training), 'const' (reproducible images) or 'none'.
        force_fp32: bool = False,       # Run every block in float32?
        **synthesis_kwargs,             # fused_modconv, cpu_fp16, grouped_on_cpu.
    ) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, update_emas=update_emas,
                              **synthesis_kwargs)

# ----------------------------------------------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(torch.nn.Module):
    """One level of the discriminator: [fromRGB] + conv0 + downsampling conv1 [+ 1x1 skip] (StyleGAN2, Fig. 7)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels, 0 = first block.
        tmp_channels: int,              # Number of intermediate channels.
        out_channels: int,              # Number of output channels.
        resolution,                     # Size of this block's input: an int (square, cube) or one per axis.
        img_channels: int,              # Number of input image channels.
        first_layer_idx: int,           # Index of the first layer, for freeze_layers.
        architecture: str = 'resnet',   # 'orig', 'skip' or 'resnet'.
        activation: str = 'lrelu',      # Name of a bias_act activation.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for downsampling.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        use_fp16: bool = False,         # Run this block in reduced precision (on CUDA)?
        fp16_channels_last: bool = False,  # Use channels_last memory format with float16 (2D)?
        freeze_layers: int = 0,         # Freeze the first this many layers of D (transfer learning).
        mixed_precision: str = 'float16',  # Reduced-precision type: 'float16' or 'bfloat16'.
        spatial_dims: int = 2,          # 2 = images, 3 = volumes.
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f'discriminator architecture {architecture!r} is not orig, skip or resnet')
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.shape = spatial_shape(resolution, spatial_dims)
        self.img_channels = img_channels
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.mixed_precision = mixed_precision
        self.channels_last = (use_fp16 and fp16_channels_last and spatial_dims == 2)
        self.register_buffer('resample_filter', resample.setup_filter(resample_filter))
        self.num_layers = 0
        layer_idx = [first_layer_idx]

        def trainable() -> bool:
            trainable = layer_idx[0] >= freeze_layers
            layer_idx[0] += 1
            self.num_layers += 1
            return trainable

        common = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last,
                      spatial_dims=spatial_dims)
        if in_channels == 0 or architecture == 'skip':
            self.fromrgb = ConvLayer(img_channels, tmp_channels, kernel_size=1, trainable=trainable(), **common)
        self.conv0 = ConvLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=trainable(), **common)
        self.conv1 = ConvLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=trainable(),
                               resample_filter=resample_filter, **common)
        if architecture == 'resnet':
            self.skip = ConvLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                  trainable=trainable(), resample_filter=resample_filter,
                                  channels_last=self.channels_last, spatial_dims=spatial_dims)

    def forward(self, x: torch.Tensor, img: torch.Tensor, force_fp32: bool = False, cpu_fp16: bool = False):
        device = (x if x is not None else img).device
        dtype = _block_dtype(self.use_fp16, force_fp32, device, self.mixed_precision, cpu_fp16)
        # On CPU, oneDNN's 2D convolutions and the depthwise FIR filters run faster on channels_last activations.
        cl = (self.channels_last and not force_fp32) or (device.type == 'cpu' and CPU_CHANNELS_LAST)
        memory_format = _activation_format(cl, len(self.shape) + 2)
        if x is not None:
            misc.assert_shape(x, [None, self.in_channels] + self.shape)  # [NC*]
            x = x.to(dtype=dtype, memory_format=memory_format)
        if self.in_channels == 0 or self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels] + self.shape)
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = resample.downsample(img, self.resample_filter) if self.architecture == 'skip' else None

        if self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=np.sqrt(0.5))
            x = y.add_(x)
        else:
            x = self.conv0(x)
            x = self.conv1(x)
        return x, img

    def extra_repr(self) -> str:
        return f'shape={self.shape}, architecture={self.architecture:s}, use_fp16={self.use_fp16}'


class DiscriminatorEpilogue(torch.nn.Module):
    """The head at the base size: minibatch-std, conv, fc, output; conditioning by projection (Miyato & Koyama
    2018)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels.
        cmap_dim: int,                  # Dimensionality of the projected label, 0 = unconditional.
        resolution,                     # Base size (4 in 2D): an int (square, cube) or one per axis.
        img_channels: int,              # Number of input image channels.
        architecture: str = 'resnet',   # 'orig', 'skip' or 'resnet'.
        mbstd_group_size: int = 4,      # Group size for minibatch-std; None = whole batch.
        mbstd_num_channels: int = 1,    # Number of minibatch-std channels; 0 = off.
        activation: str = 'lrelu',      # Name of a bias_act activation.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        spatial_dims: int = 2,          # 2 = images, 3 = volumes.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.shape = spatial_shape(resolution, spatial_dims)
        self.img_channels = img_channels
        self.architecture = architecture
        if architecture == 'skip':
            self.fromrgb = ConvLayer(img_channels, in_channels, kernel_size=1, activation=activation,
                                     spatial_dims=spatial_dims)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = ConvLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                              conv_clamp=conv_clamp, spatial_dims=spatial_dims)
        self.fc = FullyConnectedLayer(in_channels * int(np.prod(self.shape)), in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, img: torch.Tensor, cmap: torch.Tensor, force_fp32: bool = False):
        misc.assert_shape(x, [None, self.in_channels] + self.shape)  # [NC*]
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)  # The head always runs in fp32.
        if self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels] + self.shape)
            x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            misc.assert_shape(cmap, [None, self.cmap_dim])
            # Projection discriminator: <phi(x), embed(c)>, scaled to keep unit variance at init.
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        misc.assert_shape(x, [None, 1])
        return x


@snapshot.persistent_class
class Discriminator(torch.nn.Module):
    """StyleGAN2 discriminator (resnet by default) for images or volumes, with optional self-attention and feature
    quantization; the epilogue at the base size is block ``b{base side}`` (``b4`` in 2D).

    Hook placement: block ``b{R}`` takes features at resolution R and outputs R/2. A hook "at resolution R"
    (attention in ``attn_res``, quantization in ``quantize_kwargs['resolutions']``) runs on the output of the
    block whose OUTPUT is at R, i.e. after ``b{2R}``, so R may be any level below the input's. This mirrors G,
    where the hook at R also sees R-sized features, and keeps every hook on features D computed itself.
    When both run at one resolution, attention comes first, then quantization.
    """

    def __init__(
        self,
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = unconditional.
        img_resolution,                 # Input size: an int (square, or cube with spatial_dims=3) or one per axis.
        img_channels: int,              # Number of input image channels.
        architecture: str = 'resnet',   # 'orig', 'skip' or 'resnet'.
        channel_base: int = 32768,      # Channels at a level = min(channel_base // largest side, channel_max).
        channel_max: int = 512,         # Maximum number of channels in any layer.
        num_fp16_res: int = 4,          # Use reduced precision for the N highest levels (CUDA).
        conv_clamp: float = 256,        # Clamp the outputs of convolutions to +-X; None = no clamping.
        cmap_dim: int = None,           # Dimensionality of the projected label; None = channels at the base.
        block_kwargs: dict = {},        # Arguments for DiscriminatorBlock.
        mapping_kwargs: dict = {},      # Arguments for the label MappingNetwork.
        epilogue_kwargs: dict = {},     # Arguments for DiscriminatorEpilogue (mbstd_group_size, mbstd_num_channels).
        attn_res: list = [],            # Resolutions after whose block a self-attention layer runs (see above).
        attn_kwargs: dict = {},         # Attention options; class_name defaults to DEFAULT_ATTENTION.
        quantize_kwargs: dict = None,   # Feature quantization {class_name, resolutions, dict_size, decay}; None = off.
        spatial_dims: int = None,       # 2 or 3; None = 2 for an int img_resolution, else its length.
        mixed_precision: str = 'float16',  # Reduced-precision type: 'float16' or 'bfloat16'.
        checkpointing: bool = False,    # Recompute each block in backward instead of storing its activations.
    ):
        super().__init__()
        _check_mixed_precision(mixed_precision)
        self.img_shape, self.base_shape, self.num_levels = network_geometry(img_resolution, spatial_dims)
        self.spatial_dims = len(self.img_shape)
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.checkpointing = bool(checkpointing)
        shapes = _level_shapes(self.base_shape, self.num_levels)
        sides = [max(s) for s in shapes]
        self.block_resolutions = sides[:0:-1]  # Highest level first; the base level is the epilogue.
        channels = _channels_per_resolution(sides, channel_base, channel_max)
        if cmap_dim is None:
            cmap_dim = channels[sides[0]]
        if c_dim == 0:
            cmap_dim = 0

        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp,
                      spatial_dims=self.spatial_dims)
        cur_layer_idx = 0
        for level in range(self.num_levels, 0, -1):
            res = sides[level]
            block = DiscriminatorBlock(channels[res] if level < self.num_levels else 0, channels[res],
                                       channels[sides[level - 1]], resolution=shapes[level],
                                       first_layer_idx=cur_layer_idx,
                                       use_fp16=(level > self.num_levels - num_fp16_res),
                                       mixed_precision=mixed_precision, **block_kwargs, **common)
            setattr(self, f'b{res}', block)
            cur_layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **mapping_kwargs)
        self.epilogue_name = f'b{sides[0]}'
        setattr(self, self.epilogue_name, DiscriminatorEpilogue(channels[sides[0]], cmap_dim=cmap_dim,
                                                                resolution=shapes[0], **epilogue_kwargs, **common))
        self._build_hooks(attn_res, attn_kwargs, quantize_kwargs, channels, sides[:-1])

    def _build_hooks(self, attn_res, attn_kwargs, quantize_kwargs, channels, hook_res):
        """Attention and quantizers after the blocks whose output is at the requested resolutions."""
        self.attn_res = sorted(int(r) for r in attn_res)
        for res, layer in _build_attention(self.attn_res, attn_kwargs, channels, hook_res, 'D').items():
            setattr(self, f'attn{res}', layer)
        self.quantizers = torch.nn.ModuleDict()
        if quantize_kwargs is not None:
            kwargs = dict(quantize_kwargs)
            resolutions = [int(r) for r in kwargs.pop('resolutions', [32])]
            class_name = kwargs.pop('class_name', DEFAULT_QUANTIZER)
            for res in resolutions:
                if res not in hook_res:
                    raise ValueError(f'D quantize resolution {res} is not one of {sorted(hook_res)}')
                self.quantizers[str(res)] = _construct_hook(class_name=class_name, channels=channels[res], **kwargs)

    @staticmethod
    def upgrade_record(old_name: str, init_kwargs: dict, state_dict: dict):
        """(init_kwargs, state_dict) of a record written under an earlier class name (torch_utils.snapshot):
        the former mri.networks3d.Discriminator kept its epilogue as ``epilogue`` (now ``b{base side}``) and its
        blocks no filter buffer of their own (the same constant as their conv1's)."""
        if old_name != 'mri.networks3d.Discriminator':
            return init_kwargs, state_dict
        init_kwargs, state_dict = _upgrade_3d_record(init_kwargs, state_dict)
        _, base, _ = network_geometry(init_kwargs['img_resolution'], 3)
        state_dict = {re.sub(r'^epilogue\.', f'b{max(base)}.', name): value for name, value in state_dict.items()}
        for name in list(state_dict):
            block = re.fullmatch(r'(b\d+)\.conv1\.resample_filter', name)
            if block:
                state_dict.setdefault(f'{block.group(1)}.resample_filter', state_dict[name])
        return init_kwargs, state_dict

    def forward(
        self,
        img: torch.Tensor,              # Images [N, img_channels, *img_shape].
        c: torch.Tensor,                # Labels [N, c_dim].
        update_emas: bool = False,      # Unused; accepted for signature compatibility.
        update_quant: bool = False,     # Update the quantizers' EMA dictionaries (on real images)?
        return_aux: bool = False,       # Also return {'fq_loss', 'fq_perplexity', 'fq_usage'}?
        force_fp32: bool = False,       # Run every block in float32?
        quantize: bool = True,          # False = skip the quantizers (R1 on the unquantized D, see quantize_forward).
        cpu_fp16: bool = False,         # Honour the reduced-precision blocks on CPU too (tests).
    ):
        misc.assert_shape(img, [None, self.img_channels] + self.img_shape)  # [NC*]
        fq_loss = None
        x = None
        for res in self.block_resolutions:
            run = functools.partial(getattr(self, f'b{res}'), force_fp32=force_fp32, cpu_fp16=cpu_fp16)
            x, img = _maybe_checkpoint(self.checkpointing and self.training, run, x, img)
            out_res = res // 2
            if out_res in self.attn_res:
                x = getattr(self, f'attn{out_res}')(x.to(dtype=torch.float32, memory_format=torch.contiguous_format))
            quantizer = self.quantizers[str(out_res)] if quantize and str(out_res) in self.quantizers else None
            if quantizer is not None:
                x, loss = quantizer(x.to(dtype=torch.float32, memory_format=torch.contiguous_format),
                                    update=update_quant)
                fq_loss = loss if fq_loss is None else fq_loss + loss

        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        x = getattr(self, self.epilogue_name)(x, img, cmap)
        if not return_aux:
            return x
        if fq_loss is None:
            fq_loss = torch.zeros([], device=x.device)
        aux = {
            'fq_loss': fq_loss,
            'fq_perplexity': {int(r): float(q.perplexity()) for r, q in self.quantizers.items()},
            'fq_usage': {int(r): float(q.usage()) for r, q in self.quantizers.items()},
        }
        return x, aux

    @property
    def quantize_forward(self) -> bool:
        """True when a quantizer feeds its codes forward (FQ mode 'forward'): past it D is piecewise constant in
        its input, so its exact input gradient is 0 almost everywhere and autograd returns the straight-through
        stand-in. The loss then takes R1 on this D with ``quantize=False`` (same weights, features unquantized)."""
        return any(getattr(q, 'mode', 'forward') == 'forward' for q in self.quantizers.values())

    def extra_repr(self) -> str:
        return (f'c_dim={self.c_dim:d}, img_shape={self.img_shape}, img_channels={self.img_channels:d}, '
                f'checkpointing={self.checkpointing}')
