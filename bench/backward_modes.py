"""Iteration time of the seed-style per-head backward against one fused backward.

For K = 1, 2, 4, 8 heads on the embedded K-digit strips (BaseCNN and MLP heads, the default
network when the table in docs/benchmarks.md was measured; CPU), both modes run side by side
in one process, interleaved in rounds so machine noise hits both alike; each cell is the
median over rounds of the mean iteration time in a round.

    python bench/backward_modes.py [--batchsize 64] [--rounds 15] [--iters 10]
"""
import argparse
import statistics
import time

import numpy as np

import chainer
from chainer import optimizers as O
from chainer.iterators import SerialIterator

from distmulti.data import digit_strips
from distmulti.models import BaseCNN, MLPHead, MultiHeadNet
from distmulti.updater import MultiHeadUpdater


def make_updater(k, mode, batchsize):
    np.random.seed(0)
    net = MultiHeadNet(BaseCNN(), [MLPHead(10) for _ in range(k)])  # as measured
    train, _ = digit_strips(k, batchsize * 4, 1, seed=0)
    net.initialize(train.x[:1])
    optimizers = {}
    for name in ['base'] + net.head_names:
        optimizers[name] = O.MomentumSGD(lr=0.01)
        optimizers[name].setup(getattr(net, name))
    it = SerialIterator(train.dataset(), batchsize, shuffle=False)
    return MultiHeadUpdater(it, net, optimizers, backward=mode)


def time_round(updater, iters):
    start = time.perf_counter()
    for _ in range(iters):
        updater.update()
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batchsize', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--heads', default='1,2,4,8')
    args = parser.parse_args(argv)
    reporter = chainer.Reporter()
    rows = []
    for k in [int(v) for v in args.heads.split(',')]:
        updaters = {mode: make_updater(k, mode, args.batchsize) for mode in ('per_loss', 'fused')}
        times = {mode: [] for mode in updaters}
        with reporter.scope({}):
            for upd in updaters.values():
                time_round(upd, 2)  # warm-up
            for _ in range(args.rounds):
                for mode, upd in updaters.items():
                    times[mode].append(time_round(upd, args.iters))
        per_loss, fused = (statistics.median(times[m]) * 1e3 for m in ('per_loss', 'fused'))
        rows.append((k, per_loss, fused, per_loss / fused))
    print(f'batch {args.batchsize}, input 1x8x(8K), median of {args.rounds} rounds of '
          f'{args.iters} iterations (ms per iteration: forward + backward + update)')
    print('| heads K | per_loss (seed) ms | fused ms | per_loss / fused |')
    print('|---:|---:|---:|---:|')
    for k, per_loss, fused, ratio in rows:
        print(f'| {k} | {per_loss:.1f} | {fused:.1f} | {ratio:.2f}x |')


if __name__ == '__main__':
    main()
