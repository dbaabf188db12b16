"""The GPU paths through Chainer's device API and ChainerMN's NCCL communicator (skipped
without a GPU)."""
import json
import os
import sys

import numpy as np
import pytest

import chainer
from chainer import optimizers as O

from distmulti.comm import MPIComm
from tests.helpers import MPIEXEC, mpiexec, params, run, run_cli, small_batch, small_net
from tests.unit.test_updater import make_updater

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize('backward', ['fused', 'per_loss'])
def test_updater_on_cupy_matches_the_cpu(backward):
    x, y = small_batch(3, 48)
    results = []
    for spec in ('@numpy', '@cupy:0'):
        device = chainer.get_device(spec)
        net = small_net(3)
        opts = {'base': O.Adam(alpha=1e-2), 'head0': O.MomentumSGD(lr=0.1),
                'head1': O.SGD(lr=0.1), 'head2': O.Adam()}
        upd = make_updater(net, x, y, optimizers=opts, backward=backward, device=device)
        with chainer.Reporter().scope({}):
            for _ in range(5):
                upd.update()
        net.to_device('@numpy')
        results.append(params(net))
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_train_on_one_gpu_end_to_end(tmp_path):
    proc = run_cli(['train', '--device', '@cupy:0', '--out', tmp_path, '--iterations', '60',
                    '--no-progress', '--no-plot', '--train-size', '960', '--test-size', '200'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / 'result.json').exists() and (tmp_path / 'model.npz').exists()


def _gpu_count():
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


def test_float16_exchange_on_pure_nccl_rounds_gradients_to_half_precision():
    # One rank suffices: the mean over one rank is the identity, so what comes back is what
    # the exchange carried. NCCL and a real PureNcclCommunicator are needed (no stand-in).
    import chainermn
    from mpi4py import MPI
    chainer.get_device('@cupy:0').use()
    net = small_net(3)
    net.to_device('@cupy:0')
    rng = np.random.RandomState(0)
    for p in net.params():
        p.grad = p.xp.asarray(rng.normal(size=p.shape).astype(np.float32) * 1e-2 + 1e-4)
    before = {name: chainer.backend.CpuDevice().send(p.grad).copy()
              for name, p in net.namedparams()}
    results = {}
    for dtype in ('float32', 'float16'):
        comm = MPIComm(chainermn.create_communicator('pure_nccl', MPI.COMM_WORLD))
        comm.set_grad_dtype(dtype)
        for name, p in net.namedparams():
            p.grad = p.xp.asarray(before[name])
        comm.mean_grads(net)
        results[dtype] = {name: chainer.backend.CpuDevice().send(p.grad)
                          for name, p in net.namedparams()}
    for name, g in before.items():
        np.testing.assert_array_equal(results['float32'][name], g)
        np.testing.assert_array_equal(results['float16'][name],
                                      g.astype(np.float16).astype(np.float32))
    assert any(not np.array_equal(results['float16'][n], g) for n, g in before.items())


def test_two_ranks_train_with_float16_exchange(tmp_path):
    if _gpu_count() < 2 or not os.access(MPIEXEC, os.X_OK):
        pytest.skip('needs 2 GPUs (NCCL refuses two ranks on one GPU) and mpiexec')
    code, out, _ = run(mpiexec('-n', 2, sys.executable, '-m', 'mpi4py', '-m', 'distmulti',
                               'train', '--device', '@cupy:0', '--grad-dtype', 'float16',
                               '--out', tmp_path, '--iterations', 40, '--no-progress',
                               '--no-plot', '--train-size', 960, '--test-size', 200),
                       timeout=600)
    assert code == 0, out[-3000:]
    assert 'MPI: 2 ranks, pure_nccl communicator' in out
    result = json.loads((tmp_path / 'result.json').read_text())
    assert result['world_size'] == 2 and result['config']['grad_dtype'] == 'float16'
