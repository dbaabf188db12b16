"""The hand-written client that ``distmulti train`` is measured against (the seed's own style).

A base CNN (3x3 convolutions with 32 and 64 channels, a 2x2 max-pool after the first one, a
fully connected layer of 256), one linear classifier per head, one Adam each, one fused
backward of the summed losses, written as users write it without distmulti: a plain loop over
a shuffled SerialIterator, no evaluation while training, one test pass at the end.

    OMP_NUM_THREADS=1 python bench/client.py [--iterations 750] [--batchsize 64] [--json]

Prints the training wall time and the test accuracy of each head and of all heads together
(``--json``: one JSON object, for bench/default_vs_client.py).
"""
import argparse
import json
import time

import numpy as np

import distmulti  # noqa: F401  (first: chainer must import on numpy 2 as well)
import chainer
import chainer.functions as F
import chainer.links as L
from chainer.iterators import SerialIterator

from distmulti.data import digit_strips


class ClientBase(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 32, ksize=3, pad=1)
            self.conv2 = L.Convolution2D(32, 64, ksize=3, pad=1)
            self.fc = L.Linear(None, 256)

    def forward(self, x):
        h = F.max_pooling_2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(h))
        return F.relu(self.fc(h))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--heads', type=int, default=3)
    parser.add_argument('--iterations', type=int, default=750)
    parser.add_argument('--batchsize', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args(argv)

    started = time.perf_counter()
    train, test = digit_strips(args.heads, 6000, 1000, seed=args.seed)
    np.random.seed(args.seed)
    base = ClientBase()
    classifiers = [L.Linear(256, 10) for _ in range(args.heads)]
    optimizers = [chainer.optimizers.Adam() for _ in range(args.heads + 1)]
    for opt, link in zip(optimizers, [base] + classifiers):
        opt.setup(link)
    iterator = SerialIterator(train.dataset(), args.batchsize, shuffle=True)

    train_start = time.perf_counter()
    for _ in range(args.iterations):
        x, t = chainer.dataset.concat_examples(iterator.next())
        h = base(x)
        loss = sum(F.softmax_cross_entropy(clf(h), t[:, i]) for i, clf in enumerate(classifiers))
        base.cleargrads()
        for clf in classifiers:
            clf.cleargrads()
        loss.backward()
        for opt in optimizers:
            opt.update()
    train_wall = time.perf_counter() - train_start

    with chainer.using_config('train', False), chainer.no_backprop_mode():
        h = base(test.x)
        right = np.stack([clf(h).array.argmax(axis=1) == test.y[:, i]
                          for i, clf in enumerate(classifiers)], axis=1)
    result = {'heads': [float(v) for v in right.mean(axis=0)],
              'all': float(right.all(axis=1).mean()),
              'train_wall_s': train_wall, 'wall_s': time.perf_counter() - started}
    if args.json:
        print(json.dumps(result))
    else:
        print(f'client: {args.iterations} iterations in {train_wall:.1f} s (total '
              f'{result["wall_s"]:.1f} s); test accuracy '
              f'{" / ".join(f"{a:.3f}" for a in result["heads"])}, all heads {result["all"]:.3f}')


if __name__ == '__main__':
    main()
