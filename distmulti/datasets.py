"""Users' own datasets, from a spec string: ``npz:PATH``, ``npy:DIR`` or ``csv:PATH``.

``npz:PATH``
    A NumPy ``.npz`` archive (``np.savez(path, x=x, y=y)``) holding ``x``, float32 images of
    shape (N, C, H, W), and ``y``, integer labels of shape (N, K): one column per head, -1 for
    "no label for this head". Other arrays in the archive are ignored. Pickled (object) arrays
    are refused, never unpickled. **In memory**: every rank loads and checks the whole
    archive at start, so it suits data that fits in memory once per rank.

``npy:DIR``
    ``DIR/x.npy`` and ``DIR/y.npy`` (``np.save``), the same arrays as one file each; the
    inputs are read one sample at a time when drawn (see :mod:`distmulti.npydata`).

``csv:PATH``
    An image folder with a label CSV; each image is read when drawn (see
    :mod:`distmulti.csvdata`).
"""
import os
import zipfile
import zlib
from numbers import Integral, Real
from typing import Any, Optional, Tuple

import numpy as np
from chainer.datasets import SubDataset, TupleDataset

from distmulti.errors import ConfigError, DataError, check_file as _check_file
from distmulti.errors import data_error as _fail

SPEC_FORMS = ('npz:PATH', 'npy:DIR', 'csv:PATH')
_INT32 = np.iinfo(np.int32)
_CHUNK = 4096  # samples per chunk when scanning x for non-finite values


def load_dataset(spec: str, image_size: Optional[Tuple[int, int]] = None) -> Any:
    """Opens a user's dataset from a spec string.

    Args:
        spec: ``'npz:PATH'``, ``'npy:DIR'`` or ``'csv:PATH'`` (``~`` in PATH is expanded).
        image_size: for ``csv:``, (width, height) to resize every image to.

    Returns:
        A dataset of (x, t) pairs, x float32 (C, H, W) and t int32 (K,): a ``TupleDataset``
        in memory for ``npz:``, a lazy ``NpyDataset`` or ``CsvImageDataset`` otherwise.

    Raises:
        DataError: The spec has another form, or the file is missing or not valid
            (collective: every rank checks the same file).
    """
    kind, sep, path = str(spec).partition(':')
    if not sep or kind not in ('npz', 'npy', 'csv') or not path:
        raise DataError(f'dataset spec {spec!r} is not allowed; use one of '
                        f'{", ".join(SPEC_FORMS)}', collective=True)
    path = os.path.expanduser(path)
    if kind == 'npz':
        return load_npz(path)
    if kind == 'npy':
        from distmulti.npydata import NpyDataset
        return NpyDataset(path)
    from distmulti.csvdata import load_csv
    return load_csv(path, image_size)


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
        check_x_header(f'npz file {path}', x_dtype, x_shape)
        check_y_header(f'npz file {path}', y_dtype, y_shape)
        check_sample_counts(f'npz file {path}', x_shape[0], y_shape[0])
        x = _npz_array(npz, path, 'x')
        y = _npz_array(npz, path, 'y')
    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_finite(path, x)
    return TupleDataset(x, labels_to_int32(f'npz file {path}', y))


def load_npz_inputs(path: str) -> np.ndarray:
    """Only the inputs ``x`` (float32, N x C x H x W) of an .npz archive, e.g. for prediction;
    a ``y`` in it is ignored."""
    with _open_npz(path) as npz:
        if 'x' not in npz.files:
            raise _fail(f'npz file {path} has no array x (arrays found: '
                        f'{", ".join(sorted(npz.files)) or "none"}); it needs x (float32, '
                        f'N x C x H x W)')
        dtype, shape = _npz_header(npz, path, 'x')
        check_x_header(f'npz file {path}', dtype, shape)
        x = np.ascontiguousarray(_npz_array(npz, path, 'x'), dtype=np.float32)
    _check_finite(path, x)
    return x


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


def check_x_header(where: str, dtype: np.dtype, shape: Tuple[int, ...]) -> None:
    """Raises DataError unless the header describes float32 (N, C, H, W) inputs."""
    if not (dtype.kind == 'f' and dtype.itemsize == 4):
        raise _fail(f'{where}: x has dtype {dtype} but float32 is required; convert '
                    f'it with x.astype(np.float32) (pixels are usually scaled to [0, 1])')
    if len(shape) != 4:
        hint = '; for grayscale images add a channel axis with x[:, None]' if len(shape) == 3 \
            else ''
        raise _fail(f'{where}: x has shape {shape} but (N, C, H, W) (4 dimensions) is '
                    f'required{hint}')
    if 0 in shape[1:]:
        raise _fail(f'{where}: x has shape {shape} with an empty image dimension; C, '
                    f'H and W must be at least 1')


def check_y_header(where: str, dtype: np.dtype, shape: Tuple[int, ...]) -> None:
    """Raises DataError unless the header describes integer (N, K) labels, K >= 1."""
    if dtype.kind not in 'iu':
        raise _fail(f'{where}: y has dtype {dtype} but an integer dtype is required '
                    f'(int32 preferred); labels are class indices, -1 for no label')
    if len(shape) != 2:
        hint = '; for a single head use y[:, None]' if len(shape) == 1 else ''
        raise _fail(f'{where}: y has shape {shape} but (N, K) (one column per head) '
                    f'is required{hint}')
    if shape[1] == 0:
        raise _fail(f'{where}: y has shape {shape}, i.e. no label columns; give one '
                    f'column per head')


def check_sample_counts(where: str, n_x: int, n_y: int) -> None:
    """Raises DataError unless x and y have the same, non-zero number of samples."""
    if n_x != n_y:
        raise _fail(f'{where}: x has {n_x} samples but y has {n_y}; both need one entry per '
                    f'sample')
    if n_x == 0:
        raise _fail(f'{where} is empty: x and y have 0 samples; at least 1 is needed')


def labels_to_int32(where: str, y: np.ndarray) -> np.ndarray:
    """``y`` as native int32 in memory; DataError when a value does not fit."""
    if y.dtype == np.int32 and y.dtype.isnative:
        return np.ascontiguousarray(y)
    if y.size and (y.min() < _INT32.min or y.max() > _INT32.max):
        raise _fail(f'{where}: y ({y.dtype}) has values from {y.min()} to {y.max()}, '
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
    """The (N, K) label array of a dataset of (x, t) pairs.

    Without reading the images for a ``TupleDataset(x, y)``, a dataset with a ``labels()``
    method (``npy:`` and ``csv:`` datasets, or a user's) and ``SubDataset`` s of those (such
    as the parts made by :func:`split_dataset`); any other dataset is read example by example.

    Args:
        dataset: A dataset of (x, t) pairs.

    Returns:
        The labels, one row per sample, in the dataset's order.
    """
    labels = cheap_labels(dataset)
    if labels is not None:
        return labels
    if len(dataset) == 0:
        return np.zeros((0, 0), dtype=np.int32)
    return np.stack([np.asarray(dataset[i][1]) for i in range(len(dataset))])


def cheap_labels(dataset: Any) -> Optional[np.ndarray]:
    """The (N, K) labels when they can be had without reading any image, else None."""
    if isinstance(dataset, TupleDataset) and len(dataset._datasets) == 2:
        return np.asarray(dataset._datasets[1])  # chainer offers no public accessor
    if callable(getattr(dataset, 'labels', None)):
        return np.asarray(dataset.labels())
    if isinstance(dataset, SubDataset):
        parent = cheap_labels(dataset._dataset)
        if parent is None:
            return None
        index = np.arange(dataset._start, dataset._finish)
        if dataset._order is not None:
            index = np.asarray(dataset._order)[index]
        return parent[index]
    return None


def in_memory(dataset: Any) -> bool:
    """True for a ``TupleDataset`` of plain in-memory arrays (or a ``SubDataset`` of one):
    reading a sample is a copy, and worker processes would only add overhead."""
    while isinstance(dataset, SubDataset):
        dataset = dataset._dataset
    arrays = _tuple_arrays(dataset)
    return arrays is not None and not any(isinstance(a, np.memmap) for a in arrays)


def sample_nbytes(example: Any) -> int:
    """The bytes of one sample's input x."""
    return int(np.asarray(example[0]).nbytes)
