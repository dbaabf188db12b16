"""Trains through the Python API; the last rank's head raises at its 5th training step.

Run under mpiexec, with a timeout, by tests/e2e/test_mpi.py, both as ``python script`` (distmulti's abort hook
must end the job) and as ``python -m mpi4py script``.
"""
import sys

import distmulti  # noqa: F401  (first: it makes chainer import on numpy 2)
import chainer

from distmulti import BaseCNN, MLPHead, MultiHeadNet, TrainConfig, train
from distmulti.comm import create_world


class Exploding(MLPHead):
    def __init__(self, rank_to_fail):
        super().__init__(10, hidden=8)
        self.rank_to_fail, self.calls = rank_to_fail, 0

    def forward(self, h):
        if chainer.config.train:
            self.calls += 1
            if self.calls == 5 and WORLD.rank == self.rank_to_fail:
                raise RuntimeError(f'injected failure on rank {WORLD.rank}')
        return super().forward(h)


WORLD = create_world('naive')
net = MultiHeadNet(BaseCNN(4, 16), [MLPHead(10, 8), Exploding(WORLD.size - 1)])
config = TrainConfig(out=sys.argv[1], iterations=10 ** 6, batchsize=8, train_size=400,
                     test_size=40, progress=False, plot=False)
train(config, net=net, comm=WORLD)
