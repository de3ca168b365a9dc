"""bench/ablation.py end to end on CPU at a tiny size: every variant trains, FID is measured, table and plot written."""

import json
import os
import subprocess
import sys

import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ablation_tiny_runs_every_variant(tmp_path):
    out = str(tmp_path / 'abl')
    res = subprocess.run([sys.executable, 'bench/ablation.py', '--outdir', out, '--tiny', '--per-class', 'false',
                          '--kimg', '0.016', '--tick', '0.016'], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(out, 'ablation.json')) as f:
        result = json.load(f)
    assert list(result['table']) == ['baseline', 'ada', 'ada-topk', 'ada-fq', 'ada-attn']
    for name, entry in result['table'].items():
        assert len(entry['fid']) == 1, name                      # one snapshot each, at equal kimg
        kimg, values = entry['fid'][0]
        assert kimg == 0.016 and values['fid10k_full'] >= 0
    options = json.load(open(os.path.join(out, 'ada-fq', 'training_options.json')))
    assert options['D_kwargs']['quantize_kwargs']['resolutions'] == [8]
    assert json.load(open(os.path.join(out, 'baseline', 'training_options.json')))['augment_kwargs'] is None
    assert 'variant' in res.stdout and 'ada-attn' in res.stdout  # the printed table
    assert PIL.Image.open(os.path.join(out, 'ablation.png')).size == (720, 440)
