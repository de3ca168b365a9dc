"""The privacy gate (metrics/privacy.py): planted copies are dropped, fresh samples kept, in 2D and 3D, on zip
archives as users get them; the pre-filter finds the exhaustive search's neighbour; the report and bad input."""

import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from metrics import msssim
from metrics import privacy

CHANNELS = ['t1n', 't2w', 'seg_netc']


def brain(shape, rng):
    """A brain-like image in [0, 1]: an ellipsoid of blocky random texture plus fine noise, background 0."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing='ij')
    radii = 0.75 + 0.15 * rng.rand(len(shape))
    inside = sum((g / r) ** 2 for g, r in zip(grids, radii)) < 1
    coarse = rng.rand(*[4] * len(shape))
    for axis, s in enumerate(shape):
        coarse = np.repeat(coarse, -(-s // 4), axis=axis)
    tex = coarse[tuple(slice(0, s) for s in shape)]
    return np.where(inside, 0.3 + 0.5 * tex + 0.2 * rng.rand(*shape), 0), inside


def make_item(shape, rng) -> np.ndarray:
    """[3, *shape] uint8: two modalities and a one-hot tumour channel."""
    a, inside = brain(shape, rng)
    b = np.where(inside, 1 - 0.7 * a, 0)
    seg = (a > 0.75) & inside
    return np.rint(np.stack([a, b, seg]) * 255).astype(np.uint8)


def make_archive(path, shape, cases=4, per_case=2, seed=0, val_cases=0, labels=False):
    """A zip archive of .npy items (dataset.json with channels, cases, split; with ``labels`` a plane label
    axial/coronal alternating by item) as dataset_tool.py writes them."""
    rng = np.random.RandomState(seed)
    items, meta = {}, {'channels': CHANNELS, 'kind': 'volumes' if len(shape) == 3 else 'slices',
                       'file_cases': {}, 'cases': {}}
    for c in range(cases):
        case = f'case{c}'
        meta['cases'][case] = 'val' if c < val_cases else 'train'
        for k in range(per_case):
            name = f'{case}/item{k}.npy'
            items[name] = make_item(shape, rng)
            meta['file_cases'][name] = case
    if labels:
        meta['labels'] = [[name, [float(i % 2 == 0), float(i % 2 == 1)]] for i, name in enumerate(items)]
        meta['label_names'] = ['axial', 'coronal']
        meta['label_groups'] = [{'name': 'plane', 'values': ['axial', 'coronal']}]
    with zipfile.ZipFile(path, 'w') as z:
        for name, arr in items.items():
            with z.open(name, 'w') as f:
                np.save(f, arr)
        z.writestr('dataset.json', json.dumps(meta))
    return path, items


def as_sample(item: np.ndarray) -> np.ndarray:
    return item.astype(np.float32) / 255 * 2 - 1


@pytest.fixture(scope='module')
def archive2d(tmp_path_factory):
    return make_archive(str(tmp_path_factory.mktemp('a2') / 'train.zip'), (64, 64), cases=6, per_case=3, val_cases=2)


@pytest.fixture(scope='module')
def archive3d(tmp_path_factory):
    return make_archive(str(tmp_path_factory.mktemp('a3') / 'train.zip'), (32, 32, 32), cases=4, per_case=2)


def _planted(items, rng):
    names = sorted(items)
    copy_name, near_name = names[1], names[-1]
    near = as_sample(items[near_name])
    near[:2] = np.clip(near[:2] + rng.normal(0, 0.05, near[:2].shape), -1, 1)
    return [('copy', as_sample(items[copy_name]), copy_name), ('near', near, near_name)]


def _fresh(shape, rng):
    fresh = as_sample(make_item(shape, np.random.RandomState(999)))
    noise = rng.uniform(-1, 1, (3,) + shape).astype(np.float32)
    return [('fresh', fresh), ('noise', noise)]


@pytest.mark.parametrize('which', ['archive2d', 'archive3d'])
def test_gate_drops_planted_copies_and_keeps_fresh(which, request, tmp_path):
    path, items = request.getfixturevalue(which)
    shape = next(iter(items.values())).shape[1:]
    rng = np.random.RandomState(1)
    gate = privacy.PrivacyGate(path, max_nn_ssim=0.8, verbose=False)
    for label, sample, source in _planted(items, rng):
        v = gate.check(sample, CHANNELS, label)
        assert not v['keep'] and v['nn_name'] == source, (label, v)
        assert v['nn_ssim'] > (0.999 if label == 'copy' else 0.8)
        if label == 'copy':
            assert v['nn_mse'] < 1e-6
    for label, sample in _fresh(shape, rng):
        v = gate.check(sample, CHANNELS, label)
        assert v['keep'] and v['nn_ssim'] < 0.6, (label, v)
    if len(shape) == 3:
        copy = gate.records[0]
        assert copy['max_slice_ssim'] > 0.999 and copy['max_slice_nn_name'] == copy['nn_name']
        assert gate.records[2]['max_slice_ssim'] < 0.8

    paths = gate.report(str(tmp_path / 'out'))
    assert [os.path.basename(p) for p in paths] == ['privacy-report.json', 'privacy-pairs.png']
    report = json.load(open(paths[0]))
    s = report['summary']
    assert (s['checked'], s['kept'], s['dropped']) == (4, 2, 2)
    assert [r['keep'] for r in report['samples']] == [False, False, True, True]
    assert s['threshold']['max_nn_ssim'] == 0.8 and s['channels_compared'] == ['t1n', 't2w']
    ref = s['reference']
    assert ref['what'].startswith('held-out' if len(shape) == 2 else 'training items to other cases')
    assert ref['items'] > 0 and ref['nn_ssim']['q100'] < 0.8  # different patients are not close
    with PIL.Image.open(paths[1]) as im:
        assert im.size[1] > 4 * (32 if len(shape) == 3 else 64)  # a row per pair (4 pairs)


def test_no_threshold_keeps_everything(archive2d):
    path, items = archive2d
    gate = privacy.PrivacyGate(path, verbose=False)
    name = sorted(items)[0]
    v = gate.check(as_sample(items[name]), CHANNELS, 'copy')
    assert v['keep'] and v['nn_ssim'] > 0.999 and v['nn_case'] == name.split('/')[0]


def test_label_channels_are_not_compared(archive2d):
    """A copy with different tumour labels is still a copy; the image channels decide."""
    path, items = archive2d
    name = sorted(items)[3]
    sample = as_sample(items[name])
    sample[2] = -sample[2]
    v = privacy.PrivacyGate(path, max_nn_ssim=0.9, verbose=False).check(sample, CHANNELS, 's')
    assert v['nn_ssim'] > 0.999 and not v['keep']


def test_channel_order_follows_names(archive2d):
    path, items = archive2d
    name = sorted(items)[2]
    sample = as_sample(items[name])[[1, 2, 0]]
    v = privacy.PrivacyGate(path, verbose=False).check(sample, ['t2w', 'seg_netc', 't1n'], 's')
    assert v['nn_name'] == name and v['nn_ssim'] > 0.999


@pytest.mark.parametrize('which', ['archive2d', 'archive3d'])
def test_prefilter_finds_the_exhaustive_neighbour(which, request):
    path, items = request.getfixturevalue(which)
    shape = next(iter(items.values())).shape[1:]
    rng = np.random.RandomState(3)
    samples = [s for _l, s, _n in _planted(items, rng)] + [s for _l, s in _fresh(shape, rng)]
    for k in range(3):  # noisy versions of archive items: the hard case, many items similar
        src = as_sample(items[sorted(items)[k * 2]])
        samples.append(np.clip(src + rng.normal(0, 0.3, src.shape), -1, 1).astype(np.float32))
    rescaled = (as_sample(items[sorted(items)[1]]) + 1) * 0.6 - 1  # a copy at 60 % of the intensities
    samples.append(rescaled.astype(np.float32))
    fast = privacy.PrivacyGate(path, verbose=False, candidates=3)
    full = privacy.PrivacyGate(path, verbose=False, candidates=None)
    for i, s in enumerate(samples):
        a, b = fast.check(s, CHANNELS, 's'), full.check(s, CHANNELS, 's')
        if i == 3:  # uniform noise: near nothing, every SSIM about 0; which item wins is moot, the verdict is not
            assert a['nn_ssim'] == pytest.approx(b['nn_ssim'], abs=0.05)
            continue
        assert a['nn_index'] == b['nn_index'] and a['nn_ssim'] == pytest.approx(b['nn_ssim'], abs=1e-6)
        if s is rescaled:
            assert a['nn_name'] == sorted(items)[1] and a['nn_ssim'] > 0.6
        if len(shape) == 3:
            assert a['max_slice_ssim'] == pytest.approx(b['max_slice_ssim'], abs=1e-6)


def test_masked_ssim_agrees_with_msssim():
    """The gate's SSIM map is metrics.msssim's SSIM before its mean (2D and 3D)."""
    g = torch.Generator().manual_seed(0)
    for shape in ([2, 3, 24, 24], [2, 2, 16, 16, 16]):
        x = torch.rand(shape, generator=g)
        y = (x + 0.2 * torch.rand(shape, generator=g)).clamp(0, 1)
        everywhere = torch.ones([shape[0]] + shape[2:], dtype=torch.bool)
        assert torch.allclose(privacy.masked_ssim(x, y, everywhere), msssim.ssim(x, y), atol=1e-6)
    x = torch.rand([1, 1, 32, 32], generator=g)
    y = x.clone()
    y[..., :16] = torch.rand([1, 1, 32, 16], generator=g)  # differs only outside the mask
    mask = torch.zeros([1, 32, 32], dtype=torch.bool)
    mask[:, :, 24:] = True
    assert privacy.masked_ssim(x, y, mask).item() == pytest.approx(1, abs=1e-5)
    assert privacy.masked_mse(x, y, mask).item() == 0


def test_bad_input(tmp_path, archive2d, archive3d):
    with pytest.raises(privacy.PrivacyError, match=r'missing\.zip: training archive not found'):
        privacy.PrivacyGate(str(tmp_path / 'missing.zip'), verbose=False)
    gate = privacy.PrivacyGate(archive3d[0], verbose=False)
    with pytest.raises(privacy.PrivacyError, match=r'items of shape \[32, 32, 32\] differ from the generator.s \[16, 16, 16\]'):
        gate.check(np.zeros([3, 16, 16, 16], np.float32), CHANNELS, 's')
    with pytest.raises(privacy.PrivacyError, match=r"image channels \['t1n', 't2w'\] differ from the generator's \['t1n', 'flair'\]"):
        gate.check(np.zeros([3, 32, 32, 32], np.float32), ['t1n', 'flair', 'seg_netc'], 's')
    with pytest.raises(privacy.PrivacyError, match='SSIM lies in'):
        privacy.PrivacyGate(archive2d[0], max_nn_ssim=2, verbose=False)
    assert gate.records == []  # nothing half-recorded


def test_samples_report_cli(tmp_path, archive2d):
    """calc_privacy.py --samples: the gate's report over a folder of generated .npy samples; files are left alone."""
    from click.testing import CliRunner
    import calc_privacy
    from torch_utils import snapshot
    from training.dataset import ImageFolderDataset
    from training.networks import Generator
    path, items = archive2d
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=64, img_channels=3, mapping_kwargs=dict(num_layers=1),
                  channel_base=64, channel_max=8)
    net = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(net, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=ImageFolderDataset(path).describe())
    folder = tmp_path / 'samples'
    folder.mkdir()
    np.save(folder / 'seed0000.npy', as_sample(items[sorted(items)[0]]))                   # a copy, every channel
    np.save(folder / 'seed0001.npy', _fresh((64, 64), np.random.RandomState(0))[0][1][:2])  # image channels only
    res = CliRunner().invoke(calc_privacy.main, ['--network', net, '--samples', str(folder), '--max-nn-ssim', '0.9',
                                                 '--outdir', str(tmp_path / 'out')], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.load(open(tmp_path / 'out' / 'privacy-report.json'))
    assert [(r['name'], r['keep']) for r in report['samples']] == [('seed0000.npy', False), ('seed0001.npy', True)]
    assert sorted(os.listdir(folder)) == ['seed0000.npy', 'seed0001.npy']
    np.save(folder / 'seed0002.npy', np.zeros([4, 64, 64], np.float32))
    res = CliRunner().invoke(calc_privacy.main, ['--network', net, '--samples', str(folder), '--outdir', str(tmp_path / 'o2')],
                             catch_exceptions=False)
    assert res.exit_code == 1 and 'seed0002.npy: 4 channels, but the training archive has 3' in res.output


def test_merge_states_of_several_gates(tmp_path, archive2d):
    """Two ranks' gates merged into one report: every verdict, the closest pairs of both, order kept."""
    import copy
    path, items = archive2d
    names = sorted(items)
    a = privacy.PrivacyGate(path, max_nn_ssim=0.9, verbose=False)
    b = privacy.PrivacyGate(path, max_nn_ssim=0.9, verbose=False)
    a.check(as_sample(items[names[0]]), CHANNELS, 'rank0-copy')
    b.check(_fresh((64, 64), np.random.RandomState(0))[0][1], CHANNELS, 'rank1-fresh')
    b.check(as_sample(items[names[6]]), CHANNELS, 'rank1-copy')
    a.merge(copy.deepcopy(b.state()))  # a plain value, as it crosses from another rank
    a.merge({'records': [dict(name='earlier', nn_ssim=0.2, nn_mse=0.1, nn_index=0, nn_name=names[0], keep=True)]})
    assert [r['name'] for r in a.records] == ['rank0-copy', 'rank1-fresh', 'rank1-copy', 'earlier']
    assert a.records[0]['nn_split'] == 'val' and a.records[2]['nn_split'] == 'train'  # case0 is a val case, case2 a train case
    s = a.summary()
    assert (s['checked'], s['kept'], s['dropped']) == (4, 2, 2)
    a.report(str(tmp_path), reference=False)
    with PIL.Image.open(tmp_path / 'privacy-pairs.png') as im:
        assert im.size[1] > 3 * 64  # the three checked pairs (the earlier verdict has no picture)


def test_16bit_archive(tmp_path):
    """A 16-bit archive is kept as float16 in [0, 1]: a copy is still a copy, a fresh sample is not."""
    rng = np.random.RandomState(0)
    meta = {'channels': CHANNELS, 'file_cases': {}}
    items = {}
    with zipfile.ZipFile(tmp_path / 'a16.zip', 'w') as z:
        for i in range(4):
            name = f'c{i}/x.npy'
            items[name] = (make_item((32, 32), rng).astype(np.uint32) * 257).astype(np.uint16)
            meta['file_cases'][name] = f'c{i}'
            with z.open(name, 'w') as f:
                np.save(f, items[name])
        z.writestr('dataset.json', json.dumps(meta))
    gate = privacy.PrivacyGate(str(tmp_path / 'a16.zip'), max_nn_ssim=0.9, verbose=False)
    assert gate.pool.images.dtype == torch.float16
    copy = items['c2/x.npy'].astype(np.float32) / 65535 * 2 - 1
    v = gate.check(copy, CHANNELS, 'copy')
    assert not v['keep'] and v['nn_name'] == 'c2/x.npy' and v['nn_ssim'] > 0.999
    assert gate.check(as_sample(make_item((32, 32), np.random.RandomState(9))), CHANNELS, 'fresh')['keep']
