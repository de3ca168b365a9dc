"""StyleGAN2 losses: non-saturating logistic loss, lazy R1, path-length regularisation, style mixing.

Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN" (Sec. 2.2 lazy regularisation,
Sec. 3.2 path length, Eq. 4). Two generic hooks, named by class and off by default, add training rules:
``topk_kwargs`` (a class_name such as ``training.topk.TopK``: top-k generator updates, Sinha et al. 2020) and
``fq_weight`` (the weight of the discriminator's feature-quantization loss that D returns in its aux dict).

Top-k is a rule over the whole batch of a G phase (all accumulation rounds; with ``topk_global`` all ranks).
With one round per phase, one pass: D's input gradient is taken, the discarded fakes' rows are zeroed, then it
flows into G. With several rounds, a no-grad pass scores every fake, the k best of the batch are chosen, then the
gradient pass replays each round with the same RNG state (noise, style mixing, augmentation), so it sees the same
fakes and logits; there the discarded fakes enter D detached. Either way minibatch-std still groups discarded
fakes with kept ones (the logits are those scored), but no gradient reaches G through a discarded fake, not even
through the group statistic.
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import training_stats
from torch_utils.ops import conv2d_gradfix
from training.autograd_passes import double_backward


class Loss:
    def accumulate_gradients(self, phase, real_img, real_c, gen_z, gen_c, gain, cur_nimg):
        raise NotImplementedError

    def grid_fakes(self, G, z, c, real):
        """What the loop draws in its fakes grids: G's images for the grid's latents ``z`` and labels ``c``, in
        the layout of the grid's reals ``real`` (in [-1, 1]; a family that paints into them reads them)."""
        return G(z=z, c=c, noise_mode='const')

    def generator_extra_loss(self, gen_img):
        """A term added to G's main loss per sample (e.g. the paint family's L1 inside the mask); None = none."""
        return None

    def accumulate_phase(self, phase, rounds, gain, cur_nimg):
        """All accumulation rounds of one phase, ``rounds`` = [(real_img, real_c, gen_z, gen_c), ...].

        The loop calls this once per phase; the default runs the rounds one by one. A loss whose rule
        needs the whole batch at once (e.g. top-k over the batch) overrides it.
        """
        for real_img, real_c, gen_z, gen_c in rounds:
            self.accumulate_gradients(phase=phase, real_img=real_img, real_c=real_c, gen_z=gen_z, gen_c=gen_c,
                                      gain=gain, cur_nimg=cur_nimg)


class StyleGAN2Loss(Loss):
    def __init__(
        self,
        device,                         # torch.device of this rank.
        G,                              # Generator (gradients are all-reduced by the loop, not DDP).
        D,                              # Discriminator.
        augment_pipe=None,              # ADA pipeline applied to everything D sees; None = off.
        r1_gamma: float = 10,           # R1 weight (Eq. 4 of Mescheder et al. 2018).
        style_mixing_prob: float = 0,   # Probability of mixing two latents (StyleGAN Sec. 3.1).
        pl_weight: float = 0,           # Path-length weight; 0 = off.
        pl_batch_shrink: int = 2,       # Path-length batch = batch // shrink (saves memory).
        pl_decay: float = 0.01,         # EMA decay of the path-length target a.
        pl_no_weight_grad: bool = False,  # Skip weight gradients of convs in the path-length backward.
        topk_kwargs: dict = None,       # e.g. {'class_name': 'training.topk.TopK', 'gamma': .99, 'min_frac': .75}; None = off.
        dataset_size: int = None,       # Distinct images per epoch, for the top-k schedule.
        fq_weight: float = 0,           # Weight of D's feature-quantization loss (FQ-GAN's beta), in D's and G's loss; 0 = ignore it.
        topk_global: bool = False,      # Top-k over the batch of all ranks (all_gather of the scores) instead of each rank's.
    ):
        super().__init__()
        self.device = device
        self.G = G
        self.D = D
        self.augment_pipe = augment_pipe
        self.r1_gamma = r1_gamma
        self.style_mixing_prob = style_mixing_prob
        self.pl_weight = pl_weight
        self.pl_batch_shrink = pl_batch_shrink
        self.pl_decay = pl_decay
        self.pl_no_weight_grad = pl_no_weight_grad
        self.pl_mean = torch.zeros([], device=device)
        self.topk = dnnlib.construct_class_by_name(**topk_kwargs) if topk_kwargs else None
        self.dataset_size = dataset_size
        self.fq_weight = fq_weight
        self.topk_global = bool(topk_global)
        self.topk_fraction = 1.0
        self.topk_last = None           # {'scores', 'keep', 'k', 'replay_error'} of the last top-k phase (this rank's rows).
        # Sum and count of sign(D(real)) since the last ADA adjustment: kept here, on the device, so the loop
        # syncs only once per ADA interval and a snapshot can save what is pending.
        self.real_sign_acc = torch.zeros([2], dtype=torch.float64, device=device)
        if self.topk is not None and not dataset_size:
            raise ValueError('top-k needs dataset_size to count epochs')

    def mapped_ws(self, z, c, update_emas=False):
        """G's mapping of (z, c), with style mixing (StyleGAN Sec. 3.1) at the configured probability."""
        ws = self.G.mapping(z, c, update_emas=update_emas)
        if self.style_mixing_prob > 0:
            with torch.autograd.profiler.record_function('style_mixing'):
                cutoff = torch.empty([], dtype=torch.int64, device=ws.device).random_(1, ws.shape[1])
                cutoff = torch.where(torch.rand([], device=ws.device) < self.style_mixing_prob, cutoff,
                                     torch.full_like(cutoff, ws.shape[1]))
                ws[:, cutoff:] = self.G.mapping(torch.randn_like(z), c, update_emas=False)[:, cutoff:]
        return ws

    def run_G(self, z, c, update_emas=False):
        ws = self.mapped_ws(z, c, update_emas=update_emas)
        img = self.G.synthesis(ws, update_emas=update_emas)
        return img, ws

    def run_D(self, img, c, update_emas=False, update_quant=False, quantize=True):
        if self.augment_pipe is not None:
            img = self.augment_pipe(img)
        extra = {} if quantize else dict(quantize=False)   # Only D classes with quantizers know the switch.
        logits, aux = self.D(img, c, update_emas=update_emas, update_quant=update_quant, return_aux=True, **extra)
        return logits, aux

    def _fq_term(self, aux, name):
        if self.fq_weight == 0 or aux is None:
            return 0
        fq_loss = aux.get('fq_loss', 0)
        if torch.is_tensor(fq_loss):
            training_stats.report(f'Loss/{name}/fq', fq_loss)
            for res, value in aux.get('fq_perplexity', {}).items():
                training_stats.report(f'FQ/perplexity{res}', value)
            for res, value in aux.get('fq_usage', {}).items():
                training_stats.report(f'FQ/usage{res}', value)
        return fq_loss * self.fq_weight

    def accumulate_phase(self, phase, rounds, gain, cur_nimg):
        quantizers = [m for m in self.D.modules() if callable(getattr(m, 'ema_step', None))]
        d_main = phase in ['Dmain', 'Dboth']
        for q in quantizers:
            q.deferred = d_main         # One dictionary EMA step per D step, from all its passes and rounds.
        try:
            if self.topk is not None and phase in ['Gmain', 'Gboth']:
                self._topk_generator_phase(rounds, gain, cur_nimg)
                if phase == 'Gboth':
                    phase = 'Greg'      # Path length still runs round by round.
                else:
                    return
            for real_img, real_c, gen_z, gen_c in rounds:
                self._accumulate_round(phase, real_img, real_c, gen_z, gen_c, gain)
        finally:
            for q in quantizers:
                q.deferred = False
        if d_main:
            for q in quantizers:
                q.ema_step()

    def accumulate_gradients(self, phase, real_img, real_c, gen_z, gen_c, gain, cur_nimg):
        """One round as a phase of its own (top-k then selects within it; the dictionary steps once)."""
        self.accumulate_phase(phase, [(real_img, real_c, gen_z, gen_c)], gain, cur_nimg)

    def _rng_state(self):
        state = [torch.get_rng_state()]
        if self.device.type == 'cuda':
            state.append(torch.cuda.get_rng_state(self.device))
        return state

    def _set_rng_state(self, state):
        torch.set_rng_state(state[0])
        if self.device.type == 'cuda':
            torch.cuda.set_rng_state(state[1], self.device)

    def _topk_select(self, scores, cur_nimg):
        """Boolean mask over this rank's fakes of the k best of the batch (of all ranks with topk_global), and
        the weight that makes the kept fakes' mean the loss: batch / k."""
        all_scores, offset = scores, 0
        dist = torch.distributed
        if self.topk_global and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(scores) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, scores)
            all_scores = torch.cat(gathered)
            offset = dist.get_rank() * scores.numel()
        epoch = cur_nimg / self.dataset_size
        self.topk_fraction = float(self.topk.fraction(epoch))
        k = int(self.topk.k(all_scores.numel(), epoch))
        keep = torch.zeros(all_scores.numel(), dtype=torch.bool, device=scores.device)
        keep[self.topk.select(all_scores, k)] = True
        return keep[offset:offset + scores.numel()], all_scores.numel() / k, k

    def _topk_report(self, scores, cur_nimg):
        training_stats.report('Loss/scores/fake', scores)
        training_stats.report('Loss/signs/fake', scores.sign())
        training_stats.report('Loss/G/loss', F.softplus(-scores))    # The whole batch's loss, whatever top-k keeps.
        keep, weight, k = self._topk_select(scores, cur_nimg)
        training_stats.report('Loss/topk_fraction', self.topk_fraction)
        self.topk_last = dict(scores=scores, keep=keep, k=k, replay_error=torch.zeros_like(scores[0]))
        return keep, weight

    def _topk_generator_phase(self, rounds, gain, cur_nimg):
        """Gmain with top-k over the whole batch (Sinha et al. 2020, Algorithm 1), memory bounded per round."""
        if len(rounds) == 1:
            self._topk_one_round(rounds[0], gain, cur_nimg)
            return
        # 1. Score every fake of the phase without a graph, remembering each round's RNG state.
        states, scores = [], []
        with torch.no_grad():
            for _real_img, _real_c, gen_z, gen_c in rounds:
                states.append(self._rng_state())
                gen_img, _ = self.run_G(gen_z, gen_c)
                logits, _ = self.run_D(gen_img, gen_c)
                scores.append(logits.flatten())
        end_state = self._rng_state()
        scores = torch.cat(scores)
        keep, weight = self._topk_report(scores, cur_nimg)

        # 2. Gradient pass, round by round, replaying the RNG so the fakes and logits are those scored.
        pos = 0
        for (_real_img, _real_c, gen_z, gen_c), state in zip(rounds, states):
            n = gen_z.shape[0]
            round_keep, round_scores = keep[pos:pos + n], scores[pos:pos + n]
            pos += n
            if not bool(round_keep.any()):
                continue                # Nothing kept: no gradient, and no need to run it again.
            self._set_rng_state(state)
            with torch.autograd.profiler.record_function('Gmain_topk_forward'):
                gen_img, _ws = self.run_G(gen_z, gen_c)
                mask = round_keep.reshape([-1] + [1] * (gen_img.ndim - 1))
                gen_img = torch.where(mask, gen_img, gen_img.detach())   # Discarded fakes: no gradient at all.
                logits, aux = self.run_D(gen_img, gen_c)
                replay_error = (logits.detach().flatten() - round_scores).abs().max()
                training_stats.report('Loss/topk_replay_error', replay_error)   # 0 on CPU; nondeterministic kernels: tiny
                self.topk_last['replay_error'] = torch.maximum(self.topk_last['replay_error'], replay_error)  # no sync
                loss = F.softplus(-logits).flatten() * round_keep.to(logits.dtype) * weight
                loss = loss.mean() + self._fq_term(aux, 'G_fake')
            with torch.autograd.profiler.record_function('Gmain_topk_backward'):
                loss.mul(gain).backward()
        self._set_rng_state(end_state)

    def _topk_one_round(self, phase_round, gain, cur_nimg):
        """The whole batch in one round: one pass, no replay. D's input gradient is taken first and the
        discarded fakes' rows are zeroed before it enters G, which is exactly the gradient of the multi-round
        path (there the discarded fakes enter D as constants; the partial derivatives of the kept rows agree)."""
        _real_img, _real_c, gen_z, gen_c = phase_round
        with torch.autograd.profiler.record_function('Gmain_topk_forward'):
            gen_img, _ws = self.run_G(gen_z, gen_c)
            img = gen_img.detach().requires_grad_(True)
            logits, aux = self.run_D(img, gen_c)
            keep, weight = self._topk_report(logits.detach().flatten(), cur_nimg)
            loss = F.softplus(-logits).flatten() * keep.to(logits.dtype) * weight
            loss = loss.mean() + self._fq_term(aux, 'G_fake')
        with torch.autograd.profiler.record_function('Gmain_topk_backward'):
            (img_grad,) = torch.autograd.grad(loss.mul(gain), [img])
            img_grad = img_grad * keep.reshape([-1] + [1] * (img_grad.ndim - 1)).to(img_grad.dtype)
            gen_img.backward(img_grad)

    def _accumulate_round(self, phase, real_img, real_c, gen_z, gen_c, gain):
        assert phase in ['Gmain', 'Greg', 'Gboth', 'Dmain', 'Dreg', 'Dboth']
        if phase == 'Dboth' and self.r1_gamma != 0 and getattr(self.D, 'quantize_forward', False):
            # R1 runs on the unquantized D (see Discriminator.quantize_forward), the main loss on the quantized one.
            self._accumulate_round('Dmain', real_img, real_c, gen_z, gen_c, gain)
            self._accumulate_round('Dreg', real_img, real_c, gen_z, gen_c, gain)
            return
        if self.pl_weight == 0:
            phase = {'Greg': 'none', 'Gboth': 'Gmain'}.get(phase, phase)
        if self.r1_gamma == 0:
            phase = {'Dreg': 'none', 'Dboth': 'Dmain'}.get(phase, phase)

        # Gmain: maximise logits for generated images.
        if phase in ['Gmain', 'Gboth']:
            with torch.autograd.profiler.record_function('Gmain_forward'):
                gen_img, _gen_ws = self.run_G(gen_z, gen_c)
                gen_logits, _aux = self.run_D(gen_img, gen_c)
                training_stats.report('Loss/scores/fake', gen_logits)
                training_stats.report('Loss/signs/fake', gen_logits.sign())
                loss_Gmain = F.softplus(-gen_logits)  # -log(sigmoid(D(G(z)))): large logit = "real".
                training_stats.report('Loss/G/loss', loss_Gmain)
                extra = self.generator_extra_loss(gen_img)
                if extra is not None:
                    loss_Gmain = loss_Gmain + extra
                if self.fq_weight != 0:
                    loss_Gmain = loss_Gmain + self._fq_term(_aux, 'G_fake')  # FQ-GAN: the fakes' commitment in G's loss.
            with torch.autograd.profiler.record_function('Gmain_backward'):
                loss_Gmain.mean().mul(gain).backward()

        # Greg: path-length regularisation (StyleGAN2 Sec. 3.2).
        if phase in ['Greg', 'Gboth']:
            with torch.autograd.profiler.record_function('Gpl_forward'), double_backward():
                batch_size = max(gen_z.shape[0] // self.pl_batch_shrink, 1)
                gen_img, gen_ws = self.run_G(gen_z[:batch_size], gen_c[:batch_size])
                pl_noise = torch.randn_like(gen_img) / np.sqrt(np.prod(gen_img.shape[2:]))  # Per pixel or voxel.
                with torch.autograd.profiler.record_function('pl_grads'), \
                        conv2d_gradfix.no_weight_gradients(self.pl_no_weight_grad):
                    pl_grads = torch.autograd.grad(outputs=[(gen_img * pl_noise).sum()], inputs=[gen_ws],
                                                   create_graph=True, only_inputs=True)[0]
                pl_lengths = pl_grads.square().sum(2).mean(1).sqrt()
                pl_mean = self.pl_mean.lerp(pl_lengths.mean(), self.pl_decay)
                self.pl_mean.copy_(pl_mean.detach())
                pl_penalty = (pl_lengths - pl_mean).square()
                training_stats.report('Loss/pl_penalty', pl_penalty)
                loss_Gpl = pl_penalty * self.pl_weight
                training_stats.report('Loss/G/reg', loss_Gpl)
            with torch.autograd.profiler.record_function('Gpl_backward'):
                loss_Gpl.mean().mul(gain).backward()

        # Dmain: minimise logits for generated images.
        loss_Dgen = 0
        if phase in ['Dmain', 'Dboth']:
            with torch.autograd.profiler.record_function('Dgen_forward'):
                gen_img, _gen_ws = self.run_G(gen_z, gen_c, update_emas=True)
                gen_logits, aux = self.run_D(gen_img, gen_c, update_emas=True, update_quant=True)
                training_stats.report('Loss/scores/fake', gen_logits)
                training_stats.report('Loss/signs/fake', gen_logits.sign())
                loss_Dgen = F.softplus(gen_logits)  # -log(1 - sigmoid(D(G(z))))
                loss_Dgen = loss_Dgen + self._fq_term(aux, 'D_fake')
            with torch.autograd.profiler.record_function('Dgen_backward'):
                loss_Dgen.mean().mul(gain).backward()

        # Dmain: maximise logits for real images. Dr1: R1 gradient penalty on reals.
        if phase in ['Dmain', 'Dreg', 'Dboth']:
            name = {'Dmain': 'Dreal', 'Dreg': 'Dr1', 'Dboth': 'Dreal_Dr1'}[phase]
            r1 = phase in ['Dreg', 'Dboth']
            with torch.autograd.profiler.record_function(name + '_forward'), \
                    (double_backward() if r1 else contextlib.nullcontext()):
                real_img_tmp = real_img.detach().requires_grad_(r1)
                real_logits, aux = self.run_D(real_img_tmp, real_c, update_quant=phase in ['Dmain', 'Dboth'],
                                              quantize=not (phase == 'Dreg' and getattr(self.D, 'quantize_forward', False)))
                training_stats.report('Loss/scores/real', real_logits)
                training_stats.report('Loss/signs/real', real_logits.sign())
                self.real_sign_acc[0] += real_logits.detach().sign().sum().double()
                self.real_sign_acc[1] += real_logits.numel()

                loss_Dreal = 0
                if phase in ['Dmain', 'Dboth']:
                    loss_Dreal = F.softplus(-real_logits)  # -log(sigmoid(D(x)))
                    loss_Dreal = loss_Dreal + self._fq_term(aux, 'D_real')
                    training_stats.report('Loss/D/loss', loss_Dgen + loss_Dreal)

                loss_Dr1 = 0
                if phase in ['Dreg', 'Dboth']:
                    with torch.autograd.profiler.record_function('r1_grads'), conv2d_gradfix.no_weight_gradients():
                        r1_grads = torch.autograd.grad(outputs=[real_logits.sum()], inputs=[real_img_tmp],
                                                       create_graph=True, only_inputs=True)[0]
                    r1_penalty = r1_grads.square().sum(list(range(1, r1_grads.ndim)))
                    loss_Dr1 = r1_penalty * (self.r1_gamma / 2)
                    training_stats.report('Loss/r1_penalty', r1_penalty)
                    training_stats.report('Loss/D/reg', loss_Dr1)

            with torch.autograd.profiler.record_function(name + '_backward'):
                (loss_Dreal + loss_Dr1).mean().mul(gain).backward()
