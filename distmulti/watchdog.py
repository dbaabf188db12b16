"""Hang watchdog: end the job when a rank stops anywhere, so that it can be restarted.

A peer that silently disappears (a host cut off, a process stopped, a node dead) leaves the
other ranks waiting in a collective forever. Every rank runs a watchdog thread from the start
of ``train`` to its end: start-up, every collective, evaluation, checkpoint writes, the final
save.

* Progress is reported with :func:`beat` (after every training iteration, by
  :class:`WatchdogExtension`, and after every evaluation batch) and :func:`busy` (long local
  work such as writing a checkpoint, which counts as progress for as long as it lasts).
* Until the ranks are connected (``attach``), each watchdog judges its own rank alone: no
  progress for ``timeout`` seconds, or ``STARTUP_MIN_S`` if that is longer, fires (a peer
  stopped before start-up leaves the others waiting in MPI's start-up or in the first
  collective; the minimum leaves room for the slowest rank to start Python and import).
  MPI's own initialisation holds Python's GIL while it waits, so a separate process watches
  it (:func:`blocking`).
* Once attached, the watchdog threads exchange tiny heartbeats on a communicator of their own:
  every rank tells rank 0 how long it has been idle, rank 0 answers every rank. Rank 0 fires
  when a rank has sent nothing for ``timeout`` seconds (stopped, dead, cut off) or when no rank
  at all has made progress for ``timeout`` seconds (a deadlock); every other rank fires when
  rank 0 has sent nothing for ``timeout`` seconds. So a rank that waits while another one
  writes a large checkpoint never fires.

Firing names the rank and the reason, then ends the whole job (MPI_Abort with ``EXIT_HANG``,
else the process) so that a supervisor (``distmulti launch --max-restarts``, a scheduler)
restarts it from the newest checkpoint. While the job is healthy rank 0's watchdog also
touches a heartbeat file in ``--out``: the supervisor kills a job whose heartbeat went stale
but whose mpiexec did not end (a cut link can leave mpiexec waiting even after MPI_Abort).
"""
import contextlib
import os
import sys
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

import chainer

from distmulti.runfiles import EXIT_HANG

_active: Optional['Watchdog'] = None
#: Seconds the start-up (before the ranks' watchdogs are connected) may take, whatever the
#: timeout: every rank waits there until the slowest one has started and imported chainer.
STARTUP_MIN_S = 30.0


def current() -> Optional['Watchdog']:
    """The running watchdog of this process, if any."""
    return _active


def beat(iteration: Optional[int] = None) -> None:
    """Reports progress to the running watchdog, if any (cheap; call it often)."""
    if _active is not None:
        _active.beat(iteration)


@contextlib.contextmanager
def busy(what: str):
    """Long local work inside counts as progress (e.g. writing a checkpoint)."""
    if _active is None:
        yield
        return
    with _active.busy(what):
        yield


# Watches a call that blocks while holding Python's GIL, where no Python thread can run: a
# separate process that kills this one when the call has not returned in time.
_MONITOR = r'''
import os, select, signal, sys
pid, timeout, what, rank = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
if not select.select([sys.stdin], [], [], timeout)[0]:
    sys.stderr.write(f'distmulti: rank {rank}: {what} did not finish in {timeout:g} s: a '
                     f'peer is gone or stuck; the hang watchdog is killing this rank so that '
                     f'the job ends and can be restarted\n')
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
'''


@contextlib.contextmanager
def blocking(what: str, rank: str = '?', at_least: float = 0.0):
    """Inside: a call that may block holding the GIL (MPI's initialisation does); with a
    watchdog running, a monitor process kills this one if it lasts longer than the timeout,
    or ``at_least`` seconds if that is longer (the rank then ends with status 137, which
    ends the job)."""
    if _active is None:
        yield
        return
    import subprocess
    limit = max(_active.timeout, at_least)
    monitor = subprocess.Popen([sys.executable, '-S', '-c', _MONITOR, str(os.getpid()),
                                str(limit), what, rank], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        monitor.stdin.close()  # end of input: the monitor exits
        monitor.wait()
        _active.beat()


class PeerState(NamedTuple):
    """What rank 0 last heard from a rank: when (rank 0's clock), and how idle it was."""

    heard_at: float
    idle: float
    iteration: int


def verdict(now: float, timeout: float, rank: int, own_idle: float, iteration: int = 0,
            peers: Optional[Dict[int, PeerState]] = None,
            root_heard_at: Optional[float] = None) -> Optional[str]:
    """Why the watchdog must fire now, or None. Pure: the caller supplies every time.

    Args:
        now: the current time (the watchdog's clock).
        timeout: seconds without progress (or without a heartbeat) that count as a hang.
        rank: this rank.
        own_idle: seconds since this rank last made progress (0 while busy).
        iteration: this rank's last completed training iteration (for the message).
        peers: on rank 0 once attached, every other rank's last heartbeat.
        root_heard_at: on other ranks once attached, when rank 0 was last heard.
    """
    if peers is None and root_heard_at is None:
        if own_idle > timeout:
            return (f'rank {rank}: no progress for {own_idle:.1f} s (last completed iteration '
                    f'{iteration}): a peer is gone or stuck, or this rank is')
        return None
    if root_heard_at is not None:
        silent = now - root_heard_at
        if silent > timeout:
            return (f'rank {rank}: no heartbeat from rank 0 for {silent:.1f} s (last completed '
                    f'iteration {iteration}): rank 0 is stopped, dead or cut off')
        return None
    for peer, state in sorted(peers.items()):
        silent = now - state.heard_at
        if silent > timeout:
            return (f'rank {peer} sent no heartbeat for {silent:.1f} s (last completed '
                    f'iteration {state.iteration}): it is stopped, dead or cut off')
    idle = min([own_idle] + [s.idle + now - s.heard_at for s in peers.values()])
    if idle > timeout:
        return (f'no rank made progress for {idle:.1f} s (last completed iteration '
                f'{iteration}): every rank is waiting, a deadlock')
    return None


class HeartbeatChannel:
    """Heartbeats between the watchdog threads, on a duplicate of the world communicator.

    Non-root ranks send ``[idle seconds, iteration]`` to rank 0; rank 0 sends one number to
    every rank. Everything is non-blocking, so a stopped peer never blocks a watchdog.
    Needs MPI_THREAD_MULTIPLE (the watchdog thread talks while the main thread computes).
    """

    TAG = 0x7D6

    def __init__(self, mpi_comm, clock: Callable[[], float]):
        self.comm = mpi_comm.Dup()  # collective
        self.rank, self.size = self.comm.rank, self.comm.size
        self._clock = clock
        self._sends: List = []
        start = clock()
        if self.rank == 0:
            self.peers = {r: PeerState(start, 0.0, 0) for r in range(1, self.size)}
            self._bufs = {r: np.zeros(2) for r in self.peers}
            self._recvs = {r: self._post(r) for r in self.peers}
        else:
            self.root_heard_at = start
            self._bufs = {0: np.zeros(1)}
            self._recvs = {0: self._post(0)}

    def _post(self, source: int):
        return self.comm.Irecv(self._bufs[source], source=source, tag=self.TAG)

    def _send(self, data: np.ndarray, dest: int) -> None:
        self._sends.append((self.comm.Isend(data, dest=dest, tag=self.TAG), data))

    def exchange(self, idle: float, iteration: int) -> None:
        """Sends this rank's heartbeat and takes in whatever has arrived."""
        now = self._clock()
        self._sends = [(req, data) for req, data in self._sends if not req.Test()]
        for source, req in list(self._recvs.items()):
            while req.Test():
                if self.rank == 0:
                    idle_r, it_r = self._bufs[source]
                    self.peers[source] = PeerState(now, float(idle_r), int(it_r))
                else:
                    self.root_heard_at = now
                req = self._recvs[source] = self._post(source)
        if self.rank == 0:
            for dest in self.peers:
                self._send(np.zeros(1), dest)
        else:
            self._send(np.array([idle, float(iteration)]), 0)

    def cancel(self) -> None:
        """Cancels the pending receives and lets the (tiny, eager) sends complete: local."""
        for req in self._recvs.values():
            req.Cancel()
            req.Wait()
        self._recvs = {}
        deadline = self._clock() + 2.0
        while self._sends and self._clock() < deadline:
            self._sends = [(req, data) for req, data in self._sends if not req.Test()]
            time.sleep(0.01)

    def free(self) -> None:
        """Frees the duplicate communicator (collective); after ``cancel``."""
        self.comm.Free()


class Watchdog:
    """Fires when this rank, or (once attached) the job, stops making progress.

    Args:
        timeout: seconds; see the module docstring for what counts.
        rank: this process's rank (for messages).
        on_fire: called once when it fires, before the process ends (default: MPI_Abort of
            the whole job when attached, else nothing).
        log: one-line messages (default: stderr).
        clock: monotonic seconds (tests inject their own).
        heartbeat_path: on rank 0, a file touched while the job is healthy (supervisor).
        exit_process: end the process with ``EXIT_HANG`` after ``on_fire``.
    """

    def __init__(self, timeout: float, rank: int = 0, *,
                 on_fire: Optional[Callable[[], None]] = None,
                 log: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.monotonic,
                 heartbeat_path: Optional[str] = None, exit_process: bool = True):
        self.timeout = float(timeout)
        self.rank = rank
        self._on_fire = on_fire
        self._log = log or (lambda msg: print(f'distmulti: {msg}', file=sys.stderr, flush=True))
        self._clock = clock
        self.heartbeat_path = heartbeat_path
        self._exit_process = exit_process
        self._lock = threading.Lock()
        self._last = clock()
        self._iteration = 0
        self._busy = 0
        self.channel: Optional[HeartbeatChannel] = None
        self.starting = True  # see startup_done
        self.fired: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name='distmulti-watchdog',
                                        daemon=True)

    # -- progress ------------------------------------------------------------------------
    def beat(self, iteration: Optional[int] = None) -> None:
        with self._lock:
            self._last = self._clock()
            if iteration is not None:
                self._iteration = iteration

    @contextlib.contextmanager
    def busy(self, what: str = 'busy'):
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._last = self._clock()

    def idle(self, now: float) -> float:
        with self._lock:
            return 0.0 if self._busy else max(0.0, now - self._last)

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> 'Watchdog':
        global _active
        self.beat()
        _active = self
        self._thread.start()
        return self

    def startup_done(self) -> None:
        """The start-up allowance (``STARTUP_MIN_S``) ends: from now on the timeout."""
        with self._lock:
            self.starting = False
            self._last = self._clock()

    def attach(self, mpi_comm) -> None:
        """Connects the ranks' watchdogs (collective: every rank calls it at the same point).

        Without MPI_THREAD_MULTIPLE each rank keeps judging only itself, and says so.
        """
        from mpi4py import MPI
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            self._log('the MPI library gives no MPI_THREAD_MULTIPLE: each rank\'s watchdog '
                      'only watches its own progress')
            self.startup_done()
            return
        channel = HeartbeatChannel(mpi_comm, self._clock)
        with self._lock:
            self.channel = channel
        self.startup_done()

    def stop(self) -> None:
        """Ends the watchdog thread and cancels its pending receives (local, any time)."""
        global _active
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if _active is self:
            _active = None
        if self.channel is not None:
            self.channel.cancel()

    def close(self) -> None:
        """``stop``, then frees the channel: collective, for the end of a healthy run."""
        self.stop()
        if self.channel is not None:
            self.channel.free()
            self.channel = None

    # -- the thread ----------------------------------------------------------------------
    def check(self, now: float) -> Optional[str]:
        """One round: exchange heartbeats, then the verdict for ``now``."""
        idle = self.idle(now)
        channel = self.channel
        if channel is None:
            timeout = max(self.timeout, STARTUP_MIN_S) if self.starting else self.timeout
            return verdict(now, timeout, self.rank, idle, self._iteration)
        channel.exchange(idle, self._iteration)
        if channel.rank == 0:
            return verdict(now, self.timeout, self.rank, idle, self._iteration,
                           peers=channel.peers)
        return verdict(now, self.timeout, self.rank, idle, self._iteration,
                       root_heard_at=channel.root_heard_at)

    def step(self, now: float) -> bool:
        """One round of the thread: touch the heartbeat file while healthy, else fire.
        Returns whether it fired."""
        reason = self.check(now)
        if reason is None:
            if self.heartbeat_path:
                _touch(self.heartbeat_path)
            return False
        self.fire(reason)
        return True

    def _watch(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._stop.wait(period):
            if self.step(self._clock()):
                return

    def fire(self, reason: str) -> None:
        self.fired = reason
        self._log(f'{reason}; the hang watchdog ({self.timeout:g} s) is ending the job '
                  f'(exit {EXIT_HANG}) so that it can be restarted from the newest checkpoint')
        try:
            if self._on_fire is not None:
                self._on_fire()
            elif self.channel is not None:
                sys.stdout.flush()
                sys.stderr.flush()
                from mpi4py import MPI
                MPI.COMM_WORLD.Abort(EXIT_HANG)
        finally:
            if self._exit_process:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_HANG)


class WatchdogExtension(chainer.training.Extension):
    """Trainer extension: one heartbeat after every training iteration."""

    trigger = (1, 'iteration')
    priority = chainer.training.PRIORITY_WRITER + 1  # right after the update

    def __init__(self, watchdog: Watchdog):
        self.watchdog = watchdog

    def __call__(self, trainer) -> None:
        self.watchdog.beat(trainer.updater.iteration)


def _touch(path: str) -> None:
    try:
        with open(path, 'a'):
            os.utime(path)
    except OSError:
        pass  # a missing or read-only folder must not stop training
