"""The privacy gate: does a generated sample copy a training patient?

For every generated sample the gate finds its nearest item of the generator's training archive and measures, inside
the brain, how close it is: SSIM (Wang et al., IEEE TIP 2004) and mean squared error, on the image channels only
(tumour-label channels ``seg_*`` are masks, not patient data of their own). With ``max_nn_ssim`` a sample whose
nearest-neighbour SSIM is above it is dropped (``check`` returns ``keep=False``). This is the pixel-space copy test
of Meehan et al. ("A Non-Parametric Test to Detect Data-Copying in Generative Models", AISTATS 2020) applied per
sample, the way nearest-neighbour checks are used to screen synthetic medical images before release.

What is measured (docs/privacy.md):

- Values are compared in [0, 1] (the archive's [-1, 1] mapped linearly; SSIM with dynamic range 1).
- The brain is where any image channel of either image is above ``BRAIN_THRESHOLD`` (metrics/volumes.py's rule for
  brain voxels; background is -1 in the archives, 0 here). SSIM is the mean of the SSIM map over the windows whose
  centre lies in that union, MSE the mean over its voxels; background, which every MRI shares, does not count.
- The nearest neighbour is the archive item with the highest SSIM. Scoring SSIM against every item is costly, so
  the ``candidates`` items nearest by MSE on a box-filtered, standardised copy (at most ``PREFILTER_SIDE`` a side,
  each channel at zero mean and unit variance: TrainingPool.shrink) are scored exactly; tests check that this finds
  the neighbour an exhaustive search finds (``candidates=None``).
- Volumes ``[C, X, Y, Z]`` get a 3D SSIM (nn_ssim, the one the threshold applies to) and, per axial slice (the last
  axis, RAS z), the 2D SSIM of the slice to the same slice of the closest archive volume at that slice position;
  ``max_slice_ssim`` is the highest of these over the slices with at least half the brain area of the sample's
  largest slice (edge slices with a little brain are near-identical in every head). It is reported, not gated on:
  slices of aligned brains agree more than volumes do, and a volume is released whole.

``report`` puts the results beside a reference distribution: the nearest-neighbour SSIM of real cases the generator
did not train on (the archive's ``val`` cases, when it has a case split) or of training items to items of other
cases, so that a reader can see what "close" means between two different patients.
"""

import heapq
import json
import os

import numpy as np
import torch

import dnnlib
from metrics import metric_utils
from metrics import msssim
from metrics import nearest_neighbour
from metrics.volumes import BRAIN_THRESHOLD
from torch_utils.label_channels import is_label_channel

CANDIDATES = 8              # archive items (nearest by MSE) scored by exact SSIM per sample
PREFILTER_SIDE = 16         # box-filtered side (voxels) of the MSE pre-filter of volumes ...
PREFILTER_SIDE_2D = 32      # ... and of 2D images
SLICE_MIN_BRAIN = 0.5       # slices counted in max_slice_ssim: brain area >= this x the sample's largest slice
PAIRS_SHOWN = 8             # closest pairs in privacy-pairs.png
REFERENCE_ITEMS = 200       # real items whose nearest neighbour forms the reference distribution
QUANTILES = (0, 0.05, 0.25, 0.5, 0.75, 0.95, 1)
SSIM_SIGMA = 1.5


class PrivacyError(metric_utils.MetricError):
    """The gate cannot compare these samples with this archive; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Measures inside the brain


def brain_mask(x: torch.Tensor) -> torch.Tensor:
    """[N, *S] bool: where any image channel of ``x [N, C, *S]`` (in [0, 1]) is above BRAIN_THRESHOLD."""
    return (x > BRAIN_THRESHOLD).any(dim=1)


class SSIMQuery:
    """SSIM maps of one batch of query images ``x [Q, C, *S]`` in [0, 1] against candidates ``y`` of the same shape,
    with metrics.msssim's Gaussian window, filter and constants (channels averaged; valid windows, S' = S - win + 1).
    The query's own local means and variances are filtered once and reused for every candidate, so a pair costs three
    filtered maps instead of seven. The mean of the map over every window is msssim.ssim (a test checks)."""

    def __init__(self, x: torch.Tensor, win_size: int = 11):
        self.win = msssim._spatial_window(x, win_size)
        self.filt = msssim._filter(x.shape[1], self.win, SSIM_SIGMA, x.device)
        self.dims = tuple(range(2, x.ndim))
        # Local (co)variances from centred values: E[x^2] - E[x]^2 would cancel in float32 (see msssim). The filter
        # is normalised, so the local mean of the centred image is the local mean minus the global one.
        self.mean_x = x.mean(dim=self.dims, keepdim=True)
        self.xc = x - self.mean_x
        self.mu_x = self.filt(x)
        self.var_x = self.filt(self.xc * self.xc) - (self.mu_x - self.mean_x) ** 2

    def map(self, y: torch.Tensor) -> torch.Tensor:
        """[Q, *S'] SSIM map of each query with its candidate in ``y [Q, C, *S]``."""
        mean_y = y.mean(dim=self.dims, keepdim=True)
        yc = y - mean_y
        mu_y = self.filt(y)
        mu_yc = mu_y - mean_y
        var_y = self.filt(yc * yc) - mu_yc ** 2
        cov = self.filt(self.xc * yc) - (self.mu_x - self.mean_x) * mu_yc
        c1, c2 = msssim.K1 ** 2, msssim.K2 ** 2
        lum = (2 * self.mu_x * mu_y + c1) / (self.mu_x ** 2 + mu_y ** 2 + c1)
        return (lum * (2 * cov + c2) / (self.var_x + var_y + c2)).mean(dim=1)

    def masked(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[Q] SSIM over the windows centred in ``mask [Q, *S]`` (over all windows where the mask holds none)."""
        s = self.map(y)
        r = self.win // 2
        m = mask[(slice(None),) + tuple(slice(r, n - r) for n in mask.shape[1:])].to(s.dtype)
        dims = tuple(range(1, s.ndim))
        count = m.sum(dim=dims)
        inside = (s * m).sum(dim=dims) / count.clamp(min=1)
        return torch.where(count > 0, inside, s.mean(dim=dims))


def masked_ssim(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] SSIM of ``x, y [N, C, *S]`` in [0, 1] over the windows centred in ``mask [N, *S]`` (all windows where it
    holds none)."""
    return SSIMQuery(x).masked(y, mask)


def masked_mse(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] mean squared error of ``x, y [N, C, *S]`` over the voxels in ``mask [N, *S]`` (all of them where it holds
    none)."""
    d = (x - y).square().mean(dim=1)
    dims = tuple(range(1, d.ndim))
    m = mask.to(d.dtype)
    count = m.sum(dim=dims)
    return torch.where(count > 0, (d * m).sum(dim=dims) / count.clamp(min=1), d.mean(dim=dims))


def _quantiles(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return {}
    return {f'q{int(round(q * 100)):02d}': float(np.quantile(v, q)) for q in QUANTILES} | {'mean': float(v.mean())}


# ----------------------------------------------------------------------------------------------------------------
# The training archive in memory


class TrainingPool:
    """The image channels of every archive item, as stored (uint8, or float16 in [0, 1] for 16-bit archives), and a
    box-filtered, standardised float32 copy for the pre-filter; names and cases per item."""

    def __init__(self, archive: str, device='cpu', verbose: bool = True):
        self.path = str(archive)
        if not os.path.exists(self.path):
            raise PrivacyError(f'{self.path}: training archive not found (the privacy gate compares samples with it)')
        try:
            dataset = dnnlib.construct_class_by_name(class_name='training.dataset.ImageFolderDataset', path=self.path)
        except RuntimeError as err:  # DatasetError: already one line naming the file
            raise PrivacyError(str(err)) from None
        self.device = torch.device(device)
        self.kind = dataset.kind
        self.channels = list(dataset.channels)
        self.image_idx = [i for i, n in enumerate(self.channels) if not is_label_channel(n)]
        if not self.image_idx:
            raise PrivacyError(f'{self.path}: no image channels among {self.channels} (only tumour labels)')
        self.image_channels = [self.channels[i] for i in self.image_idx]
        self.shape = list(dataset.image_shape[1:])
        self.split = dataset.split
        self.names = [dataset.image_fname(i) for i in range(len(dataset))]
        cases = [dataset.file_case(i) for i in range(len(dataset))]
        self.has_cases = any(c is not None for c in cases)
        self.cases = np.array([str(c) if c is not None else f'#{i}' for i, c in enumerate(cases)])
        self._load(dataset, verbose)
        dataset.close()

    def _load(self, dataset, verbose):
        vmax = dataset.dtype_max
        self.side = PREFILTER_SIDE if len(self.shape) == 3 else PREFILTER_SIDE_2D
        store, small = [], []
        with dnnlib.ProgressBar(len(dataset), desc='privacy: loading training archive', unit='items', enabled=verbose) as bar:
            for i in range(len(dataset)):
                raw = torch.from_numpy(np.ascontiguousarray(dataset[i][0][self.image_idx]))
                unit = raw.to(torch.float32) / vmax
                store.append(raw if raw.dtype == torch.uint8 else unit.to(torch.float16))
                small.append(self.shrink(unit[None])[0])
                bar.update(1)
        self.images = torch.stack(store).to(self.device)      # [N, Ci, *S] uint8 or float16
        # float32: the pre-filter reads all of it per sample, and converting it each time cost more than the search
        self.small = torch.stack(small).to(self.device)       # [N, Ci, x', y'] or [N, z', Ci*x'*y'] float32: shrink

    def __len__(self):
        return len(self.names)

    def unit(self, index) -> torch.Tensor:
        """Items ``index`` as float32 in [0, 1]."""
        x = self.images[index]
        return x.to(torch.float32) / 255 if x.dtype == torch.uint8 else x.to(torch.float32)

    def slices(self, index: torch.Tensor) -> torch.Tensor:
        """[Z, Ci, X, Y] float32 in [0, 1]: slice s (last axis) of volume ``index[s]``, for every s."""
        x = self.images[index, ..., torch.arange(len(index), device=index.device)]
        return x.to(torch.float32) / 255 if x.dtype == torch.uint8 else x.to(torch.float32)

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-filter's view of ``x [N, Ci, *S]``: box-filtered to at most ``side`` a side, each channel scaled to
        zero mean and unit variance. The MSE of such images is 2 (1 - their correlation): it ranks by structure, as
        SSIM does, and a copy with its intensities rescaled is still at distance 0. (Against 200 volumes 32^3 it
        found the exhaustive SSIM neighbour of 5 of 6 fresh samples, 0.011 lower for the sixth; raw MSE 4 of 6, up
        to 0.062 lower.)"""
        small = nearest_neighbour._shrink(x, self.side)
        dims = tuple(range(2, small.ndim))
        small = (small - small.mean(dim=dims, keepdim=True)) / small.std(dim=dims, keepdim=True).clamp(min=1e-3)
        if small.ndim == 5:  # volumes as [N, z', Ci * x' * y']: slabs contiguous for the per-slice pre-filter
            small = small.permute(0, 4, 1, 2, 3).flatten(2).contiguous()
        return small


# ----------------------------------------------------------------------------------------------------------------
# Nearest-neighbour search


def _candidates(pool: TrainingPool, x: torch.Tensor, exclude, candidates) -> torch.Tensor:
    """[Q, k] archive indices to score exactly: the ``candidates`` nearest by pre-filter MSE, or every item."""
    if candidates is None or candidates >= len(pool):
        return torch.arange(len(pool), device=x.device).expand(x.shape[0], -1)
    _, idx = nearest_neighbour.nearest_mse(pool.shrink(x), pool.small, exclude, k=candidates)
    return idx


@torch.no_grad()
def nearest(pool: TrainingPool, x: torch.Tensor, exclude: torch.Tensor = None, candidates=CANDIDATES) -> dict:
    """Nearest archive item of each query ``x [Q, Ci, *S]`` in [0, 1] by SSIM inside the brain: ``{'ssim', 'mse',
    'index'}`` tensors [Q]. ``exclude [Q, N]`` bool marks items that may not be neighbours."""
    cand = _candidates(pool, x, exclude, candidates)
    x_brain, query = brain_mask(x), SSIMQuery(x)
    scores, errors = [], []
    for j in range(cand.shape[1]):
        y = pool.unit(cand[:, j])
        mask = x_brain | brain_mask(y)
        scores.append(query.masked(y, mask))
        errors.append(masked_mse(x, y, mask))
    scores, errors = torch.stack(scores, dim=1), torch.stack(errors, dim=1)
    if exclude is not None:
        scores = scores.masked_fill(exclude.gather(1, cand), float('-inf'))
    best = scores.argmax(dim=1, keepdim=True)
    return dict(ssim=scores.gather(1, best)[:, 0], mse=errors.gather(1, best)[:, 0], index=cand.gather(1, best)[:, 0])


@torch.no_grad()
def nearest_slices(pool: TrainingPool, x: torch.Tensor, candidates=CANDIDATES) -> dict:
    """Per axial slice (last axis) of one volume ``x [1, Ci, X, Y, Z]``: the highest 2D SSIM inside the brain to the
    same slice of any archive volume (pre-filtered per slab of the box-filtered copy). ``{'ssim' [Z], 'index' [Z],
    'counted' [Z] bool}``: counted = slices with at least SLICE_MIN_BRAIN of the largest slice's brain area."""
    z = x.shape[-1]
    if candidates is None or candidates >= len(pool):
        cand = torch.arange(len(pool), device=x.device)[:, None].expand(-1, z)           # [k, Z]
    else:
        small = pool.shrink(x)[0]                                                         # [z', Ci*x'*y']
        d = (pool.small - small).square().sum(dim=2)                                      # [N, z']
        slab = d.topk(min(candidates, len(pool)), dim=0, largest=False).indices          # [k, z']
        factor = max(z // small.shape[0], 1)
        cand = slab[:, (torch.arange(z, device=x.device) // factor).clamp(max=small.shape[0] - 1)]  # [k, Z]
    k = cand.shape[0]
    xs = x[0].permute(3, 0, 1, 2)                                                         # [Z, Ci, X, Y]
    xs_brain, query = brain_mask(xs), SSIMQuery(xs)
    best = torch.full([z], float('-inf'), device=x.device)
    best_idx = torch.zeros([z], dtype=torch.long, device=x.device)
    for j in range(k):
        ys = pool.slices(cand[j])                                                         # [Z, Ci, X, Y]
        s = query.masked(ys, xs_brain | brain_mask(ys))
        better = s > best
        best = torch.where(better, s, best)
        best_idx = torch.where(better, cand[j], best_idx)
    area = xs_brain.flatten(1).sum(dim=1)
    counted = area >= SLICE_MIN_BRAIN * area.max().clamp(min=1)
    return dict(ssim=best, index=best_idx, counted=counted)


# ----------------------------------------------------------------------------------------------------------------
# The gate


class PrivacyGate:
    """Checks generated samples against the generator's training archive (see the module docstring); keeps every
    verdict for ``report``.

        gate = PrivacyGate('train.zip', max_nn_ssim=0.9)
        verdict = gate.check(sample, channels, 'seed0001')   # sample [C, *spatial] in [-1, 1]
        if verdict['keep']: ...write it...
        gate.report(outdir)                                   # privacy-report.json, privacy-pairs.png
    """

    def __init__(
        self,
        archive: str,                   # the generator's training archive (zip or folder)
        max_nn_ssim: float = None,      # drop samples whose nearest-neighbour SSIM is above it; None = keep all
        device='cpu',
        verbose: bool = True,           # progress line while the archive loads
        candidates: int = CANDIDATES,   # items scored by exact SSIM per sample; None = every item (exhaustive)
    ):
        if max_nn_ssim is not None and not -1 <= float(max_nn_ssim) <= 1:
            raise PrivacyError(f'--max-nn-ssim {max_nn_ssim}: SSIM lies in [-1, 1]')
        self.max_nn_ssim = None if max_nn_ssim is None else float(max_nn_ssim)
        self.candidates = candidates
        self.verbose = verbose
        self.pool = TrainingPool(archive, device=device, verbose=verbose)
        self.records = []           # one verdict per checked sample, in order
        self._closest = []          # heap of (nn_ssim, order, sample image channels float16, nn index): PAIRS_SHOWN
        self._order = {}            # sample channel names -> indices of the archive's image channels

    def _image_channels(self, sample: np.ndarray, channels) -> list:
        """Indices of the sample's channels that match the archive's image channels, in the archive's order."""
        key = tuple(channels)
        if key not in self._order:
            names = [str(n) for n in channels]
            if len(names) != sample.shape[0]:
                raise PrivacyError(f'privacy gate: the sample has {sample.shape[0]} channels but {len(names)} names')
            mine = [n for n in names if not is_label_channel(n)]
            if sorted(mine) != sorted(self.pool.image_channels):
                raise PrivacyError(f'{self.pool.path}: image channels {self.pool.image_channels} differ from the '
                                   f'generator\'s {mine}; pass the archive this generator was trained on')
            self._order[key] = [names.index(n) for n in self.pool.image_channels]
        if list(sample.shape[1:]) != self.pool.shape:
            raise PrivacyError(f'{self.pool.path}: items of shape {self.pool.shape} differ from the generator\'s '
                               f'{list(sample.shape[1:])}; pass the archive this generator was trained on')
        return self._order[key]

    @torch.no_grad()
    def check(self, sample: np.ndarray, channels: list, name: str) -> dict:
        """The verdict on one sample ``[C, *spatial]`` in [-1, 1]: ``keep``, ``nn_ssim``, ``nn_mse`` (inside the
        brain, values in [0, 1]), ``nn_index``, ``nn_name``, ``nn_case``; volumes add ``max_slice_ssim``,
        ``max_slice`` (its index on the last axis) and ``max_slice_nn_name``."""
        sample = np.asarray(sample)
        idx = self._image_channels(sample, channels)
        x = torch.from_numpy(np.ascontiguousarray(sample[idx], np.float32)).to(self.pool.device)
        x = ((x + 1) / 2).clamp(0, 1)[None]
        found = nearest(self.pool, x, candidates=self.candidates)
        nn_ssim, nn_index = float(found['ssim'][0]), int(found['index'][0])
        verdict = dict(name=str(name), nn_ssim=nn_ssim, nn_mse=float(found['mse'][0]), nn_index=nn_index,
                       nn_name=self.pool.names[nn_index], nn_case=self._case(nn_index), nn_split=self._split(nn_index),
                       keep=self.max_nn_ssim is None or nn_ssim <= self.max_nn_ssim)
        if x.ndim == 5:
            verdict.update(self._slices(x))
        self.records.append(dict(verdict))
        self._remember(nn_ssim, x[0], nn_index)
        return verdict

    def _slices(self, x) -> dict:
        per = nearest_slices(self.pool, x, self.candidates)
        s = per['ssim'].masked_fill(~per['counted'], float('-inf'))
        at = int(s.argmax())
        return dict(max_slice_ssim=float(s[at]), max_slice=at, max_slice_nn_name=self.pool.names[int(per['index'][at])])

    def _case(self, index: int):
        return str(self.pool.cases[index]) if self.pool.has_cases else None

    def _split(self, index: int):
        return self.pool.split.get(str(self.pool.cases[index])) if self.pool.split else None

    def _remember(self, nn_ssim, x, nn_index):
        self._push((nn_ssim, len(self.records) - 1, x.to(torch.float16).cpu(), nn_index))

    def _push(self, item):
        """Keeps the PAIRS_SHOWN closest (nn_ssim, record index, sample, neighbour index)."""
        nn_ssim = item[0]
        if len(self._closest) < PAIRS_SHOWN:
            heapq.heappush(self._closest, item)
        elif nn_ssim > self._closest[0][0]:
            heapq.heapreplace(self._closest, item)

    # -- several processes, earlier runs -----------------------------------------------------------------------------

    def state(self) -> dict:
        """This gate's verdicts and closest pairs as plain data (picklable: torch.distributed.all_gather_object)."""
        return dict(records=[dict(r) for r in self.records],
                    closest=[(s, order, x.numpy(), i) for s, order, x, i in self._closest])

    def merge(self, state: dict) -> None:
        """Adds the verdicts (and closest pairs) of another gate's ``state()`` on the same archive: the report of
        rank 0 then covers every rank's samples. ``state`` may hold only ``records`` (verdicts of an earlier run,
        e.g. from a manifest): they are listed and counted, without pictures."""
        offset = len(self.records)
        self.records += [dict(r) for r in state.get('records', [])]
        for s, order, x, i in state.get('closest', []):
            self._push((s, offset + order, torch.as_tensor(x), i))

    # -- report ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reference(self, max_items: int = REFERENCE_ITEMS, seed: int = 0) -> dict:
        """What "close" means between different patients: the nearest-neighbour SSIM/MSE of the archive's held-out
        (``val``) items to its training items, else of training items to items of other cases (or, when the archive
        records no cases, to other items: neighbouring slices of one patient then inflate it)."""
        pool = self.pool
        split = np.array([pool.split.get(c, 'train') for c in pool.cases]) if pool.split else None
        held_out = split is not None and (split == 'val').any() and (split == 'train').any()
        if held_out:
            what = 'held-out (val) cases to training cases'
            queries = np.flatnonzero(split == 'val')
        else:
            what = 'training items to other cases' if pool.has_cases else 'training items to other items (no cases recorded)'
            queries = np.arange(len(pool))
        if len(pool) < 2:
            return dict(what=what, items=0)
        rng = np.random.RandomState(seed)
        queries = np.sort(rng.choice(queries, min(len(queries), max_items), replace=False))
        ssim, mse = [], []
        bar = dnnlib.ProgressBar(len(queries), desc='privacy: reference', unit='items', enabled=self.verbose)
        for start in range(0, len(queries), 16):
            rows = queries[start:start + 16]
            exclude = torch.from_numpy(pool.cases[rows][:, None] == pool.cases[None, :])
            exclude[torch.arange(len(rows)), torch.from_numpy(rows)] = True
            if held_out:
                exclude |= torch.from_numpy(split[None, :] != 'train')
            keep = ~exclude.all(dim=1)  # a query whose every item is excluded has no neighbour
            if not keep.any():
                continue
            rows, exclude = rows[keep.numpy()], exclude[keep].to(pool.device)
            found = nearest(pool, pool.unit(torch.from_numpy(rows).to(pool.device)), exclude, self.candidates)
            ssim += found['ssim'].tolist()
            mse += found['mse'].tolist()
            bar.update(len(rows))
        bar.close()
        return dict(what=what, items=len(ssim), nn_ssim=_quantiles(ssim), nn_mse=_quantiles(mse))

    def summary(self, reference: dict = None) -> dict:
        ssim = [r['nn_ssim'] for r in self.records]
        kept = sum(r['keep'] for r in self.records)
        out = dict(archive=os.path.abspath(self.pool.path), archive_items=len(self.pool), kind=self.pool.kind,
                   channels_compared=self.pool.image_channels,
                   threshold=dict(max_nn_ssim=self.max_nn_ssim, applies_to='nn_ssim (whole sample, inside the brain)'),
                   method=dict(brain_threshold=BRAIN_THRESHOLD, value_range='[0, 1]', candidates=self.candidates,
                               slice_axis='last (axial in RAS archives)', slice_min_brain=SLICE_MIN_BRAIN),
                   checked=len(self.records), kept=kept, dropped=len(self.records) - kept,
                   nn_ssim=_quantiles(ssim), nn_mse=_quantiles([r['nn_mse'] for r in self.records]))
        if any('max_slice_ssim' in r for r in self.records):
            out['max_slice_ssim'] = _quantiles([r.get('max_slice_ssim') for r in self.records])
        if reference is not None:
            out['reference'] = reference
            med = reference.get('nn_ssim', {}).get('q50')
            if med is not None and ssim:
                out['fraction_above_reference_median'] = float(np.mean(np.asarray(ssim) > med))
        return out

    def report(self, outdir: str, reference: bool = True) -> list:
        """Writes ``privacy-report.json`` (summary and a verdict per sample) and ``privacy-pairs.png`` (the closest
        pairs, sample | its nearest archive item) into ``outdir``; returns their paths."""
        os.makedirs(outdir, exist_ok=True)
        ref = self.reference() if reference else None
        data = dict(summary=self.summary(ref), samples=self.records)
        json_path = os.path.join(outdir, 'privacy-report.json')
        with dnnlib.atomic_output(json_path, suffix='.json') as tmp:
            with open(tmp, 'w') as f:
                json.dump(data, f, indent=1)
        paths = [json_path]
        if self._closest:
            paths.append(self._pairs_png(os.path.join(outdir, 'privacy-pairs.png')))
        return paths

    def _pairs_png(self, path: str) -> str:
        """The closest pairs, most similar first: a named band per pair, the sample on the left, its neighbour on the
        right (a 2D image's channels side by side, a volume's three-plane montage), values in [0, 1]; the bands are
        stacked into panels of a sheet near 16:9 (training.grids)."""
        save_image_grid = dnnlib.get_obj_by_name('training.grids.save_image_grid')  # metrics/ sits below training/
        pairs = sorted(self._closest, key=lambda item: (-item[0], item[1]))
        images, labels = [], []
        for nn_ssim, order, x, nn_index in pairs:
            images += [x.to(torch.float32).numpy(), self.pool.unit(nn_index).cpu().numpy()]
            labels.append(f'{self.records[order]["name"]} | {self.pool.names[nn_index]}  SSIM {nn_ssim:.3f}')
        save_image_grid(np.stack(images), path, drange=(0, 1), grid_size=(2, len(pairs)),
                        channels=self.pool.image_channels, row_labels=labels)
        return path
