"""One line instead of a traceback or silence, for the audit's small cases (issue 20, item 9 and item 8's
calc_metrics --run-dir): each reproduced through the CLI a user types."""

import glob
import os
import subprocess
import sys

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


# ---------------------------------------------------------------------------------------------------------------
# Disk full (issue 20, item 8).

class _FakeSource:
    """What ensure_pool needs of a generator: a path (for the pool's record), psi and sample(first, count)."""

    def __init__(self, path):
        self.path, self.psi = path, 1.0

    def sample(self, first, count):
        import numpy as np
        return np.full((count, 2, 8, 8), first, np.uint16), np.zeros((count, 8, 8), np.uint8)


def test_full_disk_while_making_a_pool_is_one_error_and_leaves_no_temps(tmp_path, monkeypatch):
    """calc_segmentation's pools were sparse memmaps: a full disk killed the run with SIGBUS (no message) and left
    '.tmp-*.npy'. The space is now allocated first: ENOSPC is a DiskFullError naming the pool, and nothing stays."""
    import errno
    import numpy as np
    from mri.downstream import data
    (tmp_path / 'G.pt').write_bytes(b'x')
    pool_dir = tmp_path / 'synthetic'

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, 'No space left on device')
    with monkeypatch.context() as m:
        m.setattr(os, 'posix_fallocate', full, raising=False)
        with pytest.raises(dnnlib.DiskFullError, match='No space left on device while writing .*pool0-images.npy'):
            data.ensure_pool(_FakeSource(str(tmp_path / 'G.pt')), 40, str(pool_dir), 'pool0', batch=16, progress=False)
    assert os.listdir(pool_dir) == []
    images, labels = data.ensure_pool(_FakeSource(str(tmp_path / 'G.pt')), 40, str(pool_dir), 'pool0', batch=16,
                                      progress=False)
    assert np.load(images)[33, 0, 0, 0] == 32 and np.load(labels).shape == (40, 8, 8)


def test_open_npy_for_writing_allocates_the_whole_file(tmp_path):
    from mri.downstream.data import open_npy_for_writing
    path = str(tmp_path / 'a.npy')
    array = open_npy_for_writing(path, 'uint16', (3, 64, 64))
    array[2] = 7
    array.flush()
    del array
    assert os.stat(path).st_blocks * 512 >= 3 * 64 * 64 * 2  # Allocated, not sparse.
    import numpy as np
    assert np.load(path)[2].max() == 7


def test_atomic_output_names_the_file_on_a_full_disk(tmp_path):
    """torch.save reports ENOSPC as a chain of RuntimeErrors; any write error chained to ENOSPC is one DiskFullError."""
    import errno
    target = str(tmp_path / 'out.bin')
    with pytest.raises(dnnlib.DiskFullError) as info:
        with dnnlib.atomic_output(target) as tmp:
            try:
                raise OSError(errno.ENOSPC, 'No space left on device')
            except OSError:
                raise RuntimeError('unexpected pos 339456 vs 339344')
    assert str(info.value) == f'No space left on device while writing {target}'
    assert info.value.__suppress_context__ and os.listdir(tmp_path) == []
    assert dnnlib.disk_full_message(ValueError('x')) is None


def test_run_lock_removes_killed_writers_temps_in_the_named_subfolders(tmp_path):
    """SIGKILL during an atomic write leaves its '.tmp-*' (0 bytes for a snapshot); the next holder of the lock
    removes them, in the folder and the subfolders a job writes into, and nothing else."""
    from training.checkpoint import RunDirBusy, RunLock
    (tmp_path / 'synthetic').mkdir()
    for name in ('.tmp-abc.pt', 'synthetic/.tmp-x.npy', 'keep.txt', 'synthetic/pool0-images.npy'):
        (tmp_path / name).write_bytes(b'')
    with RunLock(str(tmp_path), temp_dirs=('synthetic', 'checkpoints'), doing='evaluating into this outdir'):
        assert sorted(os.listdir(tmp_path)) == ['keep.txt', 'run.lock', 'synthetic']
        assert os.listdir(tmp_path / 'synthetic') == ['pool0-images.npy']
        import subprocess
        import sys
        probe = ('import sys; from training.checkpoint import RunLock\n'
                 f'RunLock({str(tmp_path)!r}, doing="evaluating into this outdir").__enter__()')
        res = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert f'another process (PID {os.getpid()}) is evaluating into this outdir' in res.stderr
        assert RunDirBusy.__name__ in res.stderr


# ---------------------------------------------------------------------------------------------------------------
# Two dataset_tool.py runs to one --dest (issue 20, item 4).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dataset_tool(dest, *extra, wait=True):
    import subprocess
    import sys
    args = [sys.executable, 'dataset_tool.py', '--source', 'phantom', '--phantom-cases', '2', '--resolution', '32',
            '--planes', 'axial', '--dest', str(dest), '--no-progress', *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if not wait:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_second_dataset_tool_to_one_dest_is_refused(tmp_path):
    """Both used to say "wrote" (the later archive replacing the earlier). The first is frozen (SIGSTOP) once it
    holds the destination's lock, so the second surely meets it running."""
    import signal
    import time
    import zipfile
    dest = tmp_path / 'd.zip'
    first = _dataset_tool(dest, wait=False)
    lock = tmp_path / '.d.zip.lock'
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _dataset_tool(dest, '--overwrite')
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 1 and 'Traceback' not in second.stderr, second.stderr
    assert second.stderr.strip().splitlines() == [f'Error: {dest}: another dataset_tool.py (PID {first.pid}) is '
                                                  f'writing this --dest; wait for it to finish, or stop it first']
    assert first.returncode == 0 and 'wrote' in out, err
    with zipfile.ZipFile(dest) as z:
        assert 'dataset.json' in z.namelist()
    assert not lock.exists()


def test_a_dead_runs_lock_and_temporaries_beside_dest_are_taken_over(tmp_path):
    """A lock file of a killed run (its PID, no flock) is taken over; its temporary archive and spool go, the
    '.old-' of an interrupted replacement (maybe the only copy of the previous archive) stays."""
    dest = tmp_path / 'd.zip'
    (tmp_path / '.d.zip.lock').write_text('999999\n')
    (tmp_path / '.d.zip.abcd1234.tmp').write_bytes(b'PK half')
    (tmp_path / '.d.zip.abcd1234.spool').mkdir()
    (tmp_path / '.d.zip.old-77').write_bytes(b'previous')
    res = _dataset_tool(dest)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == ['.d.zip.old-77', 'd.zip']


def test_dest_lock_held_in_this_process_names_it(tmp_path):
    """The lock is the kernel's (flock): held by a live process, the refusal names that process."""
    from mri.sources import convert
    dest = tmp_path / 'sub' / 'd.zip'
    with convert.locked_dest(dest):
        with pytest.raises(convert.ConversionError, match=f'another dataset_tool.py \\(PID {os.getpid()}\\)'):
            with convert.locked_dest(dest):
                pass
    assert not (tmp_path / 'sub').exists()  # Made for the lock only; nothing was written.


def test_disk_full_with_workers_is_one_line(tmp_path, monkeypatch):
    """A worker's spool write on a full disk crossed the pool as a RemoteTraceback; now one line naming --dest."""
    import errno
    from click.testing import CliRunner
    import builtins
    import dataset_tool
    from mri.sources import convert
    real_open = builtins.open

    def open_full(path, mode='r', *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith('.bin') and '.spool' in str(path):
            def write(data):
                raise OSError(errno.ENOSPC, 'No space left on device')
            f.write = write
        return f
    monkeypatch.setattr(builtins, 'open', open_full)  # Forked workers inherit it.
    monkeypatch.setattr(convert.os, 'cpu_count', lambda: 2)
    dest = tmp_path / 'd.zip'
    result = CliRunner().invoke(dataset_tool.main, ['--source', 'phantom', '--phantom-cases', '2', '--resolution', '32',
                                                    '--planes', 'axial', '--workers', '2', '--dest', str(dest),
                                                    '--no-progress'])
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    assert f'Error: No space left on device while writing {dest}; nothing was written' in result.output
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM while a script imports (issue 20, item 9).

def _default_ctrl_c():
    """The child's Ctrl-C back to its default action: a suite run in the background by a non-interactive shell
    (`bash .ci/run &`) ignores SIGINT, children inherit that, and Python then sets up no KeyboardInterrupt."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_while_importing(script, sig):
    """Start ``script --help`` with -X importtime (each finished import is a line on stderr), send ``sig`` as soon
    as click has been imported (after dnnlib's handler is in place, before torch and the project's modules),
    and return (returncode, the stderr lines that are not import timings)."""
    import signal  # noqa: F401
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, '-X', 'importtime', script, '--help'], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'),
                            preexec_fn=_default_ctrl_c)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith('import time:') and line.rstrip().endswith('| click'):
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    other = [ln for ln in (''.join(lines) + rest).splitlines() if not ln.startswith('import time:')]
    return proc.returncode, [ln for ln in other if ln.strip()]


def _cli_scripts():
    """Every top-level script with a click command (new ones are picked up)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, '*.py'))
                  if '@click.command' in open(p).read())


@pytest.mark.parametrize('script', _cli_scripts())
def test_ctrl_c_while_importing_is_one_line(script):
    import signal
    code, lines = _signal_while_importing(script, signal.SIGINT)
    assert (code, lines) == (130, ['Interrupted']), lines


def test_sigterm_while_importing_is_treated_like_ctrl_c():
    import signal
    code, lines = _signal_while_importing('train.py', signal.SIGTERM)
    assert (code, lines) == (143, ['Interrupted (SIGTERM)']), lines


def test_sigterm_mid_run_cleans_up_and_says_one_line(tmp_path):
    """SIGTERM while dataset_tool.py writes its phantom cases (dnnlib.sigterm_as_interrupt around the conversion):
    the temporary cases and the archive's lock are removed, one line says so, exit 143."""
    import glob
    import signal
    import subprocess
    import sys
    import time
    scratch, out = tmp_path / 'tmp', tmp_path / 'out'
    scratch.mkdir()
    out.mkdir()
    proc = subprocess.Popen([sys.executable, 'dataset_tool.py', '--source', 'phantom', '--phantom-cases', '2',
                             '--dest', str(out / 'a.zip'), '--resolution', '32', '--no-progress'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(scratch)))
    deadline = time.time() + 60
    while not glob.glob(str(scratch / 'mri-phantom-*' / '*')) and proc.poll() is None:  # the first case is written
        assert time.time() < deadline
        time.sleep(0.005)
    assert proc.poll() is None, 'the conversion ended before it could be terminated'
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [f'terminated (SIGTERM); nothing was written to {out / "a.zip"}']
    assert os.listdir(out) == [] and os.listdir(scratch) == []


def test_run_cli_turns_click_aborted_into_interrupted(capsys, monkeypatch):
    """After the imports, a Ctrl-C that reaches click was "Aborted!" and exit 1; run_cli makes it the same line and
    code as during the imports. Click errors keep their own line and code."""
    import atexit
    import click
    import dnnlib.script as script

    @click.command()
    @click.option('--fail', is_flag=True)
    def cmd(fail):
        if fail:
            raise click.UsageError('--fail: no')
        raise KeyboardInterrupt

    def fake_exit(code):  # os._exit would end the test runner
        raise SystemExit(('os._exit', code))
    monkeypatch.setattr(script.os, '_exit', fake_exit)
    monkeypatch.setattr(atexit, '_run_exitfuncs', lambda: None)
    monkeypatch.setattr(script, '_ignore_late_signals', lambda: None)  # the test runner keeps its Ctrl-C
    monkeypatch.setattr(atexit, 'register', lambda *a, **k: None)
    with pytest.raises(SystemExit) as info:
        dnnlib.run_cli(cmd, args=[])
    assert info.value.code == ('os._exit', 130)
    assert capsys.readouterr().err.strip().splitlines() == ['Interrupted']
    with pytest.raises(SystemExit) as info:
        dnnlib.run_cli(cmd, args=['--fail'])
    assert info.value.code == 2 and 'Error: --fail: no' in capsys.readouterr().err


@pytest.mark.slow
def test_stress_quick_reports_no_failure(tmp_path):
    """bench/stress.py --quick: one or two cases of every fault class of the audit, 0 failures (disk_full skipped,
    with its reason, where user namespaces are off)."""
    import json
    import subprocess
    import sys
    out = tmp_path / 'stress.json'
    res = subprocess.run([sys.executable, 'bench/stress.py', '--quick', '--json', str(out)], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report['total']['failed'] == 0 and report['total']['passed'] >= 6
    assert set(report['classes']) == {'bad_inputs', 'signals', 'concurrent', 'disk_full', 'interrupts'}
    assert 'failed' in res.stdout.splitlines()[-1 - len(report['classes']) - 1]  # The table's header.


def test_bench_archive_codec_runs_at_a_tiny_size(tmp_path):
    """bench/bench_archive_codec.py on one tiny phantom case at 32^2: every form decodes to the stored pixels (the
    bench checks it), blosc2 rows only where blosc2 imports; an absent case is skipped in one line."""
    import json
    import subprocess
    import sys
    from mri.sources.phantom import write_phantom_cases
    write_phantom_cases(str(tmp_path / 'cases'), 1, seed=0, shape=(40, 40, 28), progress=False)
    (case,) = (tmp_path / 'cases').iterdir()
    out = tmp_path / 'codec.json'
    res = subprocess.run([sys.executable, 'bench/bench_archive_codec.py', '--case', str(case), '--resolution', '32',
                          '--repeats', '1', '--deflate-levels', '1', '--workdir', str(tmp_path / 'w'), '--json', str(out)],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r['form']: r for r in json.loads(out.read_text())['rows']}
    assert rows['stored']['bytes_vs_stored'] == 1 and rows['deflate (level 1)']['bytes_vs_stored'] < 1
    assert rows['stored']['members'] == rows['deflate (level 1)']['members'] > 0
    res = subprocess.run([sys.executable, 'bench/bench_archive_codec.py', '--case', str(tmp_path / 'absent')],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith('skipped:'), res.stdout


_LATE_SIGNAL_SCRIPT = r"""
import time
import click
import dnnlib
dnnlib.exit_on_interrupt()
class Slow:
    def __del__(self):  # module teardown: after Python has put the default signal handlers back
        print('tearing down', flush=True)
        time.sleep(3)
slow = Slow()
@click.command()
def main():
    print('done', flush=True)
dnnlib.run_cli(main)
"""


def test_a_late_sigterm_while_python_shuts_down_keeps_the_exit_status():
    """A finished script tears its modules down for a second or two (torch), with Python's default handlers back:
    a SIGTERM then killed it (status -15 after a complete run; bench/stress.py met it). run_cli ignores late
    signals once the command has ended."""
    import signal
    proc = subprocess.Popen([sys.executable, '-c', _LATE_SIGNAL_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'done'
    assert proc.stdout.readline().strip() == 'tearing down'
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and 'Traceback' not in err, (proc.returncode, err)


_POOL_SCRIPT = r"""
import multiprocessing, signal, sys, time
from mri.sources import convert
signal.signal(signal.SIGTERM, lambda *_: None)  # a parent handler that does not end the process, inherited by fork
lock = multiprocessing.get_context('fork').Lock()
def blocked(_):
    with lock:  # waits on a semaphore, as a worker waits on the task queue's lock
        return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN
lock.acquire()
pool = multiprocessing.get_context('fork').Pool(1, initializer=convert._init_worker, initargs=({},))
result = pool.map_async(blocked, [0])
time.sleep(1)
pool.terminate()  # SIGTERM to the worker in its wait
pool.join()
lock.release()
print('joined')
"""


def test_conversion_pool_workers_die_of_sigterm_whatever_the_parent_handles():
    """A forked conversion worker inherited the parent's Python SIGTERM handler; once one outlived Pool.terminate()
    (at the end of every conversion with workers) in a wait, and the parent's join hung the test suite. Workers now
    die of SIGTERM as the kernel does it (and leave Ctrl-C to the parent, which terminates the pool)."""
    import signal
    proc = subprocess.Popen([sys.executable, '-c', _POOL_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('Pool.terminate() did not end a worker waiting on a lock')
    assert proc.returncode == 0 and out.strip().endswith('joined'), out
