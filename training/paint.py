"""The painting family: a co-modulated StyleGAN2 that fills a region with tissue of given labels, 2D and 3D.

Zhao et al. 2021, "Large Scale Image Completion via Co-Modulated Generative Adversarial Networks" (ICLR): an
encoder reads the image with the region blanked, the region's mask and (here) the target label map, and gives
features per resolution (skip connections into the synthesis network) and a global code; every synthesis layer's
style is an affine map of [global code, mapping(z, c)] (co-modulation), so one forward pass paints a region that
is conditioned on its surroundings and still varies with z. The output is composited,
``mask ? painted : context``, so every voxel outside the region is exactly the input. Used for tumour painting as
GliGAN does (Ferreira et al. 2024: a new tumour painted from a label map into a real scan) and for healing (all-zero
labels: healthy tissue, the BraTS 2024 inpainting task).

The family is built from the engine's own parts (training.networks): the synthesis network is the StyleGAN2 one
with ``w_dim`` widened by the code, the encoder is made of its discriminator blocks, and the discriminator is the
StyleGAN2 one reading the image with the mask and label map as extra channels (projection-conditioned on the
class, e.g. the cohort). Dimensionality follows ``img_resolution`` / ``spatial_dims`` as everywhere.

Channels are data: ``channels`` names the archive's channels (dataset.json); the networks paint those that are
neither tumour labels (``seg_*``, torch_utils.label_channels) nor the brain mask (``brain``), and read the labels.
"""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import snapshot
from torch_utils.label_channels import is_label_channel
from training.layers import ConvLayer
from training.layers import FullyConnectedLayer
from training.layers import MappingNetwork
from training.networks import Discriminator
from training.networks import DiscriminatorBlock
from training.networks import SynthesisNetwork
from training.networks import _channels_per_resolution
from training.networks import _level_shapes
from training.networks import _maybe_checkpoint
from training.networks import network_geometry

__all__ = ['PaintGenerator', 'PaintDiscriminator', 'PaintEncoder', 'paint_layout', 'is_paint_generator']

REGION_CHANNEL = 'brain'          # The archive's brain-mask channel: neither painted nor a label.
MASK_CHANNEL = 'seg_repaint'      # The name of the mask channel in what D (and ADA) sees: a label-like channel.


def paint_layout(channels, img_channels: int) -> tuple:
    """(painted channel indices, label channel indices, brain channel index or None) of an archive's channels."""
    names = list(channels) if channels is not None else [f'ch{i}' for i in range(img_channels)]
    if len(names) != img_channels:
        raise ValueError(f'channels names {len(names)} channels, img_channels is {img_channels}')
    paint = [i for i, n in enumerate(names) if not is_label_channel(n) and n != REGION_CHANNEL]
    labels = [i for i, n in enumerate(names) if is_label_channel(n)]
    brain = names.index(REGION_CHANNEL) if REGION_CHANNEL in names else None
    if not paint:
        raise ValueError(f'channels {names} hold nothing to paint (every channel is a label or the brain mask)')
    return paint, labels, brain


def is_paint_generator(G) -> bool:
    """True for a generator of this family (generation, metrics and the segmentation benchmark branch on it)."""
    return isinstance(G, PaintGenerator)


def _inputs(context, mask, labels, batch, shape, n_paint, n_labels, device):
    """The paint inputs, with the defaults of a plain call G(z, c): nothing known, everything repainted healthy."""
    if context is None:
        context = torch.zeros([batch, n_paint] + shape, device=device)
    if mask is None:
        mask = torch.ones([batch, 1] + shape, device=device)
    if labels is None:
        labels = torch.zeros([batch, n_labels] + shape, device=device)
    misc.assert_shape(context, [batch, n_paint] + shape)
    misc.assert_shape(mask, [batch, 1] + shape)
    misc.assert_shape(labels, [batch, n_labels] + shape)
    return context.to(torch.float32), mask.to(torch.float32), labels.to(torch.float32)


class PaintEncoder(torch.nn.Module):
    """[blanked context, mask, labels] -> (global code, {level side: features}): StyleGAN2 discriminator blocks,
    highest level first, whose outputs are the skip features of the synthesis network's levels."""

    def __init__(
        self,
        in_channels: int,               # Input channels: painted channels + mask + labels.
        img_resolution,                 # Input size: an int (square, or cube with spatial_dims=3) or one per axis.
        code_dim: int,                  # Global code dimensionality.
        channel_base: int = 32768,      # Channels at a level = min(channel_base // largest side, channel_max).
        channel_max: int = 512,         # Maximum number of channels in any layer.
        num_fp16_res: int = 0,          # Reduced precision for the N highest levels (CUDA).
        conv_clamp: float = None,       # Clamp the outputs of convolutions to +-X; None = no clamping.
        code_dropout: float = 0.5,      # Dropout on the global code in training (Co-Mod-GAN's; keeps z in use).
        spatial_dims: int = None,       # 2 or 3; None = from img_resolution.
        mixed_precision: str = 'float16',  # Reduced-precision type.
        checkpointing: bool = False,    # Recompute each block in backward.
    ):
        super().__init__()
        self.img_shape, self.base_shape, self.num_levels = network_geometry(img_resolution, spatial_dims)
        self.spatial_dims = len(self.img_shape)
        self.in_channels = in_channels
        self.checkpointing = bool(checkpointing)
        shapes = _level_shapes(self.base_shape, self.num_levels)
        sides = [max(s) for s in shapes]
        self.sides = sides
        self.block_resolutions = sides[:0:-1]
        channels = _channels_per_resolution(sides, channel_base, channel_max)
        self.fromrgb = ConvLayer(in_channels, channels[sides[-1]], kernel_size=1, activation='lrelu',
                                 conv_clamp=conv_clamp, spatial_dims=self.spatial_dims)
        for level in range(self.num_levels, 0, -1):
            res = sides[level]
            setattr(self, f'b{res}', DiscriminatorBlock(
                channels[res], channels[res], channels[sides[level - 1]], resolution=shapes[level],
                img_channels=in_channels, first_layer_idx=0, architecture='resnet', conv_clamp=conv_clamp,
                use_fp16=(level > self.num_levels - num_fp16_res), mixed_precision=mixed_precision,
                spatial_dims=self.spatial_dims))
        base = channels[sides[0]]
        self.conv = ConvLayer(base, base, kernel_size=3, activation='lrelu', conv_clamp=conv_clamp,
                              spatial_dims=self.spatial_dims)
        self.fc = FullyConnectedLayer(base * int(np.prod(self.base_shape)), code_dim, activation='lrelu')
        self.dropout = torch.nn.Dropout(code_dropout)

    def forward(self, x: torch.Tensor, force_fp32: bool = False, **block_kwargs):
        misc.assert_shape(x, [None, self.in_channels] + self.img_shape)
        feat = self.fromrgb(x)
        skips = {self.sides[-1]: feat}
        for res in self.block_resolutions:
            block = getattr(self, f'b{res}')
            feat, _ = _maybe_checkpoint(self.checkpointing and self.training,
                                        lambda f, b=block: b(f, None, force_fp32=force_fp32, **block_kwargs), feat)
            skips[res // 2] = feat
        feat = feat.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        skips[self.sides[0]] = feat
        code = self.fc(self.conv(feat).flatten(1))
        return self.dropout(code), skips


@snapshot.persistent_class
class PaintGenerator(torch.nn.Module):
    """Co-modulated StyleGAN2 generator: (z, c, context, mask, labels) -> the context with the mask repainted."""

    def __init__(
        self,
        z_dim: int,                     # Input latent (Z) dimensionality.
        c_dim: int,                     # Conditioning label (C) dimensionality (e.g. the cohort), 0 = none.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        img_resolution,                 # Patch size: an int (square, or cube with spatial_dims=3) or one per axis.
        img_channels: int,              # Channels of the archive (painted + brain + labels).
        channels: list = None,          # Their names (dataset.json); None = paint every channel, no labels.
        code_dim: int = None,           # Global code dimensionality; None = w_dim.
        code_dropout: float = 0.5,      # Dropout on the global code in training.
        mapping_kwargs: dict = {},      # Arguments for MappingNetwork.
        spatial_dims: int = None,       # 2 or 3; None = 2 for an int img_resolution, else its length.
        **synthesis_kwargs,             # Arguments for SynthesisNetwork (channel_base, channel_max, num_fp16_res, ...).
    ):
        super().__init__()
        paint, labels, _brain = paint_layout(channels, img_channels)
        names = list(channels) if channels is not None else [f'ch{i}' for i in range(img_channels)]
        self.paint_channels = [names[i] for i in paint]
        self.label_channels = [names[i] for i in labels]
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.code_dim = code_dim = int(code_dim or w_dim)
        self.img_resolution = img_resolution
        self.img_channels = len(paint)
        self.synthesis = SynthesisNetwork(w_dim=w_dim + code_dim, img_resolution=img_resolution,
                                          img_channels=self.img_channels, spatial_dims=spatial_dims,
                                          **synthesis_kwargs)
        self.img_shape = self.synthesis.img_shape
        self.spatial_dims = self.synthesis.spatial_dims
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)
        shared = {k: synthesis_kwargs[k] for k in ('channel_base', 'channel_max', 'num_fp16_res', 'conv_clamp',
                                                    'mixed_precision', 'checkpointing') if k in synthesis_kwargs}
        self.encoder = PaintEncoder(self.img_channels + 1 + len(labels), img_resolution, code_dim,
                                    code_dropout=code_dropout, spatial_dims=self.spatial_dims, **shared)

    @staticmethod
    def check_resolution(img_resolution, spatial_dims: int = None) -> None:
        """Raise ShapeError (one line) for a patch size the family cannot build."""
        network_geometry(img_resolution, spatial_dims, min_levels=1)

    def encode(self, context, mask, labels, **block_kwargs):
        """(global code, skip features) of the blanked context, the mask and the target labels."""
        x = torch.cat([context * (1 - mask), mask, labels], dim=1)
        return self.encoder(x, **block_kwargs)

    def paint(
        self,
        ws: torch.Tensor,               # Mapped latents [N, num_ws, w_dim].
        context: torch.Tensor,          # [N, painted channels, *img_shape] in [-1, 1].
        mask: torch.Tensor,             # [N, 1, *img_shape], 1 = repaint.
        labels: torch.Tensor,           # [N, label channels, *img_shape] one-hot, all zero = healthy.
        noise_mode: str = 'random',
        force_fp32: bool = False,
        update_emas: bool = False,
        **synthesis_kwargs,
    ) -> torch.Tensor:
        """The composite: inside the mask what G paints, outside exactly the context."""
        block_kwargs = {k: v for k, v in synthesis_kwargs.items() if k == 'cpu_fp16'}
        code, skips = self.encode(context, mask, labels, force_fp32=force_fp32, **block_kwargs)
        ws = torch.cat([ws.to(torch.float32), code.unsqueeze(1).expand(-1, ws.shape[1], -1)], dim=2)  # Co-modulation.
        img = self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, update_emas=update_emas,
                             skips=skips, **synthesis_kwargs)
        return torch.where(mask > 0.5, img, context)

    def forward(
        self,
        z: torch.Tensor,                # Latents [N, z_dim].
        c: torch.Tensor,                # Labels [N, c_dim].
        context: torch.Tensor = None,   # [N, painted channels, *img_shape]; None = zeros.
        mask: torch.Tensor = None,      # [N, 1, *img_shape]; None = repaint everything.
        labels: torch.Tensor = None,    # [N, label channels, *img_shape]; None = healthy everywhere.
        truncation_psi: float = 1,      # Truncation strength; 1 = off.
        truncation_cutoff: int = None,  # Truncate only the first this many ws; None = all.
        update_emas: bool = False,      # Update w_avg?
        noise_mode: str = 'random',     # 'random', 'const' or 'none'.
        force_fp32: bool = False,
        **synthesis_kwargs,             # fused_modconv, cpu_fp16, grouped_on_cpu.
    ) -> torch.Tensor:
        context, mask, labels = _inputs(context, mask, labels, z.shape[0], self.img_shape, self.img_channels,
                                        len(self.label_channels), z.device)
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.paint(ws, context, mask, labels, noise_mode=noise_mode, force_fp32=force_fp32,
                          update_emas=update_emas, **synthesis_kwargs)

    def extra_repr(self) -> str:
        return (f'paint_channels={self.paint_channels}, label_channels={self.label_channels}, '
                f'code_dim={self.code_dim}, img_shape={self.img_shape}')


@snapshot.persistent_class
class PaintDiscriminator(Discriminator):
    """StyleGAN2 discriminator of painted images: it reads [image, mask, labels], so it judges whether the region
    fits its surroundings and its label map; projection-conditioned on c as the family's D."""

    def __init__(
        self,
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = unconditional.
        img_resolution,                 # Patch size.
        img_channels: int,              # Channels of the archive (painted + brain + labels).
        channels: list = None,          # Their names; None = every channel painted, no labels.
        **kwargs,                       # Arguments for Discriminator.
    ):
        paint, labels, _brain = paint_layout(channels, img_channels)
        names = list(channels) if channels is not None else [f'ch{i}' for i in range(img_channels)]
        super().__init__(c_dim=c_dim, img_resolution=img_resolution, img_channels=len(paint) + 1 + len(labels),
                         **kwargs)
        self.paint_channels = [names[i] for i in paint]
        self.label_channels = [names[i] for i in labels]

    @property
    def input_channels(self) -> list:
        """Names of the channels D reads, in order (ADA moves the mask and labels with the geometry only)."""
        return self.paint_channels + [MASK_CHANNEL] + self.label_channels

    def forward(self, img, c, mask=None, labels=None, **kwargs):
        """``img`` [N, painted channels, *S] with ``mask`` and ``labels`` beside it, or already the whole input
        [N, len(input_channels), *S] (mask and labels None)."""
        n = len(self.paint_channels)
        if img.shape[1] == self.img_channels and mask is None and labels is None:
            return super().forward(img, c, **kwargs)
        shape = list(img.shape[2:])
        _, mask, labels = _inputs(img, mask, labels, img.shape[0], shape, n, len(self.label_channels), img.device)
        return super().forward(torch.cat([img, mask, labels], dim=1), c, **kwargs)
