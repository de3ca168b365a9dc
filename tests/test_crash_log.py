"""A crash during training leaves its full traceback in log.txt of the run dir, on every rank that crashes."""

import glob
import os
import subprocess
import sys

import pytest

from tests.helpers import make_png_folder, zip_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _archive_that_breaks_mid_run(tmp_path):
    """A zip whose first image is fine and whose others are cut inside their pixel data: their headers are those of
    the first (the checks before training read headers only), and they fail when loaded."""
    root = make_png_folder(str(tmp_path / 'src'), n=16, res=16, num_classes=2)
    for i in range(1, 16):
        path = os.path.join(root, f'img{i:04d}.png')
        with open(path, 'rb') as f:
            data = f.read()
        with open(path, 'wb') as f:  # Everything up to the pixel data (IDAT), then a few bytes of it: truncated.
            f.write(data[:data.index(b'IDAT') + 8])
    return zip_folder(root, str(tmp_path / 'broken.zip'))


def _train(data, outdir, *extra):
    return subprocess.run([sys.executable, 'train.py', '--data', data, '--outdir', outdir, '--kimg', '0.1',
                           '--cbase', '256', '--cmax', '16', '--map-depth', '1', '--batch', '4', '--metrics', 'none',
                           '--device', 'cpu', *extra],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)


def test_crash_traceback_reaches_log_txt(tmp_path):
    res = _train(_archive_that_breaks_mid_run(tmp_path), str(tmp_path / 'runs'))
    assert res.returncode != 0
    (run,) = glob.glob(str(tmp_path / 'runs' / '*'))
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'Training crashed (pid ' in log
    crash = log[log.index('Training crashed'):]
    assert 'Traceback (most recent call last):' in crash and 'training_loop' in crash
    assert 'unreadable image' in crash and 'broken.zip/img00' in crash  # The error itself, naming the file.
    assert crash.rstrip().splitlines()[-1] in res.stderr                # The same last line the console got.


def _rank(rank, c, init_file):
    import train
    try:
        train.subprocess_fn(rank, c, init_file)
    except Exception:
        os._exit(1)  # The crash is logged; spare the test runner's stderr a second copy.


@pytest.mark.slow
def test_crash_on_two_gloo_processes_logs_every_rank(tmp_path):
    # The processes of `train.py --gpus 2 --device cpu`, started without torch's spawn, whose 30-s grace
    # period after a failure would only slow the test down.
    import multiprocessing
    from training.config import setup_training_config
    c = setup_training_config(data=_archive_that_breaks_mid_run(tmp_path), gpus=2, batch=4, cbase=256, cmax=16,
                              map_depth=1, kimg=0.1, metrics='none', device='cpu')
    assert c.data_loader_kwargs.num_workers > 0
    c.run_dir = str(tmp_path / 'run')
    os.makedirs(c.run_dir)
    ctx = multiprocessing.get_context('spawn')
    procs = [ctx.Process(target=_rank, args=(rank, c, str(tmp_path / 'init'))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [1, 1]
    log = open(os.path.join(c.run_dir, 'log.txt')).read()
    assert 'Training crashed on rank 0 of 2' in log, log[-3000:]
    rank1 = [line[len('[rank 1] '):] for line in log.splitlines() if line.startswith('[rank 1] ')]
    assert rank1 and rank1[0].startswith('Training crashed on rank 1 of 2'), log[-3000:]
    assert 'Traceback (most recent call last):' in rank1
    assert any('unreadable image' in line for line in rank1)


def _archive_with_a_corrupt_member(tmp_path, bad=5):
    """A zip of deflated .npy members (dataset_tool's --compress-level 1-9 form) whose member ``bad`` has bytes
    flipped near the end of its compressed data: its header reads (the checks before training pass), its pixels
    fail to inflate or fail the CRC when a DataLoader worker loads it."""
    import zipfile
    root = make_png_folder(str(tmp_path / 'src'), n=16, res=64, num_classes=2, channels=2, bit16=True)  # > 4 KB deflated
    path = str(tmp_path / 'deflated.zip')
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(os.listdir(root)):
            z.write(os.path.join(root, name), name)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f'img{bad:04d}.npy')
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), 'little'), int.from_bytes(f.read(2), 'little')
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start + info.compress_size - 12)
        flipped = bytes(b ^ 0x5A for b in f.read(8))
        f.seek(start + info.compress_size - 12)
        f.write(flipped)
    return path, f'deflated.zip/img{bad:04d}.npy'


def test_corrupt_member_met_by_a_dataloader_worker_is_one_line(tmp_path):
    """docs/data.md: a member that cannot be decoded stops training with one line naming archive and member (the
    default DataLoader workers read it: the error crosses from a worker), and log.txt holds it with the worker's
    traceback."""
    data, member = _archive_with_a_corrupt_member(tmp_path)
    res = _train(data, str(tmp_path / 'runs'), '--kimg', '0.2')
    assert res.returncode == 1, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and member in errors[0] and 'unreadable image' in errors[0], res.stderr[-3000:]
    (run,) = glob.glob(str(tmp_path / 'runs' / '*'))
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'Training crashed' in log and log.rstrip().splitlines()[-1] == errors[0]


def test_corrupt_member_crosses_from_a_worker_as_one_line(tmp_path):
    """The reals grid may meet the member first (in the training process); here a DataLoader with workers, as the
    loop builds it, meets it: the error reaching the training process is the worker's one line, and the worker's
    traceback rides along for log.txt."""
    import torch
    from training.dataset import DatasetError, ImageFolderDataset
    data, member = _archive_with_a_corrupt_member(tmp_path)
    dataset = ImageFolderDataset(data)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    with pytest.raises(DatasetError) as info:
        for _ in loader:
            pass
    assert str(info.value).endswith(f"{member}: unreadable image (Bad CRC-32 for file '{member.split('/')[-1]}')")
    assert '\n' not in str(info.value)
    assert 'DataLoader worker process' in info.value.worker_traceback


def _tmpfs_available():
    """unshare -rm (a user and mount namespace, no root needed) lets a test mount a tiny tmpfs: a real full disk."""
    import shutil
    if shutil.which('unshare') is None:
        return False
    probe = subprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs -o size=64k tmpfs /mnt || exit 1'],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_disk_full_during_training_is_one_line_and_log_txt_holds_it(tmp_path):
    """The disk fills at the first snapshot (a 600 KB tmpfs): one line on the console naming the snapshot, no
    chained tracebacks, and log.txt ends with that line after the traceback (it was cut at 4096 bytes)."""
    if not _tmpfs_available():
        pytest.skip('no user namespaces here (unshare -rm): the monkeypatched test below covers the logic')
    root = make_png_folder(str(tmp_path / 'src'), n=16, res=16, num_classes=2)
    data = zip_folder(root, str(tmp_path / 'd.zip'))
    mnt = tmp_path / 'small'
    mnt.mkdir()
    script = (f'mount -t tmpfs -o size=600k tmpfs {mnt} && {sys.executable} train.py --data {data} --outdir {mnt}/runs '
              f'--kimg 0.1 --cbase 256 --cmax 16 --map-depth 1 --batch 4 --metrics none --device cpu --snap 1 '
              f'--tick 0.02; rc=$?; cat {mnt}/runs/*/log.txt > {tmp_path}/log.txt; ls -a {mnt}/runs/* > {tmp_path}/ls; '
              f'exit $rc')
    res = subprocess.run(['unshare', '-rm', 'sh', '-c', script], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'No space left on device while writing' in errors[0], res.stderr[-3000:]
    assert 'network-snapshot-' in errors[0] and '--resume' in errors[0]
    log = (tmp_path / 'log.txt').read_text()
    assert 'Traceback' in log and log.rstrip().splitlines()[-1] == errors[0]
    assert '.tmp-' not in (tmp_path / 'ls').read_text()  # Neither the snapshot's temporary file nor the reserve.


def test_logger_keeps_the_crash_record_when_the_disk_is_full(tmp_path, monkeypatch, capsys):
    """The same without a tmpfs: log.txt's writes fail with ENOSPC from some point on; the reserve is given back
    and the crash block reaches the file through a fresh descriptor."""
    import errno
    import dnnlib
    import train
    logger = train.Logger(str(tmp_path / 'log.txt'))
    try:
        assert os.path.getsize(tmp_path / '.tmp-log-reserve') == train.LOG_RESERVE
        print('tick 0')

        def full(text):
            raise OSError(errno.ENOSPC, 'No space left on device')
        monkeypatch.setattr(logger.file, 'write', full)
        print('tick 1')  # Refused by the file, still on the console.
        try:
            raise dnnlib.DiskFullError(str(tmp_path / 'network-snapshot-000000020.pt'))
        except OSError:
            train.log_crash(str(tmp_path), 0, 1, logger)
    finally:
        logger.close()
    log = (tmp_path / 'log.txt').read_text()
    assert log.startswith('tick 0\n') and 'tick 1' not in log and 'tick 1' in capsys.readouterr().out
    assert log.rstrip().splitlines()[-1].startswith('Error: No space left on device while writing ')
    assert not (tmp_path / '.tmp-log-reserve').exists()
