"""The converter contract: MultiHeadUpdater and MultiHeadEvaluator call a user's converter as
chainer's StandardUpdater and Evaluator do. An old-style ``converter(batch, device)`` gets an
int (-1 for the CPU, the GPU's id) or None; one made with ``@chainer.dataset.converter()``
gets the Device object. The expectation is what chainer itself passes, recorded alongside."""
import pytest

import chainer
from chainer import optimizers as O
from chainer.dataset import concat_examples
from chainer.datasets import TupleDataset
from chainer.iterators import SerialIterator
from chainer.training import StandardUpdater
from chainer.training.extensions import Evaluator

from distmulti.evaluator import MultiHeadEvaluator
from tests.helpers import small_batch, small_net
from tests.unit.test_updater import make_updater


def recording_converters():
    seen = {'old': [], 'new': []}

    def old_style(batch, device):
        seen['old'].append(device)
        # What old converters do with an int device: concat_examples accepts it too.
        return concat_examples(batch, device if device != -1 else None)

    @chainer.dataset.converter()
    def new_style(batch, device):
        seen['new'].append(device)
        return concat_examples(batch, device)

    return seen, {'old': old_style, 'new': new_style}


def described(devices):
    return [d if d is None or isinstance(d, int) else ('Device', str(d)) for d in devices]


@pytest.mark.parametrize('device', [None, '@numpy', -1])
@pytest.mark.parametrize('style', ['old', 'new'])
def test_the_updater_calls_the_converter_as_standard_updater_does(style, device):
    x, y = small_batch(3, 16)
    chainer_seen, chainer_conv = recording_converters()
    net = small_net(3)
    opt = O.SGD(lr=0.1)
    opt.setup(net)
    StandardUpdater(SerialIterator(TupleDataset(x, y), 8, shuffle=False), opt,
                    converter=chainer_conv[style], device=device,
                    loss_func=lambda xb, yb: chainer.functions.sum(net(xb)[0])).update()

    ours_seen, ours_conv = recording_converters()
    upd = make_updater(small_net(3), x, y, converter=ours_conv[style], device=device)
    with chainer.Reporter().scope({}):
        upd.update()
    assert described(ours_seen[style]) == described(chainer_seen[style])
    if style == 'old' and device is not None:
        assert ours_seen['old'] == [-1]  # an int, as old converters expect


@pytest.mark.parametrize('device', [None, '@numpy'])
@pytest.mark.parametrize('style', ['old', 'new'])
def test_the_evaluator_calls_the_converter_as_chainer_evaluator_does(style, device):
    x, y = small_batch(2, 20)
    chainer_seen, chainer_conv = recording_converters()
    net = small_net(2)
    evaluator = Evaluator(SerialIterator(TupleDataset(x, y), 10, repeat=False, shuffle=False),
                          _FirstHeadSum(net),
                          converter=chainer_conv[style], device=device)
    with chainer.Reporter().scope({}):
        evaluator.evaluate()

    ours_seen, ours_conv = recording_converters()
    MultiHeadEvaluator(SerialIterator(TupleDataset(x, y), 10, repeat=False, shuffle=False),
                       net, converter=ours_conv[style], device=device).evaluate()
    assert described(ours_seen[style]) == described(chainer_seen[style])
    assert len(ours_seen[style]) == 2


class _FirstHeadSum(chainer.Chain):
    """A target for chainer's own Evaluator: takes (x, t), returns a scalar."""

    def __init__(self, net):
        super().__init__()
        with self.init_scope():
            self.net = net

    def forward(self, x, t):
        return chainer.functions.sum(self.net(x)[0])
