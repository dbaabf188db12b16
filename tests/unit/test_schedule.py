"""Learning-rate schedules, the linear scaling rule, and how the updater applies them."""
import math

import numpy as np
import pytest

import chainer
from chainer import optimizers as O

from distmulti.checkpoint import load_npz, save_npz
from distmulti.schedule import LRSchedule, RateObserver, linear_scale, rate_attribute
from tests.helpers import params, small_batch, small_net
from tests.unit.test_updater import make_updater


def rates(schedule, iterations):
    return [schedule.rate(i) for i in iterations]


def test_linear_warmup_reaches_the_peak_at_its_last_iteration():
    s = LRSchedule(peak=0.4, total=100, warmup=4)
    assert rates(s, [0, 1, 2, 3, 4, 99]) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_step_decay_multiplies_by_gamma_every_step_after_the_warmup():
    s = LRSchedule(peak=1.0, total=100, warmup=10, decay='step', step=20, gamma=0.5)
    assert rates(s, [9, 10, 29, 30, 49, 50, 70]) == pytest.approx(
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.125])


def test_exponential_decay_is_the_smooth_step_decay_and_stops_at_the_floor():
    s = LRSchedule(peak=1.0, total=1000, decay='exponential', step=10, gamma=0.1, floor=0.01)
    assert rates(s, [0, 5, 10, 15, 20]) == pytest.approx(
        [1.0, 0.1 ** 0.5, 0.1, 0.1 ** 1.5, 0.01])
    assert s.rate(500) == pytest.approx(0.01)  # never below floor x peak


def test_cosine_decay_runs_from_the_peak_to_the_floor_over_the_rest_of_the_run():
    s = LRSchedule(peak=2.0, total=110, warmup=10, decay='cosine', floor=0.1)
    low = 0.2
    assert s.rate(10) == pytest.approx(2.0)
    assert s.rate(60) == pytest.approx(low + (2.0 - low) * 0.5)  # half-way
    assert s.rate(85) == pytest.approx(low + (2.0 - low) * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert low < s.rate(109) < low + 1e-3  # the last update is just above the floor
    assert rates(s, range(10, 110)) == sorted(rates(s, range(10, 110)), reverse=True)


def test_step_decay_without_a_step_is_refused():
    with pytest.raises(ValueError, match='step decay needs step >= 1'):
        LRSchedule(peak=1.0, total=10, decay='step')


def test_linear_scaling_multiplies_by_global_over_reference_batch():
    assert linear_scale(4, 1, 64, None) == 4.0       # reference: one rank's batch
    assert linear_scale(4, 2, 64, None) == 8.0       # accumulation counts
    assert linear_scale(8, 1, 32, 256) == 1.0        # Goyal et al.: 0.1 per 256
    assert linear_scale(2, 1, 64, 32) == 4.0


def test_the_rate_attribute_is_alpha_for_adam_lr_for_sgd_and_none_for_adadelta():
    assert rate_attribute(O.Adam()) == 'alpha'
    assert rate_attribute(O.MomentumSGD()) == 'lr'
    assert rate_attribute(O.AdaDelta()) is None


def updater_with_schedules(schedules, n=48, batchsize=8):
    net = small_net(3)
    x, y = small_batch(3, n)
    opts = {'base': O.Adam(alpha=1e-2), 'head0': O.SGD(lr=0.1), 'head1': O.MomentumSGD(lr=0.1),
            'head2': O.AdaDelta()}
    return net, make_updater(net, x, y, optimizers=opts, batchsize=batchsize,
                             lr_schedules=schedules)


SCHEDULES = {'base': LRSchedule(peak=1e-2, total=8, warmup=3, decay='cosine'),
             'head0': LRSchedule(peak=0.1, total=8, decay='step', step=2, gamma=0.5)}


def test_the_updater_sets_each_scheduled_rate_before_each_step():
    net, upd = updater_with_schedules(SCHEDULES)
    opts = upd.get_all_optimizers()
    seen = []
    with chainer.Reporter().scope({}):
        for _ in range(8):
            upd.update()
            seen.append((opts['base'].alpha, opts['head0'].lr, opts['head1'].lr))
    assert [s[0] for s in seen] == rates(SCHEDULES['base'], range(8))
    assert [s[1] for s in seen] == rates(SCHEDULES['head0'], range(8))
    assert {s[2] for s in seen} == {0.1}  # no schedule: its own rate


def test_a_step_uses_the_scheduled_rate():
    schedule = {'head0': LRSchedule(peak=0.2, total=10, warmup=4)}  # first update: 0.05
    net, upd = updater_with_schedules(schedule)
    before = params(net)
    captured = {}
    original = net.head0.l2.W.update_rule.update

    def capture(param):
        captured['grad'] = np.array(param.grad)
        return original(param)
    net.head0.l2.W.update_rule.update = capture
    with chainer.Reporter().scope({}):
        upd.update()
    np.testing.assert_allclose(net.head0.l2.W.array,
                               before['/head0/l2/W'] - 0.05 * captured['grad'], rtol=1e-6)


def test_a_part_without_a_rate_cannot_be_scheduled():
    with pytest.raises(ValueError, match='AdaDelta has no learning rate to schedule'):
        updater_with_schedules({'head2': LRSchedule(peak=1.0, total=4)})


def test_rates_and_parameters_continue_exactly_after_resume(tmp_path):
    def rates_of(upd):
        opts = upd.get_all_optimizers()
        return (opts['base'].alpha, opts['head0'].lr)

    _, straight = updater_with_schedules(SCHEDULES)
    straight_rates = []
    with chainer.Reporter().scope({}):
        for _ in range(8):
            straight.update()
            straight_rates.append(rates_of(straight))

    _, first = updater_with_schedules(SCHEDULES)
    with chainer.Reporter().scope({}):
        for _ in range(3):
            first.update()
    path = str(tmp_path / 'updater.npz')
    save_npz(path, first)
    net, resumed = updater_with_schedules(SCHEDULES)
    load_npz(path, resumed)
    resumed_rates = []
    with chainer.Reporter().scope({}):
        for _ in range(5):
            resumed.update()
            resumed_rates.append(rates_of(resumed))
    assert resumed_rates == straight_rates[3:]
    for name, value in params(straight.net).items():
        assert value.tobytes() == params(net)[name].tobytes(), name


def test_rate_observer_writes_every_part_with_a_rate_into_the_observation():
    _, upd = updater_with_schedules(SCHEDULES)
    observer = RateObserver(upd.get_all_optimizers())
    assert observer.keys == ['lr/base', 'lr/head0', 'lr/head1']  # AdaDelta has none

    class Trainer:
        observation = {}
    with chainer.Reporter().scope({}):
        upd.update()
    observer(Trainer)
    assert Trainer.observation == {'lr/base': SCHEDULES['base'].rate(0),
                                   'lr/head0': 0.1, 'lr/head1': 0.1}
