"""Users' own datasets: npz archives, npy folders (read by sample), CSV files of image names
and labels (each image read when drawn), and the split. Real files throughout."""
import os

import numpy as np
import pytest
from chainer.datasets import SubDataset, TupleDataset
from PIL import Image

from distmulti.csvdata import CsvImageDataset
from distmulti.datasets import in_memory, labels_array, load_dataset, split_dataset
from distmulti.errors import ConfigError, DataError
from distmulti.npydata import NpyDataset
from tests.helpers import Payload


def npz_file(tmp_path, name='data.npz', **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def good_arrays(n=6, k=2):
    rng = np.random.RandomState(0)
    return {'x': rng.rand(n, 3, 4, 5).astype(np.float32),
            'y': rng.randint(-1, 10, size=(n, k)).astype(np.int32)}


def data_error(spec, **kw):
    with pytest.raises(DataError) as info:
        load_dataset(spec, **kw)
    assert info.value.collective
    return str(info.value)


def read_error(dataset, i):
    """The message of the DataError that reading sample ``i`` raises."""
    with pytest.raises(DataError) as info:
        dataset[i]
    assert info.value.collective
    return str(info.value)


def arrays(dataset):
    """x and y of every sample, read one by one."""
    return (np.stack([dataset[i][0] for i in range(len(dataset))]),
            np.stack([dataset[i][1] for i in range(len(dataset))]))


def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def write_csv(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(line + '\n' for line in lines))
    return path


def gray_images(tmp_path, n=4, size=(5, 3), folder='img'):
    """Writes ``n`` grayscale PNGs of ``size`` (width, height); returns their names and pixels."""
    rng = np.random.RandomState(1)
    names, pixels = [], []
    for i in range(n):
        p = rng.randint(0, 256, size=(size[1], size[0]), dtype=np.uint8)
        write_png(tmp_path / folder / f'{i}.png', p)
        names.append(f'{folder}/{i}.png')
        pixels.append(p)
    return names, pixels


# ----------------------------------------------------------------------------------- spec

@pytest.mark.parametrize('spec', ['data.npz', 'h5:data.h5', 'npz:', 'csv', ''])
def test_an_unknown_spec_lists_the_allowed_forms(spec):
    message = data_error(spec)
    assert f'dataset spec {spec!r} is not allowed' in message
    assert 'npz:PATH, npy:DIR, csv:PATH' in message


# ------------------------------------------------------------------------------------ npz

def test_a_valid_npz_loads_with_its_shapes_dtypes_and_values(tmp_path):
    arrays = good_arrays()
    dataset = load_dataset(f'npz:{npz_file(tmp_path, **arrays)}')
    assert isinstance(dataset, TupleDataset) and len(dataset) == 6
    x, y = dataset[3]
    assert x.shape == (3, 4, 5) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x, arrays['x'][3])
    np.testing.assert_array_equal(labels_array(dataset), arrays['y'])


def test_npz_extra_arrays_are_ignored_and_a_home_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    npz_file(tmp_path, **good_arrays(), names=np.array([1, 2]))
    assert len(load_dataset('npz:~/data.npz')) == 6


@pytest.mark.parametrize('dtype', [np.int64, np.uint8, np.int16, '>i4'])
def test_npz_integer_labels_are_cast_to_int32_when_they_fit(tmp_path, dtype):
    arrays = good_arrays()
    arrays['y'] = np.abs(arrays['y']).astype(dtype)
    y = labels_array(load_dataset(f'npz:{npz_file(tmp_path, **arrays)}'))
    assert y.dtype == np.int32 and y.dtype.isnative
    np.testing.assert_array_equal(y, arrays['y'])


def test_npz_labels_that_do_not_fit_int32_are_refused(tmp_path):
    arrays = good_arrays()
    arrays['y'] = arrays['y'].astype(np.int64)
    arrays['y'][2, 1] = 2 ** 40
    message = data_error(f'npz:{npz_file(tmp_path, **arrays)}')
    assert 'data.npz: y (int64) has values from' in message
    assert f'to {2 ** 40}, which do not fit int32' in message


def test_a_missing_npz_file_is_named(tmp_path):
    path = tmp_path / 'nothere.npz'
    assert data_error(f'npz:{path}') == f'npz file {path} does not exist'


@pytest.mark.parametrize('content,problem', [
    (b'just some text', 'is not an .npz archive (not a zip file; pickles are never loaded)'),
    (b'PK\x03\x04broken zip', 'is not a readable .npz archive (File is not a zip file)'),
])
def test_a_file_that_is_not_an_npz_is_refused(tmp_path, content, problem):
    path = tmp_path / 'bad.npz'
    path.write_bytes(content)
    assert f'npz file {path} {problem}' in data_error(f'npz:{path}')


def test_a_single_npy_array_is_not_an_npz(tmp_path):
    np.save(tmp_path / 'one.npy', np.zeros(3))
    message = data_error(f'npz:{tmp_path / "one.npy"}')
    assert 'one.npy holds a single .npy array, not an .npz archive' in message


def test_a_corrupted_array_in_the_npz_is_refused(tmp_path):
    path = npz_file(tmp_path, **good_arrays(n=200))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside x's data: the zip's CRC check fails
    path.write_bytes(bytes(data))
    assert 'data.npz: array x is not readable' in data_error(f'npz:{path}')


@pytest.mark.parametrize('keep,message', [
    ({'y'}, 'has no array x (arrays found: extra, y)'),
    ({'x'}, 'has no array y (arrays found: extra, x)'),
    (set(), 'has no arrays x and y (arrays found: extra)'),
])
def test_missing_arrays_are_named_with_the_arrays_found(tmp_path, keep, message):
    arrays = {k: v for k, v in good_arrays().items() if k in keep}
    message_got = data_error(f'npz:{npz_file(tmp_path, extra=np.zeros(2), **arrays)}')
    assert 'data.npz ' + message in message_got


@pytest.mark.parametrize('name,value,message', [
    ('x', np.zeros((6, 3, 4, 5)), 'x has dtype float64 but float32 is required'),
    ('x', np.zeros((6, 3, 4, 5), np.uint8), 'x has dtype uint8 but float32 is required'),
    ('y', np.zeros((6, 2), np.float32),
     'y has dtype float32 but an integer dtype is required (int32 preferred)'),
    ('y', np.zeros((6, 2), bool), 'y has dtype bool but an integer dtype is required'),
    ('x', np.zeros((6, 4, 5), np.float32),
     'x has shape (6, 4, 5) but (N, C, H, W) (4 dimensions) is required; for grayscale '
     'images add a channel axis with x[:, None]'),
    ('x', np.zeros((6, 3, 0, 5), np.float32), 'x has shape (6, 3, 0, 5) with an empty image'),
    ('y', np.zeros(6, np.int32),
     'y has shape (6,) but (N, K) (one column per head) is required; for a single head use '
     'y[:, None]'),
    ('y', np.zeros((6, 0), np.int32), 'y has shape (6, 0), i.e. no label columns'),
    ('y', np.zeros((5, 2), np.int32), 'x has 6 samples but y has 5'),
])
def test_wrong_dtypes_and_shapes_are_refused_without_casting(tmp_path, name, value, message):
    arrays = good_arrays()
    arrays[name] = value
    assert 'data.npz: ' + message in data_error(f'npz:{npz_file(tmp_path, **arrays)}')


def test_an_empty_npz_is_refused(tmp_path):
    path = npz_file(tmp_path, x=np.zeros((0, 1, 2, 2), np.float32), y=np.zeros((0, 3), np.int32))
    assert f'npz file {path} is empty: x and y have 0 samples' in data_error(f'npz:{path}')


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_reported_with_the_first_sample(tmp_path, bad):
    arrays = good_arrays(n=10)
    arrays['x'][4, 1, 2, 3] = bad
    arrays['x'][7, 0, 0, 0] = np.nan
    message = data_error(f'npz:{npz_file(tmp_path, **arrays)}')
    assert 'data.npz: x[4] (sample 4, counting from 0) holds NaN or infinite values ' \
           '(2 samples in all)' in message


@pytest.mark.parametrize('name', ['x', 'y'])
def test_a_pickled_object_array_is_refused_and_never_unpickled(tmp_path, name):
    marker = tmp_path / 'pwned'
    arrays = good_arrays(n=1)
    arrays[name] = np.array([Payload(str(marker))], dtype=object)
    path = npz_file(tmp_path, **arrays)
    message = data_error(f'npz:{path}')
    assert f'data.npz: array {name} is an object (pickled) array, which is never loaded' \
        in message
    assert not marker.exists()
    # The payload is live: loading the same kind of file with pickles allowed runs it.
    live = tmp_path / 'live'
    arrays[name] = np.array([Payload(str(live))], dtype=object)
    np.load(npz_file(tmp_path, 'live.npz', **arrays), allow_pickle=True)[name]
    assert live.exists()


# ------------------------------------------------------------------------------------ npy

def npy_folder(tmp_path, x, y, name='d'):
    folder = tmp_path / name
    folder.mkdir()
    np.save(folder / 'x.npy', x)
    np.save(folder / 'y.npy', y)
    return folder


def test_an_npy_folder_reads_samples_by_row_and_labels_at_once(tmp_path):
    arrays_ = good_arrays(n=7)
    folder = npy_folder(tmp_path, arrays_['x'], arrays_['y'].astype(np.int64))
    dataset = load_dataset(f'npy:{folder}')
    assert isinstance(dataset, NpyDataset) and len(dataset) == 7 and not in_memory(dataset)
    x, y = arrays(dataset)
    np.testing.assert_array_equal(x, arrays_['x'])
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(labels_array(dataset), arrays_['y'])
    np.testing.assert_array_equal(dataset[-1][0], arrays_['x'][-1])
    with pytest.raises(IndexError):
        dataset[7]


def test_a_big_endian_npy_is_read_as_native_float32(tmp_path):
    arrays_ = good_arrays(n=3)
    folder = npy_folder(tmp_path, arrays_['x'].astype('>f4'), arrays_['y'])
    x = load_dataset(f'npy:{folder}')[1][0]
    assert x.dtype == np.float32 and x.dtype.isnative
    np.testing.assert_array_equal(x, arrays_['x'][1])


def test_an_npy_sample_with_nan_is_named_by_file_and_row_when_read(tmp_path):
    arrays_ = good_arrays(n=6)
    arrays_['x'][4, 0, 1, 2] = np.nan
    folder = npy_folder(tmp_path, arrays_['x'], arrays_['y'])
    dataset = load_dataset(f'npy:{folder}')  # the pixels are not scanned at start
    dataset[3]
    assert read_error(dataset, 4) == (f'{folder / "x.npy"}: row 4 (counting from 0) holds '
                                      f'NaN or infinite values; every pixel must be finite')


@pytest.mark.parametrize('change,message', [
    (lambda a: a.update(x=a['x'].astype(np.float64)),
     'x.npy: x has dtype float64 but float32 is required'),
    (lambda a: a.update(x=a['x'][:, 0]), 'x.npy: x has shape (6, 4, 5) but (N, C, H, W)'),
    (lambda a: a.update(y=a['y'].astype(np.float32)),
     'y.npy: y has dtype float32 but an integer dtype is required'),
    (lambda a: a.update(y=a['y'][:, 0]), 'y.npy: y has shape (6,) but (N, K)'),
    (lambda a: a.update(y=a['y'][:5]), 'x has 6 samples but y has 5'),
    (lambda a: a.update(x=np.asfortranarray(a['x'])), 'x.npy is stored in Fortran order'),
    (lambda a: a.update(x=a['x'][:0], y=a['y'][:0]), 'is empty: x and y have 0 samples'),
    (lambda a: a.update(y=np.array([[Payload('m')]] * 6, dtype=object)),
     'y.npy is an object (pickled) array, which is never loaded'),
])
def test_wrong_npy_arrays_are_refused_at_start(tmp_path, change, message):
    arrays_ = good_arrays()
    change(arrays_)
    folder = tmp_path / 'd'
    folder.mkdir()
    for name, value in arrays_.items():
        np.save(folder / f'{name}.npy', value, allow_pickle=True)
    assert message in data_error(f'npy:{folder}')


def test_missing_or_truncated_npy_files_are_refused(tmp_path):
    assert data_error(f'npy:{tmp_path / "none"}').startswith(
        f'npy folder {tmp_path / "none"} does not exist')
    arrays_ = good_arrays()
    folder = npy_folder(tmp_path, arrays_['x'], arrays_['y'])
    os.unlink(folder / 'y.npy')
    assert data_error(f'npy:{folder}').startswith(f'npy folder {folder} has no y.npy')
    np.save(folder / 'y.npy', arrays_['y'])
    with open(folder / 'x.npy', 'r+b') as f:
        f.truncate(os.path.getsize(folder / 'x.npy') - 10)
    assert 'x.npy is truncated' in data_error(f'npy:{folder}')


def test_npy_labels_that_do_not_fit_int32_are_refused(tmp_path):
    arrays_ = good_arrays()
    y = arrays_['y'].astype(np.int64)
    y[1, 1] = 2 ** 40
    folder = npy_folder(tmp_path, arrays_['x'], y)
    assert 'y.npy: y (int64) has values from' in data_error(f'npy:{folder}')


# ------------------------------------------------------------------------------------ csv

def test_a_grayscale_image_folder_loads_with_the_pixels_written(tmp_path):
    names, pixels = gray_images(tmp_path)
    path = write_csv(tmp_path / 'labels.csv',
                     [f'{n},{i},{-1 if i % 2 else 3}' for i, n in enumerate(names)])
    dataset = load_dataset(f'csv:{path}')
    assert isinstance(dataset, CsvImageDataset) and not in_memory(dataset)
    x, y = arrays(dataset)
    np.testing.assert_array_equal(labels_array(dataset), y)
    assert x.shape == (4, 1, 3, 5) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 0], np.stack(pixels).astype(np.float32) / 255)
    np.testing.assert_array_equal(y, [[0, 3], [1, -1], [2, 3], [3, -1]])
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_rgb_images_load_channels_first_and_later_images_follow_the_first_mode(tmp_path):
    rng = np.random.RandomState(2)
    rgb = rng.randint(0, 256, size=(3, 4, 3), dtype=np.uint8)  # height 3, width 4
    write_png(tmp_path / 'a.png', rgb)
    gray = rng.randint(0, 256, size=(3, 4), dtype=np.uint8)
    write_png(tmp_path / 'b.png', gray)
    x = arrays(load_dataset(f'csv:{write_csv(tmp_path / "l.csv", ["a.png,1", "b.png,2"])}'))[0]
    assert x.shape == (2, 3, 3, 4)
    np.testing.assert_array_equal(x[0], rgb.transpose(2, 0, 1).astype(np.float32) / 255)
    np.testing.assert_array_equal(x[1], np.stack([gray] * 3).astype(np.float32) / 255)
    # The first image grayscale: an RGB image after it is converted to grayscale.
    x = arrays(load_dataset(f'csv:{write_csv(tmp_path / "g.csv", ["b.png,2", "a.png,1"])}'))[0]
    assert x.shape == (2, 1, 3, 4)
    expected = np.asarray(Image.fromarray(rgb).convert('L'), dtype=np.float32) / 255
    np.testing.assert_array_equal(x[1, 0], expected)


def test_a_header_row_is_detected_and_skipped(tmp_path):
    names, _ = gray_images(tmp_path, n=2)
    with_header = write_csv(tmp_path / 'h.csv', ['file,digit,colour', f'{names[0]},1,2',
                                                 f'{names[1]},3,4'])
    without = write_csv(tmp_path / 'n.csv', [f'{names[0]},1,2', f'{names[1]},3,4'])
    for path in (with_header, without):
        y = labels_array(load_dataset(f'csv:{path}'))
        np.testing.assert_array_equal(y, [[1, 2], [3, 4]])


def test_image_names_are_relative_to_the_csv_folder_or_absolute(tmp_path, monkeypatch):
    names, pixels = gray_images(tmp_path / 'data', n=2)
    absolute = str(tmp_path / 'data' / names[1])
    path = write_csv(tmp_path / 'data' / 'labels.csv', [f'{names[0]},0', f'{absolute},1'])
    monkeypatch.chdir(tmp_path)  # the CSV's own folder counts, not the working directory
    dataset = load_dataset('csv:data/labels.csv')
    monkeypatch.chdir(tmp_path / 'data' / 'img')  # and still when the images are read
    x = arrays(dataset)[0]
    np.testing.assert_array_equal(x[:, 0], np.stack(pixels).astype(np.float32) / 255)
    assert os.path.isabs(absolute) and path.exists()


def test_blank_lines_are_skipped_and_rows_keep_their_spreadsheet_numbers(tmp_path):
    names, _ = gray_images(tmp_path, n=2)
    path = write_csv(tmp_path / 'l.csv', ['file,a', '', f'{names[0]},1', '', f'{names[1]},x'])
    message = data_error(f'csv:{path}')
    assert f'CSV file {path}, row 5: label \'x\' for head0 (column 2) is not allowed' in message


def test_a_missing_csv_file_is_named(tmp_path):
    path = tmp_path / 'labels.csv'
    assert data_error(f'csv:{path}') == f'CSV file {path} does not exist'


def test_only_the_first_image_is_read_at_start_and_a_missing_one_is_named_when_drawn(
        tmp_path):
    names, _ = gray_images(tmp_path, n=2)
    lines = ['file,a', f'{names[0]},0', 'gone0.png,0', f'{names[1]},1', 'img/lost.png,1']
    path = write_csv(tmp_path / 'labels.csv', lines)
    dataset = load_dataset(f'csv:{path}')  # opens only img/0.png: the missing ones pass
    assert len(dataset) == 4
    np.testing.assert_array_equal(labels_array(dataset), [[0], [0], [1], [1]])
    assert dataset[2][0].shape == (1, 3, 5)
    assert read_error(dataset, 1) == (
        f'CSV file {path}, row 3: image gone0.png does not exist (names are relative to the '
        f'CSV file\'s folder {tmp_path} unless absolute)')
    assert read_error(dataset, 3).startswith(f'CSV file {path}, row 5: image img/lost.png does '
                                             f'not exist')


def test_a_missing_first_image_is_an_error_at_start(tmp_path):
    path = write_csv(tmp_path / 'labels.csv', ['img/lost.png,1'])
    assert data_error(f'csv:{path}').startswith(
        f'CSV file {path}, row 1: image img/lost.png does not exist')


@pytest.mark.parametrize('bad_row', [1, 3])
def test_an_unreadable_image_is_named_with_its_row(tmp_path, bad_row):
    names, _ = gray_images(tmp_path, n=3)
    (tmp_path / names[bad_row - 1]).write_text('not a png')
    path = write_csv(tmp_path / 'labels.csv', [f'{n},0' for n in names])
    expected = (f'CSV file {path}, row {bad_row}: image {names[bad_row - 1]} cannot be read as '
                f'an image (UnidentifiedImageError')
    if bad_row == 1:  # the first image is read at start
        assert expected in data_error(f'csv:{path}')
    else:
        assert expected in read_error(load_dataset(f'csv:{path}'), bad_row - 1)


def test_an_image_of_another_size_is_refused_when_drawn(tmp_path):
    names, _ = gray_images(tmp_path, n=3, size=(5, 3))
    write_png(tmp_path / 'big.png', np.zeros((4, 6), np.uint8))
    path = write_csv(tmp_path / 'labels.csv',
                     ['name,a'] + [f'{n},0' for n in names[:2]] + ['big.png,1', f'{names[2]},0'])
    dataset = load_dataset(f'csv:{path}')
    assert dataset[3][0].shape == (1, 3, 5)
    assert read_error(dataset, 2) == (
        f'CSV file {path}, row 4: image big.png is 6x4 pixels but the first image img/0.png '
        f'(row 2) is 5x3; all images must have the same size (width x height), or give '
        f'--image-size WxH to resize them')


def test_with_an_image_size_every_image_is_resized(tmp_path):
    names, _ = gray_images(tmp_path, n=2, size=(5, 3))
    write_png(tmp_path / 'big.png', np.full((8, 10), 200, np.uint8))
    path = write_csv(tmp_path / 'labels.csv', [f'{names[0]},0', 'big.png,1'])
    dataset = load_dataset(f'csv:{path}', image_size=(4, 2))
    x = arrays(dataset)[0]
    assert x.shape == (2, 1, 2, 4)
    np.testing.assert_allclose(x[1], 200 / 255, rtol=1e-6)  # a flat image stays flat


def test_rows_with_another_number_of_labels_are_refused(tmp_path):
    names, _ = gray_images(tmp_path, n=3)
    path = write_csv(tmp_path / 'labels.csv',
                     [f'{names[0]},0,1', f'{names[1]},0,1', f'{names[2]},0,1,2'])
    message = data_error(f'csv:{path}')
    assert (f'CSV file {path}, row 3: 3 labels but row 1 (the first image row) has 2; every '
            f'row needs a file name and 2 labels') in message


@pytest.mark.parametrize('label', ['1.5', 'cat', '', '-2', '99999999999'])
def test_labels_that_are_not_integers_or_minus_one_are_refused(tmp_path, label):
    names, _ = gray_images(tmp_path, n=2)
    path = write_csv(tmp_path / 'labels.csv', [f'{names[0]},0,1', f'{names[1]},2,{label}'])
    message = data_error(f'csv:{path}')
    assert (f'CSV file {path}, row 2: label {label!r} for head1 (column 3) is not allowed; '
            f'labels are integers >= 0, or -1 for no label') in message


@pytest.mark.parametrize('lines,problem', [
    ([], 'is empty'),
    (['', '  '], 'is empty'),
    (['file,a,b'], 'has only a header row (row 1) and no images'),
])
def test_an_empty_csv_is_refused(tmp_path, lines, problem):
    path = write_csv(tmp_path / 'labels.csv', lines)
    assert f'CSV file {path} {problem}' in data_error(f'csv:{path}')


def test_a_row_without_labels_is_refused(tmp_path):
    path = write_csv(tmp_path / 'labels.csv', ['a.png'])
    assert f"CSV file {path}, row 1: 'a.png' has no labels" in data_error(f'csv:{path}')


def test_a_binary_file_is_not_a_csv(tmp_path):
    path = tmp_path / 'labels.csv'
    path.write_bytes(b'\xff\xfe\x00\x81binary')
    assert f'CSV file {path} is not UTF-8 text' in data_error(f'csv:{path}')


# ---------------------------------------------------------------------------------- split

def test_the_split_is_disjoint_complete_seeded_and_reproducible():
    n = 50
    dataset = TupleDataset(np.arange(n, dtype=np.float32)[:, None],
                           np.arange(n, dtype=np.int32)[:, None])
    train, test = split_dataset(dataset, 0.2, seed=3)
    ids_train, ids_test = labels_array(train)[:, 0], labels_array(test)[:, 0]
    assert len(ids_test) == 10 and len(ids_train) == 40
    assert not set(ids_train) & set(ids_test)
    assert sorted(set(ids_train) | set(ids_test)) == list(range(n))
    assert list(ids_train) == sorted(ids_train)  # each part keeps the original order
    for i in range(len(train)):
        assert train[i][0][0] == train[i][1][0]  # images stay with their labels
    again_train, again_test = split_dataset(dataset, 0.2, seed=3)
    np.testing.assert_array_equal(labels_array(again_test), labels_array(test))
    _, other = split_dataset(dataset, 0.2, seed=4)
    assert not np.array_equal(labels_array(other), labels_array(test))


def test_a_dataset_that_is_not_a_tuple_of_arrays_splits_into_subdatasets():
    dataset = [(np.float32(i), np.array([i, -1], np.int32)) for i in range(10)]
    train, test = split_dataset(dataset, 0.3, seed=0)
    assert isinstance(train, SubDataset) and len(train) == 7 and len(test) == 3
    expected = np.array([test[i][1] for i in range(3)])
    np.testing.assert_array_equal(labels_array(test), expected)
    assert set(labels_array(train)[:, 0]) | set(expected[:, 0]) == set(range(10))


@pytest.mark.parametrize('fraction', [0, 1, -0.1, 1.5, float('nan'), '0.2', True, None])
def test_a_test_fraction_outside_zero_to_one_is_a_config_error(fraction):
    dataset = TupleDataset(np.zeros((10, 1), np.float32), np.zeros((10, 1), np.int32))
    with pytest.raises(ConfigError) as info:
        split_dataset(dataset, fraction, seed=0)
    assert str(info.value) == (f'test_fraction {fraction!r} is not allowed; use a number '
                               f'strictly between 0 and 1, e.g. 0.2')


@pytest.mark.parametrize('seed', [-1, 2 ** 32, 1.5, '3'])
def test_a_bad_seed_is_a_config_error(seed):
    dataset = TupleDataset(np.zeros((10, 1), np.float32), np.zeros((10, 1), np.int32))
    with pytest.raises(ConfigError, match=f'seed {seed!r} is not allowed'):
        split_dataset(dataset, 0.5, seed=seed)


@pytest.mark.parametrize('n,fraction,sizes', [(3, 0.1, '3 training and 0 test'),
                                              (3, 0.9, '0 training and 3 test'),
                                              (1, 0.5, '1 training and 0 test')])
def test_a_split_with_an_empty_part_names_the_sizes(n, fraction, sizes):
    dataset = TupleDataset(np.zeros((n, 1), np.float32), np.zeros((n, 1), np.int32))
    with pytest.raises(DataError) as info:
        split_dataset(dataset, fraction, seed=0)
    assert f'with test_fraction {fraction} gives {sizes} samples; both parts must be ' \
           f'non-empty' in str(info.value)


def test_labels_array_of_a_tuple_dataset_is_its_label_array_itself():
    y = np.arange(6, dtype=np.int32).reshape(3, 2)
    assert labels_array(TupleDataset(np.zeros((3, 1), np.float32), y)) is y
