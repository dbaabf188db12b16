"""Embedded data (multi-digit strips from scikit-learn's bundled digits) and label checks.

Each sample is K real 8x8 handwritten digits side by side (1 x 8 x 8K); its label row holds the
K digits, one column per head. Source images are split once into train and test pools, so no
digit image appears in both splits.
"""
import gzip
import importlib.util
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
from chainer.datasets import TupleDataset

from distmulti.errors import ConfigError, DataError
from distmulti.models import IGNORE_LABEL

DIGIT_SIZE = 8
#: The embedded strips are 8 x 8K pixels: beyond this many heads (digits per strip) they are
#: no longer a sensible task for the built-in network; bring your own data.
EMBEDDED_MAX_HEADS = 64


class DigitStrips(NamedTuple):
    """A split of the embedded data: inputs, labels and the source image of each digit."""

    x: np.ndarray       # float32 (N, 1, 8, 8K), pixels scaled to [0, 1]
    y: np.ndarray       # int32 (N, K)
    source: np.ndarray  # int64 (N, K), index into the 1,797 bundled images

    def dataset(self) -> TupleDataset:
        return TupleDataset(self.x, self.y)


def load_digit_images() -> Tuple[np.ndarray, np.ndarray]:
    """Reads scikit-learn's bundled digits (no download): float32 (1797, 8, 8) in [0, 1], labels."""
    spec = importlib.util.find_spec('sklearn')
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('scikit-learn is not installed; it ships the embedded digits '
                           '(pip install scikit-learn)')
    path = os.path.join(list(spec.submodule_search_locations)[0],
                        'datasets', 'data', 'digits.csv.gz')
    with gzip.open(path, 'rt') as f:
        table = np.loadtxt(f, delimiter=',', dtype=np.float32)
    images = (table[:, :-1] / 16.0).reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.float32)
    return images, table[:, -1].astype(np.int32)


def make_strips(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int, k: int,
                rng: np.random.RandomState) -> DigitStrips:
    """Builds ``n`` strips of ``k`` digits drawn (with replacement) from the image indices ``pool``."""
    source = pool[rng.randint(0, len(pool), size=(n, k))]
    x = images[source]                                   # (n, k, 8, 8)
    x = x.transpose(0, 2, 1, 3).reshape(n, 1, DIGIT_SIZE, DIGIT_SIZE * k)
    return DigitStrips(np.ascontiguousarray(x, dtype=np.float32), labels[source], source)


def digit_strips(k: int, n_train: int, n_test: int, seed: int = 0,
                 test_fraction: float = 0.2) -> Tuple[DigitStrips, DigitStrips]:
    """The embedded train and test splits for ``k`` heads, reproducible from ``seed``."""
    images, labels = load_digit_images()
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(images))
    n_test_images = int(round(len(images) * test_fraction))
    test_pool, train_pool = order[:n_test_images], order[n_test_images:]
    train = make_strips(images, labels, np.sort(train_pool), n_train, k, rng)
    test = make_strips(images, labels, np.sort(test_pool), n_test, k, rng)
    return train, test


def check_embedded_size(heads: int, samples: int) -> None:
    """ConfigError, at once, when the embedded data cannot be made for these sizes: more
    heads than the strips support, or strips that do not fit in this machine's memory."""
    if heads > EMBEDDED_MAX_HEADS:
        raise ConfigError(f'heads {heads} is more than the embedded digit strips support (1 to '
                          f'{EMBEDDED_MAX_HEADS} digits per strip); use --heads '
                          f'{EMBEDDED_MAX_HEADS} or fewer, or your own data (--dataset)',
                          collective=True)
    need = 3 * samples * DIGIT_SIZE * DIGIT_SIZE * heads * 4  # pixels, source and strip copies
    available = available_memory()
    if available is not None and need > available:
        raise ConfigError(f'the embedded data for {heads} heads and {samples} strips needs '
                          f'about {need / 1e9:.1f} GB to build but {available / 1e9:.1f} GB '
                          f'are available; use fewer --train-size/--test-size strips or heads',
                          collective=True)


def available_memory():
    """Bytes of memory available for new work (Linux MemAvailable), or None if unknown."""
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_label_shape(y: np.ndarray, n_heads: int, where: str) -> None:
    """Raises DataError unless ``y`` is an (N, n_heads) integer array."""
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[1] != n_heads:
        cols = y.shape[1] if y.ndim == 2 else f'shape {y.shape} instead of (N, K), i.e. no'
        raise DataError(f'{where}: the labels have {cols} columns but the model has {n_heads} '
                        f'head{"s" if n_heads != 1 else ""}; give one label column per head',
                        collective=True)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f'{where}: labels must be integers, got dtype {y.dtype}', collective=True)


def check_labels(y: np.ndarray, classes: Sequence[Optional[int]], where: str,
                 names: Optional[Sequence[str]] = None) -> None:
    """Raises DataError unless ``y`` is (N, K) integers in [0, classes_i) or -1 (ignored).

    ``classes[i]`` None (a head that computes its own loss) only requires labels >= -1.
    Every rank checks the same full label array, so the error is collective.
    """
    y = np.asarray(y)
    check_label_shape(y, len(classes), where)
    names = list(names) if names is not None else [f'head{i}' for i in range(len(classes))]
    for i, (name, n_classes) in enumerate(zip(names, classes)):
        col = y[:, i]
        if n_classes is None:
            bad = col < IGNORE_LABEL
            allowed = 'labels >= 0, or -1 to ignore a sample'
        else:
            bad = (col != IGNORE_LABEL) & ((col < 0) | (col >= n_classes))
            allowed = (f'[0, {n_classes}) ({n_classes} classes); use -1 to ignore a sample')
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f'{where}: {name} label {int(col[row])} at row {row} is outside '
                            f'{allowed} ({int(bad.sum())} bad labels in that column)',
                            collective=True)
