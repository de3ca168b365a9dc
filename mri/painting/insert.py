"""Putting a paint model to use: new tumours painted into real cases, tumours healed away, tumours moved.

GliGAN (Ferreira et al. 2024, "How we won BraTS 2023 Adult Glioma challenge? Just faking it!") paints a tumour from
a label map into a real scan; the BraTS 2024 inpainting task fills a region with healthy tissue. One paint model
(training.paint.PaintGenerator) does both, in a patch of its size around the region:

- insert (`insert_tumours`): a shape from a label source (mri.painting.label_sources) is transformed and placed
  (mri.painting.place); the patch around it is cut from the case (mri.sources.patches.crop, or crop_slice in the
  slice plane of a 2D model), the repaint mask is the new tumour dilated by a few voxels (mri.painting.masks.dilate,
  as in training) and the label map the new tumour's; all modalities are painted at once and put back inside the
  mask only (paste). The new seg is the old labels plus the new ones.
- heal (`heal_case`): the mask is the existing tumour dilated (inside the brain), the labels all zero (healthy
  tissue); a tumour larger than the patch is healed in overlapping windows, each painting the part of the region
  not painted yet with what was painted before as its context. The seg is 0 in the healed region.
- move (`move_tumour`): heal, then insert the case's own tumour elsewhere (away from where it was).

Every voxel outside the repaint region keeps the case's value exactly (the composite of the model, and `paste`
inside the mask only); `PaintResult.region` says which voxels were repainted.
"""

import collections
import dataclasses
import os

import numpy as np

from mri.painting.place import PLANE_AXIS, Placer, transform_shape
from mri.sources import patches
from mri.seg import SEG_CHANNELS


class PaintError(ValueError):
    """A paint request that cannot run (a generator of the wrong family, a case it cannot paint); one line."""


@dataclasses.dataclass
class PaintResult:
    """A painted case, on the case's canonical grid."""
    images: np.ndarray      # float32 (M, X, Y, Z) in [-1, 1], the case's modalities
    seg: np.ndarray         # uint8 (X, Y, Z): old labels plus new ones (0 where healed)
    placements: list        # [dict] each new tumour (mri.painting.place.Placement.describe)
    failures: list          # [str] what was asked for and could not be done, and why
    region: np.ndarray      # bool (X, Y, Z): every voxel repainted (outside it the case is unchanged)
    healed: dict = None     # heal_case: voxels healed, windows painted

    @property
    def changed(self) -> bool:
        return bool(self.region.any())


class Painter:
    """Wraps a paint generator: patches in, painted patches out, on one device, with a class per case."""

    def __init__(
        self,
        G,                          # training.paint.PaintGenerator (others are refused)
        device='cpu',               # torch device of G
        noise_mode='const',         # 'const', 'random' or 'none'
        truncation_psi=1,           # 1 = off
        dilation=3,                 # voxels around a new tumour that are repainted too (its rim), as in training
        desc=None,                  # the snapshot's dataset description: label groups (class per case), planes
        class_spec=None,            # --class names that fix label groups (e.g. 'ssa'); others come from the case
        name='the network',         # names G in messages (the snapshot path)
    ):
        import torch
        from training.paint import is_paint_generator
        if not is_paint_generator(G):
            raise PaintError(f'{name}: is not a paint snapshot (its generator is {getattr(G, "class_name", type(G).__name__)}); '
                             f'--insert-into needs a snapshot trained on a patch archive (train.py --cfg paint); a joint '
                             f'image+label snapshot serves as --labels-from')
        self.torch = torch
        self.G, self.device = G, torch.device(device)
        self.noise_mode, self.truncation_psi, self.dilation = noise_mode, truncation_psi, int(dilation)
        self.shape = tuple(int(s) for s in G.img_shape)
        self.ndim = len(self.shape)
        self.paint_channels, self.label_channels = list(G.paint_channels), list(G.label_channels)
        if self.label_channels != list(SEG_CHANNELS):
            raise PaintError(f'{name}: paints with labels {self.label_channels or "none"}, not the BraTS tumour '
                             f'labels {", ".join(SEG_CHANNELS)}')
        self.desc, self.name = dict(desc or {}), name
        self.groups = self._groups()
        self.fixed = self._parse_class(class_spec)
        self.planes = next((g['values'] for g in self.groups if g['name'] == 'plane'), None) or self._archive_planes()

    def _archive_planes(self):
        """The planes an unconditional 2D model was trained on: those of its patch archive's patches when the
        archive is still where the snapshot says, else axial."""
        from mri.painting.label_sources import LabelSourceError, read_archive_meta
        path = self.desc.get('path')
        try:
            meta = read_archive_meta(path) if path and os.path.exists(path) else None
        except LabelSourceError:
            meta = None
        planes = sorted({p.get('plane') for p in ((meta or {}).get('patches') or {}).values() if p.get('plane')})
        return planes or list(self.desc.get('planes') or ['axial'])

    # -- classes ------------------------------------------------------------------------------------------------

    def _groups(self):
        if not self.G.c_dim:
            return []
        names = list(self.desc.get('label_names') or [f'class{i}' for i in range(self.G.c_dim)])[:self.G.c_dim]
        groups = self.desc.get('label_groups') or [{'name': 'class', 'values': names}]
        return [dict(name=g['name'], values=list(g['values'])) for g in groups]

    def _parse_class(self, spec):
        fixed = {}
        for token in [t.strip() for t in str(spec or '').split(',') if t.strip()]:
            hit = next((g['name'] for g in self.groups if token in g['values']), None)
            if hit is None:
                valid = '; '.join(f'{g["name"]}: {", ".join(g["values"])}' for g in self.groups) or 'none (unconditional)'
                raise PaintError(f'--class {spec}: unknown name {token!r}; valid: {valid}')
            fixed[hit] = token
        return fixed

    def class_vector(self, case_id, plane=None, healing=False) -> np.ndarray:
        """The label vector for painting in case `case_id`: --class values first, then the plane of a 2D
        placement and the cohort of the case id (mri.sources.cohort); a group left open is an error."""
        from mri.sources.cohort import CohortError, cohort_of
        vec = []
        for g in self.groups:
            value = self.fixed.get(g['name'])
            if value is None and g['name'] == 'plane':
                value = plane if plane in g['values'] else g['values'][0]
            elif value is None and g['name'] == 'cohort':
                try:
                    value = cohort_of(case_id)
                except CohortError:
                    value = None
                if value not in g['values']:
                    raise PaintError(f'case {case_id}: its cohort ({value or "none"}) is not one {self.name} was '
                                     f'trained on ({", ".join(g["values"])}); pass --class with one of them')
            elif value is None and g['name'] == 'tumour':
                value = 'no_tumour' if healing and 'no_tumour' in g['values'] else 'tumour'
            if value not in g['values']:
                raise PaintError(f'{self.name} is conditional on {g["name"]} ({", ".join(g["values"])}): pass --class '
                                 f'with one of them')
            vec += [float(v == value) for v in g['values']]
        return np.asarray(vec, np.float32)

    # -- patches ------------------------------------------------------------------------------------------------

    def channel_index(self, case):
        """Indices of the painted channels in the case's images."""
        missing = [n for n in self.paint_channels if n not in case.modalities]
        if missing:
            raise PaintError(f'case {case.case_id}: has no {", ".join(missing)}, which {self.name} paints')
        return [case.modalities.index(n) for n in self.paint_channels]

    def box(self, plane=None):
        """The patch as a box on the case's (X, Y, Z) axes: one voxel thick along a 2D model's slice axis (the
        display crop of patches.crop_slice has its columns along the first in-plane axis, rows along the second)."""
        if self.ndim == 3:
            return self.shape
        axis = PLANE_AXIS[plane]
        inplane = [a for a in range(3) if a != axis]
        box = [1, 1, 1]
        box[inplane[0]], box[inplane[1]] = self.shape[1], self.shape[0]
        return tuple(box)

    def paint(self, context, mask, labels, z, c) -> np.ndarray:
        """One patch: context (P, *shape) in [-1, 1], mask (*shape) bool, labels (*shape) uint8 0-3 -> (P, *shape)."""
        torch = self.torch
        from mri.seg import encode_seg
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))[None].to(self.device)  # noqa: E731
        with torch.no_grad():
            out = self.G(t(z), t(c), context=t(context), mask=t(mask[None]), labels=t(encode_seg(labels)),
                         truncation_psi=self.truncation_psi, noise_mode=self.noise_mode)
        return out[0].float().cpu().numpy()

    def paint_at(self, images, idx, centre, mask_full, labels_full, z, c, plane=None):
        """Paints the patch around `centre` of `images` (M, X, Y, Z) in place, inside `mask_full` only. Returns the
        patch's mask (what was repainted, in the patch's own orientation)."""
        if self.ndim == 3:
            ctx = patches.crop(images, centre, self.shape, -1.0)[idx]
            mask = patches.crop(mask_full, centre, self.shape, False)
            labels = patches.crop(labels_full, centre, self.shape, 0)
        else:
            ctx = patches.crop_slice(images, centre, self.shape, plane, -1.0)[idx]
            mask = patches.crop_slice(mask_full, centre, self.shape, plane, False)
            labels = patches.crop_slice(labels_full, centre, self.shape, plane, 0)
        out = self.paint(ctx, mask, labels, z, c)
        for j, ci in enumerate(idx):
            if self.ndim == 3:
                patches.paste(images[ci], out[j], centre, where=mask)
            else:
                patches.paste_slice(images[ci], out[j], centre, plane, where=mask)
        return mask

    def z(self, rng):
        return rng.standard_normal(self.G.z_dim).astype(np.float32)

    def describe(self) -> dict:
        return dict(patch=list(self.shape), paint_channels=self.paint_channels, dilation=self.dilation,
                    noise_mode=self.noise_mode, truncation_psi=self.truncation_psi, planes=self.planes)


# ---------------------------------------------------------------------------------------------------------------
# Insertion


def _pick_plane(painter, rng):
    return None if painter.ndim == 3 else painter.planes[int(rng.integers(len(painter.planes)))]


def _zoom(shape, case):
    """Voxel-size ratio from a shape's source to the case (1 where either is unknown)."""
    if shape.spacing is None:
        return 1.0
    return np.asarray(shape.spacing, np.float64) / np.asarray(case.spacing, np.float64)


def _paint_placement(painter, case, images, idx, p, rng, c):
    mask_full = np.zeros(case.shape, bool)
    mask_full[p.region_box] = p.region
    labels_full = np.zeros(case.shape, np.uint8)
    labels_full[p.box] = p.labels
    vec = painter.class_vector(case.case_id, p.plane) if c is None else c
    painter.paint_at(images, idx, p.centre, mask_full, labels_full, painter.z(rng), vec, p.plane)


def insert_tumours(
    painter,                # Painter
    case,                   # mri.sources.patches.NativeCase
    label_source,           # mri.painting.label_sources.LabelSource
    per_case,               # tumours to place
    rng,                    # numpy Generator: shapes, transforms, positions, latents
    c=None,                 # label vector; None = Painter.class_vector per placement
    tries=10,               # shapes tried per tumour before it is reported as not placed
    edge=3,                 # voxels between a repaint region and the brain's edge, at least
    margin=3,               # voxels between a repaint region and any tumour or other region, more than
    transform=True,         # random flips, turns, rotation and scale of each shape
    scale=(0.8, 1.25),      # range of the random scale (e.g. (0.5, 0.8) shrinks real tumours to fit a 64^3 patch)
    start=None,             # a PaintResult to paint on (move_tumour: the healed case), else the case itself
    blocked=None,           # bool (X, Y, Z) kept clear besides the tumour (move_tumour: the healed region)
) -> 'PaintResult':
    """Places and paints `per_case` new tumours; what does not fit is listed in `failures` with the reason."""
    idx = painter.channel_index(case)
    images = case.images.copy() if start is None else start.images
    seg = case.seg.copy() if start is None else start.seg
    region = np.zeros(case.shape, bool) if start is None else start.region
    tumour = case.seg > 0 if blocked is None else (case.seg > 0) | blocked
    placer = Placer(case.brain, tumour, dilation=painter.dilation, edge=edge, margin=margin,
                    max_region=painter.box() if painter.ndim == 3 else None, case_id=case.case_id)
    placements, failures = [], list(start.failures) if start is not None else []
    for k in range(int(per_case)):
        reasons = collections.Counter()
        placed = None
        for _ in range(int(tries)):
            plane = _pick_plane(painter, rng)
            shape = label_source.draw(rng, plane)
            flat = PLANE_AXIS[plane] if plane else None
            if transform:
                labels, record = transform_shape(shape.labels, rng, flat_axis=flat, zoom=_zoom(shape, case),
                                                 scale=scale)
            else:
                labels, record = shape.labels, {}
            placed, why = placer.place(labels, rng, record, shape.origin, plane, max_region=painter.box(plane))
            if placed is not None:
                break
            reasons[why] += 1
        if placed is None:
            why, n = reasons.most_common(1)[0]
            failures.append(f'tumour {k + 1} of {per_case} not placed ({tries} shapes tried): {why}'
                            + (f' (and {len(reasons) - 1} other reason(s))' if len(reasons) > 1 else ''))
            continue
        _paint_placement(painter, case, images, idx, placed, rng, c)
        new = placed.labels > 0
        seg[placed.box][new] = placed.labels[new]  # old labels plus the new ones (regions never touch a tumour)
        region[placed.region_box] |= placed.region
        placements.append(placed.describe())
    previous = list(start.placements) if start is not None else []
    return PaintResult(images=images, seg=seg, placements=previous + placements, failures=failures, region=region,
                       healed=None if start is None else start.healed)


def insert_drawn(painter, case, nifti_source, rng, c=None, edge=0, margin=3):
    """Paints a drawn label map (label_sources.NiftiSource on the case's grid) where it was drawn, each connected
    part as one placement; parts that leave the brain or touch the tumour are refused with the reason."""
    nifti_source.check_grid(case.case_id, case.source.images[case.modalities[0]].shape, case.source.affine)
    idx = painter.channel_index(case)
    images, seg, region = case.images.copy(), case.seg.copy(), np.zeros(case.shape, bool)
    placer = Placer(case.brain, case.seg > 0, dilation=painter.dilation, edge=edge, margin=margin,
                    case_id=case.case_id)
    placements, failures = [], []
    for k, (corner, labels) in enumerate(nifti_source.components()):
        plane = _pick_plane(painter, rng)
        if plane is not None:
            raise PaintError(f'{nifti_source.path}: a drawn 3D label map cannot be painted where it was drawn by a '
                             f'2D paint snapshot; leave out --labels-as-drawn')
        p, why = placer.place(labels, rng, {}, {'source': 'nifti', 'file': nifti_source.path, 'part': k + 1},
                              at=corner, max_region=painter.box())
        if p is None:
            failures.append(f'drawn part {k + 1} not painted: {why}')
            continue
        _paint_placement(painter, case, images, idx, p, rng, c)
        new = p.labels > 0
        seg[p.box][new] = p.labels[new]
        region[p.region_box] |= p.region
        placements.append(p.describe())
    return PaintResult(images=images, seg=seg, placements=placements, failures=failures, region=region)


# ---------------------------------------------------------------------------------------------------------------
# Healing


def heal_region(case, dilation):
    """The region healing repaints: the tumour dilated by `dilation` voxels (masks.dilate), inside the brain."""
    import torch
    from mri.painting.masks import dilate
    tumour = case.seg > 0
    if not tumour.any():
        return tumour
    nz = np.nonzero(tumour)
    lo = [max(int(i.min()) - dilation, 0) for i in nz]
    hi = [min(int(i.max()) + 1 + dilation, n) for i, n in zip(nz, tumour.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grown = np.zeros_like(tumour)
    grown[box] = dilate(torch.from_numpy(tumour[box])[None, None], dilation)[0, 0].numpy()
    return grown & (case.brain | tumour)


def _window_centres(lo, hi, w, overlap):
    """Centres (the crop convention: the window starts at centre - w // 2) of windows of side `w` covering [lo, hi)
    with at least `overlap` voxels shared between neighbours."""
    ext = hi - lo
    if w == 1:
        return list(range(lo, hi))
    if ext <= w:
        return [lo - (w - ext) // 2 + w // 2]
    n = int(np.ceil((ext - w) / max(w - overlap, 1))) + 1
    starts = np.linspace(lo, hi - w, n).round().astype(int)
    return [int(s) + w // 2 for s in starts]


def heal_case(
    painter,                # Painter
    case,                   # NativeCase
    rng,                    # numpy Generator: latents
    c=None,                 # label vector; None = Painter.class_vector
    overlap=None,           # voxels shared by neighbouring windows of a large tumour; None = a quarter patch
) -> 'PaintResult':
    """Fills the tumour (dilated) with healthy tissue (all-zero labels); seg 0 there."""
    idx = painter.channel_index(case)
    images, seg = case.images.copy(), case.seg.copy()
    region = heal_region(case, painter.dilation)
    if not region.any():
        return PaintResult(images=images, seg=seg, placements=[], failures=[f'case {case.case_id} has no tumour to heal'],
                           region=region, healed={'voxels': 0, 'windows': 0})
    left = region.copy()
    plane = _pick_plane(painter, rng)
    box = painter.box(plane)
    overlap = max(min(box) // 4, 1) if overlap is None else int(overlap)
    nz = np.nonzero(region)
    axes_centres = [_window_centres(int(i.min()), int(i.max()) + 1, w, overlap) for i, w in zip(nz, box)]
    labels_full = np.zeros(case.shape, np.uint8)
    windows = 0
    for centre in np.stack(np.meshgrid(*axes_centres, indexing='ij'), -1).reshape(-1, 3):
        centre = tuple(int(x) for x in centre)
        # Each window repaints what is still left, with what earlier windows painted as its context.
        todo = patches.crop(left, centre, box, False)
        if not todo.any():
            continue
        vec = painter.class_vector(case.case_id, plane, healing=True) if c is None else c
        painter.paint_at(images, idx, centre, left, labels_full, painter.z(rng), vec, plane)
        patches.paste(left, np.zeros(box, bool), centre, where=todo)
        windows += 1
    seg[region] = 0
    return PaintResult(images=images, seg=seg, placements=[], failures=[], region=region,
                       healed={'voxels': int(region.sum()), 'tumour_voxels': int((case.seg > 0).sum()),
                               'windows': windows, 'plane': plane})


def move_tumour(painter, case, rng, c=None, tries=10, edge=3, margin=3) -> 'PaintResult':
    """Heals the tumour, then paints the case's own tumour (its largest connected part, as it is) elsewhere: the
    healed region and the margin around it stay clear, so it lands away from where it was."""
    from mri.painting.label_sources import CaseTumourSource
    healed = heal_case(painter, case, rng, c)
    if not healed.changed:
        return healed
    own = CaseTumourSource(case.case_id, case.seg, painter.ndim)
    # A 3D tumour is the same shape on every try, and a placement fails only where it fits nowhere: one try says
    # it all. A 2D model tries other slices of it.
    moved = insert_tumours(painter, case, own, 1, rng, c, tries=tries if painter.ndim == 2 else 1, edge=edge, margin=margin, transform=False,
                           start=healed, blocked=healed.region)
    if not moved.placements:
        moved.failures.append(f'case {case.case_id}: the tumour was healed but could not be placed elsewhere')
    return moved
