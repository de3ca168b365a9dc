"""Every shell command in README.md and docs/*.md runs, as written, at tiny sizes (issue 21).

The test reads each fenced block of README.md and docs/*.md (```bash, ```sh, ```console, ```shell or a bare ```),
takes the lines that start a command (``python``, ``python3``, ``bash``, ``torchrun``; a trailing ``\\`` joins the
next line), and runs them in the order of the file, one working folder per file, laid out as the docs assume:
``$HOME`` is a temporary folder whose ``~/data/...`` folders hold phantom BraTS cases, ``$BRATS_AFRICA_DIR`` points
at phantom BraTS-Africa-named cases, and an input the docs name but do not make (``--network runs/00000-.../...pt``,
``--data africa-vol.zip``) is put there from a tiny fixture of the kind its name says (volumes, patches, slices).

Only sizes are rewritten (``SIZE_RULES`` below: resolutions, kimg, batch, channel counts, seed ranges, num-gen,
steps, folds); ``TINY_ADDITIONS`` adds the size options a command leaves at a large default (train.py's channel
counts). Metrics run with a tiny random detector in place of Inception/VGG16 (a size too: the networks are the only
thing downloaded). A command that needs a GPU, a download, real BraTS data or more than a minute at any size carries
a marker in its trailing comment (docs/cli.md, "Commands in the docs"): ``# [gpu]``, ``# [download]``, ``# [brats]``,
``# [long]`` or ``# [skip: reason]``; it is reported as skipped with that reason. A line with a bare ``...`` word is an
excerpt and is skipped as one.

Commands run in this process (click's ``main(args, standalone_mode=False)``, or ``sys.argv`` for argparse benches), so
torch is imported once; a failure names the doc file and line, the command as written and as run, and the output.
"""

import contextlib
import dataclasses
import glob
import importlib.util
import inspect
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback

import click
import pytest
import torch

from metrics import detectors
from torch_utils import training_stats

pytestmark = pytest.mark.slow  # About 80 s on 2 cores for every doc; `-m "not slow"` leaves it out.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
SHELL_LANGUAGES = {'', 'bash', 'sh', 'shell', 'console'}
COMMAND_START = re.compile(r'^(?:\$\s+)?(python3?|bash|torchrun)\s')
MARKER = re.compile(r'#.*?\[(gpu|download|brats|long|skip)(?::\s*([^\]]+))?\]')
REASONS = {'gpu': 'needs a GPU', 'download': 'downloads data', 'brats': 'needs real BraTS data',
           'long': 'takes minutes or more at any size'}


# ----------------------------------------------------------------------------
# Extraction.

@dataclasses.dataclass
class DocCommand:
    doc: str        # 'docs/volumes.md'
    line: int       # 1-based line of the command's first line
    text: str       # the command as written (continuations joined)
    skip: str       # None, or why the test does not run it

    @property
    def where(self):
        return f'{self.doc}:{self.line}'


def extract_commands(doc: str, text: str) -> list:
    """The shell commands of one Markdown file, in order, with their skip reasons."""
    out, language, pending = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r'^\s*```\s*([\w+-]*)', line)
        if fence:
            language = fence.group(1).lower() if language is None else None
            pending = None
            continue
        if language not in SHELL_LANGUAGES:
            continue
        stripped = line.strip()
        if pending is not None:
            pending[1] += ' ' + stripped
        elif COMMAND_START.match(stripped):
            pending = [number, stripped]
        else:
            continue
        if pending[1].endswith('\\'):
            pending[1] = pending[1][:-1].rstrip()
            continue
        out.append(_command(doc, *pending))
        pending = None
    return out


def _command(doc, number, text):
    text = re.sub(r'^\$\s+', '', text)
    marker = MARKER.search(text)
    skip = None
    if marker:
        skip = marker.group(2).strip() if marker.group(1) == 'skip' else REASONS[marker.group(1)]
    elif '...' in shlex.split(text, comments=True):
        skip = 'an excerpt (...)'
    return DocCommand(doc, number, text, skip)


def all_commands():
    out = []
    for doc in DOC_FILES:
        with open(os.path.join(ROOT, doc), encoding='utf-8') as f:
            out += extract_commands(doc, f.read())
    return out


# ----------------------------------------------------------------------------
# Size rewrites: option -> tiny value (a function of the written value where the form matters).

def _first(value):
    return value.split(',')[0]


SIZE_RULES = {
    '--resolution':       lambda v: '16',
    '--volume-size':      lambda v: '8',
    '--patch-size':       lambda v: '16,16,16' if v.count(',') == 2 else '16,16',  # a tumour and its rim fit
    '--phantom-cases':    lambda v: '4',
    '--patches-per-case': lambda v: '2',
    '--healthy-per-case': lambda v: '2',
    '--max-cases':        lambda v: '4',
    '--kimg':             lambda v: '0.004',
    '--tick':             lambda v: '0.004',
    '--snap':             lambda v: '1',
    '--batch':            lambda v: '4',
    '--batch-gpu':        lambda v: '2',
    '--cbase':            lambda v: '256',
    '--cmax':             lambda v: '16',
    '--map-depth':        lambda v: '1',
    '--gpus':             lambda v: '1',
    '--seeds':            lambda v: _first(v).split('-')[0] + ('-1' if '-' in v or ',' in v else ''),
    '--num-gen':          lambda v: '16',
    '--steps':            lambda v: '2',
    '--folds':            lambda v: '2',
    '--synthetic-ratio':  lambda v: _first(v),
    '--features':         lambda v: '4',
    '--levels':           lambda v: '2',
    '--per-case':         lambda v: '1',
    '--res':              lambda v: '8',
    '--repeats':          lambda v: '1',
    '--rounds':           lambda v: '1',
    '--cases':            lambda v: '2',
    '--workers':          lambda v: '1',
    '--freezed':          lambda v: '1',                            # of the 3 blocks of a 16-pixel D
    # Sizes of the scripts other pages document (style mixing, projector, cohort export); a guess until they land.
    '--rows':             lambda v: ','.join(v.split(',')[:2]),
    '--cols':             lambda v: ','.join(v.split(',')[:2]),
    '--styles':           lambda v: '0-1' if int(re.findall(r'\d+', v)[0]) < 4 else '4-5',  # a 16-pixel G has 6 ws
    '--num-steps':        lambda v: '2',
    '--num':              lambda v: '2',
    '--frames':           lambda v: '4',
    '--num-cases':        lambda v: '2',
    '--split':            lambda v: v.split('=')[0] + '=0.5',       # 10% of 4 cases is none
}
# Per script: options added when the command leaves them at a large default (same meaning, tiny size). Training
# metrics are measured by the docs' calc_metrics.py lines; during these tiny runs they are off.
TINY_ADDITIONS = {
    'train.py':             ['--cbase', '256', '--cmax', '16', '--map-depth', '1', '--batch', '4', '--kimg', '0.004',
                             '--tick', '0.004', '--snap', '1', '--metrics', 'none'],
    'calc_metrics.py':      ['--num-gen', '16', '--batch', '8'],
    'calc_segmentation.py': ['--steps', '2', '--folds', '2', '--features', '4', '--levels', '2', '--batch', '2',
                             '--patch', '8', '--synthetic-ratio', '1'],
    'dataset_tool.py':      ['--phantom-cases', '4'],
    'calc_privacy.py':      ['--num', '2', '--num-steps', '2'],
    'projector.py':         ['--num-steps', '2'],
}
ALWAYS = {'train.py': {'--metrics': 'none'}}
RESUME_KEEPS = {'--kimg', '--tick', '--snap', '--metrics'}  # What a continued run (--resume RUN_DIR) may change.


def _continuing(script, args):
    return script == 'train.py' and any(a.startswith('--resume') for a in args) and not any(
        a.startswith('--data') for a in args)


def continue_kimg(args: list) -> list:
    """A continued run (``--resume RUN_DIR``) trains one more step: ``--kimg`` = its images so far + 4, as a run that
    was stopped has more to train (the fixtures and earlier doc commands run to their end)."""
    i = next(i for i, a in enumerate(args) if a.startswith('--resume'))
    run = args[i].split('=', 1)[1] if '=' in args[i] else args[i + 1]
    snaps = sorted(glob.glob(os.path.join(run, 'network-snapshot-*.pt')))
    if not snaps:
        return args
    nimg = int(re.findall(r'(\d+)\.pt$', snaps[-1])[0])
    kimg = f'{(nimg + 4) / 1000:g}'
    out = [a for j, a in enumerate(args) if not (a.startswith('--kimg') or (j and args[j - 1] == '--kimg'))]
    return out + ['--kimg', kimg]


def _additions(script: str, args: list) -> list:
    extra = list(TINY_ADDITIONS.get(script, []))
    if script == 'dataset_tool.py':
        kind = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == '--kind'), 'slices')
        kind = next((a.split('=', 1)[1] for a in args if a.startswith('--kind=')), kind)
        extra += {'slices': ['--resolution', '16'], 'volumes': ['--volume-size', '8'],
                  'patches': ['--patch-size', '16,16', '--planes', 'axial', '--patches-per-case', '2']}.get(kind, [])
    if _continuing(script, args):  # Continuing a run: only what it may change.
        extra = [w for i in range(0, len(extra), 2) if extra[i] in RESUME_KEEPS for w in extra[i:i + 2]]
    return extra


def rewrite(script: str, args: list) -> list:
    """The written arguments with every size made tiny, plus the script's missing size options."""
    out, i = [], 0
    seen = set()
    while i < len(args):
        word = args[i]
        name, eq, value = word.partition('=')
        rule = SIZE_RULES.get(name)
        forced = ALWAYS.get(script, {}).get(name)
        if name.startswith('--'):
            seen.add(name)
        if _continuing(script, args) and name not in RESUME_KEEPS:
            rule = None
        if (rule or forced) and eq:
            out.append(f'{name}={forced or rule(value)}')
        elif (rule or forced) and i + 1 < len(args) and not args[i + 1].startswith('--'):
            out += [name, forced or rule(args[i + 1])]
            i += 1
        else:
            out.append(word)
        i += 1
    extra = _additions(script, args)
    for j in range(0, len(extra), 2):
        if extra[j] not in seen:
            out += extra[j:j + 2]
    return out


# ----------------------------------------------------------------------------
# Inputs the docs name without making: put in place from a fixture of the kind the name says.

INPUT_OPTIONS = {'--data', '--network', '--resume', '--paint-network', '--segmenter', '--source', '--brats-root',
                 '--insert-into', '--labels-from', '--pretrained'}
SOURCE_OPTIONS = {'--source', '--brats-root', '--insert-into', '--labels-from'}


MODALITY_OR_PLANE = re.compile(r'\b(t1n|t1c|t2w|t2f|coronal|sagittal)\b')


def _kind(path: str, class_spec: str = '') -> str:
    name = path.lower()
    if MODALITY_OR_PLANE.search(class_spec) and not ('patch' in name or 'vol' in name):
        return 'slices_modality'
    if 'patch' in name or 'paint' in name:
        return 'paint'
    if 'vol' in name or 'box' in name or 'native' in name:
        return 'volumes'
    return 'slices'


def place_input(option: str, value: str, fixtures, doc: str, network: str = '', class_spec: str = ''):
    """Make ``value`` exist (relative to the working folder) when the docs assume it does."""
    if value in ('phantom', 'brats-africa') or '://' in value or os.path.exists(value):
        return
    if option in SOURCE_OPTIONS:
        src = fixtures['images'] if 'image' in value.lower() else fixtures['cases']
        os.makedirs(os.path.dirname(os.path.abspath(value)), exist_ok=True)
        os.symlink(src, value)
        return
    if option == '--segmenter':  # For the command's network: the painters and volume networks here are 3D.
        src = fixtures.segmenter('slices' if _kind(network) == 'slices' else 'volumes')
    elif option in ('--network', '--resume', '--paint-network'):
        run = _earlier_run(value)
        if run is None:
            kind = 'paint' if option == '--paint-network' else (
                'volumes' if doc.endswith('volumes.md') and value == 'net.pt' else _kind(value, class_spec))
            run = fixtures['run_' + kind]
        _remember(value, run)
        if value.endswith('.pt') or value.endswith('.pkl'):
            snap = sorted(glob.glob(os.path.join(run, 'network-snapshot-*.pt')))[-1]
            os.makedirs(os.path.dirname(os.path.abspath(value)), exist_ok=True)
            shutil.copy(snap, value)
            return
        shutil.copytree(run, value)
        return
    else:
        src = fixtures['archive_' + _kind(value)]
    os.makedirs(os.path.dirname(os.path.abspath(value)), exist_ok=True)
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, value)


RUN_NAME = re.compile(r'(?:^|/)\d{5}-([^/]*)')


PLACEHOLDERS = {}  # 'runs/00001' -> the run an earlier command of this doc resolved that run id to


def _earlier_run(value: str):
    """The run dir that the placeholder ``runs/00002-patches64-...`` means in this doc: the one an earlier command
    resolved the same ``runs/00002`` to; else the newest run made in this folder whose name starts with the
    placeholder's words (``patches64``, before ``-gpus`` or ``...``); for ``runs/00000-...``, the newest run."""
    match = RUN_NAME.search(value)
    if not match:
        return None
    key = value[:match.end()].split('-')[0]
    stem = re.split(r'-gpus|\.\.\.', match.group(1))[0].rstrip('-')
    remembered = PLACEHOLDERS.get(key)
    if remembered and (not stem or re.match(r'\d{5}-' + re.escape(stem), os.path.basename(remembered))):
        return remembered
    runs = [d for d in glob.glob('**/[0-9][0-9][0-9][0-9][0-9]-*', recursive=True)
            if os.path.isdir(d) and glob.glob(os.path.join(d, 'network-snapshot-*.pt'))
            and re.match(r'\d{5}-' + re.escape(stem), os.path.basename(d)) and '...' not in d]
    return os.path.abspath(max(runs, key=os.path.getmtime)) if runs else None


def _remember(value: str, run: str):
    match = RUN_NAME.search(value)
    if match:
        PLACEHOLDERS[value[:match.end()].split('-')[0]] = run


# ----------------------------------------------------------------------------
# Running one command in this process.

def _value(args: list, option: str) -> str:
    for i, word in enumerate(args):
        if word == option and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(option + '='):
            return word.split('=', 1)[1]
    return ''


def _load_script(path: str):
    name = 'docs_cmd_' + re.sub(r'\W', '_', os.path.relpath(path, ROOT))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _shell_words(text: str) -> list:
    """shlex words with ``~/`` expanded at the start of a word, as a shell does (``--x=~/y`` stays as written);
    the docs' absolute ``/data/...`` examples live under ``~/data/`` here."""
    words = [re.sub(r'^/data/', '~/data/', w) for w in shlex.split(text, comments=True)]
    return [os.path.expanduser(w) if w.startswith('~/') else w for w in words]


def run_command(cmd: DocCommand, fixtures) -> tuple:
    """Run one doc command in the current folder; returns (ok, what was run, output)."""
    words = _shell_words(cmd.text)
    program, rest = words[0], words[1:]
    if program == 'bash':
        try:
            proc = subprocess.run(['bash', os.path.join(ROOT, rest[0])] + rest[1:], capture_output=True, text=True,
                                  timeout=120)
        except subprocess.TimeoutExpired:
            return False, words, 'timed out after 120 s: mark it # [long] in the doc'
        return proc.returncode == 0, words, proc.stdout + proc.stderr
    if program == 'torchrun':  # one process here: the launcher's own options go (tests of torchrun spawn real ones)
        while rest and rest[0].startswith('--'):
            rest = rest[1:] if '=' in rest[0] or rest[0] == '--standalone' else rest[2:]
    if rest[0] == '-m':
        script, args = rest[1], rest[2:]
        path = os.path.join(ROOT, *script.split('.')) + '.py'
    else:
        script, args = rest[0], rest[1:]
        path = os.path.join(ROOT, script)
    base = os.path.basename(script)
    args = rewrite(base, args)
    for i, word in enumerate(args):
        name, eq, value = word.partition('=')
        if name in INPUT_OPTIONS:
            value = value if eq else (args[i + 1] if i + 1 < len(args) else '')
            for part in value.split(','):
                if part:
                    try:
                        place_input(name, part, fixtures, cmd.doc, network=_value(args, '--network'),
                                    class_spec=_value(args, '--class'))
                    except Exception:  # noqa: BLE001 (reported as this command's failure)
                        return False, [program, script] + args, traceback.format_exc()
    if _continuing(base, args):
        args = continue_kimg(args)
    out = io.StringIO()
    ok = True
    training_stats.reset()  # Several runs in this process.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            module = _load_script(path)
            main = module.main
            if isinstance(main, click.Command):
                main.main(args=args, prog_name=script, standalone_mode=False)
            elif inspect.signature(main).parameters:  # main(argv) scripts
                main(args)
            else:
                saved = sys.argv
                sys.argv = [script] + args
                try:
                    main()
                finally:
                    sys.argv = saved
        except SystemExit as err:
            ok = err.code in (0, None)
        except click.ClickException as err:
            print(f'Error: {err.format_message()}')
            ok = False
        except Exception:  # noqa: BLE001 (any failure of a doc command is the test's finding)
            traceback.print_exc()
            ok = False
    return ok, [program, script] + args, out.getvalue()


# ----------------------------------------------------------------------------
# Fixtures: phantom cases, tiny archives and runs, a tiny detector (metrics.detectors.StandInDetector).

def _quiet(main, args):
    training_stats.reset()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main.main(args=args, standalone_mode=False)


@pytest.fixture(scope='module')
def fixtures(tmp_path_factory):
    import dataset_tool
    import train
    from mri.sources import phantom
    from tests.helpers import make_png_folder
    base = tmp_path_factory.mktemp('docs-fixtures')
    cases = str(base / 'cases')
    for prefix, seed in [('BraTS-GLI', 0), ('BraTS-SSA', 2)]:
        phantom.write_phantom_cases(cases, 2, seed=seed, shape=(48, 48, 32), spacing=4, prefix=prefix)
    out = dict(cases=cases, images=make_png_folder(str(base / 'images'), n=8, res=16, num_classes=2))
    out['detector'] = detectors.save_stand_in_detector(str(base / 'detector.pt'))
    return Fixtures(out, base)


# The archives (and a tiny conditional run on each) that stand in for those the docs name without making, by kind.
FIXTURE_ARCHIVES = {
    'slices':          ['--resolution', '16', '--planes', 'axial', '--modalities', 'all', '--with-seg',
                        '--labels', 'cohort'],
    'slices_modality': ['--resolution', '16', '--planes', 'axial,coronal,sagittal', '--modalities', 'all',
                        '--labels', 'modality'],  # For --class axial,t2f: a plane and a modality per item.
    'volumes':         ['--kind', 'volumes', '--volume-size', '16', '--modalities', 'all', '--with-seg',
                        '--labels', 'cohort'],
    'paint':           ['--kind', 'patches', '--patch-size', '16,16,16', '--patches-per-case', '2',
                        '--labels', 'cohort'],
}
TINY_TRAINING = ['--cbase', '256', '--cmax', '16', '--map-depth', '1', '--batch', '4', '--kimg', '0.004', '--tick',
                 '0.004', '--snap', '1', '--metrics', 'none', '--device', 'cpu']


class Fixtures(dict):
    """The fixture paths; archives, runs and segmenters of each kind are made on first use."""

    def __init__(self, paths, base):
        super().__init__(paths)
        self.base = base

    def __missing__(self, key):
        import dataset_tool
        import train
        what, kind = key.split('_', 1)
        archive = str(self.base / f'{kind}.zip')
        if not os.path.exists(archive):
            _quiet(dataset_tool.main, ['--source', self['cases'], '--dest', archive, '--split', 'val=0.5',
                                       '--no-progress'] + FIXTURE_ARCHIVES[kind])
        self['archive_' + kind] = archive
        if what == 'run':
            _quiet(train.main, ['--outdir', str(self.base / f'runs-{kind}'), '--data', archive, '--cond=1']
                   + TINY_TRAINING)
            self['run_' + kind] = glob.glob(str(self.base / f'runs-{kind}' / '*'))[0]
        return self[key]

    def segmenter(self, kind='slices'):
        """A calc_segmentation.py checkpoint for 2D items (``slices``) or 3D ones (``volumes``), made on first use."""
        if 'segmenter_' + kind not in self:
            import calc_segmentation
            outdir = str(self.base / f'seg-{kind}')
            _quiet(calc_segmentation.main, ['--data', self['archive_' + kind], '--outdir', outdir, '--arms', 'real',
                                            '--steps', '1', '--folds', '2', '--features', '4', '--levels', '2',
                                            '--batch', '2', '--patch', '16', '--device', 'cpu', '--no-progress'])
            self['segmenter_' + kind] = sorted(glob.glob(os.path.join(outdir, 'checkpoints', '*.pt')))[0]
        return self['segmenter_' + kind]


@pytest.fixture
def doc_env(fixtures, tmp_path, monkeypatch):
    """HOME, the BraTS-Africa folder, caches and detectors as the docs assume; the working folder per doc."""
    from mri.sources import phantom
    home = tmp_path / 'home'
    (home / 'data').mkdir(parents=True)
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('BRATS_AFRICA_DIR', fixtures['cases'])
    monkeypatch.setenv('MRI_GAN_CACHE', str(tmp_path / 'cache'))
    real_load = detectors.load_detector

    def load_tiny(kind='inception', url=None, *args, **kwargs):
        return real_load(kind, fixtures['detector'] if url is None else url, *args, **kwargs)
    monkeypatch.setattr(detectors, 'load_detector', load_tiny)
    PLACEHOLDERS.clear()
    real_phantoms = phantom.write_phantom_cases

    def small_phantoms(*args, **kwargs):  # --source phantom: the same cases on a 48x48x32 grid of 4 mm voxels
        return real_phantoms(*args, **{**kwargs, 'shape': (48, 48, 32), 'spacing': 4})
    monkeypatch.setattr(phantom, 'write_phantom_cases', small_phantoms)
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    return fixtures


# ----------------------------------------------------------------------------
# Tests.

def test_extraction_joins_continuations_and_reads_markers():
    text = '\n'.join(['Intro', '```bash', 'python train.py --data a.zip \\', '    --kimg 10   # [gpu]',
                      'ls runs', '```', '```python', 'python x.py', '```', '```',
                      'python generate.py --network x.pt ... --outdir o', 'python y.py  # [skip: needs a scanner]',
                      '```'])
    cmds = extract_commands('docs/x.md', text)
    assert [(c.line, c.skip) for c in cmds] == [(3, 'needs a GPU'), (11, 'an excerpt (...)'), (12, 'needs a scanner')]
    assert cmds[0].text.startswith('python train.py --data a.zip --kimg 10')
    assert rewrite('train.py', ['--kimg', '5000', '--seeds=0-15', '--batch', '64'])[:4] == ['--kimg', '0.004',
                                                                                           '--seeds=0-1', '--batch']


def test_every_doc_is_read():
    """New docs are picked up by the glob; every doc with a runnable command appears below."""
    assert 'README.md' in DOC_FILES and 'docs/volumes.md' in DOC_FILES
    assert len([c for c in all_commands() if c.skip is None]) >= 40


COMMANDS_BY_DOC = {}
for _c in all_commands():
    COMMANDS_BY_DOC.setdefault(_c.doc, []).append(_c)


def run_doc(commands, fixtures) -> tuple:
    """Run one doc's commands in order: ``(failure messages naming doc:line, skipped lines, (seconds, where))``."""
    failures, skipped, took = [], [], []
    for cmd in commands:
        if cmd.skip:
            skipped.append(f'{cmd.where}: {cmd.skip}')
            continue
        start = time.time()
        ok, ran, output = run_command(cmd, fixtures)
        took.append((time.time() - start, cmd.where))
        if not ok:
            tail = '\n'.join(output.strip().splitlines()[-15:])
            failures.append(f'{cmd.where}: exit non-zero\n  as written: {cmd.text}\n  as run:     '
                            f'{shlex.join(ran)}\n  output (last lines):\n{tail}')
    return failures, skipped, took


@pytest.mark.parametrize('doc', sorted(COMMANDS_BY_DOC))
def test_doc_commands_run(doc, doc_env):
    """Each command of one doc, in order, in one working folder; skipped ones are listed with their reason."""
    failures, skipped, took = run_doc(COMMANDS_BY_DOC[doc], doc_env)
    print(f'{doc}: {len(took)} run in {sum(t for t, _ in took):.1f} s, {len(skipped)} skipped; slowest: '
          + ', '.join(f'{where} {t:.1f} s' for t, where in sorted(took, reverse=True)[:5]))
    assert not failures, f'{len(failures)} command(s) of {doc} failed:\n\n' + '\n\n'.join(failures)
    if skipped:
        print('\n'.join(skipped))


def test_a_broken_doc_line_is_named_with_its_file_and_line(doc_env):
    """What the lead sees when a new doc's command stops working: the file, the line, the command, the error."""
    text = '\n'.join(['# New page', '', '```bash', 'python dataset_tool.py --source phantom --kind cubes \\',
                      '    --dest out.zip --resolution 64', 'python train.py --data x.zip --kimg 1   # [gpu]', '```'])
    failures, skipped, took = run_doc(extract_commands('docs/new.md', text), doc_env)
    assert skipped == ['docs/new.md:6: needs a GPU'] and len(took) == 1
    message, = failures
    assert message.startswith('docs/new.md:4: exit non-zero') and '--resolution 16' in message
    assert "'cubes'" in message.splitlines()[-1] and not os.path.exists('out.zip')
