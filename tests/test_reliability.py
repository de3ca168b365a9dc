"""One line instead of a traceback or silence, for the audit's small cases (issue 20, item 9 and item 8's
calc_metrics --run-dir): each reproduced through the CLI a user types."""

import os

import pytest
import torch
from click.testing import CliRunner

import calc_metrics
import dnnlib
import generate
from torch_utils import snapshot


@pytest.fixture(scope='module')
def snap(tmp_path_factory):
    from training.networks import Generator
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=1, mapping_kwargs=dict(num_layers=1),
                  channel_base=64, channel_max=8, num_fp16_res=0)
    path = str(tmp_path_factory.mktemp('snap') / 'network-snapshot-000000000.pt')
    snapshot.save_snapshot(path, dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=dict(channels=['t2w']))
    return path


def _one_line_error(result, *fragments):
    assert result.exit_code != 0 and 'Traceback' not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1, result.output
    for text in fragments:
        assert text in errors[0], errors[0]


def test_a_seed_range_too_long_is_refused(snap, tmp_path):
    with pytest.raises(ValueError, match='at most'):
        dnnlib.parse_range('0-999999999999')
    result = CliRunner().invoke(generate.main, ['--network', snap, '--seeds', '0-999999999999', '--outdir',
                                                str(tmp_path / 'out'), '--device', 'cpu'])
    _one_line_error(result, '--seeds', 'at most')


def test_generate_outdir_naming_a_file(snap, tmp_path):
    (tmp_path / 'file').write_text('x')
    result = CliRunner().invoke(generate.main, ['--network', snap, '--seeds', '0', '--outdir', str(tmp_path / 'file'),
                                                '--device', 'cpu'])
    _one_line_error(result, '--outdir', 'not a folder')
    assert (tmp_path / 'file').read_text() == 'x'


def test_snapshot_whose_modules_is_a_list(snap, tmp_path):
    data = torch.load(snap, weights_only=True)
    data['modules'] = [data['modules']['G']]
    del data['checksum']
    path = str(tmp_path / 'bad.pt')
    torch.save(data, path)
    result = CliRunner().invoke(generate.main, ['--network', path, '--seeds', '0', '--outdir', str(tmp_path / 'o'),
                                                '--device', 'cpu'])
    _one_line_error(result, 'bad.pt', 'modules')


def test_calc_metrics_run_dir_missing_is_refused(snap, tmp_path):
    result = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--metrics', 'msssim_div', '--data',
                                                    os.path.dirname(snap), '--run-dir', str(tmp_path / 'missing'),
                                                    '--device', 'cpu'])
    _one_line_error(result, '--run-dir', 'no such folder')


def test_calc_metrics_keeps_finished_metrics_when_a_later_one_fails(snap, tmp_path):
    """A later metric's failure once threw away the results of the finished ones (printed nowhere, saved nowhere)."""
    from tests.helpers import make_png_folder
    data = make_png_folder(str(tmp_path / 'pngs'), n=8, res=8)
    run = tmp_path / 'run'
    run.mkdir()
    result = CliRunner().invoke(calc_metrics.main, ['--network', snap, '--metrics', 'msssim_div,mask_dice', '--data',
                                                    data, '--run-dir', str(run), '--device', 'cpu', '--num-gen', '8'])
    assert result.exit_code != 0 and 'Traceback' not in result.output, result.output
    assert '"metric": "msssim_div"' in result.output
    assert (run / 'metric-msssim_div.jsonl').is_file() and not (run / 'metric-mask_dice.jsonl').exists()
