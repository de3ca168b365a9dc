"""The ``real+inserted@R`` arm: training items made by painting new tumours into the fold's own training items.

GliGAN's recipe (Ferreira et al. 2024, "How we won BraTS 2023 Adult Glioma challenge? Just faking it!"): the
anatomy and the scanner stay real, only the tumour is new, and its label is exact by construction. Per fold, item
i of the pool is one training item of that fold (a volume, or a slice) with one tumour inserted by the paint
snapshot (``--paint-network``) through the insertion library (``mri.painting.insert.insert_tumours``: placement
inside the brain and away from the existing tumour, the region painted with all modalities at once, the new seg =
the old labels plus the new ones). The label maps come from the tumours of the same fold's training items. Neither
the item painted into nor the shape painted comes from a test case of the fold: a pool is made per fold, from its
training items only, and its JSON sidecar records the source of every item (``sources``; tested).

A slice becomes a slab of the case grid (``mri.sources.patches.from_display`` along its plane; repeated along the
slice axis so that placement keeps its distance to the brain's edge in the plane) and goes back the same way.
Item i has its own random stream (seeded by the protocol seed, the fold and i), so a pool's first n items never
depend on how many are made.
"""

import dataclasses
import json
import os
import re

import numpy as np

import dnnlib
from mri.downstream.data import SegmentationError, load_generator, open_npy_for_writing
from mri.seg import SEG_CHANNELS

_SLICE_NAME = re.compile(r'^(?P<plane>sagittal|coronal|axial)-\d+\.[A-Za-z0-9]+$')
EDGE = 3            # voxels kept between a new tumour's region and the brain's edge (the library's default)
ITEM_TRIES = 50     # training items tried per pool item before the fold is reported as having no room


@dataclasses.dataclass
class Shape:
    """A label map handed to the insertion library (the fields of ``mri.painting.label_sources.Shape``)."""
    labels: np.ndarray          # uint8 (X, Y, Z) RAS, cropped to the tumour (a slab one voxel thick for 2D painters)
    spacing: tuple = None       # mm per voxel; None = the case's own
    origin: dict = None         # where it came from (JSON)
    plane: str = None           # 2D: the plane of the slab


class LibraryInserter:
    """The insertion library of mri/painting (``Painter``, ``insert_tumours``), imported when first used; its refusals
    (a generator it cannot use, a case without brain) come back as one-line SegmentationErrors."""

    @staticmethod
    def _errors():
        from mri.painting.insert import PaintError
        from mri.painting.place import PlacementError
        return PaintError, PlacementError

    def painter(self, G, device, truncation_psi, desc):
        from mri.painting.insert import Painter
        try:
            return Painter(G, device, noise_mode='const', truncation_psi=truncation_psi, desc=desc)
        except self._errors() as err:
            raise SegmentationError(str(err)) from None

    def insert(self, painter, case, label_source, rng):
        from mri.painting.insert import insert_tumours
        try:
            return insert_tumours(painter, case, label_source, 1, rng)
        except self._errors() as err:
            raise SegmentationError(f'case {case.case_id}: {err}') from None


def _plane_of(real, idx):
    m = _SLICE_NAME.match(os.path.basename(real.dataset.image_fname(idx)))
    if m is None:
        raise SegmentationError(f'{real.path}: cannot tell the plane of {real.dataset.image_fname(idx)} (expected '
                                f'names such as axial-030.npy, as dataset_tool.py writes them)')
    return m.group('plane')


def _largest_component(labels: np.ndarray):
    """The largest connected part of the tumour, cropped to it; None without tumour."""
    from scipy import ndimage
    whole = labels > 0
    if not whole.any():
        return None
    comp, n = ndimage.label(whole, structure=np.ones((3,) * labels.ndim))
    if n > 1:
        labels = np.where(comp == 1 + int(np.argmax(np.bincount(comp.ravel())[1:])), labels, 0)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(labels))
    return np.ascontiguousarray(labels[box]).astype(np.uint8)


class FoldLabels:
    """The label source of one fold: the tumours of its training items (a 2D map becomes a slab in the painter's
    plane). ``draw(rng, plane) -> Shape``, as the library's label sources."""

    def __init__(self, real, items: list):
        self.real = real
        self.drawn = []  # the origin of every shape handed out (pool sidecars record them)
        self.items = [i for i in items if real.load(i)[1].any()]
        if not self.items:
            raise SegmentationError(f'{real.path}: the fold\'s training items hold no tumour to take shapes from '
                                    f'(arm real+inserted)')

    def describe(self) -> dict:
        return dict(kind='fold', path=self.real.path, items=len(self.items))

    def draw(self, rng, plane=None) -> Shape:
        from mri.sources import patches, preprocess
        idx = self.items[int(rng.integers(len(self.items)))]
        labels = self.real.load(idx)[1].numpy().astype(np.uint8)
        origin = dict(source='fold', item=self.real.dataset.image_fname(idx), case=self.real.item_cases[idx])
        self.drawn.append(origin)
        if labels.ndim == 2:
            labels = _largest_component(patches.from_display(labels, _plane_of(self.real, idx)))
            return Shape(np.expand_dims(labels, preprocess.PLANE_AXIS[plane or 'axial']), None, origin, plane)
        return Shape(_largest_component(labels), None, origin, None)


def _as_case(real, idx, images, labels):
    """An archive item as the native case the library paints into (``mri.sources.patches.NativeCase``):
    ``(case, plane, thickness)``; a slice is a slab repeated ``thickness`` times along its axis."""
    from mri.sources import patches, preprocess
    images, labels = images.numpy().astype(np.float32), labels.numpy().astype(np.uint8)
    plane, thick = None, 1
    if images.ndim == 3:
        plane, thick = _plane_of(real, idx), 2 * EDGE + 3
        axis = preprocess.PLANE_AXIS[plane]
        images = np.repeat(np.expand_dims(patches.from_display(images, plane), 1 + axis), thick, axis=1 + axis)
        labels = np.repeat(np.expand_dims(patches.from_display(labels, plane), axis), thick, axis=axis)
    brain = (images > -1 + 1e-3).any(0)
    case = patches.NativeCase(case_id=real.item_cases[idx], images=np.ascontiguousarray(images),
                              modalities=tuple(real.input_names), seg=np.ascontiguousarray(labels), brain=brain,
                              ranges={}, source=None, affine=np.eye(4))
    return case, plane, thick


def _back(result, plane, thick):
    """A PaintResult of a (slab) case -> (images [C, *S], labels [*S]) in the archive's orientation."""
    from mri.sources import patches, preprocess
    if plane is None:
        return result.images, result.seg
    axis = preprocess.PLANE_AXIS[plane]
    painted = np.flatnonzero(np.asarray(result.region).any(axis=tuple(a for a in range(3) if a != axis)))
    k = int(painted[0]) if len(painted) else thick // 2
    return (patches.to_display(np.take(result.images, k, axis=1 + axis), plane),
            patches.to_display(np.take(result.seg, k, axis=axis), plane))


class PaintSource:
    """A paint snapshot, checked against the real archive before anything is written."""

    def __init__(self, network: str, real, device, truncation_psi: float = 1.0, inserter=None):
        from training.paint import is_paint_generator
        path, data, G = load_generator(network, '--paint-network')
        if not is_paint_generator(G):
            raise SegmentationError(f'{path}: is not a paint snapshot (its generator is {type(G).__name__}); '
                                    f'--paint-network needs one trained on a patch archive (train.py --cfg paint); '
                                    f'a joint image+mask snapshot goes to --network')
        if sorted(G.paint_channels) != sorted(real.input_names):
            raise SegmentationError(f'{path}: paints {list(G.paint_channels)}, but {real.path} has image channels '
                                    f'{real.input_names}')
        if list(G.label_channels) != list(SEG_CHANNELS):
            raise SegmentationError(f'{path}: paints from labels {list(G.label_channels)}, not {list(SEG_CHANNELS)}')
        if len(G.img_shape) != real.spatial_dims:
            raise SegmentationError(f'{path}: paints {len(G.img_shape)}D patches, but {real.path} holds '
                                    f'{real.spatial_dims}D items')
        self.path = os.path.abspath(path)
        self.inserter = inserter or LibraryInserter()
        self.painter = self.inserter.painter(G.to(device), device, truncation_psi, dict(data.dataset or {}))
        self.psi = truncation_psi

    def sample(self, real, items: list, labels: FoldLabels, seed: int, fold: int, first: int, count: int):
        """Items ``first .. first+count-1`` of the fold's pool: (uint16 images [n, C_in, *S], uint8 labels [n, *S],
        [source record per item])."""
        xs, ys, records = [], [], []
        for i in range(first, first + count):
            rng = np.random.default_rng([seed, fold, 0x1A5, i])
            labels.drawn = []
            for _ in range(ITEM_TRIES):
                idx = items[int(rng.integers(len(items)))]
                case, plane, thick = _as_case(real, idx, *real.load(idx))
                if plane is not None:
                    self.painter.planes = [plane]  # a 2D painter paints in the slice's own plane
                result = self.inserter.insert(self.painter, case, labels, rng)
                if result.placements:
                    break
            else:
                raise SegmentationError(f'{real.path}: no tumour could be placed in {ITEM_TRIES} training items of fold '
                                        f'{fold} (arm real+inserted): {"; ".join(result.failures) or "no room"}')
            image, seg = _back(result, plane, thick)
            xs.append(np.rint((np.clip(image, -1, 1) + 1) / 2 * 65535).astype(np.uint16))
            ys.append(np.asarray(seg, np.uint8))
            records.append(dict(item=real.dataset.image_fname(idx), case=real.item_cases[idx],
                                shapes_drawn=list(labels.drawn), placements=list(result.placements)))
        return np.stack(xs), np.stack(ys), records


def ensure_inserted_pool(source: PaintSource, real, items: list, fold: int, count: int, seed: int, pool_dir: str,
                         progress=True) -> tuple:
    """Make (or reuse) the fold's pool of ``count`` inserted items as two .npy files and a JSON sidecar that records
    the source of every item; returns the two .npy paths."""
    key = f'inserted-fold{fold}'
    img_path, lab_path, meta_path = (os.path.join(pool_dir, f'{key}-images.npy'),
                                     os.path.join(pool_dir, f'{key}-labels.npy'), os.path.join(pool_dir, f'{key}.json'))
    train_cases = sorted({real.item_cases[i] for i in items})
    meta = dict(network=source.path, network_mtime=os.path.getmtime(source.path), truncation_psi=source.psi,
                seed=seed, fold=fold, train_cases=train_cases, count=count)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get('count', 0) >= count and {k: v for k, v in old.items() if k != 'sources'} == dict(meta, count=old['count']):
            return img_path, lab_path
    labels = FoldLabels(real, items)
    os.makedirs(pool_dir, exist_ok=True)
    sources = []
    with dnnlib.atomic_output(img_path, suffix='.npy') as tmp_img, dnnlib.atomic_output(lab_path, suffix='.npy') as tmp_lab:
        images = open_npy_for_writing(tmp_img, np.uint16, (count, len(real.input_idx), *real.spatial_shape))
        maps = open_npy_for_writing(tmp_lab, np.uint8, (count, *real.spatial_shape))  # No SIGBUS on a full disk.
        unit = 'volumes' if len(real.spatial_shape) == 3 else 'images'
        with dnnlib.ProgressBar(count, desc=f'inserted fold {fold}', unit=unit, enabled=progress) as bar:
            for i in range(count):
                x, y, rec = source.sample(real, items, labels, seed, fold, i, 1)
                images[i], maps[i] = x[0], y[0]
                sources += rec
                bar.update(1)
        images.flush()
        maps.flush()
        del images, maps
    with dnnlib.atomic_output(meta_path, suffix='.json') as tmp, open(tmp, 'w') as f:
        json.dump(dict(meta, sources=sources), f, indent=1, default=str)
    return img_path, lab_path
