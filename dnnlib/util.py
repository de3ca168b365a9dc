"""Config dictionaries, lookup of classes by name, cached downloads and progress lines.

Written for this project in the spirit of StyleGAN2-ADA's ``dnnlib.util`` so that configs port, but with
downloads that are atomic, checked and that fail with one actionable line when the network is absent.
"""

import contextlib
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import time
import urllib.parse
from typing import Any

from .script import DiskFullError, as_disk_full


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says which URL and how to supply it by hand."""


# ----------------------------------------------------------------------------
# Lookup of objects by dotted name.

def get_obj_by_name(name: str) -> Any:
    """Return the object named ``package.module.attr`` (the longest importable module prefix wins)."""
    parts = name.split('.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only swallow "this prefix is not a module"; a missing import inside the module is a real error.
            if err.name is not None and module_name.startswith(err.name):
                continue
            raise
        obj = module
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ImportError(f'{name}: module {module_name} has no attribute {".".join(parts[split:])}') from None
        return obj
    raise ImportError(f'{name}: no importable module in this name')


def call_func_by_name(*args, func_name: str, **kwargs) -> Any:
    return get_obj_by_name(func_name)(*args, **kwargs)


def construct_class_by_name(*args, class_name: str, **kwargs) -> Any:
    """Build ``class_name(*args, **kwargs)``: how configs name their components (StyleGAN2-ADA style)."""
    return call_func_by_name(*args, func_name=class_name, **kwargs)


# ----------------------------------------------------------------------------
# Formatting and progress.

def format_time(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {(s // 60) % 60:02d}m'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h'


class ProgressBar:
    """A one-line status on stderr: done/total, rate, time left and an optional tail; quiet when not ``enabled``.

    On a terminal the line is redrawn in place; in a log (not a tty) a line is written at most every 10 s.
    """

    def __init__(self, total: int, desc: str = '', unit: str = 'it', enabled: bool = True, stream=None, min_interval: float = 0.5):
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.tail = ''
        self.start = time.time()
        self._last = 0.0
        self._tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.min_interval = min_interval if self._tty else max(min_interval, 10.0)

    def update(self, n: int = 1, done: int = None, tail: str = None) -> None:
        """Advance by ``n`` (or set the absolute count ``done``); ``tail`` replaces the free text at the end."""
        self.done = self.done + n if done is None else done
        if tail is not None:
            self.tail = tail
        now = time.time()
        if self.enabled and now - self._last >= self.min_interval:  # close() writes the final line.
            self._last = now
            self._print(final=False)

    def _print(self, final: bool) -> None:
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 and self.total else 0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = f'{self.desc} {self.done}/{self.total} {self.unit} ({pct:5.1f}%) {rate:.1f} {self.unit}/s'.lstrip()
        line += f', {format_time(elapsed)} elapsed' if final else f', {format_time(left)} left'
        if self.tail:
            line += f'  {self.tail}'
        if self._tty:
            self.stream.write('\r' + line + ('\n' if final else ''))
        else:
            self.stream.write(line + '\n')
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------
# Cache directories and downloads.

@contextlib.contextmanager
def atomic_output(path: str, suffix: str = ''):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    A killed or failing writer never leaves a half-written file under the real name; a killed one (SIGKILL) can
    leave the ``.tmp-*`` file, which the next owner of the folder removes (training.checkpoint.RunLock).
    ``suffix`` keeps an extension that a writer looks at (e.g. '.png', '.nii.gz'). A full disk while writing
    raises ``DiskFullError`` naming ``path`` (one line), not the writer's chain of follow-up errors.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes owner-only files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        full = as_disk_full(err, path) if isinstance(err, Exception) else None
        if full is not None and full.path == tmp:  # Named by a writer that saw only the temporary name.
            full = DiskFullError(path)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full is not None:
            raise full from None
        raise


class LockBusy(RuntimeError):
    """Another live process holds the lock; ``pid`` is what it wrote in the lock file ('unknown' if nothing)."""

    def __init__(self, path: str, pid: str):
        super().__init__(f'{path}: held by PID {pid}')
        self.path, self.pid = path, pid


class PidLock:
    """An exclusive ``fcntl.flock`` on the file ``path`` holding the owner's PID, for jobs that must not run twice
    on one output (two dataset_tool.py runs to one --dest). The kernel drops the flock when its process ends,
    however it ends, so the lock of a dead process (SIGKILL) is taken over without a word; a live holder makes
    ``__enter__`` raise LockBusy at once (never waits). The file is removed on release, and a lock taken on a
    file that another process removed meanwhile is taken again on the new one, so two holders never coexist.
    With ``remove=False`` the file stays on release (a run dir's run.lock: the next holder overwrites the PID)."""

    def __init__(self, path: str, remove: bool = True):
        self.path, self.remove = path, remove
        self.fd = None

    def __enter__(self):
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors='replace').strip() or 'unknown'
                os.close(fd)
                raise LockBusy(self.path, holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # Its holder removed the file as we opened it: lock the one at the path now.
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            if self.remove:
                try:
                    os.remove(self.path)  # Still holding the flock: nobody else owns this file.
                except OSError:
                    pass
            os.close(self.fd)  # Releases the flock.
            self.fd = None


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity, as torch's DataLoader counts them when it warns of more
    workers than cores), else os.cpu_count(); at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def make_cache_dir_path(*paths: str) -> str:
    """``$MRI_GAN_CACHE`` if set, else ``~/.cache/mri_gan`` (or a temp dir without a home)."""
    root = os.environ.get('MRI_GAN_CACHE')
    if not root:
        home = os.path.expanduser('~')
        root = os.path.join(home, '.cache', 'mri_gan') if home and home != '~' else os.path.join(tempfile.gettempdir(), 'mri_gan_cache')
    return os.path.join(root, *paths)


def _is_url(obj: str) -> bool:
    return isinstance(obj, str) and re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', obj) is not None


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def _cache_name(url: str) -> str:
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()
    base = os.path.basename(urllib.parse.urlparse(url).path) or 'download'
    base = re.sub(r'[^0-9a-zA-Z._-]+', '_', base)
    return f'{digest}_{base}'


def open_url(
    url: str,                   # URL, file:// URL or local path.
    cache: bool = True,         # Keep downloads in the cache dir and reuse them.
    cache_dir: str = None,      # None = make_cache_dir_path('downloads').
    sha256: str = None,         # Expected hex digest; None = do not check.
    num_attempts: int = 3,      # Tries before giving up on a flaky network.
    return_filename: bool = False,  # Return the local path instead of an open binary file.
    verbose: bool = True,       # Print a line while downloading.
    timeout: float = 30.0,      # Seconds per network request.
):
    """Open a local file or download ``url`` (cached, atomic, sha256-checked) and return a binary file."""
    if not _is_url(url) or url.startswith('file://'):
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith('file://') else url
        if not os.path.isfile(path):
            raise DownloadError(f'{path}: no such file')
        if sha256 is not None and sha256_file(path) != sha256.lower():
            raise DownloadError(f'{path}: sha256 mismatch (expected {sha256})')
        return path if return_filename else open(path, 'rb')

    cache_dir = cache_dir or make_cache_dir_path('downloads')
    cache_path = os.path.join(cache_dir, _cache_name(url))
    if cache and os.path.isfile(cache_path):
        if sha256 is None or sha256_file(cache_path) == sha256.lower():
            return cache_path if return_filename else open(cache_path, 'rb')
        os.remove(cache_path)  # Corrupt or stale: fetch again.

    import requests  # Imported lazily: most runs never download.

    last_err = None
    data = None
    if verbose:
        print(f'Downloading {url} ...', file=sys.stderr, flush=True)  # Once: retries are not news.
    for attempt in range(num_attempts):
        try:
            with requests.get(url, stream=True, timeout=timeout) as res:
                res.raise_for_status()
                buf = io.BytesIO()
                for block in res.iter_content(chunk_size=1 << 20):
                    buf.write(block)
                data = buf.getvalue()
            if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
                raise DownloadError(f'{url}: sha256 mismatch (expected {sha256})')
            break
        except (requests.RequestException, DownloadError) as err:
            last_err = err
            data = None
            if attempt + 1 < num_attempts:
                time.sleep(min(2 ** attempt, 5))
    if data is None and isinstance(last_err, DownloadError):
        raise last_err  # The server answered, but with other bytes than expected: not a network problem.
    if data is None:
        raise DownloadError(
            f'{url}: download failed ({type(last_err).__name__}); without network, fetch the file elsewhere and '
            f'pass its local path instead, or place it at {cache_path}')

    if cache:
        with atomic_output(cache_path, suffix='.part') as tmp, open(tmp, 'wb') as f:
            f.write(data)
        return cache_path if return_filename else open(cache_path, 'rb')
    if return_filename:
        raise ValueError('return_filename=True needs cache=True')
    return io.BytesIO(data)


MAX_RANGE = 1_000_000  # Numbers in one parsed list: a typo like 0-999999999999 must not fill the memory.


def parse_range(text) -> list:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (seed lists on the command line)."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    out = []
    for part in str(text).split(','):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r'(\d+)\s*-\s*(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f'range {part!r} ends before it starts')
            if hi - lo + 1 + len(out) > MAX_RANGE:
                raise ValueError(f'range {part!r} holds {hi - lo + 1} numbers; at most {MAX_RANGE} in one list')
            out.extend(range(lo, hi + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f'{part!r} is not a number or a range like 0-9')
    return out
