"""dnnlib: class lookup by name, seed ranges, open_url's cache, checksum and offline message, and SIGTERM as Ctrl-C
for a block."""

import hashlib
import http.server
import os
import threading

import pytest

import dnnlib


def test_construct_class_by_name_and_errors():
    d = dnnlib.construct_class_by_name(class_name='dnnlib.EasyDict', a=1)
    assert d.a == 1
    with pytest.raises(ImportError):
        dnnlib.get_obj_by_name('dnnlib.NoSuchThing')


def test_parse_range():
    assert dnnlib.parse_range('0-3,7, 10-11') == [0, 1, 2, 3, 7, 10, 11]
    with pytest.raises(ValueError):
        dnnlib.parse_range('3-1')
    with pytest.raises(ValueError):
        dnnlib.parse_range('a')


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / 'www'
    root.mkdir()
    (root / 'weights.bin').write_bytes(b'0123456789' * 100)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def test_open_url_downloads_checks_and_caches(server, tmp_path, monkeypatch):
    monkeypatch.setenv('MRI_GAN_CACHE', str(tmp_path / 'cache'))
    url = server + '/weights.bin'
    digest = hashlib.sha256(b'0123456789' * 100).hexdigest()
    with dnnlib.open_url(url, sha256=digest, verbose=False) as f:
        assert f.read() == b'0123456789' * 100
    cached = dnnlib.open_url(url, sha256=digest, verbose=False, return_filename=True)
    assert os.path.isfile(cached) and not [n for n in os.listdir(os.path.dirname(cached)) if n.startswith('.tmp-')]
    with pytest.raises(dnnlib.DownloadError, match='sha256 mismatch'):
        dnnlib.open_url(server + '/weights.bin?x', sha256='0' * 64, verbose=False, num_attempts=1)


def test_open_url_offline_message_names_url_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('MRI_GAN_CACHE', str(tmp_path / 'cache'))
    url = 'http://127.0.0.1:9/inception.pt'  # discard port: connection refused at once
    with pytest.raises(dnnlib.DownloadError) as err:
        dnnlib.open_url(url, verbose=False, num_attempts=1)
    msg = str(err.value)
    assert '\n' not in msg and url in msg and str(tmp_path / 'cache') in msg
    with pytest.raises(dnnlib.DownloadError, match='no such file'):
        dnnlib.open_url(str(tmp_path / 'missing.pt'))


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM as Ctrl-C for a block (what the scripts' main() use, also when click's CliRunner runs them in-process).

def test_sigterm_as_interrupt_restores_the_previous_handler_and_records_the_signal(capsys):
    import signal
    caught = []

    def previous(signum, frame):
        caught.append(signum)

    before = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(KeyboardInterrupt):
            with dnnlib.sigterm_as_interrupt():
                assert signal.getsignal(signal.SIGTERM) is not previous
                os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
                pytest.fail('SIGTERM did not interrupt the block')
        assert signal.getsignal(signal.SIGTERM) is previous  # restored on the way out
        assert dnnlib.terminated_by_sigterm() and dnnlib.interrupt_exit_code() == 143
        assert dnnlib.stop_reason() == 'terminated (SIGTERM)'
        with pytest.raises(SystemExit) as info:
            dnnlib.exit_interrupted('nothing was written')
        assert info.value.code == 143
        assert capsys.readouterr().err == '\nterminated (SIGTERM); nothing was written\n'

        # A new block forgets the earlier signal: Ctrl-C inside it is 130. As a decorator, the same.
        @dnnlib.sigterm_as_interrupt()
        def job():
            assert signal.getsignal(signal.SIGTERM) is not previous
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            job()
        assert signal.getsignal(signal.SIGTERM) is previous and caught == []
        assert not dnnlib.terminated_by_sigterm() and dnnlib.interrupt_exit_code() == 130
        with pytest.raises(SystemExit) as info:
            dnnlib.exit_interrupted()
        assert info.value.code == 130 and capsys.readouterr().err == '\ninterrupted\n'
    finally:
        signal.signal(signal.SIGTERM, before)
