"""Watchdog timing: fires after the timeout without heartbeats, never while paused."""
import os
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


def test_rank_0_heartbeat_file_is_fresh_while_healthy_and_goes_stale_when_stuck(tmp_path):
    path = tmp_path / 'hb'
    fired, logs = [], []
    dog = Watchdog(0.6, rank=0, on_fire=lambda: fired.append(1), log=logs.append,
                   exit_process=False, heartbeat_path=str(path)).start()
    for _ in range(6):
        time.sleep(0.1)
        dog.beat()
    assert time.time() - path.stat().st_mtime < 0.5
    time.sleep(1.5)  # stuck: no beats
    dog.stop()
    assert fired == [1]
    assert time.time() - path.stat().st_mtime > 0.8


def test_the_supervisor_kills_a_job_whose_heartbeat_went_stale(tmp_path):
    from distmulti.launcher import run_watched
    heartbeat = tmp_path / 'hb'
    heartbeat.write_text('')
    old = time.time() - 100
    os.utime(heartbeat, (old, old))
    logs = []
    start = time.monotonic()
    code = run_watched(['sleep', '60'], os.environ, str(heartbeat), 30.0, logs.append)
    assert code == 137 and time.monotonic() - start < 10
    assert 'no heartbeat from rank 0 for' in logs[0] and 'killing the job' in logs[0]
    # A fresh heartbeat leaves a job alone.
    heartbeat.write_text('')
    assert run_watched(['sleep', '2'], os.environ, str(heartbeat), 30.0, logs.append) == 0
