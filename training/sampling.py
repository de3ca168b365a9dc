"""Sampling a trained generator: z from a seed, w by class, truncation around the class's own average w.

StyleGAN's truncation pulls w towards an average: ``w' = w_avg + psi * (w - w_avg)``. The mapping network tracks one
global ``w_avg`` over all classes during training; for a conditional model that average blends the classes (an
axial t1n class's w is pulled towards the average of every plane and modality), so a truncated sample drifts away
from its class. `ClassAverages` estimates each class's own average w (the mean of ``mapping(z, c)`` over
`num` fixed z, computed once per class and kept), and `map_ws` truncates around it (``center='class'``, the
default for conditional models) or around the tracked global one (``center='global'``, StyleGAN2-ADA's behaviour,
and what an unconditional model always uses).

generate.py, style_mixing.py and projector.py draw their samples through these functions, so a seed names the
same image in all three.
"""

import numpy as np
import torch

TRUNC_CENTERS = ('class', 'global')


def load_generator(network: str, device, error=ValueError, paint_message: str = None):
    """``(G, dataset description)`` of the snapshot file or run dir (its newest snapshot) that generate.py,
    style_mixing.py and projector.py sample: G_ema where the snapshot has it, else G. A paint snapshot cannot be
    sampled on its own: ``error(f'{network}: {paint_message}')``, the caller's words for what to use instead."""
    import dnnlib
    from torch_utils import snapshot
    from training.cli import resolve_network
    from training.paint import is_paint_generator
    data, G = snapshot.load_generator(resolve_network(network), device=device, name=network)
    if is_paint_generator(G):
        raise error(f'{network}: {paint_message or "this is a paint snapshot"}')
    return G, dnnlib.EasyDict(data.dataset or {})


def seed_z(G, seed: int, device='cpu') -> torch.Tensor:
    """[1, z_dim] latent of a seed (numpy's RandomState, as StyleGAN2-ADA's generate.py draws it)."""
    z = np.random.RandomState(int(seed)).randn(1, G.z_dim)
    return torch.from_numpy(z).to(device=device, dtype=torch.float32)


class ClassAverages:
    """The average w of each class, computed on first use and kept: ``averages(G, c)`` -> [1, w_dim]."""

    def __init__(
        self,
        num: int = 2000,        # latents averaged per class
        seed: int = 0,          # seed of those latents (the same for every class)
        batch: int = 250,       # latents per mapping call
    ):
        self.num, self.seed, self.batch = int(num), int(seed), int(batch)
        self._cache = {}

    @torch.no_grad()
    def __call__(self, G, c: torch.Tensor) -> torch.Tensor:
        # Keyed by the generator too: one kept instance may serve several networks without mixing their averages.
        key = (id(G.mapping), tuple(np.round(c.detach().cpu().numpy().reshape(-1), 6).tolist()))
        if key not in self._cache:
            z_all = np.random.RandomState(self.seed).randn(self.num, G.z_dim)
            total = 0
            for start in range(0, self.num, self.batch):
                z = torch.from_numpy(z_all[start:start + self.batch]).to(device=c.device, dtype=torch.float32)
                ws = G.mapping(z, c.reshape(1, -1).expand(len(z), -1), truncation_psi=1)
                total = total + ws[:, 0].double().sum(dim=0)
            self._cache[key] = (total / self.num).float()[None]
        return self._cache[key]


@torch.no_grad()
def map_ws(
    G,                              # a Generator (mapping + synthesis)
    z: torch.Tensor,                # [N, z_dim]
    c: torch.Tensor,                # [N, c_dim] (c_dim 0: [N, 0])
    truncation_psi: float = 1,      # 1 = no truncation
    center: str = 'class',          # 'class': around the class's own average w; 'global': the tracked w_avg
    averages: ClassAverages = None, # a kept ClassAverages (one per generator); None = a new one
) -> torch.Tensor:
    """[N, num_ws, w_dim] styles, truncated around the class average (conditional G, center 'class') or the
    global one."""
    if center not in TRUNC_CENTERS:
        raise ValueError(f'truncation center {center!r}: choose one of {", ".join(TRUNC_CENTERS)}')
    if truncation_psi == 1 or center == 'global' or not G.c_dim:
        return G.mapping(z, c, truncation_psi=truncation_psi)
    ws = G.mapping(z, c, truncation_psi=1)
    averages = averages if averages is not None else ClassAverages()
    centre = torch.cat([averages(G, c[i:i + 1]) for i in range(len(c))])[:, None]  # [N, 1, w_dim]
    return centre + truncation_psi * (ws - centre)


@torch.no_grad()
def synthesize(G, ws: torch.Tensor, noise_mode: str = 'const') -> torch.Tensor:
    """Images [N, C, *spatial] from styles, in float32."""
    return G.synthesis(ws, noise_mode=noise_mode).float()


@torch.no_grad()
def sample(G, seed: int, label: np.ndarray, truncation_psi: float = 1, noise_mode: str = 'const',
           center: str = 'class', averages: ClassAverages = None, device='cpu') -> np.ndarray:
    """One sample [C, *spatial] (numpy float32) of a seed and a class label vector."""
    z = seed_z(G, seed, device)
    c = torch.from_numpy(np.asarray(label, np.float32)[None]).to(device)
    ws = map_ws(G, z, c, truncation_psi, center, averages)
    return synthesize(G, ws, noise_mode)[0].cpu().numpy()
