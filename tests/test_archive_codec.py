"""The forms of .npy archive members (docs/data.md, Compression): blosc2 (the default), deflate and stored all read
through training.dataset.read_npy_member, in the training process and in DataLoader workers; a damaged blosc2
member is one line naming archive and member; a blosc2 member's size claims are refused before allocation."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from mri.sources import archive
from training.dataset import DatasetError, ImageFolderDataset, read_npy_member


def _images(n=6, channels=2, side=32):
    """uint16 (C, H, W) arrays with structure (blosc2 compresses them) and a zero border, as slices have."""
    y, x = np.mgrid[:side, :side]
    out = []
    for k in range(n):
        a = np.zeros((channels, side, side), np.uint16)
        a[0, 4:-4, 4:-4] = ((np.sin(x / (3 + k)) * np.cos(y / 5) + 1) * 30000)[4:-4, 4:-4]
        if channels > 1:
            a[1] = (x * y * (k + 1)) % 4
        out.append(a)
    return out


def _zip(path, members, deflated=()):
    """A zip with dataset.json and the given members (name -> bytes); names in `deflated` as deflated members."""
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('dataset.json', json.dumps({'labels': [[name, 0] for name in sorted(members)]}))
        for name, data in sorted(members.items()):
            z.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED)
    return str(path)


def _blosc2_archive(tmp_path, images, name='b2.zip'):
    return _zip(tmp_path / name, {f'img{i:02d}.npy': archive.npy_entry(a, 'blosc2')[0] for i, a in enumerate(images)})


def test_every_form_reads_to_the_same_arrays(tmp_path):
    """A blosc2 member is the plain .npy header plus a chunk (smaller than the pixels); archives written before
    (stored np.save files, deflated zip members) still load, to the same arrays, as does a folder of blosc2 files."""
    images = _images()
    b2 = archive.npy_entry(images[0], 'blosc2')[0]
    assert b2.startswith(b'\x93NUMPY') and len(b2) < images[0].nbytes
    plain = {}
    for i, a in enumerate(images):
        buf = io.BytesIO()
        np.save(buf, a)
        plain[f'img{i:02d}.npy'] = buf.getvalue()
    paths = {'stored': _zip(tmp_path / 'stored.zip', plain),
             'deflate': _zip(tmp_path / 'deflate.zip', plain, deflated=set(plain)),
             'blosc2': _blosc2_archive(tmp_path, images)}
    folder = tmp_path / 'folder'
    folder.mkdir()
    for i, a in enumerate(images):
        (folder / f'img{i:02d}.npy').write_bytes(archive.npy_entry(a, 'blosc2')[0])
    paths['blosc2 folder'] = str(folder)
    for form, path in paths.items():
        ds = ImageFolderDataset(path)
        assert ds.image_shape == [2, 32, 32], form
        got = [ds[i][0] for i in range(len(ds))]
        assert all(np.array_equal(g, a) and g.dtype == np.uint16 for g, a in zip(got, images)), form
        assert got[0].flags.writeable, form


def test_writer_falls_back_to_plain_where_the_forms_would_be_ambiguous(monkeypatch):
    """The reader tells the forms apart by the member's length: a chunk exactly as long as the pixels is never
    written (the member is stored plain instead), and a plain member whose pixels happen to start like a blosc2
    chunk still reads as plain."""
    import blosc2
    a = _images(1)[0]
    monkeypatch.setattr(blosc2, 'compress2', lambda array, **kw: bytes(array.nbytes))
    data = archive.blosc2_npy(a)
    assert data == archive.encode_npy(a)
    assert np.array_equal(read_npy_member(io.BytesIO(data), len(data)), a)


def test_blosc2_archive_read_by_dataloader_workers(tmp_path):
    """The default DataLoader workers (forked after the training process decoded a member) read blosc2 members:
    every item arrives, identical to the archive's arrays."""
    images = _images(8)
    ds = ImageFolderDataset(_blosc2_archive(tmp_path, images))
    assert np.array_equal(ds[0][0], images[0])  # the parent decodes first, as the reals grid does
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    got = torch.cat([x for x, _ in loader]).numpy()
    assert got.shape == (8, 2, 32, 32) and all(np.array_equal(got[i], images[i]) for i in range(8))


def _damage(path, member, offset, data):
    """Overwrites bytes of a stored member at `offset` in its data (the zip's CRC no longer matches)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), 'little'), int.from_bytes(f.read(2), 'little')
        f.seek(info.header_offset + 30 + name_len + extra_len + offset)
        f.write(data)


def _one_line(err, path, member):
    text = str(err.value)
    assert '\n' not in text and f'{path}/{member}: unreadable image' in text, text
    return text


def test_a_damaged_blosc2_member_is_one_line(tmp_path):
    """Bytes damaged inside a blosc2 member's chunk: the zip's CRC-32 refuses them (blosc2 chunks carry no
    checksum); a chunk damaged before it was zipped (CRC intact) passes the header checks and fails blosc2's decoding. Either way one line names
    archive and member, in the training process and across a DataLoader worker."""
    images = _images(6)
    path = _blosc2_archive(tmp_path, images)
    member = 'img03.npy'
    header = len(archive.encode_npy(images[3])) - images[3].nbytes
    _damage(path, member, header + 200, b'\x00' * 8)
    with pytest.raises(DatasetError) as err:  # met by the header checks already where zipfile reads ahead to the end
        ImageFolderDataset(path)[3]
    assert 'CRC' in _one_line(err, path, member)

    data = bytearray(archive.npy_entry(images[3], 'blosc2')[0])
    data[header + 32:header + 36] = b'\xff\xff\xff\x7f'  # the first block's offset, far beyond the chunk
    members = {f'img{i:02d}.npy': archive.npy_entry(a, 'blosc2')[0] for i, a in enumerate(images)}
    members[member] = bytes(data)
    path = _zip(tmp_path / 'crc-intact.zip', members)
    with pytest.raises(DatasetError) as err:
        ImageFolderDataset(path)[3]
    assert 'damaged blosc2 data' in _one_line(err, path, member)
    loader = torch.utils.data.DataLoader(ImageFolderDataset(path), batch_size=2, num_workers=2)
    with pytest.raises(DatasetError) as err:
        for _ in loader:
            pass
    assert 'damaged blosc2 data' in _one_line(err, path, member)


def _forged(shape, chunk_nbytes, chunk):
    """A blosc2 member whose .npy header claims `shape` (uint16) and whose chunk claims `chunk_nbytes`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {'descr': '<u2', 'fortran_order': False, 'shape': shape})
    chunk = bytearray(chunk)
    chunk[4:8] = int(chunk_nbytes).to_bytes(4, 'little')
    return header.getvalue() + bytes(chunk)


@pytest.mark.parametrize('shape,problem', [
    ((1, 8000, 8000), 'more than 1000x; refused'),         # header and chunk agree on 128 MB from 32 bytes
    ((1, 40000, 40000), 'truncated, or a damaged blosc2'),  # 3.2 GB: beyond what a chunk can hold
])
def test_blosc2_size_claims_are_refused_before_allocation(tmp_path, monkeypatch, shape, problem):
    """A 32-byte all-zero blosc2 chunk (blosc2 encodes zeros so) under a header claiming a huge array: refused
    before the claim is allocated, in one line naming archive and member."""
    import blosc2
    zeros = blosc2.compress2(np.zeros(64, np.uint16), typesize=2)
    assert len(zeros) == 32
    ok = archive.npy_entry(_images(1, channels=1)[0], 'blosc2')[0]
    path = _zip(tmp_path / 'claim.zip', {'a.npy': _forged(shape, 2 * np.prod(shape) % 2 ** 31, zeros), 'b.npy': ok})
    allocated = []
    real_zeros, real_empty = np.zeros, np.empty
    monkeypatch.setattr(np, 'zeros', lambda s, *a, **k: allocated.append(s) or real_zeros(s, *a, **k))
    monkeypatch.setattr(np, 'empty', lambda s, *a, **k: allocated.append(s) or real_empty(s, *a, **k))
    with zipfile.ZipFile(path) as z, z.open('a.npy') as f:
        with pytest.raises(ValueError, match=problem):
            read_npy_member(f, z.getinfo('a.npy').file_size)
    assert not any(np.prod(s) > 1e6 for s in allocated), allocated
    with pytest.raises(DatasetError) as err:  # the archive's first image: one line naming archive and member
        ImageFolderDataset(path)
    assert problem.split(';')[0] in _one_line(err, path, 'a.npy')


def test_dataset_tool_codec_option(tmp_path):
    """--codec picks the .npy form and dataset.json records it; --compress-level sets deflate's level."""
    from tests.test_dataset_tool import ok, write_case
    write_case(tmp_path / 'src' / 'C-0', 'C-0')
    arrays = {}
    for codec, level, record in (('blosc2', 0, 'blosc2-shuffle-lz4hc5'), ('deflate', 0, 'deflate-1'),
                                 ('deflate', 6, 'deflate-6'), ('stored', 3, 'stored')):
        dest = tmp_path / f'{codec}{level}.zip'
        args = ['--codec', codec] if codec != 'blosc2' else []  # blosc2 is the default
        ok('--source', tmp_path / 'src', '--dest', dest, '--resolution', 16, '--modalities', 't2w,t2f', '--with-seg',
           '--compress-level', level, *args)
        with zipfile.ZipFile(dest) as z:
            assert json.loads(z.read('dataset.json'))['codec'] == record
            kinds = {i.compress_type for i in z.infolist() if i.filename.endswith('.npy')}
        assert kinds == {zipfile.ZIP_DEFLATED if codec == 'deflate' else zipfile.ZIP_STORED}
        ds = ImageFolderDataset(str(dest))
        arrays[(codec, level)] = [ds[i][0] for i in range(len(ds))]
    first = arrays.pop(('blosc2', 0))
    assert all(all(np.array_equal(a, b) for a, b in zip(first, other)) for other in arrays.values())
