"""Graceful stop: SIGTERM, SIGINT, SIGHUP or SIGUSR1 end a training at a checkpoint.

The first such signal only records a request. Every rank adds "has this rank been asked to
stop?" to the small all-reduce that each training iteration already does (see
``MultiHeadUpdater``), so all ranks see the request at the same iteration, write one
checkpoint there and exit with ``EXIT_STOPPED``; ``--resume auto`` then continues exactly
where the run stopped. A second signal, or the grace period running out, ends the process at
once (status 128 + signal number); the newest complete checkpoint stays valid.

Signals are noticed by a thread reading Python's wakeup file descriptor, so a request (and a
second signal) counts even while the main thread waits inside MPI or writes a file.
"""
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# The same signal twice within this many seconds counts once: schedulers and tools such as
# `timeout` send it to the process and to its process group.
SAME_DELIVERY_S = 0.5

_current: Optional['StopRequest'] = None


def requested() -> bool:
    """Whether this process has been asked to stop (False when no handler is installed)."""
    return _current is not None and _current.signum is not None


def current() -> Optional['StopRequest']:
    """The installed StopRequest, if any."""
    return _current


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f'signal {signum}'


class StopRequest:
    """Records the first stop signal; the second one, or ``grace`` seconds, end the process.

    Args:
        grace: seconds between the first signal and ending the process at once; None or 0
            waits for the graceful stop however long it takes.
        log: where the one-line messages go.
        exit: how the process ends at once (``os._exit``; tests pass their own).
    """

    def __init__(self, grace: Optional[float], log: Callable[[str], None],
                 exit: Callable[[int], None] = os._exit):
        self.grace = grace
        #: Whether the first signal is announced (rank 0 announces for the job; the agreed
        #: stop is reported once, by rank 0, whichever rank was signalled).
        self.announce = True
        self.signum: Optional[int] = None
        self.requested_at: Optional[float] = None
        self._log = log
        self._exit = exit
        self._old_handlers = {}
        self._old_wakeup = -1
        self._pipe = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None

    # -- installing ----------------------------------------------------------------------
    def install(self) -> 'StopRequest':
        """Takes over the stop signals (main thread only); ``uninstall`` gives them back."""
        global _current
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            # Python's C-level handler writes the signal number to the wakeup fd at once,
            # in whatever thread the signal lands; the Python-level handler has nothing to do.
            self._old_handlers[signum] = signal.signal(signum, _ignore)
        self._thread = threading.Thread(target=self._listen, name='distmulti-signals',
                                        daemon=True)
        self._thread.start()
        _current = self
        return self

    def uninstall(self) -> None:
        global _current
        if self._pipe is None:
            return
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        if self._timer is not None:
            self._timer.cancel()
        os.close(self._pipe[1])  # ends the listening thread
        self._thread.join(timeout=5)
        os.close(self._pipe[0])
        self._pipe = None
        if _current is self:
            _current = None

    def __enter__(self) -> 'StopRequest':
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- receiving -----------------------------------------------------------------------
    def _listen(self) -> None:
        read_fd = self._pipe[0]
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self.receive(signum)

    def receive(self, signum: int, now: Optional[float] = None) -> None:
        """What a stop signal does: the first records the request, the second ends at once.

        The same signal again within ``SAME_DELIVERY_S`` is the same delivery (a signal sent
        to this process and to its process group), not a second signal.
        """
        name = signal_name(signum)
        now = time.monotonic() if now is None else now
        if (self.signum == signum and self.requested_at is not None
                and now - self.requested_at < SAME_DELIVERY_S):
            return
        if self.signum is None:
            self.signum, self.requested_at = signum, now
            grace = (f'a second signal or {self.grace:g} s end it at once'
                     if self.grace else 'a second signal ends it at once')
            if self.announce:
                self._log(f'received {name}: stopping after the current iteration with a '
                          f'checkpoint ({grace})')
            if self.grace:
                self._timer = threading.Timer(self.grace, self._grace_over)
                self._timer.daemon = True
                self._timer.start()
            return
        self._log(f'received {name} again: exiting at once (the newest complete checkpoint '
                  f'stays valid)')
        self._end(signum)

    def _grace_over(self) -> None:
        self._log(f'did not stop within {self.grace:g} s of {signal_name(self.signum)}: '
                  f'exiting at once (the newest complete checkpoint stays valid)')
        self._end(self.signum)

    def _end(self, signum: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(128 + signum)


def _ignore(signum, frame) -> None:
    """The Python-level handler: the listening thread has already seen the signal."""
