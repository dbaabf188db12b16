"""The Loader with real worker processes, and the iterators that read ahead through it:
the same batches as reading in-process, checks that name the row, dead and interrupted
workers, workers that end with their parent, positions that survive a checkpoint."""
import os
import signal
import subprocess
import sys
import time

import chainer
import numpy as np
import pytest
from chainer.datasets import SubDataset, TupleDataset

from distmulti.checkpoint import load_npz, save_npz
from distmulti.errors import SampleError
from distmulti.iterators import EvalIterator, TrainIterator
from distmulti.loader import Loader, SampleSpec, Source, read_example, source_row
from distmulti.npydata import NpyDataset
from tests.helpers import ROOT

SPEC = SampleSpec((1, 2, 2), [10], ['head0'])


class Indexed(chainer.dataset.DatasetMixin):
    """A user's lazy dataset: sample i is an image full of i, its label i % 10; ``bad`` maps
    an index to what goes wrong with it."""

    def __init__(self, n, bad=None):
        self.n, self.bad = n, bad or {}

    def __len__(self):
        return self.n

    def get_example(self, i):
        x = np.full((1, 2, 2), i, np.float32)
        t = np.array([i % 10], np.int32)
        problem = self.bad.get(i)
        if problem == 'raise':
            raise OSError(f'disk read error at {i}')
        if problem == 'nan':
            x[0, 1, 1] = np.nan
        if problem == 'shape':
            x = np.zeros((1, 3, 2), np.float32)
        if problem == 'float64':
            x = x.astype(np.float64)
        if problem == 'label':
            t = np.array([12], np.int32)
        if problem == 'pid':
            x[:] = os.getpid()
        if problem == 'slow':
            time.sleep(0.5)
        return x, t


def loader(dataset, workers, name='data', max_batch=0):
    return Loader({'train': Source(dataset, name, SPEC)}, workers, max_batch=max_batch)


def ids(batch):
    return [int(x[0, 0, 0]) for x, _ in batch]


@pytest.mark.parametrize('max_batch', [0, 4], ids=['pickled', 'shared-memory'])
def test_workers_give_bitwise_the_batches_of_reading_in_process(max_batch):
    dataset = Indexed(23)
    with loader(dataset, 0) as serial, loader(dataset, 2, max_batch=max_batch) as forked:
        a = TrainIterator(serial, 'train', 23, 4, world_size=2, rank=1, seed=7)
        b = TrainIterator(forked, 'train', 23, 4, world_size=2, rank=1, seed=7)
        for _ in range(9):  # across epoch boundaries
            xa, xb = a.next(), b.next()
            assert ids(xa) == ids(xb)
            for (x1, t1), (x2, t2) in zip(xa, xb):
                assert x1.tobytes() == x2.tobytes() and t1.tobytes() == t2.tobytes()
        assert a.samples_seen == b.samples_seen == 9 * 8


def test_the_train_iterator_reports_epochs_of_the_global_stream():
    with loader(Indexed(10), 0) as data:
        it = TrainIterator(data, 'train', 10, 2, world_size=2, rank=0, seed=0)
        details, new = [], []
        for _ in range(5):
            it.next()
            details.append(it.epoch_detail)
            new.append(it.is_new_epoch)
        assert details == [0.4, 0.8, 1.2, 1.6, 2.0]
        assert new == [False, False, True, False, True]
        assert it.epoch == 2 and it.previous_epoch_detail == 1.6


def test_a_checkpointed_position_resumes_the_same_stream_on_another_world_size(tmp_path):
    with loader(Indexed(30), 0) as data:
        two = [TrainIterator(data, 'train', 30, 3, world_size=2, rank=r, seed=4)
               for r in range(2)]
        for _ in range(7):
            for it in two:
                it.next()
        save_npz(str(tmp_path / 'it.npz'), two[0])
        expected = [ids(two[0].next()) + ids(two[1].next()) for _ in range(4)]
        one = TrainIterator(data, 'train', 30, 6, seed=4)
        one.next()  # somewhere else first: loading must move it
        load_npz(str(tmp_path / 'it.npz'), one)
        assert one.samples_seen == 42 and not one.legacy_checkpoint
        assert [ids(one.next()) for _ in range(4)] == expected


def test_a_checkpoint_without_a_stream_position_is_marked_legacy(tmp_path):
    np.savez(tmp_path / 'old.npz', current_position=np.array(3), epoch=np.array(1))
    with loader(Indexed(10), 0) as data:
        it = TrainIterator(data, 'train', 10, 2)
        load_npz(str(tmp_path / 'old.npz'), it)
    assert it.legacy_checkpoint and it.samples_seen == 0


@pytest.mark.parametrize('max_batch', [0, 3], ids=['pickled', 'shared-memory'])
def test_a_sample_error_in_a_worker_names_the_row_and_waits_for_its_batch(max_batch):
    dataset = Indexed(12, bad={5: 'nan'})
    with loader(dataset, 2, max_batch=max_batch) as data:
        first = data.submit('train', [0, 1, 2])
        bad = data.submit('train', [4, 5])
        after = data.submit('train', [6, 7])
        assert ids(list(zip(*first.result()))) == [0, 1, 2]
        with pytest.raises(SampleError) as info:
            bad.result()
        assert str(info.value) == ('data: sample 5 holds NaN or infinite values; every pixel '
                                   'must be finite')
        assert ids(list(zip(*after.result()))) == [6, 7]  # the workers carry on


@pytest.mark.parametrize('problem,message', [
    ('raise', 'data: reading sample 3 failed (OSError: disk read error at 3)'),
    ('shape', 'data: sample 3 has x of shape (1, 3, 2) but the first sample has (1, 2, 2)'),
    ('float64', 'data: sample 3 has x of dtype float64 but float32 is required'),
    ('label', 'data: sample 3 has head0 label 12, outside [0, 10) (10 classes)'),
])
def test_each_bad_sample_of_a_users_dataset_is_one_clear_error(problem, message):
    with pytest.raises(SampleError) as info:
        read_example(Source(Indexed(5, bad={3: problem}), 'data', SPEC), 3)
    assert str(info.value).startswith(message)


def test_a_sample_of_a_split_is_named_by_its_row_in_the_users_data():
    order = np.array([4, 0, 3, 1, 2])
    split = SubDataset(Indexed(5, bad={1: 'nan'}), 2, 5, order)  # rows 3, 1, 2
    assert [source_row(split, i) for i in range(3)] == [3, 1, 2]
    with pytest.raises(SampleError, match='data: sample 1 holds NaN'):
        read_example(Source(split, 'data', SPEC), 1)


def test_shared_memory_slots_come_back_and_run_out_into_the_pickled_path():
    with loader(Indexed(40, bad={30: 'slow'}), 1, max_batch=2) as data:
        data.start()
        slots = len(data._slots.free)
        handles = [data.submit('train', [i, i + 1]) for i in range(0, 2 * slots + 4, 2)]
        assert data._slots.free == []  # every slot busy: the rest travel pickled
        big = data.submit('train', [0, 1, 2])  # larger than a slot: pickled
        assert [ids(list(zip(*h.result()))) for h in handles] == \
            [[i, i + 1] for i in range(0, 2 * slots + 4, 2)]
        assert ids(list(zip(*big.result()))) == [0, 1, 2]
        running = data.submit('train', [30, 31])
        dropped = [data.submit('train', [i, i + 1]) for i in range(4)]
        time.sleep(0.2)
        assert not running.cancel()  # being read: its slot is freed when it is done
        for handle in dropped:
            handle.cancel()
        deadline = time.monotonic() + 10
        while len(data._slots.free) < slots and time.monotonic() < deadline:
            time.sleep(0.05)  # a cancelled batch that was running frees its slot when done
        assert len(data._slots.free) == slots


def test_a_killed_worker_fails_the_batches_that_needed_it_with_a_clear_error():
    with loader(Indexed(8, bad={0: 'pid'}), 1) as data:
        pid = int(data.submit('train', [0]).result()[0][0, 0, 0, 0])
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(SampleError) as info:
            data.submit('train', [1, 2]).result()
    assert str(info.value).startswith('data: a data loader worker process died while reading '
                                      'samples 1, 2 (killed, or out of memory?)')


def test_workers_ignore_interrupts_and_stop_on_close():
    data = loader(Indexed(8, bad={0: 'pid'}), 2)
    pid = int(data.submit('train', [0]).result()[0][0, 0, 0, 0])
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    assert ids(list(zip(*data.submit('train', [3, 4, 5, 6]).result()))) == [3, 4, 5, 6]
    os.kill(pid, 0)  # still alive
    data.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped
    assert data.worker_peak_rss_mb > 1  # MB, read from /proc before they stopped
    assert data.worker_cpu_s >= 0.0
    with pytest.raises(RuntimeError, match='closed'):
        data.submit('train', [1])


CHILD = '''
import os, sys, time
sys.path.insert(0, {root!r})
import distmulti
from tests.unit.test_loader import Indexed, loader
data = loader(Indexed(8, bad={{i: 'pid' for i in range(8)}}), 2)
handles = [data.submit('train', [i]) for i in range(8)]
pids = {{int(h.result()[0][0, 0, 0, 0]) for h in handles}}
print(' '.join(map(str, sorted(pids))), flush=True)
os.kill(os.getpid(), 9)
'''


def test_workers_die_with_a_killed_training_process(tmp_path):
    out = tmp_path / 'pids'
    with open(out, 'w') as f:  # a file, not a pipe: orphans must not keep the test waiting
        proc = subprocess.run([sys.executable, '-c', CHILD.format(root=ROOT)], stdout=f,
                              stderr=subprocess.STDOUT, timeout=120)
    pids = [int(p) for p in out.read_text().split() if p.isdigit()]
    try:
        assert proc.returncode == -signal.SIGKILL and pids, out.read_text()[-2000:]
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        assert not alive, f'workers {alive} outlived their killed parent'
    finally:
        for pid in pids:  # they ignore SIGTERM by design
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def test_an_evaluation_pass_reads_its_block_once_in_order_per_reset(tmp_path):
    x = np.arange(17, dtype=np.float32).reshape(17, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    np.save(tmp_path / 'x.npy', x)
    np.save(tmp_path / 'y.npy', np.arange(17).reshape(17, 1) % 10)
    with Loader({'test': Source(NpyDataset(str(tmp_path)), 'npy', SPEC)}, 2) as data:
        it = EvalIterator(data, 'test', 5, 16, 4)
        for _ in range(2):
            it.reset()
            batches = [ids(batch) for batch in it]
            assert batches == [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15]]


def test_in_memory_data_is_read_in_process_and_starts_no_workers():
    x = np.arange(12, dtype=np.float32).reshape(3, 1, 2, 2)
    data = TupleDataset(x, np.array([[1], [2], [3]], np.int32))
    spec = SampleSpec((1, 2, 2), [10], ['h'])
    with Loader({'train': Source(data, 'd', spec)}, workers=2) as memory_only:
        batch = memory_only.submit('train', [2, 0]).result()
        assert memory_only.workers == 0
    np.testing.assert_array_equal(batch[0], x[[2, 0]])
    np.testing.assert_array_equal(batch[1], [[3], [1]])
    mixed = {'train': Source(SubDataset(data, 0, 3), 'd', spec),
             'test': Source(Indexed(4, bad={1: 'pid'}), 'lazy', SPEC)}
    with Loader(mixed, workers=1) as both:
        assert both.workers == 1
        assert int(both.submit('test', [1]).result()[0][0, 0, 0, 0]) != os.getpid()
        np.testing.assert_array_equal(both.submit('train', [1]).result()[0], x[[1]])
