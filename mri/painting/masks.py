"""Repaint masks, drawn on the fly from a batch of patches: "fill this region with tissue whose labels are L".

One model learns both directions of tumour painting (issue 18): on a patch that holds a tumour, the region is the
tumour dilated by a few voxels (its rim of oedema-free tissue included) and the target map is the tumour's own
labels, so the generator learns to paint a tumour from its label map (GliGAN, Ferreira et al. 2024, "How we won
BraTS 2023 Adult Glioma challenge? Just faking it!"); on a patch of healthy tissue, the region is the shape of
another patch's tumour moved into brain tissue and the target map is all zero, so it learns to fill a region with
healthy tissue (the BraTS 2024 inpainting task). The masks are drawn from the tensors of the batch (label
channels, brain channel), on the batch's device, with torch's random streams (the loop saves and restores them, so
a resumed run draws the same masks) or an explicit ``torch.Generator``.
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils.misc import shift  # one copy for metrics/insert_dice.py and the masks here


def ball(radius: int, spatial_dims: int, device=None) -> torch.Tensor:
    """A ball (3D) or disc (2D) of ``radius`` voxels as a float kernel [1, 1, *(2r+1,)]: 1 inside, 0 outside."""
    r = int(radius)
    axes = torch.meshgrid(*[torch.arange(-r, r + 1, device=device, dtype=torch.float32)] * spatial_dims,
                          indexing='ij')
    inside = sum(a.square() for a in axes) <= r * r + 1e-6
    return inside.to(torch.float32)[None, None]


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Morphological dilation of ``mask`` [N, 1, *S] (bool or {0, 1}) by a ball of ``radius`` voxels; bool out."""
    mask = mask.bool()
    if radius <= 0:
        return mask.clone()
    dims = mask.ndim - 2
    conv = F.conv3d if dims == 3 else F.conv2d
    hit = conv(mask.to(torch.float32), ball(radius, dims, mask.device), padding=int(radius))
    return hit > 0.5


def shrink(mask: torch.Tensor, max_fraction: float) -> torch.Tensor:
    """``mask`` [*S] scaled down about its bounding box (nearest neighbour) so that it covers at most
    ``max_fraction`` of the array; unchanged when it already does."""
    count = int(mask.sum())
    if count <= max_fraction * mask.numel() or count == 0:
        return mask
    factor = (max_fraction * mask.numel() / count) ** (1 / mask.ndim)
    voxels = mask.nonzero()
    lo, hi = voxels.min(dim=0).values, voxels.max(dim=0).values + 1
    box = mask[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    size = [max(1, int(int(n) * factor)) for n in box.shape]  # Rounded down: at most max_fraction.
    small = F.interpolate(box[None, None].to(torch.float32), size=size, mode='nearest')[0, 0] > 0.5
    out = torch.zeros_like(mask)
    start = [int(a) + (int(n) - m) // 2 for a, n, m in zip(lo, box.shape, size)]  # Centred where the shape was.
    out[tuple(slice(a, a + m) for a, m in zip(start, size))] = small
    return out


def random_blob(shape, centre, radius_range, generator=None, device=None) -> torch.Tensor:
    """An ellipsoid (ellipse in 2D) of random radii in ``radius_range`` voxels around ``centre``: the stand-in
    shape of a healthy repaint region when the batch holds no tumour to borrow."""
    lo, hi = radius_range
    radii = lo + (hi - lo) * torch.rand([len(shape)], generator=generator, device=generator.device if generator else device)
    axes = torch.meshgrid(*[torch.arange(s, device=device, dtype=torch.float32) for s in shape], indexing='ij')
    dist = sum(((a - float(c)) / float(r)).square() for a, c, r in zip(axes, centre, radii.tolist()))
    return dist <= 1


class RepaintMasks:
    """Draws (mask, target labels) for a batch of patches. Called by the paint loss every round and by the paint
    metrics (``mode='healthy'``) with a seeded generator."""

    def __init__(
        self,
        dilation: int = 3,              # Voxels added around a tumour: the repainted rim of normal-looking tissue.
        blob_radius: list = [0.08, 0.25],  # Stand-in shape radii, as fractions of the patch side.
        max_tries: int = 8,             # Attempts to land a borrowed shape on enough brain before a blob is used.
        min_inside: float = 0.5,        # Fraction of a moved shape that must fall on brain tissue.
        max_fraction: float = 0.35,     # A borrowed shape larger than this fraction of the patch is shrunk to it.
    ):
        self.dilation = int(dilation)
        self.blob_radius = [float(r) for r in blob_radius]
        self.max_tries = int(max_tries)
        self.min_inside = float(min_inside)
        self.max_fraction = float(max_fraction)

    def __call__(
        self,
        labels: torch.Tensor,           # One-hot tumour labels [N, K, *S] (> 0 = on), e.g. NETC, SNFH, ET.
        brain: torch.Tensor,            # Brain mask [N, 1, *S] (> 0 = brain).
        mode: str = 'auto',             # 'auto': tumour patches repaint their tumour, others healthy; 'healthy': all healthy.
        generator: torch.Generator = None,  # Random stream; None = torch's global stream of the device.
    ):
        """Returns ``mask`` [N, 1, *S] float in {0, 1} and ``target`` [N, K, *S] float in {0, 1}."""
        if mode not in ('auto', 'healthy'):
            raise ValueError(f'RepaintMasks mode {mode!r} is not auto or healthy')
        labels = labels > 0
        brain = brain > 0
        tumour = labels.any(dim=1, keepdim=True)
        grown = dilate(tumour, self.dilation)
        has_tumour = tumour.flatten(1).any(dim=1)
        mask = torch.zeros_like(tumour)
        target = torch.zeros_like(labels)
        donors = [i for i in range(labels.shape[0]) if has_tumour[i]]
        for i in range(labels.shape[0]):
            if mode == 'auto' and has_tumour[i]:
                mask[i] = grown[i] & (brain[i] | tumour[i])
                target[i] = labels[i]
            else:
                healthy = brain[i, 0] & ~grown[i, 0]
                mask[i, 0] = self._healthy_region(healthy, [grown[d, 0] for d in donors if d != i] or
                                                  [grown[d, 0] for d in donors], generator)
        return mask.to(torch.float32), target.to(torch.float32)

    def _healthy_region(self, healthy, shapes, generator):
        """A tumour shape (borrowed from ``shapes``, flipped at random) moved so that its centre lands on a random
        healthy voxel, clipped to the healthy tissue; a random blob when no shape lands well."""
        spots = healthy.nonzero()
        if len(spots) == 0:
            return torch.zeros_like(healthy)
        dev = generator.device if generator is not None else healthy.device

        def randint(n):
            return int(torch.randint(n, [1], generator=generator, device=dev))
        for _ in range(self.max_tries if shapes else 0):
            shape = shapes[randint(len(shapes))]
            flips = [a for a in range(shape.ndim) if randint(2)]
            if flips:
                shape = shape.flip(flips)
            # A glioma with its oedema can fill most of a patch: a healthy region that large would leave the
            # painter almost no context, so such a shape is shrunk (the BraTS inpainting masks are tumour-sized).
            shape = shrink(shape, self.max_fraction)
            voxels = shape.nonzero()
            if len(voxels) == 0:
                continue
            centre = voxels.to(torch.float32).mean(dim=0).round().to(torch.int64)
            offset = spots[randint(len(spots))] - centre
            moved = shift(shape, offset.tolist())
            region = moved & healthy
            if region.sum() >= self.min_inside * len(voxels):
                return region
        side = max(healthy.shape)
        lo, hi = (r * side for r in self.blob_radius)
        centre = spots[randint(len(spots))].tolist()
        return random_blob(list(healthy.shape), centre, (max(lo, 1.0), max(hi, 1.5)), generator, healthy.device) & healthy


def region_fraction(mask: torch.Tensor) -> float:
    """Mean fraction of a patch that ``mask`` [N, 1, *S] covers (a progress statistic)."""
    return float(mask.flatten(1).float().mean(dim=1).mean()) if mask.numel() else float(np.nan)
