"""The hang watchdog's decisions, driven by an injected clock (no sleeps): alone before the
ranks connect, then as rank 0 judging the others or as a rank judging rank 0."""
import os
import time

import pytest

from distmulti import watchdog as wd
from distmulti.watchdog import PeerState, Watchdog, verdict


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def make(timeout=4.0, rank=1, clock=None, **kw):
    fired, logs = [], []
    dog = Watchdog(timeout, rank=rank, on_fire=lambda: fired.append(True), log=logs.append,
                   exit_process=False, clock=clock or Clock(), **kw)
    dog.startup_done()
    return dog, fired, logs


def test_alone_it_fires_only_after_the_timeout_and_names_rank_and_iteration():
    clock = Clock()
    dog, fired, logs = make(clock=clock)
    dog.beat(7)
    clock.now += 3.9
    assert not dog.step(clock()) and fired == []
    clock.now += 0.2
    assert dog.step(clock()) and fired == [True]
    assert logs[0].startswith('rank 1: no progress for 4.1 s (last completed iteration 7)')
    assert 'ending the job (exit 3)' in logs[0]


def test_start_up_gets_its_allowance_then_the_timeout_applies():
    clock = Clock()
    dog = Watchdog(4.0, rank=1, on_fire=lambda: None, log=[].append, exit_process=False,
                   clock=clock)
    clock.now += wd.STARTUP_MIN_S - 1  # slow peers: still starting up
    assert not dog.step(clock())
    clock.now += 2
    assert dog.step(clock())
    dog = Watchdog(4.0, rank=1, on_fire=lambda: None, log=[].append, exit_process=False,
                   clock=clock)
    clock.now += 10
    dog.startup_done()
    clock.now += 4.5
    assert dog.step(clock())


def test_beats_keep_it_quiet():
    clock = Clock()
    dog, fired, _ = make(clock=clock)
    for i in range(20):
        clock.now += 1.0
        dog.beat(i)
        assert not dog.step(clock())
    assert fired == []


def test_busy_work_longer_than_the_timeout_counts_as_progress_and_restarts_the_clock():
    clock = Clock()
    dog, fired, _ = make(clock=clock)
    with dog.busy('writing a checkpoint'):
        clock.now += 60
        assert not dog.step(clock())
    clock.now += 3.0  # less than the timeout after the write ended
    assert not dog.step(clock())
    clock.now += 1.5
    assert dog.step(clock())


def test_module_level_beat_and_busy_reach_the_running_watchdog():
    clock = Clock()
    dog, _, _ = make(clock=clock, timeout=100)
    wd.beat()  # no watchdog running: nothing happens
    dog.start()
    try:
        clock.now += 50
        wd.beat(3)
        assert dog.idle(clock()) == 0 and dog._iteration == 3
        with wd.busy('saving'):
            clock.now += 500
            assert dog.idle(clock()) == 0
    finally:
        dog.stop()
    assert wd._active is None


def test_rank_0_names_a_peer_that_went_silent():
    peers = {1: PeerState(heard_at=100.0, idle=0.0, iteration=40),
             2: PeerState(heard_at=95.0, idle=0.0, iteration=38)}
    assert verdict(now=99.0, timeout=5, rank=0, own_idle=0, peers=peers) is None
    reason = verdict(now=100.5, timeout=5, rank=0, own_idle=0, peers=peers)
    assert reason.startswith('rank 2 sent no heartbeat for 5.5 s (last completed iteration 38)')


def test_rank_0_does_not_fire_while_any_rank_makes_progress():
    # Rank 0 has waited 30 s in a collective, but rank 1 (writing, say) reported no idling.
    peers = {1: PeerState(heard_at=100.0, idle=0.0, iteration=5)}
    assert verdict(now=100.5, timeout=5, rank=0, own_idle=30, peers=peers) is None


def test_rank_0_fires_when_no_rank_made_progress_a_deadlock():
    peers = {1: PeerState(heard_at=100.0, idle=4.0, iteration=5)}
    assert verdict(now=100.5, timeout=5, rank=0, own_idle=6, peers=peers) is None  # 4.5 s
    reason = verdict(now=101.5, timeout=5, rank=0, own_idle=7, peers=peers)
    assert reason.startswith('no rank made progress for 5.5 s')


def test_other_ranks_fire_only_when_rank_0_goes_silent():
    assert verdict(now=104.0, timeout=5, rank=3, own_idle=50, root_heard_at=100.0) is None
    reason = verdict(now=106.0, timeout=5, rank=3, own_idle=0, iteration=9,
                     root_heard_at=100.0)
    assert reason.startswith('rank 3: no heartbeat from rank 0 for 6.0 s (last completed '
                             'iteration 9)')


def test_rank_0_heartbeat_file_is_touched_while_healthy_and_not_when_it_fires(tmp_path):
    path = tmp_path / 'hb'
    clock = Clock()
    dog, fired, _ = make(clock=clock, rank=0, heartbeat_path=str(path))
    old = time.time() - 100
    assert not dog.step(clock())
    assert time.time() - path.stat().st_mtime < 5
    os.utime(path, (old, old))
    clock.now += 10
    assert dog.step(clock()) and fired
    assert path.stat().st_mtime == pytest.approx(old)


def test_a_watchdog_that_fires_ends_the_process_with_exit_3(tmp_path):
    import subprocess
    import sys
    script = ('import distmulti.watchdog as w, time\n'
              'w.Watchdog(0.3, rank=2, log=print).start().startup_done()\n'
              'time.sleep(30)\n')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert 'rank 2: no progress for' in proc.stdout
