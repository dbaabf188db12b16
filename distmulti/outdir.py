"""The output folder (``--out``): one run at a time, nothing half-written left, and one answer
to "did this run complete?".

* **Lock.** Rank 0 holds ``OUT/.distmulti-lock`` for the whole run: a JSON record of the run
  (job id, run id, host, pid, start time) on a file it keeps ``flock``-ed and touches every
  few seconds. A second run on the same folder stops at once with a message naming the one
  that holds it. A lock left by a dead process is taken over: on the same host when its
  ``flock`` is free, from another host when it has not been touched for ``LOCK_STALE_S``
  seconds, and always by a later attempt of the same job (``DISTMULTI_JOB_ID``, set by the
  supervisor, or Slurm's job id), since a restarted job must not wait for its own dead past.
* **Hygiene at start.** Temporary files of interrupted writes (``.tmp-*``) are removed, and
  checkpoints newer than the point the run starts from (all of them for a fresh start) belong
  to an abandoned branch: they are moved to ``OUT/abandoned/<time>/``, never deleted, so that
  ``--resume auto`` cannot silently continue them later and rotation never prefers them.
* **Status.** :func:`status` says whether a run completed: ``result.json`` is there and, when
  asked, was written by the given run id and number of ranks. ``distmulti launch``,
  ``distmulti status`` (used by the Slurm script and the Kubernetes launcher) all use it.
"""
import contextlib
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from typing import Callable, List, NamedTuple, Optional

from distmulti.checkpoint import checkpoint_paths, file_mode, list_checkpoints
from distmulti.errors import OutputError
from distmulti.runfiles import LOCK_FILE, RESULT_FILE, TMP_PREFIX

LOCK_REFRESH_S = 5.0
LOCK_STALE_S = 60.0
ABANDONED_DIR = 'abandoned'


def job_id(environ=os.environ) -> Optional[str]:
    """The id shared by every attempt of one job: DISTMULTI_JOB_ID, else Slurm's job id."""
    if environ.get('DISTMULTI_JOB_ID'):
        return environ['DISTMULTI_JOB_ID']
    if environ.get('SLURM_JOB_ID'):
        return f'slurm-{environ["SLURM_JOB_ID"]}'
    return None


def _boot_id() -> str:
    try:
        with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
            return f.read().strip()
    except OSError:
        return ''


def prepare(out: str) -> None:
    """Makes ``out`` (and its parents) or checks it; OutputError when it cannot be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f'--out {out} is an existing file, not a folder; give a folder '
                          f'path (it is created if missing)')
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f'--out {out}: cannot create the folder ({e.strerror}); choose a '
                          f'folder you can write to') from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f'--out {out}: the folder is not writable (read-only filesystem or '
                          f'permissions); choose a folder you can write to')


class OutputLock:
    """The lock of one run on its output folder (see the module docstring).

    Args:
        out: the output folder (must exist).
        run_id: this attempt's id; job: the job's id (shared by its attempts), or None.
        log: one-line messages (taking over a stale lock is said).
        clock: wall-clock seconds (tests inject their own).
    """

    def __init__(self, out: str, run_id: str, job: Optional[str],
                 log: Callable[[str], None], clock: Callable[[], float] = time.time):
        self.path = os.path.join(out, LOCK_FILE)
        self.record = {'run_id': run_id, 'job_id': job, 'host': socket.gethostname(),
                       'pid': os.getpid(), 'boot_id': _boot_id(), 'started_at': clock()}
        self._log = log
        self._clock = clock
        self._fd: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> 'OutputLock':
        """Takes the lock or raises OutputError naming the run that holds it."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode())
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            except OSError as e:
                raise OutputError(f'cannot create the lock {self.path} ({e.strerror}); the '
                                  f'output folder must be writable') from None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps(self.record, sort_keys=True).encode())
            os.fsync(fd)
            self._fd = fd
            self._thread = threading.Thread(target=self._refresh, name='distmulti-lock',
                                            daemon=True)
            self._thread.start()
            return self
        raise OutputError(f'could not take the lock {self.path}: other runs keep taking it')

    def _take_over_or_refuse(self) -> None:
        fd = _open_existing(self.path)
        if fd is None:
            return  # released meanwhile: try again
        try:
            # An exclusive flock held from here: a second process judging the same lock at
            # the same time sees it held and backs off while this one unlinks it.
            holder, why = _judge(self.path, fd, fcntl.LOCK_EX, self.record, self._clock)
            if why is None:
                raise OutputError(busy_message(os.path.dirname(self.path), holder))
            self._log(f'taking over the lock {self.path}: {why}')
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        finally:
            os.close(fd)

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Removes the lock if it is still this run's, and lets go of it."""
        self._stop.set()
        if self._fd is None:
            return
        holder = read_lock(os.path.dirname(self.path))
        if holder is not None and holder.get('run_id') == self.record['run_id']:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def read_lock(out: str) -> Optional[dict]:
    """The record in ``out``'s lock, {} when unreadable (being written), None when absent."""
    try:
        with open(os.path.join(out, LOCK_FILE), encoding='utf-8') as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def stale_reason(holder: Optional[dict], me: dict, age: float, flock_free: bool,
                 stale_after: float) -> Optional[str]:
    """Why a lock held by ``holder`` may be taken over by ``me``, or None (it is live).

    Args:
        holder: the lock's record ({} when unreadable, None when the lock is gone).
        me: this run's record (job_id, host, boot_id).
        age: seconds since the lock was last refreshed.
        flock_free: whether this process could ``flock`` the lock file: a live holder keeps
            it locked (across hosts too where the filesystem supports it).
        stale_after: seconds after which an unrefreshed lock of another host is stale.
    """
    if holder is None:
        return 'it is gone'
    if me.get('job_id') and holder.get('job_id') == me['job_id']:
        return (f'it is held by run {holder.get("run_id")}, an earlier attempt of this job '
                f'({me["job_id"]})')
    if not flock_free:
        return None
    same_machine = (holder.get('host') == me.get('host')
                    and holder.get('boot_id', '') == me.get('boot_id', ''))
    if same_machine:
        if not holder and age < LOCK_REFRESH_S:
            return None  # just created; its record is being written
        return f'its process {holder.get("pid")} on this host is gone'
    if age > stale_after:
        return (f'its holder (pid {holder.get("pid")} on {holder.get("host")}) has not '
                f'refreshed it for {age:.0f} s')
    return None


def busy_message(out: str, holder: Optional[dict]) -> str:
    holder = holder or {}
    started = holder.get('started_at')
    since = (time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))
             if isinstance(started, (int, float)) else 'an unknown time')
    job = f', job {holder["job_id"]}' if holder.get('job_id') else ''
    return (f'--out {out} is in use by another run (run {holder.get("run_id", "?")}{job}, pid '
            f'{holder.get("pid", "?")} on {holder.get("host", "?")}, started {since}); wait '
            f'for it to end or choose another --out (if that run is dead, its lock '
            f'{os.path.join(out, LOCK_FILE)} is taken over by itself after '
            f'{LOCK_STALE_S:g} s, or remove it)')


def in_use_by_other(out: str, job: Optional[str], clock: Callable[[], float] = time.time
                    ) -> Optional[str]:
    """The message for a live lock of another job on ``out``, or None (changes nothing)."""
    path = os.path.join(out, LOCK_FILE)
    fd = _open_existing(path)
    if fd is None:
        return None
    try:
        me = {'job_id': job, 'host': socket.gethostname(), 'boot_id': _boot_id()}
        holder, why = _judge(path, fd, fcntl.LOCK_SH, me, clock)
    finally:
        os.close(fd)
    return None if why is not None else busy_message(out, holder)


def _open_existing(path: str) -> Optional[int]:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _judge(path: str, fd: int, mode: int, me: dict, clock: Callable[[], float]):
    """(holder's record, why the lock may be taken over or None) for the lock open as ``fd``;
    tries ``flock(mode)`` on it (kept until ``fd`` is closed)."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        flock_free = True
    except OSError:
        flock_free = False
    holder = read_lock(os.path.dirname(path))
    try:
        age = clock() - os.fstat(fd).st_mtime
    except OSError:
        age = 0.0
    return holder, stale_reason(holder, me, age, flock_free, LOCK_STALE_S)


def remove_stale_tmp(out: str, log: Callable[[str], None]) -> List[str]:
    """Deletes temporary files of interrupted writes (the lock is held: none is live)."""
    removed = []
    for name in sorted(os.listdir(out)):
        if name.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))
                removed.append(name)
    if removed:
        log(f'removed {len(removed)} temporary file(s) of interrupted writes in {out}')
    return removed


def set_aside(out: str, start_iteration: Optional[int], log: Callable[[str], None],
              clock: Callable[[], float] = time.time) -> List[int]:
    """Moves checkpoints newer than ``start_iteration`` (all, when None) out of the way.

    They go to ``OUT/abandoned/<time>/`` with their manifests; returns their iterations.
    """
    newer = sorted(it for it in list_checkpoints(out)
                   if start_iteration is None or it > start_iteration)
    if not newer:
        return []
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(clock()))
    target = os.path.join(out, ABANDONED_DIR, stamp)
    suffix = 1
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(out, ABANDONED_DIR, f'{stamp}-{suffix}')
    os.makedirs(target)
    for it in newer:
        for path in checkpoint_paths(out, it):
            if os.path.exists(path):
                shutil.move(path, os.path.join(target, os.path.basename(path)))
    what = ('a fresh start' if start_iteration is None
            else f'the resume point (iteration {start_iteration})')
    log(f'set aside {len(newer)} checkpoint(s) newer than {what}, of an abandoned run '
        f'(iteration{"s" if len(newer) > 1 else ""} {", ".join(map(str, newer))}), '
        f'in {target}; delete that folder if you do not need them')
    return newer


class Status(NamedTuple):
    """Whether a run completed, and one line saying so or why not."""

    completed: bool
    message: str


def status(out: str, run_id: Optional[str] = None, world_size: Optional[int] = None) -> Status:
    """Did the run in ``out`` complete (its ``result.json`` is there, written by ``run_id``
    and on ``world_size`` ranks when those are given)? Never judged by an exit status alone:
    Open MPI can exit 0 after losing a host."""
    path = os.path.join(out, RESULT_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            result = json.load(f)
    except FileNotFoundError:
        newest = list_checkpoints(out) if os.path.isdir(out) else []
        where = (f'; its newest checkpoint is at iteration {newest[0]} (continue with '
                 f'--resume auto)' if newest else '')
        return Status(False, f'{out}: not completed: {path} does not exist{where}')
    except (OSError, ValueError) as e:
        return Status(False, f'{out}: not completed: {path} is unreadable ({e})')
    if run_id is not None and result.get('run_id') != run_id:
        return Status(False, f'{out}: not completed by run {run_id}: {path} was written by '
                             f'run {result.get("run_id")}')
    if world_size is not None and result.get('world_size') != world_size:
        return Status(False, f'{out}: {path} says world_size {result.get("world_size")}, but '
                             f'{world_size} rank(s) were expected')
    return Status(True, f'{out}: completed: {result.get("iterations")} iterations on '
                        f'{result.get("world_size")} rank(s) (run {result.get("run_id")})')
