"""Trains with a watchdog of 1 s while iterations take 0.5 s and each evaluation takes ~3 s
in 10 batches of one sample (0.3 s each): the watchdog must not fire, which it only does not
because the evaluator beats after every batch. Exits 0 on success, 1 if an evaluation ran in
fewer batches (then the test would prove nothing)."""
import sys
import time

import distmulti  # noqa: F401  (first: it makes chainer import on numpy 2)
import chainer

from distmulti import BaseCNN, MLPHead, MultiHeadNet, TrainConfig, train

BATCHES = []  # the size of every test-mode batch the slow head saw


class Slow(MLPHead):
    def forward(self, h):
        if not chainer.config.train:
            BATCHES.append(len(h))
        time.sleep(0.5 if chainer.config.train else 0.3)
        return super().forward(h)


net = MultiHeadNet(BaseCNN(4, 16), [MLPHead(10, 8), Slow(10, 8)])
config = TrainConfig(out=sys.argv[1], iterations=4, batchsize=1, train_size=40, test_size=10,
                     progress=False, plot=False, eval_interval=2, checkpoint_interval=1,
                     hang_timeout=1.0,
                     eval_batchsize=1)  # an evaluation is 10 heartbeats of 0.3 s each
train(config, net=net)
# Evaluations at iterations 2 and 4 (the one at 4 is also the final one), plus the one-sample
# initialisation.
if len(BATCHES) < 2 * 10 or set(BATCHES) != {1}:
    print(f'slow_but_healthy: the evaluations ran in batches {BATCHES}, expected 10 batches of '
          f'one sample each', file=sys.stderr)
    sys.exit(1)
