"""Users' own datasets, loaded from a spec string: ``npz:PATH`` or ``csv:PATH``.

``npz:PATH``
    A NumPy ``.npz`` archive (``np.savez(path, x=x, y=y)``) holding ``x``, float32 images of
    shape (N, C, H, W), and ``y``, integer labels of shape (N, K): one column per head, -1 for
    "no label for this head". Other arrays in the archive are ignored. Pickled (object) arrays
    are refused, never unpickled.

``csv:PATH``
    A CSV file with one row per image: the image file name (relative to the CSV's own folder,
    or absolute), then K integer labels (-1 = no label). A first row whose labels are not
    integers is taken as a header. Images (any format Pillow reads) must all have the same
    size; they are converted to grayscale if the first image is grayscale ('L'), else to RGB,
    and scaled to float32 in [0, 1], shape (C, H, W)::

        file,digit,colour
        img/0001.png,3,1
        img/0002.png,7,-1
"""
import csv
import importlib.util
import os
import re
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral, Real
from typing import Any, List, Optional, Tuple

import numpy as np
from chainer.datasets import SubDataset, TupleDataset

from distmulti.errors import ConfigError, DataError

SPEC_FORMS = ('npz:PATH', 'csv:PATH')
MAX_LISTED = 5
_INT_RE = re.compile(r'[+-]?[0-9]+\Z')
_INT32 = np.iinfo(np.int32)
_CHUNK = 4096  # samples per chunk when scanning x for non-finite values


def load_dataset(spec: str) -> TupleDataset:
    """Loads a user's dataset from a spec string.

    Args:
        spec: ``'npz:PATH'`` or ``'csv:PATH'`` (``~`` in PATH is expanded).

    Returns:
        A ``TupleDataset(x, y)`` with x float32 (N, C, H, W) and y int32 (N, K).

    Raises:
        DataError: The spec has another form, or the file is missing or not valid
            (collective: every rank checks the same file).
    """
    kind, sep, path = str(spec).partition(':')
    loaders = {'npz': load_npz, 'csv': load_csv}
    if not sep or kind not in loaders or not path:
        raise DataError(f'dataset spec {spec!r} is not allowed; use one of '
                        f'{", ".join(SPEC_FORMS)}', collective=True)
    return loaders[kind](os.path.expanduser(path))


def _fail(message: str) -> DataError:
    return DataError(message, collective=True)


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise _fail(f'{what} {path} does not exist')
    if not os.path.isfile(path):
        raise _fail(f'{what} {path} is not a file')


# --------------------------------------------------------------------------------------- npz

def _open_npz(path: str):
    """The archive at ``path``, opened without pickles; DataError when it is not one."""
    _check_file(path, 'npz file')
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as e:
        if 'pickled' in str(e):  # neither a zip nor a .npy file: np.load would unpickle it
            raise _fail(f'npz file {path} is not an .npz archive (not a zip file; pickles are '
                        f'never loaded); save the arrays with np.savez(path, x=x, y=y)') from None
        raise _fail(f'npz file {path} is not a readable .npz archive ({e})') from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise _fail(f'npz file {path} is not a readable .npz archive ({e})') from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _fail(f'npz file {path} holds a single .npy array, not an .npz archive; save '
                    f'it with np.savez(path, x=x, y=y)')
    return npz


def load_npz(path: str) -> TupleDataset:
    """Loads ``x`` (float32, N x C x H x W) and ``y`` (integers, N x K) from an .npz archive.

    Args:
        path: The .npz file.

    Returns:
        ``TupleDataset(x, y)`` with y cast to int32.

    Raises:
        DataError: The file is missing, unreadable, or its arrays have the wrong dtype or
            shape, different lengths, no samples, or non-finite pixels.
    """
    with _open_npz(path) as npz:
        found = sorted(npz.files)
        missing = [name for name in ('x', 'y') if name not in found]
        if missing:
            listed = ', '.join(found) if found else 'none'
            raise _fail(f'npz file {path} has no array{"s" if len(missing) > 1 else ""} '
                        f'{" and ".join(missing)} (arrays found: {listed}); it needs x '
                        f'(float32, N x C x H x W) and y (integers, N x K)')
        x_dtype, x_shape = _npz_header(npz, path, 'x')
        y_dtype, y_shape = _npz_header(npz, path, 'y')
        _check_x_header(path, x_dtype, x_shape)
        _check_y_header(path, y_dtype, y_shape)
        if x_shape[0] != y_shape[0]:
            raise _fail(f'npz file {path}: x has {x_shape[0]} samples but y has {y_shape[0]}; '
                        f'both need one entry per sample')
        if x_shape[0] == 0:
            raise _fail(f'npz file {path} is empty: x and y have 0 samples; at least 1 is '
                        f'needed')
        x = _npz_array(npz, path, 'x')
        y = _npz_array(npz, path, 'y')
    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_finite(path, x)
    return TupleDataset(x, _labels_to_int32(path, y))


def load_npz_inputs(path: str) -> np.ndarray:
    """Only the inputs ``x`` (float32, N x C x H x W) of an .npz archive, e.g. for prediction;
    a ``y`` in it is ignored."""
    with _open_npz(path) as npz:
        if 'x' not in npz.files:
            raise _fail(f'npz file {path} has no array x (arrays found: '
                        f'{", ".join(sorted(npz.files)) or "none"}); it needs x (float32, '
                        f'N x C x H x W)')
        dtype, shape = _npz_header(npz, path, 'x')
        _check_x_header(path, dtype, shape)
        x = np.ascontiguousarray(_npz_array(npz, path, 'x'), dtype=np.float32)
    _check_finite(path, x)
    return x


def open_image(path: str, mode: str) -> np.ndarray:
    """One image file as float32 (C, H, W) in [0, 1], converted to ``mode`` ('L' or 'RGB')."""
    _check_file(path, 'image file')
    try:
        pixels = _open_image(path, mode)
    except Exception as e:  # Pillow raises many types for unreadable files
        raise _fail(f'image file {path} cannot be read as an image ({type(e).__name__}: '
                    f'{e})') from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels.astype(np.float32) / 255.0


def _npz_header(npz: Any, path: str, name: str) -> Tuple[np.dtype, Tuple[int, ...]]:
    """Reads an array's dtype and shape from its .npy header, without loading (or unpickling)."""
    member = name + '.npy' if name + '.npy' in npz.zip.namelist() else name
    try:
        with npz.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _fail(f'npz file {path}: array {name} is not readable ({e})') from None
    if dtype.hasobject:
        raise _fail(f'npz file {path}: array {name} is an object (pickled) array, which is '
                    f'never loaded; store {name} as a plain numeric array')
    return dtype, tuple(shape)


def _npz_array(npz: Any, path: str, name: str) -> np.ndarray:
    try:
        return npz[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _fail(f'npz file {path}: array {name} is not readable ({e})') from None


def _check_x_header(path: str, dtype: np.dtype, shape: Tuple[int, ...]) -> None:
    if not (dtype.kind == 'f' and dtype.itemsize == 4):
        raise _fail(f'npz file {path}: x has dtype {dtype} but float32 is required; convert '
                    f'it with x.astype(np.float32) (pixels are usually scaled to [0, 1])')
    if len(shape) != 4:
        hint = '; for grayscale images add a channel axis with x[:, None]' if len(shape) == 3 \
            else ''
        raise _fail(f'npz file {path}: x has shape {shape} but (N, C, H, W) (4 dimensions) is '
                    f'required{hint}')
    if 0 in shape[1:]:
        raise _fail(f'npz file {path}: x has shape {shape} with an empty image dimension; C, '
                    f'H and W must be at least 1')


def _check_y_header(path: str, dtype: np.dtype, shape: Tuple[int, ...]) -> None:
    if dtype.kind not in 'iu':
        raise _fail(f'npz file {path}: y has dtype {dtype} but an integer dtype is required '
                    f'(int32 preferred); labels are class indices, -1 for no label')
    if len(shape) != 2:
        hint = '; for a single head use y[:, None]' if len(shape) == 1 else ''
        raise _fail(f'npz file {path}: y has shape {shape} but (N, K) (one column per head) '
                    f'is required{hint}')
    if shape[1] == 0:
        raise _fail(f'npz file {path}: y has shape {shape}, i.e. no label columns; give one '
                    f'column per head')


def _labels_to_int32(path: str, y: np.ndarray) -> np.ndarray:
    if y.dtype == np.int32 and y.dtype.isnative:
        return np.ascontiguousarray(y)
    if y.size and (y.min() < _INT32.min or y.max() > _INT32.max):
        raise _fail(f'npz file {path}: y ({y.dtype}) has values from {y.min()} to {y.max()}, '
                    f'which do not fit int32 ({_INT32.min} to {_INT32.max})')
    return np.ascontiguousarray(y, dtype=np.int32)


def _check_finite(path: str, x: np.ndarray) -> None:
    first, n_bad = -1, 0
    for start in range(0, len(x), _CHUNK):  # in chunks, to keep the temporary mask small
        chunk = x[start:start + _CHUNK]
        bad = np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1))
        if len(bad) and first < 0:
            first = start + int(bad[0])
        n_bad += len(bad)
    if n_bad:
        raise _fail(f'npz file {path}: x[{first}] (sample {first}, counting from 0) holds NaN '
                    f'or infinite values ({n_bad} sample{"s" if n_bad != 1 else ""} in all); '
                    f'every pixel must be finite')


# --------------------------------------------------------------------------------------- csv

def load_csv(path: str) -> TupleDataset:
    """Loads the images named in a CSV file, with one integer label per head.

    Args:
        path: The CSV file: ``file name, label_0, ..., label_K-1`` per row, optional header.

    Returns:
        ``TupleDataset(x, y)``: x float32 (N, C, H, W) in [0, 1], y int32 (N, K).

    Raises:
        DataError: The CSV is missing, empty or malformed, or an image is missing, unreadable
            or of another size than the first one; the message names the CSV row (1-based).
    """
    _check_file(path, 'CSV file')
    if importlib.util.find_spec('PIL') is None:
        raise RuntimeError('Pillow is not installed; csv: datasets need it to read images '
                           '(pip install Pillow)')
    rows = _read_csv_rows(path)
    files, labels, row_numbers = _parse_rows(path, rows)
    folder = os.path.dirname(os.path.abspath(path))
    full = [name if os.path.isabs(name) else os.path.join(folder, name) for name in files]
    missing = [i for i, p in enumerate(full) if not os.path.isfile(p)]
    if missing:
        listed = ', '.join(f'{files[i]} (row {row_numbers[i]})' for i in missing[:MAX_LISTED])
        more = f' and {len(missing) - MAX_LISTED} more' if len(missing) > MAX_LISTED else ''
        raise _fail(f'CSV file {path}: {len(missing)} image file'
                    f'{"s" if len(missing) != 1 else ""} not found: {listed}{more}; names '
                    f'are relative to the CSV file\'s folder {folder} unless absolute')
    x = _read_images(path, files, full, row_numbers)
    return TupleDataset(x, np.array(labels, dtype=np.int32).reshape(len(files), -1))


def _read_csv_rows(path: str) -> List[Tuple[int, List[str]]]:
    """The non-blank rows of a CSV file with their 1-based row numbers."""
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            return [(number, [field.strip() for field in row])
                    for number, row in enumerate(csv.reader(f), start=1)
                    if any(field.strip() for field in row)]
    except UnicodeDecodeError as e:
        raise _fail(f'CSV file {path} is not UTF-8 text (byte {e.start}); give a text CSV of '
                    f'image file names and integer labels') from None
    except csv.Error as e:
        raise _fail(f'CSV file {path} is not a readable CSV ({e})') from None
    except OSError as e:
        raise _fail(f'CSV file {path} cannot be read ({e.strerror or e})') from None


def _parse_rows(path: str, rows: List[Tuple[int, List[str]]]
                ) -> Tuple[List[str], List[int], List[int]]:
    """Splits CSV rows into file names, flat labels and row numbers; skips a header row."""
    if not rows:
        raise _fail(f'CSV file {path} is empty; it needs one row per image: file name, then '
                    f'one integer label per head')
    header: Optional[int] = None
    if not all(_INT_RE.match(field) for field in rows[0][1][1:]):
        header, rows = rows[0][0], rows[1:]
    if not rows:
        raise _fail(f'CSV file {path} has only a header row (row {header}) and no images; it '
                    f'needs one row per image: file name, then one integer label per head')
    first_number, first = rows[0]
    k = len(first) - 1
    if k == 0:
        raise _fail(f'CSV file {path}, row {first_number}: {first[0]!r} has no labels; each '
                    f'row needs an image file name, then one integer label per head')
    files: List[str] = []
    labels: List[int] = []
    numbers: List[int] = []
    for number, row in rows:
        if len(row) - 1 != k:
            raise _fail(f'CSV file {path}, row {number}: {len(row) - 1} label'
                        f'{"s" if len(row) != 2 else ""} but row {first_number} (the first '
                        f'image row) has {k}; every row needs a file name and {k} label'
                        f'{"s" if k != 1 else ""}')
        if not row[0]:
            raise _fail(f'CSV file {path}, row {number}: the image file name (column 1) is '
                        f'empty')
        for column, field in enumerate(row[1:], start=2):
            value = int(field) if _INT_RE.match(field) else None
            if value is None or not -1 <= value <= _INT32.max:
                raise _fail(f'CSV file {path}, row {number}: label {field!r} for head'
                            f'{column - 2} (column {column}) is not allowed; labels are '
                            f'integers >= 0, or -1 for no label')
            labels.append(value)
        files.append(row[0])
        numbers.append(number)
    return files, labels, numbers


def _open_image(path: str, mode: Optional[str] = None) -> np.ndarray:
    """An image's pixels as uint8 (H, W) in mode 'L' or (H, W, 3) in 'RGB'.

    Without ``mode``, 'L' if the image is grayscale ('L'), else 'RGB'.
    """
    from PIL import Image
    with Image.open(path) as image:
        target = mode or ('L' if image.mode == 'L' else 'RGB')
        return np.asarray(image if image.mode == target else image.convert(target),
                          dtype=np.uint8)


def _read_images(path: str, files: List[str], full: List[str],
                 row_numbers: List[int]) -> np.ndarray:
    """Reads all images into float32 (N, C, H, W) in [0, 1]; checks that sizes agree."""
    def where(i: int) -> str:
        return f'CSV file {path}, row {row_numbers[i]}: image {files[i]}'

    try:
        first = _open_image(full[0])
    except Exception as e:  # Pillow raises many types for a damaged or unknown file
        raise _fail(f'{where(0)} cannot be read as an image ({type(e).__name__}: {e})') \
            from None
    mode = 'L' if first.ndim == 2 else 'RGB'
    pixels = np.empty((len(files),) + first.shape, dtype=np.uint8)
    pixels[0] = first

    def read(i: int) -> Optional[str]:
        """Reads image ``i`` into ``pixels[i]``; returns what is wrong with it, if anything."""
        try:
            image = _open_image(full[i], mode)
        except Exception as e:  # see above
            return f'cannot be read as an image ({type(e).__name__}: {e})'
        if image.shape != first.shape:
            return (f'is {image.shape[1]}x{image.shape[0]} pixels but the first image '
                    f'{files[0]} (row {row_numbers[0]}) is {first.shape[1]}x{first.shape[0]}; '
                    f'all images must have the same size (width x height)')
        pixels[i] = image
        return None

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # decoding drops the GIL
    try:
        for i, error in enumerate(pool.map(read, range(1, len(files))), start=1):
            if error is not None:
                raise _fail(f'{where(i)} {error}')
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if pixels.ndim == 3:
        pixels = pixels[:, None]
    else:
        pixels = pixels.transpose(0, 3, 1, 2)
    x = np.empty(pixels.shape, dtype=np.float32)
    np.divide(pixels, np.float32(255.0), out=x, casting='unsafe')
    return x


# ------------------------------------------------------------------------------------- split

def split_dataset(dataset: Any, test_fraction: float, seed: int) -> Tuple[Any, Any]:
    """Splits a dataset at random into disjoint train and test parts, reproducibly.

    Each part keeps the original order of its samples. A ``TupleDataset`` of arrays is split
    into two new ``TupleDataset`` s (copies); any other dataset into two ``SubDataset`` s.

    Args:
        dataset: A dataset of (x, t) pairs, e.g. from :func:`load_dataset`.
        test_fraction: The share of samples in the test part, strictly between 0 and 1
            (rounded to the nearest whole number of samples).
        seed: Seed of the random split, an integer in [0, 2**32).

    Returns:
        ``(train, test)``.

    Raises:
        ConfigError: ``test_fraction`` or ``seed`` is not allowed.
        DataError: One of the parts would be empty.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, Real) \
            or not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f'test_fraction {test_fraction!r} is not allowed; use a number '
                          f'strictly between 0 and 1, e.g. 0.2', collective=True)
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2 ** 32:
        raise ConfigError(f'seed {seed!r} is not allowed; use an integer in [0, 2**32)',
                          collective=True)
    n = len(dataset)
    n_test = int(round(n * float(test_fraction)))
    if n_test == 0 or n_test == n:
        raise _fail(f'splitting {n} sample{"s" if n != 1 else ""} with test_fraction '
                    f'{test_fraction} gives {n - n_test} training and {n_test} test samples; '
                    f'both parts must be non-empty (use more data or another test_fraction)')
    order = np.random.RandomState(int(seed)).permutation(n)
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    arrays = _tuple_arrays(dataset)
    if arrays is not None:
        return (TupleDataset(*(a[train_idx] for a in arrays)),
                TupleDataset(*(a[test_idx] for a in arrays)))
    sorted_order = np.concatenate([train_idx, test_idx])
    return (SubDataset(dataset, 0, n - n_test, sorted_order),
            SubDataset(dataset, n - n_test, n, sorted_order))


def _tuple_arrays(dataset: Any) -> Optional[Tuple[np.ndarray, ...]]:
    """The arrays of a ``TupleDataset`` made of NumPy arrays, else None."""
    if isinstance(dataset, TupleDataset):
        arrays = dataset._datasets  # chainer offers no public accessor
        if all(isinstance(a, np.ndarray) for a in arrays):
            return tuple(arrays)
    return None


def labels_array(dataset: Any) -> np.ndarray:
    """The (N, K) label array of a dataset of (x, t) pairs, without reading the images.

    Fast for a ``TupleDataset(x, y)`` and for ``SubDataset`` s of one (such as the parts
    made by :func:`split_dataset`); any other dataset is read example by example.

    Args:
        dataset: A dataset of (x, t) pairs.

    Returns:
        The labels, one row per sample, in the dataset's order.
    """
    if isinstance(dataset, TupleDataset) and len(dataset._datasets) == 2:
        return np.asarray(dataset._datasets[1])
    if isinstance(dataset, SubDataset):
        parent = labels_array(dataset._dataset)
        index = np.arange(dataset._start, dataset._finish)
        if dataset._order is not None:
            index = np.asarray(dataset._order)[index]
        return parent[index]
    if len(dataset) == 0:
        return np.zeros((0, 0), dtype=np.int32)
    return np.stack([np.asarray(dataset[i][1]) for i in range(len(dataset))])
