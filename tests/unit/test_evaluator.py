"""MultiHeadEvaluator: exact metrics over the whole split, whatever the batch size."""
import numpy as np
import pytest

import chainer
import chainer.functions as F
from chainer.datasets import TupleDataset
from chainer.iterators import SerialIterator

from distmulti.evaluator import MultiHeadEvaluator
from tests.helpers import small_batch, small_net


def reference(net, x, y):
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        logits = [v.array for v in net(x)]
    out = {}
    every = np.ones(len(x), bool)
    for i, z in enumerate(logits):
        valid = y[:, i] != -1
        right = z.argmax(axis=1) == y[:, i]
        out[f'head{i}/accuracy'] = right[valid].mean()
        loss = F.softmax_cross_entropy(z[valid], y[valid, i], reduce='no').array
        out[f'head{i}/loss'] = loss.mean()
        every &= right | ~valid
    out['accuracy_all'] = every.mean()
    return out


@pytest.mark.parametrize('batchsize', [7, 50, 1000])
def test_metrics_are_exact_with_an_uneven_last_batch(batchsize):
    net = small_net(2)
    x, y = small_batch(2, 50)
    y[::3, 1] = -1
    it = SerialIterator(TupleDataset(x, y), batchsize, repeat=False, shuffle=False)
    result = MultiHeadEvaluator(it, net, loss_weights=[1.0, 2.0]).evaluate()
    expected = reference(net, x, y)
    for key, value in expected.items():
        assert result[f'validation/main/{key}'] == pytest.approx(value, rel=1e-5), key
    assert result['validation/main/loss'] == pytest.approx(
        expected['head0/loss'] + 2 * expected['head1/loss'], rel=1e-5)
    assert result['validation/main/samples'] == 50
    # Evaluating twice gives the same numbers (the iterator is reset).
    assert MultiHeadEvaluator(it, net, loss_weights=[1.0, 2.0]).evaluate() == result


class MeanFeature(chainer.Chain):
    """A loss-only head: the mean of its features over the labelled samples."""

    def forward(self, h, t):
        keep = chainer.backend.get_array_module(t).asarray(t != -1)
        return F.sum(F.mean(h, axis=1) * keep) / max(int(keep.sum()), 1)


@pytest.mark.parametrize('batchsize', [3, 20])
def test_samples_counts_every_sample_evaluated_even_without_logits_heads(batchsize):
    from distmulti import LossHead, MultiHeadNet
    base = small_net(1).base
    net = MultiHeadNet(base, [LossHead(MeanFeature()), LossHead(MeanFeature())])
    x, y = small_batch(1, 20)
    t = np.stack([y[:, 0], y[:, 0]], axis=1)
    t[:5, 0] = -1
    it = SerialIterator(TupleDataset(x[:, :, :, :8], t), batchsize, repeat=False, shuffle=False)
    result = MultiHeadEvaluator(it, net).evaluate()
    assert result['validation/main/samples'] == 20
    assert result['validation/main/accuracy_all_samples'] == 0  # no logits head at all
    assert 'validation/main/accuracy_all' not in result


def test_accuracy_all_samples_counts_those_with_a_labelled_logits_head():
    net = small_net(2)
    x, y = small_batch(2, 30)
    y[:4] = -1          # no label at all: evaluated, but not in accuracy_all
    y[4:10, 0] = -1     # one label left: still in accuracy_all
    it = SerialIterator(TupleDataset(x, y), 7, repeat=False, shuffle=False)
    result = MultiHeadEvaluator(it, net).evaluate()
    assert result['validation/main/samples'] == 30
    assert result['validation/main/accuracy_all_samples'] == 26
