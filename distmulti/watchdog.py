"""Hang watchdog: abort the job when a rank stops making progress.

A peer that silently disappears (a host cut off, a process stopped) leaves the other ranks
waiting in a collective forever. The watchdog thread on every rank expects a heartbeat at
least every ``timeout`` seconds: after every training iteration and every evaluation batch.
Local work that may take long (writing a checkpoint) pauses it. When it fires, it names the
rank and the last completed iteration, then ends the whole job (MPI_Abort, else the process),
so that a supervisor (``distmulti launch --max-restarts``) can restart from a checkpoint.
On rank 0 it also touches a heartbeat file while training is healthy: the supervisor kills a
job whose heartbeat went stale but whose mpiexec did not end (a cut link can leave mpiexec
waiting on an unreachable daemon even after MPI_Abort).
"""
import contextlib
import os
import sys
import threading
import time
from typing import Callable, Optional

from distmulti.runfiles import EXIT_HANG



class Watchdog:
    """Fires ``on_fire`` if no heartbeat arrives for ``timeout`` seconds (outside pauses)."""

    def __init__(self, timeout: float, rank: int, on_fire: Callable[[], None],
                 log: Optional[Callable[[str], None]] = None, exit_process: bool = True,
                 heartbeat_path: Optional[str] = None):
        self.timeout = float(timeout)
        self.rank = rank
        self._on_fire = on_fire
        self._log = log or (lambda msg: print(f'distmulti: {msg}', file=sys.stderr, flush=True))
        self._last = time.monotonic()
        self._iteration = 0
        self._paused = 0
        self._exit_process = exit_process
        # Touched by the watchdog thread while training is healthy, for the supervisor.
        self._heartbeat_path = heartbeat_path
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name='distmulti-watchdog',
                                        daemon=True)

    def start(self) -> 'Watchdog':
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self, iteration: Optional[int] = None) -> None:
        with self._lock:
            self._last = time.monotonic()
            if iteration is not None:
                self._iteration = iteration

    @contextlib.contextmanager
    def paused(self):
        """No firing inside; the clock restarts when the block ends."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._last = time.monotonic()

    def _watch(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._stop.wait(period):
            with self._lock:
                idle = time.monotonic() - self._last
                fire = not self._paused and idle > self.timeout
                iteration = self._iteration
            if not fire and self._heartbeat_path:
                _touch(self._heartbeat_path)
            if fire:
                self._log(f'rank {self.rank}: no training iteration completed in '
                          f'{self.timeout:g} s (last completed iteration {iteration}); a peer '
                          f'is gone or stuck: aborting the job (exit {EXIT_HANG}) so it can be '
                          f'restarted from the newest checkpoint')
                try:
                    self._on_fire()
                finally:
                    if self._exit_process:
                        os._exit(EXIT_HANG)
                return


def _touch(path: str) -> None:
    try:
        with open(path, 'a'):
            os.utime(path)
    except OSError:
        pass  # a missing or read-only folder must not stop training
