"""Watchdog timing: fires after the timeout without heartbeats, never while paused."""
import time

from distmulti.watchdog import Watchdog


def make(timeout, fired, logs):
    return Watchdog(timeout, rank=1, on_fire=lambda: fired.append(time.monotonic()),
                    log=logs.append, exit_process=False)


def test_fires_once_after_the_timeout_and_names_rank_and_iteration():
    fired, logs = [], []
    dog = make(0.4, fired, logs).start()
    dog.beat(7)
    start = time.monotonic()
    time.sleep(1.2)
    dog.stop()
    assert len(fired) == 1 and 0.4 <= fired[0] - start <= 0.4 + 0.3
    assert 'rank 1: no training iteration completed in 0.4 s (last completed iteration 7)' \
        in logs[0]


def test_heartbeats_keep_it_quiet():
    fired, logs = [], []
    dog = make(0.4, fired, logs).start()
    for i in range(12):
        time.sleep(0.1)
        dog.beat(i)
    dog.stop()
    assert fired == []


def test_a_pause_longer_than_the_timeout_does_not_fire_and_restarts_the_clock():
    fired, logs = [], []
    dog = make(0.4, fired, logs).start()
    with dog.paused():
        time.sleep(1.0)
    time.sleep(0.2)  # less than the timeout after the pause ended
    dog.stop()
    assert fired == []
