"""How a top-level script ends when it cannot go on: Ctrl-C, SIGTERM or a full disk give one line, never a traceback.

Every script calls ``exit_on_interrupt()`` before its heavy imports (torch takes seconds to import, and a Ctrl-C
then used to print a traceback through the import machinery) and runs its click command through
``run_cli(main)``. After that:

- SIGTERM raises KeyboardInterrupt in the script's process, so a terminated job cleans up exactly like Ctrl-C
  (atomic writes remove their temporary files on the way out). Forked children keep the default action.
- A KeyboardInterrupt that reaches the top, during the imports included, prints ``Interrupted`` (or
  ``Interrupted (SIGTERM)``) and exits 130 (143), the shell's codes for those signals.
- A full disk (``OSError`` with ENOSPC anywhere in the exception chain) that reaches the top prints
  ``Error: No space left on device while writing FILE`` and exits 1.

Scripts that catch KeyboardInterrupt themselves (to say what was kept) run their work inside
``with sigterm_as_interrupt():``, or decorate their click function with ``@sigterm_as_interrupt()``: the same SIGTERM
handler for that block only, so that a command run in-process by click's CliRunner behaves as the script does and
leaves the caller's handler as it was. They end with ``exit_interrupted(what was kept)``: one line, exit 130 / 143.
This module's hook is the net beneath them.
"""

import atexit
import contextlib
import errno
import os
import signal
import sys

DISK_FULL_EXIT = 1


class DiskFullError(OSError):
    """The disk filled while a file was written; the message names the file (one line)."""

    def __init__(self, path: str):
        super().__init__(errno.ENOSPC, f'No space left on device while writing {path}')
        self.path = path

    def __str__(self):
        return self.args[1]

    def __reduce__(self):  # Raised in a worker process, it crosses the pool's pipe as itself.
        return type(self), (self.path,)


def _chain(err: BaseException):
    """``err`` and every exception it was raised from or while handling, outermost first (cycles cut)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ if err.__cause__ is not None else err.__context__


def disk_full_message(err: BaseException, path: str = None):
    """``'No space left on device while writing PATH'`` when ``err`` or an exception in its chain is a full disk
    (ENOSPC, or a DiskFullError that already names its file), else None. ``path``: the file being written when
    the error itself names none (torch.save's and zipfile's errors do not)."""
    for e in _chain(err):
        if isinstance(e, DiskFullError):
            return str(e)
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = path or e.filename or 'a file'
            return f'No space left on device while writing {where}'
    return None


NEARLY_FULL = 1 << 20  # Free bytes under which a failed write is put down to the full disk.


def disk_nearly_full(path: str) -> bool:
    """True when the file system holding ``path`` (a file or folder) has less than NEARLY_FULL bytes free."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL


def as_disk_full(err: BaseException, path: str):
    """A DiskFullError naming ``path`` when ``err`` comes from a full disk, else None (``raise ... from None``
    then drops torch's and zipfile's chained follow-up errors, which only repeat the cause). torch.save's C++
    writer reports a full disk as a RuntimeError without errno ("unexpected pos", "iostream error"), so a
    failed write on a disk with less than NEARLY_FULL bytes left counts too; call it before removing the
    partial file, whose bytes are what filled the disk."""
    for e in _chain(err):
        if isinstance(e, DiskFullError):
            return e
    if disk_full_message(err) is not None:
        return DiskFullError(path)
    if isinstance(err, (OSError, RuntimeError)) and disk_nearly_full(path):
        return DiskFullError(path)
    return None


# ----------------------------------------------------------------------------
# Ctrl-C and SIGTERM.

_state = {'pid': None, 'signal': None}


def _sigterm(signum, frame):
    if os.getpid() != _state['pid']:  # A forked child (DataLoader or pool worker): die of the signal as before.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _state['signal'] = signum
    raise KeyboardInterrupt


def terminated_by_sigterm() -> bool:
    """True once SIGTERM was received under ``exit_on_interrupt`` (or in the last ``sigterm_as_interrupt`` block)."""
    return _state['signal'] == signal.SIGTERM


def interrupt_exit_code() -> int:
    """130 after Ctrl-C, 143 after SIGTERM (128 + the signal's number, as a shell reports them)."""
    return 128 + (signal.SIGTERM if terminated_by_sigterm() else signal.SIGINT)


def _install_sigterm():
    """Install ``_sigterm`` for this process; returns the handler it replaces, or None outside the main thread
    (a script imported inside a test runner's thread), where Python allows no handler to be set."""
    _state['pid'] = os.getpid()
    try:
        return signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:
        return None


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block, SIGTERM raises KeyboardInterrupt (so a terminated job cleans up exactly as on Ctrl-C) and
    is recorded for ``terminated_by_sigterm`` / ``interrupt_exit_code``; on leaving, the SIGTERM handler in place
    before is back. The record is cleared on entry (a signal of an earlier in-process run does not count) and
    kept on leaving, so the ``except KeyboardInterrupt`` around the block can still say which signal came. Also a
    decorator (``@sigterm_as_interrupt()``): the whole function is the block."""
    _state['signal'] = None
    previous = _install_sigterm()
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def stop_reason() -> str:
    """``'terminated (SIGTERM)'`` after SIGTERM, else ``'interrupted'``: the words a script's last line starts with."""
    return 'terminated (SIGTERM)' if terminated_by_sigterm() else 'interrupted'


def exit_interrupted(kept: str = None, newline: bool = True):
    """End a script that has cleaned up after Ctrl-C or SIGTERM: print ``interrupted; KEPT`` (or ``terminated
    (SIGTERM); KEPT``) on stderr, after a line break that ends a progress line unless ``newline`` is false, and
    exit 130 / 143. Raises SystemExit, so the caller's ``finally`` blocks run and click's CliRunner reads the code."""
    line = stop_reason() + (f'; {kept}' if kept else '')
    sys.stderr.write(('\n' if newline else '') + line + '\n')
    sys.stderr.flush()
    sys.exit(interrupt_exit_code())


def _interrupted_line() -> str:
    """The line of an interruption nobody caught: ``Interrupted`` or ``Interrupted (SIGTERM)``."""
    return 'Interrupted' + (' (SIGTERM)' if terminated_by_sigterm() else '')


def _finish(line: str, code: int):
    """Print ``line`` on stderr and exit with ``code`` from inside sys.excepthook (which cannot choose the exit
    status): flush, run the atexit handlers (temporary folders, pool shutdown) as a normal exit would, then exit."""
    _ignore_late_signals()  # cleaning up after the interruption: a second signal changes nothing
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        sys.stderr.write(line + '\n')
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    try:
        atexit._run_exitfuncs()
    finally:
        os._exit(code)


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            _finish('\n' + _interrupted_line(), interrupt_exit_code())
        message = disk_full_message(exc) if isinstance(exc, BaseException) else None
        if message is not None:
            _finish(f'Error: {message}', DISK_FULL_EXIT)
        previous(exc_type, exc, tb)
    hook.mri_gan = True
    return hook


def exit_on_interrupt() -> None:
    """Install the SIGTERM handler and the top-level hook described in the module docstring. Call it first thing
    in a script, before importing torch; calling it again does nothing new."""
    _install_sigterm()
    if not getattr(sys.excepthook, 'mri_gan', False):
        sys.excepthook = _excepthook(sys.excepthook)


def _ignore_late_signals():
    """atexit: the work is done and its ending decided; a Ctrl-C or SIGTERM from here on is ignored. Python resets
    its handlers to the default before it tears its modules down (a second or two with torch loaded), so a SIGTERM
    landing then killed a finished job (status -15 instead of its own)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


def run_cli(command, args=None):
    """Run a click command as ``command()`` would, except that a Ctrl-C or SIGTERM reaching it prints one line and
    exits 130 / 143 (click's own ending is "Aborted!" and exit 1, for either signal) and a full disk prints one
    line; once the command has ended, a late Ctrl-C or SIGTERM (while Python shuts down) no longer changes how it
    ended. Duck-typed on click's exceptions, so that dnnlib does not import click."""
    try:
        rv = command.main(args=args, standalone_mode=False)
    except KeyboardInterrupt:
        _finish('\n' + _interrupted_line(), interrupt_exit_code())
    except Exception as err:  # noqa: BLE001 - sorted below; everything else goes on up unchanged.
        if type(err).__name__ == 'Abort' and isinstance(err.__cause__, KeyboardInterrupt):
            _finish(_interrupted_line(), interrupt_exit_code())
        if hasattr(err, 'show') and isinstance(getattr(err, 'exit_code', None), int):  # click.ClickException
            err.show()
            sys.exit(err.exit_code)
        if type(err).__name__ == 'Abort':  # EOF on a prompt
            sys.stderr.write('Aborted!\n')
            sys.exit(1)
        message = disk_full_message(err)
        if message is not None:
            sys.stderr.write(f'Error: {message}\n')
            sys.exit(DISK_FULL_EXIT)
        if isinstance(err, BrokenPipeError):  # `script --help | head`: as click's own ending, quietly.
            try:
                sys.stdout = open(os.devnull, 'w')
            except OSError:
                pass
            sys.exit(1)
        raise
    finally:
        atexit.register(_ignore_late_signals)  # registered last, so the first to run at exit
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
