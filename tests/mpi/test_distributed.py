"""Data-parallel correctness. Expectations come from comm.size, so these pass under plain
pytest (one process) and under ``mpiexec -n 2 python -m mpi4py -m pytest tests/mpi``
(tests/e2e/test_mpi.py runs that under a timeout). Every collective happens before any
assert."""
import hashlib
import os
import tempfile

import numpy as np
import pytest

import chainer
import chainer.functions as F
from chainer import optimizers as O
from chainer.datasets import SubDataset, TupleDataset
from chainer.iterators import SerialIterator

from distmulti.comm import create_world
from distmulti.config import TrainConfig
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.sampling import shard_bounds
from distmulti.training import train
from distmulti.updater import MultiHeadUpdater
from tests.helpers import params, small_batch, small_net

WORLD = create_world('naive')
B = 6          # local batch
ITERS = 4


def make_optimizers(net):
    # Adam on the base would amplify float rounding of near-zero gradients (its step is
    # about alpha * sign(g)); it is used on a head, where gradients are simpler.
    opts = {'base': O.MomentumSGD(lr=0.1), 'head0': O.MomentumSGD(lr=0.1),
            'head1': O.SGD(lr=0.2), 'head2': O.Adam(alpha=5e-3)}
    for name, opt in opts.items():
        opt.setup(getattr(net, name))
    return opts


def global_data(ignore):
    """ITERS global batches of size*B samples; rank r owns rows [r*B, (r+1)*B) of each."""
    x, y = small_batch(3, WORLD.size * B * ITERS, seed=4)
    if ignore:
        y[::3, 2] = -1                          # head2 ignores a third of all samples
        y[WORLD.size * B - B:WORLD.size * B, 1] = -1  # head1: the last rank's 1st batch
    return x, y


def shard(x, y, rank):
    rows = np.concatenate([np.arange(j * WORLD.size * B + rank * B, j * WORLD.size * B + (rank + 1) * B)
                           for j in range(ITERS)])
    return x[rows], y[rows]


def reference(x, y, weights):
    """One process, plain Chainer (no distmulti updater): the global batch, mean losses."""
    net = small_net(3, seed=0)
    opts = make_optimizers(net)
    n = WORLD.size * B
    for j in range(ITERS):
        xb, yb = x[j * n:(j + 1) * n], y[j * n:(j + 1) * n]
        net.cleargrads()
        logits = net(xb)
        loss = sum(w * F.softmax_cross_entropy(z, yb[:, i], ignore_label=-1)
                   for i, (w, z) in enumerate(zip(weights, logits)))
        loss.backward()
        for opt in opts.values():
            opt.update()
    return params(net)


def run(updater, n):
    with chainer.Reporter().scope({}):
        for _ in range(n):
            updater.update()


@pytest.mark.parametrize('grad_sync', ['net', 'optimizers'])
@pytest.mark.parametrize('backward', ['fused', 'per_loss'])
@pytest.mark.parametrize('ignore', [False, True])
def test_n_ranks_with_batch_b_equal_one_process_with_batch_nb(grad_sync, backward, ignore):
    x, y = global_data(ignore)
    xs, ys = shard(x, y, WORLD.rank)
    net = small_net(3, seed=WORLD.rank)  # different inits: rank 0's must win (broadcast)
    upd = MultiHeadUpdater(SerialIterator(TupleDataset(xs, ys), B, shuffle=False), net,
                           make_optimizers(net), loss_weights=[1.0, 0.5, 2.0],
                           backward=backward, comm=WORLD, grad_sync=grad_sync)
    run(upd, ITERS)
    mine = params(net)
    digests = WORLD.allgather_obj(hashlib.sha256(
        b''.join(v.tobytes() for _, v in sorted(mine.items()))).hexdigest())

    expected = reference(x, y, [1.0, 0.5, 2.0])
    assert len(set(digests)) == 1, 'ranks ended with different parameters'
    for name, value in expected.items():
        np.testing.assert_allclose(mine[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert not np.allclose(mine['/base/conv1/W'], params(small_net(3, seed=0))['/base/conv1/W'])


def test_a_head_with_no_label_on_one_rank_neither_deadlocks_nor_skews_gradients():
    x, y = global_data(False)
    xs, ys = shard(x, y, WORLD.rank)
    if WORLD.rank == WORLD.size - 1:
        ys = ys.copy()
        ys[:, 0] = -1            # this rank never has a head0 label
    net = small_net(3)
    upd = MultiHeadUpdater(SerialIterator(TupleDataset(xs, ys), B, shuffle=False), net,
                           make_optimizers(net), comm=WORLD, grad_sync='optimizers')
    run(upd, ITERS)
    mine = params(net)
    # The same labels seen by one process with the global batch.
    gy = y.copy()
    for j in range(ITERS):
        start = j * WORLD.size * B + (WORLD.size - 1) * B
        gy[start:start + B, 0] = -1
    for name, value in reference(x, gy, [1.0, 1.0, 1.0]).items():
        np.testing.assert_allclose(mine[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_evaluation_is_exact_over_unequal_shards():
    x, y = small_batch(2, 2 * WORLD.size * 25 + 1, seed=7)  # odd: shards differ in size
    y[::4, 1] = -1
    full = TupleDataset(x, y)
    begin, end = shard_bounds(len(full), WORLD.size, WORLD.rank)
    mine = SubDataset(full, begin, end)
    net = small_net(2)
    it = SerialIterator(mine, 8, repeat=False, shuffle=False)
    result = MultiHeadEvaluator(it, net, loss_weights=[1.0, 3.0], comm=WORLD).evaluate()
    sizes = WORLD.allgather_obj(len(mine))
    expected = MultiHeadEvaluator(SerialIterator(full, 1000, repeat=False, shuffle=False), net,
                                  loss_weights=[1.0, 3.0]).evaluate()
    assert sum(sizes) == len(full)
    if WORLD.size > 1:
        assert len(set(sizes)) > 1
    assert result['validation/main/samples'] == len(full)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-6), key


def test_train_leaves_identical_parameters_and_results_on_every_rank():
    out = WORLD.allgather_obj(tempfile.mkdtemp(prefix='distmulti-mpi-') if WORLD.is_root
                              else None)[0]
    config = TrainConfig(out=out, iterations=12, batchsize=8, train_size=200, test_size=50,
                         progress=False, plot=False, eval_interval=6, checkpoint_interval=6)
    result = train(config, comm=WORLD, log=lambda msg: None)
    net_digest = hashlib.sha256(
        open(os.path.join(out, 'model.npz'), 'rb').read()).hexdigest() if WORLD.is_root else None
    results = WORLD.allgather_obj(result['test'])
    assert all(r == results[0] for r in results)
    if WORLD.is_root:
        assert net_digest and os.path.exists(os.path.join(out, 'result.json'))
    assert result['world_size'] == WORLD.size
    assert result['global_batchsize'] == 8 * WORLD.size


def test_every_rank_evaluates_with_rank_0s_running_statistics():
    import chainer.links as L
    from distmulti.models import MultiHeadNet
    # A BatchNorm base whose running statistics differ on every rank, as after training on
    # each rank's own batches without --sync-bn.
    base = chainer.Sequential(L.Linear(8 * 24, 16), L.BatchNormalization(16))
    net = MultiHeadNet(base, [L.Linear(16, 10) for _ in range(3)])
    x, y = small_batch(3, n=12)
    net.initialize(x[:1])
    bn = base[1]
    bn.avg_mean[...] = WORLD.rank + 1.0
    bn.N = 10 + WORLD.rank
    it = SerialIterator(TupleDataset(x, y), 5, repeat=False, shuffle=False)
    MultiHeadEvaluator(it, net, comm=WORLD).evaluate()                   # collective
    assert np.all(bn.avg_mean == 1.0) and bn.N == 10
