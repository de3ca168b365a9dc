"""bench/gpu_check.sh --dry-run: the GPU check runs end to end on the CPU at tiny sizes, so it cannot rot
between GPU sessions."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_step(tmp_path):
    out = tmp_path / 'out'
    env = dict(os.environ, MRI_GAN_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', os.path.join(ROOT, 'bench', 'gpu_check.sh'), str(out), '--dry-run'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ['gpu_check.json', 'gpu_check.log']  # Scratch stays out of OUT_DIR.
    result = json.loads((out / 'gpu_check.json').read_text())
    steps = result['steps']
    assert result['dry_run'] is True
    assert set(steps) == {'tests', 'networks', 'training', 'fid', 'volumes'}
    assert steps['tests']['plugin_agreement'] == {'skipped': 'no CUDA device'}
    assert all(c['rc'] in (0, 5) for c in steps['tests']['commands']), steps['tests']
    rows = steps['networks']['rows']
    assert [(r['plugins'], r['fp16_res']) for r in rows] == [('on', 4), ('off', 0)]
    assert all(r['rc'] == 0 and r['img_per_sec']['G forward'] > 0 for r in rows), rows
    assert all(r['ratio_ours_over_reference']['training step'] > 0 for r in rows)
    runs = steps['training']['runs']
    assert [(r['variant'], r['rc']) for r in runs] == [('plain', 0), ('hooks', 0)], runs
    assert all(r['sec_per_kimg'] > 0 for r in runs)
    assert steps['fid']['rc'] == 0 and steps['fid']['result']['results']['fid10k_full'] > 0, steps['fid']
    assert steps['volumes'].get('rc', 0) == 0 or 'skipped' in steps['volumes']


def test_gpu_check_refuses_without_gpu_unless_dry_run(tmp_path):
    if __import__('torch').cuda.is_available():
        pytest.skip('has a GPU')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'gpu_check.py'), str(tmp_path / 'o'),
                           '--steps', 'tests'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert 'no CUDA device; run with --dry-run' in proc.stdout


def test_gpu_check_unknown_step_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'gpu_check.py'), str(tmp_path / 'o'),
                           '--steps', 'tests,warp'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert 'unknown step(s) warp' in proc.stderr
    assert not (tmp_path / 'o').exists()
