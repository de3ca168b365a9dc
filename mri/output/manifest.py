"""Provenance of a generated dataset: `manifest.json` (what made it, with which options) and one sidecar per case.

`manifest.json` sits at the root of every dataset generate.py writes with `--format brats|nnunet` (docs/cohorts.md):

- `producer` (this module's PRODUCER, so a folder written by anything else is never taken for ours), `format`,
  `layout_version`;
- `snapshot`: its path and sha256 (the file is what the hash names: `--from-manifest` refuses another one);
- `options`: every generation option generate.py needs to make the dataset again (seeds, classes, truncation psi and
  centre, noise mode, native grid, balance, real cases, the privacy gate's threshold; for painted cases the painting
  options and the source cases);
- `code_version` (`git describe` of the checkout when it is one, else the installed package's version) and `date`;
- `status`: 'running' while an export is under way (written before the first case, so a killed export's folder is
  recognised as ours and resumed), 'complete' once rank 0 has seen every case;
- `cases`: one entry per case (its id, seed, class, the gate's verdict; for painted cases the source case and the
  placements), read back from the sidecars, and `dropped`: the samples the privacy gate kept out.

The sidecars hold the same entry per case (the BraTS layout: `<case>/<case>-generation.json`; nnU-Net:
`provenance/<case>.json`); a case is finished when its sidecar exists, which is what a rerun and rank 0 look for.
Only `date`, `code_version` and `status` differ between a dataset and the one `--from-manifest` makes from it.
"""

import datetime
import json
import os
import subprocess

import dnnlib

MANIFEST = 'manifest.json'
PRODUCER = 'mri-gan generate.py'
LAYOUT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be used, or an output folder that holds something else; one line."""


def code_version() -> str:
    """`git describe --always --dirty` of this checkout, else the installed package's version, else 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(['git', 'describe', '--always', '--dirty', '--tags'], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return 'git ' + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version
        return 'mri-gan ' + version('mri-gan')
    except (ImportError, PackageNotFoundError):
        return 'unknown'


def snapshot_record(path) -> dict:
    """{'path', 'sha256'} of a snapshot file."""
    return {'path': os.path.abspath(path), 'sha256': dnnlib.util.sha256_file(path)}


def new_manifest(fmt, snapshot, options) -> dict:
    """A manifest for a dataset about to be written (status 'running', no cases yet)."""
    return {'producer': PRODUCER, 'layout_version': LAYOUT_VERSION, 'format': fmt, 'snapshot': snapshot,
            'options': options, 'code_version': code_version(),
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'status': 'running', 'cases': [], 'dropped': []}


def write_json(path, data) -> str:
    """Writes `data` as indented JSON atomically; returns the path."""
    with dnnlib.atomic_output(path, suffix='.json') as tmp:
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write('\n')
    return path


def read_json(path, what='file'):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise ManifestError(f'{path}: cannot read the {what} ({err.strerror})') from None
    except ValueError:
        raise ManifestError(f'{path}: the {what} is not valid JSON') from None


def read_manifest(path) -> dict:
    """A manifest written by generate.py; one line for anything else."""
    data = read_json(path, 'manifest')
    if not isinstance(data, dict) or data.get('producer') != PRODUCER:
        raise ManifestError(f'{path}: not a manifest written by generate.py (no producer "{PRODUCER}")')
    for key in ('format', 'snapshot', 'options'):
        if key not in data:
            raise ManifestError(f'{path}: the manifest has no "{key}"')
    return data


def check_snapshot(manifest, path, network) -> None:
    """Refuses a snapshot whose sha256 is not the one the manifest records."""
    want = (manifest.get('snapshot') or {}).get('sha256')
    got = dnnlib.util.sha256_file(network)
    if want != got:
        raise ManifestError(f'{network}: sha256 {got[:12]}... differs from the {want and want[:12]}... that {path} '
                            f'records; this is not the snapshot that made the dataset')


def check_outdir(outdir, fmt, sha256) -> dict:
    """Before anything is written: the output folder must be new, empty, or a dataset this snapshot was writing in
    this format (then it is resumed; its manifest is returned). One line for a folder that holds anything else."""
    if not os.path.isdir(outdir):
        return None
    path = os.path.join(outdir, MANIFEST)
    if os.path.isfile(path):
        try:
            old = read_manifest(path)
        except ManifestError as err:
            raise ManifestError(f'--outdir {outdir}: holds {MANIFEST} of another tool ({err}); choose another --outdir') from None
        if old['format'] != fmt:
            raise ManifestError(f'--outdir {outdir}: holds a {old["format"]} dataset, not {fmt}; choose another --outdir')
        if (old.get('snapshot') or {}).get('sha256') != sha256:
            raise ManifestError(f'--outdir {outdir}: holds a dataset made by another snapshot '
                                f'({(old.get("snapshot") or {}).get("path")}); choose another --outdir')
        return old
    visible = [n for n in os.listdir(outdir) if not n.startswith('.')]
    if 'dataset.json' in visible:
        raise ManifestError(f'--outdir {outdir}: holds a dataset.json that generate.py did not write; choose another --outdir')
    if visible:
        raise ManifestError(f'--outdir {outdir}: is not empty and holds no {MANIFEST} ({visible[0]}, ...); choose '
                            f'another --outdir')
    return None


def same_options(old, new) -> bool:
    """True when a resumed dataset was started with the same generation options (else its cases would mix)."""
    return json.loads(json.dumps(old)) == json.loads(json.dumps(new))
