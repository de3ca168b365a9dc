"""bench/bench_ab.py: reads both benches' JSON and refuses a --base that is not a checkout (its runs are long, so
they are not run here; docs/benchmarks.md records one)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location('bench_ab', os.path.join(ROOT, 'bench', 'bench_ab.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rates_from_both_benches_json():
    bench = _bench()
    networks = {'results': {'ours': {'G forward': {'img_per_sec': 3.0}, 'params': {'G': 1, 'D': 2}}}}
    assert bench._rates('networks', networks) == {'G forward': 3.0}
    volumes = {'results': [dict(G_fwd_vol_per_s=1.0, D_fwd_bwd_vol_per_s=2.0, bare_fwd_bwd_vol_per_s=3.0,
                                step_vol_per_s=4.0)]}
    assert bench._rates('volumes', volumes) == {'G forward': 1.0, 'D forward+backward': 2.0, 'bare G+D fwd+bwd': 3.0,
                                                'training step': 4.0}
    # Every configured bench names a script of this checkout.
    assert all(os.path.isfile(os.path.join(ROOT, script)) for _, script, _, _ in bench.BENCHES)


def test_base_must_be_a_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        _bench().main(['--base', str(tmp_path)])
    assert err.value.code == 2 and 'not a checkout of this project' in capsys.readouterr().err
