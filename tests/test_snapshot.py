"""Safe snapshots: round trip with weights_only, untrusted classes refused, crafted pickles never run."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from tests.helpers import make_png_folder
from torch_utils import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Boom:
    """Unpickling this object creates a marker file: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def _tiny_G():
    from training.networks import Generator
    return Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=8, img_channels=1, mapping_kwargs=dict(num_layers=1),
                     channel_base=64, channel_max=8, num_fp16_res=0)


def test_round_trip_weights_only(tmp_path):
    G = _tiny_G()
    path = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(path, dict(G=G, D=None), dataset=dict(resolution=8, channels=['t2w'], label_names=['a', 'b']))
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw['modules']['G']['class_name'] == 'training.networks.Generator'
    data = snapshot.load_snapshot(path)
    assert data.D is None and data.dataset.channels == ['t2w']
    z, c = torch.randn(2, 8), torch.eye(2)
    torch.testing.assert_close(data.G(z, c), G.eval()(z, c))
    assert not os.path.exists(str(tmp_path) + '/.tmp-')  # no temp file left


def test_untrusted_class_refused(tmp_path):
    G = _tiny_G()
    path = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(path, dict(G=G))
    data = torch.load(path, weights_only=True)
    data['modules']['G']['class_name'] = 'os.system'
    del data['checksum']  # A crafted file, not a damaged one.
    torch.save(data, path)
    with pytest.raises(snapshot.SnapshotError, match='refuses to build'):
        snapshot.load_snapshot(path)


@pytest.mark.parametrize('name', ['this.Nothing', 'torch.nn.Identity', 'training.loss.StyleGAN2Loss'])
def test_nested_hook_class_names_are_refused_before_import(tmp_path, name):
    """A hook's class name inside init_kwargs once made every tool import the module it named (its import-time
    code ran: ``this`` prints the Zen of Python) or build a class of another library. Now the table decides."""
    from training.networks import Generator
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=1, mapping_kwargs=dict(num_layers=1),
                  channel_base=64, channel_max=8, num_fp16_res=0, attn_res=[4],
                  attn_kwargs=dict(class_name='training.attention.SelfAttention'))
    path = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(path, dict(G=G))
    data = torch.load(path, weights_only=True)
    assert data['modules']['G']['init_kwargs']['attn_kwargs']['class_name'] == 'training.attention.SelfAttention'
    data['modules']['G']['init_kwargs']['attn_kwargs']['class_name'] = name
    del data['checksum']  # A crafted file, not a damaged one.
    torch.save(data, path)
    code = (f'import sys; from torch_utils import snapshot\n'
            f'try:\n    snapshot.load_snapshot({path!r})\nexcept snapshot.SnapshotError as e:\n    print("refused:", e)\n'
            f'print("imported" if "this" in sys.modules else "not imported")')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert 'refused:' in out and repr(name) in out and out.strip().endswith('not imported'), out
    assert 'Zen of Python' not in out


def test_run_dir_class_names_are_refused_before_import(tmp_path):
    """training_options.json is data: ``augment_kwargs = {class_name: os.system, command: ...}`` once ran the
    command on --resume. Now the resume is refused in one line and nothing runs."""
    import json
    from click.testing import CliRunner
    import train
    run = tmp_path / 'run'
    run.mkdir()
    marker = tmp_path / 'ran'
    (run / 'training-state.pt').write_bytes(b'')
    (run / 'training_options.json').write_text(json.dumps(dict(
        run_dir=str(run), augment_kwargs=dict(class_name='os.system', command=f'touch {marker}'))))
    result = CliRunner().invoke(train.main, ['--resume', str(run)])
    assert result.exit_code == 2 and "'os.system'" in result.output and 'Traceback' not in result.output, result.output
    assert not marker.exists()


def test_damaged_snapshot_is_refused(tmp_path):
    """64 flipped bytes inside a tensor once loaded and were used (torch's zip reader checks no CRC)."""
    G = _tiny_G()
    path = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(path, dict(G=G))
    snapshot.load_snapshot(path)
    raw = bytearray(open(path, 'rb').read())
    weight = G.synthesis.b8.conv1.weight.detach().numpy().tobytes()
    at = bytes(raw).find(weight[:64])
    assert at > 0
    raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
    with open(path, 'wb') as f:
        f.write(raw)
    with pytest.raises(snapshot.SnapshotError, match='damaged'):
        snapshot.load_snapshot(path)


def test_size_claims_are_refused_before_allocation(tmp_path):
    """A snapshot recording z_dim = 2**40 once crashed every tool with an allocation traceback."""
    G = _tiny_G()
    path = str(tmp_path / 'net.pt')
    snapshot.save_snapshot(path, dict(G=G))
    data = torch.load(path, weights_only=True)
    data['modules']['G']['init_kwargs']['z_dim'] = 2 ** 40
    del data['checksum']
    torch.save(data, path)
    with pytest.raises(snapshot.SnapshotError, match='z_dim=1099511627776'):
        snapshot.load_snapshot(path)


def test_crafted_pickle_is_not_run(tmp_path):
    marker = str(tmp_path / 'pwned')
    pkl = str(tmp_path / 'network.pkl')
    with open(pkl, 'wb') as f:
        pickle.dump({'G_ema': _Boom(marker)}, f)
    with pytest.raises(snapshot.PickleRefused, match='refuses to unpickle builtins.open|io.open'):
        snapshot.load_snapshot(pkl)
    assert not os.path.exists(marker)
    # A torch.save zip whose pickle names code is refused by weights_only loading too.
    pt = str(tmp_path / 'evil.pt')
    torch.save({'format': snapshot.SNAPSHOT_FORMAT, 'x': _Boom(marker)}, pt)
    with pytest.raises(snapshot.SnapshotError, match='not a readable snapshot'):
        snapshot.load_snapshot(pt)
    assert not os.path.exists(marker)
    data = make_png_folder(str(tmp_path / 'data'), n=4, res=8)
    # The CLIs refuse it as well, with a one-line message and a non-zero exit code.
    for cmd in ([sys.executable, 'generate.py', '--network', pkl, '--seeds', '0', '--outdir', str(tmp_path / 'o')],
                [sys.executable, 'generate.py', '--network', pt, '--seeds', '0', '--outdir', str(tmp_path / 'o')],
                [sys.executable, 'train.py', '--outdir', str(tmp_path / 'r'), '--data', data, '--resume', pkl, '--dry-run']):
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert res.returncode != 0
        assert 'Traceback' not in res.stderr
        assert not os.path.exists(marker)
    # The old opt-in no longer opens a way in: nothing unpickles code.
    with pytest.raises(snapshot.PickleRefused):
        snapshot.load_snapshot(pkl, allow_pickle=True)
    assert not os.path.exists(marker)
