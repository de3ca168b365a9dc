"""Building blocks of the StyleGAN2 networks, for images and volumes: equalized-lr layers, modulated convolution,
mapping, minibatch-std. Convolutions take ``spatial_dims`` (2 or 3); resampling dispatches on tensor rank
(torch_utils.ops.resample), so one class serves 2D and 3D.

References:
    Karras et al. 2018, "Progressive Growing of GANs" (equalized learning rate, minibatch standard deviation).
    Karras et al. 2019, "A Style-Based Generator Architecture for GANs" (mapping network, truncation trick).
    Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (weight demodulation, Eq. 1-3;
        lazy regularisation, path length).
    Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data" (mixed precision with
        clamped activations, Appendix D.2).

Parameter names follow StyleGAN2-ADA (``weight``, ``bias``, ``fc{i}``, ``embed``, ``w_avg``) so that
state dicts of that design map onto these modules by name. Nothing here knows about MRI.
"""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import snapshot
from torch_utils.ops import bias_act
from torch_utils.ops import fma
from torch_utils.ops import resample

# ----------------------------------------------------------------------------------------------------------------


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (StyleGAN's "pixel norm" of the latent)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulation_coefficients(
    weight: torch.Tensor,               # Shared weight [O, I, *kernel] (any number of kernel dims: 2D or 3D convs).
    styles: torch.Tensor,               # Per-sample input scales [N, I].
    demodulate: bool,                   # Compute the demodulation coefficients?
    dtype: torch.dtype,                 # Dtype the convolution will run in.
):
    """The dimension-free part of a modulated convolution: returns (weight, styles, dcoefs [N, O] or None).

    In fp16, the products of a modulated convolution can overflow; demodulation cancels any per-output scale,
    so first shrink the weight and styles by their largest magnitudes (ADA, Appendix D.2); only done where it
    changes nothing. Demodulation (Eq. 3): sum_{i,k} (w[o,i,k] s[n,i])^2 = sum_i s[n,i]^2 * sum_k w[o,i,k]^2,
    an [N,I]x[I,O] matmul instead of materialising the per-sample weights just for their norms.
    """
    I = weight.shape[1]
    kernel_dims = list(range(2, weight.ndim))
    if dtype == torch.float16 and demodulate:
        weight = weight * (1 / np.sqrt(I * int(np.prod(weight.shape[2:]))) /
                           weight.norm(float('inf'), dim=[1] + kernel_dims, keepdim=True))
        styles = styles / styles.norm(float('inf'), dim=1, keepdim=True)
    dcoefs = None
    if demodulate:
        dcoefs = (styles.float().square() @ weight.float().square().sum(dim=kernel_dims).t() + 1e-8).rsqrt()  # [NO]
    return weight, styles, dcoefs


def modulated_conv(
    x: torch.Tensor,                    # Input features [N, I, *spatial] (2 or 3 spatial axes).
    weight: torch.Tensor,               # Shared weight [O, I, *kernel] of x's rank, equalized-lr gain applied or not.
    styles: torch.Tensor,               # Per-sample input scales [N, I].
    noise: torch.Tensor = None,         # Added after the convolution, broadcast to [N, 1, *spatial']. None = off.
    up: int = 1,                        # Integer upsampling factor.
    down: int = 1,                      # Integer downsampling factor.
    padding: int = 0,                   # Padding of the convolution.
    resample_filter: torch.Tensor = None,  # 1-D FIR filter for up/down, from resample.setup_filter().
    demodulate: bool = True,            # Normalise each output channel to unit expected variance (Eq. 3).
    flip_weight: bool = True,           # False = convolution, True = correlation (as torch convNd).
    fused_modconv: bool = True,         # True = per-sample weights (grouped conv); False = scale the activations.
    grouped_on_cpu: bool = False,       # Honour fused_modconv on CPU too (slower; lets tests check that path).
) -> torch.Tensor:
    """Modulated convolution of StyleGAN2 (Karras et al. 2020, Sec. 2.2, Eq. 1-3), for images and volumes.

    Modulation scales input channel i of sample n by s[n, i]; demodulation divides output channel o by
    sigma[n, o] = sqrt(sum_{i,k} (w[o, i, k] * s[n, i])^2). Two formulations give the same result up to
    rounding: "fused" builds per-sample weights and runs one grouped convolution (batch folded into the
    channels); "unfused" scales the activations before and after one shared convolution.

    Which one runs is decided by speed, measured with bench/bench_networks.py:
    - 1x1 without resampling (toRGB): always per-sample weights as a batched matrix product (bmm).
    - On CPU: unfused unless ``grouped_on_cpu``. oneDNN runs a grouped convolution with N groups 1.1-20x slower
      than one shared convolution of the whole batch (worst at 4x4-16x16), forward and backward.
    - On CUDA: as ``fused_modconv`` asks (the grouped conv wins at inference, N=1 especially).
    """
    N = x.shape[0]
    O, I = weight.shape[:2]
    kernel = list(weight.shape[2:])
    spatial = [1] * len(kernel)
    misc.assert_shape(x, [N, I] + [None] * len(kernel))  # [NI*]
    misc.assert_shape(styles, [N, I])  # [NI]
    weight, styles, dcoefs = modulation_coefficients(weight, styles, demodulate, x.dtype)

    pointwise = (max(kernel) == 1 and up == 1 and down == 1 and padding == 0)
    if pointwise or (fused_modconv and (x.device.type != 'cpu' or grouped_on_cpu)):
        w = weight.unsqueeze(0) * styles.to(weight.dtype).reshape(N, 1, I, *spatial)  # [NOI*]
        if dcoefs is not None:
            w = w * dcoefs.to(w.dtype).reshape(N, O, 1, *spatial)
        w = w.to(x.dtype)
        if pointwise:
            x = torch.bmm(w.reshape(N, O, I), x.reshape(N, I, -1)).reshape(N, O, *x.shape[2:])
        else:
            x = x.reshape(1, N * I, *x.shape[2:])
            x = resample.conv_resample(x=x, w=w.reshape(N * O, I, *kernel), f=resample_filter, up=up, down=down,
                                       padding=padding, groups=N, flip_weight=flip_weight)
            x = x.reshape(N, O, *x.shape[2:])
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x

    x = x * styles.to(x.dtype).reshape(N, I, *spatial)
    x = resample.conv_resample(x=x, w=weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                               flip_weight=flip_weight)
    if dcoefs is not None and noise is not None:
        return fma.fma(x, dcoefs.to(x.dtype).reshape(N, O, *spatial), noise.to(x.dtype))  # One pass for both.
    if dcoefs is not None:
        return x * dcoefs.to(x.dtype).reshape(N, O, *spatial)
    if noise is not None:
        return x + noise.to(x.dtype)
    return x

# ----------------------------------------------------------------------------------------------------------------


def spatial_shape(resolution, spatial_dims: int) -> list:
    """A layer's spatial size as a list: an int is a square (cube) side, a list one size per axis."""
    if np.ndim(resolution) == 0:
        return [int(resolution)] * spatial_dims
    shape = [int(s) for s in resolution]
    if len(shape) != spatial_dims:
        raise ValueError(f'resolution {shape} does not have {spatial_dims} axes')
    return shape


def weight_memory_format(channels_last: bool, spatial_dims: int):
    """channels_last storage exists for 4-D tensors only; volumes keep the contiguous layout."""
    return torch.channels_last if channels_last and spatial_dims == 2 else torch.contiguous_format


class FullyConnectedLayer(torch.nn.Module):
    """Dense layer with equalized learning rate (Karras et al. 2018, Sec. 4.1): weights stored N(0, 1/lr_mult^2)
    and scaled at run time, so that Adam's per-parameter step sizes see every layer alike."""

    def __init__(
        self,
        in_features: int,               # Number of input features.
        out_features: int,              # Number of output features.
        bias: bool = True,              # Add a learned bias?
        activation: str = 'linear',     # Name of a bias_act activation.
        lr_multiplier: float = 1,       # Learning-rate multiplier (0.01 in the mapping network).
        bias_init: float = 0,           # Initial bias value (1 for the style affines: identity modulation).
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = torch.nn.Parameter(torch.full([out_features], np.float32(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / np.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == 'linear' and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())  # One fused BLAS call.
        x = x.matmul(w.t())
        return bias_act.bias_act(x, b, act=self.activation)

    def extra_repr(self) -> str:
        return f'in_features={self.in_features:d}, out_features={self.out_features:d}, activation={self.activation:s}'


class ConvLayer(torch.nn.Module):
    """Convolution (2D or 3D) with equalized learning rate, optional FIR up/downsampling and activation clamping."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels.
        out_channels: int,              # Number of output channels.
        kernel_size: int,               # Side of the square (cubic) kernel.
        bias: bool = True,              # Add a learned bias?
        activation: str = 'linear',     # Name of a bias_act activation.
        up: int = 1,                    # Integer upsampling factor.
        down: int = 1,                  # Integer downsampling factor.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for up/downsampling (1-D, applied per axis).
        conv_clamp: float = None,       # Clamp the output to +-X; None = no clamping.
        channels_last: bool = False,    # Store the weight in channels_last memory format (2D only).
        trainable: bool = True,         # False = weight and bias are buffers (frozen layers).
        spatial_dims: int = 2,          # 2 = images, 3 = volumes.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', resample.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / np.sqrt(in_channels * kernel_size ** spatial_dims)
        self.act_gain = bias_act.activation_funcs[activation].def_gain
        weight = torch.randn([out_channels, in_channels] + [kernel_size] * spatial_dims)
        weight = weight.to(memory_format=weight_memory_format(channels_last, spatial_dims))
        b = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = torch.nn.Parameter(weight)
            self.bias = torch.nn.Parameter(b) if b is not None else None
        else:
            self.register_buffer('weight', weight)
            self.register_buffer('bias', b)

    def forward(self, x: torch.Tensor, gain: float = 1) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = self.bias.to(x.dtype) if self.bias is not None else None
        flip_weight = (self.up == 1)  # Keeps the transposed conv of up=2 a true convolution (matches ADA).
        x = resample.conv_resample(x=x, w=w.to(x.dtype), f=self.resample_filter, up=self.up, down=self.down,
                                   padding=self.padding, flip_weight=flip_weight)
        act_gain = self.act_gain * gain
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act.bias_act(x, b, act=self.activation, gain=act_gain, clamp=act_clamp)

    def extra_repr(self) -> str:
        return (f'in_channels={self.in_channels:d}, out_channels={self.out_channels:d}, '
                f'activation={self.activation:s}, up={self.up}, down={self.down}')

# ----------------------------------------------------------------------------------------------------------------


class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 (3x3x3) convolution + noise + bias + activation (StyleGAN2, Fig. 2d)."""

    def __init__(
        self,
        in_channels: int,               # Number of input channels.
        out_channels: int,              # Number of output channels.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        resolution,                     # Output size: an int (square or cube) or one size per axis.
        kernel_size: int = 3,           # Side of the convolution kernel.
        up: int = 1,                    # Integer upsampling factor.
        use_noise: bool = True,         # Enable per-pixel noise inputs?
        activation: str = 'lrelu',      # Name of a bias_act activation.
        resample_filter: list = [1, 3, 3, 1],  # Low-pass filter for upsampling.
        conv_clamp: float = None,       # Clamp the output to +-X; None = no clamping.
        channels_last: bool = False,    # Store the weight in channels_last memory format (2D only).
        spatial_dims: int = 2,          # 2 = images, 3 = volumes.
    ):
        super().__init__()
        self.shape = spatial_shape(resolution, spatial_dims)
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer('resample_filter', resample.setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = bias_act.activation_funcs[activation].def_gain
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)  # Styles start at 1: plain conv.
        weight = torch.randn([out_channels, in_channels] + [kernel_size] * spatial_dims)
        self.weight = torch.nn.Parameter(weight.to(memory_format=weight_memory_format(channels_last, spatial_dims)))
        if use_noise:
            self.register_buffer('noise_const', torch.randn(self.shape))
            self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))

    def forward(
        self,
        x: torch.Tensor,                # Input features [N, I, *spatial / up].
        w: torch.Tensor,                # Latent [N, w_dim].
        noise_mode: str = 'random',     # 'random', 'const' or 'none'.
        fused_modconv: bool = True,     # Grouped-conv formulation of the modulated convolution?
        gain: float = 1,                # Extra output gain (resnet blocks use sqrt(0.5)).
        grouped_on_cpu: bool = False,   # Honour fused_modconv on CPU too (see modulated_conv).
    ) -> torch.Tensor:
        if noise_mode not in ('random', 'const', 'none'):
            raise ValueError(f"SynthesisLayer: noise_mode {noise_mode!r} is not 'random', 'const' or 'none'")
        misc.assert_shape(x, [None, self.weight.shape[1]] + [s // self.up for s in self.shape])  # [NC*]
        styles = self.affine(w)

        noise = None
        if self.use_noise and noise_mode == 'random':
            noise = torch.randn([x.shape[0], 1] + self.shape, device=x.device)
            noise = noise * self.noise_strength
        elif self.use_noise and noise_mode == 'const':
            noise = self.noise_const * self.noise_strength

        x = modulated_conv(x=x, weight=self.weight, styles=styles, noise=noise, up=self.up, padding=self.padding,
                           resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                           fused_modconv=fused_modconv, grouped_on_cpu=grouped_on_cpu)
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act.bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain,
                                 clamp=act_clamp)

    def extra_repr(self) -> str:
        return f'shape={self.shape}, up={self.up}, use_noise={self.use_noise}'


class ToRGBLayer(torch.nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation (StyleGAN2, Sec. 4.1). The name is
    StyleGAN's; the layer outputs ``img_channels`` channels, whatever they mean, of images or volumes."""

    def __init__(
        self,
        in_channels: int,               # Number of input feature channels.
        out_channels: int,              # Number of image channels.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        kernel_size: int = 1,           # Convolution kernel size.
        conv_clamp: float = None,       # Clamp the output to +-X; None = no clamping.
        channels_last: bool = False,    # Store the weight in channels_last memory format (2D only).
        spatial_dims: int = 2,          # 2 = images, 3 = volumes.
    ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        weight = torch.randn([out_channels, in_channels] + [kernel_size] * spatial_dims)
        self.weight = torch.nn.Parameter(weight.to(memory_format=weight_memory_format(channels_last, spatial_dims)))
        self.bias = torch.nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / np.sqrt(in_channels * kernel_size ** spatial_dims)  # Equalized lr, in the styles.

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused_modconv: bool = True,
                grouped_on_cpu: bool = False) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv(x=x, weight=self.weight, styles=styles, demodulate=False, fused_modconv=fused_modconv,
                           padding=self.weight.shape[-1] // 2, grouped_on_cpu=grouped_on_cpu)
        return bias_act.bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)

# ----------------------------------------------------------------------------------------------------------------


@snapshot.persistent_class
class MappingNetwork(torch.nn.Module):
    """Mapping network z -> w (StyleGAN, Sec. 2): normalised z, concatenated with a normalised label embedding
    when conditional, through an MLP with lr multiplier 0.01; tracks the average w for the truncation trick."""

    def __init__(
        self,
        z_dim: int,                     # Input latent (Z) dimensionality, 0 = no latent.
        c_dim: int,                     # Conditioning label (C) dimensionality, 0 = no label.
        w_dim: int,                     # Intermediate latent (W) dimensionality.
        num_ws: int,                    # Number of w copies to output; None = return [N, w_dim].
        num_layers: int = 8,            # Number of mapping layers.
        embed_features: int = None,     # Label embedding dimensionality; None = same as w_dim.
        layer_features: int = None,     # Hidden layer width; None = same as w_dim.
        activation: str = 'lrelu',      # Activation of the hidden layers.
        lr_multiplier: float = 0.01,    # Learning-rate multiplier of the mapping layers.
        w_avg_beta: float = 0.995,      # Decay of the running average of w; None = do not track.
    ):
        super().__init__()
        if z_dim == 0 and c_dim == 0:
            raise ValueError('MappingNetwork: needs z_dim > 0 or c_dim > 0')
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta

        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]

        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f'fc{idx}', layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer('w_avg', torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor,                # Latents [N, z_dim] (ignored when z_dim == 0).
        c: torch.Tensor,                # Labels [N, c_dim] (ignored when c_dim == 0).
        truncation_psi: float = 1,      # 1 = no truncation; 0 = every w is w_avg.
        truncation_cutoff: int = None,  # Truncate only the first this many ws; None = all.
        update_emas: bool = False,      # Update the running average of w?
    ) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            misc.assert_shape(z, [None, self.z_dim])
            parts.append(normalize_2nd_moment(z.float()))
        if self.c_dim > 0:
            misc.assert_shape(c, [None, self.c_dim])
            parts.append(normalize_2nd_moment(self.embed(c.float())))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        for idx in range(self.num_layers):
            x = getattr(self, f'fc{idx}')(x)

        if update_emas and self.w_avg_beta is not None and self.num_ws is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])

        if truncation_psi != 1:
            if self.num_ws is None or self.w_avg_beta is None:
                raise ValueError('MappingNetwork: truncation needs num_ws and w_avg_beta to be set')
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
        return x

    def extra_repr(self) -> str:
        return f'z_dim={self.z_dim:d}, c_dim={self.c_dim:d}, w_dim={self.w_dim:d}, num_ws={self.num_ws}'

# ----------------------------------------------------------------------------------------------------------------


class MinibatchStdLayer(torch.nn.Module):
    """Minibatch standard deviation (Karras et al. 2018, Sec. 3): append, per group of samples, the average
    standard deviation of the features as extra constant channels, so D can see the variety of a batch.

    A batch that is not a multiple of ``group_size`` uses the largest group size <= group_size that divides
    it (at worst 1, where the feature is a constant), rather than failing at an odd final batch.
    """

    def __init__(
        self,
        group_size: int,                # Samples per group; None = the whole batch.
        num_channels: int = 1,          # Number of statistics channels (features are split into this many).
    ):
        super().__init__()
        self.group_size = group_size
        self.num_channels = num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[:2]
        spatial = list(x.shape[2:])  # [H, W] for images, [D, H, W] for volumes.
        G = N if self.group_size is None else min(self.group_size, N)
        while N % G != 0:
            G -= 1
        F = self.num_channels
        c = C // F
        if c * F != C:
            raise ValueError(f'MinibatchStdLayer: {C} channels do not split into mbstd_num_channels={F}')
        # Groups are strided through the batch: sample n belongs to group n % (N // G).
        y = x.reshape(G, N // G, F, c, *spatial)
        y = y.float()
        y = (y - y.mean(dim=0)).square().mean(dim=0)       # Variance over each group.      [n F c H W]
        y = (y + 1e-8).sqrt().mean(dim=list(range(2, y.ndim)))  # Average std per statistic. [n F]
        y = y.reshape(-1, F, *[1] * len(spatial)).repeat(G, 1, *spatial)  # Batch layout. [N F H W]
        return torch.cat([x, y.to(x.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f'group_size={self.group_size}, num_channels={self.num_channels:d}'
