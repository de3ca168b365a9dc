"""Feature quantization of discriminator feature maps (FQ-GAN).

Zhao, Li, Chen, Gan, Chen, Carin, "Feature Quantization Improves GAN Training", ICML 2020
(arXiv:1911.02195). D's feature map at a chosen resolution is replaced, position by position, by its
nearest entry of a learned dictionary, so that real and fake features are matched in a shared, slowly
moving discrete space. The dictionary is kept the VQ-VAE way (van den Oord et al. 2017, appendix A.1;
Razavi et al. 2019, "VQ-VAE-2"), which FQ-GAN adopts (FQ-GAN section 3.2):

    k(x)  = argmin_k ||x - e_k||^2                       nearest code, per spatial position
    x_q   = x + sg(e_k(x) - x)                           straight-through: d x_q / d x = identity
    loss  = mean ||x - sg(e_k(x))||^2                    commitment loss (FQ-GAN eq. 5, beta applied by the caller)
    N_k  <- decay * N_k + (1 - decay) * n_k              n_k = positions assigned to code k in this batch
    m_k  <- decay * m_k + (1 - decay) * sum_{k(x)=k} x
    e_k   = m_k / N~_k,  N~_k = (N_k + eps) / (sum N + K eps) * sum N       (Laplace smoothing)

Choices made here (see docs/hooks.md):
- The dictionary starts as small normal vectors and the EMA state as "each code seen once where it stands"
  (N_k = 1, m_k = e_k). VQ-VAE-2 code usually starts N_k at 0, which divides an unused code by ~eps on its first
  update and throws it out of reach forever; here an unused code stays put and fades toward the origin only
  after many batches, and codes no batch ever picks are visible as usage() < 1.
- In a torch.distributed run the per-batch counts n_k and sums are all-reduced (summed) before the update, so
  every rank applies the same update and keeps an identical dictionary. Every rank must therefore call
  forward(update=True) the same number of times, in the same order (the training loop does: all ranks run the
  same phases).
- Any number of spatial axes: images [N, C, H, W] and volumes [N, C, D, H, W] alike are quantized position by
  position (pixel or voxel), each position's C-vector against the same dictionary.
- Distances, the loss and the update are float32 whatever the input dtype; x_q is cast back to the input dtype.
- The dictionary and EMA statistics are buffers, so they are saved in state_dict() and in snapshots.
- mode='forward' feeds x_q on (the paper's description); mode='loss' feeds x on unchanged and keeps only the
  commitment loss and the dictionary (what FQ-GAN's official code ends up doing: it computes x_q and discards it).
- One EMA step per optimizer step of D: while `deferred` is True (the loss sets it for a whole D phase), the
  batches of every forward(update=True) are summed and ema_step() applies them at once, so the decay the user
  sets is the decay per D step, whatever the number of passes (fake + real) and accumulation rounds.
"""

import torch

MODES = ('forward', 'loss')

#----------------------------------------------------------------------------

class FeatureQuantizer(torch.nn.Module):
    """Vector-quantizes an [N, C, *spatial] feature map against an EMA dictionary of dict_size codes.

    Built by training.networks as `construct_class_by_name(class_name='training.fq.FeatureQuantizer', channels=C,
    dict_size=256, decay=0.8)`; D calls `x, loss = quantizer(x, update=update_quant)` after the block at each
    quantized resolution.
    """

    def __init__(self,
        channels,                       # Feature dimension C (dimension of each code).
        dict_size   = 256,              # Number of codes K.
        decay       = 0.8,              # EMA decay of the dictionary statistics per EMA step (FQ-GAN uses 0.8 for 2D images).
        eps         = 1e-5,             # Laplace smoothing of the cluster sizes.
        init_std    = 0.1,              # Standard deviation of the random initial codes.
        mode        = 'forward',        # 'forward': D continues with x_q; 'loss': D continues with x (loss and dictionary only).
    ):
        super().__init__()
        if int(channels) < 1 or int(dict_size) < 1:
            raise ValueError(f'FeatureQuantizer: channels and dict_size must be >= 1, got {channels}, {dict_size}')
        if not 0 <= float(decay) < 1:
            raise ValueError(f'FeatureQuantizer: decay must be in [0, 1), got {decay}')
        if not float(eps) > 0:
            raise ValueError(f'FeatureQuantizer: eps must be > 0, got {eps}')
        if mode not in MODES:
            raise ValueError(f'FeatureQuantizer: mode must be one of {", ".join(MODES)}, got {mode!r}')
        self.mode = mode
        self.channels = int(channels)
        self.dict_size = int(dict_size)
        self.decay = float(decay)
        self.eps = float(eps)
        self.init_std = float(init_std)

        embed = torch.randn([self.dict_size, self.channels]) * self.init_std
        self.register_buffer('embed', embed)                                        # [K, C] the codes e_k
        self.register_buffer('cluster_size', torch.ones([self.dict_size]))          # [K] EMA counts N_k
        self.register_buffer('embed_sum', embed.clone())                            # [K, C] EMA sums m_k
        self._last_counts = None        # [K] code usage of the last forward on this rank (not saved)
        self._pending = None            # [K, 1 + C] batch counts and sums not yet applied by ema_step()
        self.deferred = False           # True = forward(update=True) only accumulates; ema_step() applies.

    #------------------------------------------------------------------------

    def _flatten(self, x):
        """[N, C, *spatial] -> [N * prod(spatial), C] float32, one row per position."""
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f'FeatureQuantizer: expected input [N, {self.channels}, ...], got {list(x.shape)}')
        return x.to(torch.float32).movedim(1, -1).reshape(-1, self.channels)

    def nearest(self, flat):
        """Index of the nearest code (L2) for every row of a [M, C] float32 tensor."""
        embed = self.embed.to(torch.float32)
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 does not change the argmin, so it is left out.
        dist = embed.square().sum(dim=1)[None, :] - 2 * torch.matmul(flat, embed.t())
        return dist.argmin(dim=1)

    def forward(self, x, update=False):
        """Returns (x_q, commit_loss): x_q like x (same shape and dtype), commit_loss a float32 scalar."""
        dtype = x.dtype
        flat = self._flatten(x)                                         # [M, C]
        idx = self.nearest(flat.detach())                               # [M]
        q = self.embed.to(torch.float32)[idx]                           # [M, C], a buffer: no gradient

        commit_loss = (flat - q).square().mean()                        # q is a buffer, so this is ||x - sg(q)||^2
        if self.mode == 'forward':
            x_q = flat + (q - flat).detach()                            # straight-through estimator
            x_q = x_q.reshape(x.shape[0], *x.shape[2:], self.channels).movedim(-1, 1).to(dtype)
        else:
            x_q = x                                                     # 'loss' mode: D's features go on unchanged
        assert x_q.shape == x.shape

        counts = torch.bincount(idx, minlength=self.dict_size).to(torch.float32)
        self._last_counts = counts.detach()
        if update and self.training:
            self._accumulate(flat.detach(), idx, counts)
            if not self.deferred:
                self.ema_step()
        return x_q, commit_loss

    @torch.no_grad()
    def _accumulate(self, flat, idx, counts):
        """Adds this batch's code counts and feature sums to the pending statistics."""
        sums = torch.zeros([self.dict_size, self.channels], dtype=torch.float32, device=flat.device)
        sums.index_add_(0, idx, flat)
        packed = torch.cat([counts[:, None], sums], dim=1)
        self._pending = packed if self._pending is None else self._pending + packed

    @torch.no_grad()
    def ema_step(self):
        """One EMA step of the dictionary from the pending batches (all ranks' when distributed); no-op if none."""
        if self._pending is None:
            return
        packed, self._pending = self._pending, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # One all-reduce for both: every rank then applies the identical update to an identical dictionary.
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
        counts, sums = packed[:, 0], packed[:, 1:]

        cluster_size = self.cluster_size.to(torch.float32) * self.decay + counts * (1 - self.decay)
        embed_sum = self.embed_sum.to(torch.float32) * self.decay + sums * (1 - self.decay)
        total = cluster_size.sum()
        smoothed = (cluster_size + self.eps) / (total + self.dict_size * self.eps) * total
        self.cluster_size.copy_(cluster_size)
        self.embed_sum.copy_(embed_sum)
        self.embed.copy_(embed_sum / smoothed[:, None])

    #------------------------------------------------------------------------

    def perplexity(self):
        """exp(entropy) of the last batch's code usage on this rank: 1 = one code, dict_size = uniform. NaN before any forward."""
        if self._last_counts is None:
            return float('nan')
        p = self._last_counts / self._last_counts.sum().clamp(min=1)
        entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()          # 0 log 0 = 0
        return float(torch.exp(entropy))

    def usage(self):
        """Fraction of the dictionary used by the last batch on this rank, in [0, 1]. NaN before any forward."""
        if self._last_counts is None:
            return float('nan')
        return float((self._last_counts > 0).sum()) / self.dict_size

    def extra_repr(self):
        return f'channels={self.channels}, dict_size={self.dict_size}, decay={self.decay}, eps={self.eps}, mode={self.mode}'

#----------------------------------------------------------------------------
