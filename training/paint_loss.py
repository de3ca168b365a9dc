"""The loss of the painting family: StyleGAN2's (non-saturating logistic, lazy R1, optional path length) on
painted patches, plus an L1 term inside the repainted region.

Every round draws repaint masks from the batch of real patches (``mask_kwargs``, a class built by name, e.g.
``mri.painting.masks.RepaintMasks``: the tumour and its rim with its labels, or a tumour shape moved into healthy
tissue with all-zero labels). G repaints the region of the real patches it is given (Co-Mod-GAN, Zhao et al.
2021), conditioned on the real patches' own class (the cohort of the case the context comes from); D judges
[image, mask, labels] of reals and of composites; R1 is taken with respect to the image channels only (the mask and
labels are given, not judged). ADA, when on, moves image, mask and labels together (the mask and labels are
label channels, geometry only). The L1 term, ``paint_l1`` times the mean absolute difference between the painted
and the real voxels inside the region, is GliGAN's reconstruction term (Ferreira et al. 2024); 0 turns it off.
"""

import torch

import dnnlib
from torch_utils import training_stats
from training.loss import StyleGAN2Loss
from training.paint import paint_layout


class PaintLoss(StyleGAN2Loss):
    def __init__(
        self,
        device,                         # torch.device of this rank.
        G,                              # training.paint.PaintGenerator.
        D,                              # training.paint.PaintDiscriminator.
        channels: list = None,          # The archive's channel names (painted, brain, labels); None = G's layout.
        mask_kwargs: dict = None,       # Repaint-mask sampler {class_name, ...}; called as sampler(labels, brain).
        paint_l1: float = 1.0,          # Weight of the L1 term inside the region; 0 = off.
        **kwargs,                       # StyleGAN2Loss arguments (augment_pipe, r1_gamma, style_mixing_prob, ...).
    ):
        if kwargs.get('topk_kwargs'):
            raise ValueError('top-k generator updates are not defined for the painting family')
        super().__init__(device=device, G=G, D=D, **kwargs)
        names = list(channels) if channels is not None else G.paint_channels + ['brain'] + G.label_channels
        self.paint_idx, self.label_idx, self.brain_idx = paint_layout(names, len(names))
        if [names[i] for i in self.paint_idx] != list(G.paint_channels):
            raise ValueError(f'G paints {G.paint_channels}, the data has {[names[i] for i in self.paint_idx]}')
        if mask_kwargs is None:
            raise ValueError('PaintLoss needs mask_kwargs (the repaint-mask sampler)')
        self.masks = dnnlib.construct_class_by_name(**mask_kwargs)
        self.paint_l1 = float(paint_l1)
        self.round = None               # The round's (context, mask, target labels, real_c), set per round.

    # -- the round's inputs --------------------------------------------------------------------------------------

    def split(self, real):
        """(image [N, painted, *S], labels [N, K, *S] in {0, 1}, brain [N, 1, *S] in {0, 1}) of archive tensors in
        [-1, 1]. Without a brain channel, every voxel counts as brain."""
        image = real[:, self.paint_idx]
        labels = (real[:, self.label_idx] > 0).to(torch.float32)
        if self.brain_idx is None:
            brain = torch.ones_like(real[:, :1])
        else:
            brain = (real[:, self.brain_idx:self.brain_idx + 1] > 0).to(torch.float32)
        return image, labels, brain

    def _accumulate_round(self, phase, real_img, real_c, gen_z, gen_c, gain):
        if self.round is not None:  # The base class splitting Dboth into Dmain + Dreg: inputs already split.
            return super()._accumulate_round(phase, real_img, real_c, gen_z, gen_c, gain)
        image, labels, brain = self.split(real_img)
        with torch.no_grad(), torch.autograd.profiler.record_function('repaint_masks'):
            mask, target = self.masks(labels, brain)
        training_stats.report('Paint/region_fraction', mask.flatten(1).mean(dim=1))
        self.round = (image, mask, target)
        try:
            # Fakes repaint the same real patches, with the classes of the cases they come from.
            super()._accumulate_round(phase, image, real_c, gen_z, real_c, gain)
        finally:
            self.round = None

    # -- G and D on painted patches -------------------------------------------------------------------------------

    def run_G(self, z, c, update_emas=False):
        image, mask, target = (t[:z.shape[0]] for t in self.round)
        ws = self.mapped_ws(z, c, update_emas=update_emas)
        img = self.G.paint(ws, image, mask, target, update_emas=update_emas)
        return img, ws

    def run_D(self, img, c, update_emas=False, update_quant=False, quantize=True):
        _, mask, target = (t[:img.shape[0]] for t in self.round)
        x = torch.cat([img, mask, target], dim=1)
        if self.augment_pipe is not None:
            x = self.augment_pipe(x)
        extra = {} if quantize else dict(quantize=False)
        return self.D(x, c, update_emas=update_emas, update_quant=update_quant, return_aux=True, **extra)

    def generator_extra_loss(self, gen_img):
        if self.paint_l1 == 0:
            return None
        image, mask, _ = (t[:gen_img.shape[0]] for t in self.round)
        inside = mask.flatten(1).sum(dim=1).clamp(min=1)
        l1 = ((gen_img - image).abs() * mask).flatten(1).sum(dim=1) / (inside * gen_img.shape[1])
        training_stats.report('Loss/G/l1', l1)
        return l1.unsqueeze(1) * self.paint_l1

    # -- the loop's grids ----------------------------------------------------------------------------------------

    def grid_fakes(self, G, z, c, real):
        """The grid's reals with their regions repainted by ``G`` (masks from a fixed seed, so that every tick's
        grid repaints the same regions), in the archive's layout: painted channels, brain, target labels."""
        image, labels, brain = self.split(real)
        gen = torch.Generator(device=real.device).manual_seed(0)
        mask, target = self.masks(labels, brain, generator=gen)
        painted = G(z=z, c=c, context=image, mask=mask, labels=target, noise_mode='const')
        out = real.clone()
        out[:, self.paint_idx] = painted.to(out.dtype)
        out[:, self.label_idx] = target * 2 - 1
        return out
