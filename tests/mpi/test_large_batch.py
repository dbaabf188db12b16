"""Gradient accumulation, synchronised BatchNorm, the gradient-exchange dtype and the
new_epoch contract across ranks. Expectations come from comm.size, so these pass under plain
pytest (one process) and under ``mpiexec -n 2`` (tests/e2e/test_mpi.py); every collective
happens before any assert."""
import hashlib

import numpy as np
import pytest

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import optimizers as O
from chainer.datasets import TupleDataset
from chainer.iterators import SerialIterator

from distmulti.batchnorm import SyncBatchNormalization, batch_norm_links, sync_batch_norm
from distmulti.comm import MPIComm, create_world
from distmulti.errors import ConfigError
from distmulti.models import BatchNormCNN, MultiHeadNet
from distmulti.updater import MultiHeadUpdater
from tests.helpers import params, small_batch, small_net

WORLD = create_world('naive')
B = 4          # local micro-batch
A = 3          # micro-batches accumulated per step
ITERS = 3


def real_communicator():
    """A real ChainerMN naive communicator: the world's, or one of a single process."""
    if WORLD.size > 1:
        return WORLD
    import chainermn
    from mpi4py import MPI
    return MPIComm(chainermn.create_communicator('naive', MPI.COMM_WORLD))


def setup(opts, net):
    for name, opt in opts.items():
        opt.setup(getattr(net, name))
    return opts


def sgd_optimizers(net):
    return setup({'base': O.MomentumSGD(lr=0.1), 'head0': O.SGD(lr=0.2),
                  'head1': O.MomentumSGD(lr=0.1), 'head2': O.Adam(alpha=5e-3)}, net)


def run(updater, n):
    with chainer.Reporter().scope({}):
        for _ in range(n):
            updater.update()


def digest(values):
    return hashlib.sha256(b''.join(v.tobytes() for _, v in sorted(values.items()))).hexdigest()


# -- accumulation -------------------------------------------------------------------------
def accumulation_data():
    """ITERS global steps of size*A*B samples, with labels ignored unevenly: head1 has no
    label in the whole first micro-batch of rank 0, head2 ignores a third of all samples,
    head0 misses labels in the last rank's second micro-batch only."""
    n = WORLD.size * A * B
    x, y = small_batch(3, n * ITERS, seed=5)
    for j in range(ITERS):
        y[j * n:j * n + B, 1] = -1
        y[j * n + (WORLD.size + WORLD.size - 1) * B:j * n + (2 * WORLD.size) * B, 0] = -1
    y[::3, 2] = -1
    return x, y


def rows_of(rank):
    """Rank ``rank`` reads micro-batch a of step j from rows j*n + (a*size + rank)*B..."""
    n = WORLD.size * A * B
    return np.concatenate([np.arange(j * n + (a * WORLD.size + rank) * B,
                                     j * n + (a * WORLD.size + rank + 1) * B)
                           for j in range(ITERS) for a in range(A)])


def reference_big_batch(x, y, net, opts, weights):
    """One process, plain Chainer: one step per global batch of size*A*B, mean losses."""
    n = WORLD.size * A * B
    for j in range(ITERS):
        xb, yb = x[j * n:(j + 1) * n], y[j * n:(j + 1) * n]
        net.cleargrads()
        loss = sum(w * F.softmax_cross_entropy(z, yb[:, i], ignore_label=-1)
                   for i, (w, z) in enumerate(zip(weights, net(xb))))
        loss.backward()
        for opt in opts.values():
            opt.update()
    return params(net)


@pytest.mark.parametrize('grad_sync', ['net', 'optimizers'])
@pytest.mark.parametrize('backward', ['fused', 'per_loss'])
def test_n_ranks_accumulating_a_micro_batches_equal_one_process_with_the_global_batch(
        grad_sync, backward):
    x, y = accumulation_data()
    rows = rows_of(WORLD.rank)
    net = small_net(3, seed=WORLD.rank)  # rank 0's initial parameters must win
    upd = MultiHeadUpdater(SerialIterator(TupleDataset(x[rows], y[rows]), B, shuffle=False),
                           net, sgd_optimizers(net), loss_weights=[1.0, 0.5, 2.0],
                           backward=backward, comm=WORLD, grad_sync=grad_sync, accumulate=A)
    run(upd, ITERS)
    mine = params(net)
    digests = WORLD.allgather_obj(digest(mine))

    ref_net = small_net(3, seed=0)
    expected = reference_big_batch(x, y, ref_net, sgd_optimizers(ref_net), [1.0, 0.5, 2.0])
    assert len(set(digests)) == 1, 'ranks ended with different parameters'
    assert upd.iteration == ITERS
    for name, value in expected.items():
        np.testing.assert_allclose(mine[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


# -- synchronised BatchNorm -----------------------------------------------------------------
def bn_net(seed=0):
    np.random.seed(seed)
    net = MultiHeadNet(BatchNormCNN(channels=4, features=16),
                       [L.Linear(None, 10) for _ in range(2)])
    net.initialize(np.zeros((1, 1, 8, 16), dtype=np.float32))
    return net


def bn_state(net):
    state = params(net)
    for path, bn in batch_norm_links(net) + [(p, l) for p, l in net.namedlinks()
                                               if isinstance(l, SyncBatchNormalization)]:
        state[path + '/avg_mean'] = np.array(bn.avg_mean)
        state[path + '/avg_var'] = np.array(bn.avg_var)
    return state


def bn_run(sync):
    x, y = small_batch(2, WORLD.size * B * ITERS, seed=6)
    rows = np.concatenate([np.arange(j * WORLD.size * B + WORLD.rank * B,
                                     j * WORLD.size * B + (WORLD.rank + 1) * B)
                           for j in range(ITERS)])
    net = bn_net()
    opts = setup({name: O.MomentumSGD(lr=0.1) for name in ['base', 'head0', 'head1']}, net)
    replaced = sync_batch_norm(net, WORLD, opts) if sync and WORLD.size > 1 else 0
    upd = MultiHeadUpdater(SerialIterator(TupleDataset(x[rows], y[rows]), B, shuffle=False),
                           net, opts, comm=WORLD)
    run(upd, ITERS)
    return x, y, net, replaced


def reference_bn(x, y):
    net = bn_net()
    opts = setup({name: O.MomentumSGD(lr=0.1) for name in ['base', 'head0', 'head1']}, net)
    n = WORLD.size * B
    for j in range(ITERS):
        xb, yb = x[j * n:(j + 1) * n], y[j * n:(j + 1) * n]
        net.cleargrads()
        sum(F.softmax_cross_entropy(z, yb[:, i]) for i, z in enumerate(net(xb))).backward()
        for opt in opts.values():
            opt.update()
    return bn_state(net)


def test_sync_bn_on_n_ranks_with_batch_b_equals_one_process_with_batch_nb():
    x, y, net, replaced = bn_run(sync=True)
    _, _, unsynced, _ = bn_run(sync=False)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        test_logits = [z.array for z in net(x[:16])]
    mine, plain = bn_state(net), bn_state(unsynced)

    expected = reference_bn(x, y)
    assert replaced == (2 if WORLD.size > 1 else 0)
    assert set(mine) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(mine[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    ref = bn_net()
    load_state(ref, expected)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for got, want in zip(test_logits, [z.array for z in ref(x[:16])]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if WORLD.size > 1:  # without it each rank normalises with its own batch: not the same
        assert not np.allclose(plain['/base/bn1/avg_mean'], expected['/base/bn1/avg_mean'],
                               rtol=1e-4)


def load_state(net, state):
    """Puts a bn_state dict into ``net`` (parameters and running statistics)."""
    for name, p in net.namedparams():
        p.array[...] = state[name]
    for path, bn in batch_norm_links(net):
        bn.avg_mean[...] = state[path + '/avg_mean']
        bn.avg_var[...] = state[path + '/avg_var']


def test_sync_bn_replaces_links_in_chains_chain_lists_and_sequentials_keeping_their_state():
    comm = real_communicator()
    inner = chainer.Sequential(L.Convolution2D(1, 3, 3, pad=1), L.BatchNormalization(3), F.relu)
    listed = chainer.ChainList(L.BatchNormalization(5), L.Linear(5, 5))

    class Base(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.seq = inner
                self.listed = listed
                self.bn = L.BatchNormalization(3)
                self.fc = L.Linear(None, 5)

        def forward(self, x):
            h = self.bn(self.seq(x))
            return self.listed[1](self.listed[0](self.fc(h)))

    np.random.seed(0)
    net = MultiHeadNet(Base(), [L.Linear(5, 10)])
    x = np.random.rand(6, 1, 4, 4).astype(np.float32)
    net.initialize(x)
    with chainer.using_config('train', True):  # move the running statistics off their start
        net.base(x)
    net.base.bn.gamma.array[...] = 1.5
    before = {path: (np.array(bn.avg_mean), np.array(bn.avg_var))
              for path, bn in batch_norm_links(net)}
    opts = setup({'base': O.SGD(lr=0.1), 'head0': O.SGD(lr=0.1)}, net)
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        expected = net.base(x).array

    count = sync_batch_norm(net, comm, opts)

    assert count == 3 and batch_norm_links(net) == []
    synced = {path: link for path, link in net.namedlinks()
              if isinstance(link, SyncBatchNormalization)}
    assert set(synced) == set(before) == {'/base/seq/1', '/base/listed/0', '/base/bn'}
    assert net.base.seq[1] is synced['/base/seq/1'] and net.base.listed[0].name == '0'
    for path, (mean, var) in before.items():
        np.testing.assert_array_equal(synced[path].avg_mean, mean)
        np.testing.assert_array_equal(synced[path].avg_var, var)
    assert (net.base.bn.gamma.array == 1.5).all()
    assert all(p.update_rule is not None for p in net.params())
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        np.testing.assert_allclose(net.base(x).array, expected, rtol=1e-6)


def test_sync_bn_refuses_normalisation_over_other_axes_and_a_bare_batch_norm_part():
    comm = real_communicator()
    for base, message in ((chainer.Sequential(L.BatchNormalization(axis=(0, 1))),
                           r'^base/0: sync_bn supports BatchNormalization over the batch and '
                           r'spatial axes only \(axis \(0, 2, ...\)\); this one has axis \(0, 1\)'),
                          (L.BatchNormalization(axis=(0, 2)),
                           r'^base is itself a BatchNormalization link')):
        net = MultiHeadNet(base, [L.Linear(None, 10)])
        net.initialize(np.zeros((2, 3, 4), dtype=np.float32))
        with pytest.raises(ConfigError, match=message):
            sync_batch_norm(net, comm, {'base': O.SGD().setup(net.base),
                                        'head0': O.SGD().setup(net.head0)})


# -- exchange dtype and epochs --------------------------------------------------------------
def test_float16_exchange_is_refused_on_the_naive_communicator():
    comm = real_communicator()
    with pytest.raises(ConfigError) as info:
        comm.set_grad_dtype('float16')
    assert str(info.value) == ("grad_dtype float16 needs ChainerMN's pure_nccl communicator; "
                               "this run uses NaiveCommunicator, which exchanges float32 only")
    assert info.value.collective
    comm.set_grad_dtype('float32')  # the default is accepted everywhere


def test_multi_node_optimizers_count_epochs():
    x, y = small_batch(3, 4 * B, seed=3)  # an epoch every 4 batches: every 2 steps of A=2
    net = small_net(3)
    upd = MultiHeadUpdater(SerialIterator(TupleDataset(x, y), B, shuffle=False), net,
                           sgd_optimizers(net), comm=WORLD, accumulate=2, frozen=[1])
    run(upd, 6)
    epochs = {name: opt.epoch for name, opt in upd.get_all_optimizers().items()}
    assert epochs == {'base': 3, 'head0': 3, 'head1': 3, 'head2': 3}
