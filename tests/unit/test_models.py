"""MultiHeadNet: named heads, heads that compute their own loss, custom loss functions."""
import copy

import numpy as np
import pytest

import chainer
import chainer.functions as F
import chainer.links as L

from distmulti.models import BaseCNN, LossHead, MultiHeadNet
from tests.helpers import small_batch


class OwnLoss(chainer.Chain):
    """A head that returns softmax cross-entropy itself (mean over labelled samples)."""

    def __init__(self, linear):
        super().__init__()
        with self.init_scope():
            self.linear = linear

    def forward(self, h, t):
        return F.softmax_cross_entropy(self.linear(h), t, ignore_label=-1)


def pair():
    np.random.seed(0)
    base, linear = BaseCNN(4, 16), L.Linear(16, 10)
    plain = MultiHeadNet(base, {'a': L.Linear(16, 10), 'b': linear})
    plain.initialize(small_batch(2, 1)[0])  # lazily sized layers get values before copying
    own = MultiHeadNet(copy.deepcopy(base), {'a': copy.deepcopy(plain.a),
                                             'b': LossHead(OwnLoss(copy.deepcopy(linear)))})
    return plain, own


def test_a_loss_head_gives_the_same_loss_sums_and_gradients_as_a_logits_head():
    plain, own = pair()
    x, y = small_batch(2, 12)
    y[::3, 1] = -1
    sums = []
    for net in (plain, own):
        net.cleargrads()
        outs = net.head_outputs(x, y)
        sum(o.loss_sum for o in outs).backward()
        sums.append([float(o.loss_sum.array) for o in outs])
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-6)
    np.testing.assert_allclose(plain.b.W.grad, own.b.link.linear.W.grad, rtol=1e-5)
    np.testing.assert_allclose(plain.base.conv1.W.grad, own.base.conv1.W.grad, rtol=1e-5)
    assert own.has_logits == [True, False]
    assert own(x)[1] is None and own.initialize(x[:1]) == [10, None]


def test_named_heads_and_their_parameter_keys():
    _, own = pair()
    assert own.head_names == ['a', 'b']
    names = {name for name, _ in own.namedparams()}
    assert '/a/W' in names and '/b/link/linear/W' in names


def test_a_custom_loss_function_returning_a_mean_is_turned_into_a_sum():
    x, y = small_batch(1, 8)
    y[2, 0] = -1
    np.random.seed(0)
    base, head = BaseCNN(4, 16), L.Linear(16, 10)
    default = MultiHeadNet(base, [head])
    default.initialize(x[:1])
    mean_net = MultiHeadNet(copy.deepcopy(base), [copy.deepcopy(head)], loss_funcs=[
        lambda z, t: F.softmax_cross_entropy(z, t, ignore_label=-1)])
    a = float(mean_net.head_outputs(x, y)[0].loss_sum.array)
    b = float(default.head_outputs(x, y)[0].loss_sum.array)
    assert a == pytest.approx(b, rel=1e-6) and a > 0


@pytest.mark.parametrize('heads,error', [
    ({'base': L.Linear(1, 2)}, "head name 'base' is not allowed"),
    ({'1st': L.Linear(1, 2)}, "head name '1st' is not allowed"),
    ([], 'needs at least one head'),
    ([lambda h: h], 'must be a chainer.Link'),
])
def test_bad_heads_are_rejected(heads, error):
    with pytest.raises((ValueError, TypeError), match=error):
        MultiHeadNet(BaseCNN(), heads)
