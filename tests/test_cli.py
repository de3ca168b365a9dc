"""Command-line habits shared by every script: switches (bare and =1/=0), ranges shown = ranges enforced, ``~`` in
paths, --class by index only where unambiguous, and resolutions the trainer cannot use refused up front."""

import glob
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
    """The default 3 DataLoader workers made torch warn twice on every 2-core run; an explicit --workers is kept.
    The cores counted are those this process may use (its CPU affinity, as torch counts them), not the machine's."""
    from training.config import setup_training_config
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 64)
    c = setup_training_config(data=data_dir, device='cpu', metrics='none')
    assert c.data_loader_kwargs.num_workers == 2
    assert setup_training_config(data=data_dir, device='cpu', metrics='none', workers=3).data_loader_kwargs.num_workers == 3


def test_training_doc_lists_the_options_resume_takes():
    """docs/training.md's list of the options --resume accepts mid-run is the code's list (it went stale once)."""
    with open(os.path.join(ROOT, 'docs', 'training.md')) as f:
        text = ' '.join(f.read().split())
    listed = re.search(r'Only the options that may change mid-run are taken: (.*?);', text).group(1)
    assert re.findall(r'`--([a-z0-9-]+)`', listed) == [o.replace('_', '-') for o in config.MID_RUN_OPTIONS]


# ----------------------------------------------------------------------------
# Every --help option explained in a doc, in docs/cli.md's vocabulary (issue 21).

def _top_level_scripts():
    """Every top-level script with a click ``main`` (new ones such as style_mixing.py are picked up by the glob)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, '*.py'))):
        name = os.path.basename(path)
        if name in ('conftest.py', 'setup.py'):
            continue
        module = importlib.import_module(name[:-3])
        if isinstance(getattr(module, 'main', None), click.Command):
            out[name] = module.main
    return out


def _bench_scripts():
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, 'bench', '*.py'))):
        module = importlib.import_module(os.path.basename(path)[:-3])
        if isinstance(getattr(module, 'main', None), click.Command):
            out['bench/' + os.path.basename(path)] = module.main
    return out


def _visible_options(command):
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def _docs_text():
    paths = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
    return '\n'.join(open(p, encoding='utf-8').read() for p in paths)


def test_every_help_option_is_explained_in_a_doc():
    docs = _docs_text()
    scripts = _top_level_scripts()
    assert {'train.py', 'generate.py', 'calc_metrics.py', 'dataset_tool.py', 'calc_segmentation.py'} <= set(scripts)
    missing = []
    for name, command in scripts.items():
        for param in _visible_options(command):
            for opt in param.opts + param.secondary_opts:
                if not re.search(re.escape(opt) + r'(?![\w-])', docs):
                    missing.append(f'{name} {opt}')
    assert not missing, ('options in --help that no doc names (explain each on its subject\'s page, or in '
                         'docs/cli.md "Options of one script"): ' + ', '.join(missing))


# click's own metavars, which docs/cli.md replaces with INT / FLOAT / LIST / PATH.
CLICK_METAVARS = {'INTEGER', 'INTEGER RANGE', 'FLOAT RANGE', 'TEXT', 'FILENAME', 'DIRECTORY', 'BOOLEAN'}
# Words docs/cli.md retired, and the word to use instead.
RETIRED = {'--out': '--outdir DIR (a folder) or --json PATH (a file)', '--output': '--outdir', '--out-dir': '--outdir',
           '--output-dir': '--outdir', '--quiet': '--progress=0', '--verbose': '--progress', '--json-out': '--json',
           '--seed-range': '--seeds', '--classes': '--class', '--num-samples': '--num-gen or --seeds'}
NO_SWITCHES = {'--no-progress', '--no-augment'}  # docs/cli.md: the only --no-X spellings.
# Found by the checks below in files other helpers own this session; the lead removes an entry when its rename lands.
PENDING = {}  # (script, option): why it may break the vocabulary for now


def _vocabulary_problems(name, command):
    ctx = click.Context(command)
    problems = []
    for param in _visible_options(command):
        flag = max(param.opts, key=len)
        if (name, flag) in PENDING:
            continue
        metavar = '' if param.is_flag else (param.make_metavar(ctx) or '')
        if metavar in CLICK_METAVARS:
            problems.append(f'{name} {flag}: metavar {metavar} (docs/cli.md: INT, FLOAT, LIST, PATH ...)')
        for opt in param.opts + param.secondary_opts:
            if opt in RETIRED:
                problems.append(f'{name} {opt}: use {RETIRED[opt]} (docs/cli.md)')
            if opt.startswith('--no-') and opt not in NO_SWITCHES and param.secondary_opts:
                problems.append(f'{name} {opt}: a switch is --x [BOOL] (bool_option), not --x/--no-x')
        if param.is_flag and not param.secondary_opts and flag not in NO_SWITCHES:
            problems.append(f'{name} {flag}: a switch is --x [BOOL] (bool_option: --x, --x=1, --x=0), not a bare flag')
        if metavar in ('PATH', 'DIR', 'ZIP|DIR') and param.type is not cli.PATH:
            problems.append(f'{name} {flag}: a {metavar} option uses training.cli.PATH (~ expanded)')
        if flag == '--subset' and set(getattr(param.type, 'choices', ())) != {'train', 'val', 'all'}:
            problems.append(f'{name} --subset: the choices are train|val|all (docs/cli.md)')
        if flag == '--outdir' and metavar != 'DIR':
            problems.append(f'{name} --outdir: metavar DIR (a folder)')
        if flag == '--seeds' and metavar != 'LIST':
            problems.append(f'{name} --seeds: metavar LIST (0-3,7)')
    return problems


def test_help_follows_the_vocabulary():
    problems = []
    for name, command in {**_top_level_scripts(), **_bench_scripts()}.items():
        problems += _vocabulary_problems(name, command)
    for path in sorted(glob.glob(os.path.join(ROOT, 'bench', '*.py'))):  # argparse benches build parsers in main()
        text = open(path, encoding='utf-8').read()
        for word, use in [("add_argument('--out'", 'add_json_argument'), ("action='store_true'", 'add_bool_argument')]:
            if word in text:
                problems.append(f'bench/{os.path.basename(path)}: {word}: use training.cli.{use}')
    assert not problems, 'options that break docs/cli.md\'s vocabulary:\n' + '\n'.join(problems)


def test_vocabulary_checks_catch_the_old_words():
    @click.command()
    @click.option('--out', type=str, metavar='PATH')
    @click.option('--gpus', type=click.IntRange(min=1))
    @click.option('--fast/--no-fast')
    @click.option('--subset', type=click.Choice(['a', 'b']))
    @click.option('--quick', is_flag=True)
    def old(out, gpus, fast, subset, quick):
        pass
    text = '\n'.join(_vocabulary_problems('old.py', old))
    assert '--out: use --outdir' in text and 'INTEGER RANGE' in text and '--no-fast' in text and '--subset' in text
    assert 'training.cli.PATH' in text and '--quick: a switch' in text


def test_shared_option_helpers():
    @click.command()
    @cli.seeds_option()
    @cli.outdir_option()
    @cli.json_option(default='r.json')
    @cli.progress_options
    def new(seeds, outdir, json_path, progress):
        click.echo(repr((seeds, outdir, json_path, progress)))
    runner = CliRunner()
    res = runner.invoke(new, ['--seeds', '0-2,7', '--outdir=~/o', '--no-progress'])
    assert res.output.strip() == repr(([0, 1, 2, 7], os.path.expanduser('~/o'), 'r.json', False)), res.output
    res = runner.invoke(new, ['--seeds', '1', '--outdir', 'o', '--out', 'old.json', '--progress=1'])  # hidden alias
    assert res.output.strip() == repr(([1], 'o', 'old.json', True)), res.output
    res = runner.invoke(new, ['--seeds', '3-1', '--outdir', 'o'])
    assert res.exit_code == 2 and "'--seeds'" in res.output and 'ends before it starts' in res.output
    helptext = runner.invoke(new, ['--help']).output
    assert '--out ' not in helptext and '--json PATH' in helptext and '--seeds LIST' in helptext
    assert not _vocabulary_problems('new.py', new)


# ----------------------------------------------------------------------------
# Messages that suggest an option suggest one that works (issue 21).

def test_fold_error_never_suggests_folds_that_fail_again():
    from mri.downstream.data import SegmentationError, make_folds
    with pytest.raises(SegmentationError) as info:
        make_folds(['case0'], 2, seed=0)
    assert '--folds 2' in str(info.value) and 'at least 2' in str(info.value) and 'use --folds' not in str(info.value)
    with pytest.raises(SegmentationError, match=r'use --folds 3 or more cases'):
        make_folds(['a', 'b', 'c'], 5, seed=0)
    assert len(make_folds(['a', 'b', 'c'], 3, seed=0)) == 3


def test_downloaded_archive_is_removed_after_extraction_or_kept_on_request(tmp_path, capsys):
    import zipfile
    from mri.sources import download
    src = tmp_path / 'src' / 'BraTS-SSA-00000-000'
    src.mkdir(parents=True)
    (src / 'BraTS-SSA-00000-000-t1n.nii.gz').write_bytes(b'not really nifti')
    pack = tmp_path / 'BraTS-Africa.zip'
    with zipfile.ZipFile(pack, 'w') as z:
        z.write(src / 'BraTS-SSA-00000-000-t1n.nii.gz', 'BraTS-SSA-00000-000/BraTS-SSA-00000-000-t1n.nii.gz')
    root = download.resolve_brats_africa(tmp_path / 'africa', download=pack.as_uri(), progress=False, environ={})
    assert (root / 'BraTS-SSA-00000-000' / 'BraTS-SSA-00000-000-t1n.nii.gz').is_file()
    assert not (tmp_path / '.africa-download').exists() and pack.is_file()  # Ours removed; the user's own file kept.
    line, = capsys.readouterr().err.strip().splitlines()
    assert 'removed the downloaded archive BraTS-Africa.zip' in line
    root = download.resolve_brats_africa(tmp_path / 'kept', download=str(pack), progress=False, environ={},
                                         keep_download=True)
    assert (tmp_path / '.kept-download' / 'BraTS-Africa.zip').is_file()
    line, = capsys.readouterr().err.strip().splitlines()
    assert 'kept the downloaded archive' in line and '.kept-download' in line


def test_dataset_tool_keep_download_reaches_the_download(tmp_path):
    """dataset_tool.py --keep-download passes through to the download (the case is no NIfTI, so the conversion
    itself fails afterwards: the kept archive is what this checks)."""
    import zipfile
    import dataset_tool
    pack = tmp_path / 'BraTS-Africa.zip'
    with zipfile.ZipFile(pack, 'w') as z:
        z.writestr('BraTS-SSA-00000-000/BraTS-SSA-00000-000-t1n.nii.gz', b'not really nifti')
    res = CliRunner().invoke(dataset_tool.main, ['--source', 'brats-africa', '--brats-root', str(tmp_path / 'kept'),
                                                 '--download', pack.as_uri(), '--keep-download', '--no-progress',
                                                 '--dest', str(tmp_path / 'out.zip')])
    assert (tmp_path / '.kept-download' / 'BraTS-Africa.zip').is_file(), res.output
    assert not (tmp_path / 'out.zip').exists()
