"""MultiHeadEvaluator: exact per-head validation loss and accuracy over a whole split.

Chainer's Evaluator averages per-batch means, which over-weights a short last batch. This one
sums per-head correct counts, labelled-sample counts and loss x count over every batch, then
reduces the sums across ranks (``comm.allreduce_sum``) before dividing, so the numbers are the
exact global ones whatever the batch or shard sizes.

A sample that cannot be read on one rank (``SampleError``) ends that rank's pass; the same
all-reduce carries a "failed" count, so every rank then raises the same error instead of
waiting for the failed one. The result of the last evaluation a trainer triggered is kept
(``result_at``), so that a final evaluation at the same iteration is not run twice.
"""
import copy

import numpy as np

import chainer
from chainer.dataset import convert
from chainer.training import extensions

from distmulti import watchdog
from distmulti.comm import LocalComm
from distmulti.errors import SampleError
from distmulti.loader import raise_if_any_failed
from distmulti.metrics import Layout, batch_stats, summarize


class MultiHeadEvaluator(extensions.Evaluator):
    """Reports ``{name}/main/loss``, ``{name}/main/<head>/{loss,accuracy}`` and
    ``{name}/main/accuracy_all`` for a ``MultiHeadNet``, and the counts ``{name}/main/samples``
    (samples evaluated) and ``{name}/main/accuracy_all_samples`` (those with a label for at
    least one logits head: the ones ``accuracy_all`` is over)."""

    def __init__(self, iterator, net, loss_weights=None, converter=convert.concat_examples,
                 device=None, comm=None, name='validation'):
        super().__init__(iterator, net, converter=converter, device=device)
        self.name = name
        self.comm = comm or LocalComm()
        self.loss_weights = [1.0] * net.n_heads if loss_weights is None else list(loss_weights)
        self._last = None      # (iteration, result) of the last evaluation a trainer triggered

    def __call__(self, trainer=None):
        result = super().__call__(trainer)
        if trainer is not None:
            self._last = (trainer.updater.iteration, result)
        return result

    def result_at(self, iteration: int):
        """The result of the evaluation a trainer triggered at ``iteration``, else None."""
        if self._last is not None and self._last[0] == iteration:
            return self._last[1]
        return None

    def evaluate(self):
        net = self.get_target('main')
        # Each rank has updated its running statistics (BatchNorm) from its own batches: every
        # rank evaluates with rank 0's, the ones model.npz and the checkpoints keep, so the
        # numbers are those of the saved model and the same after a resume.
        self.comm.bcast_persistents(net)                                # collective
        iterator = self.get_iterator('main')
        if hasattr(iterator, 'reset'):
            iterator.reset()
            it = iterator
        else:
            it = copy.copy(iterator)
        # The per-head sums of metrics.Layout, then the number of samples evaluated, then the
        # count of ranks whose test shard could not be read.
        totals = np.zeros(Layout(net.n_heads).size + 2)
        error = None
        with chainer.using_config('train', False), chainer.no_backprop_mode():
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except SampleError as e:  # this rank stops; the all-reduce tells the others
                    error, totals[-1] = e, 1
                    if hasattr(it, 'stop'):
                        it.stop()
                    break
                x, t = convert._call_converter(self.converter, batch, self.device)
                totals[:-2] += batch_stats(net.head_outputs(x, t), t)
                totals[-2] += len(batch)
                watchdog.beat()  # progress, for the hang watchdog if one runs
        # The one collective of an evaluation: every rank reaches it once, whatever its shard.
        totals = self.comm.allreduce_sum(totals)
        raise_if_any_failed(self.comm, totals[-1], error)                  # collective
        prefix = f'{self.name}/main/'
        result = summarize(totals[:-2], self.loss_weights, prefix, net.head_names)
        result[f'{prefix}samples'] = float(totals[-2])
        # accuracy_all is over the samples with a label for at least one logits head.
        result[f'{prefix}accuracy_all_samples'] = float(totals[-3])
        return result
