"""Training speed in the log: ``time/iteration_s`` and ``time/samples_per_s``.

An iteration's time is that of its update alone (forward, backward, gradient exchange,
optimizer steps): the clock starts when the previous iteration's last extension has run and
stops when the update returns, before this iteration's extensions, so evaluations,
checkpoints and plots are not counted. At every report (the LogReport's trigger) the mean
over the iterations since the previous report is reported once, so the log holds the exact
ratio of sums, not a mean of per-iteration rates.
"""
import time
from typing import Callable, List, Tuple

import chainer
from chainer.training import Extension, trigger as trigger_module

#: Runs first after the update, before every other extension.
STOP_PRIORITY = float('inf')
#: Runs last, after every other extension of the iteration.
START_PRIORITY = float('-inf')


class IterationTimer:
    """Times updates and reports their mean and the throughput at each report.

    Args:
        global_batchsize: samples per iteration over all ranks.
        report_trigger: the LogReport's trigger, e.g. ``(1, 'epoch')``.
        clock: seconds as a float (injected in tests).
    """

    def __init__(self, global_batchsize: int, report_trigger,
                 clock: Callable[[], float] = time.perf_counter):
        self.global_batchsize = global_batchsize
        self._trigger = trigger_module.get_trigger(report_trigger)
        self._clock = clock
        self._started = None
        self._total = 0.0
        self._count = 0

    def extensions(self) -> List[Tuple[Extension, str]]:
        """The two extensions to register with ``trainer.extend(ext, name=...)``."""
        return [(_Hook(self._stop, STOP_PRIORITY, initialize=self._start), 'distmulti_timer_stop'),
                (_Hook(self._start, START_PRIORITY), 'distmulti_timer_start')]

    def _start(self, trainer) -> None:
        self._started = self._clock()

    def _stop(self, trainer) -> None:
        self._total += self._clock() - self._started
        self._count += 1
        if self._trigger(trainer):
            chainer.report(self.report())
            self._total, self._count = 0.0, 0

    def report(self) -> dict:
        """The values for the iterations timed since the last report."""
        if not self._count or self._total <= 0:
            return {}
        mean = self._total / self._count
        return {'time/iteration_s': mean, 'time/samples_per_s': self.global_batchsize / mean}


class _Hook(Extension):
    """Calls ``fn(trainer)`` every iteration at ``priority`` (and ``initialize`` before the loop)."""

    trigger = (1, 'iteration')

    def __init__(self, fn: Callable, priority: float, initialize: Callable = None):
        self._fn = fn
        self.priority = priority
        self._initialize = initialize

    def __call__(self, trainer) -> None:
        self._fn(trainer)

    def initialize(self, trainer) -> None:
        if self._initialize is not None:
            self._initialize(trainer)
