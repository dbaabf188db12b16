"""Chainer iterators over this rank's samples, read ahead through a ``Loader``.

``TrainIterator`` yields this rank's part of each global batch of the training stream (see
:mod:`distmulti.sampling`); its position is the number of samples seen by all ranks together,
saved in checkpoints, so a run resumed on any number of ranks continues the same stream.
``EvalIterator`` yields this rank's contiguous block of the test set once per pass.
"""
import collections
import time
from typing import Deque, List, Optional, Tuple

import chainer
import numpy as np

from distmulti.loader import Loader
from distmulti.sampling import TrainOrder, rank_positions


class TrainIterator(chainer.dataset.Iterator):
    """This rank's batches of the global training stream.

    Args:
        loader: reads the batches; ``loader.sources[name]`` is the training set.
        name: the source's name in ``loader``.
        n: the training set's length (the same on every rank).
        batch_size: samples per rank per iteration.
        world_size, rank: the process group.
        seed: seeds the order of every epoch.
        prefetch: batches requested ahead of the one being used (default: two per worker).
    """

    def __init__(self, loader: Loader, name: str, n: int, batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0,
                 prefetch: Optional[int] = None):
        self.loader, self.name = loader, name
        self.n, self.batch_size = int(n), int(batch_size)
        self.world_size, self.rank = int(world_size), int(rank)
        self.global_batch = self.batch_size * self.world_size
        self.order = TrainOrder(self.n, seed)
        self.prefetch = prefetch if prefetch is not None else max(1, 2 * loader.workers)
        self.samples_seen = 0
        self.previous_samples_seen = 0
        self.legacy_checkpoint = False  # set when a checkpoint had no stream position
        self.wait_s = 0.0  # time next() spent waiting for a batch to be read
        self._ahead: Deque[Tuple[int, object]] = collections.deque()

    # -- position ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.samples_seen // self.n

    @property
    def epoch_detail(self) -> float:
        return self.samples_seen / self.n

    @property
    def previous_epoch_detail(self) -> float:
        return self.previous_samples_seen / self.n

    @property
    def is_new_epoch(self) -> bool:
        return self.samples_seen // self.n != self.previous_samples_seen // self.n

    @property
    def repeat(self) -> bool:
        return True

    def seek(self, samples_seen: int) -> None:
        """Moves to the position after ``samples_seen`` samples of the stream (all ranks)."""
        self._drop_ahead()
        self.samples_seen = self.previous_samples_seen = int(samples_seen)

    # -- batches ----------------------------------------------------------------------------
    def __next__(self) -> List[tuple]:
        self._fill()
        start, handle = self._ahead.popleft()
        self.previous_samples_seen = start
        self.samples_seen = start + self.global_batch
        self._fill()  # the workers read ahead while this batch trains
        started = time.perf_counter()
        try:
            x, t = handle.result()  # SampleError when a sample of it failed
        finally:
            self.wait_s += time.perf_counter() - started
        return list(zip(x, t))

    next = __next__

    def indices_at(self, samples_seen: int):
        """This rank's sample indices in the global batch that starts at ``samples_seen``."""
        return self.order.indices(*rank_positions(samples_seen, self.world_size, self.rank,
                                                  self.batch_size))

    def _fill(self) -> None:
        while len(self._ahead) < self.prefetch + 1:
            start = self._ahead[-1][0] + self.global_batch if self._ahead else self.samples_seen
            self._ahead.append((start, self.loader.submit(self.name, self.indices_at(start))))

    def _drop_ahead(self) -> None:
        while self._ahead:
            self._ahead.popleft()[1].cancel()

    def finalize(self) -> None:
        self._drop_ahead()

    def serialize(self, serializer) -> None:
        try:
            seen = int(serializer('samples_seen', self.samples_seen))
            previous = int(serializer('previous_samples_seen', self.previous_samples_seen))
        except KeyError:  # a checkpoint written before the stream position was saved
            self.legacy_checkpoint = True
            return
        if (seen, previous) != (self.samples_seen, self.previous_samples_seen):
            self.seek(seen)
            self.previous_samples_seen = previous


class EvalIterator(chainer.dataset.Iterator):
    """One pass over samples ``[begin, end)`` of a source, in order, per ``reset()``.

    Args:
        loader: reads the batches; ``loader.sources[name]`` is the test set.
        name: the source's name in ``loader``.
        begin, end: this rank's block of the test set.
        batch_size: samples per batch.
        prefetch: batches requested ahead (default: two per worker).
    """

    def __init__(self, loader: Loader, name: str, begin: int, end: int, batch_size: int,
                 prefetch: Optional[int] = None):
        self.loader, self.name = loader, name
        self.begin, self.end, self.batch_size = int(begin), int(end), int(batch_size)
        self.prefetch = prefetch if prefetch is not None else max(1, 2 * loader.workers)
        self._next_start = self.begin
        self._ahead: Deque[object] = collections.deque()
        self._used = self.begin

    @property
    def repeat(self) -> bool:
        return False

    def reset(self) -> None:
        """Starts a new pass (and its reading ahead)."""
        self.finalize()
        self._next_start = self._used = self.begin
        self._fill()

    def __next__(self) -> List[tuple]:
        if self._used >= self.end:
            raise StopIteration
        self._fill()
        handle = self._ahead.popleft()
        self._used = min(self.end, self._used + self.batch_size)
        self._fill()
        x, t = handle.result()
        return list(zip(x, t))

    next = __next__

    def stop(self) -> None:
        """Ends this pass early (after a failed batch)."""
        self.finalize()
        self._used = self.end

    def _fill(self) -> None:
        while len(self._ahead) < self.prefetch + 1 and self._next_start < self.end:
            stop = min(self.end, self._next_start + self.batch_size)
            self._ahead.append(self.loader.submit(self.name,
                                                  np.arange(self._next_start, stop)))
            self._next_start = stop

    def finalize(self) -> None:
        while self._ahead:
            self._ahead.popleft().cancel()
        self._next_start = self.end
