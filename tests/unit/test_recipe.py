"""Gradient accumulation, Chainer's new_epoch contract, per-part regularisation hooks and the
config-to-recipe wiring, in one process (tests/mpi has the multi-rank versions)."""
import numpy as np
import pytest

import chainer
import chainer.functions as F
from chainer import optimizer_hooks
from chainer import optimizers as O

from distmulti import recipe
from distmulti.comm import LocalComm
from distmulti.config import TrainConfig
from distmulti.optim import add_regularization, create_optimizer
from tests.helpers import params, small_batch, small_net
from tests.unit.test_updater import make_updater


def grads(net):
    return {name: np.array(p.grad) for name, p in net.namedparams()}


def capture_grads(upd):
    """Runs one update with the optimizers' steps disabled; returns the gradients."""
    for opt in upd.get_all_optimizers().values():
        opt.update = lambda *a, **k: None
    observation = {}
    with chainer.Reporter().scope(observation):
        upd.update()
    return grads(upd.net), observation


def uneven_labels(y):
    y = y.copy()
    y[:8, 1] = -1        # head1: the whole first micro-batch ignored
    y[::3, 2] = -1       # head2: a third of all samples
    y[9:11, 0] = -1      # head0: two samples of the second micro-batch
    return y


@pytest.mark.parametrize('backward', ['fused', 'per_loss'])
def test_accumulating_n_micro_batches_equals_one_pass_over_the_n_times_larger_batch(backward):
    x, y = small_batch(3, 24)
    y = uneven_labels(y)
    big, big_obs = capture_grads(make_updater(small_net(3), x, y, batchsize=24,
                                              loss_weights=[1.0, 0.5, 2.0], backward=backward))
    acc, acc_obs = capture_grads(make_updater(small_net(3), x, y, batchsize=8, accumulate=3,
                                              loss_weights=[1.0, 0.5, 2.0], backward=backward))
    for name in big:
        np.testing.assert_allclose(acc[name], big[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for key, value in big_obs.items():  # metrics over all micro-batches, not the last one
        assert acc_obs[key] == pytest.approx(value, rel=1e-6), key


def test_a_plain_chainer_loss_over_the_big_batch_gives_the_same_gradients():
    x, y = small_batch(3, 24)
    y = uneven_labels(y)
    ref = small_net(3)
    ref.cleargrads()
    logits = ref(x)
    sum(F.softmax_cross_entropy(z, y[:, i], ignore_label=-1)
        for i, z in enumerate(logits)).backward()
    acc, _ = capture_grads(make_updater(small_net(3), x, y, batchsize=6, accumulate=4))
    for name, g in grads(ref).items():
        np.testing.assert_allclose(acc[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


def test_accumulation_steps_once_per_iteration_and_reads_n_batches():
    x, y = small_batch(3, 64)
    upd = make_updater(small_net(3), x, y, batchsize=8, accumulate=4,
                       optimizers={n: O.Adam() for n in ['base', 'head0', 'head1', 'head2']})
    with chainer.Reporter().scope({}):
        for _ in range(3):
            upd.update()
    assert upd.iteration == 3
    assert {opt.t for opt in upd.get_all_optimizers().values()} == {3}
    assert upd.get_iterator('main').current_position == (3 * 4 * 8) % 64


@pytest.mark.parametrize('accumulate', [1, 2])
def test_optimizers_count_epochs_as_standard_updater_does(accumulate):
    # 32 samples, batch 8: an epoch every 4 batches, i.e. every 4 / accumulate updates.
    x, y = small_batch(3, 32)
    upd = make_updater(small_net(3), x, y, batchsize=8, accumulate=accumulate)
    epochs = []
    with chainer.Reporter().scope({}):
        for _ in range(8 // accumulate):
            upd.update()
            epochs.append([opt.epoch for opt in upd.get_all_optimizers().values()])
    per_epoch = 4 // accumulate
    assert [e[0] for e in epochs] == [(i + 1) // per_epoch for i in range(8 // accumulate)]
    assert all(len(set(e)) == 1 for e in epochs)  # every part, frozen or not
    assert upd.epoch == 2 and upd.is_new_epoch


def test_an_epoch_boundary_inside_an_accumulated_step_is_seen():
    # 24 samples, batch 8, 2 micro-batches: the first epoch ends in the middle of update 2.
    x, y = small_batch(3, 24)
    upd = make_updater(small_net(3), x, y, batchsize=8, accumulate=2)
    flags = []
    with chainer.Reporter().scope({}):
        for _ in range(3):
            upd.update()
            flags.append(upd.is_new_epoch)
    assert flags == [False, True, True]
    assert upd.get_all_optimizers()['base'].epoch == 2


def one_sgd_step(optimizer_hook_args, lr=0.1):
    net = small_net(2)
    x, y = small_batch(2, 8)
    opts = {name: O.SGD(lr=lr) for name in ['base', 'head0', 'head1']}
    upd = make_updater(net, x, y, optimizers=opts)
    for name, (decay, clip) in optimizer_hook_args.items():
        add_regularization(opts[name], decay, clip)
    before = params(net)
    seen = {}
    for name, p in net.namedparams():
        original = p.update_rule.update

        def capture(param, original=original, name=name):
            seen[name] = np.array(param.grad)  # after the hooks, before the step
            return original(param)
        p.update_rule.update = capture
    ref, _ = capture_grads(make_updater(small_net(2), x, y))
    with chainer.Reporter().scope({}):
        upd.update()
    return before, params(net), ref, seen


def test_weight_decay_and_clipping_apply_to_their_part_only():
    before, after, raw, used = one_sgd_step({'head0': (0.5, None), 'base': (0.0, 1e-3)})
    for name in before:
        if name.startswith('/head0/'):  # WeightDecay: g + rate * w
            np.testing.assert_allclose(used[name], raw[name] + 0.5 * before[name], rtol=1e-5,
                                       atol=1e-7, err_msg=name)
        elif name.startswith('/head1/'):
            np.testing.assert_allclose(used[name], raw[name], rtol=1e-6, err_msg=name)
    base = [n for n in before if n.startswith('/base/')]
    raw_norm = np.sqrt(sum(float((raw[n] ** 2).sum()) for n in base))
    used_norm = np.sqrt(sum(float((used[n] ** 2).sum()) for n in base))
    assert raw_norm > 1e-2 and used_norm == pytest.approx(1e-3, rel=1e-4)
    for n in base:  # same direction, scaled
        np.testing.assert_allclose(used[n], raw[n] * (1e-3 / raw_norm), rtol=1e-4, atol=1e-9)


def test_config_puts_schedules_and_hooks_on_the_right_parts():
    config = TrainConfig(iterations=100, warmup=10, lr_decay='cosine', weight_decay=1e-4,
                         optimizers={'head1': {'lr_decay': 'step', 'lr_step': 30, 'lr': 0.5,
                                               'type': 'sgd', 'grad_clip': 2.0,
                                               'weight_decay': 0.0},
                                     'head0': {'type': 'adadelta'}}).validate()
    net = small_net(3)
    opts = {name: create_optimizer(config.optimizer_spec(name)['type'],
                                   config.optimizer_spec(name)['lr']).setup(getattr(net, name))
            for name in config.optimizer_names}
    schedules = recipe.apply(config, net, opts, LocalComm(), 100, lambda msg: None)
    assert set(schedules) == {'base', 'head1', 'head2'}  # AdaDelta has no rate
    assert schedules['base'].peak == config.lr and schedules['base'].decay == 'cosine'
    assert (schedules['head1'].peak, schedules['head1'].decay, schedules['head1'].step,
            schedules['head1'].warmup) == (0.5, 'step', 30, 10)

    def hooks(name):
        return {type(h).__name__: h for h in opts[name]._hookable._pre_update_hooks.values()}
    assert hooks('base')['WeightDecay'].rate == 1e-4 and 'GradientClipping' not in hooks('base')
    assert set(hooks('head1')) == {'GradientClipping'}
    assert hooks('head1')['GradientClipping'].threshold == 2.0
    assert isinstance(hooks('head2')['WeightDecay'], optimizer_hooks.WeightDecay)


def test_a_constant_unscaled_rate_gets_no_schedule_and_linear_scaling_scales_the_peak():
    net = small_net(2)
    opts = {n: O.Adam(alpha=1e-3).setup(getattr(net, n)) for n in ['base', 'head0', 'head1']}
    constant = TrainConfig(heads=2, iterations=10, warmup=0, lr_decay='constant').validate()
    assert recipe.apply(constant, net, opts, LocalComm(), 10, lambda m: None) == {}

    class FourRanks(LocalComm):  # apply() only reads the size (it communicates nothing)
        size = 4
    said = []
    scaled = TrainConfig(heads=2, iterations=10, warmup=0, lr_decay='constant', accumulate=2,
                         lr_scaling='linear').validate()
    schedules = recipe.apply(scaled, net, opts, FourRanks(), 10, said.append)
    assert [s.peak for s in schedules.values()] == pytest.approx([8e-3] * 3)
    assert said == ['lr_scaling linear: every rate x 8 (global batch 4 x 2 x 64 over the '
                    'reference batch 64)']


def test_total_iterations_count_accumulated_batches_per_epoch():
    assert recipe.total_iterations(TrainConfig(iterations=77), 1000) == 77
    assert recipe.total_iterations(TrainConfig(epoch=3, batchsize=64), 6000) == 282
    assert recipe.total_iterations(TrainConfig(epoch=3, batchsize=64, accumulate=2), 6000) == 141
