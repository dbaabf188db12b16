"""Trains with a watchdog of 1 s while iterations take 0.5 s and one evaluation takes ~3 s
(0.3 s per batch, 10 batches): the watchdog must not fire. Exits 0 on success."""
import sys
import time

import distmulti  # noqa: F401  (first: it makes chainer import on numpy 2)
import chainer

from distmulti import BaseCNN, MLPHead, MultiHeadNet, TrainConfig, train


class Slow(MLPHead):
    def forward(self, h):
        time.sleep(0.5 if chainer.config.train else 0.3)
        return super().forward(h)


net = MultiHeadNet(BaseCNN(4, 16), [MLPHead(10, 8), Slow(10, 8)])
config = TrainConfig(out=sys.argv[1], iterations=4, batchsize=10, train_size=40, test_size=10,
                     progress=False, plot=False, eval_interval=2, checkpoint_interval=1,
                     hang_timeout=1.0,
                     eval_batchsize=1)  # an evaluation is 10 heartbeats of 0.3 s each
train(config, net=net)
