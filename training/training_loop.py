"""The training loop: StyleGAN2-ADA's schedule (lazy regularisation, G_ema, ADA) with exact resume.

One loop for every configuration and any number of spatial dimensions: the networks, the augmentation
pipeline and the loss are built from ``class_name`` configs, so the hooks (attention, feature quantization,
top-k) plug in without this file importing them, and 2D images and volumes take the same path (the networks
infer their dimensions from ``img_resolution``). Multi-process runs all-reduce gradients by hand (as StyleGAN3
does), so the R1 and path-length double backward need no DDP support and every rank keeps identical parameters.

The loop reads top to bottom: ``_setup`` builds a ``Run`` (everything the phases share), then each step
trains one batch (``_train_step``, ``_update_ema``, ``_update_ada``) and the end of a tick reports, draws
grids, writes the snapshot and training state, evaluates metrics and appends the statistics. As in NVlabs'
loop, a fresh run's tick 0 ends after its first step: its status line (with an estimate of the time per kimg)
comes at once, and with ``first_snapshot`` so do the first grid, snapshot and metrics.
"""

import copy
import dataclasses
import json
import os
import resource
import signal
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

import dnnlib
from torch_utils import misc, snapshot, training_stats
from torch_utils.ops import conv2d_gradfix, grid_sample_gradfix
from training import checkpoint, grids


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


def network_resolution(spatial):
    """The ``img_resolution`` the networks get for data of spatial shape ``spatial``: the side of square 2D
    images (an int, as StyleGAN2-ADA's networks take), else the shape as a list, one size per axis (volumes,
    cubes included; the network family infers 2D or 3D from its length)."""
    spatial = [int(s) for s in spatial]
    return spatial[0] if len(spatial) == 2 and spatial[0] == spatial[1] else spatial


@dataclasses.dataclass(eq=False)
class Run:
    """One training run in progress: what every phase of the loop reads and updates."""
    opts: dnnlib.EasyDict                   # The arguments of training_loop().
    device: torch.device = None             # This process's device.
    log: Callable = None                    # print() on rank 0, nothing on the other ranks.
    resume_state: dict = None               # training-state.pt of the run being continued; None = a fresh run.
    training_set: Any = None                # The dataset (training.dataset.ImageFolderDataset).
    batches: Iterator = None                # Endless iterator over this rank's share of the data.
    nets: dnnlib.EasyDict = None            # G, D, G_ema, augment_pipe (None = no augmentation).
    loss: Any = None                        # The loss (training.loss.StyleGAN2Loss or a class_name alike).
    phases: list = None                     # Gmain/Greg/Dmain/Dreg (or *both): module, optimizer, interval, events.
    frozen: set = None                      # Names of D's parameters that FreezeD keeps fixed.
    ada: Any = None                         # training.augment.AdaController; None = a fixed p.
    grid: dnnlib.EasyDict = None            # Rank 0's image grid: size, latents z, labels c, reals, style.
    logs: Any = None                        # _Logs: the statistics collector, stats.jsonl, TensorBoard.
    record: dnnlib.EasyDict = None          # What every snapshot records besides the networks.
    stop: StopRequested = None              # Set by SIGINT/SIGTERM.
    cur_nimg: int = 0                       # Real images shown so far.
    cur_tick: int = 0                       # Ticks completed.
    batch_idx: int = 0                      # Steps completed.
    start_time: float = 0.0                 # When training_loop() was entered.
    tick_start_nimg: int = 0                # cur_nimg at the start of this tick.
    tick_start_time: float = 0.0            # When this tick started.
    maintenance_time: float = 0.0           # Seconds spent between the previous tick's end and this tick's start.
    first_step: dnnlib.EasyDict = None      # Wall times of a fresh run's first step (whole step, data fetch, phases).
    done: bool = False                      # total_kimg reached.
    stopping: bool = False                  # A stop was requested (signal or abort_fn) on any rank.


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
    network_snapshot_ticks: int = 50,   # Snapshot interval in ticks; None = never.
    first_snapshot: bool = True,        # Grid, snapshot and metrics at tick 0 too (after the first step), as NVlabs.
    resume_pkl: str = None,             # Initialise weights from this snapshot (new run, counters at 0).
    resume_run: str = None,             # Continue this run dir exactly (counters, optimizers, RNG).
    resume_partial: bool = False,       # Let resume_pkl fill only the tensors that match (else all must).
    freezed: int = 0,                   # Freeze the N highest-resolution blocks of D.
    cudnn_benchmark: bool = True,       # torch.backends.cudnn.benchmark.
    allow_tf32: bool = False,           # TF32 matmul/conv on Ampere+ GPUs.
    abort_fn=None,                      # Callback: return True to stop early (e.g. tests).
    progress_fn=None,                   # Callback: progress_fn(cur_nimg, total_nimg).
):
    run = _setup(dnnlib.EasyDict(locals()))  # First statement: locals() holds exactly the arguments.
    run.log(f'Training for {total_kimg} kimg...')
    run.log()
    run.tick_start_nimg = run.cur_nimg
    run.tick_start_time = time.time()
    run.maintenance_time = run.tick_start_time - run.start_time
    run.stop = StopRequested().__enter__()
    try:
        while True:
            step_start = time.perf_counter()
            _train_step(run)
            _update_ema(run)
            if run.first_step is not None and run.first_step.total is None:
                run.first_step.total = time.perf_counter() - step_start
            run.cur_nimg += batch_size
            run.batch_idx += 1
            if run.ada is not None and run.batch_idx % ada_interval == 0:
                _update_ada(run)
            if not _tick_ends(run):
                continue
            tick_end_time = time.time()
            run.log(_tick_status(run, tick_end_time))
            _maintenance(run)
            run.cur_tick += 1
            run.tick_start_nimg = run.cur_nimg
            run.tick_start_time = time.time()
            run.maintenance_time = run.tick_start_time - tick_end_time
            if run.done or run.stopping:
                break
    finally:
        run.stop.__exit__(None, None, None)
        run.logs.close()
        misc.close_loader(run.batches)
    run.log()
    run.log('Exiting...' if run.done else 'Stopped before the end; resume with --resume ' + os.path.abspath(run_dir))
    return dnnlib.EasyDict(cur_nimg=run.cur_nimg, done=run.done, **run.nets)


def _tick_ends(run: Run) -> bool:
    """After a step: report progress, note whether training is done or asked to stop (on any rank), and say
    whether this step ends the tick."""
    opts = run.opts
    if opts.progress_fn is not None:
        opts.progress_fn(run.cur_nimg // 1000, opts.total_kimg)
    run.done = run.cur_nimg >= int(opts.total_kimg * 1000)
    asked = run.stop.requested or bool(opts.abort_fn is not None and opts.abort_fn())
    run.stopping = _all_reduce_flag(asked, run.device, opts.num_gpus)
    if run.cur_tick == 0:  # A fresh run's tick 0 is its first step (as NVlabs): progress from the first batch.
        return True
    return run.done or run.stopping or run.cur_nimg >= run.tick_start_nimg + opts.kimg_per_tick * 1000


def _all_reduce_flag(flag: bool, device, num_gpus: int) -> bool:
    if num_gpus == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------------------------
# Set-up, in the order the phases run (the order fixes the RNG stream, so exact resume depends on it).

def _setup(opts: dnnlib.EasyDict) -> Run:
    """Device and seeds, the state to resume from, data, networks, loss and phases, ADA, restored counters, grid,
    logs: a Run ready for its first step."""
    run = Run(opts=opts, start_time=time.time())
    run.device = _setup_device(opts)
    run.log = (lambda *a, **k: print(*a, **k, flush=True)) if opts.rank == 0 else (lambda *a, **k: None)
    if opts.resume_run is not None:
        run.resume_state = checkpoint.load_training_state(opts.resume_run)
        opts.resume_pkl = os.path.join(opts.resume_run, run.resume_state['snapshot'])
        run.cur_nimg = int(run.resume_state['cur_nimg'])
    _setup_data(run)
    _setup_networks(run)
    _setup_loss_and_phases(run)
    if opts.ada_target is not None and run.nets.augment_pipe is not None:
        from training.augment import AdaController
        run.ada = AdaController(target=opts.ada_target, interval=opts.ada_interval, kimg=opts.ada_kimg,
                                batch_size=opts.batch_size)
    _restore_state(run)
    if run.cur_tick == 0:  # A fresh run: its first step is timed for tick 0's estimate of the time per kimg.
        run.first_step = dnnlib.EasyDict(total=None, fetch=0.0, phases=[])
    _setup_grid(run)
    run.logs = _Logs(opts.run_dir, opts.rank)
    # What every snapshot records: the data it was trained on and the configs that rebuild its networks.
    run.record = dnnlib.EasyDict(dataset=run.training_set.describe(), config=dict(
        training_set_kwargs=opts.training_set_kwargs, G_kwargs=opts.G_kwargs, D_kwargs=opts.D_kwargs))
    # The content the run trains on (zip: names, sizes and CRCs), which a resume checks (training.config).
    run.record.data_hash = run.training_set.content_hash() if opts.rank == 0 else None
    return run


def _setup_device(opts) -> torch.device:
    """Seed this rank and set the backends' switches; returns the torch.device."""
    device = torch.device(opts.device)
    np.random.seed(opts.random_seed * opts.num_gpus + opts.rank)
    torch.manual_seed(opts.random_seed * opts.num_gpus + opts.rank)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = opts.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = opts.allow_tf32
        torch.backends.cudnn.allow_tf32 = opts.allow_tf32
    conv2d_gradfix.enabled = True
    grid_sample_gradfix.enabled = True
    return device


def _setup_data(run: Run):
    """The training set and an endless iterator over this rank's share, continuing after ``cur_nimg`` images."""
    opts = run.opts
    run.log('Loading training set...')
    run.training_set = dnnlib.construct_class_by_name(**opts.training_set_kwargs)
    sampler = misc.InfiniteSampler(run.training_set, rank=opts.rank, num_replicas=opts.num_gpus, seed=opts.random_seed,
                                   start_index=run.cur_nimg)
    loader = torch.utils.data.DataLoader(run.training_set, sampler=sampler, batch_size=opts.batch_size // opts.num_gpus,
                                         worker_init_fn=misc.loader_worker_init(), **opts.data_loader_kwargs)
    run.batches = iter(loader)
    ts = run.training_set
    run.log(f'  images {len(ts)}, shape {ts.image_shape}, labels {ts.label_dim} '
            f'({", ".join(ts.label_names) or "none"}), channels {ts.channels}')


def _setup_networks(run: Run):
    """G, D, G_ema and the augmentation pipe: built, initialised from a snapshot if any, and synced to rank 0."""
    opts, device = run.opts, run.device
    run.log('Constructing networks...')
    common = dict(c_dim=run.training_set.label_dim, img_resolution=network_resolution(run.training_set.image_shape[1:]),
                  img_channels=run.training_set.num_channels)
    G = dnnlib.construct_class_by_name(**opts.G_kwargs, **common).train().requires_grad_(False).to(device)
    D = dnnlib.construct_class_by_name(**opts.D_kwargs, **common).train().requires_grad_(False).to(device)
    G_ema = copy.deepcopy(G).eval()
    augment_pipe = None
    if opts.augment_kwargs is not None:
        augment_pipe = dnnlib.construct_class_by_name(**opts.augment_kwargs).train().requires_grad_(False).to(device)
    run.nets = dnnlib.EasyDict(G=G, D=D, G_ema=G_ema, augment_pipe=augment_pipe)
    if opts.resume_pkl is not None:
        _load_weights(opts.resume_pkl, run.nets, opts.resume_partial, run.log)
    if augment_pipe is not None and run.resume_state is None:
        augment_pipe.p.copy_(torch.as_tensor(opts.augment_p))
    if opts.rank == 0 and run.resume_state is None:  # A resumed run already printed its networks in log.txt.
        z = torch.empty([opts.batch_gpu, G.z_dim], device=device)
        c = torch.empty([opts.batch_gpu, G.c_dim], device=device)
        img = misc.print_module_summary(G, [z, c])
        misc.print_module_summary(D, [img, c])
    if opts.num_gpus > 1:
        for module in run.nets.values():
            if module is not None:
                for tensor in misc.params_and_buffers(module):
                    torch.distributed.broadcast(tensor, src=0)


def _load_weights(resume_path, modules: dict, partial: bool, log):
    """Copy a snapshot's tensors (ours or an NVlabs pickle) into the new networks by name and shape."""
    log(f'Loading networks from "{resume_path}"...')
    copied, total, first = checkpoint.transfer_weights(snapshot.read_snapshot_data(resume_path), modules)
    log(f'  copied {copied} of {total} tensors' + (f' (first left as initialised: {first})' if first else ''))
    if copied < total and not partial:
        raise snapshot.SnapshotError(f'{resume_path}: copies only {copied} of {total} tensors into this run '
                                     f'({first}); pass resume_partial=True (--resume-partial) to accept that')


def _setup_loss_and_phases(run: Run):
    """The loss, the phases (each with its optimizer and, on CUDA, timing events) and D's frozen parameter names."""
    opts, nets = run.opts, run.nets
    loss_kwargs = dict(opts.loss_kwargs)
    if loss_kwargs.get('topk_kwargs'):
        # Epochs count distinct images of the subset trained on: --mirror's flipped copies are not new images.
        flipped = getattr(run.training_set, '_xflip', None)
        loss_kwargs.setdefault('dataset_size', int((flipped == 0).sum()) if flipped is not None else len(run.training_set))
    run.loss = dnnlib.construct_class_by_name(device=run.device, G=nets.G, D=nets.D, augment_pipe=nets.augment_pipe,
                                              **loss_kwargs)
    run.frozen = _frozen_param_names(nets.D, opts.freezed)
    run.phases = _phases(nets.G, nets.D, opts.G_opt_kwargs, opts.D_opt_kwargs, opts.G_reg_interval, opts.D_reg_interval)
    for phase in run.phases:
        phase.start_event = phase.end_event = None
        if opts.rank == 0 and run.device.type == 'cuda':
            phase.start_event = torch.cuda.Event(enable_timing=True)
            phase.end_event = torch.cuda.Event(enable_timing=True)


def _phases(G, D, G_opt_kwargs, D_opt_kwargs, G_reg_interval, D_reg_interval):
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


def _restore_state(run: Run):
    """Counters, optimizers, ADA's p and pending signs, and the RNG streams of a resumed run."""
    state, opts = run.resume_state, run.opts
    if state is None:
        return
    optimizers = {phase.name[0]: phase.opt for phase in run.phases}  # A main and a reg phase share one.
    for key, opt in optimizers.items():
        opt.load_state_dict(state['optimizers'][key])
    if 'pl_mean' in state:
        run.loss.pl_mean.copy_(state['pl_mean'].to(run.device))
    augment_pipe = run.nets.augment_pipe
    if 'augment_p' in state and augment_pipe is not None:
        augment_pipe.p.copy_(state['augment_p'].to(augment_pipe.p.device))
    checkpoint.set_rng_states(state['rng'][opts.rank] if opts.rank < len(state['rng']) else state['rng'][0])
    if 'ada_pending' in state and opts.rank < len(state['ada_pending']):
        run.loss.real_sign_acc.copy_(state['ada_pending'][opts.rank].to(run.device))
    run.cur_tick, run.batch_idx = int(state['cur_tick']), int(state['batch_idx'])
    run.log(f'Resuming "{opts.resume_run}" at {run.cur_nimg / 1000:.3f} kimg, tick {state["cur_tick"]}, '
            f'augment p {float(augment_pipe.p) if augment_pipe is not None else 0:.3f}')


def _setup_grid(run: Run):
    """Rank 0's fixed latents and labels for the image grids; a fresh run also writes reals.png and fakes_init.png.

    training.grids draws 2D images and volumes alike (volumes as three-plane montages) as a sheet near 16:9 with a
    band per class; its grid_style gives the channel names (the tumour overlay) and the class names. grid.size stays
    the (columns, rows) of the samples drawn, so the latents and a resumed run's grids are the same."""
    opts = run.opts
    run.grid = grid = dnnlib.EasyDict(size=None, z=None, c=None, reals=None, style=None)
    if opts.rank != 0:
        return
    fresh = run.resume_state is None
    grid.size, images, labels = grids.setup_snapshot_image_grid(training_set=run.training_set)  # Seed 0: same reals for every --seed.
    grid.style = grids.grid_style(run.training_set, labels, grid.size)
    if fresh:
        run.log('Exporting sample images...')
        _save_grid(grid, images, os.path.join(opts.run_dir, 'reals.png'), drange=[0, run.training_set.dtype_max])
    gen = torch.Generator().manual_seed(opts.random_seed)
    grid.z = torch.randn([labels.shape[0], run.nets.G.z_dim], generator=gen).to(run.device).split(opts.batch_gpu)
    grid.c = torch.from_numpy(labels).to(run.device).split(opts.batch_gpu)
    grid.reals = images  # For a family that paints into them (the loss's grid_fakes reads them, see _save_fakes).
    grid.reals_scale = 2.0 / run.training_set.dtype_max
    if fresh:
        _save_fakes(run, os.path.join(opts.run_dir, 'fakes_init.png'))


def _save_grid(grid, images, path, drange):
    grids.save_image_grid(images, path, drange=drange, grid_size=grid.size, **grid.style)


def _save_fakes(run: Run, path):
    with torch.no_grad():
        G_ema = run.nets.G_ema
        images, start = [], 0
        for z, c in zip(run.grid.z, run.grid.c):
            real = run.grid.reals[start:start + len(z)]  # One batch at a time: [-1, 1] on the device.
            real = torch.from_numpy(np.asarray(real)).to(run.device).to(torch.float32) * run.grid.reals_scale - 1
            images.append(run.loss.grid_fakes(G_ema, z, c, real).cpu())
            start += len(z)
        images = torch.cat(images).numpy()
    _save_grid(run.grid, images, path, drange=[-1, 1])


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

def _train_step(run: Run):
    """One batch through every phase that is due: accumulate gradients over the rounds, reduce, step."""
    opts, nets = run.opts, run.nets
    timed = run.first_step is not None and run.first_step.total is None
    clock = _Clock(run.device if timed else None)
    real_img, real_c, all_gen_z, all_gen_c = _fetch_batch(run)
    if timed:
        run.first_step.fetch = clock.lap()
    for phase, phase_gen_z, phase_gen_c in zip(run.phases, all_gen_z, all_gen_c):
        if run.batch_idx % phase.interval != 0:
            continue
        if phase.start_event is not None:
            phase.start_event.record(torch.cuda.current_stream(run.device))
        phase.opt.zero_grad(set_to_none=True)
        for name, param in phase.module.named_parameters():
            param.requires_grad_(not (phase.module is nets.D and name in run.frozen))
        # Ranks draw different latents (seeded by rank), so each uses the first rounds of its own draw.
        rounds = list(zip(real_img, real_c, phase_gen_z, phase_gen_c))
        run.loss.accumulate_phase(phase=phase.name, rounds=rounds, gain=phase.interval / len(rounds), cur_nimg=run.cur_nimg)
        phase.module.requires_grad_(False)
        with torch.autograd.profiler.record_function(phase.name + '_opt'):
            _reduce_gradients(phase.module, opts.num_gpus)
            phase.opt.step()
        if phase.end_event is not None:
            phase.end_event.record(torch.cuda.current_stream(run.device))
        if timed:
            run.first_step.phases.append((phase.interval, clock.lap()))
    # Running averages in buffers (e.g. w_avg) see each rank's own latents: average them so that every rank keeps
    # identical networks.
    if opts.num_gpus > 1:
        _average_buffers(nets.G, opts.num_gpus)


class _Clock:
    """Seconds between laps; on CUDA it waits for the device first (used on the first step only). ``device``
    None: a clock that is not used."""

    def __init__(self, device):
        self.device = device
        self.last = time.perf_counter() if device is not None else None

    def lap(self) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        return lap


def _fetch_batch(run: Run):
    """Reals in [-1, 1] split into rounds, and per phase the latents and labels of the fakes, split likewise."""
    opts, ts, device = run.opts, run.training_set, run.device
    num_phases, batch_size, batch_gpu = len(run.phases), opts.batch_size, opts.batch_gpu
    with torch.autograd.profiler.record_function('data_fetch'):
        scale = 2.0 / ts.dtype_max
        real_img, real_c = next(run.batches)
        real_img = (real_img.to(device).to(torch.float32) * scale - 1).split(batch_gpu)
        real_c = real_c.to(device).split(batch_gpu)
        all_gen_z = torch.randn([num_phases * batch_size, run.nets.G.z_dim], device=device)
        all_gen_z = [phase_gen_z.split(batch_gpu) for phase_gen_z in all_gen_z.split(batch_size)]
        all_gen_c = [ts.get_label(np.random.randint(len(ts))) for _ in range(num_phases * batch_size)]
        all_gen_c = torch.from_numpy(np.stack(all_gen_c)).to(device)
        all_gen_c = [phase_gen_c.split(batch_gpu) for phase_gen_c in all_gen_c.split(batch_size)]
    return real_img, real_c, all_gen_z, all_gen_c


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
def _average_buffers(module, num_gpus):
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.flatten() for b in buffers])
        torch.distributed.all_reduce(flat)
        flat /= num_gpus
        for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(v.reshape(b.shape))


@torch.no_grad()
def _update_ema(run: Run):
    """G_ema: exponential moving average of G's weights, with a ramp-up early in training."""
    opts = run.opts
    with torch.autograd.profiler.record_function('Gema'):
        ema_nimg = opts.ema_kimg * 1000
        if opts.ema_rampup is not None:
            ema_nimg = min(ema_nimg, run.cur_nimg * opts.ema_rampup)
        ema_beta = 0.5 ** (opts.batch_size / max(ema_nimg, 1e-8))
        for p_ema, p in zip(run.nets.G_ema.parameters(), run.nets.G.parameters()):
            p_ema.copy_(p.lerp(p_ema, ema_beta))
        for b_ema, b in zip(run.nets.G_ema.buffers(), run.nets.G.buffers()):
            b_ema.copy_(b)


def _update_ada(run: Run):
    """ADA heuristic (Karras et al. 2020, Sec. 3): move p toward the target overfitting signal r_t."""
    acc = run.loss.real_sign_acc.clone()
    if run.opts.num_gpus > 1:
        torch.distributed.all_reduce(acc)
    run.loss.real_sign_acc.zero_()
    run.ada.accumulate(*acc.tolist())
    run.ada.update_from_accumulated(run.nets.augment_pipe)


# ---------------------------------------------------------------------------------------------------------------
# The end of a tick.

def _tick_status(run: Run, tick_end_time: float) -> str:
    """The status line of a tick; every number is also reported to training_stats (and so to stats.jsonl)."""
    report0 = training_stats.report0
    tick_sec = tick_end_time - run.tick_start_time
    fields = [
        f"tick {report0('Progress/tick', run.cur_tick):<5d}",
        f"kimg {report0('Progress/kimg', run.cur_nimg / 1e3):<8.3f}",
        f"time {dnnlib.format_time(report0('Timing/total_sec', tick_end_time - run.start_time)):<12s}",
        f"sec/tick {report0('Timing/sec_per_tick', tick_sec):<7.1f}",
        f"sec/kimg {report0('Timing/sec_per_kimg', tick_sec / max(run.cur_nimg - run.tick_start_nimg, 1) * 1e3):<7.2f}",
        f"maintenance {report0('Timing/maintenance_sec', run.maintenance_time):<6.1f}",
        f"cpumem {report0('Resources/cpu_mem_gb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20):<6.2f}",
    ]
    if run.device.type == 'cuda':
        fields.append(f"gpumem {report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(run.device) / 2 ** 30):<6.2f}")
        torch.cuda.reset_peak_memory_stats()
    augment_pipe = run.nets.augment_pipe
    fields.append(f"augment {report0('Progress/augment', float(augment_pipe.p.cpu()) if augment_pipe is not None else 0):.3f}")
    if getattr(run.loss, 'topk', None) is not None:
        fields.append(f"topk {report0('Progress/topk_fraction', run.loss.topk_fraction):.3f}")
    if run.cur_tick == 0 and run.first_step is not None and run.first_step.total is not None:
        fields.append(_first_estimate(run))
    return ' '.join(fields)


def estimate_sec_per_step(total: float, fetch: float, phases: list, prefetched: bool) -> float:
    """Seconds of an average step, from the first step's wall times: ``total``, its data ``fetch`` and
    ``phases`` = [(interval, seconds), ...] of the phases it ran. The first step runs every phase, the lazy
    regularisation ones too (R1 every 16 steps, path length every 4), so each phase counts 1/interval of its
    time; a fetch by DataLoader workers (``prefetched``) overlaps training later, and the first one waited for
    the workers to start, so it is left out."""
    phase_sec = sum(sec for _, sec in phases)
    other = max(total - fetch - phase_sec, 0.0)     # EMA, the optimizer bookkeeping outside the phases.
    return other + (0.0 if prefetched else fetch) + sum(sec / interval for interval, sec in phases)


def _first_estimate(run: Run) -> str:
    """Tick 0's estimate: seconds per kimg from the first step, and what a tick and the whole run would take."""
    opts, first = run.opts, run.first_step
    prefetched = int((opts.data_loader_kwargs or {}).get('num_workers') or 0) > 0
    per_step = estimate_sec_per_step(first.total, first.fetch, first.phases, prefetched)
    sec_per_kimg = training_stats.report0('Timing/sec_per_kimg_estimate', per_step / opts.batch_size * 1e3)
    tick = dnnlib.format_time(sec_per_kimg * opts.kimg_per_tick)
    total = dnnlib.format_time(sec_per_kimg * max(opts.total_kimg - run.cur_nimg / 1e3, 0))
    return f'(estimate from the first step: {sec_per_kimg:.2f} sec/kimg, a tick ~{tick}, the run ~{total})'


def _maintenance(run: Run):
    """Image grid, snapshot and training state, metrics, then the tick's statistics."""
    opts = run.opts
    end = run.done or run.stopping
    due = run.cur_tick > 0 or opts.first_snapshot  # --first-snap=0: the first snapshot waits for tick --snap.
    if (opts.rank == 0 and opts.image_snapshot_ticks is not None
            and (run.done or (due and run.cur_tick % opts.image_snapshot_ticks == 0))):
        _save_fakes(run, checkpoint.grid_path(opts.run_dir, run.cur_nimg))
    snapshot_file = None
    if opts.network_snapshot_ticks is not None and (end or (due and run.cur_tick % opts.network_snapshot_ticks == 0)):
        snapshot_file = _write_snapshot_and_state(run)
    if snapshot_file is not None and len(opts.metrics) > 0 and not run.stopping:
        run.logs.metrics.update(_evaluate_metrics(run, snapshot_file))
    _write_stats(run)


def _write_snapshot_and_state(run: Run) -> str:
    """Rank 0 writes the snapshot; every rank's RNG state is gathered into one training-state.pt."""
    opts, nets = run.opts, run.nets
    if opts.num_gpus > 1:
        for module in nets.values():
            if module is not None:
                misc.check_ddp_consistency(module)
    per_rank = dict(rng=checkpoint.rng_states(), ada_pending=run.loss.real_sign_acc.detach().cpu())
    gathered = [per_rank]
    if opts.num_gpus > 1:
        gathered = [None] * opts.num_gpus
        torch.distributed.all_gather_object(gathered, per_rank)
    path = checkpoint.snapshot_path(opts.run_dir, run.cur_nimg)
    if opts.rank == 0:
        snapshot.save_snapshot(path, dict(nets), dataset=run.record.dataset,
                               extra=dict(cur_nimg=run.cur_nimg, config=run.record.config))
        state = dict(
            snapshot=os.path.basename(path),
            cur_nimg=run.cur_nimg,
            cur_tick=run.cur_tick + 1,      # The tick this snapshot ends is complete.
            batch_idx=run.batch_idx,
            optimizers={phase.name[0]: phase.opt.state_dict() for phase in run.phases if phase.name.endswith(('main', 'both'))},
            pl_mean=run.loss.pl_mean.detach().cpu(),
            topk_fraction=float(getattr(run.loss, 'topk_fraction', 1.0)),
            rng=[g['rng'] for g in gathered],
            ada_pending=[g['ada_pending'] for g in gathered],
            data_hash=run.record.data_hash,
        )
        if nets.augment_pipe is not None:
            state['augment_p'] = nets.augment_pipe.p.detach().cpu()
        checkpoint.save_training_state(opts.run_dir, state)
    if opts.num_gpus > 1:
        torch.distributed.barrier()
    return path


def _evaluate_metrics(run: Run, snapshot_file: str) -> dict:
    """Every metric of a snapshot, sharing detector features; rank 0 shows calc_metrics.py's progress lines
    (images, rate, time left) in the log, and reports each result."""
    from metrics import metric_main  # Imported lazily: runs without --metrics never load detectors.
    opts = run.opts
    kwargs = dict(progress=opts.rank == 0)
    kwargs.update(opts.metric_kwargs)
    # The metrics draw from the global random streams too (their DataLoaders seed from torch's): fork them, so that
    # training continues as it would have without metrics, and a resumed run (whose state was saved before them)
    # continues exactly.
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[run.device] if run.device.type == 'cuda' else []):
        done = metric_main.calc_metrics(opts.metrics, G=run.nets.G_ema, dataset_kwargs=opts.training_set_kwargs,
                                        num_gpus=opts.num_gpus, rank=opts.rank, device=run.device, run_dir=opts.run_dir,
                                        **kwargs)
    np.random.set_state(numpy_state)
    results = {}
    for metric, result in zip(opts.metrics, done):
        if opts.rank == 0:
            metric_main.report_metric(result, run_dir=opts.run_dir, snapshot_pkl=snapshot_file)
        results.update({f'{metric}/{k}' if k != metric else k: v for k, v in result.results.items()})
    return results


def _write_stats(run: Run):
    """Append the tick's statistics to stats.jsonl and TensorBoard (rank 0 holds the files)."""
    logs = run.logs
    logs.collector.update()  # Every rank: the reduction across ranks happens here.
    stats = logs.collector.as_dict()
    timestamp = time.time()
    if logs.jsonl is not None:
        logs.jsonl.write(json.dumps(dict(stats, timestamp=timestamp)) + '\n')
        logs.jsonl.flush()
    if logs.tfevents is not None:
        step, walltime = int(run.cur_nimg / 1e3), timestamp - run.start_time
        for name, value in stats.items():
            logs.tfevents.add_scalar(name, value.mean, global_step=step, walltime=walltime)
        for name, value in logs.metrics.items():
            logs.tfevents.add_scalar(f'Metrics/{name}', value, global_step=step, walltime=walltime)
        logs.tfevents.flush()
