"""style_mixing.py and interpolate.py (issue 19): StyleGAN's style-mixing figure and interpolation videos, 2D and
3D, drawn through training.sampling so that a seed is the same image as in generate.py."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import interpolate
import style_mixing
from torch_utils import snapshot
from training import grids, sampling
from training.networks import Generator

CHANNELS = ['t1n', 't1c', 't2w', 't2f', 'seg_netc', 'seg_snfh', 'seg_et']
AXIAL = np.array([1, 0], np.float32)


def _snapshot(path, resolution, names, kind):
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=2, w_dim=8, img_resolution=resolution, img_channels=len(CHANNELS),
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    snapshot.save_snapshot(str(path), {'G_ema': G}, dataset=dict(
        kind=kind, channels=CHANNELS, label_names=names, label_groups=[dict(name='group', values=names)]))
    return str(path)


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp('nets')
    return dict(slices=_snapshot(root / 'net2d.pt', 16, ['axial', 'coronal'], 'slices'),
                volumes=_snapshot(root / 'net3d.pt', [8, 8, 8], ['gli', 'ssa'], 'volumes'))


def _load(path):
    return style_mixing.load_generator(path, 'cpu')[0]


def _mix(*args):
    return CliRunner().invoke(style_mixing.main, [str(a) for a in args] + ['--device', 'cpu'])


def _video(*args):
    return CliRunner().invoke(interpolate.main, [str(a) for a in args] + ['--device', 'cpu'])


# ---------------------------------------------------------------------------------------------------------------
# Style mixing


def test_mix_ws_replaces_only_the_named_layers():
    row, col = torch.zeros(2, 6, 4), torch.ones(3, 6, 4)
    mixed = style_mixing.mix_ws(row, col, [1, 4])
    assert mixed.shape == (2, 3, 6, 4)
    assert (mixed[:, :, [1, 4]] == 1).all() and (mixed[:, :, [0, 2, 3, 5]] == 0).all()
    assert torch.equal(style_mixing.mix_ws(row, col, []), row[:, None].expand(2, 3, 6, 4))


@pytest.mark.parametrize('kind', ['slices', 'volumes'])
def test_mixed_images_differ_from_both_sources_and_empty_styles_keep_the_row(nets, tmp_path, kind):
    G = _load(nets[kind])
    kw = dict(class_spec='axial' if kind == 'slices' else 'gli', truncation_psi=0.7, save_npy=True, device='cpu',
              verbose=False)
    row = sampling.sample(G, 0, AXIAL, 0.7, averages=sampling.ClassAverages())
    col = sampling.sample(G, 5, AXIAL, 0.7, averages=sampling.ClassAverages())
    style_mixing.style_mix(nets[kind], [0], [5], '', str(tmp_path / 'none'), **kw)
    assert np.allclose(np.load(tmp_path / 'none' / '0-5.npy'), row, atol=1e-5)
    style_mixing.style_mix(nets[kind], [0], [5], f'0-{G.num_ws - 1}', str(tmp_path / 'every'), **kw)
    assert np.allclose(np.load(tmp_path / 'every' / '0-5.npy'), col, atol=1e-5)
    style_mixing.style_mix(nets[kind], [0], [5], '0-1', str(tmp_path / 'some'), **kw)
    mixed = np.load(tmp_path / 'some' / '0-5.npy')
    assert mixed.shape == row.shape == ((7, 16, 16) if kind == 'slices' else (7, 8, 8, 8))
    assert np.abs(mixed - row).max() > 1e-3 and np.abs(mixed - col).max() > 1e-3


def test_mixing_grid_puts_sources_on_the_margins():
    cell = lambda v: np.tile(np.array([v, 0, 255], np.uint8), [6, 5, 1])  # noqa: E731  (no grey text matches)
    rows, cols = [cell(10), cell(20)], [cell(30), cell(40), cell(50)]
    mixed = [[cell(100 + 10 * r + c) for c in range(3)] for r in range(2)]
    grid = np.array(style_mixing.mixing_grid(rows, cols, mixed, [0, 1], [10, 11, 12]))

    def where(v):
        ys, xs = np.nonzero((grid == [v, 0, 255]).all(axis=2))
        assert len(ys) == 30 and np.ptp(ys) == 5 and np.ptp(xs) == 4, v  # one whole 6x5 cell
        return ys.min(), xs.min()

    for r in range(2):
        for c in range(3):
            y, x = where(100 + 10 * r + c)
            assert y == where(10 + 10 * r)[0] and x == where(30 + 10 * c)[1]   # the row's and the column's source
            assert y > where(30)[0] and x > where(10)[1]                         # sources above and left
    corner = grid[where(30)[0]:where(30)[0] + 6, where(10)[1]:where(10)[1] + 5]
    assert (corner == grids.BACKGROUND).all()
    assert (grid[:where(30)[0]] < 128).any() and (grid[:, :where(10)[1]] < 128).any()  # the seeds in the margins


def test_cli_writes_the_grid_and_each_mixed_image_2d(nets, tmp_path):
    out = tmp_path / 'out'
    r = _mix('--network', nets['slices'], '--rows', '0-2', '--cols', '10-13', '--styles', '0-2', '--class', 'axial',
             '--trunc', '0.7', '--outdir', out)
    assert r.exit_code == 0, r.output + repr(r.exception)
    names = sorted(os.listdir(out))
    assert names == sorted(['grid.png'] + [f'{a}-{b}.png' for a in range(3) for b in range(10, 14)])
    cell = np.array(PIL.Image.open(out / '0-10.png'))
    assert cell.shape == (16, 16, 3)  # one channel (t1n) with the labels over it, not 4 modalities side by side
    grid = np.array(PIL.Image.open(out / 'grid.png'))
    assert grid.shape[0] > 4 * 16 and grid.shape[1] > 5 * 16 and grid.shape[2] == 3
    assert 'num_ws=6' in r.output
    no_overlay = tmp_path / 'plain'
    r = _mix('--network', nets['slices'], '--rows', '0', '--cols', '1', '--styles', '0', '--class', 'axial',
             '--channel', 't2f', '--overlay=0', '--outdir', no_overlay)
    plain = np.array(PIL.Image.open(no_overlay / '0-1.png'))
    assert r.exit_code == 0 and (plain[..., 0] == plain[..., 1]).all()  # grey: no label colours


def test_cli_volumes_show_three_plane_cells(nets, tmp_path):
    out = tmp_path / 'out'
    r = _mix('--network', nets['volumes'], '--rows', '0-1', '--cols', '5-7', '--styles', '0-3', '--class', 'ssa',
             '--outdir', out, '--npy')
    assert r.exit_code == 0, r.output + repr(r.exception)
    cell = np.array(PIL.Image.open(out / '1-7.png'))
    assert cell.shape == (2 * 8, 3 * 8, 3)  # three mid-planes; the channel, then the label overlay
    assert np.load(out / '1-7.npy').shape == (7, 8, 8, 8) and os.path.isfile(out / 'grid.png')


@pytest.mark.parametrize('args, expected', [
    (['--styles', '0-6'], '--styles 0-6: index 4 is out of range; this network has num_ws=4 (styles 0-3)'),
    (['--styles', 'a'], '--styles a:'),
    (['--class', 'nope'], "--class nope: unknown name 'nope'"),
    (['--class', 'all'], '--class all: this draws one class'),
    (['--channel', 'seg_et'], '--channel seg_et: not an image channel'),
])
def test_bad_input_is_one_line_and_writes_nothing(nets, tmp_path, args, expected):
    opts = {'--class': 'ssa', '--styles': '0-1', **dict(zip(args[::2], args[1::2]))}
    r = _mix('--network', nets['volumes'], '--rows', '0', '--cols', '1', '--outdir', tmp_path / 'out',
             *[v for kv in opts.items() for v in kv])
    assert r.exit_code != 0 and expected in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not os.path.exists(tmp_path / 'out')


def test_unconditional_network_needs_no_class(tmp_path):
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=1, mapping_kwargs=dict(num_layers=1),
                  channel_base=64, channel_max=8)
    snapshot.save_snapshot(str(tmp_path / 'net.pt'), {'G_ema': G}, dataset=dict(kind='slices'))
    r = _mix('--network', tmp_path / 'net.pt', '--rows', '0', '--cols', '1', '--styles', '0', '--trunc', '0.5',
             '--outdir', tmp_path / 'out')
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert np.array(PIL.Image.open(tmp_path / 'out' / '0-1.png')).shape == (8, 8, 3)


# ---------------------------------------------------------------------------------------------------------------
# Interpolation videos


def test_frame_positions_start_and_end_on_keyframes():
    assert interpolate.frame_count(4, 5, loop=False) == 16 and interpolate.frame_count(4, 5, loop=True) == 20
    pos = interpolate.frame_positions(3, 2, loop=False)
    assert pos == [(0, 1, 0.0), (0, 1, 0.5), (1, 2, 0.0), (1, 2, 0.5), (2, 2, 0.0)]
    assert interpolate.frame_positions(2, 2, loop=True) == [(0, 1, 0.0), (0, 1, 0.5), (1, 0, 0.0), (1, 0, 0.5)]


def test_slerp_keeps_the_ends_and_lerps_the_length():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(interpolate.slerp(a, b, 0.0), a) and torch.allclose(interpolate.slerp(a, b, 1.0), b)
    mid = interpolate.slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(), torch.tensor(2.0)) and torch.allclose(mid[0, 0] / 2, mid[0, 1] / 2)
    assert torch.allclose(interpolate.slerp(a, a, 0.3), a)  # the same point: no great circle, no NaN


def test_video_frames_count_and_first_frame_is_the_seed(nets, tmp_path):
    r = _video('--network', nets['slices'], '--seeds', '0-2', '--frames', '3', '--class', 'axial', '--trunc', '0.7',
               '--format', 'frames', '--outdir', tmp_path)
    assert r.exit_code == 0, r.output + repr(r.exception)
    frames = sorted(os.listdir(tmp_path / 'interpolation-frames'))
    assert frames == [f'frame{i:06d}.png' for i in range(7)] and sorted(os.listdir(tmp_path)) == ['interpolation-frames']
    G = _load(nets['slices'])
    names, shown = style_mixing.shown_channel(G, {'channels': CHANNELS})
    for frame, seed in [(0, 0), (3, 1), (6, 2)]:  # the keyframes are the seeds as generate.py draws them
        expected = style_mixing.render_cell(sampling.sample(G, seed, AXIAL, 0.7), names, shown)
        got = np.array(PIL.Image.open(tmp_path / 'interpolation-frames' / frames[frame]))
        assert np.abs(got.astype(int) - expected).max() <= 1
    r = _video('--network', nets['slices'], '--seeds', '0-1', '--frames', '2', '--class', 'axial', '--loop',
               '--format', 'frames', '--outdir', tmp_path)
    assert r.exit_code == 0 and len(os.listdir(tmp_path / 'interpolation-frames')) == 4  # replaced whole


def test_video_between_classes_with_one_seed(nets, tmp_path):
    r = _video('--network', nets['volumes'], '--seeds', '3', '--frames', '4', '--class', 'gli', '--to-class', 'ssa',
               '--slerp', '--format', 'frames', '--outdir', tmp_path)
    assert r.exit_code == 0, r.output + repr(r.exception)
    folder = tmp_path / 'interpolation-frames'
    first, last = (np.array(PIL.Image.open(folder / f'frame{i:06d}.png')) for i in (0, 4))
    assert len(os.listdir(folder)) == 5 and first.shape == (16, 24, 3)  # mid-planes of a volume
    G = _load(nets['volumes'])
    names, shown = style_mixing.shown_channel(G, {'channels': CHANNELS})
    ssa = style_mixing.render_cell(sampling.sample(G, 3, np.array([0, 1], np.float32)), names, shown)
    assert np.abs(last.astype(int) - ssa).max() <= 1 and not np.array_equal(first, last)


def test_video_falls_back_to_gif_without_imageio_ffmpeg(nets, tmp_path, monkeypatch):
    real = interpolate.importlib.util.find_spec
    monkeypatch.setattr(interpolate.importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'imageio_ffmpeg' else real(name, *a))
    r = _video('--network', nets['slices'], '--seeds', '0-1', '--frames', '3', '--class', 'coronal', '--fps', '10',
               '--outdir', tmp_path)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "MP4 needs imageio-ffmpeg (pip install 'mri-gan[video]')" in r.output
    assert sorted(os.listdir(tmp_path)) == ['interpolation.gif']  # no temporary folder left
    gif = PIL.Image.open(tmp_path / 'interpolation.gif')
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info['duration'])
    assert sum(durations) == 4 * 100  # 4 frames at 10 fps (identical neighbours may share one GIF frame)


def test_video_mp4_where_imageio_ffmpeg_is_installed(nets, tmp_path):
    pytest.importorskip('imageio_ffmpeg')
    import imageio
    r = _video('--network', nets['slices'], '--seeds', '0-1', '--frames', '4', '--class', 'axial', '--outdir', tmp_path)
    assert r.exit_code == 0, r.output + repr(r.exception)
    reader = imageio.get_reader(str(tmp_path / 'interpolation.mp4'))
    assert sum(1 for _ in reader) == 5


@pytest.mark.parametrize('args, expected', [
    (['--seeds', '4'], '--seeds 4: a video needs two seeds or more, or --to-class'),
    (['--seeds', '0-1', '--to-class', 'nope'], "--to-class nope: unknown name 'nope'"),
])
def test_video_bad_input_is_one_line(nets, tmp_path, args, expected):
    r = _video('--network', nets['slices'], '--class', 'axial', '--outdir', tmp_path / 'out', *args)
    assert r.exit_code != 0 and expected in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('fmt', ['gif', 'frames'])
def test_sigterm_mid_video_leaves_nothing(nets, tmp_path, monkeypatch, fmt):
    import signal
    drawn = []
    real = interpolate.render_cell

    def render_then_terminate(*args, **kwargs):
        drawn.append(1)
        if len(drawn) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled like Ctrl-C: the writer cleans up on the way out
        return real(*args, **kwargs)

    monkeypatch.setattr(interpolate, 'render_cell', render_then_terminate)
    before = signal.getsignal(signal.SIGTERM)
    r = _video('--network', nets['slices'], '--seeds', '0-1', '--frames', '5', '--class', 'axial', '--format', fmt,
               '--outdir', tmp_path / 'out')
    assert r.exit_code == 128 + signal.SIGTERM and 'terminated (SIGTERM); no video was written' in r.output
    assert os.listdir(tmp_path / 'out') == [] and signal.getsignal(signal.SIGTERM) == before  # restored
