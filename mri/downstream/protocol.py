"""The downstream protocol: k-fold cross-validation by case, one segmenter per fold and arm, scores per BraTS region.

Arms (the same folds, seeds, steps, batch size, schedule and augmentation in each; they differ only in what they train
on or start from):
  real                    the fold's real training cases
  real+synthetic@R        the same real items plus R times as many synthetic image+mask items (uniform sampling over
                          the union, so a batch is R/(1+R) synthetic on average)
  real+inserted@R         the same real items plus R times as many items made by painting one new tumour into a
                          training item of the fold with a paint snapshot (mri/downstream/inserted.py); never into a
                          test case, and with tumour shapes from the fold's training items only
  synthetic               as many synthetic items as the fold has real training items, and nothing real
  pretrained+finetune     the real arm, starting from a segmenter checkpoint trained elsewhere (e.g. BraTS-GLI)

Outputs in the outdir: ``config.json``, ``folds/fold<k>-<arm>.json`` (per-case scores; a finished fold and arm is
never redone, so a stopped run resumes by running the same command again), ``checkpoints/fold<k>-<arm>.pt``
(segmenters; ``fold<k>-real.pt`` serves the ``mask_dice`` and ``insert_dice`` metrics), ``synthetic/`` (the generated
pools, and the inserted pools ``inserted-fold<k>`` with a sidecar naming the source of every item),
``results.json``, ``results.md`` (the table) and ``results.png`` (the plot).
"""

import json
import os
import time

import torch

import dnnlib
from mri.downstream import engine, report
from mri.downstream.data import RealArchive, SegmentationError, SnapshotSource, TrainingItems, ensure_pool, make_folds
from mri.downstream.inserted import PaintSource, ensure_inserted_pool
from mri.downstream.model import ARCHS, build_segmenter, load_segmenter, min_size, save_segmenter

ARM_KINDS = ('real', 'real+synthetic', 'real+inserted', 'synthetic', 'pretrained+finetune')
RATIO_ARMS = ('real+synthetic', 'real+inserted')  # one arm per --synthetic-ratio value
# Options that do not change results: a resumed run may change them.
_RUNTIME_KEYS = ('workers', 'device', 'progress', 'outdir')


def expand_arms(kinds: list, ratios: list) -> list:
    """Arm ids in run order: ``real`` first (the reference), one ``real+synthetic@R`` and ``real+inserted@R`` per ratio."""
    bad = [k for k in kinds if k not in ARM_KINDS]
    if bad:
        raise SegmentationError(f'--arms: unknown arm {bad[0]!r}; expected some of {", ".join(ARM_KINDS)}')
    arms = ['real']
    for kind in ARM_KINDS[1:]:
        if kind in kinds:
            arms += [f'{kind}@{r:g}' for r in ratios] if kind in RATIO_ARMS else [kind]
    return arms


def pool_kind(arm: str) -> str:
    """Where an arm's extra items come from: 'synthetic' (the joint snapshot's pool), 'inserted' (the fold's inserted
    pool), or None (real items only)."""
    if arm == 'synthetic' or arm.startswith('real+synthetic@'):
        return 'synthetic'
    return 'inserted' if arm.startswith('real+inserted@') else None


def synthetic_count(arm: str, num_real: int) -> int:
    """Synthetic or inserted items an arm trains on, given the fold's number of real training items."""
    if '@' in arm:
        return int(round(float(arm.split('@', 1)[1]) * num_real))
    return num_real if arm == 'synthetic' else 0


def default_config(**overrides) -> dnnlib.EasyDict:
    cfg = dnnlib.EasyDict(data=None, networks=[], paint_networks=[], outdir=None, folds=5, test_subset='all',
                          arms=['real', 'real+synthetic', 'synthetic'], ratios=[1.0], pretrained=None, arch='unet',
                          features=16, levels=4, steps=2000, batch=16, lr=1e-3, patch=None, augment=True, seed=0,
                          trunc=1.0, workers=2, device=None, progress=True)
    cfg.update(overrides)
    return cfg


class Plan:
    """Everything checked and derived before the first file is written."""

    def __init__(self, cfg, inserter=None):
        self.cfg = cfg
        self.device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        if self.device.type == 'cuda' and not torch.cuda.is_available():
            raise SegmentationError('--device cuda: this machine has no CUDA device (use --device cpu)')
        self.real = RealArchive(cfg.data)
        self.arms = expand_arms(cfg.arms, cfg.ratios)
        self.folds = make_folds(self._test_pool(), cfg.folds, cfg.seed,
                                'the archive' if cfg.test_subset == 'all' else f'its {cfg.test_subset!r} split')
        self.patch = self._patch()
        self.spec = dict(arch=cfg.arch, spatial_dims=self.real.spatial_dims, in_channels=len(self.real.input_idx),
                         input_names=self.real.input_names, features=cfg.features, levels=cfg.levels, patch=self.patch)
        needs_syn = any(pool_kind(a) == 'synthetic' for a in self.arms)
        if needs_syn and not cfg.networks:
            raise SegmentationError('--network: the arms real+synthetic and synthetic need a joint image+mask snapshot '
                                    '(or pass --arms real,pretrained+finetune)')
        if cfg.networks and len(cfg.networks) not in (1, cfg.folds):
            raise SegmentationError(f'--network: give one snapshot, or one per fold ({cfg.folds}); got {len(cfg.networks)}')
        self.sources = [SnapshotSource(n, self.real, self.device, cfg.trunc) for n in cfg.networks] if needs_syn else []
        self.generator_saw_test_cases = any(s.sees_test_cases(self.real, cfg.test_subset) for s in self.sources)
        needs_ins = any(pool_kind(a) == 'inserted' for a in self.arms)
        paint_networks = list(cfg.get('paint_networks') or [])
        if needs_ins and not paint_networks:
            raise SegmentationError('--paint-network: the arm real+inserted needs a paint snapshot (train.py on a patch '
                                    'archive, --cfg paint)')
        if paint_networks and len(paint_networks) not in (1, cfg.folds):
            raise SegmentationError(f'--paint-network: give one snapshot, or one per fold ({cfg.folds}); got '
                                    f'{len(paint_networks)}')
        self.paint_sources = [PaintSource(n, self.real, self.device, cfg.trunc, inserter)
                              for n in paint_networks] if needs_ins else []
        if 'pretrained+finetune' in self.arms:
            self._check_pretrained()
        self.train_items = [self.real.items_of(sorted(set(self.real.case_ids) - set(test))) for test in self.folds]

    def _test_pool(self) -> list:
        """The cases the folds test on: all, or one case-level split of the archive (the rest always train)."""
        subset = self.cfg.test_subset
        if subset == 'all':
            return self.real.case_ids
        split = self.real.dataset.split
        if not split:
            raise SegmentationError(f'--test-subset {subset}: {self.cfg.data} has no case-level split; rebuild it with '
                                    f'dataset_tool.py --split val=0.4')
        return [c for c in self.real.case_ids if split.get(c) == subset]

    def _patch(self) -> list:
        cfg, shape = self.cfg, self.real.spatial_shape
        patch = [min(cfg.patch, s) for s in shape] if cfg.patch else (list(shape) if len(shape) == 2 else [min(96, s) for s in shape])
        step = min_size(cfg.levels)
        if any(p % step or p < 2 * step for p in patch):
            raise SegmentationError(f'--patch: {"x".join(map(str, patch))} must be a multiple of {step} and at least '
                                    f'{2 * step} per axis for --levels {cfg.levels}; choose --patch or --levels to fit')
        return patch

    def _check_pretrained(self):
        if not self.cfg.pretrained:
            raise SegmentationError('--arms pretrained+finetune needs --pretrained CHECKPOINT')
        _model, spec = load_segmenter(self.cfg.pretrained)
        for key in ('spatial_dims', 'input_names'):
            if spec[key] != self.spec[key]:
                raise SegmentationError(f'{self.cfg.pretrained}: was trained with {key} {spec[key]}, but {self.cfg.data} '
                                        f'needs {self.spec[key]}')
        self.pretrained_spec = spec

    def fold_seed(self, k: int) -> int:
        return int(self.cfg.seed) * 1000 + k

    def source_of(self, k: int):
        return self.sources[k if len(self.sources) > 1 else 0] if self.sources else None

    def paint_source_of(self, k: int):
        return self.paint_sources[k if len(self.paint_sources) > 1 else 0] if self.paint_sources else None

    def training_items(self, k: int, arm: str, pools: dict) -> TrainingItems:
        """What fold k, arm trains on: every arm but `synthetic` has exactly the fold's real training items."""
        real_items = self.train_items[k]
        kind = pool_kind(arm)
        pool = pools.get(('inserted', k)) if kind == 'inserted' else pools.get(k if len(self.sources) > 1 else 0)
        return TrainingItems(self.real, [] if arm == 'synthetic' else real_items, pool if kind else None,
                             synthetic_count(arm, len(real_items)))

    def initial_model(self, k: int, arm: str) -> tuple:
        """(segmenter, spec) before training: the same seeded weights for every arm of a fold, or the pretrained ones."""
        engine.seed_everything(self.fold_seed(k))
        if arm == 'pretrained+finetune':
            model, spec = load_segmenter(self.cfg.pretrained)
            return model, dict(spec, patch=self.patch)
        cfg = self.cfg
        return build_segmenter(cfg.arch, self.real.spatial_dims, len(self.real.input_idx), cfg.features, cfg.levels), self.spec

    def pool_counts(self) -> dict:
        """Synthetic items each source must supply (the most any fold and arm needs)."""
        counts = {}
        for k, items in enumerate(self.train_items):
            if self.sources:
                key = k if len(self.sources) > 1 else 0
                counts[key] = max([counts.get(key, 0)] + [synthetic_count(a, len(items)) for a in self.arms
                                                          if pool_kind(a) == 'synthetic'])
        return counts

    def inserted_counts(self) -> dict:
        """Inserted items each fold's pool must hold (the most its real+inserted arms need)."""
        return {k: max([0] + [synthetic_count(a, len(items)) for a in self.arms if pool_kind(a) == 'inserted'])
                for k, items in enumerate(self.train_items)} if self.paint_sources else {}


def _protocol_options(cfg) -> dict:
    return {k: v for k, v in sorted(cfg.items()) if k not in _RUNTIME_KEYS}


OUTDIR_TEMPS = ('synthetic', 'checkpoints', 'folds')  # subfolders whose '.tmp-*' files a killed run leaves


def _prepare_outdir(cfg) -> None:
    """Create the outdir, or check that the one there holds a run of the same protocol (then resume it)."""
    path = os.path.join(cfg.outdir, 'config.json')
    options = json.loads(json.dumps(_protocol_options(cfg)))
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        old.setdefault('paint_networks', [])  # a run from before the real+inserted arm
        changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
        if changed:
            raise SegmentationError(f'{cfg.outdir}: holds a run with other options ({", ".join(changed)} differ); use a '
                                    f'new --outdir, or the same options to resume it')
        return
    os.makedirs(cfg.outdir, exist_ok=True)
    with dnnlib.atomic_output(path, suffix='.json') as tmp, open(tmp, 'w') as f:
        json.dump(options, f, indent=2)


def _write_json(path, obj):
    with dnnlib.atomic_output(path, suffix='.json') as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)


def _run_one(plan, k, arm, pools, bar, done_steps):
    """Train and evaluate fold k, arm; returns the fold record (also written to disk)."""
    cfg, real = plan.cfg, plan.real
    items = plan.training_items(k, arm, pools)
    model, spec = plan.initial_model(k, arm)
    start = time.time()

    def on_step(step, loss):
        bar.update(done=done_steps + step, tail=f'fold {k} {arm}  loss {loss:.3f}')

    model = engine.train_segmenter(model, items, cfg.steps, cfg.batch, cfg.lr, plan.fold_seed(k), plan.device,
                                   plan.patch, cfg.augment, cfg.workers, on_step)
    train_time = time.time() - start
    eval_batch = cfg.batch if real.spatial_dims == 2 else 1  # a volume is already many windows
    per_case = engine.evaluate_cases(model, real, plan.folds[k], plan.patch, plan.device, batch=eval_batch)
    save_segmenter(os.path.join(cfg.outdir, 'checkpoints', f'fold{k}-{arm}.pt'), model, spec)
    record = dict(fold=k, arm=arm, test_cases=plan.folds[k], num_real=len(items.real_indices),
                  num_synthetic=items.num_synthetic, seed=plan.fold_seed(k), train_seconds=train_time,
                  eval_seconds=time.time() - start - train_time, per_case=per_case, mean=engine.fold_means(per_case))
    _write_json(os.path.join(cfg.outdir, 'folds', f'fold{k}-{arm}.json'), record)
    return record


def run_protocol(cfg, inserter=None) -> dict:
    """Run (or resume) the whole protocol; returns the content of results.json. ``inserter``: the insertion library
    of the real+inserted arm (None = mri.painting.insert; tests pass a stand-in)."""
    plan = Plan(cfg, inserter)  # Every check of the inputs happens here, before anything is written.
    _prepare_outdir(cfg)
    # One process evaluates into an outdir at a time, a fresh one included (two runs may both have made it); taking
    # the lock removes the temporary files a killed run left.
    from training.checkpoint import RunLock
    with RunLock(cfg.outdir, temp_dirs=OUTDIR_TEMPS, doing='evaluating into this outdir',
                 hint='wait for it to finish, or stop it (Ctrl-C / SIGTERM keeps its finished folds) first'):
        return _evaluate(plan, cfg)


def _evaluate(plan, cfg) -> dict:
    """The pools, then every fold and arm not finished yet, then the results (run_protocol holds the lock)."""
    if plan.generator_saw_test_cases and cfg.progress:
        print(f'warning: the generator was trained on cases of {cfg.data} that the folds test on; the synthetic arms may '
              f'look better than they would on unseen patients (see --test-subset in docs/segmentation.md)')
    pools = {key: ensure_pool(plan.sources[key], count, os.path.join(cfg.outdir, 'synthetic'), f'pool{key}',
                              batch=cfg.batch, progress=cfg.progress)
             for key, count in plan.pool_counts().items() if count > 0}
    for k, count in plan.inserted_counts().items():
        if count > 0:
            pools[('inserted', k)] = ensure_inserted_pool(plan.paint_source_of(k), plan.real, plan.train_items[k], k,
                                                          count, plan.fold_seed(k), os.path.join(cfg.outdir, 'synthetic'),
                                                          progress=cfg.progress)
    results, todo = {arm: {} for arm in plan.arms}, []
    for k in range(cfg.folds):
        for arm in plan.arms:
            path = os.path.join(cfg.outdir, 'folds', f'fold{k}-{arm}.json')
            if os.path.isfile(path):
                with open(path) as f:
                    results[arm][k] = json.load(f)
            else:
                todo.append((k, arm))
    with dnnlib.ProgressBar(len(todo) * cfg.steps, desc='segmentation', unit='steps', enabled=cfg.progress) as bar:
        for n, (k, arm) in enumerate(todo):
            results[arm][k] = _run_one(plan, k, arm, pools, bar, n * cfg.steps)
    return write_results(plan, results)


def write_results(plan, results: dict) -> dict:
    cfg = plan.cfg
    stats = report.summarise(results, plan.arms)
    out = dict(config=_protocol_options(cfg), arms=plan.arms, regions=list(report.REGIONS), metrics=list(report.METRICS),
               folds=[dict(fold=k, test_cases=test, num_real_train_items=len(plan.train_items[k]))
                      for k, test in enumerate(plan.folds)],
               kind=plan.real.kind, spatial_shape=plan.real.spatial_shape, patch=plan.patch,
               generator_saw_test_cases=plan.generator_saw_test_cases,
               per_fold={arm: [results[arm][k] for k in sorted(results[arm])] for arm in plan.arms}, **stats)
    table = report.format_table(stats, plan.arms)
    _write_json(os.path.join(cfg.outdir, 'results.json'), out)
    with dnnlib.atomic_output(os.path.join(cfg.outdir, 'results.md'), suffix='.md') as tmp, open(tmp, 'w') as f:
        f.write(table + '\n')
    report.draw_plot(stats, plan.arms, os.path.join(cfg.outdir, 'results.png'))
    if cfg.progress:
        print(table)
    return out


__all__ = ['ARCHS', 'ARM_KINDS', 'Plan', 'default_config', 'expand_arms', 'pool_kind', 'run_protocol', 'synthetic_count']
