"""The supervisor of `distmulti launch`: its restart rule (pure), and with real child
processes standing in for mpiexec: signal forwarding, the grace period, stale heartbeats, and
leftover processes. The whole path through mpiexec is in tests/e2e/test_signals.py."""
import os
import signal
import sys
import threading
import time

import pytest

from distmulti.launcher import (Supervisor, decide, kill_leftovers, restart_args,
                                supervise)
from distmulti.runfiles import EXIT_STOPPED, EXIT_USAGE


@pytest.mark.parametrize('code,done,stopped,attempt,expected', [
    (0, True, False, 1, 'done'),
    (1, True, False, 1, 'done'),           # completed, whatever mpiexec said
    (0, False, False, 1, 'restart'),        # Open MPI's 0 after a lost host
    (137, False, False, 1, 'restart'),
    (3, False, False, 2, 'restart'),        # the hang watchdog
    (137, False, False, 3, 'give_up'),      # budget spent (3 attempts)
    (EXIT_USAGE, False, False, 1, 'give_up'),
    (EXIT_STOPPED, False, True, 1, 'give_up'),
    (137, False, True, 1, 'give_up'),       # asked to stop, killed on the way: no restart
    (EXIT_STOPPED, False, False, 1, 'restart'),  # a rank was stopped by someone else
])
def test_restart_rule(code, done, stopped, attempt, expected):
    decision = decide(code, done, stopped, attempt, attempts=3)
    assert decision.action == expected
    if expected != 'done':
        assert decision.status == (code if code else 1)


def test_restart_arguments_always_resume_auto():
    assert restart_args(['--epoch', '2', '--resume', 'x.npz', '--out', 'o']) == [
        '--epoch', '2', '--out', 'o', '--resume', 'auto']
    assert restart_args(['--resume=x.npz']) == ['--resume', 'auto']


CHILD = r'''
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
print('ready', flush=True)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.01)
if sys.argv[1] == 'obey':
    sys.exit(75)
time.sleep(60)  # 'ignore': never stops by itself
'''


def _send_when_ready(proc_holder, signum, after=0.3, twice=False):
    def run():
        while proc_holder.proc is None:
            time.sleep(0.01)
        time.sleep(after)
        os.kill(os.getpid(), signum)
        if twice:
            time.sleep(0.8)
            os.kill(os.getpid(), signum)
    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_is_forwarded_as_sigusr1_and_the_job_is_waited_for(signum):
    logs = []
    sup = Supervisor(os.environ, logs.append, grace=30)
    previous = sup.install()
    try:
        _send_when_ready(sup, signum)
        code = sup.run([sys.executable, '-c', CHILD, 'obey'], 'run-a')
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    assert code == EXIT_STOPPED
    assert sup.stop_signal == signum
    assert f'received {signal.Signals(signum).name}: asking every rank to stop' in logs[0]


def test_a_job_that_does_not_stop_is_killed_after_the_grace_period():
    logs = []
    clock_offset = [0.0]
    sup = Supervisor(os.environ, logs.append, grace=1.0,
                     clock=lambda: time.monotonic() + clock_offset[0])
    previous = sup.install()
    try:
        _send_when_ready(sup, signal.SIGTERM)
        started = time.monotonic()
        code = sup.run([sys.executable, '-c', CHILD, 'ignore'], 'run-b')
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    assert code == 137 and time.monotonic() - started < 30
    assert any('did not stop within 1 s: killing it' in line for line in logs)


def test_a_second_signal_kills_at_once_but_the_same_delivery_twice_does_not():
    logs = []
    sup = Supervisor(os.environ, logs.append, grace=None)
    previous = sup.install()
    try:
        _send_when_ready(sup, signal.SIGTERM, twice=True)
        code = sup.run([sys.executable, '-c', CHILD, 'ignore'], 'run-c')
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    assert code == 137
    assert 'received SIGTERM again: killing the job now' in logs[-1]
    sup2 = Supervisor(os.environ, [].append, grace=None)
    sup2.stop_signal, sup2._stop_at = signal.SIGTERM, sup2.clock()
    sup2._on_signal(signal.SIGTERM, None)  # 0 s later: the group copy of the same signal
    assert sup2.stop_signal == signal.SIGTERM  # no kill attempted (no process), no error


def test_a_job_whose_heartbeat_went_stale_is_killed(tmp_path):
    heartbeat = tmp_path / 'hb'
    heartbeat.write_text('')
    old = time.time() - 100
    os.utime(heartbeat, (old, old))
    logs = []
    sup = Supervisor(os.environ, logs.append, grace=None, stale_after=30.0,
                     heartbeat=str(heartbeat))
    started = time.monotonic()
    assert sup.run(['sleep', '60'], 'run-d') == 137 and time.monotonic() - started < 10
    assert 'no heartbeat from rank 0 for' in logs[0] and 'killing the job' in logs[0]
    heartbeat.write_text('')  # a fresh heartbeat leaves a job alone
    assert Supervisor(os.environ, logs.append, None, 30.0, str(heartbeat)).run(
        ['sleep', '1'], 'run-e') == 0


def test_processes_of_the_run_that_outlive_mpiexec_are_killed():
    # A grandchild in its own session (as Open MPI starts ranks) survives its parent.
    script = ('import subprocess, sys\n'
              'subprocess.Popen(["sleep", "120"], start_new_session=True)\n')
    logs = []
    sup = Supervisor(os.environ, logs.append, grace=None)
    assert sup.run([sys.executable, '-c', script], 'run-leftover') == 0
    assert any('killed 1 leftover process(es) of this run on this host' in l for l in logs)
    assert kill_leftovers('run-leftover') == []


def test_supervise_does_not_restart_after_a_user_error(tmp_path):
    logs = []
    code = supervise(lambda args: [sys.executable, '-c', 'import sys; sys.exit(2)'], [],
                     os.environ, str(tmp_path), 1, max_restarts=3, log=logs.append,
                     restart_delay=0)
    assert code == EXIT_USAGE
    assert sum('launching 1 ranks' in line for line in logs) == 1
    assert 'restarting cannot help' in logs[-1]
