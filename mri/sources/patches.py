"""Native cases and patch archives: the case on its own voxel grid, and 2D / 3D patches of it around tumours and
in healthy brain tissue, for training the tumour painter (issue 18; `dataset_tool.py --kind patches`).

The painter, like GliGAN (Ferreira et al., "How we won BraTS 2023 Adult Glioma challenge? Just faking it!", 2024)
and the BraTS 2024 inpainting task, works on the scan's own voxels: a patch is cut from the RAS-canonical array
(`preprocess.to_canonical`: axis permutations and flips only) without resampling, so that what is painted can be
put back into the source file voxel for voxel. Intensities are normalised exactly as the slice and volume archives
are (`preprocess.robust_range` / `preprocess.normalize`: per case and modality over brain voxels), mapped to
[-1, 1] with background -1.

`load_native` gives a `NativeCase` (canonical images in [-1, 1], seg, brain, and the way back to the source file's
orientation and units); `crop` / `paste` cut and put back boxes around a voxel, padding outside the volume;
`crop_slice` / `paste_slice` do the same for a 2D crop in one plane, in the display orientation of the slice
archives (`preprocess._to_display`). `patch_case` is the per-case writer behind `mri.sources.convert` for
kind 'patches'.
"""

import dataclasses

import nibabel as nib
import numpy as np

from mri.sources import brats, preprocess

_RAS = np.array([[0, 1], [1, 1], [2, 1]])  # nibabel orientation of a canonical array: axis k is world axis k, +


# ---------------------------------------------------------------------------------------------------------------
# Native cases


@dataclasses.dataclass
class NativeCase:
    """A case on its own voxel grid, RAS-canonical, normalised to [-1, 1] as the archives are (see `load_native`)."""
    case_id: str
    images: np.ndarray      # float32 (M, X, Y, Z) in [-1, 1], RAS-canonical, background -1
    modalities: tuple       # names, in the order of `images`
    seg: np.ndarray         # uint8 (X, Y, Z) canonical, labels 0-3 (zeros when the case has none)
    brain: np.ndarray       # bool (X, Y, Z) canonical
    ranges: dict            # modality -> (lo, hi): value = lo + (x + 1) / 2 * (hi - lo) inside the brain
    source: brats.Case      # the case as loaded: source orientation, dtype, affine, files
    affine: np.ndarray      # 4x4 voxel -> RAS mm of the canonical arrays
    has_seg: bool = True    # False when the case has no label file (seg is then all zero)

    @property
    def shape(self):
        """Spatial shape of the canonical arrays (X, Y, Z)."""
        return tuple(self.brain.shape)

    @property
    def spacing(self):
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))

    def to_source(self, array_xyz):
        """The same voxels in the source file's orientation: the inverse of `preprocess.to_canonical` (a view
        where possible). `array_xyz` is (X, Y, Z) or (..., X, Y, Z) on the canonical grid."""
        array_xyz = np.asarray(array_xyz)
        assert array_xyz.shape[-3:] == self.shape, (array_xyz.shape, self.shape)
        ornt = nib.orientations.io_orientation(self.source.affine)
        if np.array_equal(ornt, _RAS):
            return array_xyz
        back = nib.orientations.ornt_transform(_RAS, ornt)  # canonical -> source axes and flips
        lead = array_xyz.ndim - 3
        # apply_orientation works on the first three axes: leading (channel) axes go to the back and return after
        moved = np.moveaxis(array_xyz, tuple(range(lead)), tuple(range(3, 3 + lead)))
        out = nib.orientations.apply_orientation(moved, back)
        return np.moveaxis(out, tuple(range(3, 3 + lead)), tuple(range(lead)))

    def denormalise(self, m_index, x):
        """Source intensity units (float64) of values `x` in [-1, 1] of modality `self.modalities[m_index]`: the
        inverse of the normalisation inside the brain (values that were clipped to [lo, hi] come back as lo / hi)."""
        lo, hi = self.ranges[self.modalities[m_index]]
        return lo + (np.asarray(x, np.float64) + 1) / 2 * (hi - lo)


def load_native(
    case_files,                     # brats.CaseFiles, or a brats.Case already loaded
    modalities=brats.MODALITIES,    # the image channels, in order
    normalize='percentile',         # 'percentile' or 'minmax', as dataset_tool.py --normalize
    low=0.5,                        # percentiles for normalize='percentile'
    high=99.5,
):
    """Loads a case (with its labels when it has a label file) onto its canonical grid as a `NativeCase`.

    The normalisation is that of `preprocess.prepare_case` (the same functions, over the same brain voxels), so
    patches and painted cases live in the units of the archives. A case whose brain (nonzero in any modality) is
    empty, or a modality without brain voxels or constant there, raises BratsError naming the file."""
    if isinstance(case_files, brats.Case):
        case = case_files
    else:
        case = brats.load_case(case_files, load_seg=case_files.seg is not None)
    files = case.files
    raw_brain = preprocess.brain_mask(case.images)
    if not raw_brain.any():
        first = files.files.get(modalities[0]) or files.case_id
        raise brats.BratsError(first, f'the brain of case {case.case_id} is empty (every modality is 0 everywhere)',
                               case.case_id)
    arrays = {m: case.images[m] for m in modalities}
    arrays['__brain__'] = raw_brain
    if case.seg is not None:
        arrays['__seg__'] = case.seg
    arrays, affine = preprocess.to_canonical(arrays, case.affine)
    brain = np.ascontiguousarray(arrays.pop('__brain__'))
    seg = arrays.pop('__seg__', None)
    seg = np.zeros(brain.shape, np.uint8) if seg is None else np.ascontiguousarray(seg, dtype=np.uint8)
    images = np.empty((len(modalities),) + brain.shape, np.float32)
    ranges = {}
    for k, m in enumerate(modalities):
        values = case.images[m][raw_brain]  # the order of the voxels does not matter to robust_range
        if values.size == 0 or not np.any(values):
            raise brats.BratsError(files.files[m], f'{m} has no nonzero voxels inside the brain mask', case.case_id)
        lo, hi = preprocess.robust_range(values, normalize, low, high)
        if hi <= lo:
            raise brats.BratsError(files.files[m], f'{m} is constant inside the brain ({lo:g})', case.case_id)
        unit = preprocess.normalize(arrays[m], brain, lo, hi)  # [0, 1], background 0: the archives' stored value
        np.multiply(unit, np.float32(2), out=images[k])
        images[k] -= np.float32(1)
        ranges[m] = (lo, hi)
    return NativeCase(case_id=case.case_id, images=images, modalities=tuple(modalities), seg=seg, brain=brain,
                      ranges=ranges, source=case, affine=np.asarray(affine, np.float64), has_seg=case.seg is not None)


# ---------------------------------------------------------------------------------------------------------------
# Boxes around a voxel


def _box(spatial, centre, size):
    """Slices into the array and into the patch of the part of the box of `size` around `centre` that lies inside
    an array of spatial shape `spatial`. The box starts at centre - size // 2 on every axis."""
    if not len(spatial) == len(centre) == len(size):
        raise ValueError(f'crop/paste: centre {tuple(centre)} and size {tuple(size)} must have one entry per '
                         f'spatial axis of {tuple(spatial)}')
    src, dst = [], []
    for n, c, s in zip(spatial, centre, size):
        start = int(c) - int(s) // 2
        a, b = max(start, 0), min(start + int(s), n)
        if b <= a:  # the box misses the array on this axis: nothing to copy
            a = b = 0
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start) if b > a else slice(0, 0))
    return tuple(src), tuple(dst)


def crop(array, centre, size, fill):
    """The box of `size` (one entry per spatial axis) around `centre` of `array` (..., X, Y, Z) or (..., X, Y): a new
    array (..., *size) of the array's dtype, `fill` where the box reaches past the array. The box runs from
    centre - size // 2 to centre - size // 2 + size on each axis (the centre voxel is at index size // 2)."""
    array = np.asarray(array)
    n = len(size)
    src, dst = _box(array.shape[array.ndim - n:], centre, size)
    out = np.full(array.shape[:array.ndim - n] + tuple(int(s) for s in size), fill, dtype=array.dtype)
    out[(Ellipsis,) + dst] = array[(Ellipsis,) + src]
    return out


def paste(array, patch, centre, where=None):
    """Writes the voxels of `patch` (..., *size) where `where` (the patch's spatial shape, bool; None = all) is True
    into `array` around `centre` (the box of `crop`), in place; the part of the box outside the array is dropped.
    Leading axes of `patch` and `where` broadcast against those of `array`. Returns `array`."""
    patch = np.asarray(patch)
    n = len(centre)
    size = patch.shape[patch.ndim - n:]
    src, dst = _box(array.shape[array.ndim - n:], centre, size)
    target = array[(Ellipsis,) + src]  # a view: copyto writes into `array`
    mask = True if where is None else np.asarray(where, bool)[(Ellipsis,) + dst]
    np.copyto(target, patch[(Ellipsis,) + dst], where=mask, casting='unsafe')  # as array[...] = patch would
    return array


# ---------------------------------------------------------------------------------------------------------------
# 2D crops in one plane, in the slice archives' display orientation


def _slice_box(plane, size_hw):
    """The 3D box (one voxel thick along the plane's axis) that a (H, W) display crop of `plane` covers: columns run
    along the first in-plane RAS axis, rows along the second (preprocess._to_display)."""
    h, w = (int(s) for s in size_hw)
    axis = preprocess.PLANE_AXIS[plane]
    inplane = [a for a in range(3) if a != axis]
    box = [1, 1, 1]
    box[inplane[0]], box[inplane[1]] = w, h
    return axis, tuple(box)


def to_display(a, plane):
    """(..., A, B) in-plane arrays (RAS order) -> (..., H, W) display order, as `preprocess._to_display` orients
    the slices of the archives: axial / coronal rows = B reversed, columns = A; sagittal also reverses A."""
    a = a[..., :, ::-1] if plane in ('axial', 'coronal') else a[..., ::-1, ::-1]
    return np.swapaxes(a, -1, -2)


def from_display(a, plane):
    """The inverse of `to_display`: (..., H, W) -> (..., A, B)."""
    a = np.swapaxes(a, -1, -2)
    return a[..., :, ::-1] if plane in ('axial', 'coronal') else a[..., ::-1, ::-1]


def crop_slice(array, centre, size_hw, plane, fill):
    """A 2D crop (..., H, W) of `array` (..., X, Y, Z) in the slice of `plane` through `centre`, around it, in the
    display orientation of the slice archives; `fill` outside the volume."""
    axis, box = _slice_box(plane, size_hw)
    sub = crop(array, centre, box, fill)
    return to_display(np.squeeze(sub, axis=sub.ndim - 3 + axis), plane)


def paste_slice(array, patch_hw, centre, plane, where=None):
    """Puts a display-oriented 2D crop (..., H, W) of `crop_slice` back into `array` (..., X, Y, Z) in place where
    `where` ((H, W) bool, None = all) is True. Returns `array`."""
    patch_hw = np.asarray(patch_hw)
    axis, _ = _slice_box(plane, patch_hw.shape[-2:])
    patch = np.expand_dims(from_display(patch_hw, plane), patch_hw.ndim - 2 + axis)
    if where is not None:
        where = np.expand_dims(from_display(np.asarray(where, bool), plane), axis)
    return paste(array, patch, centre, where)


# ---------------------------------------------------------------------------------------------------------------
# Patch archives (dataset_tool.py --kind patches)

PATCH_TYPES = ('tumour', 'healthy')
MIN_HEALTHY_BRAIN = 0.5  # a healthy patch is at least half brain: the painter moves a tumour shape into its tissue
EXTRA_CHANNELS = ('brain',)  # stored after the modalities, before the label map


def check_options(opts):
    """The problem with the patch options of a mri.sources.convert.ConvertOptions (kind 'patches'), or None. The
    labels are implied: `opts.with_seg` is set."""
    size = tuple(opts.patch_size)
    if len(size) not in (2, 3) or any(int(s) != s or s < 4 for s in size):
        return f'--patch-size must be 2 (2D crops) or 3 (3D patches) sides >= 4, got {",".join(map(str, size))}'
    if opts.patches_per_case < 0 or (opts.healthy_per_case is not None and opts.healthy_per_case < 0):
        return '--patches-per-case and --healthy-per-case must be >= 0'
    if opts.patches_per_case == 0 and opts.healthy_per_case == 0:
        return '--patches-per-case 0 and --healthy-per-case 0 leave nothing to write'
    if 'modality' in opts.labels:
        return ('--labels modality does not apply to --kind patches: every patch holds all its modalities as '
                'channels (the painter paints them together)')
    if opts.denoise:
        # the painter fills tissue into the scan's own voxels, noise included: it must learn them as they are
        return '--denoise does not apply to --kind patches: patches keep the scan\'s own voxels'
    opts.with_seg = True
    return None


def channel_names(modalities):
    """What a loader sees of a patch archive: the modalities, the brain mask, the three one-hot label channels."""
    from mri.seg import SEG_CHANNELS
    return list(modalities) + list(EXTRA_CHANNELS) + list(SEG_CHANNELS)


def _case_rng(seed, case_id):
    """Per-case generator from (seed, case id): the same patches whatever the worker count or case order."""
    import zlib
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(case_id.encode())])


def tumour_centres(
    tumour,                 # bool (X, Y, Z): the case's tumour (any label)
    count,                  # number of centres
    box,                    # the patch's 3D box (a 2D crop: one voxel thick along its plane's axis)
    rng,                    # numpy Generator
):
    """Centres of tumour patches: each on a voxel of a connected tumour component (chosen in proportion to its
    size), near the middle of the component: the component's box centre, jittered by up to a quarter of the patch
    (along a 2D crop's slice axis: anywhere within the component), snapped to the nearest voxel of the component.
    So a patch holds its tumour and some of the tissue around it, the region the painter learns to fill."""
    from scipy import ndimage
    if count <= 0 or not tumour.any():
        return []
    comps, num = ndimage.label(tumour, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comps.ravel(), minlength=num + 1)[1:].astype(np.float64)
    boxes = ndimage.find_objects(comps)
    voxels = {}
    out = []
    for k in rng.choice(num, size=count, p=sizes / sizes.sum()):
        b = boxes[k]
        lo = np.array([s.start for s in b], np.float64)
        hi = np.array([s.stop - 1 for s in b], np.float64)
        half = np.where(np.array(box) > 1, np.array(box) / 4, (hi - lo) / 2)
        target = (lo + hi) / 2 + rng.uniform(-1, 1, size=3) * half
        if k not in voxels:
            voxels[k] = np.argwhere(comps[b] == k + 1) + lo.astype(np.int64)
        v = voxels[k]
        out.append(tuple(int(i) for i in v[np.argmin(((v - target) ** 2).sum(axis=1))]))
    return out


def healthy_centres(
    tumour,                 # bool (X, Y, Z)
    brain,                  # bool (X, Y, Z)
    count,                  # number of centres wanted
    box,                    # the patch's 3D box
    rng,                    # numpy Generator
    min_brain=MIN_HEALTHY_BRAIN,  # fraction of the box that must be brain (outside the volume counts as none)
):
    """Centres of healthy patches: brain voxels whose box holds no tumour voxel and at least `min_brain` brain,
    drawn uniformly without repeats; fewer than `count` when the case has fewer such voxels."""
    from scipy import ndimage
    if count <= 0:
        return []
    # Box filters with the patch's size and scipy's default origin cover [c - s // 2, c - s // 2 + s): the box of
    # `crop`; both are separable, so a whole BraTS volume costs a few passes.
    near_tumour = ndimage.maximum_filter(tumour.view(np.uint8), size=box, mode='constant', cval=0)
    fraction = ndimage.uniform_filter(brain.astype(np.float32), size=box, mode='constant', cval=0.0)
    ok = brain & (near_tumour == 0) & (fraction >= min_brain - 1e-6)
    flat = np.flatnonzero(ok)
    if flat.size == 0:
        return []
    picks = np.sort(rng.choice(flat.size, size=min(count, flat.size), replace=False))
    return [tuple(int(i) for i in np.unravel_index(flat[p], ok.shape)) for p in picks]


def patch_case(
    case,                   # brats.Case with its labels (load_seg=True)
    opts,                   # mri.sources.convert.ConvertOptions with kind 'patches' (check_options passed)
    base,                   # {group: value} of the case's label groups other than plane and tumour (cohort, CSV)
):
    """The patches of one case, as mri.sources.convert.convert_case returns a case: 'entries', 'labels', 'counts',
    'ranges', plus 'patches' {relpath: {case, centre, type[, plane]}} and 'spacing' (mm, canonical axes).

    Per case (and per plane for 2D crops), `patches_per_case` patches centred on the tumour (`tumour_centres`) and
    `healthy_per_case` in tumour-free brain (`healthy_centres`), from a generator seeded by (seed, case id). Stored
    as `[modalities..., brain, labels]` quantised to the bit depth: images round((x + 1) / 2 * vmax), brain 0 / vmax,
    the label map 0-3; outside the volume image -1 (stored 0), brain 0, labels 0."""
    from mri.sources.convert import TUMOUR_VALUES, _npy_entry  # here, not at the top: convert imports this module
    native = load_native(case, opts.modalities, opts.normalize, opts.low, opts.high)
    cid = native.case_id
    vmax = (1 << opts.bit_depth) - 1
    dtype = np.uint8 if opts.bit_depth == 8 else np.uint16
    tumour = native.seg > 0
    n_tumour = opts.patches_per_case
    n_healthy = n_tumour if opts.healthy_per_case is None else opts.healthy_per_case
    rng = _case_rng(opts.seed, cid)
    two_d = len(opts.patch_size) == 2
    planes = opts.planes if two_d else (None,)
    result = {'case_id': cid, 'entries': [], 'labels': [], 'affines': {}, 'counts': {}, 'skipped_slices': {},
              'ranges': {m: list(r) for m, r in native.ranges.items()}, 'patches': {},
              'spacing': list(native.spacing)}
    counts = result['counts']

    def add_count(key, n):
        counts[key] = counts.get(key, 0) + n
    if not tumour.any():
        add_count('cases without tumour (healthy patches only)', 1)
    for plane in planes:
        if two_d:
            _, box = _slice_box(plane, opts.patch_size)
        else:
            box = tuple(int(s) for s in opts.patch_size)
        centres = [('tumour', c) for c in tumour_centres(tumour, n_tumour, box, rng)]
        healthy = healthy_centres(tumour, native.brain, n_healthy, box, rng)
        centres += [('healthy', c) for c in healthy]
        prefix = f'{plane} ' if two_d else ''
        add_count(f'{prefix}tumour patches', sum(t == 'tumour' for t, _ in centres))
        add_count(f'{prefix}healthy patches', len(healthy))
        if len(healthy) < n_healthy:
            add_count(f'{prefix}healthy patches not found (too little tumour-free brain)', n_healthy - len(healthy))
        number = {t: 0 for t in PATCH_TYPES}
        for kind, centre in centres:
            if two_d:
                images = crop_slice(native.images, centre, opts.patch_size, plane, fill=-1.0)
                brain = crop_slice(native.brain, centre, opts.patch_size, plane, fill=False)
                seg = crop_slice(native.seg, centre, opts.patch_size, plane, fill=0)
            else:
                images = crop(native.images, centre, box, fill=-1.0)
                brain = crop(native.brain, centre, box, fill=False)
                seg = crop(native.seg, centre, box, fill=0)
            unit = (images + np.float32(1)) * np.float32(0.5)  # the archives' stored value, [0, 1]
            stack = np.concatenate([preprocess.quantize(unit, vmax, dtype), (brain * vmax).astype(dtype)[None],
                                    seg.astype(dtype)[None]])
            relpath = f'{cid}/{plane}-{kind}-{number[kind]:03d}.npy' if two_d else f'{cid}/{kind}-{number[kind]:03d}.npy'
            number[kind] += 1
            assign = dict(base, **({'plane': plane} if two_d else {}))
            if 'tumour' in opts.labels:
                assign['tumour'] = TUMOUR_VALUES[0] if seg.any() else TUMOUR_VALUES[1]
            result['entries'].append((relpath, *_npy_entry(stack, opts)))
            result['labels'].append((relpath, assign))
            result['patches'][relpath] = dict(case=cid, centre=list(centre), type=kind,
                                              **({'plane': plane} if two_d else {}))
    return result


def archive_meta(opts, patch_records, spacings):
    """The dataset.json keys of a patch archive that the other kinds lack or set otherwise, and warnings:
    ({channels, kind, patch_size, spacing, patches, resolution, case_spacing}, [str])."""
    cases = sorted(spacings)
    values = np.array([spacings[c] for c in cases], np.float64)
    spacing = [float(v) for v in np.median(values, axis=0)]
    warnings = []
    if not np.allclose(values, values[0], rtol=0, atol=1e-3):
        odd = [c for c, v in zip(cases, values) if not np.allclose(v, spacing, rtol=0, atol=1e-3)]
        warnings.append(f'voxel sizes differ between cases (patches are not resampled): "spacing" records the median '
                        f'{"x".join(f"{s:g}" for s in spacing)} mm, "case_spacing" each case; {len(odd)} differ, '
                        f'e.g. {odd[0]}')
    meta = {
        'channels': channel_names(opts.modalities),
        'kind': 'patches',
        'patch_size': [int(s) for s in opts.patch_size],
        'spacing': spacing,
        'case_spacing': {c: list(map(float, v)) for c, v in zip(cases, values)},
        'patches': patch_records,
        'resolution': int(max(opts.patch_size)),
    }
    return meta, warnings
