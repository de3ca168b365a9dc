"""BraTS-Africa: where to find it, and an optional resumable download.

BraTS-Africa (Adewole et al., "The Brain Tumor Segmentation (BraTS) Challenge 2023: Glioma Segmentation in
Sub-Saharan Africa Patient Population (BraTS-Africa)", arXiv:2305.19369) is distributed by The Cancer Imaging
Archive (TCIA) under CC BY 4.0, DOI 10.7937/v8h6-8x67: 95 glioma and 51 other-neoplasm cases, one folder per case
named BraTS-SSA-XXXXX-000 holding -t1n, -t1c, -t2w, -t2f and -seg .nii.gz files (the BraTS 2023 naming).

TCIA requires accepting its data-usage terms, so the collection is not fetched behind the user's back: the source
word `brats-africa` resolves to `--brats-root` or `$BRATS_AFRICA_DIR`; `--download URL` (a direct link to an
archive of the collection that the user obtained) fetches it with HTTP Range resumption and a sha256 check, then
extracts it. The downloaded archive is our own intermediate file (a hidden folder beside the collection): after a
successful extraction it is removed, or kept with ``keep_download=True``; one line says which, and where.
"""

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ENV_VAR = 'BRATS_AFRICA_DIR'
DOI = '10.7937/v8h6-8x67'

HOW_TO_GET = (
    'BraTS-Africa not found: pass --brats-root DIR or set ${env} to a folder of BraTS-SSA-XXXXX-000 case folders. '
    'Get the collection (95 glioma + 51 other neoplasm cases, CC BY 4.0) from The Cancer Imaging Archive, '
    'https://doi.org/{doi} (TCIA collection BraTS-Africa; accept the data-usage terms, download the NIfTI archive, '
    'extract it), or give --download URL [--sha256 HEX] to fetch and extract an archive into --brats-root.'
).format(env=ENV_VAR, doi=DOI)


class DownloadError(OSError):
    """A download or extraction failed; one line naming the URL or file and the problem."""


class NotFound(FileNotFoundError):
    """BraTS-Africa could not be located; the message says where to get it and how to point at it."""


def default_root():
    """Where --download puts the collection without --brats-root: the project cache ($MRI_GAN_CACHE)."""
    import dnnlib
    return Path(dnnlib.make_cache_dir_path('brats-africa'))


def resolve_brats_africa(
    brats_root=None,        # explicit folder (--brats-root); wins over the environment
    download=None,          # URL of an archive to fetch when the folder has no cases yet
    sha256=None,            # expected hex digest of the archive
    progress=True,
    environ=None,           # for tests; defaults to os.environ
    keep_download=False,    # keep the fetched archive after extracting it (else it is removed)
):
    """Returns the folder that holds the BraTS-Africa cases. Raises NotFound with the how-to-get message."""
    environ = os.environ if environ is None else environ
    root = brats_root or environ.get(ENV_VAR) or (default_root() if download else None)
    if root is None:
        raise NotFound(HOW_TO_GET)
    root = Path(root).expanduser()
    if download and not _has_nifti(root):
        archive_path = fetch(download, root.parent / f'.{root.name}-download', sha256=sha256, progress=progress)
        extract(archive_path, root)
        _after_extraction(Path(archive_path), root, keep_download)
    if not root.is_dir() or not _has_nifti(root):
        raise NotFound(f'{root}: no .nii/.nii.gz files there. ' + HOW_TO_GET)
    return root


def _after_extraction(archive_path, root, keep):
    """Remove the fetched archive (a copy of what is now extracted) unless kept; one line either way."""
    size = f'{archive_path.stat().st_size / 2**30:.2f} GiB'
    if keep:
        print(f'extracted into {root}; kept the downloaded archive {archive_path} ({size})', file=sys.stderr)
        return
    archive_path.unlink()
    try:
        archive_path.parent.rmdir()  # The hidden download folder, when nothing else is in it.
    except OSError:
        pass
    print(f'extracted into {root}; removed the downloaded archive {archive_path.name} ({size}), a copy of what is '
          f'now extracted (dataset_tool.py --keep-download keeps it)', file=sys.stderr)


def _has_nifti(root):
    root = Path(root)
    if not root.is_dir():
        return False
    return any(p.name.lower().endswith(('.nii', '.nii.gz')) for p in root.rglob('*.nii*'))


def fetch(
    url,                    # http(s) URL, file:// URL or a local path
    folder,                 # where the archive is kept (a .part file while incomplete)
    sha256=None,            # expected hex digest; a mismatch deletes the file
    progress=True,
    chunk_size=1 << 20,
    timeout=60,
):
    """Downloads `url` into `folder`, resuming a previous partial download with an HTTP Range request."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = url.rstrip('/').split('/')[-1].split('?')[0] or 'download'
    final = folder / name
    if final.is_file() and (sha256 is None or _sha256(final) == sha256.lower()):
        return final
    if '://' not in url or url.startswith('file://'):
        src = Path(url[len('file://'):] if url.startswith('file://') else url)
        if not src.is_file():
            raise DownloadError(f'{src}: no such file to use as the download')
        shutil.copyfile(src, final)
    else:
        _http_fetch(url, final, progress, chunk_size, timeout)
    if sha256 is not None:
        digest = _sha256(final)
        if digest != sha256.lower():
            final.unlink()
            raise DownloadError(f'{url}: sha256 mismatch (expected {sha256.lower()}, got {digest}); the file was deleted')
    return final


def _http_fetch(url, final, progress, chunk_size, timeout):
    import requests  # only needed for real downloads
    part = final.with_name(final.name + '.part')
    have = part.stat().st_size if part.exists() else 0
    headers = {'Range': f'bytes={have}-'} if have else {}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
            if r.status_code == 416:  # the part file is already complete
                os.replace(part, final)
                return
            if r.status_code not in (200, 206):
                raise DownloadError(f'{url}: HTTP {r.status_code} {r.reason}')
            if r.status_code == 200:
                have = 0  # the server ignored the Range header: start over
            total = int(r.headers.get('Content-Length', 0)) + have
            t0, done = time.time(), have
            with open(part, 'ab' if have else 'wb') as f:
                for chunk in r.iter_content(chunk_size):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        rate = (done - have) / max(time.time() - t0, 1e-6)
                        left = f', {(total - done) / rate:.0f} s left' if total and rate > 0 else ''
                        sys.stderr.write(f'\rdownloading {final.name}: {done / 2**20:.1f}'
                                         f'{f"/{total / 2**20:.1f}" if total else ""} MiB, {rate / 2**20:.1f} MiB/s{left}   ')
            if progress:
                sys.stderr.write('\n')
    except requests.RequestException as e:
        raise DownloadError(f'{url}: download failed ({type(e).__name__}); run again to resume, '
                            f'or download it by hand and pass --brats-root') from None
    os.replace(part, final)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def extract(archive_path, root):
    """Extracts a .zip or .tar(.gz) archive into `root` atomically (a temporary folder beside it, then a rename).
    Members that would land outside `root` are refused."""
    archive_path, root = Path(archive_path), Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', suffix='.extract', dir=root.parent))
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as z:
                for member in z.namelist():
                    _check_member(member, tmp, archive_path)
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive_path):
            with tarfile.open(archive_path) as t:
                if hasattr(tarfile, 'data_filter'):
                    t.extractall(tmp, filter='data')  # the 'data' filter refuses links and paths outside tmp
                else:  # Python < 3.11.4: check the member paths ourselves
                    for member in t.getmembers():
                        _check_member(member.name, tmp, archive_path)
                        if member.issym() or member.islnk():
                            raise DownloadError(f'{archive_path}: member {member.name} is a link; refusing to extract')
                    t.extractall(tmp)
        else:
            raise DownloadError(f'{archive_path}: not a zip or tar archive')
        if root.exists() and not any(root.iterdir()):
            root.rmdir()
        if root.exists():
            raise DownloadError(f'{root}: exists and is not empty; extract {archive_path} there by hand')
        os.replace(tmp, root)
    except (zipfile.BadZipFile, tarfile.TarError) as e:
        raise DownloadError(f'{archive_path}: corrupt archive ({e})') from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_member(member, dest, archive_path):
    target = (dest / member).resolve()
    if not str(target).startswith(str(dest.resolve()) + os.sep) and target != dest.resolve():
        raise DownloadError(f'{archive_path}: member {member} would be extracted outside the target folder')
