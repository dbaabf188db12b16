"""``npy:DIR``: data already preprocessed into two arrays, read one sample at a time.

``DIR/x.npy`` holds float32 inputs (N, C, H, W) in C order, ``DIR/y.npy`` integer labels
(N, K), both written with ``np.save``. Opening the folder reads the two headers and the
labels (checked at once: they are small); the inputs are never loaded whole: each sample is
one positioned read of its bytes when it is drawn, so resident memory does not grow with the
file (as it would through a memory map, whose touched pages count as the process's own), and
forked loader workers share the open file. A sample with NaN or infinite values is an error
naming the file and the row when it is read.
"""
import os
from typing import Any, Tuple

import numpy as np
import chainer

from distmulti.errors import data_error as _fail

X_FILE, Y_FILE = 'x.npy', 'y.npy'


def read_npy_header(path: str) -> Tuple[np.dtype, Tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of an .npy file, without reading its data."""
    try:
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                shape, fortran, dtype = np.lib.format._read_array_header(f, version)
            return dtype, tuple(shape), bool(fortran), f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise _fail(f'{path} is not a readable .npy file ({e}); write it with '
                    f'np.save(path, array)') from None


class NpyDataset(chainer.dataset.DatasetMixin):
    """The samples of ``DIR/x.npy`` with the labels of ``DIR/y.npy``; see the module doc.

    Raises:
        DataError: a file is missing or not an .npy file, or the arrays have the wrong dtype,
            shape, order or lengths, or no samples (collective: every rank opens the same).
    """

    def __init__(self, folder: str):
        from distmulti.datasets import (check_sample_counts, check_x_header, check_y_header,
                                        labels_to_int32)
        self.folder = folder
        if not os.path.isdir(folder):
            what = 'is not a folder' if os.path.exists(folder) else 'does not exist'
            raise _fail(f'npy folder {folder} {what}; it needs {X_FILE} (float32, N x C x H '
                        f'x W) and {Y_FILE} (integers, N x K)')
        self.x_path, self.y_path = os.path.join(folder, X_FILE), os.path.join(folder, Y_FILE)
        for path in (self.x_path, self.y_path):
            if not os.path.isfile(path):
                raise _fail(f'npy folder {folder} has no {os.path.basename(path)}; it needs '
                            f'{X_FILE} (float32, N x C x H x W) and {Y_FILE} (integers, N x K)')
        dtype, shape, fortran, offset = read_npy_header(self.x_path)
        y_dtype, y_shape, _, _ = read_npy_header(self.y_path)
        for path, found in ((self.x_path, dtype), (self.y_path, y_dtype)):
            if found.hasobject:
                raise _fail(f'{path} is an object (pickled) array, which is never loaded; '
                            f'store a plain numeric array')
        check_x_header(self.x_path, dtype, shape)
        check_y_header(self.y_path, y_dtype, y_shape)
        if fortran:
            raise _fail(f'{self.x_path} is stored in Fortran order; save it in C order with '
                        f'np.save(path, np.ascontiguousarray(x))')
        check_sample_counts(f'npy folder {folder}', shape[0], y_shape[0])
        self._dtype, self._shape = dtype, shape[1:]
        self._sample_bytes = int(np.prod(self._shape)) * dtype.itemsize
        self._offset = offset
        expected = offset + shape[0] * self._sample_bytes
        if os.path.getsize(self.x_path) < expected:
            raise _fail(f'{self.x_path} is truncated: {os.path.getsize(self.x_path)} bytes, '
                        f'its header needs {expected}')
        try:
            y = np.load(self.y_path, mmap_mode='r', allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _fail(f'{self.y_path} is not readable ({e})') from None
        self._labels = labels_to_int32(self.y_path, y)
        self._fd = os.open(self.x_path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return self._shape

    def labels(self) -> np.ndarray:
        """The (N, K) int32 labels, in memory."""
        return self._labels

    def get_example(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        n = len(self._labels)
        if not -n <= i < n:
            raise IndexError(f'sample {i} of {n}')
        i %= n
        data = os.pread(self._fd, self._sample_bytes, self._offset + i * self._sample_bytes)
        if len(data) != self._sample_bytes:
            raise _fail(f'{self.x_path}: row {i} cannot be read (the file ends early)')
        x = np.frombuffer(data, dtype=self._dtype).reshape(self._shape)
        if not self._dtype.isnative:
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise _fail(f'{self.x_path}: row {i} (counting from 0) holds NaN or infinite '
                        f'values; every pixel must be finite')
        return x, self._labels[i]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state['_fd']
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.x_path, os.O_RDONLY)

    def __del__(self, _close=os.close) -> None:  # os may be gone at interpreter exit
        fd = getattr(self, '_fd', None)
        if fd is not None:
            try:
                _close(fd)
            except OSError:
                pass


def load_npy_inputs(folder: str) -> Any:
    """``DIR/x.npy`` memory-mapped read-only (for prediction, which reads it batch by batch);
    a ``y.npy`` is not needed."""
    path = os.path.join(folder, X_FILE)
    if not os.path.isfile(path):
        raise _fail(f'npy folder {folder} has no {X_FILE} (float32, N x C x H x W)')
    from distmulti.datasets import check_x_header
    dtype, shape, _, _ = read_npy_header(path)
    if dtype.hasobject:
        raise _fail(f'{path} is an object (pickled) array, which is never loaded')
    check_x_header(path, dtype, shape)
    return np.load(path, mmap_mode='r', allow_pickle=False)
