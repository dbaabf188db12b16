"""Which samples each rank reads: pure index arithmetic, the same on every rank.

Training draws from one global stream of sample indices: epoch ``e`` is a permutation of the
training set seeded by ``(seed, e)``, and the epochs follow each other. Iteration ``i`` of a
run on W ranks with batch B per rank consumes the next W x B positions of the stream; rank r
takes the r-th block of B of them. So the ranks' samples in an epoch are disjoint and cover
the training set, no rank needs anything but the dataset's length and the seed, and the
stream does not depend on W: a run resumed on another number of ranks continues from the
number of samples seen (``epoch_detail = samples seen / N``), and W ranks with batch B draw
exactly the global batches of one process with batch W x B.

Evaluation splits the test set into W contiguous blocks (ChainerMN's ``scatter_index``
without padding), so each sample is evaluated exactly once.
"""
import os
from typing import Dict, Optional, Tuple

import numpy as np

EVAL_MAX_BATCH = 500
EVAL_INPUT_BYTES = 4 << 20  # one evaluation batch of inputs holds at most about this much
MAX_DEFAULT_WORKERS = 8


class TrainOrder:
    """The global sample stream of a training set of ``n`` samples, seeded by ``seed``."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f'a training order needs at least one sample, got n={n}')
        self.n, self.seed = int(n), int(seed)
        self._epochs: Dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        """The permutation of epoch ``e`` (the two most recent ones are cached)."""
        if e not in self._epochs:
            order = np.random.RandomState([self.seed, e]).permutation(self.n)
            dtype = np.int32 if self.n <= np.iinfo(np.int32).max else np.int64
            self._epochs[e] = order.astype(dtype)
            for old in sorted(self._epochs)[:-2]:
                del self._epochs[old]
        return self._epochs[e]

    def indices(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at stream positions ``[start, stop)``."""
        parts = []
        while start < stop:
            e, offset = divmod(start, self.n)
            take = min(stop - start, self.n - offset)
            parts.append(self.epoch(e)[offset:offset + take])
            start += take
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)


def rank_positions(samples_seen: int, world_size: int, rank: int,
                   batch_size: int) -> Tuple[int, int]:
    """Stream positions ``[start, stop)`` of this rank's batch in the global batch that
    begins after ``samples_seen`` samples."""
    start = samples_seen + rank * batch_size
    return start, start + batch_size


def shard_bounds(n: int, world_size: int, rank: int) -> Tuple[int, int]:
    """``[begin, end)`` of rank ``rank``'s contiguous block of ``n`` samples: blocks differ in
    length by at most one, are disjoint and cover ``range(n)``."""
    return n * rank // world_size, n * (rank + 1) // world_size


def default_eval_batchsize(sample_bytes: int, batchsize: int) -> int:
    """An evaluation batch that keeps the input (and so the layers' buffers) modest: at most
    :data:`EVAL_INPUT_BYTES` of inputs, at least the training batch, at most 500."""
    by_size = EVAL_INPUT_BYTES // max(1, int(sample_bytes))
    return max(1, min(EVAL_MAX_BATCH, max(int(batchsize), by_size)))


def cores_per_rank(local_ranks: int, affinity: Optional[int] = None,
                   cpu_count: Optional[int] = None) -> int:
    """The cores one rank may use: its CPU affinity when a launcher bound it to fewer cores
    than the node has, else the node's cores shared among its ranks."""
    if cpu_count is None:
        cpu_count = os.cpu_count() or 1
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = cpu_count
    if affinity < cpu_count:
        return max(1, affinity)
    return max(1, cpu_count // max(1, local_ranks))


def default_loader_workers(cores: int) -> int:
    """Decoding processes per rank: one core stays with the training process, at least one
    worker, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, cores - 1))
