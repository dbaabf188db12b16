"""MultiHeadUpdater: gradients, per-part optimizers, freezing, reporting, serialization."""
import copy

import numpy as np
import pytest

import chainer
import chainer.functions as F
from chainer import optimizers as O
from chainer.datasets import TupleDataset
from chainer.iterators import SerialIterator

from distmulti.checkpoint import load_npz, save_npz
from distmulti.updater import MultiHeadUpdater
from tests.helpers import params, small_batch, small_net


def make_updater(net, x, y, optimizers=None, batchsize=8, **kwargs):
    if optimizers is None:
        optimizers = {name: O.SGD(lr=0.1) for name in ['base'] + net.head_names}
    for name, opt in optimizers.items():
        opt.setup(getattr(net, name))
    it = SerialIterator(TupleDataset(x, y), batchsize, shuffle=False)
    return MultiHeadUpdater(it, net, optimizers, **kwargs)


def grads_after_one_backward(mode, weights=None):
    net = small_net(3)
    x, y = small_batch(3, 8)
    upd = make_updater(net, x, y, loss_weights=weights, backward=mode)
    # Capture gradients: run everything update_core does, except the update.
    for opt in upd.get_all_optimizers().values():
        opt.update = lambda *a, **k: None
    upd.update()
    return {name: np.array(p.grad) for name, p in net.namedparams()}


@pytest.mark.parametrize('weights', [None, [1.0, 0.5, 2.0]])
def test_fused_and_per_loss_give_the_same_gradients(weights):
    fused = grads_after_one_backward('fused', weights)
    per_loss = grads_after_one_backward('per_loss', weights)
    assert set(fused) == set(per_loss)
    for name in fused:
        np.testing.assert_allclose(per_loss[name], fused[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    # The base gets gradient from every head: not zero, and equal to the sum of heads' parts.
    assert np.abs(fused['/base/conv1/W']).sum() > 0


def test_fused_gradients_equal_a_hand_computed_sum_of_losses():
    net = small_net(2)
    x, y = small_batch(2, 8)
    ref = copy.deepcopy(net)
    ref.cleargrads()
    h = ref.base(x)
    loss = sum(w * F.softmax_cross_entropy(head(h), y[:, i])
               for i, (w, head) in enumerate(zip([0.3, 1.7], [ref.head0, ref.head1])))
    loss.backward()
    upd = make_updater(net, x, y, loss_weights=[0.3, 1.7])
    for opt in upd.get_all_optimizers().values():
        opt.update = lambda *a, **k: None
    upd.update()
    for (name, p), (_, q) in zip(sorted(net.namedparams()), sorted(ref.namedparams())):
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7, err_msg=name)


def test_fused_and_per_loss_give_the_same_parameters_after_several_steps():
    x, y = small_batch(3, 48)
    results = []
    for mode in ('fused', 'per_loss'):
        net = small_net(3)
        upd = make_updater(net, x, y, backward=mode,
                           optimizers={'base': O.Adam(alpha=1e-2), 'head0': O.SGD(lr=0.1),
                                       'head1': O.MomentumSGD(lr=0.05),
                                       'head2': O.RMSprop(lr=1e-3)})
        for _ in range(6):
            upd.update()
        results.append(params(net))
    for name in results[0]:
        np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_each_optimizer_updates_its_own_part_by_its_own_rule():
    net = small_net(2)
    x, y = small_batch(2, 8)
    before = params(net)
    ref = copy.deepcopy(net)
    ref.cleargrads()
    logits = ref(x)
    sum(F.softmax_cross_entropy(z, y[:, i]) for i, z in enumerate(logits)).backward()
    grads = {name: np.array(p.grad) for name, p in ref.namedparams()}
    alpha, beta1, beta2, eps = 1e-3, 0.9, 0.999, 1e-8
    upd = make_updater(net, x, y, optimizers={
        'base': O.Adam(alpha=alpha), 'head0': O.MomentumSGD(lr=0.05, momentum=0.9),
        'head1': O.SGD(lr=0.2)})
    upd.update()
    after = params(net)
    for name, g in grads.items():
        if name.startswith('/base/'):
            # First Adam step: m = (1-b1) g, v = (1-b2) g^2, lr_t = alpha sqrt(1-b2)/(1-b1).
            m, v = (1 - beta1) * g, (1 - beta2) * g * g
            expected = before[name] - alpha * np.sqrt(1 - beta2) / (1 - beta1) * m / (
                np.sqrt(v) + eps)
        elif name.startswith('/head0/'):
            expected = before[name] - 0.05 * g  # momentum buffer starts at zero
        else:
            expected = before[name] - 0.2 * g
        np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-7, err_msg=name)
        assert not np.array_equal(after[name], before[name]), name
    opts = upd.get_all_optimizers()
    assert type(opts['base']) is O.Adam and opts['base'].target is net.base
    assert opts['head1'].target is net.head1


def test_a_frozen_head_stays_bitwise_unchanged_while_the_rest_trains():
    net = small_net(3)
    x, y = small_batch(3, 32)
    before = params(net)
    upd = make_updater(net, x, y, optimizers={n: O.Adam() for n in ['base'] + net.head_names},
                       frozen=[1])
    for _ in range(4):
        upd.update()
    after = params(net)
    for name in before:
        if name.startswith('/head1/'):
            assert after[name].tobytes() == before[name].tobytes(), name
        else:
            assert not np.array_equal(after[name], before[name]), name


def test_reports_total_per_head_and_all_heads_metrics():
    net = small_net(2)
    x, y = small_batch(2, 8)
    y[:4, 1] = -1  # head1 ignores half the batch
    with chainer.no_backprop_mode():
        pred = [p.array.argmax(axis=1) for p in copy.deepcopy(net)(x)]
    upd = make_updater(net, x, y, loss_weights=[1.0, 0.5])
    observation = {}
    with chainer.Reporter().scope(observation):
        upd.update()
    np.testing.assert_allclose(
        observation['main/loss'],
        observation['main/head0/loss'] + 0.5 * observation['main/head1/loss'], rtol=1e-6)
    right0, right1 = pred[0] == y[:, 0], pred[1] == y[:, 1]
    assert observation['main/head0/accuracy'] == pytest.approx(right0.mean())
    assert observation['main/head1/accuracy'] == pytest.approx(right1[4:].mean())
    every = right0 & (right1 | (y[:, 1] == -1))
    assert observation['main/accuracy_all'] == pytest.approx(every.mean())


def test_a_head_whose_whole_batch_is_ignored_gets_zero_loss_and_no_nan():
    net = small_net(2)
    x, y = small_batch(2, 8)
    y[:, 0] = -1
    before = params(net)
    upd = make_updater(net, x, y)
    observation = {}
    with chainer.Reporter().scope(observation):
        upd.update()
    assert observation['main/head0/loss'] == 0.0
    assert 'main/head0/accuracy' not in observation  # undefined, not reported as 0
    for name, value in params(net).items():
        assert np.isfinite(value).all(), name
        if name.startswith('/head0/'):
            assert np.array_equal(value, before[name]), name  # SGD with zero gradient


def test_updater_rejects_optimizers_that_do_not_match_the_network():
    net = small_net(2)
    x, y = small_batch(2, 8)
    with pytest.raises(ValueError, match='exactly the names base, head0, head1'):
        make_updater(net, x, y, optimizers={'base': O.SGD(), 'head0': O.SGD()})
    opts = {n: O.SGD() for n in ['base', 'head0', 'head1']}
    opts['base'].setup(net.head0)
    opts['head0'].setup(net.head0)
    opts['head1'].setup(net.head1)
    it = SerialIterator(TupleDataset(x, y), 4)
    with pytest.raises(ValueError, match="optimizer 'base' must be set up on net.base"):
        MultiHeadUpdater(it, net, opts)


def test_serialize_and_resume_continue_exactly(tmp_path):
    x, y = small_batch(3, 40)

    def fresh():
        net = small_net(3)
        return net, make_updater(net, x, y, batchsize=8, optimizers={
            'base': O.Adam(alpha=1e-2), 'head0': O.MomentumSGD(lr=0.1),
            'head1': O.Adam(alpha=2e-3), 'head2': O.SGD(lr=0.1)})

    net_a, upd_a = fresh()
    for _ in range(8):
        upd_a.update()

    net_b, upd_b = fresh()
    for _ in range(3):
        upd_b.update()
    path = str(tmp_path / 'updater.npz')
    save_npz(path, upd_b)
    with np.load(path) as npz:
        names = set(npz.files)
    assert 'optimizer:base/t' in names and 'optimizer:head1/l1/W/m' in names
    assert 'optimizer:head0/l2/b/v' in names  # MomentumSGD's velocity

    net_c, upd_c = fresh()
    load_npz(path, upd_c)
    assert upd_c.iteration == 3
    for _ in range(5):
        upd_c.update()
    for name, value in params(net_a).items():
        assert value.tobytes() == params(net_c)[name].tobytes(), name
