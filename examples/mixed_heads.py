"""Heads of different kinds and weights on one base: a 10-way "which digit" head and a 2-way
"is it even" head, on single embedded digits, the second weighted 0.5 and trained with its
own optimizer.

    python examples/mixed_heads.py [OUT] [ITERATIONS]
    mpiexec -n 2 python -m mpi4py examples/mixed_heads.py
"""
import sys

import distmulti  # first: it makes chainer import on numpy 2
import chainer
import chainer.links as L
import numpy as np
from chainer.datasets import TupleDataset

from distmulti.data import digit_strips

train_digits, test_digits = digit_strips(1, 4000, 600, seed=0)  # one 8x8 digit per sample


def with_parity(split):
    digit = split.y[:, 0]
    return TupleDataset(split.x, np.stack([digit, digit % 2 == 0], axis=1).astype(np.int32))


net = distmulti.MultiHeadNet(distmulti.BaseCNN(), {
    'digit': distmulti.MLPHead(10),      # 10 classes
    'even': L.Linear(None, 2),           # 2 classes: odd, even
})
config = distmulti.TrainConfig(
    out=sys.argv[1] if len(sys.argv) > 1 else 'result/mixed_heads',
    iterations=int(sys.argv[2]) if len(sys.argv) > 2 else 500, plot=False,
    loss_weights=[1.0, 0.5])
distmulti.train(config, net=net, train_data=with_parity(train_digits),
                test_data=with_parity(test_digits),
                optimizers=lambda name, link: (chainer.optimizers.SGD(lr=0.1) if name == 'even'
                                               else chainer.optimizers.Adam()))
