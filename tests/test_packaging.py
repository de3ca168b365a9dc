"""A non-editable install holds the whole project: every package (subpackages such as mri.downstream included),
every top-level script and the CUDA sources of the ops. Builds the wheel offline into a temporary folder (from a
copy of the tree, so that the build leaves nothing in the checkout) and reads its file list."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every top-level module of the checkout (scripts and legacy.py), so a new script missing from py-modules fails here.
SCRIPTS = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith('.py') and f != 'conftest.py')
NOT_SHIPPED = {'.git', 'tests', 'bench', 'build', '__pycache__'}
OPS_SOURCES = ('.cu', '.cpp', '.h')


def _tree_files():
    """(package folders with __init__.py, ops sources) of the checkout, as paths relative to it with '/'."""
    packages, sources = [], []
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in NOT_SHIPPED and not d.startswith('.') and not d.endswith('.egg-info')]
        rel = os.path.relpath(root, ROOT).replace(os.sep, '/')
        if '__init__.py' in files and rel != '.':
            packages.append(rel)
        sources += [f'{rel}/{f}' for f in files if f.endswith(OPS_SOURCES) and rel != '.']
    return packages, sources


def _build_wheel(tmp_path):
    src = tmp_path / 'src'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns('.git', '__pycache__', '*.egg-info', 'build', 'runs',
                                                             '.pytest_cache', '*.pyc'))
    dist = tmp_path / 'dist'
    res = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                          '--quiet', '-w', str(dist), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = dist.glob('*.whl')
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_wheel_holds_every_package_script_and_ops_source(tmp_path):
    names = _build_wheel(tmp_path)
    packages, sources = _tree_files()
    assert 'mri/downstream' in packages and 'torch_utils/ops' in packages  # the walk sees subpackages
    assert sources, 'no .cu/.cpp/.h sources found in the tree'
    missing = [f'{p}/__init__.py' for p in packages if f'{p}/__init__.py' not in names]
    missing += [f'{s}.py' for s in SCRIPTS if f'{s}.py' not in names]
    missing += [s for s in sources if s not in names]
    assert not missing, f'the wheel lacks {missing}'
    assert not any(n.startswith(('tests/', 'bench/')) for n in names)
