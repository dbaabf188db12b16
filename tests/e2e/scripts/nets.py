"""Networks for the end-to-end tests, loaded with ``--model tests.e2e.scripts.nets:NAME``."""
import os
import time

import distmulti  # noqa: F401  (first: it makes chainer import on numpy 2)
import chainer
import numpy as np
import chainer.functions as F
import chainer.links as L

from distmulti import MLPHead


class HeavyBase(chainer.Chain):
    """A small CNN carrying a large persistent array (saved in every checkpoint and in
    model.npz, never trained or exchanged): its checkpoint has about 800 MB and takes
    seconds to write, while its iterations stay cheap."""

    def __init__(self, megabytes=800):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(None, 4, ksize=3, pad=1)
            self.fc = L.Linear(None, 16)
        self.add_persistent('ballast', np.zeros(megabytes * 2 ** 18, dtype=np.float32))

    def forward(self, x):
        return F.relu(self.fc(F.max_pooling_2d(F.relu(self.conv(x)), 2)))


def big():
    return HeavyBase(), [MLPHead(10, hidden=8) for _ in range(3)]


class SlowHead(MLPHead):
    """Sleeps DISTMULTI_TEST_SLOW_S seconds in every training forward (default 0)."""

    def forward(self, h):
        if chainer.config.train:
            time.sleep(float(os.environ.get('DISTMULTI_TEST_SLOW_S', '0')))
        return super().forward(h)


class SmallBase(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(None, 4, ksize=3, pad=1)
            self.fc = L.Linear(None, 16)

    def forward(self, x):
        return F.relu(self.fc(F.max_pooling_2d(F.relu(self.conv(x)), 2)))


def slow():
    return SmallBase(), [MLPHead(10, hidden=8), MLPHead(10, hidden=8), SlowHead(10, hidden=8)]
