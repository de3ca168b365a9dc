"""Downstream segmentation (calc_segmentation.py, mri/downstream, the mask_dice metric): region scores against
hand-made masks, folds by case, identical real data per arm, mask fidelity, the CLI end to end, and bad input."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from tests.helpers import blob_labels

pytest.importorskip('monai')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEG = ['seg_netc', 'seg_snfh', 'seg_et']


# ----------------------------------------------------------------------------
# Tiny archives whose tumour is easy to see: a blob whose rings carry the labels, brighter per label.

def _encode(labels, rnd, with_seg=True):
    brightness = np.array([0.15, 1.0, 0.45, 0.75])[labels]
    image = np.clip(brightness + 0.03 * rnd.randn(*labels.shape), 0, 1)
    chans = [image] + ([labels == k for k in (1, 2, 3)] if with_seg else [])
    return np.rint(np.stack(chans).astype(np.float64) * 65535).astype(np.uint16)


def make_seg_archive(path, cases=6, per_case=6, res=16, volumes=False, with_seg=True, seed=0, val_cases=0):
    """A zip in dataset_tool.py's format: t2w (+ seg channels), labels by plane, file_cases; blobs in
    alternating quadrants, and every third slice without tumour."""
    rnd = np.random.RandomState(seed)
    meta = dict(labels=[], label_names=['axial'], label_groups=[dict(name='plane', values=['axial'])],
                channels=['t2w'] + (SEG if with_seg else []), kind='volumes' if volumes else 'slices',
                cases={}, file_cases={})
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        for c in range(cases):
            case = f'BraTS-TST-{c:05d}-000'
            meta['cases'][case] = 'val' if c < val_cases else 'train'
            for s in range(1 if volumes else per_case):
                shape = (res,) * (3 if volumes else 2)
                q = (c * per_case + s) % 4
                centre = [res * (0.3 if (q >> (i % 2)) & 1 else 0.7) for i in range(len(shape))]
                labels = blob_labels(shape, centre, res * 0.22) if volumes or s % 3 != 2 else np.zeros(shape, np.uint8)
                name = f'{case}/{case}.npy' if volumes else f'{case}/axial-{40 + s:03d}.npy'
                buf = _npy_bytes(_encode(labels, rnd, with_seg))
                z.writestr(name, buf)
                meta['labels'].append([name, [1.0]])
                meta['file_cases'][name] = case
        z.writestr('dataset.json', json.dumps(meta))
    return str(path)


def _npy_bytes(array):
    import io
    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def make_snapshot(path, archive, channels=('t2w',) + tuple(SEG), res=16):
    """A tiny untrained joint generator saved as a real snapshot (what train.py writes, minus the training)."""
    from torch_utils import snapshot
    from training.networks import Generator
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=1, w_dim=8, img_resolution=res, img_channels=len(channels),
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    desc = dict(path=os.path.abspath(archive), resolution=res, channels=list(channels), label_names=['axial'],
                label_groups=[dict(name='plane', values=['axial'])], kind='slices', image_shape=[len(channels), res, res],
                subset='all', dtype_max=65535)
    snapshot.save_snapshot(str(path), dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=desc)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('seg')
    archive = make_seg_archive(tmp / 'seg.zip')
    return dict(tmp=tmp, archive=archive, snapshot=make_snapshot(tmp / 'joint.pt', archive))


# ----------------------------------------------------------------------------
# Region scores.

def test_region_scores_against_hand_made_masks():
    from mri.downstream.regions import mask_scores, region_scores
    ref = np.zeros([10, 10], bool)
    ref[2:6, 2:6] = True
    moved = np.zeros_like(ref)
    moved[2:6, 4:8] = True  # 2 px to the right: half the area overlaps, every surface point within 2 px
    s = mask_scores(moved, ref)
    assert s['dice'] == pytest.approx(2 * 8 / (16 + 16))
    assert s['hd95'] == pytest.approx(2.0)
    assert mask_scores(ref, ref) == dict(dice=1.0, hd95=0.0)
    empty = np.zeros_like(ref)
    diag = np.sqrt(10 ** 2 + 10 ** 2)
    assert mask_scores(empty, ref) == pytest.approx(dict(dice=0.0, hd95=diag))   # empty prediction
    assert mask_scores(ref, empty) == pytest.approx(dict(dice=0.0, hd95=diag))   # empty reference
    assert mask_scores(empty, empty) == dict(dice=1.0, hd95=0.0)                 # nothing to find, nothing found
    assert mask_scores(empty, empty, spacing=[2, 1])['hd95'] == 0.0
    assert mask_scores(empty, ref, spacing=[2.0, 1.0])['hd95'] == pytest.approx(np.sqrt(20 ** 2 + 10 ** 2))

    # Regions: the reference has oedema (2) around an enhancing core (3) around necrosis (1).
    labels = np.zeros([12, 12], np.int64)
    labels[2:10, 2:10] = 2
    labels[4:8, 4:8] = 3
    labels[5:7, 5:7] = 1
    all_oedema = np.where(labels > 0, 2, 0)
    r = region_scores(all_oedema, labels)
    assert r['WT'] == dict(dice=1.0, hd95=0.0)
    assert r['TC']['dice'] == 0.0 and r['ET']['dice'] == 0.0 and r['ET']['hd95'] == pytest.approx(np.sqrt(288))
    core_as_et = np.where(labels == 1, 3, labels)  # necrosis called enhancing: WT and TC right, ET too big
    r = region_scores(core_as_et, labels)
    assert r['WT']['dice'] == 1.0 and r['TC']['dice'] == 1.0
    assert r['ET']['dice'] == pytest.approx(2 * 12 / (16 + 12))
    # 3D label maps go through the same code.
    vol = np.zeros([6, 6, 6], np.int64)
    vol[1:4, 1:4, 1:4] = 3
    assert region_scores(vol, vol)['ET'] == dict(dice=1.0, hd95=0.0)
    assert region_scores(np.zeros_like(vol), vol)['TC']['hd95'] == pytest.approx(np.sqrt(3 * 36))


# ----------------------------------------------------------------------------
# Folds and arms.

def test_folds_never_share_a_case(files):
    from mri.downstream.data import RealArchive, SegmentationError, make_folds
    cases = [f'c{i}' for i in range(7)]
    folds = make_folds(cases, 3, seed=1)
    assert sorted(len(f) for f in folds) == [2, 2, 3]
    assert sorted(sum(folds, [])) == cases  # every case tested exactly once
    assert make_folds(cases, 3, seed=1) == folds and make_folds(cases, 3, seed=2) != folds
    with pytest.raises(SegmentationError, match='only 7 cases'):
        make_folds(cases, 8, seed=0)
    # Item level: no slice of a test case is in its fold's training items.
    from mri.downstream.protocol import Plan, default_config
    plan = Plan(default_config(data=files['archive'], folds=3, arms=['real'], outdir=str(files['tmp'] / 'unused')))
    real = RealArchive(files['archive'])
    for test, train in zip(plan.folds, plan.train_items):
        assert not set(real.items_of(test)) & set(train)
        assert len(real.items_of(test)) + len(train) == len(real)
        assert not {real.item_cases[i] for i in train} & set(test)
    # --test-subset val: the folds test only on the val split, the train split always trains, and a generator
    # trained on the train split has seen no test case.
    split = make_seg_archive(files['tmp'] / 'split.zip', val_cases=4)
    snap = make_snapshot(files['tmp'] / 'split-joint.pt', split)
    cfg = default_config(data=split, networks=[snap], folds=2, test_subset='val', outdir=str(files['tmp'] / 'unused'))
    plan = Plan(cfg)
    val = [f'BraTS-TST-{c:05d}-000' for c in range(4)]
    assert sorted(sum(plan.folds, [])) == val and plan.generator_saw_test_cases
    real = RealArchive(split)
    for test, train in zip(plan.folds, plan.train_items):
        assert {real.item_cases[i] for i in train} == set(real.case_ids) - set(test)
    snapshot = torch.load(snap, weights_only=True)
    snapshot['dataset']['subset'] = 'train'
    torch.save(snapshot, snap)
    assert not Plan(cfg).generator_saw_test_cases
    with pytest.raises(SegmentationError, match="its 'val' split has only 4 cases"):
        Plan(default_config(**dict(cfg, folds=5)))


def test_each_arm_sees_the_same_real_images(files):
    from mri.downstream.protocol import Plan, default_config
    cfg = default_config(data=files['archive'], networks=[files['snapshot']], folds=2, ratios=[0.5, 2],
                         arms=['real', 'real+synthetic', 'synthetic'], features=4, levels=2,
                         outdir=str(files['tmp'] / 'unused'))
    plan = Plan(cfg)
    assert plan.arms == ['real', 'real+synthetic@0.5', 'real+synthetic@2', 'synthetic']
    pools = {0: ('images.npy', 'labels.npy')}  # only looked at, never read, in this test
    for k in range(2):
        sets = {arm: plan.training_items(k, arm, pools) for arm in plan.arms}
        n = len(sets['real'].real_indices)
        for arm in ('real+synthetic@0.5', 'real+synthetic@2'):
            assert sets[arm].real_indices == sets['real'].real_indices
        assert [s.num_synthetic for s in sets.values()] == [0, round(0.5 * n), 2 * n, n]
        assert sets['synthetic'].real_indices == []
        for i in range(n):  # the same pixels and labels, item by item
            for a, b in zip(sets['real'][i], sets['real+synthetic@2'][i]):
                assert torch.equal(a, b)
        # The same starting weights in every arm of a fold.
        weights = [dict(plan.initial_model(k, arm)[0].state_dict()) for arm in plan.arms]
        for w in weights[1:]:
            assert all(torch.equal(w[name], weights[0][name]) for name in w)


# ----------------------------------------------------------------------------
# mask_dice.

class _PairsG(torch.nn.Module):
    """A stand-in generator that hands out real image/mask pairs (optionally with the masks of other items)."""

    def __init__(self, items, shuffle):
        super().__init__()
        images = torch.stack([torch.cat([x, torch.stack([(y == k).float() * 2 - 1 for k in (1, 2, 3)])]) for x, y in items])
        if shuffle:  # the mask of the next item: its blob sits in another quadrant
            images = torch.cat([images[:, :1], images[:, 1:].roll(1, dims=0)], dim=1)
        self.register_buffer('images', images)
        self.z_dim, self.c_dim, self.img_channels = 4, 1, images.shape[1]
        self.next = 0

    def forward(self, z, c, **_kwargs):
        idx = (torch.arange(z.shape[0]) + self.next) % self.images.shape[0]
        self.next += z.shape[0]
        return self.images[idx]


def test_mask_dice_is_high_for_real_pairs_and_low_for_shuffled_masks(files):
    from metrics import metric_main
    from mri.downstream import engine
    from mri.downstream.data import RealArchive, TrainingItems
    from mri.downstream.model import build_segmenter, save_segmenter
    real = RealArchive(files['archive'])
    engine.seed_everything(0)
    model = build_segmenter('unet', 2, 1, features=8, levels=2)
    items = TrainingItems(real, list(range(len(real))))
    model = engine.train_segmenter(model, items, steps=120, batch=12, lr=1e-2, seed=0, device='cpu', patch=[16, 16])
    path = str(files['tmp'] / 'segmenter.pt')
    save_segmenter(path, model, dict(arch='unet', spatial_dims=2, in_channels=1, input_names=['t2w'], features=8,
                                     levels=2, patch=[16, 16]))
    tumour = [real.load(i) for i in range(len(real)) if real.load(i)[1].any()]
    kwargs = dict(dataset_kwargs=dict(path=files['archive'], use_labels=True), segmenter=path, num_gen=len(tumour),
                  batch_size=8, device='cpu', cache=False)
    good = metric_main.calc_metric('mask_dice', G=_PairsG(tumour, shuffle=False), **kwargs).results
    bad = metric_main.calc_metric('mask_dice', G=_PairsG(tumour, shuffle=True), **kwargs).results
    assert good.mask_dice > 0.85 and good.mask_dice_wt > 0.9, good
    assert bad.mask_dice < 0.15 and bad.mask_dice_wt < 0.15, bad
    assert set(good) == {'mask_dice', 'mask_dice_wt', 'mask_dice_tc', 'mask_dice_et', 'mask_dice_netc', 'mask_dice_snfh'}


# ----------------------------------------------------------------------------
# The CLI end to end, resume, volumes, pretrained+finetune.

def _cli(*args):
    return subprocess.run([sys.executable, 'calc_segmentation.py'] + [str(a) for a in args], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_end_to_end_and_resume(files):
    out = files['tmp'] / 'eval'
    args = ['--data', files['archive'], '--network', files['snapshot'], '--outdir', out, '--folds', '2',
            '--synthetic-ratio', '0.5,1', '--steps', '6', '--batch', '4', '--features', '4', '--levels', '2']
    res = _cli(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert 'that the folds test on' in res.stdout  # the generator was trained on all of --data
    results = json.loads((out / 'results.json').read_text())
    arms = ['real', 'real+synthetic@0.5', 'real+synthetic@1', 'synthetic']
    assert results['arms'] == arms and results['folds_complete'] == [0, 1]
    assert results['generator_saw_test_cases'] is True
    for arm in arms:
        assert len(results['per_fold'][arm]) == 2
        for region in ('WT', 'TC', 'ET'):
            s = results['summary'][arm][region]
            assert 0 <= s['dice']['mean'] <= 1 and s['hd95']['mean'] >= 0 and len(s['dice']['per_fold']) == 2
    assert set(results['paired']) == set(arms[1:])
    assert results['paired']['synthetic']['WT']['dice']['wilcoxon_min_p'] == 0.5
    tested = sorted(sum((f['test_cases'] for f in results['folds']), []))
    assert tested == sorted(f'BraTS-TST-{c:05d}-000' for c in range(6))
    assert PIL.Image.open(out / 'results.png').mode == 'RGB'
    assert '| real+synthetic@1 |' in (out / 'results.md').read_text()
    assert sorted(os.listdir(out / 'checkpoints')) == sorted(f'fold{k}-{a}.pt' for k in range(2) for a in arms)
    # Run again (in this process: MONAI's import is the slow part of a start): every fold is done, nothing retrained.
    import calc_segmentation
    stamps = {p: os.path.getmtime(out / 'folds' / p) for p in os.listdir(out / 'folds')}
    res = CliRunner().invoke(calc_segmentation.main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert stamps == {p: os.path.getmtime(out / 'folds' / p) for p in os.listdir(out / 'folds')}
    # Other options in the same outdir: refused, nothing touched.
    res = CliRunner().invoke(calc_segmentation.main, [str(a) for a in args[:-6]] + ['--steps', '7', '--batch', '4',
                                                                                   '--features', '4', '--levels', '2'])
    assert res.exit_code != 0 and 'steps' in res.output and 'Traceback' not in res.output, res.output
    assert stamps == {p: os.path.getmtime(out / 'folds' / p) for p in os.listdir(out / 'folds')}
    # A fresh outdir that another run holds (it made the folder first): refused in one line naming the PID.
    from training.checkpoint import RunLock
    fresh = files['tmp'] / 'eval-busy'
    with RunLock(str(_mkdir(fresh))):
        res = CliRunner().invoke(calc_segmentation.main, [str(a) for a in args[:5]] + [str(fresh)] + [str(a) for a in args[6:]])
    assert res.exit_code != 0 and str(os.getpid()) in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (fresh / 'folds').exists()


def _mkdir(path):
    path.mkdir()
    return path


def test_volumes_and_pretrained_finetune(tmp_path):
    from mri.downstream.protocol import default_config, run_protocol
    archive = make_seg_archive(tmp_path / 'vol.zip', cases=3, res=8, volumes=True)
    common = dict(data=archive, folds=3, features=4, levels=2, steps=3, batch=2, progress=False)
    first = run_protocol(default_config(arms=['real'], outdir=str(tmp_path / 'a'), **common))
    assert first['kind'] == 'volumes' and first['patch'] == [8, 8, 8]
    assert all(len(r['per_case']) == 1 for r in first['per_fold']['real'])
    ckpt = str(tmp_path / 'a' / 'checkpoints' / 'fold0-real.pt')
    second = run_protocol(default_config(arms=['real', 'pretrained+finetune'], pretrained=ckpt,
                                         outdir=str(tmp_path / 'b'), **common))
    assert second['arms'] == ['real', 'pretrained+finetune']
    assert [r['num_real'] for r in second['per_fold']['pretrained+finetune']] == [2, 2, 2]
    assert 'pretrained+finetune' in second['paired']
    # mask_dice on volumes: [N, C, D, H, W] from the generator, the 3D segmenter of fold 0.
    from metrics import metric_main
    from mri.downstream.data import RealArchive
    real = RealArchive(archive)
    res = metric_main.calc_metric('mask_dice', G=_PairsG([real.load(i) for i in range(len(real))], shuffle=False),
                                  dataset_kwargs=dict(path=archive, use_labels=True), segmenter=ckpt, num_gen=3,
                                  batch_size=2, device='cpu', cache=False).results
    assert 0 <= res.mask_dice <= 1 and set(res) >= {'mask_dice_wt', 'mask_dice_snfh'}


# ----------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing written.

def _bad(args, expect):
    import calc_segmentation
    res = CliRunner().invoke(calc_segmentation.main, [str(a) for a in args])
    assert res.exit_code != 0, res.output
    assert expect in res.output and 'Traceback' not in res.output, res.output
    error_lines = [line for line in res.output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1, res.output


def test_bad_input_one_line_nothing_written(files, tmp_path):
    out = tmp_path / 'never'
    no_seg = make_seg_archive(tmp_path / 'noseg.zip', with_seg=False)
    _bad(['--data', no_seg, '--network', files['snapshot'], '--outdir', out], 'no tumour-label channels')
    image_only = make_snapshot(tmp_path / 'image-only.pt', files['archive'], channels=('t2w',))
    _bad(['--data', files['archive'], '--network', image_only, '--outdir', out], 'generates no tumour masks')
    _bad(['--data', files['archive'], '--network', files['snapshot'], '--outdir', out, '--folds', '7'],
         'only 6 cases')
    _bad(['--data', files['archive'], '--outdir', out], '--network')
    _bad(['--data', files['archive'], '--outdir', out, '--arms', 'real', '--pretrained', tmp_path / 'missing.pt'],
         'missing.pt')
    assert not out.exists()


def test_segmenter_checkpoint_round_trip_and_foreign_files(tmp_path):
    from mri.downstream.data import SegmentationError
    from mri.downstream.model import build_segmenter, load_segmenter, save_segmenter
    spec = dict(arch='unet', spatial_dims=2, in_channels=2, features=4, levels=2, input_names=['t1n', 't2f'])
    model = build_segmenter('unet', 2, 2, features=4, levels=2)
    path = str(tmp_path / 'seg.pt')
    save_segmenter(path, model, spec)
    loaded, got = load_segmenter(path)
    assert dict(got) == spec and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    torch.save({'format': 'mri-gan-inpainter/1'}, tmp_path / 'other.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    wider = dict(spec, features=8)
    save_segmenter(str(tmp_path / 'wider.pt'), model, wider)
    for name, message in [('missing.pt', 'no such segmenter checkpoint'),
                          ('junk.pt', 'not a readable segmenter checkpoint'),
                          ('other.pt', 'not a segmenter checkpoint of calc_segmentation.py'),
                          ('wider.pt', 'weights do not fit unet')]:
        with pytest.raises(SegmentationError, match=message) as err:
            load_segmenter(str(tmp_path / name))
        assert '\n' not in str(err.value)
