"""Where a new tumour goes in a real case: random transforms of a label map and a placement inside the brain.

A shape (a label map, values 0-3, cropped to its tumour) is flipped, turned by 90 degree steps and a small angle
and scaled (`transform_shape`; in-plane only for the 2D shapes of a slice painter), then placed (`Placer`) at a
random position among those where the whole repaint region of the new tumour (the tumour dilated by the painter's
radius with mri.painting.masks.dilate: the region the model repaints, as in training) lies at least `edge` voxels
inside the brain and more than `margin` voxels away from the existing tumour and from every earlier placement: a few
random tries first, then an exhaustive search (a correlation of the blocked voxels with the region), so a shape is
refused only when it fits nowhere. The caller retries with other shapes up to its limit and reports what could not
be placed; nothing is forced in. A case's arrays are RAS-canonical (mri.sources.patches.NativeCase); a 2D shape is
a slab one voxel thick along the slice axis of its plane, so one placement code serves volumes and slices.
"""

import dataclasses

import numpy as np
from scipy import ndimage, signal

from mri.sources.preprocess import PLANE_AXIS


class PlacementError(ValueError):
    """A case cannot take any placement at all (its brain is empty); one line naming the case."""


@dataclasses.dataclass
class Placement:
    """One new tumour in a case: its label box at `corner` (canonical voxel index of the box's first voxel)."""
    corner: tuple           # (x, y, z) of labels[0, 0, 0] in the canonical case
    labels: np.ndarray      # uint8 (X, Y, Z) box, values 0-3 (one voxel thick along the plane axis for 2D)
    region: np.ndarray      # bool, same box grown by the dilation: labels > 0 dilated (the repaint mask)
    region_corner: tuple    # (x, y, z) of region[0, 0, 0]
    transform: dict         # what transform_shape did (flips, turns, angle, scale)
    origin: dict            # where the shape came from (label source, case, seed)
    plane: str = None       # 2D painting: the slice plane

    @property
    def box(self):
        """Slices of the label box in the case."""
        return tuple(slice(c, c + s) for c, s in zip(self.corner, self.labels.shape))

    @property
    def region_box(self):
        return tuple(slice(c, c + s) for c, s in zip(self.region_corner, self.region.shape))

    @property
    def centre(self):
        """The voxel the painter's patch is centred on: the middle of the repaint region's box."""
        return tuple(int(c + s // 2) for c, s in zip(self.region_corner, self.region.shape))

    def describe(self) -> dict:
        counts = np.bincount(self.labels.ravel(), minlength=4)
        return dict(centre=list(self.centre), corner=list(self.corner), size=list(self.labels.shape),
                    plane=self.plane, voxels={'netc': int(counts[1]), 'snfh': int(counts[2]), 'et': int(counts[3])},
                    repaint_voxels=int(self.region.sum()), transform=self.transform, origin=self.origin)


# ---------------------------------------------------------------------------------------------------------------
# Shapes


def crop_to_tumour(labels, pad=0):
    """The smallest box of `labels` holding every label > 0 (grown by `pad` zero voxels); None when there is none."""
    labels = np.asarray(labels)
    nz = np.nonzero(labels)
    if not nz[0].size:
        return None
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
    return np.pad(labels[box], pad) if pad else np.ascontiguousarray(labels[box])


def _resample_labels(labels, fn):
    """Apply a linear resampling `fn` (an ndimage call on one float channel) to each label's indicator and take the
    strongest, so that edges stay smooth and labels stay exact integers (nearest neighbour would make stairs)."""
    channels = [fn((labels == k).astype(np.float32)) for k in range(4)]
    return np.argmax(np.stack(channels), axis=0).astype(np.uint8)


def transform_shape(
    labels,                 # uint8 (X, Y, Z) label box (a slab one voxel thick along `flat_axis` for 2D)
    rng,                    # numpy Generator
    flat_axis=None,         # 2D: the slice axis; transforms stay in the other two
    zoom=1.0,               # per-axis factor from the source's voxel size to the case's (mm per voxel ratio)
    scale=(0.8, 1.25),      # random isotropic scale range; (1, 1) = none
    max_angle=15.0,         # degrees of a random small rotation in one plane; 0 = none
    flips=True,             # random flip per axis
    turns=True,             # random 90-degree turns in one plane
):
    """Returns (labels cropped to the tumour, transform record). The record lists what was done, in order."""
    labels = np.asarray(labels, np.uint8)
    axes = [a for a in range(labels.ndim) if a != flat_axis]
    record = {}
    if flips:
        flipped = [a for a in axes if rng.random() < 0.5]
        if flipped:
            labels = np.flip(labels, flipped)
        record['flip_axes'] = flipped
    if turns:
        pair = tuple(sorted(rng.choice(axes, 2, replace=False).tolist())) if len(axes) > 2 else tuple(axes)
        k = int(rng.integers(4))
        labels = np.rot90(labels, k, axes=pair)
        record['rot90'] = {'k': k, 'axes': list(pair)}
    factor = np.ones(labels.ndim)
    zoom = np.broadcast_to(np.asarray(zoom, np.float64), (labels.ndim,)).copy()
    if flat_axis is not None:
        zoom[flat_axis] = 1.0  # the slab stays one voxel thick
    s = float(rng.uniform(*scale)) if scale[1] > scale[0] else float(scale[0])
    factor[axes] = s
    factor *= zoom
    if max_angle:
        pair = tuple(sorted(rng.choice(axes, 2, replace=False).tolist())) if len(axes) > 2 else tuple(axes)
        angle = float(rng.uniform(-max_angle, max_angle))
        labels = np.pad(labels, 2)
        labels = _resample_labels(labels, lambda x: ndimage.rotate(x, angle, axes=pair, order=1, reshape=True,
                                                                   mode='constant', cval=0.0))
        record['rotate'] = {'degrees': round(angle, 3), 'axes': list(pair)}
    if not np.allclose(factor, 1):
        labels = _resample_labels(np.pad(labels, 1), lambda x: ndimage.zoom(x, factor, order=1, mode='grid-constant',
                                                                            grid_mode=True))
    record['scale'] = round(s, 4)
    record['zoom'] = [round(float(f), 4) for f in factor]
    out = crop_to_tumour(labels)
    if out is None:  # scaled below one voxel: keep the original's strongest voxel rather than nothing
        out = np.asarray(labels.max(), np.uint8).reshape((1,) * labels.ndim)
    return out, record


def dilate_box(tumour, radius, flat_axis=None):
    """(region, offset): the bool box `tumour` dilated by `radius` voxels with mri.painting.masks.dilate (the
    repaint masks of training), in a box grown by `radius` on each side (not along the flat axis of a 2D slab);
    offset is where the grown box starts relative to the tumour box."""
    import torch
    from mri.painting.masks import dilate
    pad = [(0, 0) if a == flat_axis else (radius, radius) for a in range(tumour.ndim)]
    grown = np.pad(np.asarray(tumour, bool), pad)
    if radius > 0:
        plane = grown if flat_axis is None else np.take(grown, 0, axis=flat_axis)
        out = dilate(torch.from_numpy(plane)[None, None], radius)[0, 0].numpy().astype(bool)
        grown = out if flat_axis is None else np.expand_dims(out, flat_axis)
    return grown, tuple(-p[0] for p in pad)


# ---------------------------------------------------------------------------------------------------------------
# Placement


class Placer:
    """Places shapes in one case, one after another; each placement blocks its region (and the margin around it)
    for the next ones."""

    def __init__(
        self,
        brain,              # bool (X, Y, Z) canonical brain mask
        tumour,             # bool (X, Y, Z) existing tumour (labels > 0), or None
        dilation=3,         # voxels: the repaint region is the tumour dilated by this much
        edge=3,             # voxels between the repaint region and the brain's edge, at least
        margin=3,           # voxels between the repaint region and the tumour or earlier regions, more than
        quick_tries=32,     # random positions tried before the exhaustive search
        max_region=None,    # (X, Y, Z) largest repaint box the painter takes (its patch); None = any
        case_id='case',     # names the case in messages
    ):
        brain = np.asarray(brain, bool)
        if not brain.any():
            raise PlacementError(f'case {case_id}: the brain mask is empty (all modalities are zero)')
        self.brain, self.case_id = brain, case_id
        self.dilation, self.edge, self.margin, self.quick_tries = int(dilation), int(edge), int(margin), int(quick_tries)
        self.max_region = None if max_region is None else tuple(int(s) for s in max_region)
        # Voxels a repaint region may cover: deep enough in the brain, far enough from the tumour.
        self.free = ndimage.distance_transform_edt(np.pad(brain, 1))[1:-1, 1:-1, 1:-1] > self.edge
        if tumour is not None and np.any(tumour):
            self.free &= ndimage.distance_transform_edt(~np.asarray(tumour, bool)) > self.margin
        self.placed = []

    def _block(self, region, corner):
        """Marks a new region and the `margin` around it as taken (a local update: no pass over the volume)."""
        m = self.margin
        lo = [max(c - m, 0) for c in corner]
        hi = [min(c + s + m, n) for c, s, n in zip(corner, region.shape, self.free.shape)]
        grown = ndimage.distance_transform_edt(~np.pad(region, m)) <= m
        sub = tuple(slice(l - c + m, h - c + m) for l, h, c in zip(lo, hi, corner))
        box = tuple(slice(l, h) for l, h in zip(lo, hi))
        self.free[box] &= ~grown[sub]

    @staticmethod
    def fits_painter(region_shape, max_region):
        """None when a repaint box of `region_shape` fits in `max_region` (the painter's patch as a box on the
        case's axes; one voxel thick along the slice axis of a 2D painter), else the reason."""
        if max_region is None or all(s <= p for s, p in zip(region_shape, max_region)):
            return None
        return (f'the tumour with its repaint rim spans {"x".join(map(str, region_shape))} voxels, more than the '
                f'paint model\'s patch ({"x".join(map(str, max_region))})')

    def place(self, labels, rng, transform=None, origin=None, plane=None, at=None, max_region=None):
        """Places one shape (uint8 label box, cropped to its tumour) at a random position among all that keep it
        clear of the brain's edge, the tumour and earlier placements. Returns (Placement, None) or (None, reason)
        when there is no such position (the caller retries with another shape, up to its limit).

        `at`: a fixed corner (a label map drawn on the case's grid) instead of a random position; `max_region`:
        the painter's patch for this placement (default: the Placer's)."""
        flat = PLANE_AXIS[plane] if plane is not None else None
        region, offset = dilate_box(labels > 0, self.dilation, flat)
        too_big = self.fits_painter(region.shape, max_region or self.max_region)
        if too_big:
            return None, too_big
        shape = np.array(region.shape)
        if np.any(shape > self.free.shape):
            return None, f'shape {tuple(labels.shape)} does not fit the case grid {self.free.shape}'
        if at is not None:
            corner = np.asarray(at) + offset
            ok = np.all(corner >= 0) and np.all(corner + shape <= self.free.shape)
            if ok and self.free[tuple(slice(int(c), int(c) + s) for c, s in zip(corner, shape))][region].all():
                return self._accept(labels, region, corner, offset, transform, origin, plane), None
            return None, ('the drawn label map is not inside the brain, or touches the existing tumour or an earlier '
                          'placement, where it was drawn')
        free_idx = np.flatnonzero(self.free)
        if not free_idx.size:
            return None, 'no free brain tissue left (margin from the tumour and earlier placements, brain edge)'
        # A few random region centres on free voxels first (cheap, and enough in a roomy brain) ...
        picks = rng.choice(free_idx, size=min(self.quick_tries, free_idx.size), replace=False)
        for corner in np.stack(np.unravel_index(picks, self.free.shape), 1) - shape // 2:
            if np.any(corner < 0) or np.any(corner + shape > self.free.shape):
                continue
            if self.free[tuple(slice(int(c), int(c) + s) for c, s in zip(corner, shape))][region].all():
                return self._accept(labels, region, corner, offset, transform, origin, plane), None
        # ... then every position at once: the count of blocked voxels under the region at each corner is a
        # correlation of the blocked map with the region (FFT), done in the box of the free voxels only.
        nz = np.nonzero(self.free)
        lo = np.array([i.min() for i in nz])
        hi = np.array([i.max() + 1 for i in nz])
        if np.any(hi - lo < shape):
            return None, self._no_room(shape)
        blocked = ~self.free[tuple(slice(a, b) for a, b in zip(lo, hi))]
        hits = signal.fftconvolve(blocked.astype(np.float32), region[::-1, ::-1, ::-1].astype(np.float32), mode='valid')
        valid = np.flatnonzero(hits.ravel() < 0.5)
        if not valid.size:
            return None, self._no_room(shape)
        corner = lo + np.array(np.unravel_index(int(rng.choice(valid)), hits.shape))
        return self._accept(labels, region, corner, offset, transform, origin, plane), None

    def _no_room(self, shape):
        return (f'no position keeps its {"x".join(map(str, shape))}-voxel repaint region {self.edge} voxels inside '
                f'the brain and more than {self.margin} from the tumour and earlier placements')

    def _accept(self, labels, region, corner, offset, transform, origin, plane):
        corner = tuple(int(c) for c in corner)
        self._block(region, corner)
        p = Placement(corner=tuple(c - o for c, o in zip(corner, offset)), labels=np.asarray(labels, np.uint8),
                      region=region, region_corner=corner, transform=transform or {}, origin=origin or {},
                      plane=plane)
        self.placed.append(p)
        return p
