"""StyleGAN2 generator and discriminator (Karras et al. 2020, "Analyzing and Improving the Image Quality of
StyleGAN"), with the mixed-precision and configuration conventions of StyleGAN2-ADA (Karras et al. 2020,
"Training Generative Adversarial Networks with Limited Data"), written for this project.

Constructor arguments and forward signatures are those of StyleGAN2-ADA (see docs/internals.md), so its
configs port unchanged; state-dict names follow it too. Two generic hook points serve the MRI extensions
without this room importing ``mri/`` (the classes are named by string, as for
``dnnlib.construct_class_by_name``, and must be ``torch.nn.Module`` classes):

- self-attention (Zhang et al. 2019, SAGAN) at the resolutions in ``attn_res``, in G and D;
- feature quantization in D (Zhao et al. 2020, "Feature Quantization Improves GAN Training") at the
  resolutions in ``quantize_kwargs['resolutions']``.

Mixed precision: blocks at the ``num_fp16_res`` highest resolutions run in float16 on CUDA, with activations
clamped to +-``conv_clamp``. On CPU, float16 convolutions are emulated and slower than float32, so those blocks
run in float32 there unless ``ALLOW_CPU_FP16`` is set (tests set it to exercise the fp16 code path).
"""

import contextlib

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import snapshot
from torch_utils.ops import upfirdn2d
from training.layers import Conv2dLayer
from training.layers import FullyConnectedLayer
from training.layers import MappingNetwork
from training.layers import MinibatchStdLayer
from training.layers import SynthesisLayer
from training.layers import ToRGBLayer

ALLOW_CPU_FP16 = False                  # True = honour num_fp16_res on CPU too (slow; for tests of the fp16 path).
DEFAULT_ATTENTION = 'mri.attention.SelfAttention'

__all__ = ['Generator', 'Discriminator', 'MappingNetwork', 'SynthesisNetwork', 'ALLOW_CPU_FP16']


CPU_CHANNELS_LAST = True   # D blocks on CPU use channels_last activations (measured faster; see bench_networks).


def _block_dtype(use_fp16: bool, force_fp32: bool, device: torch.device) -> torch.dtype:
    if use_fp16 and not force_fp32 and (device.type == 'cuda' or ALLOW_CPU_FP16):
        return torch.float16
    return torch.float32


def _channels_per_resolution(resolutions, channel_base: int, channel_max: int) -> dict:
    return {res: min(channel_base // res, channel_max) for res in resolutions}


def _fp16_resolution(img_resolution: int, num_fp16_res: int) -> int:
    # The num_fp16_res highest resolutions; never 4x4, where the const/epilogue layers live.
    return max(2 ** (int(np.log2(img_resolution)) + 1 - num_fp16_res), 8)


_DOUBLE_BACKWARD_DEPTH = [0]


@contextlib.contextmanager
def double_backward():
    """Marks a pass whose graph will be differentiated twice (R1, path length). Hook layers that have a fast
    path without a double backward (fused attention kernels) take their differentiable-twice path inside it."""
    _DOUBLE_BACKWARD_DEPTH[0] += 1
    try:
        yield
    finally:
        _DOUBLE_BACKWARD_DEPTH[0] -= 1


def double_backward_needed() -> bool:
    """True inside double_backward()."""
    return _DOUBLE_BACKWARD_DEPTH[0] > 0


def _construct_hook(class_name: str, **kwargs) -> torch.nn.Module:
    """Build a hook module by class name. Snapshots carry these names inside init_kwargs, so refuse anything that
    is not a torch.nn.Module class: a snapshot must not be able to name an arbitrary callable to run."""
    cls = dnnlib.get_obj_by_name(class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f'training/networks.py: hook class_name {class_name!r} is not a torch.nn.Module class')
    return cls(**kwargs)


def _build_attention(attn_res, attn_kwargs: dict, channels: dict, valid, where: str) -> dict:
    """One attention layer per requested resolution, built by class name (the class lives outside training/)."""
    layers = {}
    kwargs = dict(attn_kwargs)
    kwargs.setdefault('class_name', DEFAULT_ATTENTION)
    for res in attn_res:
        res = int(res)
        if res not in valid:
            raise ValueError(f'training/networks.py: {where} attn_res {res} is not one of {sorted(valid)}')
        layers[res] = _construct_hook(channels=channels[res], resolution=res, **kwargs)
    return layers

# ----------------------------------------------------------------------------------------------------------------
# Generator.


class SynthesisBlock(torch.nn.Module):
    """One resolution of the synthesis network: (const | upsampling conv0) + conv1 + toRGB (StyleGAN2, Fig. 7)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels, 0 = first block (learned constant input).
        out_channels: int,              # Number of output channels.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        resolution: int,                # Resolution of this block.
        img_channels: int,              # Number of output image channels.
        is_last: bool,                  # Is this the last block?
        architecture: str = 'skip',     # 'orig', 'skip' or 'resnet'.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for upsampling.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        use_fp16: bool = False,         # Run this block in float16 (on CUDA)?
        fp16_channels_last: bool = False,  # Use channels_last memory format with float16?
        fused_modconv_default: bool = True,  # True, False or 'inference_only', when forward() gets None.
        **layer_kwargs,                 # Arguments for SynthesisLayer.
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f'training/networks.py: synthesis architecture {architecture!r} '
                             f'is not orig, skip or resnet')
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0

        if in_channels == 0:
            self.const = torch.nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == 'skip':
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
            self.num_torgb += 1
        if in_channels != 0 and architecture == 'resnet':
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter, channels_last=self.channels_last)

    def forward(
        self,
        x: torch.Tensor,                # Features from the previous block [N, I, R/2, R/2], None for the first.
        img: torch.Tensor,              # Image so far [N, img_channels, R/2, R/2] (skip), or None.
        ws: torch.Tensor,               # Latents of this block [N, num_conv + num_torgb, w_dim].
        force_fp32: bool = False,       # Ignore use_fp16?
        fused_modconv: bool = None,     # None = fused_modconv_default.
        update_emas: bool = False,      # Unused; accepted for signature compatibility.
        attn: torch.nn.Module = None,   # Self-attention on this block's features, before toRGB; None = none.
        **layer_kwargs,                 # noise_mode.
    ):
        misc.assert_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim])
        w_iter = iter(ws.unbind(dim=1))
        dtype = _block_dtype(self.use_fp16, force_fp32, ws.device)
        memory_format = torch.channels_last if self.channels_last and not force_fp32 else torch.contiguous_format
        if fused_modconv is None:
            fused_modconv = self.fused_modconv_default
        if fused_modconv == 'inference_only':
            fused_modconv = not self.training
        # Per-sample fp16 weights lose precision in the demodulation; ADA keeps fp16 batches unfused too.
        fused_modconv = bool(fused_modconv) and (dtype == torch.float32 or ws.shape[0] == 1)

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            misc.assert_shape(x, [None, self.in_channels, self.resolution // 2, self.resolution // 2])
            x = x.to(dtype=dtype, memory_format=memory_format)

        if self.in_channels == 0:
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        elif self.architecture == 'resnet':
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, gain=np.sqrt(0.5), **layer_kwargs)
            x = y.add_(x)
        else:
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, **layer_kwargs)
        if attn is not None:
            # Before toRGB, so that the image this block adds (and, at the last block, the output) sees it.
            x = attn(x.to(dtype=torch.float32, memory_format=torch.contiguous_format))
            x = x.to(dtype=dtype, memory_format=memory_format)

        if img is not None:
            misc.assert_shape(img, [None, self.img_channels, self.resolution // 2, self.resolution // 2])
            img = upfirdn2d.upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == 'skip':
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = img.add_(y) if img is not None else y
        return x, img

    def extra_repr(self) -> str:
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}, use_fp16={self.use_fp16}'


@snapshot.persistent_class
class SynthesisNetwork(torch.nn.Module):
    """Synthesis network w -> image: blocks from 4x4 to img_resolution (StyleGAN2, Fig. 7, 'skip' by default)."""

    def __init__(
        self,
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        img_resolution: int,            # Output image resolution (a power of two >= 4).
        img_channels: int,              # Number of output image channels.
        channel_base: int = 32768,      # Overall multiplier for the number of channels.
        channel_max: int = 512,         # Maximum number of channels in any layer.
        num_fp16_res: int = 4,          # Use float16 for the N highest resolutions (CUDA).
        conv_clamp: float = 256,        # Clamp the outputs of convolutions to +-X; None = no clamping.
        attn_res: list = [],            # Resolutions whose block runs self-attention on its features, before toRGB.
        attn_kwargs: dict = {},         # Attention options; class_name defaults to mri.attention.SelfAttention.
        **block_kwargs,                 # Arguments for SynthesisBlock (architecture, use_noise, resample_filter, ...).
    ):
        if img_resolution < 4 or img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f'training/networks.py: img_resolution {img_resolution} is not a power of two >= 4')
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(2, self.img_resolution_log2 + 1)]
        channels = _channels_per_resolution(self.block_resolutions, channel_base, channel_max)
        fp16_resolution = _fp16_resolution(img_resolution, num_fp16_res)

        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_channels, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=(res == img_resolution),
                                   use_fp16=(res >= fp16_resolution), conv_clamp=conv_clamp, **block_kwargs)
            self.num_ws += block.num_conv
            if res == img_resolution:
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
        **block_kwargs,                 # fused_modconv.
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
            x, img = block(x, img, block_ws, force_fp32=force_fp32, noise_mode=noise_mode,
                           update_emas=update_emas, attn=attn, **block_kwargs)
        misc.assert_shape(img, [None, self.img_channels, self.img_resolution, self.img_resolution])
        return img

    def extra_repr(self) -> str:
        return f'w_dim={self.w_dim:d}, num_ws={self.num_ws:d}, img_resolution={self.img_resolution:d}, ' \
               f'img_channels={self.img_channels:d}, attn_res={self.attn_res}'


@snapshot.persistent_class
class Generator(torch.nn.Module):
    """StyleGAN2 generator: mapping network z, c -> ws, then synthesis ws -> image in roughly [-1, 1]."""

    def __init__(
        self,
        z_dim: int,                     # Input latent (Z) dimensionality.
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = unconditional.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        img_resolution: int,            # Output resolution.
        img_channels: int,              # Number of output image channels (1, 3, 4, 7, ...).
        mapping_kwargs: dict = {},      # Arguments for MappingNetwork.
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
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    def forward(
        self,
        z: torch.Tensor,                # Latents [N, z_dim].
        c: torch.Tensor,                # Labels [N, c_dim].
        truncation_psi: float = 1,      # Truncation strength; 1 = off.
        truncation_cutoff: int = None,  # Truncate only the first this many ws; None = all.
        update_emas: bool = False,      # Update w_avg?
        noise_mode: str = 'random',     # 'random' (training), 'const' (reproducible images) or 'none'.
        force_fp32: bool = False,       # Run every block in float32?
        **synthesis_kwargs,             # fused_modconv.
    ) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, update_emas=update_emas,
                              **synthesis_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(torch.nn.Module):
    """One resolution of the discriminator: [fromRGB] + conv0 + downsampling conv1 [+ 1x1 skip] (StyleGAN2, Fig. 7)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels, 0 = first block.
        tmp_channels: int,              # Number of intermediate channels.
        out_channels: int,              # Number of output channels.
        resolution: int,                # Resolution of this block (its input).
        img_channels: int,              # Number of input image channels.
        first_layer_idx: int,           # Index of the first layer, for freeze_layers.
        architecture: str = 'resnet',   # 'orig', 'skip' or 'resnet'.
        activation: str = 'lrelu',      # Name of a bias_act activation.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for downsampling.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        use_fp16: bool = False,         # Run this block in float16 (on CUDA)?
        fp16_channels_last: bool = False,  # Use channels_last memory format with float16?
        freeze_layers: int = 0,         # Freeze the first this many layers of D (transfer learning).
    ):
        if architecture not in ('orig', 'skip', 'resnet'):
            raise ValueError(f'training/networks.py: discriminator architecture {architecture!r} '
                             f'is not orig, skip or resnet')
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = (use_fp16 and fp16_channels_last)
        self.register_buffer('resample_filter', upfirdn2d.setup_filter(resample_filter))
        self.num_layers = 0
        layer_idx = [first_layer_idx]

        def trainable() -> bool:
            trainable = layer_idx[0] >= freeze_layers
            layer_idx[0] += 1
            self.num_layers += 1
            return trainable

        common = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0 or architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=trainable(), **common)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=trainable(),
                                 resample_filter=resample_filter, **common)
        if architecture == 'resnet':
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter,
                                    channels_last=self.channels_last)

    def forward(self, x: torch.Tensor, img: torch.Tensor, force_fp32: bool = False):
        device = (x if x is not None else img).device
        dtype = _block_dtype(self.use_fp16, force_fp32, device)
        # On CPU, oneDNN's convolutions and the depthwise FIR filters run faster on channels_last activations.
        cl = (self.channels_last and not force_fp32) or (device.type == 'cpu' and CPU_CHANNELS_LAST)
        memory_format = torch.channels_last if cl else torch.contiguous_format
        if x is not None:
            misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])  # [NCHW]
            x = x.to(dtype=dtype, memory_format=memory_format)
        if self.in_channels == 0 or self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels, self.resolution, self.resolution])
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = upfirdn2d.downsample2d(img, self.resample_filter) if self.architecture == 'skip' else None

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
        return f'resolution={self.resolution:d}, architecture={self.architecture:s}, use_fp16={self.use_fp16}'


class DiscriminatorEpilogue(torch.nn.Module):
    """The 4x4 head: minibatch-std, conv, fc, output; conditioning by projection (Miyato & Koyama 2018)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels.
        cmap_dim: int,                  # Dimensionality of the projected label, 0 = unconditional.
        resolution: int,                # Resolution of this block (4).
        img_channels: int,              # Number of input image channels.
        architecture: str = 'resnet',   # 'orig', 'skip' or 'resnet'.
        mbstd_group_size: int = 4,      # Group size for minibatch-std; None = whole batch.
        mbstd_num_channels: int = 1,    # Number of minibatch-std channels; 0 = off.
        activation: str = 'lrelu',      # Name of a bias_act activation.
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.cmap_dim = cmap_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.architecture = architecture
        if architecture == 'skip':
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution ** 2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, img: torch.Tensor, cmap: torch.Tensor, force_fp32: bool = False):
        misc.assert_shape(x, [None, self.in_channels, self.resolution, self.resolution])  # [NCHW]
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)  # The head always runs in fp32.
        if self.architecture == 'skip':
            misc.assert_shape(img, [None, self.img_channels, self.resolution, self.resolution])
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
    """StyleGAN2 discriminator (resnet by default) with optional self-attention and feature quantization.

    Hook placement: block ``b{R}`` takes features at resolution R and outputs R/2. A hook "at resolution R"
    (attention in ``attn_res``, quantization in ``quantize_kwargs['resolutions']``) runs on the output of the
    block whose OUTPUT is at R, i.e. after ``b{2R}``, so R may be any of 4 .. img_resolution/2. This mirrors G,
    where the hook at R also sees R x R features, and keeps every hook on features D computed itself.
    When both run at one resolution, attention comes first, then quantization.
    """

    def __init__(
        self,
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = unconditional.
        img_resolution: int,            # Input resolution.
        img_channels: int,              # Number of input image channels.
        architecture: str = 'resnet',   # 'orig', 'skip' or 'resnet'.
        channel_base: int = 32768,      # Overall multiplier for the number of channels.
        channel_max: int = 512,         # Maximum number of channels in any layer.
        num_fp16_res: int = 4,          # Use float16 for the N highest resolutions (CUDA).
        conv_clamp: float = 256,        # Clamp the outputs of convolutions to +-X; None = no clamping.
        cmap_dim: int = None,           # Dimensionality of the projected label; None = channels at 4x4.
        block_kwargs: dict = {},        # Arguments for DiscriminatorBlock.
        mapping_kwargs: dict = {},      # Arguments for the label MappingNetwork.
        epilogue_kwargs: dict = {},     # Arguments for DiscriminatorEpilogue (mbstd_group_size, mbstd_num_channels).
        attn_res: list = [],            # Resolutions after whose block a self-attention layer runs (see above).
        attn_kwargs: dict = {},         # Attention options; class_name defaults to mri.attention.SelfAttention.
        quantize_kwargs: dict = None,   # Feature quantization {class_name, resolutions, dict_size, decay}; None = off.
    ):
        if img_resolution < 8 or img_resolution & (img_resolution - 1) != 0:
            raise ValueError(f'training/networks.py: D img_resolution {img_resolution} is not a power of two >= 8')
        super().__init__()
        self.c_dim = c_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(np.log2(img_resolution))
        self.img_channels = img_channels
        self.block_resolutions = [2 ** i for i in range(self.img_resolution_log2, 2, -1)]
        channels = _channels_per_resolution(self.block_resolutions + [4], channel_base, channel_max)
        fp16_resolution = _fp16_resolution(img_resolution, num_fp16_res)
        if cmap_dim is None:
            cmap_dim = channels[4]
        if c_dim == 0:
            cmap_dim = 0

        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        cur_layer_idx = 0
        for res in self.block_resolutions:
            in_channels = channels[res] if res < img_resolution else 0
            block = DiscriminatorBlock(in_channels, channels[res], channels[res // 2], resolution=res,
                                       first_layer_idx=cur_layer_idx, use_fp16=(res >= fp16_resolution),
                                       **block_kwargs, **common)
            setattr(self, f'b{res}', block)
            cur_layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **mapping_kwargs)
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4, **epilogue_kwargs, **common)

        hook_res = [res // 2 for res in self.block_resolutions]  # Output resolutions of the blocks.
        self.attn_res = sorted(int(r) for r in attn_res)
        for res, layer in _build_attention(self.attn_res, attn_kwargs, channels, hook_res, 'D').items():
            setattr(self, f'attn{res}', layer)

        self.quantizers = torch.nn.ModuleDict()
        if quantize_kwargs is not None:
            kwargs = dict(quantize_kwargs)
            resolutions = [int(r) for r in kwargs.pop('resolutions', [32])]
            class_name = kwargs.pop('class_name', 'mri.fq.FeatureQuantizer')
            for res in resolutions:
                if res not in hook_res:
                    raise ValueError(f'training/networks.py: D quantize resolution {res} '
                                     f'is not one of {sorted(hook_res)}')
                self.quantizers[str(res)] = _construct_hook(class_name=class_name, channels=channels[res], **kwargs)

    def forward(
        self,
        img: torch.Tensor,              # Images [N, img_channels, R, R].
        c: torch.Tensor,                # Labels [N, c_dim].
        update_emas: bool = False,      # Unused; accepted for signature compatibility.
        update_quant: bool = False,     # Update the quantizers' EMA dictionaries (on real images)?
        return_aux: bool = False,       # Also return {'fq_loss', 'fq_perplexity', 'fq_usage'}?
        force_fp32: bool = False,       # Run every block in float32?
        quantize: bool = True,          # False = skip the quantizers (R1 on the unquantized D, see quantize_forward).
    ):
        misc.assert_shape(img, [None, self.img_channels, self.img_resolution, self.img_resolution])  # [NCHW]
        fq_loss = None
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f'b{res}')(x, img, force_fp32=force_fp32)
            out_res = res // 2
            if out_res in self.attn_res:
                x = getattr(self, f'attn{out_res}')(x.to(dtype=torch.float32, memory_format=torch.contiguous_format))
            quantizer = self.quantizers[str(out_res)] if quantize and str(out_res) in self.quantizers else None
            if quantizer is not None:
                x, loss = quantizer(x.to(dtype=torch.float32, memory_format=torch.contiguous_format),
                                    update=update_quant)
                fq_loss = loss if fq_loss is None else fq_loss + loss

        cmap = self.mapping(None, c) if self.c_dim > 0 else None
        x = self.b4(x, img, cmap)
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
        return f'c_dim={self.c_dim:d}, img_resolution={self.img_resolution:d}, img_channels={self.img_channels:d}'
