"""NVlabs pickles load without running code from the file; anything outside the admitted globals is refused."""

import os
import pickle
import pickletools
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.nvlabs_fake import PERSISTENCE, tiny_nvlabs_nets, write_nvlabs_pickle
from torch_utils import legacy, snapshot

# State-dict names of NVlabs' StyleGAN2-ADA networks (training/networks.py of stylegan2-ada-pytorch) for an 8-px
# conditional G (2 mapping layers) and resnet D, written out by hand from their constructors.
NVLABS_G_NAMES = sorted(
    ['mapping.embed.weight', 'mapping.embed.bias', 'mapping.fc0.weight', 'mapping.fc0.bias', 'mapping.fc1.weight',
     'mapping.fc1.bias', 'mapping.w_avg', 'synthesis.b4.const', 'synthesis.b4.resample_filter']
    + [f'synthesis.b4.conv1.{n}' for n in ('weight', 'bias', 'noise_strength', 'noise_const', 'resample_filter',
                                           'affine.weight', 'affine.bias')]
    + [f'synthesis.b4.torgb.{n}' for n in ('weight', 'bias', 'affine.weight', 'affine.bias')]
    + ['synthesis.b8.resample_filter']
    + [f'synthesis.b8.{c}.{n}' for c in ('conv0', 'conv1') for n in ('weight', 'bias', 'noise_strength', 'noise_const',
                                                                       'resample_filter', 'affine.weight', 'affine.bias')]
    + [f'synthesis.b8.torgb.{n}' for n in ('weight', 'bias', 'affine.weight', 'affine.bias')])
NVLABS_D_NAMES = sorted(
    ['b8.resample_filter', 'b8.skip.weight', 'b8.skip.resample_filter']
    + [f'b8.{c}.{n}' for c in ('fromrgb', 'conv0', 'conv1') for n in ('weight', 'bias', 'resample_filter')]
    + [f'mapping.{n}' for n in ('embed.weight', 'embed.bias', 'fc0.weight', 'fc0.bias', 'fc1.weight', 'fc1.bias')]
    + ['b4.conv.weight', 'b4.conv.bias', 'b4.conv.resample_filter', 'b4.fc.weight', 'b4.fc.bias', 'b4.out.weight',
       'b4.out.bias'])


def test_state_names_match_nvlabs():
    nets = tiny_nvlabs_nets()
    assert sorted(nets['G'][0].state_dict()) == NVLABS_G_NAMES
    assert sorted(nets['D'][0].state_dict()) == NVLABS_D_NAMES


@pytest.mark.parametrize('protocol', [2, 4])
def test_nvlabs_pickle_loads_identically(tmp_path, protocol):
    marker = str(tmp_path / 'ran-code')
    nets = tiny_nvlabs_nets()
    pkl = write_nvlabs_pickle(str(tmp_path / 'network-snapshot-000100.pkl'), nets, marker, protocol=protocol,
                              training_set_kwargs=dict(class_name='training.dataset.ImageFolderDataset',
                                                       path='/data/ffhq8.zip', use_labels=True, xflip=False, resolution=8))
    globals_named = {arg for op, arg, _ in pickletools.genops(open(pkl, 'rb').read()) if op.name == 'GLOBAL'}
    if protocol == 2:  # The format really is NVlabs': the reconstruct call names their module.
        assert f'{PERSISTENCE} _reconstruct_persistent_obj' in globals_named
    assert PERSISTENCE not in sys.modules

    data = snapshot.load_snapshot(pkl)
    assert not os.path.exists(marker)
    assert type(data.G_ema).__module__ == 'training.networks' and type(data.D).__module__ == 'training.networks'
    assert data.dataset.resolution == 8 and data.dataset.channels == ['red', 'green', 'blue']
    assert data.extra.training_set_kwargs['path'] == '/data/ffhq8.zip'
    z, c = torch.randn(3, 8), torch.eye(2)[[0, 1, 0]]
    for key in ('G', 'G_ema'):
        torch.testing.assert_close(data[key](z, c, noise_mode='const'), nets[key][0](z, c, noise_mode='const'), rtol=0, atol=0)
        torch.testing.assert_close(data[key](z, c, truncation_psi=0.5, noise_mode='const'),
                                   nets[key][0](z, c, truncation_psi=0.5, noise_mode='const'), rtol=0, atol=0)
    img = torch.randn(4, 3, 8, 8)
    c4 = torch.eye(2)[[0, 1, 1, 0]]
    torch.testing.assert_close(data.D(img, c4), nets['D'][0](img, c4), rtol=0, atol=0)
    assert float(data.augment_pipe.p) == pytest.approx(0.3)
    assert data.augment_pipe.init_kwargs['rotate90'] == 1
    # What NVlabs' defaults mean is kept where ours differ (their fp16 and clamping defaults are off).
    raw = legacy.read_nvlabs_pickle(pkl)
    assert raw['modules']['G']['init_kwargs']['synthesis_kwargs']['num_fp16_res'] == 0
    # The pickle stores the low-pass filters as NVlabs does (4x4 outer products); they come back as our 1-D taps.
    stored = legacy.restricted_load(pkl)['D'].state['_modules']['b8'].state['_modules']['conv1'].state['_buffers']
    assert tuple(stored['resample_filter'].shape) == (4, 4)
    assert tuple(raw['modules']['D']['state_dict']['b8.conv1.resample_filter'].shape) == (4,)


def test_nvlabs_filter_that_is_not_separable_is_refused(tmp_path):
    nets = tiny_nvlabs_nets()
    nets['D'][0].b8.conv1.resample_filter = torch.tensor([[1., 2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    pkl = write_nvlabs_pickle(str(tmp_path / 'odd.pkl'), nets, str(tmp_path / 'ran-code'))
    with pytest.raises(snapshot.SnapshotError, match=r'b8.conv1.resample_filter: the 4x4 filter is not the outer product'):
        snapshot.load_snapshot(pkl)


class _Gadget:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _typed_storage():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TypedStorage deprecation: NVlabs-era pickles hold typed storages.
        return torch.zeros(2).storage()


def _gadgets(marker):
    touch = f'open({marker!r}, "w").close()'
    return {
        'os.system': _Gadget(os.system, (f'touch {marker}',)),
        'builtins.eval': _Gadget(eval, (touch,)),
        'builtins.exec': _Gadget(exec, (touch,)),
        'open': _Gadget(open, (marker, 'w')),
        # The storage path: bytes that torch's *unrestricted* legacy loader would unpickle.
        'storage': _Gadget(torch.storage._load_from_bytes, (pickle.dumps(_Gadget(open, (marker, 'w'))),)),
        # A tensor whose rebuild arguments carry backward hooks (made of admitted parts, so the hook check refuses).
        'hook': _Gadget(torch._utils._rebuild_tensor_v2, (_typed_storage(), 0, (2,), (1,), False,
                                                         {'h': 1})),
    }


@pytest.mark.parametrize('name', ['os.system', 'builtins.eval', 'builtins.exec', 'open', 'storage', 'hook'])
def test_malicious_pickle_refused(tmp_path, name):
    marker = str(tmp_path / 'pwned')
    pkl = str(tmp_path / 'network-snapshot.pkl')
    with open(pkl, 'wb') as f:
        pickle.dump({'G_ema': _gadgets(marker)[name]}, f)
    with pytest.raises(snapshot.SnapshotError) as info:
        snapshot.load_snapshot(pkl)
    message = str(info.value)
    assert '\n' not in message and message.startswith(pkl)
    assert not os.path.exists(marker)
    if name in ('os.system', 'builtins.eval', 'builtins.exec', 'open'):
        assert isinstance(info.value, snapshot.PickleRefused) and 'refuses to unpickle' in message


def test_refusal_names_the_global(tmp_path):
    pkl = str(tmp_path / 'x.pkl')
    with open(pkl, 'wb') as f:
        pickle.dump({'G': _Gadget(eval, ('1',))}, f)
    with pytest.raises(snapshot.PickleRefused, match=r'builtins\.eval'):
        legacy.read_nvlabs_pickle(pkl)
    # Not an NVlabs network (plain data of the admitted kinds): a clear one-liner as well.
    with open(pkl, 'wb') as f:
        pickle.dump({'G': np.float32(1)}, f)
    with pytest.raises(snapshot.SnapshotError, match='not an NVlabs persistent network'):
        legacy.read_nvlabs_pickle(pkl)
    # StyleGAN3 networks share the class names; their recorded source (read as text) tells them apart.
    nets = tiny_nvlabs_nets()
    write_nvlabs_pickle(pkl, {'G_ema': nets['G_ema']}, str(tmp_path / 'm'), extra_src='class SynthesisInput: pass\n')
    with pytest.raises(snapshot.SnapshotError, match='StyleGAN3 Generator; only StyleGAN2-ADA'):
        legacy.read_nvlabs_pickle(pkl)


def test_clis_take_nvlabs_pickles_without_a_flag(tmp_path):
    import generate
    marker = str(tmp_path / 'ran-code')
    pkl = write_nvlabs_pickle(str(tmp_path / 'net.pkl'), tiny_nvlabs_nets(), marker)
    out = str(tmp_path / 'out')
    res = CliRunner().invoke(generate.main, ['--network', pkl, '--seeds', '0-1', '--class', 'class1', '--outdir', out,
                                             '--device', 'cpu'])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == ['seed0000.png', 'seed0001.png'] and not os.path.exists(marker)
    evil = str(tmp_path / 'evil.pkl')
    with open(evil, 'wb') as f:
        pickle.dump({'G_ema': _Gadget(os.system, (f'touch {marker}',))}, f)
    res = CliRunner().invoke(generate.main, ['--network', evil, '--seeds', '0', '--outdir', out, '--allow-pickle'])
    assert res.exit_code == 1 and not os.path.exists(marker)
    assert 'deprecated and ignored' in res.output
    error = [line for line in res.output.splitlines() if line.startswith('Error:')]
    assert len(error) == 1 and 'system' in error[0] and evil in error[0]


def test_calc_metrics_takes_an_nvlabs_pickle(tmp_path):
    import calc_metrics
    from tests.helpers import make_png_folder
    marker = str(tmp_path / 'ran-code')
    pkl = write_nvlabs_pickle(str(tmp_path / 'net.pkl'), tiny_nvlabs_nets(), marker)
    data = make_png_folder(str(tmp_path / 'rgb'), n=8, res=8, num_classes=2, channels=3)
    (result,) = calc_metrics.calc_metrics(pkl, ['mse_nn'], data=data, num_gen=4, batch=4, progress=False,
                                          run_dir=str(tmp_path))
    assert np.isfinite(result.results['mse_nn']) and not os.path.exists(marker)


def test_top_level_legacy_loads_pkl_and_pt_as_nvlabs_scripts_expect(tmp_path):
    """`import legacy; legacy.load_network_pkl(f)['G_ema']`, as NVlabs' scripts call it, for an NVlabs .pkl and a
    .pt of ours alike, from an open file (and a file object without a path), with no code from the file run."""
    import io
    import legacy as nvlabs_style
    marker = str(tmp_path / 'ran-code')
    nets = tiny_nvlabs_nets()
    pkl = write_nvlabs_pickle(str(tmp_path / 'network-snapshot-000100.pkl'), nets, marker,
                              training_set_kwargs=dict(path='/data/ffhq8.zip', use_labels=True))
    with open(pkl, 'rb') as f:
        out = nvlabs_style.load_network_pkl(f)
    assert set(out) >= {'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'} and not os.path.exists(marker)
    z, c = torch.randn(2, 8), torch.eye(2)
    torch.testing.assert_close(out['G_ema'](z, c, noise_mode='const'), nets['G_ema'][0](z, c, noise_mode='const'),
                               rtol=0, atol=0)
    assert out['training_set_kwargs']['path'] == '/data/ffhq8.zip' and float(out['augment_pipe'].p) == pytest.approx(0.3)
    # Our .pt: the same keys; its training_set_kwargs come from the recorded config. A BytesIO has no path.
    pt = str(tmp_path / 'network-snapshot-000000100.pt')
    snapshot.save_snapshot(pt, dict(G=out['G'], D=out['D'], G_ema=out['G_ema'], augment_pipe=out['augment_pipe']),
                           dataset=dict(resolution=8), extra=dict(config=dict(training_set_kwargs=dict(path='x.zip'))))
    with open(pt, 'rb') as f:
        again = nvlabs_style.load_network_pkl(io.BytesIO(f.read()))
    torch.testing.assert_close(again['G_ema'](z, c, noise_mode='const'), out['G_ema'](z, c, noise_mode='const'),
                               rtol=0, atol=0)
    assert again['training_set_kwargs'] == {'path': 'x.zip'} and again['dataset']['resolution'] == 8
    # force_fp16: rebuilt with fp16 in the highest resolutions and conv clamping, weights unchanged.
    fp16 = nvlabs_style.load_network_pkl(pkl, force_fp16=True)
    assert fp16['G_ema'].init_kwargs['synthesis_kwargs']['num_fp16_res'] == nvlabs_style.FP16_RES
    assert fp16['D'].init_kwargs['conv_clamp'] == nvlabs_style.FP16_CONV_CLAMP
    for key, value in out['G_ema'].state_dict().items():
        assert torch.equal(fp16['G_ema'].state_dict()[key], value), key
    # A pickle that names code is refused in one line, as everywhere else.
    evil = str(tmp_path / 'evil.pkl')
    with open(evil, 'wb') as f:
        pickle.dump({'G_ema': _Gadget(os.system, (f'touch {marker}',))}, f)
    with open(evil, 'rb') as f, pytest.raises(snapshot.PickleRefused, match='system'):
        nvlabs_style.load_network_pkl(f)
    assert not os.path.exists(marker)
