"""Reading samples by index: in worker processes ahead of training, checked as they are read.

A ``Loader`` holds this rank's datasets by name (``'train'``, ``'test'``) and turns a list of
sample indices into a batch ``(x, t)`` of stacked arrays. With ``workers > 0`` the reading and
decoding of lazy datasets happen in that many forked processes (forked once, before training
starts any thread; they ignore SIGINT/SIGTERM, which are the training process's to handle,
and die with it), so that the iterators can ask for the next batches while the current one
trains; in-memory datasets are read in the training process.

Every sample is checked as it is read (the first sample's shape, float32, finite pixels, one
integer label per head within the head's classes): a problem is a ``SampleError`` naming the
dataset and the row, raised where the batch is used. It ends the job on every rank through
:func:`raise_if_any_failed`, which the updater and the evaluator call after the all-reduce
that carries each rank's "my batch failed" flag.
"""
import gc
import mmap
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from chainer.datasets import SubDataset

from distmulti.datasets import in_memory
from distmulti.errors import DistmultiError, SampleError
from distmulti.models import IGNORE_LABEL
from distmulti.runstats import cpu_s, peak_rss_mb

Batch = Tuple[np.ndarray, np.ndarray]
_WORKER: Dict[str, Any] = {}  # a worker process's sources, set by _worker_init


class SampleSpec(NamedTuple):
    """What every sample of a dataset must look like (taken from its first sample)."""

    shape: Tuple[int, ...]              # x's shape
    classes: Sequence[Optional[int]]    # per head: its number of classes (None: any >= -1)
    names: Sequence[str]                # head names, for messages


class Source(NamedTuple):
    """A dataset of (x, t) pairs, the name its errors use, and its spec."""

    dataset: Any
    name: str
    spec: Optional[SampleSpec] = None


def source_row(dataset: Any, index: int) -> int:
    """The row in the dataset as the user gave it of sample ``index`` of a (nested)
    ``SubDataset`` of it, such as a split; ``index`` itself for any other dataset."""
    while isinstance(dataset, SubDataset):
        index = dataset._start + index  # chainer offers no public accessor
        if dataset._order is not None:
            index = int(dataset._order[index])
        dataset = dataset._dataset
    return int(index)


def read_example(source: Source, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sample ``index`` of ``source`` as numpy arrays, checked against its spec.

    Raises:
        SampleError: the sample cannot be read, or does not fit the spec.
    """
    try:
        example = source.dataset[index]
    except DistmultiError as e:  # a dataset of ours: it names its file and row
        raise SampleError(str(e)) from None
    except Exception as e:  # a user's dataset: any exception of its own
        raise SampleError(f'{source.name}: reading sample {source_row(source.dataset, index)} '
                          f'failed ({type(e).__name__}: {e})') from None
    if not isinstance(example, tuple) or len(example) != 2:
        raise SampleError(f'{source.name}: sample {source_row(source.dataset, index)} is a '
                          f'{type(example).__name__}, not an (x, t) pair')
    x, t = np.asarray(example[0]), np.asarray(example[1])
    problem = check_example(x, t, source.spec)
    if problem:
        raise SampleError(f'{source.name}: sample {source_row(source.dataset, index)} '
                          f'{problem}')
    return x, t


def check_example(x: np.ndarray, t: np.ndarray, spec: Optional[SampleSpec]) -> Optional[str]:
    """What is wrong with one sample (a phrase), or None. Without a spec, only dtypes."""
    if x.dtype != np.float32:
        return f'has x of dtype {x.dtype} but float32 is required'
    if not np.issubdtype(t.dtype, np.integer):
        return f'has labels of dtype {t.dtype} but integers are required'
    if spec is None:
        return None
    if x.shape != tuple(spec.shape):
        return (f'has x of shape {x.shape} but the first sample has {tuple(spec.shape)}; '
                f'every sample must have the same shape')
    if t.shape != (len(spec.classes),):
        return (f'has labels of shape {t.shape} but the model has {len(spec.classes)} heads; '
                f'give one label per head')
    if not np.isfinite(x).all():
        return 'holds NaN or infinite values; every pixel must be finite'
    for name, n_classes, label in zip(spec.names, spec.classes, t.tolist()):
        if n_classes is None:
            if label < IGNORE_LABEL:
                return f'has {name} label {label}; allowed: labels >= 0, or -1 to ignore it'
        elif label != IGNORE_LABEL and not 0 <= label < n_classes:
            return (f'has {name} label {label}, outside [0, {n_classes}) ({n_classes} '
                    f'classes); use -1 to ignore a sample')
    return None


def read_batch(source: Source, indices: Sequence[int], out: Optional[np.ndarray] = None
               ) -> Batch:
    """The samples at ``indices``, stacked: x (B, ...) (into ``out`` when given) and t (B, K)."""
    xs, ts = zip(*(read_example(source, int(i)) for i in indices))
    return np.stack(xs, out=out), np.stack(ts)


class _Slots:
    """Blocks of memory shared with the forked workers (anonymous shared maps made before the
    fork), one per batch in flight: a worker writes a batch's x there, and only its labels
    travel through the result pipe, so that the training process copies each batch once
    instead of receiving it pickled."""

    def __init__(self, count: int, nbytes: int):
        self.nbytes = nbytes
        self.blocks = [mmap.mmap(-1, nbytes) for _ in range(count)]
        self.free = list(range(count))

    def take(self, nbytes: int) -> Optional[int]:
        if nbytes > self.nbytes or not self.free:
            return None
        return self.free.pop()

    def view(self, slot: int, shape: Tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(self.blocks[slot], np.float32, int(np.prod(shape))).reshape(shape)

    def give_back(self, slot: int) -> None:
        self.free.append(slot)  # also from the executor's thread: one atomic append


class _Deferred:
    """A batch read in this process when it is asked for (``workers=0``)."""

    def __init__(self, read: Callable[[], Batch]):
        self._read = read

    def result(self) -> Batch:
        return self._read()

    def cancel(self) -> bool:
        return True


class _Pending:
    """A batch being read by a worker (into shared ``slot`` of ``slots`` when not None);
    ``result()`` raises SampleError for a failed one."""

    def __init__(self, future, name: str, indices: np.ndarray, slots=None, slot=None):
        self._future, self._name, self._indices = future, name, indices
        self._slots, self._slot = slots, slot

    def result(self) -> Batch:
        try:
            x, t = self._future.result()
            if self._slot is not None:  # x is in shared memory: copy it out, free the slot
                x = self._slots.view(self._slot, x).copy()
            return x, t
        except SampleError as e:  # raised in the worker: re-raised here without its chain
            raise SampleError(str(e)) from None
        except BrokenProcessPool:
            raise SampleError(_died(self._name, self._indices)) from None
        finally:
            self._release()

    def cancel(self) -> bool:
        if self._future.cancel():
            self._release()
            return True
        self._future.add_done_callback(lambda _: self._release())  # nobody reads it now
        return False

    def _release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._slots.give_back(slot)


def _died(name: str, indices: np.ndarray) -> str:
    shown = ', '.join(str(int(i)) for i in indices[:3]) + (', ...' if len(indices) > 3 else '')
    return (f'{name}: a data loader worker process died while reading samples {shown} '
            f'(killed, or out of memory?); use fewer --loader-workers or find what killed it')


class Loader:
    """Reads batches from named sources.

    Lazy sources are read in ``workers`` forked processes, ahead of use. In-memory ones (a
    ``TupleDataset`` of arrays, where a sample is a copy, cheaper than sending it between
    processes), and every source when ``workers`` is 0, are read in the calling process when
    a batch is asked for.

    Args:
        sources: ``{name: Source}``; forked workers inherit them (nothing is pickled).
        workers: the most worker processes; ``self.workers`` is how many there are (0 when
            every source is in memory).
        max_batch: the largest batch that will be asked for; with it (and the sources'
            specs) workers hand batches over in shared memory, else pickled.
    """

    def __init__(self, sources: Dict[str, Source], workers: int = 0, max_batch: int = 0):
        if workers < 0:
            raise ValueError(f'workers must be >= 0, got {workers}')
        self.sources = dict(sources)
        self.max_batch = int(max_batch)
        self._slots = None
        self._local = {name for name, source in self.sources.items()
                       if in_memory(source.dataset)}
        self.workers = int(workers) if set(self.sources) - self._local else 0
        self._pool = None
        self._closed = False
        self.worker_peak_rss_mb = 0.0  # the largest worker's peak, read when it is stopped
        self.worker_cpu_s = 0.0        # the workers' CPU seconds together, read then too

    def start(self) -> None:
        """Forks the workers (once; the first ``submit`` does it otherwise). Call it before
        the training starts threads (a watchdog): a forked thread's locks stay locked."""
        if self.workers and self._pool is None and not self._closed:
            sizes = [int(np.prod(source.spec.shape)) * 4 for source in self.sources.values()
                     if source.spec is not None]
            if self.max_batch and sizes:  # two batches per worker ahead, for train and test
                self._slots = _Slots(4 * self.workers + 4, self.max_batch * max(sizes))
            context = multiprocessing.get_context('fork')
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context,
                                             initializer=_worker_init,
                                             initargs=(self.sources, self._slots, os.getpid()))
            # With fork, the first submit starts every worker: do it now.
            for future in [self._pool.submit(os.getpid) for _ in range(self.workers)]:
                future.result()

    def submit(self, name: str, indices: np.ndarray):
        """Starts reading a batch; returns a handle whose ``result()`` is ``(x, t)`` or raises
        SampleError."""
        source = self.sources[name]
        indices = np.asarray(indices, dtype=np.int64)
        if self._closed:
            raise RuntimeError('the Loader is closed')
        self.start()
        if self._pool is None or name in self._local:
            return _Deferred(lambda: read_batch(source, indices))
        slot = None
        if self._slots is not None and source.spec is not None:
            slot = self._slots.take(len(indices) * int(np.prod(source.spec.shape)) * 4)
        try:
            future = self._pool.submit(_read_in_worker, name, indices, slot)
        except BrokenProcessPool:  # an earlier worker died: this read fails where it is used
            if slot is not None:
                self._slots.give_back(slot)
            message = _died(source.name, indices)
            return _Deferred(lambda: _raise(message))
        return _Pending(future, source.name, indices, self._slots, slot)

    def close(self) -> None:
        """Stops the workers (the batch each one is reading is finished first), after noting
        the largest one's peak memory (``worker_peak_rss_mb``) and their CPU time
        (``worker_cpu_s``)."""
        self._closed = True
        if self._pool is not None:
            # CPython keeps the workers by pid; a pid it does not have reads as 0.
            pids = list(getattr(self._pool, '_processes', None) or ())
            self.worker_peak_rss_mb = max([peak_rss_mb(pid) for pid in pids] + [0.0])
            self.worker_cpu_s = sum(cpu_s(pid) for pid in pids)
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> 'Loader':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _raise(message: str):
    raise SampleError(message)


def _worker_init(sources: Dict[str, Source], slots: Optional[_Slots], parent: int) -> None:
    # What the training process had when it forked (its network, CUDA arrays on a GPU run)
    # is never collected here: no page is copied for the collector, and no device memory
    # is freed from a process that must not touch the device.
    gc.freeze()
    _WORKER['sources'], _WORKER['slots'] = sources, slots
    # Interrupts and termination are the training process's to handle (it stops the job at
    # a common iteration, then closes this pool); a worker only reads.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """On Linux, asks for SIGKILL when the training process dies (however it dies)."""
    if sys.platform.startswith('linux'):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request above
        os._exit(1)


def _read_in_worker(name: str, indices: np.ndarray, slot: Optional[int]):
    """The batch (x, t); with a slot, x is written there and its shape is sent instead."""
    source = _WORKER['sources'][name]
    if slot is None:
        return read_batch(source, indices)
    shape = (len(indices),) + tuple(source.spec.shape)
    _, t = read_batch(source, indices, out=_WORKER['slots'].view(slot, shape))
    return shape, t


def raise_if_any_failed(comm, failed: float, error: Optional[SampleError]) -> None:
    """Collective when ``failed`` (the all-reduced count of ranks whose batch failed) is
    non-zero: every rank raises the same SampleError, the first failing rank's message."""
    if not failed:
        return
    messages = comm.allgather_obj(str(error) if error is not None else None)
    ranks = [rank for rank, message in enumerate(messages) if message is not None]
    first = messages[ranks[0]]
    where = ''
    if comm.size > 1:
        others = f' and {len(ranks) - 1} other rank(s)' if len(ranks) > 1 else ''
        where = f' (read on rank {ranks[0]}{others})'
    raise SampleError(f'{first}{where}', collective=True)
