"""Synthetic BraTS-format brain-tumour phantoms, so that every pipeline runs with no download.

A phantom case has the four BraTS modalities (t1n, t1c, t2w, t2f) as raw-scanner-like int16 volumes and a
uint8 label map in the BraTS convention (0 background, 1 NETC necrotic core, 2 SNFH oedema, 3 ET enhancing
tumour; Menze et al., "The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI 34, 2015;
Baid et al., "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark", arXiv:2107.02314), on the 240x240x155 1 mm SRI24
grid (Rohlfing et al., "The SRI24 multichannel atlas of normal adult human brain structure", Human Brain
Mapping 31, 2010) with the LPS axis codes and header codes of the released BraTS files.

Anatomy: a skull-stripped brain (cerebrum, cerebellum and brainstem ellipsoids whose outline is perturbed by
low-frequency noise), a cortical grey-matter ribbon folded by the level sets of band-limited noise (sulci
filled with CSF), white matter, lateral and third ventricles, deep grey nuclei and the interhemispheric
fissure. A glioma with nested regions (NETC inside an irregular enhancing ring, inside finger-like oedema that
spares the cortex) pushes the deep structures aside (mass effect). Contrast follows the usual relaxation
ranks: T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR with suppressed CSF; T1c as T1 plus an enhancing ring.
Each modality gets a smooth multiplicative bias field (as corrected by N4: Tustison et al., IEEE TMI 29,
2010) and Rician noise (Gudbjartsson & Patz, "The Rician distribution of noisy MRI data", MRM 34, 1995).

Speed: every field is built on a grid of about 2 mm inside the brain's bounding box and upsampled
linearly (which also gives the partial-volume blur at tissue borders), so a full-size case takes well
under a second on one CPU core.
"""

import os
import shutil
import sys

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.ndimage

import dnnlib

REF_SHAPE = (240, 240, 155)                 # BraTS grid (voxels), SRI24 space
_FOV_MM = np.array(REF_SHAPE, np.float64)   # anatomy lives in this box; any grid shape samples all of it
MODALITIES = ('t1n', 't1c', 't2w', 't2f')
FILE_KEYS = ('t1c', 't1n', 't2f', 't2w', 'seg')  # file suffixes of a BraTS 2023 case folder
LABEL_NAMES = {0: 'background', 1: 'NETC', 2: 'SNFH', 3: 'ET'}

# Signal of each tissue in (t1n, t1c, t2w, t2f), close to the medians measured in a released BraTS case
# (BraTS-GLI-00000-000 inside the brain); a per-case gain then varies them as scanners do.
_TISSUES = ('wm', 'gm', 'deep', 'csf', 'snfh', 'netc', 'et')
_SIGNAL = np.array([
    [930, 2150, 420, 900],      # white matter
    [720, 1800, 560, 1150],     # cortical grey matter
    [820, 1950, 500, 1050],     # deep grey nuclei (thalamus, basal ganglia): between GM and WM
    [330, 800, 1900, 150],      # CSF: FLAIR suppresses it
    [780, 1900, 950, 1750],     # SNFH oedema: T1 slightly dark, T2 bright, FLAIR very bright
    [450, 1000, 1500, 1150],    # NETC necrosis: T1 dark, T2 bright, no enhancement
    [800, 4200, 700, 1400],     # ET: T1c about twice WM
], np.float32)
_TEXTURE = np.array([0.03, 0.03, 0.03, 0.02, 0.06, 0.15, 0.12], np.float32)  # relative heterogeneity

# Brain components (lat, ap, si) in reference mm (+ap anterior, +si superior); centre and semi-axes.
_COMPONENTS = (
    ((0.0, -5.0, 12.0), (67.0, 85.0, 60.0)),      # cerebrum
    ((0.0, -50.0, -31.0), (52.0, 32.0, 24.0)),    # cerebellum
    ((0.0, -18.0, -45.0), (13.0, 14.0, 30.0)),    # brainstem
)


def brats_affine(
    shape=REF_SHAPE,    # grid shape (3 ints)
    spacing=1.0,        # voxel size in mm: one float or three
):
    """The voxel-to-world matrix of released BraTS files: LPS axis codes (first two axes negated) with the
    SRI24 origin, i.e. diag(-1, -1, 1) and offset (0, 239, 0) for the 240x240x155 1 mm grid."""
    sx, sy, sz = _spacing3(spacing)
    aff = np.diag([-sx, -sy, sz, 1.0])
    aff[1, 3] = (int(shape[1]) - 1) * sy
    return aff


def _spacing3(spacing):
    s = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    if not np.all(s > 0):
        raise ValueError(f'phantom: spacing must be positive, got {spacing}')
    return tuple(float(v) for v in s)


def _ramp(x):
    """Soft membership: 0 below -0.5, 1 above +0.5, linear between (partial volume over one ramp width)."""
    x += np.float32(0.5)
    return np.clip(x, 0, 1, out=x)


def _upsample(a, factor, out_shape):
    """Linear upsampling of a cell-centred grid by an integer factor (sample c sits at fine index
    (c + 0.5) * factor - 0.5), clamped at the edges, cropped to out_shape. Separable, one axis at a time."""
    assert a.ndim == len(out_shape) and all(a.shape[i] * factor >= n for i, n in enumerate(out_shape)), (a.shape, out_shape)
    for axis, n_out in enumerate(out_shape):
        n_in = a.shape[axis]

        def sl(start=None, stop=None, step=None):
            return (slice(None),) * axis + (slice(start, stop, step),)

        if factor == 1:
            a = a[sl(0, n_out)]
        elif factor == 2:  # fine samples at coarse c -+ 1/4: weights 0.75 / 0.25, no gather, no copies
            shape = list(a.shape)
            shape[axis] = n_out
            out = np.empty(shape, np.float32)
            n_even, n_odd = (n_out + 1) // 2, n_out // 2
            quarter = np.subtract(a[sl(1)], a[sl(None, -1)])
            quarter *= np.float32(0.25)
            even, odd = out[sl(0, None, 2)], out[sl(1, None, 2)]
            even[sl(0, 1)] = a[sl(0, 1)]
            np.subtract(a[sl(1, n_even)], quarter[sl(0, n_even - 1)], out=even[sl(1)])
            m = min(n_odd, n_in - 1)
            np.add(a[sl(0, m)], quarter[sl(0, m)], out=odd[sl(0, m)])
            if n_odd > m:
                odd[sl(m)] = a[sl(m)]
            a = out
        else:
            pos = np.clip((np.arange(n_out) + 0.5) / factor - 0.5, 0, n_in - 1)
            i0 = np.minimum(pos.astype(np.int64), n_in - 1)
            i1 = np.minimum(i0 + 1, n_in - 1)
            w = (pos - i0).astype(np.float32).reshape((-1,) + (1,) * (a.ndim - axis - 1))
            lo = a.take(i0, axis=axis)
            a = lo + w * (a.take(i1, axis=axis) - lo)
    return np.ascontiguousarray(a)


def _parallel(fn, items, threads):
    """Maps fn over items on a few threads (numpy releases the GIL in its array loops)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


def _smooth_noise(rng, shape, vox_mm, corr_mm):
    """Gaussian random field with unit variance and correlation length about corr_mm, on a grid of vox_mm.
    Long correlations are drawn on a sparser grid and upsampled, so the cost follows the detail, not the size."""
    sub = max(1, int(corr_mm / (2.0 * vox_mm)))
    low_shape = tuple(-(-n // sub) + 1 for n in shape)
    z = scipy.ndimage.gaussian_filter(rng.standard_normal(low_shape, dtype=np.float32),
                                      corr_mm / (vox_mm * sub), mode='wrap')
    z /= max(float(z.std()), 1e-6)
    return _upsample(z, sub, shape) if sub > 1 else z[tuple(slice(0, n) for n in shape)]


class _Grid:
    """A sub-box [lo, hi) of the output grid and its coarse companion (factor f), with the reference-mm
    anatomical coordinates (lat, ap, si) of the coarse samples as broadcastable 1-D arrays."""

    def __init__(self, shape, lo, hi, factor):
        self.lo, self.hi, self.f = tuple(lo), tuple(hi), factor
        self.fine_shape = tuple(h - l for l, h in zip(lo, hi))
        self.shape = tuple(-(-n // factor) for n in self.fine_shape)
        self.vox_mm = float(np.max(_FOV_MM / np.array(shape)) * factor)
        coords = []
        for axis in range(3):
            fine = lo[axis] + (np.arange(self.shape[axis]) + 0.5) * factor - 0.5
            mm = ((fine + 0.5) / shape[axis] - 0.5) * _FOV_MM[axis]
            mm = -mm if axis == 1 else mm  # array axis 1 points posterior (LPS); +ap is anterior
            coords.append(mm.astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)]))
        self.lat, self.ap, self.si = coords

    def fine_slices(self):
        return tuple(slice(l, h) for l, h in zip(self.lo, self.hi))

    def sub(self, c_lo, c_hi):
        """The sub-grid of coarse samples [c_lo, c_hi), aligned to whole coarse cells of this grid."""
        g = _Grid.__new__(_Grid)
        g.f, g.vox_mm = self.f, self.vox_mm
        g.lo = tuple(l + c * self.f for l, c in zip(self.lo, c_lo))
        g.hi = tuple(min(h, l + c * self.f) for h, l, c in zip(self.hi, self.lo, c_hi))
        g.fine_shape = tuple(h - l for l, h in zip(g.lo, g.hi))
        g.shape = tuple(b - a for a, b in zip(c_lo, c_hi))
        g.lat, g.ap, g.si = (v[tuple(slice(a, b) if v.shape[i] > 1 else slice(None) for i in range(3))]
                             for v, a, b in zip((self.lat, self.ap, self.si), c_lo, c_hi))
        g.c_slices = tuple(slice(a, b) for a, b in zip(c_lo, c_hi))
        return g

    def coarse_range(self, centre, half):
        """Coarse index range [lo, hi) covering centre +- half (reference mm, (lat, ap, si))."""
        c_lo, c_hi = [], []
        for v, c, h in zip((self.lat.ravel(), self.ap.ravel(), self.si.ravel()), centre, half):
            idx = np.nonzero(np.abs(v - c) <= h)[0]
            if idx.size == 0:
                idx = np.array([int(np.argmin(np.abs(v - c)))])
            c_lo.append(int(idx.min()))
            c_hi.append(int(idx.max()) + 1)
        return c_lo, c_hi


def _ellipsoid_frac(dl, da, ds, semi, w):
    """Soft inside-fraction of an axis-aligned ellipsoid, given offsets from its centre (mm)."""
    q = np.sqrt((dl / semi[0]) ** 2 + (da / semi[1]) ** 2 + (ds / semi[2]) ** 2)
    return _ramp((1.0 - q) * np.float32(min(semi) / w))


def _place_tumour(rng, comps):
    """Random glioma centre (one hemisphere, deep enough in the cerebrum for its core) and radii (mm)."""
    (cl, ca, cs), (sl, sa, ss) = comps[0]
    side = rng.choice([-1.0, 1.0])
    for attempt in range(200):
        radius = rng.uniform(12.0, 24.0) * (0.97 ** attempt)
        pos = np.array([side * rng.uniform(radius + 3.0, 52.0), rng.uniform(-55.0, 45.0), rng.uniform(-10.0, 42.0)])
        off = pos - np.array([cl, ca, cs])
        q = np.sqrt(np.sum((off / np.array([sl, sa, ss])) ** 2))
        depth = (1.0 - q) * np.linalg.norm(off) / max(q, 1e-3)
        if depth > radius + 8.0:
            break
    return dict(side=side, centre=pos, radius=radius, oedema=radius + rng.uniform(6.0, 20.0),
                necrosis=rng.uniform(0.45, 0.7), stretch=rng.uniform(0.8, 1.25, size=3),
                mass_effect=rng.uniform(0.15, 0.45))


def make_phantom_case(
    seed,                   # int: the whole case follows from np.random.default_rng(seed)
    shape=REF_SHAPE,        # output grid; the anatomy always fills the same field of view (240x240x155 mm)
    spacing=1.0,            # voxel size written into the affine (mm), one float or three
    return_tissue=False,    # also return 'tissue': uint8 0 outside, 1 CSF, 2 GM (incl. deep), 3 WM
    threads=2,              # threads for the full-resolution stage; the result does not depend on it
):
    """Returns {'t1n','t1c','t2w','t2f': int16 (shape), 'seg': uint8 (shape), 'affine': 4x4 float64}.
    Background is exactly 0 in every modality and the brain is >= 1 in all of them (one shared mask); seg is
    0 outside that mask. The anatomy is laid out in the 240x240x155 mm field of view of BraTS whatever the
    shape, so a small shape is a whole, coarser brain; `spacing` only sets the affine. Same seed (and shape)
    gives identical arrays."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f'phantom: shape must be three sizes >= 16, got {shape}')
    rng = np.random.default_rng(seed)
    fine_mm = float(np.max(_FOV_MM / np.array(shape)))
    factor = max(1, int(round(2.0 / fine_mm)))  # build at ~2 mm, upsample linearly

    # Per-case anatomy: global size, per-axis stretch, ventricle size (atrophy), tumour.
    scale = rng.uniform(0.92, 1.05) * rng.uniform(0.96, 1.04, size=3)
    comps = [(c, tuple(np.array(s) * scale)) for c, s in _COMPONENTS]
    vent_scale = rng.uniform(0.8, 1.5)
    tum = _place_tumour(rng, comps)

    # Box of the output grid that holds the brain, with room for the outline noise.
    lo, hi = [], []
    for axis in range(3):
        ext = [(c[axis] - 1.12 * s[axis] - 3.0, c[axis] + 1.12 * s[axis] + 3.0) for c, s in comps]
        mm_lo, mm_hi = min(e[0] for e in ext), max(e[1] for e in ext)
        if axis == 1:
            mm_lo, mm_hi = -mm_hi, -mm_lo
        idx = (np.array([mm_lo, mm_hi]) / _FOV_MM[axis] + 0.5) * shape[axis] - 0.5
        lo.append(max(0, int(np.floor(idx[0])) - 1))
        hi.append(min(shape[axis], int(np.ceil(idx[1])) + 2))
    g = _Grid(shape, lo, hi, factor)
    w = np.float32(max(0.75 * g.vox_mm, 1.0))  # partial-volume ramp width (mm)
    lat, ap, si = g.lat, g.ap, g.si

    # Brain outline: union of perturbed ellipsoids; depth = distance below the surface along the ray (mm).
    bump = _smooth_noise(rng, g.shape, g.vox_mm, 25.0) * np.float32(0.035)
    depth = None
    for (cl, ca, cs), (sl, sa, ss) in comps:
        dl, da, ds = lat - np.float32(cl), ap - np.float32(ca), si - np.float32(cs)
        taper = np.float32(1.0) - np.float32(0.06) * da / np.float32(sa)  # frontal poles narrower
        q = np.sqrt((dl / np.float32(sl)) ** 2 / taper ** 2 + (da / np.float32(sa)) ** 2 + (ds / np.float32(ss)) ** 2)
        rho = np.sqrt(dl ** 2 + da ** 2 + ds ** 2)
        d = rho / np.maximum(q, np.float32(1e-3)) * (np.float32(1.0) - q * (np.float32(1.0) - bump))
        if depth is None:
            depth, cerebrum = d, (dl, da, ds, q)
        else:
            depth = np.maximum(depth, d)
    del bump

    # Cortex folded along the level sets of band-limited noise: sulci are CSF sheets lined with GM. The noise
    # is read at points pushed out along the ray towards the cerebral surface, so that the sheets run mostly
    # radially, from the surface inwards, as real sulci do.
    dl, da, ds, q = cerebrum
    push = np.float32(0.5) + np.float32(0.5) / np.clip(q, np.float32(0.4), np.float32(1.5))
    (cl, ca, cs), (sl, sa, ss) = comps[0]
    half = np.array([sl, sa, ss]) * 1.25 + 2 * g.vox_mm
    fold_grid = tuple(int(np.ceil(2 * h / g.vox_mm)) + 1 for h in half)
    fold_vol = scipy.ndimage.gaussian_filter(rng.standard_normal(fold_grid, dtype=np.float32),
                                             4.0 / g.vox_mm, mode='wrap')
    fold_vol /= np.float32(max(float(fold_vol.std()), 1e-6))
    where = [np.broadcast_to((d * push + np.float32(h)) / np.float32(g.vox_mm), q.shape) for d, h in zip((dl, da, ds), half)]
    fold = np.abs(scipy.ndimage.map_coordinates(fold_vol, where, order=1, mode='nearest'))
    del where, push, fold_vol, cerebrum, dl, da, ds, q
    sulcus_noise = _smooth_noise(rng, g.shape, g.vox_mm, 15.0)
    sulcus_depth = np.float32(16.0) + np.float32(5.0) * sulcus_noise
    wn = np.float32(0.3) * w  # ramp width in noise units (|grad| of the unit field is about 0.3 / mm)
    in_sulcus = _ramp((sulcus_depth - depth) / w)
    outer = np.float32(0.6) + np.float32(0.5) * sulcus_noise  # patchy CSF film at the surface
    csf = np.maximum(_ramp((outer - depth) / w), _ramp((0.2 - fold) / wn) * in_sulcus)
    gm_all = np.maximum(_ramp((3.0 - depth) / w),
                        _ramp((1.2 - fold) / wn) * _ramp((sulcus_depth + 3.0 - depth) / w))
    del fold, in_sulcus, sulcus_depth, sulcus_noise, outer
    # Interhemispheric fissure down to the arch of the corpus callosum (falx gap), lined with medial cortex.
    floor = np.maximum(np.float32(-20.0), np.float32(22.0) - np.float32(0.013) * (ap + np.float32(5.0)) ** 2)
    above = _ramp((si - floor) / w)
    csf = np.maximum(csf, _ramp((1.0 - np.abs(lat)) / w) * above)
    gm_all = np.maximum(gm_all, _ramp((4.0 - np.abs(lat)) / w) * above)
    gm_all = np.maximum(gm_all, csf)
    deep = np.zeros(g.shape, np.float32)

    # Deep structures in a central box, sampled through the tumour's mass-effect warp.
    cg = g.sub(*g.coarse_range((0.0, -5.0, 2.0), (45.0, 60.0, 30.0)))
    t_c = tum['centre'].astype(np.float32)
    v = [cg.lat - t_c[0], cg.ap - t_c[1], cg.si - t_c[2]]
    rho2 = v[0] ** 2 + v[1] ** 2 + v[2] ** 2
    keep = np.float32(1.0) - np.float32(tum['mass_effect']) * np.exp(-rho2 / np.float32((1.5 * tum['radius'] + 10.0) ** 2))
    wl, wa, ws = (t_c[i] + v[i] * keep for i in range(3))
    al = np.abs(wl)
    vs = np.float32(vent_scale)
    # Lateral ventricles: two arched blobs beside the septum whose occipital ends diverge (atria).
    va = wa + np.float32(3.0)
    centre_si = np.float32(13.0) - np.float32(0.005) * va ** 2
    offset_lat = (np.float32(3.0 + 3.0 * vs) + np.float32(0.22) * np.maximum(np.float32(0.0), -va - np.float32(8.0))
                  + np.float32(0.04) * np.maximum(np.float32(0.0), va))
    vent = _ellipsoid_frac(al - offset_lat, va, ws - centre_si, (3.5 + 2.5 * vs, 30.0 * vs ** 0.3, 5.0 + 3.0 * vs), w)
    vent = np.maximum(vent, _ellipsoid_frac(wl, wa + np.float32(3.0), ws, (1.5 * vs, 14.0, 10.0), w))
    nuclei = np.maximum(_ellipsoid_frac(al - np.float32(11.0), wa + np.float32(12.0), ws - np.float32(2.0), (8.0, 14.0, 8.0), w),
                        _ellipsoid_frac(al - np.float32(24.0), wa - np.float32(3.0), ws - np.float32(2.0), (5.0, 14.0, 9.0), w))
    nuclei = np.maximum(nuclei, _ellipsoid_frac(al - np.float32(13.0 + 3.5 * vs), wa - np.float32(15.0),
                                                ws - np.float32(10.0), (4.5, 10.0, 7.0), w))
    s = cg.c_slices
    csf[s] = np.maximum(csf[s], vent)
    deep[s] = nuclei * (np.float32(1.0) - vent)
    gm_all[s] = np.maximum(gm_all[s], csf[s])
    del v, rho2, keep, wl, wa, ws, al, vent, nuclei

    # Healthy fractions (sum to 1): deep nuclei replace WM, never cortex or CSF.
    gm = gm_all - csf
    wm = np.float32(1.0) - gm_all
    deep = np.minimum(deep, wm)
    wm -= deep
    del gm_all

    # Glioma in its own box: ET ring (t < 1) around NETC (also tn < 1), inside oedema (e < 1) that follows WM.
    r_c, r_e = tum['radius'], tum['oedema']
    tg = g.sub(*g.coarse_range(tuple(tum['centre']), (1.75 * r_e * tum['stretch'].max() + 2 * g.vox_mm,) * 3))
    s = tg.c_slices
    d2 = ((tg.lat - t_c[0]) / np.float32(tum['stretch'][0])) ** 2 + ((tg.ap - t_c[1]) / np.float32(tum['stretch'][1])) ** 2
    rho = np.sqrt(d2 + ((tg.si - t_c[2]) / np.float32(tum['stretch'][2])) ** 2)
    t_field = rho / np.float32(r_c) * np.maximum(np.float32(0.7), 1 + np.float32(0.22) * _smooth_noise(rng, tg.shape, g.vox_mm, 7.0))
    tn_field = t_field * np.maximum(np.float32(0.6), 1 + np.float32(0.3) * _smooth_noise(rng, tg.shape, g.vox_mm, 5.0))
    tn_field /= np.float32(tum['necrosis'])
    e_noise = _smooth_noise(rng, tg.shape, g.vox_mm, 10.0)
    e_field = rho / np.float32(r_e) * np.maximum(np.float32(0.6), 1 + np.float32(0.35) * e_noise)
    e_field += gm[s] + csf[s]  # vasogenic oedema spreads along WM and spares the cortex
    # The falx keeps the lesion in one hemisphere; oedema also thins out as it nears the midline.
    medial = np.float32(tum['side']) * tg.lat
    across = np.float32(3.0) * _ramp(-medial / w)
    t_field += across
    tn_field += across
    e_field += across + np.float32(0.5) * np.clip((np.float32(12.0) + np.float32(8.0) * e_noise - medial) / np.float32(12.0), 0, 1)
    del across, medial, e_noise, d2, rho
    core = _ramp((1.0 - t_field) * np.float32(r_c) / w)
    netc = _ramp((1.0 - tn_field) * np.float32(r_c * tum['necrosis']) / w) * core
    snfh = _ramp((1.0 - e_field) * np.float32(r_e) / w) * (np.float32(1.0) - core)
    healthy = np.float32(1.0) - core - snfh

    # Intensities on the coarse grid: sum of fractions x (1 + texture) x signal, then gain and bias field.
    texture = _smooth_noise(rng, g.shape, g.vox_mm, 2.5)
    fractions = [wm, gm, deep, csf]
    tumour_fracs = [snfh, netc, core - netc]
    if return_tissue:
        tissue_fracs = [csf.copy(), gm + deep, wm.copy()]
    gain = np.exp(rng.normal(0.0, 0.12, size=4)).astype(np.float32)
    images = np.zeros((4,) + g.shape, np.float32)
    for k in range(len(_TISSUES)):
        if k < 4:
            frac = fractions[k]
            frac[s] *= healthy
        else:
            frac = np.zeros(g.shape, np.float32)
            frac[s] = tumour_fracs[k - 4]
        frac *= 1 + np.float32(_TEXTURE[k]) * texture
        for m in range(4):
            images[m] += frac * np.float32(_SIGNAL[k, m] * gain[m])
    del fractions, tumour_fracs, texture, frac, wm, gm, deep, csf
    for m in range(4):  # mild smooth bias: exp of a separable quadratic in the coordinates
        exponent = 0
        for c in (lat, ap, si):
            u = c / np.float32(100.0)
            a1, a2 = rng.normal(0.0, [0.06, 0.05])
            exponent = exponent + np.float32(a1) * u + np.float32(a2) * u * u
        images[m] *= np.exp(exponent)

    # Upsample to the output grid; the brain mask and labels are level sets of the upsampled fields.
    fine = g.fine_slices()
    tf = tg.fine_slices()
    up = lambda field_grid: _upsample(field_grid[0], factor, field_grid[1].fine_shape)
    jobs = [(depth, g)] + [(images[m], g) for m in range(4)] + [(t_field, tg), (tn_field, tg), (e_field, tg)]
    if return_tissue:
        jobs += [(f, g) for f in tissue_fracs]
    ups = _parallel(up, jobs, threads)
    del images, t_field, tn_field, e_field, jobs
    mask = ups[0] > 0
    inside = np.flatnonzero(mask)  # brain voxels, as flat indices into the box
    t_up, tn_up, e_up = (u < 1 for u in ups[5:8])
    lab = np.where(e_up, np.uint8(2), np.uint8(0))
    lab[t_up] = 3
    lab[t_up & tn_up] = 1
    lab[~mask[tuple(slice(a - b, c - b) for a, c, b in zip(tg.lo, tg.hi, g.lo))]] = 0
    seg = np.zeros(shape, np.uint8)
    seg[tf] = lab
    out = dict(seg=seg, affine=brats_affine(shape, spacing))
    del t_up, tn_up, e_up, lab

    # Rician magnitude |signal + complex Gaussian noise| on brain voxels only. The modalities read their real
    # and imaginary noise at random shifts of one pool of normals: each voxel's noise is still Gaussian and
    # unrelated across modalities, at a quarter of the cost of drawing them all.
    n_brain = inside.size
    pool = rng.standard_normal(2 * n_brain + 1, dtype=np.float32)
    pool = np.concatenate([pool, pool])
    shifts = rng.integers(0, pool.size // 2, size=(4, 2))
    noise_frac = rng.uniform(0.015, 0.035)

    def modality(m):
        signal = ups[1 + m].ravel().take(inside)
        sigma = np.float32(noise_frac * _SIGNAL[0, m] * gain[m])
        real = pool[shifts[m, 0]:shifts[m, 0] + n_brain] * sigma
        real += signal
        imag = pool[shifts[m, 1]:shifts[m, 1] + n_brain] * sigma
        real *= real
        imag *= imag
        real += imag
        np.sqrt(real, out=real)
        box = np.zeros(g.fine_shape, np.int16)
        box.ravel()[inside] = np.clip(np.rint(real, out=real), 1, 32767, out=real)
        vol = np.zeros(shape, np.int16)
        vol[fine] = box
        return vol

    for m, vol in enumerate(_parallel(modality, list(range(4)), threads)):
        out[MODALITIES[m]] = vol
    if return_tissue:
        tissue = np.zeros(shape, np.uint8)
        tissue[fine] = np.where(mask, np.argmax(np.stack(ups[8:11]), axis=0) + 1, 0).astype(np.uint8)
        out['tissue'] = tissue
    return out


# ---------------------------------------------------------------------------------------------------------
# BraTS-format case folders


def phantom_case_id(prefix, number):
    """BraTS 2023 naming: <prefix>-<5-digit patient>-<3-digit timepoint>, e.g. BraTS-PHT-00007-000."""
    if not 0 <= int(number) <= 99999:
        raise ValueError(f'phantom: case number {number} does not fit the 5-digit BraTS id')
    return f'{prefix}-{int(number):05d}-000'


def _nifti_image(array, affine, spacing, is_seg):
    """A NIfTI-1 image with the header conventions of released BraTS files: qform code 1 (scanner) for all;
    sform code 1 for the images but 0 (and zero srow) for the label map; mm units; no scaling."""
    import nibabel as nib
    img = nib.Nifti1Image(array, affine)
    hdr = img.header
    hdr.set_data_dtype(array.dtype)
    hdr.set_xyzt_units('mm')
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=0 if is_seg else 1)
    if is_seg:
        for key in ('srow_x', 'srow_y', 'srow_z'):
            hdr[key] = 0
    hdr['pixdim'] = [1.0, *_spacing3(spacing), 0.0, 0.0, 0.0, 0.0]
    return img


def _case_complete(case_dir, case, shape):
    """True when all five files are present and their headers have the wanted grid (a header read only)."""
    import nibabel as nib
    for key in FILE_KEYS:
        path = os.path.join(case_dir, f'{case}-{key}.nii.gz')
        if not os.path.isfile(path):
            return False
        try:
            if tuple(nib.load(path).shape) != tuple(shape):
                return False
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f'{path}: unreadable NIfTI in an existing phantom case ({err}); remove the folder') from err
    return True


def write_phantom_case(
    out_dir,                # parent folder of the case folders
    number,                 # case number: its seed and its 5-digit id
    shape=REF_SHAPE,        # grid shape
    spacing=1.0,            # voxel size in mm
    prefix='BraTS-PHT',     # case name prefix (BraTS-GLI, BraTS-MEN, ... in the real data sets)
    threads=2,              # threads inside make_phantom_case
):
    """Writes one case folder atomically (all five files into a hidden folder beside it, then os.replace);
    a complete existing case is kept. Returns (case_dir, written: bool)."""
    case = phantom_case_id(prefix, number)
    case_dir = os.path.join(out_dir, case)
    if os.path.isdir(case_dir):
        if _case_complete(case_dir, case, shape):
            return case_dir, False
        raise ValueError(f'{case_dir}: exists but is not a complete {tuple(shape)} phantom case; remove it first')
    tmp = os.path.join(out_dir, f'.{case}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of this process id
    os.makedirs(tmp)
    try:
        data = make_phantom_case(number, shape=shape, spacing=spacing, threads=threads)
        import nibabel as nib
        for key in FILE_KEYS:
            nib.save(_nifti_image(data[key], data['affine'], spacing, key == 'seg'),
                     os.path.join(tmp, f'{case}-{key}.nii.gz'))
        os.replace(tmp, case_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return case_dir, True


def _write_job(kwargs):
    return write_phantom_case(**kwargs)


def write_phantom_cases(
    out_dir,                # folder to fill with case folders (created if missing)
    num_cases,              # number of cases; case i has seed (and id) seed + i
    seed=0,                 # first seed
    shape=REF_SHAPE,        # grid shape of every case
    spacing=1.0,            # voxel size in mm
    prefix='BraTS-PHT',     # case name prefix
    workers=1,              # processes; > 1 writes cases in parallel
    progress=True,          # status line on stderr
):
    """Writes BraTS-format folders <prefix>-XXXXX-000/<case>-{t1c,t1n,t2f,t2w,seg}.nii.gz and returns their
    paths in case order. Resumable: complete cases are skipped, and each case appears all at once."""
    num_cases, seed = int(num_cases), int(seed)
    if num_cases < 0 or seed < 0:
        raise ValueError(f'phantom: need num_cases >= 0 and seed >= 0, got {num_cases} and {seed}')
    if '/' in prefix or os.sep in prefix or not prefix:
        raise ValueError(f'phantom: prefix {prefix!r} must be a non-empty name without path separators')
    phantom_case_id(prefix, seed + max(num_cases - 1, 0))  # fails early when the ids would overflow
    os.makedirs(out_dir, exist_ok=True)
    jobs = [dict(out_dir=os.fspath(out_dir), number=seed + i, shape=tuple(shape), spacing=spacing, prefix=prefix,
                 threads=2 if workers <= 1 else 1) for i in range(num_cases)]
    dirs, written = [], 0
    bar = dnnlib.ProgressBar(num_cases, desc=f'phantom cases in {out_dir}:', unit='cases', enabled=progress and num_cases > 0)

    if workers <= 1:
        results = map(_write_job, jobs)
        pool = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(max_workers=int(workers), mp_context=multiprocessing.get_context('spawn'))
        results = pool.map(_write_job, jobs)
    try:
        for case_dir, was_written in results:
            dirs.append(case_dir)
            written += int(was_written)
            bar.update(done=len(dirs), tail=f'({len(dirs) - written} already there)')
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    if progress and num_cases == 0:
        sys.stderr.write('phantom: nothing to write (0 cases)\n')
    return dirs


def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in str(text).split(','))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f'expected three comma-separated sizes >= 16 (e.g. 240,240,155), got {text!r}')
    return shape


def main(argv=None):
    """python -m mri.sources.phantom --outdir DIR --cases N --seed S [--shape 240,240,155] [--workers W]"""
    import click

    from training.cli import PATH

    @click.command(help='Write synthetic BraTS-format brain-tumour cases (no download needed).')
    @click.option('--outdir', 'out_dir', metavar='DIR', type=PATH, help='Output folder')
    @click.option('--out', 'old_out', type=PATH, hidden=True)  # the name before docs/cli.md's vocabulary
    @click.option('--cases', 'num_cases', default=4, show_default=True, metavar='INT', type=click.IntRange(min=0), help='Number of cases')
    @click.option('--seed', default=0, show_default=True, metavar='INT', type=click.IntRange(min=0), help='Seed (and id) of the first case')
    @click.option('--shape', default='240,240,155', show_default=True, metavar='X,Y,Z', help='Grid shape')
    @click.option('--spacing', default=1.0, show_default=True, metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), help='Voxel size in mm')
    @click.option('--prefix', default='BraTS-PHT', show_default=True, metavar='NAME', help='Case name prefix')
    @click.option('--workers', default=1, show_default=True, metavar='INT', type=click.IntRange(min=1), help='Parallel processes')
    def cli(out_dir, old_out, num_cases, seed, shape, spacing, prefix, workers):
        out_dir = out_dir or old_out
        if not out_dir:
            raise click.UsageError("Missing option '--outdir'")
        try:
            shape = _parse_shape(shape)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint='--shape') from err
        dirs = write_phantom_cases(out_dir, num_cases, seed=seed, shape=shape, spacing=spacing, prefix=prefix,
                                   workers=workers)
        click.echo(f'{len(dirs)} cases in {out_dir}')

    return cli.main(args=argv, prog_name='python -m mri.sources.phantom', standalone_mode=argv is None)


if __name__ == '__main__':
    main()
