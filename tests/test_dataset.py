"""training.dataset: 8/16-bit PNG, .npy, int and float labels, named groups, splits, mirror, content hash."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from tests.helpers import make_png_folder, zip_folder
from training.dataset import DatasetError, ImageFolderDataset


def test_8bit_folder_int_labels_become_onehot(tmp_path):
    root = make_png_folder(str(tmp_path / 'd'), n=6, res=16, num_classes=3)
    ds = ImageFolderDataset(root, use_labels=True)
    img, label = ds[4]
    assert img.shape == (1, 16, 16) and img.dtype == np.uint8
    assert ds.dtype_max == 255 and ds.resolution == 16 and ds.num_channels == 1
    assert label.tolist() == [0, 1, 0]  # image 4 is class 1
    assert ds.label_names == ['class0', 'class1', 'class2']
    assert ds.label_groups == [{'name': 'class', 'values': ['class0', 'class1', 'class2']}]


def test_16bit_zip_and_named_groups(tmp_path):
    root = make_png_folder(str(tmp_path / 'd'), n=4, res=16, bit16=True, labels='groups')
    ds = ImageFolderDataset(zip_folder(root, str(tmp_path / 'd.zip')), use_labels=True)
    img, label = ds[0]
    assert img.dtype == np.uint16 and ds.dtype_max == 65535
    assert img.max() > 255  # really 16-bit data, not 8-bit promoted
    assert ds.label_names == ['axial', 'coronal']
    assert ds.label_groups[0]['name'] == 'plane'


def test_npy_multichannel(tmp_path):
    root = make_png_folder(str(tmp_path / 'd'), n=4, res=8, channels=7, labels='float')
    ds = ImageFolderDataset(root, use_labels=True)
    img, label = ds[1]
    assert img.shape == (7, 8, 8) and ds.channels == [f'ch{i}' for i in range(7)]
    assert label.dtype == np.float32 and label.tolist() == [0.0, 1.0]


def test_mirror_doubles_and_flips(tmp_path):
    root = make_png_folder(str(tmp_path / 'd'), n=3, res=8)
    ds = ImageFolderDataset(root, xflip=True)
    assert len(ds) == 6
    np.testing.assert_array_equal(ds[3][0], ds[0][0][..., ::-1])
    assert ds[0][1].shape == (0,)  # labels off by default


def test_subset_uses_case_split(tmp_path):
    root = make_png_folder(str(tmp_path / 'd'), n=8, res=8, with_split=True)
    train = ImageFolderDataset(root, subset='train')
    val = ImageFolderDataset(root, subset='val')
    assert len(train) == 6 and len(val) == 2
    names_val = {val.image_fname(i) for i in range(len(val))}
    assert names_val == {'img0000.png', 'img0004.png'}  # case0 only
    assert {val.file_case(i) for i in range(len(val))} == {'case0'}
    assert ImageFolderDataset(make_png_folder(str(tmp_path / 'f'), n=2, res=8)).file_case(0) is None
    with pytest.raises(DatasetError, match='no case-level split'):
        ImageFolderDataset(make_png_folder(str(tmp_path / 'e'), n=2, res=8), subset='val')


def test_content_hash_changes_with_content(tmp_path):
    root = make_png_folder(str(tmp_path / 'd'), n=4, res=8)
    h1 = ImageFolderDataset(root).content_hash()
    assert ImageFolderDataset(root).content_hash() == h1
    make_png_folder(root, n=4, res=8, seed=1)  # same names, other pixels
    assert ImageFolderDataset(root).content_hash() != h1
    z = zip_folder(root, str(tmp_path / 'a.zip'))
    hz = ImageFolderDataset(z).content_hash()
    make_png_folder(root, n=4, res=8, seed=2)
    assert ImageFolderDataset(zip_folder(root, str(tmp_path / 'b.zip'))).content_hash() != hz


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match='not a dataset folder'):
        ImageFolderDataset(str(tmp_path / 'missing'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DatasetError, match='no images'):
        ImageFolderDataset(str(empty))
    root = make_png_folder(str(tmp_path / 'd'), n=2, res=8)
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        f.write('{broken')
    with pytest.raises(DatasetError, match='dataset.json: not valid JSON'):
        ImageFolderDataset(root)
    root = make_png_folder(str(tmp_path / 'e'), n=2, res=8)
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'labels': [['img0000.png', 0]]}, f)
    with pytest.raises(DatasetError, match='no label for img0001.png'):
        ImageFolderDataset(root, use_labels=True).label_dim
    with pytest.raises(DatasetError, match='expected 32x32'):
        ImageFolderDataset(root, resolution=32)


@pytest.mark.parametrize('labels, problem', [
    ([0.5, float('nan')], 'not finite'), ([1.0, float('inf')], 'not finite'), (-1, 'negative'),
    ('yes', 'neither ints nor'), ([1.0], 'neither ints nor')])
def test_bad_labels_are_one_line_naming_the_file(tmp_path, labels, problem):
    """NaN labels once trained to exit 0 with NaN weights; ragged, string and negative labels crashed late."""
    root = make_png_folder(str(tmp_path / 'd'), n=2, res=8)
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        f.write(json.dumps({'labels': [['img0000.png', [0.0, 1.0] if isinstance(labels, list) else 0],
                                       ['img0001.png', labels]]}))
    with pytest.raises(DatasetError, match=problem) as err:
        ImageFolderDataset(root, use_labels=True).label_dim
    assert 'dataset.json' in str(err.value) and '\n' not in str(err.value)
    from click.testing import CliRunner
    import train
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', root, '--cond=1',
                                             '--device', 'cpu', '--dry-run'])
    assert result.exit_code == 2 and problem in result.output and 'Traceback' not in result.output, result.output


@pytest.mark.parametrize('odd', ['size', 'rgb', '8bit'])
def test_one_odd_png_is_refused_before_training(tmp_path, odd):
    """One 32x32, RGB or 8-bit PNG among 16x16 16-bit ones once crashed training mid-run (bare AssertionError)."""
    root = make_png_folder(str(tmp_path / 'd'), n=4, res=16, bit16=True)
    img = {'size': PIL.Image.new('I;16', (32, 32)), 'rgb': PIL.Image.new('RGB', (16, 16)),
           '8bit': PIL.Image.new('L', (16, 16))}[odd]
    img.save(os.path.join(root, 'img0002.png'))
    with pytest.raises(DatasetError, match=r'img0002.png: size and mode .* differs from img0000.png'):
        ImageFolderDataset(root)


def test_npy_size_claims_are_checked_before_allocation(tmp_path):
    """A 3.4 MB zip whose .npy header claimed (1, 40000, 40000) once drove train.py to 6.5 GB."""
    import io
    import zipfile
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 8, 8), np.uint16))
    raw = buf.getvalue()
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 8, 8), np.uint16))
    header['shape'] = (1, 40000, 40000)
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    out.write(raw[-128:])  # 128 bytes of data for a claim of 3.2 GB.
    path = tmp_path / 'bomb.zip'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('a.npy', out.getvalue())
    with pytest.raises(DatasetError, match=r'a.npy: unreadable image \(its header claims shape \(1, 40000, 40000\)'):
        ImageFolderDataset(str(path))


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_stored_label_map_expands_into_the_named_label_channels(tmp_path, dtype):
    """"seg_storage": "labelmap": the last stored channel (values 0..K) becomes the K one-hot channels that
    dataset.json "channels" names (torch_utils.label_channels), for any K."""
    root = tmp_path / 'd'
    root.mkdir()
    labels = np.array([[0, 1], [2, 0]], dtype)
    np.save(root / 'a.npy', np.stack([np.full((2, 2), 7, dtype), labels]))
    meta = dict(channels=['t2w', 'seg_a', 'seg_b'], seg_storage='labelmap')
    (root / 'dataset.json').write_text(json.dumps(meta))
    img, _ = ImageFolderDataset(str(root))[0]
    vmax = np.iinfo(dtype).max
    assert img.dtype == dtype and img.shape == (3, 2, 2)
    assert (img[0] == 7).all() and np.array_equal(img[1:], np.stack([labels == 1, labels == 2]) * vmax)
    (root / 'dataset.json').write_text(json.dumps(dict(meta, channels=['t2w', 'mask'])))
    with pytest.raises(DatasetError, match='names no label channel'):
        ImageFolderDataset(str(root))
