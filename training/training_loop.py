"""The training loop: StyleGAN2-ADA's schedule (lazy regularisation, G_ema, ADA) with exact resume.

One loop for every configuration: the networks, the augmentation pipeline and the loss are built from
``class_name`` configs, so MRI variants (attention, feature quantization, top-k) plug in without this file
importing them. Multi-process runs all-reduce gradients by hand (as StyleGAN3 does), so the R1 and
path-length double backward need no DDP support and every rank keeps identical parameters.
"""

import copy
import json
import os
import resource
import signal
import time

import numpy as np
import torch

import dnnlib
from torch_utils import misc, snapshot, training_stats
from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix
from training import checkpoint
from training.grids import grid_style


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop writes a snapshot and the state, then exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread (e.g. inside a test runner thread): no handler.
                pass
        return self

    def _handle(self, signum, _frame):
        if self.requested:  # A second signal: the user insists.
            raise KeyboardInterrupt
        self.requested = True
        print(f'\nReceived {signal.Signals(signum).name}: saving a snapshot and the training state before exit...', flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_reduce_flag(flag: bool, device, num_gpus: int) -> bool:
    if num_gpus == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def _img_resolution(training_set):
    """The side of square images and cubes (an int, as the 2D networks take), else the shape [D, H, W]."""
    spatial = list(training_set.image_shape[1:])
    return spatial[0] if len(set(spatial)) == 1 else spatial


def _build_networks(training_set, G_kwargs, D_kwargs, augment_kwargs, device):
    common = dict(c_dim=training_set.label_dim, img_resolution=_img_resolution(training_set),
                  img_channels=training_set.num_channels)
    G = dnnlib.construct_class_by_name(**G_kwargs, **common).train().requires_grad_(False).to(device)
    D = dnnlib.construct_class_by_name(**D_kwargs, **common).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    augment_pipe = None
    if augment_kwargs is not None:
        augment_pipe = dnnlib.construct_class_by_name(**augment_kwargs).train().requires_grad_(False).to(device)
    return G, D, G_ema, augment_pipe


def _load_weights(resume_path, modules: dict, partial: bool, log):
    """Copy a snapshot's tensors (ours or an NVlabs pickle) into the new networks by name and shape."""
    log(f'Loading networks from "{resume_path}"...')
    copied, total, first = checkpoint.transfer_weights(snapshot.read_snapshot_data(resume_path), modules)
    log(f'  copied {copied} of {total} tensors' + (f' (first left as initialised: {first})' if first else ''))
    if copied < total and not partial:
        raise snapshot.SnapshotError(f'{resume_path}: copies only {copied} of {total} tensors into this run '
                                     f'({first}); pass resume_partial=True (--resume-partial) to accept that')


def _setup_phases(G, D, G_opt_kwargs, D_opt_kwargs, G_reg_interval, D_reg_interval):
    """Lazy regularisation (StyleGAN2 Sec. 2.2): reg phases every N steps with adjusted Adam hyper-params."""
    phases = []
    for name, module, opt_kwargs, reg_interval in [('G', G, G_opt_kwargs, G_reg_interval), ('D', D, D_opt_kwargs, D_reg_interval)]:
        params = list(module.parameters())
        if reg_interval is None:
            opt = dnnlib.construct_class_by_name(params=params, **opt_kwargs)
            phases.append(dnnlib.EasyDict(name=name + 'both', module=module, opt=opt, interval=1))
        else:
            mb_ratio = reg_interval / (reg_interval + 1)
            opt_kwargs = dnnlib.EasyDict(opt_kwargs)
            opt_kwargs.lr = opt_kwargs.lr * mb_ratio
            opt_kwargs.betas = [beta ** mb_ratio for beta in opt_kwargs.betas]
            opt = dnnlib.construct_class_by_name(params=params, **opt_kwargs)
            phases.append(dnnlib.EasyDict(name=name + 'main', module=module, opt=opt, interval=1))
            phases.append(dnnlib.EasyDict(name=name + 'reg', module=module, opt=opt, interval=reg_interval))
    return phases


def _frozen_param_names(D, freezed: int):
    """FreezeD (Mo et al. 2020): freeze the ``freezed`` highest-resolution blocks of D (named ``b<res>``)."""
    if freezed <= 0:
        return set()
    block_res = sorted({int(n.split('.')[0][1:]) for n, _ in D.named_parameters() if n.split('.')[0][1:].isdigit()}, reverse=True)
    frozen_blocks = {f'b{res}' for res in block_res[:freezed]}
    return {n for n, _ in D.named_parameters() if n.split('.')[0] in frozen_blocks}


def training_loop(
    run_dir: str = '.',                 # Output directory.
    training_set_kwargs: dict = {},     # Options for the training set.
    data_loader_kwargs: dict = {},      # Options for torch.utils.data.DataLoader.
    G_kwargs: dict = {},                # Options for the generator network.
    D_kwargs: dict = {},                # Options for the discriminator network.
    G_opt_kwargs: dict = {},            # Options for the generator optimizer.
    D_opt_kwargs: dict = {},            # Options for the discriminator optimizer.
    augment_kwargs: dict = None,        # Options for the augmentation pipeline; None = off.
    loss_kwargs: dict = {},             # Options for the loss.
    metrics: list = [],                 # Metrics to evaluate at each network snapshot.
    metric_kwargs: dict = {},           # Extra options of metric_main.calc_metric (detector_url, num_gen, ...).
    random_seed: int = 0,               # Global random seed.
    num_gpus: int = 1,                  # Number of processes taking part.
    rank: int = 0,                      # Rank of this process in [0, num_gpus).
    device: str = 'cuda',               # 'cuda' or 'cpu'.
    batch_size: int = 4,                # Total batch over all processes.
    batch_gpu: int = 4,                 # Samples per process per accumulation round.
    ema_kimg: float = 10,               # Half-life of G_ema's weights, in kimg.
    ema_rampup: float = 0.05,           # EMA ramp-up coefficient; None = no ramp-up.
    G_reg_interval: int = 4,            # Lazy path-length interval; None = regularise with the main loss.
    D_reg_interval: int = 16,           # Lazy R1 interval; None = regularise with the main loss.
    augment_p: float = 0,               # Initial augmentation probability.
    ada_target: float = None,           # ADA target for sign(D(real)); None = fixed p.
    ada_interval: int = 4,              # Steps between ADA adjustments.
    ada_kimg: float = 500,              # kimg for p to move from 0 to 1 at full speed.
    total_kimg: float = 25000,          # Training length in thousands of real images.
    kimg_per_tick: float = 4,           # Progress reporting interval.
    image_snapshot_ticks: int = 50,     # Image grid interval in ticks; None = never.
    grid_kwargs: dict = None,           # {setup, save, **save options} grid functions by name; None = 2D image grids.
    network_snapshot_ticks: int = 50,   # Snapshot interval in ticks; None = never.
    resume_pkl: str = None,             # Initialise weights from this snapshot (new run, counters at 0).
    resume_run: str = None,             # Continue this run dir exactly (counters, optimizers, RNG).
    resume_partial: bool = False,       # Let resume_pkl fill only the tensors that match (else all must).
    freezed: int = 0,                   # Freeze the N highest-resolution blocks of D.
    cudnn_benchmark: bool = True,       # torch.backends.cudnn.benchmark.
    allow_tf32: bool = False,           # TF32 matmul/conv on Ampere+ GPUs.
    abort_fn=None,                      # Callback: return True to stop early (e.g. tests).
    progress_fn=None,                   # Callback: progress_fn(cur_nimg, total_nimg).
):
    start_time = time.time()
    device = _setup_device(device, random_seed, num_gpus, rank, cudnn_benchmark, allow_tf32)
    log = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)

    # Training state to resume from, if any.
    state = None
    if resume_run is not None:
        state = checkpoint.load_training_state(resume_run)
        resume_pkl = os.path.join(resume_run, state['snapshot'])
    cur_nimg = int(state['cur_nimg']) if state else 0

    training_set, training_set_iterator = _setup_data(training_set_kwargs, data_loader_kwargs, random_seed, rank,
                                                      num_gpus, batch_size, cur_nimg, log)
    G, D, G_ema, augment_pipe = _setup_networks(training_set, G_kwargs, D_kwargs, augment_kwargs, device, resume_pkl,
                                                resume_partial, augment_p, state, batch_gpu, num_gpus, rank, log)
    loss, phases, frozen = _setup_loss_and_phases(training_set, G, D, augment_pipe, loss_kwargs, G_opt_kwargs,
                                                  D_opt_kwargs, G_reg_interval, D_reg_interval, freezed, device, rank)
    ada = None
    if ada_target is not None and augment_pipe is not None:
        from training.augment import AdaController
        ada = AdaController(target=ada_target, interval=ada_interval, kimg=ada_kimg, batch_size=batch_size)
    cur_tick, batch_idx = _restore_state(state, phases, loss, augment_pipe, device, rank, resume_run, cur_nimg, log)
    grid = _setup_grid(training_set, G, G_ema, random_seed, batch_gpu, device, rank, run_dir, fresh=state is None, log=log,
                       grid_kwargs=grid_kwargs)
    logs = _Logs(run_dir, rank)
    nets = dnnlib.EasyDict(G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe)
    # What every snapshot records: the data it was trained on and the configs that rebuild its networks.
    record = dnnlib.EasyDict(dataset=training_set.describe(), config=dict(
        training_set_kwargs=training_set_kwargs, G_kwargs=G_kwargs, D_kwargs=D_kwargs))

    log(f'Training for {total_kimg} kimg...')
    log()
    total_nimg = int(total_kimg * 1000)
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    stop = StopRequested().__enter__()
    done = False
    try:
        while True:
            _train_step(training_set, training_set_iterator, G, D, phases, loss, frozen, batch_size, batch_gpu,
                        batch_idx, cur_nimg, num_gpus, device)
            _update_ema(G, G_ema, ema_kimg, ema_rampup, batch_size, cur_nimg)
            cur_nimg += batch_size
            batch_idx += 1
            if ada is not None and batch_idx % ada_interval == 0:
                _update_ada(ada, loss, augment_pipe, num_gpus)

            if progress_fn is not None:
                progress_fn(cur_nimg // 1000, total_kimg)
            done = cur_nimg >= total_nimg
            stopping = _all_reduce_flag(stop.requested or bool(abort_fn is not None and abort_fn()), device, num_gpus)
            if not done and not stopping and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
                continue

            # Tick: status line, grids, snapshot and state, metrics, statistics.
            tick_end_time = time.time()
            log(_tick_status(cur_tick, cur_nimg, tick_start_nimg, start_time, tick_start_time, tick_end_time,
                             maintenance_time, device, augment_pipe, loss))
            _maintenance(cur_tick, cur_nimg, batch_idx, done, stopping, nets, loss, phases, grid, logs, record,
                         metrics=metrics, metric_kwargs=metric_kwargs, image_snapshot_ticks=image_snapshot_ticks,
                         network_snapshot_ticks=network_snapshot_ticks, run_dir=run_dir, rank=rank,
                         num_gpus=num_gpus, device=device, start_time=start_time)
            cur_tick += 1
            tick_start_nimg = cur_nimg
            tick_start_time = time.time()
            maintenance_time = tick_start_time - tick_end_time
            if done or stopping:
                break
    finally:
        stop.__exit__(None, None, None)
        logs.close()
    log()
    log('Exiting...' if done else 'Stopped before the end; resume with --resume ' + os.path.abspath(run_dir))
    return dnnlib.EasyDict(cur_nimg=cur_nimg, done=done, G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe)


# ---------------------------------------------------------------------------------------------------------------
# Set-up phases, in the order the loop runs them (the order fixes the RNG stream, so exact resume depends on it).

def _setup_device(device, random_seed, num_gpus, rank, cudnn_benchmark, allow_tf32):
    """Seed this rank and set the backends' switches; returns the torch.device."""
    device = torch.device(device)
    np.random.seed(random_seed * num_gpus + rank)
    torch.manual_seed(random_seed * num_gpus + rank)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    conv2d_gradfix.enabled = True
    grid_sample_gradfix.enabled = True
    return device


def _setup_data(training_set_kwargs, data_loader_kwargs, random_seed, rank, num_gpus, batch_size, cur_nimg, log):
    """The training set and an endless iterator over this rank's share, continuing after ``cur_nimg`` images."""
    log('Loading training set...')
    training_set = dnnlib.construct_class_by_name(**training_set_kwargs)
    sampler = misc.InfiniteSampler(training_set, rank=rank, num_replicas=num_gpus, seed=random_seed, start_index=cur_nimg)
    loader = torch.utils.data.DataLoader(training_set, sampler=sampler, batch_size=batch_size // num_gpus, **data_loader_kwargs)
    log(f'  images {len(training_set)}, shape {training_set.image_shape}, labels {training_set.label_dim} '
        f'({", ".join(training_set.label_names) or "none"}), channels {training_set.channels}')
    return training_set, iter(loader)


def _setup_networks(training_set, G_kwargs, D_kwargs, augment_kwargs, device, resume_pkl, resume_partial, augment_p,
                    state, batch_gpu, num_gpus, rank, log):
    """G, D, G_ema and the augmentation pipe: built, initialised from a snapshot if any, and synced to rank 0."""
    log('Constructing networks...')
    G, D, G_ema, augment_pipe = _build_networks(training_set, G_kwargs, D_kwargs, augment_kwargs, device)
    if resume_pkl is not None:
        _load_weights(resume_pkl, dict(G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe), resume_partial, log)
    if augment_pipe is not None and state is None:
        augment_pipe.p.copy_(torch.as_tensor(augment_p))
    if rank == 0 and state is None:  # A resumed run already printed its networks in log.txt.
        z = torch.empty([batch_gpu, G.z_dim], device=device)
        c = torch.empty([batch_gpu, G.c_dim], device=device)
        img = misc.print_module_summary(G, [z, c])
        misc.print_module_summary(D, [img, c])
    if num_gpus > 1:
        for module in [G, D, G_ema, augment_pipe]:
            if module is not None:
                for tensor in misc.params_and_buffers(module):
                    torch.distributed.broadcast(tensor, src=0)
    return G, D, G_ema, augment_pipe


def _setup_loss_and_phases(training_set, G, D, augment_pipe, loss_kwargs, G_opt_kwargs, D_opt_kwargs, G_reg_interval,
                           D_reg_interval, freezed, device, rank):
    """The loss, the phases (each with its optimizer and, on CUDA, timing events) and D's frozen parameter names."""
    loss_kwargs = dict(loss_kwargs)
    if loss_kwargs.get('topk_kwargs'):
        # Epochs count distinct images of the subset trained on: --mirror's flipped copies are not new images.
        flipped = getattr(training_set, '_xflip', None)
        loss_kwargs.setdefault('dataset_size', int((flipped == 0).sum()) if flipped is not None else len(training_set))
    loss = dnnlib.construct_class_by_name(device=device, G=G, D=D, augment_pipe=augment_pipe, **loss_kwargs)
    frozen = _frozen_param_names(D, freezed)
    phases = _setup_phases(G, D, G_opt_kwargs, D_opt_kwargs, G_reg_interval, D_reg_interval)
    for phase in phases:
        phase.start_event = phase.end_event = None
        if rank == 0 and device.type == 'cuda':
            phase.start_event = torch.cuda.Event(enable_timing=True)
            phase.end_event = torch.cuda.Event(enable_timing=True)
    return loss, phases, frozen


def _restore_state(state, phases, loss, augment_pipe, device, rank, resume_run, cur_nimg, log):
    """Counters, optimizers, ADA's p and pending signs, and the RNG streams of a resumed run; (tick, batch_idx)."""
    if state is None:
        return 0, 0
    opts = {phase.name[0]: phase.opt for phase in phases}
    for key, opt in opts.items():
        opt.load_state_dict(state['optimizers'][key])
    if 'pl_mean' in state:
        loss.pl_mean.copy_(state['pl_mean'].to(device))
    if 'augment_p' in state and augment_pipe is not None:
        augment_pipe.p.copy_(state['augment_p'].to(augment_pipe.p.device))
    checkpoint.set_rng_states(state['rng'][rank] if rank < len(state['rng']) else state['rng'][0])
    if 'ada_pending' in state and rank < len(state['ada_pending']):
        loss.real_sign_acc.copy_(state['ada_pending'][rank].to(device))
    log(f'Resuming "{resume_run}" at {cur_nimg / 1000:.3f} kimg, tick {state["cur_tick"]}, '
        f'augment p {float(augment_pipe.p) if augment_pipe is not None else 0:.3f}')
    return int(state['cur_tick']), int(state['batch_idx'])


def _setup_grid(training_set, G, G_ema, random_seed, batch_gpu, device, rank, run_dir, fresh, log, grid_kwargs=None):
    """Rank 0's fixed latents and labels for the image grids; a fresh run also writes reals.png and fakes_init.png.

    The grid functions are named in ``grid_kwargs`` (``setup``, ``save``; the rest goes to ``save``), so volume runs
    draw three-plane montages (mri/grid3d.py) through the same loop. The default 2D grid also gets its style
    (channel names for the seg overlay, a name per row: training.grids.grid_style)."""
    grid = dnnlib.EasyDict(size=None, z=None, c=None, save=None)
    if rank != 0:
        return grid
    grid_kwargs = dict(grid_kwargs or {})
    custom = 'save' in grid_kwargs
    setup_fn = dnnlib.get_obj_by_name(grid_kwargs.pop('setup', 'training.grids.setup_snapshot_image_grid'))
    save_fn = dnnlib.get_obj_by_name(grid_kwargs.pop('save', 'training.grids.save_image_grid'))
    grid.size, images, labels = setup_fn(training_set=training_set)
    style = dict({} if custom else grid_style(training_set, labels, grid.size), **grid_kwargs)
    grid.save = lambda images, path, drange: save_fn(images, path, drange=drange, grid_size=grid.size, **style)
    if fresh:
        log('Exporting sample images...')
        grid.save(images, os.path.join(run_dir, 'reals.png'), drange=[0, training_set.dtype_max])
    gen = torch.Generator().manual_seed(random_seed)
    grid.z = torch.randn([labels.shape[0], G.z_dim], generator=gen).to(device).split(batch_gpu)
    grid.c = torch.from_numpy(labels).to(device).split(batch_gpu)
    if fresh:
        _save_fakes(G_ema, grid, os.path.join(run_dir, 'fakes_init.png'))
    return grid


def _save_fakes(G_ema, grid, path):
    with torch.no_grad():
        images = torch.cat([G_ema(z=z, c=c, noise_mode='const').cpu() for z, c in zip(grid.z, grid.c)]).numpy()
    grid.save(images, path, drange=[-1, 1])


class _Logs:
    """stats.jsonl and (when tensorboard imports) TensorBoard events; rank 0 holds the files."""

    def __init__(self, run_dir, rank):
        self.collector = training_stats.Collector(regex='.*')
        self.metrics = dict()
        self.jsonl = self.tfevents = None
        if rank == 0:
            self.jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
            try:
                import torch.utils.tensorboard as tensorboard
                self.tfevents = tensorboard.SummaryWriter(run_dir)
            except ImportError:
                pass

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tfevents is not None:
            self.tfevents.close()


# ---------------------------------------------------------------------------------------------------------------
# The phases of one training step.

def _fetch_batch(training_set, training_set_iterator, num_phases, batch_size, batch_gpu, G, device):
    """Reals in [-1, 1] split into rounds, and per phase the latents and labels of the fakes, split likewise."""
    with torch.autograd.profiler.record_function('data_fetch'):
        scale = 2.0 / training_set.dtype_max
        real_img, real_c = next(training_set_iterator)
        real_img = (real_img.to(device).to(torch.float32) * scale - 1).split(batch_gpu)
        real_c = real_c.to(device).split(batch_gpu)
        all_gen_z = torch.randn([num_phases * batch_size, G.z_dim], device=device)
        all_gen_z = [phase_gen_z.split(batch_gpu) for phase_gen_z in all_gen_z.split(batch_size)]
        all_gen_c = [training_set.get_label(np.random.randint(len(training_set))) for _ in range(num_phases * batch_size)]
        all_gen_c = torch.from_numpy(np.stack(all_gen_c)).to(device)
        all_gen_c = [phase_gen_c.split(batch_gpu) for phase_gen_c in all_gen_c.split(batch_size)]
    return real_img, real_c, all_gen_z, all_gen_c


def _train_step(training_set, training_set_iterator, G, D, phases, loss, frozen, batch_size, batch_gpu, batch_idx,
                cur_nimg, num_gpus, device):
    """One batch through every phase that is due: accumulate gradients over the rounds, reduce, step."""
    real_img, real_c, all_gen_z, all_gen_c = _fetch_batch(training_set, training_set_iterator, len(phases),
                                                          batch_size, batch_gpu, G, device)
    for phase, phase_gen_z, phase_gen_c in zip(phases, all_gen_z, all_gen_c):
        if batch_idx % phase.interval != 0:
            continue
        if phase.start_event is not None:
            phase.start_event.record(torch.cuda.current_stream(device))
        phase.opt.zero_grad(set_to_none=True)
        for name, param in phase.module.named_parameters():
            param.requires_grad_(not (phase.module is D and name in frozen))
        # Ranks draw different latents (seeded by rank), so each uses the first rounds of its own draw.
        rounds = list(zip(real_img, real_c, phase_gen_z, phase_gen_c))
        loss.accumulate_phase(phase=phase.name, rounds=rounds, gain=phase.interval / len(rounds), cur_nimg=cur_nimg)
        phase.module.requires_grad_(False)
        with torch.autograd.profiler.record_function(phase.name + '_opt'):
            _reduce_gradients(phase.module, num_gpus)
            phase.opt.step()
        if phase.end_event is not None:
            phase.end_event.record(torch.cuda.current_stream(device))
    # Running averages in buffers (e.g. w_avg) see each rank's own latents: average them so that every rank keeps
    # identical networks.
    if num_gpus > 1:
        _average_buffers(G, num_gpus)


def _reduce_gradients(module, num_gpus):
    """Average the gradients over the ranks (one flat all-reduce) and replace NaN/Inf, as StyleGAN2-ADA does."""
    params = [param for param in module.parameters() if param.grad is not None]
    if len(params) == 0:
        return
    flat = torch.cat([param.grad.flatten() for param in params])
    if num_gpus > 1:
        torch.distributed.all_reduce(flat)
        flat /= num_gpus
    torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
    grads = flat.split([param.numel() for param in params])
    for param, grad in zip(params, grads):
        param.grad = grad.reshape(param.shape)


@torch.no_grad()
def _update_ema(G, G_ema, ema_kimg, ema_rampup, batch_size, cur_nimg):
    """G_ema: exponential moving average of G's weights, with a ramp-up early in training."""
    with torch.autograd.profiler.record_function('Gema'):
        ema_nimg = ema_kimg * 1000
        if ema_rampup is not None:
            ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
        ema_beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8))
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.copy_(p.lerp(p_ema, ema_beta))
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)


def _update_ada(ada, loss, augment_pipe, num_gpus):
    """ADA heuristic (Karras et al. 2020, Sec. 3): move p toward the target overfitting signal r_t."""
    acc = loss.real_sign_acc.clone()
    if num_gpus > 1:
        torch.distributed.all_reduce(acc)
    loss.real_sign_acc.zero_()
    ada.accumulate(*acc.tolist())
    ada.update_from_accumulated(augment_pipe)


# ---------------------------------------------------------------------------------------------------------------
# The end of a tick.

def _maintenance(cur_tick, cur_nimg, batch_idx, done, stopping, nets, loss, phases, grid, logs, record, *, metrics,
                 metric_kwargs, image_snapshot_ticks, network_snapshot_ticks, run_dir, rank, num_gpus, device, start_time):
    """Image grid, snapshot and training state, metrics, then the tick's statistics."""
    snap_now = network_snapshot_ticks is not None and (done or stopping or cur_tick % network_snapshot_ticks == 0)
    if rank == 0 and image_snapshot_ticks is not None and (done or cur_tick % image_snapshot_ticks == 0):
        _save_fakes(nets.G_ema, grid, checkpoint.grid_path(run_dir, cur_nimg))
    snapshot_file = None
    if snap_now:
        snapshot_file = _write_snapshot_and_state(
            run_dir, rank, num_gpus, device, cur_nimg, cur_tick + 1, batch_idx, nets.G, nets.D, nets.G_ema,
            nets.augment_pipe, loss, phases, record.dataset, record.config)
    if snapshot_file is not None and len(metrics) > 0 and not stopping:
        logs.metrics.update(_evaluate_metrics(metrics, metric_kwargs, nets.G_ema, record.config['training_set_kwargs'],
                                              num_gpus, rank, device, run_dir, snapshot_file))
    _write_stats(logs.collector, logs.metrics, logs.jsonl, logs.tfevents, cur_nimg, start_time)


def _tick_status(cur_tick, cur_nimg, tick_start_nimg, start_time, tick_start_time, tick_end_time, maintenance_time,
                 device, augment_pipe, loss) -> str:
    """The status line of a tick; every number is also reported to training_stats (and so to stats.jsonl)."""
    report0 = training_stats.report0
    tick_sec = tick_end_time - tick_start_time
    fields = [
        f"tick {report0('Progress/tick', cur_tick):<5d}",
        f"kimg {report0('Progress/kimg', cur_nimg / 1e3):<8.3f}",
        f"time {dnnlib.format_time(report0('Timing/total_sec', tick_end_time - start_time)):<12s}",
        f"sec/tick {report0('Timing/sec_per_tick', tick_sec):<7.1f}",
        f"sec/kimg {report0('Timing/sec_per_kimg', tick_sec / max(cur_nimg - tick_start_nimg, 1) * 1e3):<7.2f}",
        f"maintenance {report0('Timing/maintenance_sec', maintenance_time):<6.1f}",
        f"cpumem {report0('Resources/cpu_mem_gb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20):<6.2f}",
    ]
    if device.type == 'cuda':
        fields.append(f"gpumem {report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2 ** 30):<6.2f}")
        torch.cuda.reset_peak_memory_stats()
    fields.append(f"augment {report0('Progress/augment', float(augment_pipe.p.cpu()) if augment_pipe is not None else 0):.3f}")
    if getattr(loss, 'topk', None) is not None:
        fields.append(f"topk {report0('Progress/topk_fraction', loss.topk_fraction):.3f}")
    return ' '.join(fields)


def _write_stats(collector, metric_values, jsonl, tfevents, cur_nimg, start_time):
    """Append the tick's statistics to stats.jsonl and TensorBoard (rank 0 holds the files)."""
    collector.update()  # Every rank: the reduction across ranks happens here.
    stats = collector.as_dict()
    timestamp = time.time()
    if jsonl is not None:
        jsonl.write(json.dumps(dict(stats, timestamp=timestamp)) + '\n')
        jsonl.flush()
    if tfevents is not None:
        step, walltime = int(cur_nimg / 1e3), timestamp - start_time
        for name, value in stats.items():
            tfevents.add_scalar(name, value.mean, global_step=step, walltime=walltime)
        for name, value in metric_values.items():
            tfevents.add_scalar(f'Metrics/{name}', value, global_step=step, walltime=walltime)
        tfevents.flush()


@torch.no_grad()
def _average_buffers(module, num_gpus):
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.flatten() for b in buffers])
        torch.distributed.all_reduce(flat)
        flat /= num_gpus
        for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(v.reshape(b.shape))


def _write_snapshot_and_state(run_dir, rank, num_gpus, device, cur_nimg, cur_tick, batch_idx, G, D, G_ema,
                              augment_pipe, loss, phases, dataset_desc, config):
    """Rank 0 writes the snapshot; every rank's RNG state is gathered into one training-state.pt."""
    if num_gpus > 1:
        for module in [G, D, G_ema, augment_pipe]:
            if module is not None:
                misc.check_ddp_consistency(module)
    per_rank = dict(rng=checkpoint.rng_states(), ada_pending=loss.real_sign_acc.detach().cpu())
    gathered = [per_rank]
    if num_gpus > 1:
        gathered = [None] * num_gpus
        torch.distributed.all_gather_object(gathered, per_rank)
    path = checkpoint.snapshot_path(run_dir, cur_nimg)
    if rank == 0:
        snapshot.save_snapshot(path, dict(G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe), dataset=dataset_desc,
                               extra=dict(cur_nimg=cur_nimg, config=config))
        state = dict(
            snapshot=os.path.basename(path),
            cur_nimg=cur_nimg,
            cur_tick=cur_tick,
            batch_idx=batch_idx,
            optimizers={phase.name[0]: phase.opt.state_dict() for phase in phases if phase.name.endswith(('main', 'both'))},
            pl_mean=loss.pl_mean.detach().cpu(),
            topk_fraction=float(getattr(loss, 'topk_fraction', 1.0)),
            rng=[g['rng'] for g in gathered],
            ada_pending=[g['ada_pending'] for g in gathered],
        )
        if augment_pipe is not None:
            state['augment_p'] = augment_pipe.p.detach().cpu()
        checkpoint.save_training_state(run_dir, state)
    if num_gpus > 1:
        torch.distributed.barrier()
    return path


def _evaluate_metrics(metrics, metric_kwargs, G_ema, training_set_kwargs, num_gpus, rank, device, run_dir, snapshot_file):
    """Every metric of a snapshot, sharing detector features; rank 0 shows calc_metrics.py's progress lines
    (images, rate, time left) in the log, and reports each result."""
    from metrics import metric_main  # Imported lazily: runs without --metrics never load detectors.
    kwargs = dict(progress=rank == 0)
    kwargs.update(metric_kwargs)
    done = metric_main.calc_metrics(metrics, G=G_ema, dataset_kwargs=training_set_kwargs, num_gpus=num_gpus, rank=rank,
                                    device=device, run_dir=run_dir, **kwargs)
    results = {}
    for metric, result in zip(metrics, done):
        if rank == 0:
            metric_main.report_metric(result, run_dir=run_dir, snapshot_pkl=snapshot_file)
        results.update({f'{metric}/{k}' if k != metric else k: v for k, v in result.results.items()})
    return results
