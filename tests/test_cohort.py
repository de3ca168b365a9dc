"""dataset_tool.py --labels cohort: a label group from the BraTS case-id prefix, for slices and volumes; fixed lists
for fine-tuning; bad ids fail in one line with nothing written; generate.py --class ssa on a model trained on it."""

import json
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate
from mri.sources import cohort
from tests.test_dataset_tool import write_case
from torch_utils import snapshot


def convert(*args):
    return CliRunner().invoke(dataset_tool.main, ['--no-progress', *map(str, args)])


def meta(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read('dataset.json'))


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    """Two adult-glioma cases, one BraTS-Africa case and one 2021-named case, with different shapes of brain."""
    root = tmp_path_factory.mktemp('mixed')
    for k, cid in enumerate(['BraTS-GLI-00001-000', 'BraTS-GLI-00002-000', 'BraTS-SSA-00003-000']):
        write_case(root / cid, cid, seed=k)
    write_case(root / 'BraTS2021_00004', 'BraTS2021_00004', naming='2021', seed=3)
    return root


def test_cohort_names():
    assert cohort.cohort_of('BraTS-SSA-00012-000') == 'ssa'
    assert cohort.cohort_of('BraTS-GLI-00000-000') == 'gli'
    assert cohort.cohort_of('BraTS-MEN-RT-0001-1') == 'men_rt'
    assert cohort.cohort_of('BraTS2021_00004') == 'gli'
    assert cohort.cohort_of('BraTS-XYZ-00001-000') == 'xyz'  # well formed but unknown: named from the id
    with pytest.raises(cohort.CohortError, match='case patient7: --labels cohort needs BraTS case ids'):
        cohort.cohort_of('patient7')


@pytest.mark.parametrize('kind', ['slices', 'volumes'])
def test_cohort_group_labels_every_file(mixed, tmp_path, kind):
    dest = tmp_path / f'{kind}.zip'
    r = convert('--source', mixed, '--dest', dest, '--kind', kind, '--resolution', 16 if kind == 'slices' else 8,
                '--planes', 'axial', '--labels', 'cohort')
    assert r.exit_code == 0, r.output
    assert 'cohort: gli 3 cases, ssa 1 cases' in r.output
    m = meta(dest)
    group = next(g for g in m['label_groups'] if g['name'] == 'cohort')
    assert group['values'] == ['gli', 'ssa']
    offset = m['label_names'].index('gli')
    seen = set()
    for relpath, vec in m['labels']:
        case = m['file_cases'][relpath]
        onehot = vec[offset:offset + 2]
        assert onehot == ([0.0, 1.0] if case.startswith('BraTS-SSA') else [1.0, 0.0]), (relpath, vec)
        seen.add(case)
    assert len(seen) == 4


def test_fixed_cohort_list_and_bad_ids(mixed, tmp_path):
    dest = tmp_path / 'fixed.zip'
    r = convert('--source', mixed, '--dest', dest, '--resolution', 16, '--planes', 'axial',
                '--labels', 'cohort=ssa,gli,men')
    assert r.exit_code == 0, r.output
    assert meta(dest)['label_names'] == ['axial', 'ssa', 'gli', 'men']

    # A case outside the fixed list, and a case id without a cohort prefix: one line each, nothing written.
    for labels, message, extra in [('cohort=ssa', 'Error: case BraTS-GLI-00001-000: cohort gli is not in --labels cohort=ssa', None),
                                   ('cohort', 'Error: case patient7: --labels cohort needs BraTS case ids', 'patient7'),
                                   ('cohort=', 'Error: --labels cohort=: expected cohort or cohort=NAME', None)]:
        source = mixed
        if extra:
            source = tmp_path / 'with-bad'
            write_case(source / extra, extra)
            write_case(source / 'BraTS-GLI-00001-000', 'BraTS-GLI-00001-000')
        bad = tmp_path / 'bad.zip'
        r = convert('--source', source, '--dest', bad, '--resolution', 16, '--planes', 'axial', '--labels', labels)
        assert r.exit_code == 1 and r.output.startswith(message) and r.output.count('\n') == 1, r.output
        assert not bad.exists() and not list(tmp_path.glob('.bad*'))


def test_generate_class_by_cohort(mixed, tmp_path):
    """A conditional 2D generator built for the archive's labels answers --class axial,ssa and refuses unknown names."""
    dest = tmp_path / 'c.zip'
    assert convert('--source', mixed, '--dest', dest, '--resolution', 16, '--planes', 'axial,coronal',
                   '--labels', 'cohort').exit_code == 0
    from training.dataset import ImageFolderDataset
    from training.networks import Generator
    ds = ImageFolderDataset(str(dest), use_labels=True)
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=ds.label_dim, w_dim=8, img_resolution=16, img_channels=1,
                  mapping_kwargs=dict(num_layers=1), channel_base=64, channel_max=8)
    net = tmp_path / 'net.pt'
    snapshot.save_snapshot(str(net), dict(G=G, D=None, G_ema=G, augment_pipe=None), dataset=ds.describe())
    runner = CliRunner()
    r = runner.invoke(generate.main, ['--network', net, '--seeds', '0', '--class', 'axial,ssa', '--outdir', tmp_path / 'out',
                                      '--format', 'npy'])
    assert r.exit_code == 0, r.output
    ssa = np.load(tmp_path / 'out/seed0000.npy')
    r = runner.invoke(generate.main, ['--network', net, '--seeds', '0', '--class', 'axial,gli', '--outdir', tmp_path / 'gli',
                                      '--format', 'npy'])
    assert r.exit_code == 0, r.output
    assert not np.allclose(np.load(tmp_path / 'gli/seed0000.npy'), ssa)  # the cohort reaches the generator
    r = runner.invoke(generate.main, ['--network', net, '--seeds', '0', '--class', 'axial,men', '--outdir', tmp_path / 'x'])
    assert r.exit_code == 1 and "unknown name 'men'" in r.output and 'cohort: gli, ssa' in r.output
