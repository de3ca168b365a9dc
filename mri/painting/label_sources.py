"""Where the label maps of new tumours come from (`generate.py --labels-from SOURCE`).

A label source hands out shapes: tumour label maps (BraTS values 1 NETC, 2 SNFH, 3 ET; 0 elsewhere) cropped to the
tumour, in RAS-canonical voxel order, with their voxel size in mm when it is known (the placement rescales them to
the case's voxels, mri.painting.place.transform_shape). The sources, told apart by what SOURCE is:

- a folder of BraTS cases: each case's tumour (the largest connected part of the whole tumour);
- an archive of this project (zip or folder with dataset.json) that holds tumour labels: the tumour patches of a
  patch archive, or the volumes or slices of an archive converted with --with-seg;
- a joint image+label snapshot of this project (a `.pt`, or a run dir): the decoded seg_* channels of a sample
  generated from a random seed (the seed is recorded);
- a NIfTI label map drawn by a person (values 0-3): one shape, or with `as_drawn` painted where it was drawn, which
  needs the file on the case's own grid.

A slice painter (2D) gets 2D shapes as slabs one voxel thick along the axis of its plane: a slice through a 3D
tumour, or a 2D map as it is. A volume painter cannot use 2D maps. Every bad input is a `LabelSourceError`, one
line naming the file.
"""

import io
import os
import zipfile

import nibabel as nib
import numpy as np
from scipy import ndimage

from mri.sources import archive, brats, preprocess

SNAPSHOT_SUFFIXES = ('.pt', '.pkl')


class LabelSourceError(ValueError):
    """A label source that cannot give label maps as asked; one line naming the file."""


class Shape:
    """One label map handed out by a source."""

    def __init__(self, labels, spacing=None, origin=None, plane=None):
        self.labels = np.asarray(labels, np.uint8)      # (X, Y, Z) RAS order, cropped to the tumour
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)  # mm per voxel, or None
        self.origin = dict(origin or {})                # JSON: where it came from
        self.plane = plane                              # 2D: the plane of the slab


def largest_component(labels):
    """The labels of the largest connected part (26-connected in 3D) of the whole tumour (labels > 0), cropped to
    it; None when there is no tumour. Satellite specks would only stretch the box the painter has to cover."""
    labels = np.asarray(labels)
    whole = labels > 0
    if not whole.any():
        return None
    comp, n = ndimage.label(whole, structure=np.ones((3,) * labels.ndim))
    if n > 1:
        keep = 1 + int(np.argmax(np.bincount(comp.ravel())[1:]))
        labels = np.where(comp == keep, labels, 0)
    nz = np.nonzero(labels)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
    return np.ascontiguousarray(labels[box]).astype(np.uint8)


def display_to_ras(image, plane):
    """(H, W) display order of a slice of `plane` (the slice archives') -> its (A, B) RAS order."""
    from mri.sources.patches import from_display
    return np.ascontiguousarray(from_display(np.asarray(image), plane))


def as_slab(labels2d_ras, plane):
    """A 2D map in RAS order of its plane -> (X, Y, Z) with one voxel along the plane's axis."""
    return np.expand_dims(labels2d_ras, preprocess.PLANE_AXIS[plane])


def slab_of(labels3d, plane, rng):
    """A slice of a 3D tumour for a 2D painter: a random slice of `plane` among those whose tumour area is at least
    half the largest (the tips of a tumour are specks), as a slab one voxel thick, cropped to the tumour."""
    axis = preprocess.PLANE_AXIS[plane]
    other = tuple(a for a in range(3) if a != axis)
    area = np.count_nonzero(labels3d, axis=other)
    good = np.flatnonzero(area >= 0.5 * area.max())
    k = int(rng.choice(good))
    return largest_component(np.take(labels3d, [k], axis=axis))


def voxel_sizes(affine):
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0))


def canonical(labels, affine):
    """(labels, affine) reoriented to RAS (axis permutations and flips, as the cases are)."""
    arrays, affine = preprocess.to_canonical({'seg': labels}, np.asarray(affine, np.float64))
    return np.ascontiguousarray(arrays['seg']), affine


class LabelSource:
    """Base: `draw(rng, plane)` returns a Shape for a painter of `ndim` dimensions (2: a slab in `plane`)."""

    kind = 'labels'
    max_draws = 20          # tries before a source that keeps giving empty maps (a joint snapshot) is given up

    def __init__(self, path, ndim):
        self.path, self.ndim = str(path), int(ndim)

    def describe(self) -> dict:
        return {'kind': self.kind, 'path': self.path}

    def _maps(self):
        """How many maps the source holds (None = unbounded)."""
        return None

    def _load(self, index, rng):
        """(labels 3D (X, Y, Z) or 2D (A, B) RAS, spacing or None, origin dict, plane of a 2D map or None)."""
        raise NotImplementedError

    def draw(self, rng, plane=None) -> Shape:
        n = self._maps()
        for _ in range(self.max_draws):
            labels, spacing, origin, src_plane = self._load(None if n is None else int(rng.integers(n)), rng)
            if labels.ndim == 2:  # a 2D map (slices, 2D patches) as a slab in the painter's plane
                labels = largest_component(labels)
                if labels is None:
                    continue
                if spacing is not None and len(spacing) == 2:
                    spacing = tuple(np.insert(np.asarray(spacing, float), preprocess.PLANE_AXIS[plane], 1.0))
                return Shape(as_slab(labels, plane), spacing, origin, plane)
            if self.ndim == 2:
                labels = largest_component(labels)
                shape = slab_of(labels, plane, rng) if labels is not None else None
                if shape is None:
                    continue
                return Shape(shape, spacing, dict(origin, plane=plane), plane)
            labels = largest_component(labels)
            if labels is not None:
                return Shape(labels, spacing, origin)
        raise LabelSourceError(f'{self.path}: no tumour in {self.max_draws} label maps drawn from it')


class CaseFolderSource(LabelSource):
    """The tumours of a folder of BraTS cases (their seg files; cases without one are passed over)."""

    kind = 'brats_cases'

    def __init__(self, path, ndim):
        super().__init__(path, ndim)
        try:
            cases = brats.discover_cases(path)
        except brats.BratsError as err:
            raise LabelSourceError(str(err)) from None
        self.cases = [c for c in cases if c.seg is not None]
        if not self.cases:
            raise LabelSourceError(f'{path}: none of its {len(cases)} BraTS cases has a label (seg) file')
        self._cache = {}

    def _maps(self):
        return len(self.cases)

    def _load(self, index, rng):
        cf = self.cases[index]
        if index not in self._cache:
            try:
                data, affine = brats._read(cf.seg, cf.case_id)
                labels = brats.labels_to_canonical(data, cf.naming, cf.seg, cf.case_id)
            except brats.BratsError as err:
                raise LabelSourceError(str(err)) from None
            labels, affine = canonical(labels, affine)
            self._cache[index] = (largest_component(labels), voxel_sizes(affine))
        labels, spacing = self._cache[index]
        if labels is None:
            return np.zeros((1, 1, 1), np.uint8), spacing, {}, None
        return labels, spacing, {'source': 'brats_cases', 'case': cf.case_id, 'file': str(cf.seg)}, None


def read_archive_meta(path):
    """dataset.json of a zip or folder archive (mri.sources.archive.read_dataset_json), or None when `path` is
    neither; LabelSourceError when it cannot be read."""
    try:
        return archive.read_dataset_json(path)
    except archive.ArchiveReadError as err:
        raise LabelSourceError(str(err)) from None


class ArchiveSource(LabelSource):
    """Tumour label maps stored in an archive of this project: patches (the tumour patches), volumes or slices
    converted with --with-seg (those with a tumour in them, which are found as they are drawn)."""

    kind = 'archive'

    def __init__(self, path, ndim, meta):
        super().__init__(path, ndim)
        self.meta = meta
        channels = list(meta.get('channels') or [])
        self.seg_idx = [i for i, c in enumerate(channels) if str(c).startswith('seg_')]
        if not self.seg_idx:
            raise LabelSourceError(f'{path}: the archive holds no tumour labels (no seg_* channels; convert with '
                                   f'dataset_tool.py --with-seg, or --kind patches)')
        self.labelmap = meta.get('seg_storage') == 'labelmap'
        kind = meta.get('kind')
        files = [e[0] for e in meta.get('labels') or []]
        patches = meta.get('patches') or {}
        if kind == 'patches':
            files = [f for f in (files or sorted(patches)) if patches.get(f, {}).get('type', 'tumour') == 'tumour']
        self.files = [f for f in files if f.endswith('.npy')]
        if not self.files:
            raise LabelSourceError(f'{path}: the archive has no .npy entries with tumour labels')
        self.kind_of = kind
        self.patches = patches
        self.map_ndim = 2 if kind == 'slices' or (kind == 'patches' and len(meta.get('patch_size') or []) == 2) else 3
        if self.map_ndim == 2 and ndim == 3:
            raise LabelSourceError(f'{path}: holds 2D label maps ({kind}); this paint snapshot paints volumes: use a '
                                   f'volume or 3D patch archive, BraTS cases, a 3D joint snapshot or a NIfTI')
        self.plane_values = next((g['values'] for g in meta.get('label_groups') or [] if g['name'] == 'plane'), None)
        self.label_of = {e[0]: e[1] for e in meta.get('labels') or []}
        self._zip = None

    def describe(self):
        return dict(super().describe(), archive_kind=self.kind_of)

    def _maps(self):
        return len(self.files)

    def _read(self, name):
        from training.dataset import read_npy_member  # the one decoder of .npy members
        try:
            if os.path.isdir(self.path):
                data = open(os.path.join(self.path, name), 'rb').read()
            else:
                if self._zip is None:
                    self._zip = zipfile.ZipFile(self.path)
                data = self._zip.read(name)
            return read_npy_member(io.BytesIO(data), len(data))  # any form of .npy member (plain, blosc2)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise LabelSourceError(f'{self.path}: entry {name} cannot be read ({err})') from None

    def _plane_of(self, name):
        plane = (self.patches.get(name) or {}).get('plane')
        if plane is None and self.plane_values and name in self.label_of:
            vec = np.asarray(self.label_of[name], float)
            plane = self.plane_values[int(np.argmax(vec[:len(self.plane_values)]))]
        return plane or 'axial'

    def _load(self, index, rng):
        from mri.seg import onehot_to_labelmap
        name = self.files[index]
        array = self._read(name)
        labels = array[-1] if self.labelmap else onehot_to_labelmap(array[[i for i in self.seg_idx]])
        labels = np.asarray(labels).astype(np.uint8)
        if labels.max(initial=0) > 3:
            raise LabelSourceError(f'{self.path}: entry {name} has label values above 3 ({int(labels.max())})')
        origin = {'source': 'archive', 'entry': name, 'case': (self.meta.get('file_cases') or {}).get(name)
                  or (self.patches.get(name) or {}).get('case')}
        if self.map_ndim == 2:
            plane = self._plane_of(name)
            return display_to_ras(labels, plane), None, dict(origin, source_plane=plane), plane
        spacing = None
        if self.kind_of == 'patches' and self.meta.get('spacing'):
            spacing = self.meta['spacing']
        elif (self.meta.get('affines') or {}).get(name):
            spacing = voxel_sizes(self.meta['affines'][name])
        return labels, spacing, origin, None


class JointSnapshotSource(LabelSource):
    """The seg_* channels of samples of a joint image+label snapshot, one random seed per map."""

    kind = 'joint_snapshot'

    def __init__(self, path, ndim, device='cpu'):
        super().__init__(path, ndim)
        import torch
        from torch_utils import snapshot
        from training.paint import is_paint_generator
        try:
            data, G = snapshot.load_generator(path, device=device)
        except snapshot.SnapshotError as err:
            raise LabelSourceError(str(err)) from None
        if is_paint_generator(G):
            raise LabelSourceError(f'{path}: is a paint snapshot; --labels-from needs a joint image+label snapshot '
                                   f'(one trained on an archive converted with --with-seg)')
        self.desc = data.dataset or {}
        channels = list(self.desc.get('channels') or [])
        self.seg_idx = [i for i, c in enumerate(channels) if str(c).startswith('seg_')]
        if len(self.seg_idx) != 3:
            raise LabelSourceError(f'{path}: is not a joint image+label snapshot (channels {",".join(channels) or "?"}: '
                                   f'no seg_netc, seg_snfh, seg_et)')
        self.G, self.device, self.torch = G, torch.device(device), torch
        self.map_ndim = len(G.img_shape) if hasattr(G, 'img_shape') else (3 if self.desc.get('kind') == 'volumes' else 2)
        if self.map_ndim == 2 and ndim == 3:
            raise LabelSourceError(f'{path}: is a 2D joint snapshot; this paint snapshot paints volumes: use a 3D '
                                   f'joint snapshot (dataset_tool.py --kind volumes --with-seg)')
        self.spacing = (self.desc.get('space') or {}).get('spacing') if self.map_ndim == 3 else None
        self.classes = self._classes()

    def _classes(self):
        """Label vectors to draw from: every class of the snapshot, those with a tumour when it has that group."""
        from training.labels import all_classes
        if not self.G.c_dim:
            return [(None, np.zeros([0], np.float32))]
        names = list(self.desc.get('label_names') or [f'class{i}' for i in range(self.G.c_dim)])[:self.G.c_dim]
        classes = all_classes(names, self.desc.get('label_groups') or None)
        with_tumour = [c for c in classes if 'tumour' in c[0].split(',')]
        return with_tumour or classes

    def describe(self):
        from dnnlib.util import sha256_file
        return dict(super().describe(), sha256=sha256_file(self.path))

    def _load(self, index, rng):
        torch = self.torch
        seed = int(rng.integers(2 ** 31 - 1))
        name, label = self.classes[int(rng.integers(len(self.classes)))]
        z = torch.from_numpy(np.random.RandomState(seed).randn(1, self.G.z_dim)).to(self.device, torch.float32)
        c = torch.from_numpy(label[None]).to(self.device)
        with torch.no_grad():
            img = self.G(z, c, truncation_psi=1, noise_mode='const')[0].float().cpu().numpy()
        from mri.seg import decode_seg
        labels = decode_seg(img[self.seg_idx]).astype(np.uint8)
        origin = {'source': 'joint_snapshot', 'seed': seed, 'class': name}
        if self.map_ndim == 2:
            plane = (name or '').split(',')[0] if (name or '').split(',')[0] in preprocess.PLANES else 'axial'
            return display_to_ras(labels, plane), None, origin, plane
        return labels, self.spacing, origin, None


class NiftiSource(LabelSource):
    """A label map drawn by a person (NIfTI, values 0-3): a shape, or painted where it was drawn (`as_drawn`)."""

    kind = 'nifti'

    def __init__(self, path, ndim):
        super().__init__(path, ndim)
        try:
            img = nib.load(self.path)
            data = np.asarray(img.dataobj)
        except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as err:
            raise LabelSourceError(f'{path}: cannot be read as NIfTI ({str(err).splitlines()[0] if str(err) else err})') from None
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise LabelSourceError(f'{path}: a label map must be a 3D image, got shape {tuple(data.shape)}')
        if data.dtype.kind not in 'biuf' or not np.all(np.isfinite(data)):
            raise LabelSourceError(f'{path}: label values must be finite numbers')
        values = np.unique(data)
        bad = [float(v) for v in values if v not in (0, 1, 2, 3)]
        if bad:
            raise LabelSourceError(f'{path}: label values must be 0-3 (1 NETC, 2 SNFH, 3 ET), found {bad[:5]}')
        if values.max() == 0:
            raise LabelSourceError(f'{path}: the label map is empty (no voxel 1-3)')
        self.grid_shape, self.affine = tuple(data.shape), np.asarray(img.affine, np.float64)
        self.labels, self.canonical_affine = canonical(data.astype(np.uint8), self.affine)
        self.spacing = voxel_sizes(self.affine)

    def _maps(self):
        return 1

    def _load(self, index, rng):
        return self.labels, self.spacing, {'source': 'nifti', 'file': self.path}, None

    def check_grid(self, case_id, shape, affine, atol=1e-3):
        """Raises LabelSourceError unless the map is on the case's grid (same shape and affine)."""
        if tuple(shape) != self.grid_shape or not np.allclose(affine, self.affine, rtol=0, atol=atol):
            diff = float(np.abs(np.asarray(affine) - self.affine).max()) if tuple(shape) == self.grid_shape else None
            what = (f'grid {"x".join(map(str, self.grid_shape))}, case {case_id} is on '
                    f'{"x".join(map(str, shape))}' if diff is None else f'affine differs from case {case_id}\'s '
                    f'by up to {diff:.3g}')
            raise LabelSourceError(f'{self.path}: not on the grid of the case it is painted into ({what}); painting '
                                   f'it where it was drawn needs a label map drawn on that case')

    def components(self):
        """[(corner (x, y, z) canonical, labels box)] of each connected part of the drawn map."""
        comp, n = ndimage.label(self.labels > 0, structure=np.ones((3, 3, 3)))
        out = []
        for k, box in enumerate(ndimage.find_objects(comp)):
            part = np.where(comp[box] == k + 1, self.labels[box], 0).astype(np.uint8)
            out.append((tuple(s.start for s in box), part))
        return out


class CaseTumourSource(LabelSource):
    """The tumour of the case itself, for --move: its whole label map, as it is (no other case's shape)."""

    kind = 'own_tumour'

    def __init__(self, case_id, seg, ndim):
        super().__init__(case_id, ndim)
        self.seg = seg

    def _maps(self):
        return 1

    def _load(self, index, rng):
        nz = np.nonzero(self.seg)
        if not nz[0].size:
            return np.zeros((1, 1, 1), np.uint8), None, {}, None
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
        return self.seg[box], None, {'source': 'own_tumour', 'case': self.path}, None


def is_snapshot_path(path):
    if os.path.isfile(path):
        return path.endswith(SNAPSHOT_SUFFIXES)
    if os.path.isdir(path):
        from training.checkpoint import latest_snapshot
        return latest_snapshot(path) is not None
    return False


def open_label_source(
    spec,                   # path: BraTS folder, archive (zip/folder), joint snapshot (.pt/.pkl/run dir), NIfTI
    ndim,                   # the painter's dimensions (2 or 3)
    device='cpu',           # where a joint snapshot runs
) -> LabelSource:
    """The label source that `spec` names (module docstring); LabelSourceError in one line otherwise."""
    path = os.path.expanduser(str(spec))
    if not os.path.exists(path):
        raise LabelSourceError(f'{path}: no such file or folder (--labels-from takes BraTS cases, an archive, a joint '
                               f'snapshot or a NIfTI label map)')
    if brats.is_nifti(path):
        return NiftiSource(path, ndim)
    if is_snapshot_path(path):
        if os.path.isdir(path):
            from training.checkpoint import latest_snapshot
            path = latest_snapshot(path)
        return JointSnapshotSource(path, ndim, device)
    meta = read_archive_meta(path) if (os.path.isdir(path) or zipfile.is_zipfile(path)) else None
    if meta is not None:
        return ArchiveSource(path, ndim, meta)
    if os.path.isdir(path):
        return CaseFolderSource(path, ndim)
    raise LabelSourceError(f'{path}: not a label source (--labels-from takes a folder of BraTS cases, an archive '
                           f'with dataset.json, a joint snapshot .pt or a NIfTI label map)')
