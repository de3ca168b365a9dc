"""Command-line habits shared by every script: switches (bare and =1/=0), ranges shown = ranges enforced, ``~`` in
paths, --class by index only where unambiguous, and resolutions the trainer cannot use refused up front."""

import importlib
import os
import re
import sys

import click
import pytest
from click.testing import CliRunner

import calc_metrics
import calc_segmentation
import dataset_tool
import generate
import train
from tests.helpers import make_png_folder
from training import cli
from training import config
from training.labels import ClassSpecError, parse_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))

COMMANDS = {'train.py': train.main, 'generate.py': generate.main, 'calc_metrics.py': calc_metrics.main,
            'calc_segmentation.py': calc_segmentation.main,
            'dataset_tool.py': dataset_tool.main, 'bench/ablation.py': importlib.import_module('ablation').main,
            'bench/bench_metrics.py': importlib.import_module('bench_metrics').main,
            'bench/bench_dataset_tool.py': importlib.import_module('bench_dataset_tool').main}
# Documented exceptions: an off-switch spelling kept for old scripts (same as --progress=0).
NOT_SWITCHES = {('dataset_tool.py', 'no_progress'), ('calc_segmentation.py', 'no_progress'),
                ('calc_segmentation.py', 'no_augment')}


def _switches(name, command):
    out = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == 'help' or (name, param.name) in NOT_SWITCHES:
            continue
        if param.is_flag or isinstance(param.type, click.types.BoolParamType):
            out.append(param)
    return out


def test_every_switch_of_every_cli_takes_bare_and_value_forms():
    seen = 0
    for name, command in COMMANDS.items():
        for param in _switches(name, command):
            flag = max(param.opts, key=len)
            for args, expected in [([flag], True), ([f'{flag}=1'], True), ([f'{flag}=0'], False), ([f'{flag}=true'], True),
                                   ([f'{flag}=false'], False)]:
                ctx = command.make_context(name, list(args), resilient_parsing=True)
                assert ctx.params[param.name] is expected, (name, args, ctx.params[param.name])
            seen += 1
    assert seen >= 14  # cond, mirror, topk, fp32, nobench, allow-tf32, dry-run, allow-pickle x3, mirror, with-seg, ...


def test_bare_switch_before_another_option_and_bad_word():
    ctx = train.main.make_context('train.py', ['--topk', '--topk-gamma', '0.5', '--cond', '--mirror', '--fp32', '--nobench'])
    assert ctx.params['topk'] and ctx.params['topk_gamma'] == 0.5 and ctx.params['cond'] and ctx.params['nobench']
    res = CliRunner().invoke(train.main, ['--cond=maybe'])
    assert res.exit_code == 2 and "'--cond'" in res.output and 'maybe' in res.output


def test_argparse_bench_switch():
    bench_networks = importlib.import_module('bench_networks')
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_bool_argument(parser, '--baseline')
    assert parser.parse_args(['--baseline']).baseline is True
    assert parser.parse_args(['--baseline=0']).baseline is False
    assert parser.parse_args([]).baseline is False
    assert 'add_bool_argument' in open(bench_networks.__file__).read()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_png_folder(str(tmp_path_factory.mktemp('data') / 'pngs'), n=4, res=16, num_classes=2)


def test_ranges_shown_are_ranges_enforced(data_dir):
    runner = CliRunner()
    helptext = ' '.join(runner.invoke(train.main, ['--help'], terminal_width=200).output.split())
    assert re.search(r'--fq-decay FLOAT .*?0<x<1\]', helptext)
    assert re.search(r'--topk-gamma FLOAT .*?0<x<=1\]', helptext) and re.search(r'--topk-min FLOAT .*?0<x<=1\]', helptext)
    base = ['--data', data_dir, '--outdir', 'unused', '-n', '--device', 'cpu', '--metrics', 'none']
    for args, shown in [(['--fq-res', '8', '--fq-decay', '1'], '0<x<1'), (['--fq-res', '8', '--fq-decay', '0'], '0<x<1'),
                        (['--topk', '--topk-gamma', '0'], '0<x<=1'), (['--topk', '--topk-min', '0'], '0<x<=1')]:
        res = runner.invoke(train.main, base + args)
        assert res.exit_code == 2 and shown in res.output, res.output
    for args in (['--fq-res', '8', '--fq-decay', '0.999'], ['--topk', '--topk-gamma', '1', '--topk-min', '1']):
        res = runner.invoke(train.main, base + args)
        assert res.exit_code == 0, res.output
    # The library entry point enforces the same objects the CLI shows.
    for name, value in [('fq_decay', 1.0), ('topk_gamma', 0.0), ('topk_min', 0.0)]:
        assert next(p for p in train.main.params if p.name == name).type is config.RANGES[name]
        with pytest.raises(click.UsageError, match='--' + name.replace('_', '-')):
            config.setup_training_config(data=data_dir, device='cpu', metrics='none', fq_res='8', topk=True,
                                         **{name: value})


def test_paths_expand_home(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', os.path.dirname(data_dir))
    res = CliRunner().invoke(train.main, [f'--data=~/{os.path.basename(data_dir)}', '--outdir=~/runs', '-n', '--device',
                                          'cpu', '--metrics', 'none'])
    assert res.exit_code == 0, res.output
    assert f'"path": "{data_dir}"' in res.output and os.path.join(os.path.dirname(data_dir), 'runs') in res.output
    for command, option in [(generate.main, 'network'), (generate.main, 'outdir'), (calc_metrics.main, 'network'),
                            (calc_metrics.main, 'data'), (calc_metrics.main, 'detector'), (dataset_tool.main, 'dest'),
                            (dataset_tool.main, 'source'), (train.main, 'resume'), (train.main, 'vgg_detector'),
                            (calc_segmentation.main, 'data'), (calc_segmentation.main, 'outdir'),
                            (calc_segmentation.main, 'pretrained')]:
        assert next(p for p in command.params if p.name == option).type is cli.PATH, (command.name, option)
    assert cli.PATH.convert('~/x.zip', None, None) == os.path.join(os.path.dirname(data_dir), 'x.zip')


def test_class_index_only_with_one_label_group():
    names = ['axial', 'coronal', 't1n', 't2w']
    groups = [dict(name='plane', values=['axial', 'coronal']), dict(name='modality', values=['t1n', 't2w'])]
    with pytest.raises(ClassSpecError) as info:
        parse_class('3', names, groups)
    message = str(info.value)
    assert '\n' not in message and 'axial' in message and 't2w' in message and 'group' in message
    assert parse_class('coronal,t2w', names, groups).tolist() == [0, 1, 0, 1]
    assert parse_class('1', ['axial', 'coronal'], [dict(name='plane', values=['axial', 'coronal'])]).tolist() == [0, 1]
    assert parse_class('1', ['class0', 'class1']).tolist() == [0, 1]  # StyleGAN2-ADA-style labels: one group.


def test_shape_problem_is_the_one_resolution_check():
    assert cli.shape_problem((64, 64)) is None and cli.shape_problem((4, 4)) is None
    for shape in [(48, 48), (2, 2), (64, 32), (96, 96)]:
        assert cli.shape_problem(shape), shape
    # A future anisotropic volume network passes its base shape.
    assert cli.shape_problem((48, 64, 64), base_shape=(3, 4, 4)) is None
    assert cli.shape_problem((48, 64, 64)) and cli.shape_problem((24, 64, 64), base_shape=(3, 4, 4))


def test_dataset_tool_refuses_a_resolution_the_trainer_cannot_use(tmp_path):
    dest = tmp_path / 'out.zip'
    res = CliRunner().invoke(dataset_tool.main, ['--source', 'phantom', '--phantom-cases', '1', '--dest', str(dest),
                                                 '--resolution', '48'])
    assert res.exit_code == 2 and '--resolution' in res.output and '48x48' in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.startswith('Error')]) == 1
    assert not dest.exists() and os.listdir(tmp_path) == []


def test_default_workers_never_exceed_the_cores(data_dir, monkeypatch):
    """The default 3 DataLoader workers made torch warn twice on every 2-core run; an explicit --workers is kept."""
    from training.config import setup_training_config
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    c = setup_training_config(data=data_dir, device='cpu', metrics='none')
    assert c.data_loader_kwargs.num_workers == 2
    assert setup_training_config(data=data_dir, device='cpu', metrics='none', workers=3).data_loader_kwargs.num_workers == 3
