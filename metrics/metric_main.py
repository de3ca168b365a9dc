"""The metric registry: each metric is one decorated function of the options, named as in StyleGAN2-ADA
(Karras et al., NeurIPS 2020) where it exists there; see docs/metrics.md for what each one measures.

``calc_metric(name, **options)`` runs one metric on this rank (all ranks must call it together when
``num_gpus > 1``; ``num_gen`` and ``num_real`` shorten it, and its result then records ``num_gen``, the metric's
own ``num_gen_default`` and ``num_real``); ``calc_metrics(names, **options)`` runs several that share detector
features; ``report_metric`` appends a result as one JSON line to ``metric-<name>.jsonl``.
"""

import json
import os
import time

import torch

import dnnlib
from metrics import detectors
from metrics import frechet_inception_distance
from metrics import inception_score
from metrics import insert_dice as insert_dice_module
from metrics import kernel_inception_distance
from metrics import mask_dice as mask_dice_module
from metrics import metric_utils
from metrics import msssim
from metrics import nearest_neighbour
from metrics import paint
from metrics import per_class
from metrics import perceptual_path_length
from metrics import precision_recall
from metrics import volumes

_metric_dict = {}  # name -> function(opts) -> dict of results


def register_metric(fn):
    assert callable(fn)
    _metric_dict[fn.__name__] = fn
    return fn


def is_valid_metric(metric: str) -> bool:
    return metric in _metric_dict


def list_valid_metrics() -> list:
    return list(_metric_dict.keys())


def calc_metric(metric: str, **kwargs) -> dnnlib.EasyDict:
    """Run one metric: ``EasyDict(results, metric, total_time, total_time_str, num_gpus)``.

    ``kwargs`` are those of ``metric_utils.make_options`` (G, G_kwargs, dataset_kwargs, num_gpus, rank, device,
    cache, progress, channel, detector_url, num_gen, ...).
    """
    if not is_valid_metric(metric):
        raise metric_utils.MetricError(f'unknown metric {metric!r}; valid metrics: {", ".join(list_valid_metrics())}')
    problem = paint.generator_problem(metric, kwargs.get('G'))
    if problem:
        raise metric_utils.MetricError(problem)
    opts = metric_utils.make_options(**kwargs)
    start = time.time()
    results = _metric_dict[metric](opts)
    total_time = time.time() - start

    # Only rank 0 computes the final numbers; every rank returns them.
    for key, value in list(results.items()):
        if opts.num_gpus > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            value = torch.as_tensor(value, dtype=torch.float64, device=opts.device)
            torch.distributed.broadcast(value, src=0)
            value = float(value.cpu())
        results[key] = float(value)
    out = dnnlib.EasyDict(results=dnnlib.EasyDict(results), metric=metric, total_time=total_time,
                          total_time_str=dnnlib.format_time(total_time), num_gpus=opts.num_gpus)
    if opts.get('num_gen') or opts.get('num_real'):  # Shortened (--metric-num-gen): the record says so.
        out.update(num_gen=opts.get('num_gen_used', opts.get('num_gen')), num_gen_default=opts.get('num_gen_default'))
        if opts.get('num_real'):
            out.update(num_real=int(opts.num_real))
    return out


def calc_metrics(metrics: list, share: bool = True, on_result=None, **kwargs) -> list:
    """Run several metrics on the same generator and data: ``[calc_metric result, ...]`` in order.
    ``on_result(result)`` is called as each metric finishes, so that a later metric's failure loses nothing done.

    With ``share`` the metrics share one pass of the reals' features and one set of generated features where
    they ask for the same images (e.g. fid10k_full and kid10k_full; the per-class reals of fid_per_class come
    from the same pass). The values equal those of separate ``calc_metric`` calls up to float round-off.
    """
    for metric in metrics:
        if not is_valid_metric(metric):
            raise metric_utils.MetricError(f'unknown metric {metric!r}; valid metrics: {", ".join(list_valid_metrics())}')
        problem = paint.generator_problem(metric, kwargs.get('G'))
        if problem:  # before the first metric runs, so that nothing is half reported
            raise metric_utils.MetricError(problem)
    memo = metric_utils.FeatureMemo() if share and len(metrics) > 1 else None
    results = []
    for metric in metrics:
        results.append(calc_metric(metric, feature_memo=memo, **kwargs))
        if on_result is not None:
            on_result(results[-1])
    return results


def report_metric(result_dict: dict, run_dir: str = None, snapshot_pkl: str = None) -> str:
    """Print the result as one JSON line and append it to ``<run_dir>/metric-<name>.jsonl``; returns the line."""
    metric = result_dict['metric']
    assert is_valid_metric(metric), metric
    if run_dir is not None and snapshot_pkl is not None:
        snapshot_pkl = os.path.relpath(snapshot_pkl, run_dir)
    line = json.dumps(dict(result_dict, snapshot_pkl=snapshot_pkl, timestamp=time.time()))
    print(line)
    if run_dir is not None and os.path.isdir(run_dir):
        # One write of one line in append mode: concurrent readers never see half a line.
        with open(os.path.join(run_dir, f'metric-{metric}.jsonl'), 'at') as f:
            f.write(line + '\n')
    return line


# ----------------------------------------------------------------------------
# StyleGAN2-ADA metrics. "_full": statistics of the whole archive; otherwise of a fixed 50k random subset.

def _full(opts):
    """The reals of every metric: the whole archive (a metric draws its own subsets), never x-flipped, as in
    StyleGAN2-ADA, even when the run trained with --mirror=1 (the mirrored copies are augmentation, not data);
    ``xflip_reals=True`` (calc_metrics.py --mirror=1) asks for them explicitly."""
    opts.dataset_kwargs.update(max_size=None, xflip=bool(opts.get('xflip_reals', False)))


@register_metric
def fid50k_full(opts):
    _full(opts)
    fid = frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=metric_utils.num_generated(opts, 50000))
    return metric_utils.per_channel_results('fid50k_full', fid)


@register_metric
def kid50k_full(opts):
    _full(opts)
    kid = kernel_inception_distance.compute_kid(opts, max_real=1000000, num_gen=metric_utils.num_generated(opts, 50000))
    return metric_utils.per_channel_results('kid50k_full', kid)


@register_metric
def pr50k3_full(opts):
    _full(opts)
    precision, recall = precision_recall.compute_pr(opts, max_real=200000, num_gen=metric_utils.num_generated(opts, 50000))
    return dict(metric_utils.per_channel_results('pr50k3_full_precision', precision),
                **metric_utils.per_channel_results('pr50k3_full_recall', recall))


@register_metric
def is50k(opts):
    _full(opts)
    mean, std = inception_score.compute_is(opts, num_gen=metric_utils.num_generated(opts, 50000), num_splits=10)
    return dict(metric_utils.per_channel_results('is50k_mean', mean), **metric_utils.per_channel_results('is50k_std', std))


@register_metric
def ppl2_wend(opts):
    _full(opts)
    ppl = perceptual_path_length.compute_ppl(opts, num_samples=metric_utils.num_generated(opts, 50000), epsilon=1e-4,
                                             space='w', sampling='end')
    return metric_utils.per_channel_results('ppl2_wend', ppl)


@register_metric
def fid50k(opts):
    _full(opts)
    fid = frechet_inception_distance.compute_fid(opts, max_real=50000, num_gen=metric_utils.num_generated(opts, 50000))
    return metric_utils.per_channel_results('fid50k', fid)


@register_metric
def kid50k(opts):
    _full(opts)
    kid = kernel_inception_distance.compute_kid(opts, max_real=50000, num_gen=metric_utils.num_generated(opts, 50000))
    return metric_utils.per_channel_results('kid50k', kid)


@register_metric
def pr50k3(opts):
    _full(opts)
    precision, recall = precision_recall.compute_pr(opts, max_real=50000, num_gen=metric_utils.num_generated(opts, 50000))
    return dict(metric_utils.per_channel_results('pr50k3_precision', precision),
                **metric_utils.per_channel_results('pr50k3_recall', recall))


# ----------------------------------------------------------------------------
# Small-data variants: MRI archives hold thousands of slices, not 70k photographs.

@register_metric
def fid10k_full(opts):
    _full(opts)
    fid = frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=metric_utils.num_generated(opts, 10000))
    return metric_utils.per_channel_results('fid10k_full', fid)


@register_metric
def kid10k_full(opts):
    _full(opts)
    kid = kernel_inception_distance.compute_kid(opts, max_real=1000000, num_gen=metric_utils.num_generated(opts, 10000))
    return metric_utils.per_channel_results('kid10k_full', kid)


@register_metric
def pr10k3_full(opts):
    _full(opts)
    precision, recall = precision_recall.compute_pr(opts, max_real=200000, num_gen=metric_utils.num_generated(opts, 10000))
    return dict(metric_utils.per_channel_results('pr10k3_full_precision', precision),
                **metric_utils.per_channel_results('pr10k3_full_recall', recall))


# ----------------------------------------------------------------------------
# Metrics for conditional MRI generators.

@register_metric
def fid_per_class(opts):
    _full(opts)
    per = per_class.compute_fid_per_class(opts, num_gen=metric_utils.num_generated(opts, 10000),
                                          group_name=opts.get('class_group'))
    results = {}
    for value, fid in per.items():
        results.update(metric_utils.per_channel_results(f'fid_per_class_{value}', fid))
    results['fid_per_class'] = float(sum(results[f'fid_per_class_{v}'] for v in per) / len(per))
    return results


@register_metric
def msssim_div(opts):
    _full(opts)
    div = msssim.compute_msssim_diversity(opts, num_images=metric_utils.num_generated(opts, 10000))
    return dict(msssim_div=div['gen'], msssim_div_real=div['real'])


@register_metric
def ssim_nn(opts):
    _full(opts)
    nn = nearest_neighbour.compute_nn(opts, 'ssim', num_gen=metric_utils.num_generated(opts, 1000))
    return dict(ssim_nn=nn['mean'], ssim_nn_frac_closer=nn['frac_closer'], ssim_nn_real_median=nn['real_median'])


@register_metric
def mse_nn(opts):
    _full(opts)
    nn = nearest_neighbour.compute_nn(opts, 'mse', num_gen=metric_utils.num_generated(opts, 1000))
    return dict(mse_nn=nn['mean'], mse_nn_frac_closer=nn['frac_closer'], mse_nn_real_median=nn['real_median'])


@register_metric
def mask_dice(opts):
    _full(opts)
    per = mask_dice_module.compute_mask_dice(opts, num_gen=metric_utils.num_generated(opts, 1000))
    return mask_dice_module.results(per)


# ----------------------------------------------------------------------------
# Metrics of tumour-painting generators on patch archives (metrics/paint.py, metrics/insert_dice.py): 2D and 3D.

@register_metric
def paint_ssim(opts):
    return paint.results('paint_ssim', paint.compute_paint_scores(opts)['ssim'])


@register_metric
def paint_psnr(opts):
    return paint.results('paint_psnr', paint.compute_paint_scores(opts)['psnr'])


@register_metric
def paint_mse(opts):
    return paint.results('paint_mse', paint.compute_paint_scores(opts)['mse'])


@register_metric
def insert_dice(opts):
    return insert_dice_module.results(insert_dice_module.compute_insert_dice(opts))


# ----------------------------------------------------------------------------
# Metrics of volumes (archives of kind volumes; metrics/volumes.py, docs/volumes.md). Volumes cost ~10^3 times a
# slice, so the generated counts are smaller.

@register_metric
def fid25d_full(opts):
    _full(opts)
    per_plane = volumes.compute_fid25d(opts, num_gen=metric_utils.num_generated(opts, 1000),
                                       max_real=metric_utils.num_real(opts))
    return volumes.plane_results('fid25d_full', per_plane)


@register_metric
def fid3d_full(opts):
    _full(opts)
    fid = volumes.compute_fid3d(opts, num_gen=metric_utils.num_generated(opts, 1000), max_real=metric_utils.num_real(opts))
    return metric_utils.per_channel_results('fid3d_full', fid)


@register_metric
def msssim3d_div(opts):
    _full(opts)
    div = volumes.compute_msssim3d_diversity(opts, num_images=metric_utils.num_generated(opts, 200))
    return dict(msssim3d_div=div['gen'], msssim3d_div_real=div['real'])


@register_metric
def mmd3d(opts):
    _full(opts)
    mmd = volumes.compute_mmd3d(opts, num_gen=metric_utils.num_generated(opts, 200))
    return dict(mmd3d=mmd['mmd'], mmd3d_per_voxel=mmd['per_voxel'])


@register_metric
def ssim3d_nn(opts):
    _full(opts)
    nn = volumes.compute_nn3d(opts, 'ssim', num_gen=metric_utils.num_generated(opts, 200))
    return dict(ssim3d_nn=nn['mean'], ssim3d_nn_frac_closer=nn['frac_closer'], ssim3d_nn_real_median=nn['real_median'])


@register_metric
def mse3d_nn(opts):
    _full(opts)
    nn = volumes.compute_nn3d(opts, 'mse', num_gen=metric_utils.num_generated(opts, 200))
    return dict(mse3d_nn=nn['mean'], mse3d_nn_frac_closer=nn['frac_closer'], mse3d_nn_real_median=nn['real_median'])


ANY_KIND = ('mask_dice',) + paint.PAINT_METRICS  # metrics that measure slices and volumes alike

# The detector each metric runs, and what it asks of it (detectors.Detector.check): checked before training.
INCEPTION_METRICS = ('fid50k_full', 'kid50k_full', 'fid50k', 'kid50k', 'fid10k_full', 'kid10k_full', 'fid_per_class',
                     'fid25d_full')
VGG_METRICS = ('pr50k3_full', 'pr50k3', 'pr10k3_full')
DETECTOR_NEEDS = dict({m: ('inception', 'features') for m in INCEPTION_METRICS}, is50k=('inception', 'class_probs'),
                      ppl2_wend=('vgg16', 'lpips'), **{m: ('vgg16', 'features') for m in VGG_METRICS})
NN_METRICS = ('ssim_nn', 'mse_nn', 'ssim3d_nn', 'mse3d_nn')


def detector_problem(
    metrics: list,                  # Metric names.
    detector_url: str = None,       # --detector (Inception); None = the canonical network, then the offline copy.
    vgg_detector_url: str = None,   # --vgg-detector; None = the canonical network.
    detector3d: str = None,         # --detector3d (fid3d_full).
    verbose: bool = True,           # Notices on stderr (a download, the offline fallback), as the metrics print them.
) -> str:
    """Why a detector of ``metrics`` cannot be had here (one line naming the metrics and the way out), or None.
    Loads each detector once (downloading it into the cache when the network allows), exactly as the metrics
    will, so that a run does not train a tick and then fail at its first snapshot."""
    for kind, url in (('inception', detector_url), ('vgg16', vgg_detector_url)):
        names = [m for m in metrics if DETECTOR_NEEDS.get(m, (None,))[0] == kind]
        try:
            if names:
                detector = detectors.load_detector(kind, url=url, device='cpu', verbose=verbose)
            for name in names:
                detector.check(DETECTOR_NEEDS[name][1])
        except detectors.DetectorError as err:
            return f'{", ".join(names)}: {str(err).splitlines()[0]}'
    if 'fid3d_full' in metrics and detector3d:
        try:
            volumes.VolumeDetector(dnnlib.open_url(detector3d, return_filename=True, verbose=verbose), 'cpu')
        except (dnnlib.DownloadError, detectors.DetectorError) as err:
            return f'fid3d_full: --detector3d {detector3d}: {str(err).splitlines()[0]}'
    return None


def data_problem(metrics: list, dataset_kwargs: dict) -> str:
    """Why the real data cannot serve ``metrics`` (one line), or None: the nearest-neighbour metrics need images
    of at least two cases for their real-to-real baseline, fid_per_class needs labels."""
    if not any(m in NN_METRICS or m == 'fid_per_class' for m in metrics):
        return None
    kwargs = dict(dataset_kwargs, max_size=None, xflip=False)
    kwargs.setdefault('class_name', 'training.dataset.ImageFolderDataset')
    dataset = dnnlib.construct_class_by_name(**kwargs)
    try:
        problem = nearest_neighbour.cases_problem(dataset)
        if problem:
            return f'{", ".join(m for m in metrics if m in NN_METRICS)}: {problem}'
        if 'fid_per_class' in metrics:
            try:
                per_class.class_members(dataset)
            except metric_utils.MetricError as err:
                return f'fid_per_class: {err}'
    finally:
        if hasattr(dataset, 'close'):
            dataset.close()
    return None


def metrics_problem(metrics: list, is_volumes: bool, detector3d: str = None, is_paint: bool = None) -> str:
    """Why ``metrics`` cannot run on this kind of data (one line), or None: checked before training starts.
    ``is_paint``: whether the run trains a tumour-painting generator on a patch archive (None = not checked)."""
    if is_paint:
        wrong = [m for m in metrics if m not in paint.PAINT_METRICS]
        if wrong:
            return (f'{", ".join(wrong)} measure whole-image generators, and this run paints tumours into patches; use '
                    f'paint_ssim, paint_psnr, paint_mse (insert_dice needs calc_metrics.py --segmenter)')
        return None
    wrong = [m for m in metrics if m in paint.PAINT_METRICS]
    if wrong and is_paint is not None:
        return (f'{", ".join(wrong)} measure tumour-painting generators, trained on a patch archive '
                f'(dataset_tool.py --kind patches)')
    wrong = [m for m in metrics if m not in ANY_KIND and (m in volumes.VOLUME_METRICS) != is_volumes]
    if wrong:
        if is_volumes:
            return (f'{", ".join(wrong)} measure 2D images, and the data holds volumes; use '
                    f'{", ".join(volumes.VOLUME_METRICS)} (or none)')
        return f'{", ".join(wrong)} measure volumes, and the data holds 2D images'
    if 'fid3d_full' in metrics and not detector3d:
        return 'fid3d_full needs a 3D feature network: pass --detector3d PATH (docs/volumes.md)'
    return None
