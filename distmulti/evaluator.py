"""MultiHeadEvaluator: exact per-head validation loss and accuracy over a whole split.

Chainer's Evaluator averages per-batch means, which over-weights a short last batch. This one
sums per-head correct counts, labelled-sample counts and loss x count over every batch, then
reduces the sums across ranks (``comm.allreduce_sum``) before dividing, so the numbers are the
exact global ones whatever the batch or shard sizes.
"""
import copy

import numpy as np

import chainer
from chainer import backend
from chainer.dataset import convert
from chainer.training import extensions

from distmulti.comm import LocalComm
from distmulti.metrics import accuracies, count_stats


class MultiHeadEvaluator(extensions.Evaluator):
    """Reports ``{name}/main/loss``, ``{name}/main/head{i}/{loss,accuracy}`` and
    ``{name}/main/accuracy_all`` for a ``MultiHeadNet``."""

    def __init__(self, iterator, net, loss_weights=None, converter=convert.concat_examples,
                 device=None, comm=None, name='validation'):
        super().__init__(iterator, net, converter=converter, device=device)
        self.name = name
        self.comm = comm or LocalComm()
        self.loss_weights = (np.ones(net.n_heads) if loss_weights is None
                             else np.asarray(loss_weights, dtype=np.float64))

    def evaluate(self):
        net = self.get_target('main')
        iterator = self.get_iterator('main')
        if hasattr(iterator, 'reset'):
            iterator.reset()
            it = iterator
        else:
            it = copy.copy(iterator)
        k = net.n_heads
        totals = np.zeros(3 * k + 2)  # count_stats layout, then loss x labelled per head
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            for batch in it:
                x, t = self.converter(batch, self.device)
                logits = net(x)
                losses = net.head_losses(logits, t)
                stats = count_stats(logits, t)
                xp = backend.get_array_module(t)
                loss_values = backend.CpuDevice().send(
                    xp.stack([loss.array for loss in losses])).astype(np.float64)
                totals[:2 * k + 2] += stats
                totals[2 * k + 2:] += loss_values * stats[k:2 * k]
        totals = self.comm.allreduce_sum(totals)
        stats, loss_sums = totals[:2 * k + 2], totals[2 * k + 2:]
        prefix = f'{self.name}/main/'
        head_loss = loss_sums / np.maximum(stats[k:2 * k], 1)
        result = {f'{prefix}loss': float(np.dot(head_loss, self.loss_weights))}
        for i in range(k):
            result[f'{prefix}head{i}/loss'] = float(head_loss[i])
        result.update(accuracies(stats, k, prefix))
        result[f'{prefix}samples'] = float(stats[-1])
        return result
