"""Top-k training of the generator.

Sinha, Zhao, Goyal, Raffel, Odena, "Top-k Training of GANs: Improving GAN Performance by Throwing Away Bad
Samples", NeurIPS 2020 (arXiv:2002.06224), Algorithm 1: in the generator update, only the k fakes of the
batch that the discriminator rates as most realistic contribute to the loss; the others are dropped, because
their gradients point G toward the worst samples rather than toward the data. k starts at the whole batch
and shrinks as training goes on (the critic is only informative once it is trained):

    fraction(epoch) = max(gamma ** epoch, min_frac)          (Sinha et al. section 3: gamma = 0.99, nu = min_frac)
    k(batch, epoch) = ceil(batch * fraction(epoch)),  1 <= k <= batch

Defaults gamma = 0.99, min_frac = 0.75 (docs/hooks.md says where nu = 0.75 comes from). "batch" is the whole batch
of a G step (all accumulation rounds; all processes with --topk-global), as in the paper, not one round.

Sign convention. `scores` are D's raw logits on the fakes, D(G(z)) in [N] or [N, 1]. In this project's
non-saturating loss G minimises softplus(-D(G(z))) and D minimises softplus(D(fake)) + softplus(-D(real)),
so a LARGER logit means D finds the sample MORE REAL, and top-k keeps the k LARGEST logits, i.e. the fakes
with the smallest generator loss. A loss whose critic gives larger values to fakes it finds worse must negate
its scores before calling select().

"epoch" is the caller's count of passes over the training set (it may be fractional, e.g. images seen /
distinct training images, mirrored copies not counted); this module only evaluates the schedule.
"""

import math

import torch

#----------------------------------------------------------------------------

class TopK:
    """The top-k schedule and selection. Plain Python object: no parameters, no buffers."""

    def __init__(self,
        gamma       = 0.99,             # Per-epoch decay of the kept fraction, in (0, 1].
        min_frac    = 0.75,             # Floor of the kept fraction nu, in (0, 1] (see docs/hooks.md).
    ):
        if not 0 < float(gamma) <= 1:
            raise ValueError(f'TopK: gamma must be in (0, 1], got {gamma}')
        if not 0 < float(min_frac) <= 1:
            raise ValueError(f'TopK: min_frac must be in (0, 1], got {min_frac}')
        self.gamma = float(gamma)
        self.min_frac = float(min_frac)
        self.last_fraction = 1.0        # Fraction used by the last k() call, for logging and the training state.

    def fraction(self, epoch):
        """Fraction of the batch kept at this epoch: max(gamma ** epoch, min_frac); 1 at epoch 0."""
        if not float(epoch) >= 0:
            raise ValueError(f'TopK: epoch must be >= 0, got {epoch}')
        return max(self.gamma ** float(epoch), self.min_frac)

    def k(self, batch, epoch):
        """Number of fakes kept from a batch of `batch`: ceil(batch * fraction(epoch)), clamped to [1, batch]."""
        batch = int(batch)
        if batch < 1:
            raise ValueError(f'TopK: batch must be >= 1, got {batch}')
        frac = self.fraction(epoch)
        self.last_fraction = frac
        # Round to 1e-6 first so that float noise does not round up a product that is an integer
        # (25 * 0.8**2 = 16.000000000000004 must keep 16, not 17).
        return min(max(math.ceil(round(batch * frac, 6)), 1), batch)

    @staticmethod
    def select(scores, k):
        """Indices (long, [k], best first) of the k samples with the LARGEST scores, i.e. that D finds most real."""
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim != 1:
            raise ValueError(f'TopK: scores must be [N] or [N, 1], got {list(scores.shape)}')
        k = int(k)
        if not 1 <= k <= scores.shape[0]:
            raise ValueError(f'TopK: k must be in [1, {scores.shape[0]}], got {k}')
        return torch.topk(scores.detach(), k, largest=True, sorted=True).indices

    @classmethod
    def topk_loss(cls, per_sample_loss, scores, k):
        """Mean of per_sample_loss ([N] or [N, 1]) over the k samples with the largest scores; gradients reach only them."""
        if per_sample_loss.ndim == 2 and per_sample_loss.shape[1] == 1:
            per_sample_loss = per_sample_loss[:, 0]
        if per_sample_loss.ndim != 1 or per_sample_loss.shape[0] != scores.shape[0]:
            raise ValueError(f'TopK: per_sample_loss {list(per_sample_loss.shape)} does not match scores {list(scores.shape)}')
        idx = cls.select(scores, k)
        return per_sample_loss[idx].mean()

    def state_dict(self):
        """Plain data for the training state (training-state.pt)."""
        return {'gamma': self.gamma, 'min_frac': self.min_frac, 'last_fraction': self.last_fraction}

    def load_state_dict(self, state):
        """Restores last_fraction. gamma and min_frac stay as constructed: on --resume the current flags win."""
        if 'last_fraction' not in state:
            raise KeyError(f'TopK: state has no last_fraction (keys: {sorted(state)})')
        self.last_fraction = float(state['last_fraction'])

    def __repr__(self):
        return f'TopK(gamma={self.gamma}, min_frac={self.min_frac})'

#----------------------------------------------------------------------------

def topk_loss(per_sample_loss, scores, k):
    """Module-level form of TopK.topk_loss, for callers that hold no TopK object."""
    return TopK.topk_loss(per_sample_loss, scores, k)

#----------------------------------------------------------------------------
