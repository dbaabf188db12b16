"""Sharding by index on real files: each rank reads only its own samples, the ranks' samples
are disjoint and cover the data, a bad sample on one rank stops every rank with its row, and
W ranks train exactly like one process with the global batch. Expectations come from
comm.size (these pass under plain pytest and under mpiexec -n 2); every collective happens
before any assert."""
import os
import shutil
import tempfile

import chainer
import numpy as np
import pytest
from chainer import optimizers as O

from distmulti.comm import LocalComm, create_world
from distmulti.config import TrainConfig
from distmulti.errors import SampleError
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.iterators import EvalIterator, TrainIterator
from distmulti.loader import Loader, SampleSpec, Source
from distmulti.npydata import NpyDataset
from distmulti.sampling import shard_bounds
from distmulti.training import train
from distmulti.updater import MultiHeadUpdater
from tests.helpers import params, small_net

WORLD = create_world('naive')
B = 3
N = 12 * WORLD.size * B  # 12 iterations per epoch at any world size


@pytest.fixture
def shared_dir():
    """A folder every rank sees (the same machine), made by rank 0, removed after the test."""
    path = WORLD.allgather_obj(tempfile.mkdtemp(prefix='distmulti-shard-') if WORLD.is_root
                               else None)[0]
    yield path
    WORLD.allgather_obj(None)  # every rank is done with it
    if WORLD.is_root:
        shutil.rmtree(path, ignore_errors=True)


def write_npy(folder, n, nan_rows=(), heads=3):
    """x[i] is an 8 x 24 strip whose first pixel is i (so what was read names its row)."""
    if WORLD.is_root:
        os.makedirs(folder)
        rng = np.random.RandomState(0)
        x = rng.rand(n, 1, 8, 8 * heads).astype(np.float32)
        x[:, 0, 0, 0] = np.arange(n)
        for row in nan_rows:
            x[row, 0, 3, 3] = np.nan
        np.save(os.path.join(folder, 'x.npy'), x)
        np.save(os.path.join(folder, 'y.npy'), rng.randint(0, 10, size=(n, heads)))
    WORLD.allgather_obj(None)
    return folder


class Recording(NpyDataset):
    """An npy: dataset that notes which rows this process reads."""

    def __init__(self, folder):
        super().__init__(folder)
        self.read = []

    def get_example(self, i):
        self.read.append(int(i))
        return super().get_example(i)


def spec(heads=3):
    return SampleSpec((1, 8, 8 * heads), [10] * heads, [f'head{i}' for i in range(heads)])


def test_each_rank_reads_only_its_samples_and_together_they_cover_every_epoch(shared_dir):
    data = Recording(write_npy(os.path.join(shared_dir, 'd'), N))
    with Loader({'train': Source(data, 'npy', spec())}, workers=0) as loader:
        it = TrainIterator(loader, 'train', N, B, WORLD.size, WORLD.rank, seed=2, prefetch=0)
        used = [[int(x[0, 0, 0]) for x, _ in it.next()] for _ in range(2 * 12)]
    epochs = WORLD.allgather_obj([sum(used[e * 12:(e + 1) * 12], []) for e in range(2)])
    reads = data.read

    assert reads == sum(used, [])  # read exactly what it trained on, nothing else
    for e in range(2):
        everything = sum((rank_epochs[e] for rank_epochs in epochs), [])
        assert sorted(everything) == list(range(N)), f'epoch {e}'
    assert epochs[0][0] != epochs[0][1]  # epochs are shuffled differently


def test_the_test_set_is_split_into_disjoint_blocks_that_cover_it(shared_dir):
    n = 2 * WORLD.size * 5 + 1  # blocks of unequal length
    data = Recording(write_npy(os.path.join(shared_dir, 'd'), n))
    with Loader({'test': Source(data, 'npy', spec())}, workers=1) as loader:
        it = EvalIterator(loader, 'test', *shard_bounds(n, WORLD.size, WORLD.rank), 4)
        it.reset()
        mine = [int(x[0, 0, 0]) for batch in it for x, _ in batch]
    blocks = WORLD.allgather_obj(mine)

    assert sorted(sum(blocks, [])) == list(range(n))
    assert sum(len(b) for b in blocks) == n


def updater_over(loader, net):
    opts = {name: O.SGD(lr=0.1) for name in ['base'] + net.head_names}
    for name, opt in opts.items():
        opt.setup(getattr(net, name))
    it = TrainIterator(loader, 'train', N, B, WORLD.size, WORLD.rank, seed=0)
    return MultiHeadUpdater(it, net, opts, comm=WORLD), it


def test_a_nan_sample_on_one_rank_stops_every_rank_at_the_same_iteration(shared_dir):
    # The row that the last rank draws second in its third batch.
    probe = TrainIterator(Loader({}), 'train', N, B, WORLD.size, WORLD.size - 1, seed=0)
    row = int(probe.indices_at(2 * WORLD.size * B)[1])
    folder = write_npy(os.path.join(shared_dir, 'd'), N, nan_rows=[row])
    net = small_net(3)
    with Loader({'train': Source(NpyDataset(folder), 'npy', spec())}, workers=1) as loader:
        updater, _ = updater_over(loader, net)
        error = None
        with chainer.Reporter().scope({}):
            try:
                for _ in range(5):
                    updater.update()
            except SampleError as e:
                error = e
    outcomes = WORLD.allgather_obj((updater.iteration, str(error) if error else None))

    assert error is not None and error.collective
    on = f' (read on rank {WORLD.size - 1})' if WORLD.size > 1 else ''
    assert str(error) == (f'{os.path.join(folder, "x.npy")}: row {row} (counting from 0) holds '
                          f'NaN or infinite values; every pixel must be finite{on}')
    assert len(set(outcomes)) == 1 and outcomes[0][0] == 2  # 2 updates done, the 3rd failed


def test_an_unreadable_test_sample_stops_every_rank_after_the_evaluation(shared_dir):
    n = 4 * WORLD.size
    begin, _ = shard_bounds(n, WORLD.size, WORLD.size - 1)
    folder = write_npy(os.path.join(shared_dir, 'd'), n, nan_rows=[begin + 1])
    net = small_net(3)
    with Loader({'test': Source(NpyDataset(folder), 'npy', spec())}, workers=0) as loader:
        it = EvalIterator(loader, 'test', *shard_bounds(n, WORLD.size, WORLD.rank), 2)
        with pytest.raises(SampleError) as info:
            MultiHeadEvaluator(it, net, comm=WORLD).evaluate()
    messages = WORLD.allgather_obj(str(info.value))

    assert len(set(messages)) == 1 and f'row {begin + 1} (counting from 0)' in messages[0]
    assert info.value.collective


def test_w_ranks_train_exactly_like_one_process_with_the_global_batch(shared_dir):
    folder = write_npy(os.path.join(shared_dir, 'd'), N)
    test_folder = write_npy(os.path.join(shared_dir, 't'), 10)

    def run(comm, batchsize, workers, out):
        config = TrainConfig(out=out, iterations=8, batchsize=batchsize, progress=False,
                             plot=False, seed=3, optimizer='momentum_sgd', lr=0.05,
                             loader_workers=workers, checkpoint_interval=100)
        net = small_net(3)
        result = train(config, net=net, train_data=NpyDataset(folder),
                       test_data=NpyDataset(test_folder), comm=comm, log=lambda msg: None)
        return params(net), result

    together, result = run(WORLD, B, 1, os.path.join(shared_dir, 'together'))
    alone, alone_result = run(LocalComm(), B * WORLD.size, 0,
                              os.path.join(shared_dir, f'alone{WORLD.rank}'))
    samples = WORLD.allgather_obj(result['train_samples_seen'])

    assert samples == [8 * B * WORLD.size] * WORLD.size == [alone_result['train_samples_seen']] \
        * WORLD.size
    for name, value in alone.items():
        np.testing.assert_allclose(together[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert result['test']['samples'] == 10
    assert result['test']['head0/loss'] == pytest.approx(alone_result['test']['head0/loss'],
                                                         rel=1e-5)
