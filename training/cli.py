"""Command-line habits shared by every script (train.py, generate.py, calc_metrics.py, dataset_tool.py, bench/):
switches, paths, seed lists, output options, run-dir resolution and the resolutions the trainer accepts, each
defined once. docs/cli.md writes the vocabulary down (what ``--batch``, ``--subset``, ``--outdir``, ``--json`` and
``--progress`` mean in every script); these helpers are how a script gets the words right.

- ``bool_option('--cond', ...)``: a switch that takes the bare form (``--cond``) and a value (``--cond=1``,
  ``--cond=0``, ``--cond=true``, ``--cond false``); ``[BOOL]`` in ``--help``. ``add_bool_argument`` is the
  same switch for argparse scripts, ``add_json_argument`` their ``--json PATH``.
- ``PATH``: a click type that expands ``~`` (a shell leaves ``--data=~/x.zip`` as typed).
- ``SEEDS`` / ``seeds_option``: ``--seeds 0-3,7`` as a list of ints (``dnnlib.parse_range``), one-line errors.
- ``outdir_option``: ``--outdir DIR``, the folder a script writes into. ``json_option``: ``--json PATH``, a results
  file (benches; ``--out`` stays as a hidden alias for old command lines).
- ``progress_options``: ``--progress [BOOL]`` (default on) and ``--no-progress``, folded into one ``progress``.
- ``resolve_network``: a snapshot file, or a run dir meaning its newest snapshot.
- ``shape_problem``: why a slice/volume shape cannot be trained (the networks double a 4-pixel base), or None.
"""

import os

import click


# ----------------------------------------------------------------------------
# Switches.

class _Bool(click.types.BoolParamType):
    """click's boolean words (1/0, true/false, yes/no, on/off); an empty value is refused."""

    name = 'BOOL'

    def convert(self, value, param, ctx):
        if isinstance(value, int) and value in (0, 1):  # Defaults (and bools) arrive as numbers.
            return bool(value)
        if isinstance(value, str) and not value.strip():
            self.fail('expected 1 or 0 (or true/false); got an empty value', param, ctx)
        return super().convert(value, param, ctx)


BOOL = _Bool()


def parse_bool(text) -> bool:
    """'1', 'true', 'yes', 'on' -> True; '0', 'false', 'no', 'off' -> False; anything else -> ValueError."""
    try:
        return BOOL.convert(text, None, None)
    except click.BadParameter as err:
        raise ValueError(err.message) from None


def add_bool_argument(parser, *names: str, default: bool = False, help: str = None):  # noqa: A002
    """The same switch for an argparse CLI: bare ``--name``, or ``--name=1``/``=0`` (several names: aliases)."""
    parser.add_argument(*names, type=parse_bool, nargs='?', const=True, default=bool(default), metavar='BOOL', help=help)


def add_json_argument(parser, default: str = None, help: str = 'write the results (JSON) here'):  # noqa: A002
    """``--json PATH`` for an argparse bench (``args.json``); ``--out`` is kept, hidden, for old command lines."""
    import argparse
    parser.add_argument('--json', type=os.path.expanduser, default=default, metavar='PATH', help=help)
    parser.add_argument('--out', dest='json', type=os.path.expanduser, default=default, help=argparse.SUPPRESS)


def bool_option(*param_decls, default: bool = False, help: str = None, **kwargs):  # noqa: A002 (click's name)
    """A click option for a switch: bare ``--name`` means on, ``--name=1``/``=0`` (or true/false) sets it.

    The value is optional (click's ``flag_value``), so ``--name`` followed by another option is ``True`` and
    ``--name 0`` is ``False``. The default shows as 1 or 0, the way the docs write switches.
    """
    # The default is given as 1/0 so that --help shows it that way; BOOL converts it to a bool.
    return click.option(*param_decls, type=BOOL, is_flag=False, flag_value=True, default=int(bool(default)),
                        show_default=True, metavar='[BOOL]', help=help, **kwargs)


# ----------------------------------------------------------------------------
# Paths.

class _Path(click.ParamType):
    """A path (or URL) with ``~`` expanded; existence is checked where the path is used, with a named message."""

    name = 'PATH'

    def convert(self, value, param, ctx):
        if value is None or not isinstance(value, str):
            return value
        if not value.strip():
            self.fail('empty path', param, ctx)
        return os.path.expanduser(value)


PATH = _Path()


# ----------------------------------------------------------------------------
# Seeds, output folders, results files, progress.

class _Seeds(click.ParamType):
    """``0-3,7`` -> [0, 1, 2, 3, 7] (ranges inclusive); an empty or malformed list is refused in one line."""

    name = 'LIST'

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        import dnnlib
        try:
            seeds = dnnlib.parse_range(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        if not seeds:
            self.fail('no seeds given (e.g. 0-3,7)', param, ctx)
        return seeds


SEEDS = _Seeds()


def seeds_option(*param_decls, help: str = 'Seeds, e.g. 0-3,7', **kwargs):  # noqa: A002
    """``--seeds LIST``: a list of ints, ranges inclusive."""
    return click.option(*(param_decls or ('--seeds',)), type=SEEDS, metavar='LIST', help=help, **kwargs)


def outdir_option(help: str = 'Where to write the results', required: bool = True, **kwargs):  # noqa: A002
    """``--outdir DIR``: the folder a script writes into (made if missing; ``~`` expanded)."""
    return click.option('--outdir', type=PATH, metavar='DIR', required=required, help=help, **kwargs)


def json_option(default: str = None, help: str = 'Write the results (JSON) here'):  # noqa: A002
    """``--json PATH``: a results file; ``--out`` is kept, hidden, for command lines written before the rename."""
    import functools

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, json_path=None, json_out=None, **kwargs):  # Two names, one value (any click >= 8.1).
            return f(*args, json_path=json_out if json_out is not None else json_path, **kwargs)
        wrapper = click.option('--out', 'json_out', type=PATH, hidden=True, default=None)(wrapper)
        return click.option('--json', 'json_path', type=PATH, metavar='PATH', default=default,
                            show_default=default is not None, help=help)(wrapper)
    return decorate


def progress_options(f):
    """``--progress [BOOL]`` (default 1) and ``--no-progress`` (= ``--progress=0``), passed on as ``progress``."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, no_progress=False, progress=True, **kwargs):
        return f(*args, progress=bool(progress) and not no_progress, **kwargs)
    wrapper = click.option('--no-progress', is_flag=True, help='Same as --progress=0')(wrapper)
    return bool_option('--progress', default=True, help='Show a progress line')(wrapper)


# ----------------------------------------------------------------------------
# Snapshots.

def resolve_network(path: str, flag: str = '--network') -> str:
    """A snapshot file, or a run dir (its newest ``network-snapshot-*.pt``); a one-line ``click.BadParameter`` else."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        from training.checkpoint import latest_snapshot
        found = latest_snapshot(path)
        if found is None:
            raise click.BadParameter(f'{path}: run dir has no network-snapshot-*.pt', param_hint=flag)
        return found
    if not os.path.isfile(path):
        raise click.BadParameter(f'{path}: no such snapshot file or run dir', param_hint=flag)
    return path


# ----------------------------------------------------------------------------
# Shapes the networks can make.

BASE_SIDE = 4  # The synthesis network starts at 4 pixels per side and doubles per block (StyleGAN2).


def shape_problem(shape, base_shape=None) -> str:
    """Why the spatial ``shape`` (H, W) or (D, H, W) cannot be trained, or None when it can.

    The generator grows a constant ``base_shape`` (default 4 per side) by doubling, so every side must be
    ``base_side * 2**k`` for one common ``k``: powers of two for square slices today; an anisotropic volume
    network would pass its own base, e.g. (3, 4, 4) for 48x64x64 volumes.
    """
    shape = tuple(int(s) for s in shape)
    base = tuple(base_shape) if base_shape is not None else (BASE_SIDE,) * len(shape)
    assert len(base) == len(shape), (shape, base)
    ratios = {s / b for s, b in zip(shape, base)}
    if len(ratios) == 1:
        ratio = ratios.pop()
        if ratio >= 1 and ratio == int(ratio) and (int(ratio) & (int(ratio) - 1)) == 0:
            return None
    text = 'x'.join(str(s) for s in shape)
    if base_shape is None:
        return f'{text}: every side must be the same power of two >= {BASE_SIDE} (e.g. 64, 128, 256) for the networks'
    return f'{text}: must be {"x".join(str(b) for b in base)} times a power of two for the networks'
