"""RunStats: seconds to the first iteration and samples/s from an injected clock; peak memory
from /proc."""
import types

import numpy as np
import pytest

from distmulti.comm import LocalComm
from distmulti.runstats import RunStats, peak_rss_mb, process_age_s


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def trainer_at(iteration):
    return types.SimpleNamespace(updater=types.SimpleNamespace(iteration=iteration))


def test_first_iteration_and_samples_per_second_come_from_the_clock():
    clock = Clock(100.0)
    stats = RunStats(clock)
    assert stats.samples_per_s(64) is None  # nothing ran yet
    clock.now = 104.5
    stats(trainer_at(1))
    assert stats.samples_per_s(64) is None  # one iteration: no rate yet
    for i in range(2, 12):
        clock.now += 0.5 if i != 6 else 3.0  # one slow iteration (an evaluation, a busy CPU)
        stats(trainer_at(i))
    assert stats.samples_per_s(64) == 10 * 64 / 7.5
    assert stats.median_iteration_s() == 0.5
    mine = stats.rank_summary()
    assert mine['startup_s'] == 4.5 + (stats.age_at_start or 0.0)
    summary = stats.summary(LocalComm(), 64)
    (theirs,) = summary['ranks']
    assert theirs.pop('cpu_s') >= mine.pop('cpu_s') >= 0  # CPU time moves on
    assert theirs == mine and summary['median_iteration_s'] == 0.5
    assert summary['train_samples_per_s'] == pytest.approx(85.33, abs=0.01)


def current_rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def test_peak_memory_grows_with_what_this_process_touched():
    before = peak_rss_mb()
    headroom = max(0.0, before - current_rss_mb())  # the peak may be above what is in use
    block = np.ones(int(headroom + 64) << 20, np.uint8)  # every page written
    after = peak_rss_mb()
    assert after - before > 50 and block[-1] == 1
    assert peak_rss_mb(pid=2 ** 22 + 12345) == 0.0  # no such process
    age = process_age_s()
    assert age is None or 0 <= age < 24 * 3600
