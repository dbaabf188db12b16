"""What a run cost on each rank: seconds to the first iteration, peak memory, samples/s.

``RunStats`` is a trainer extension that notes when iterations end; ``summary`` (collective)
gathers every rank's numbers for ``result.json``. Memory is the peak resident set (VmHWM) of
the rank's process and the largest peak of its loader workers (read by the loader before it
stops them); a worker's peak includes the pages it shares with the rank after fork.
"""
import collections
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional

import chainer


def process_age_s() -> Optional[float]:
    """Seconds since this process started (from /proc on Linux), else None."""
    try:
        with open('/proc/self/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        with open('/proc/uptime') as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf('SC_CLK_TCK'))  # starttime
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb(pid='self') -> float:
    """A process's peak resident memory in MB (VmHWM from /proc; for this process, ru_maxrss
    where there is no /proc; 0.0 when it cannot be read)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if pid != 'self':
        return 0.0
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1024.0 * 1024.0) if sys.platform == 'darwin' else value / 1024.0


def cpu_s(pid) -> float:
    """CPU seconds (user + system) a process has used, from /proc; 0.0 when unreadable."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError):
        return 0.0


class RunStats(chainer.training.Extension):
    """Notes the end of the first and of the latest iteration (before other extensions run).

    Args:
        clock: seconds, monotonic (injected by tests).
    """

    name = 'RunStats'
    trigger = (1, 'iteration')
    priority = chainer.training.PRIORITY_WRITER + 1

    KEEP = 10000  # the latest iteration times kept for the median

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.started = clock()
        self.cpu_at_start = time.process_time()
        self.age_at_start = process_age_s()
        self.first = self.last = None  # (time, iteration)
        self._intervals = collections.deque(maxlen=self.KEEP)

    def __call__(self, trainer) -> None:
        now = (self.clock(), trainer.updater.iteration)
        if self.first is None:
            self.first = now
        elif now[1] == self.last[1] + 1:
            self._intervals.append(now[0] - self.last[0])
        self.last = now

    def median_iteration_s(self) -> Optional[float]:
        """The median time from one iteration's end to the next's (evaluations and
        checkpoints in between included), over the latest ones; robust to a busy machine."""
        return statistics.median(self._intervals) if self._intervals else None

    def serialize(self, serializer) -> None:
        pass  # nothing of it belongs in a checkpoint

    def rank_summary(self, loader_workers: int = 0, loader_peak_mb: float = 0.0,
                     data_wait_s: float = 0.0, loader_cpu_s: float = 0.0) -> Dict[str, Any]:
        """This rank's numbers (its loader workers, their largest peak memory and CPU time,
        and the time training waited for batches to be read)."""
        startup = None
        if self.first is not None:
            startup = self.first[0] - self.started + (self.age_at_start or 0.0)
        return {'startup_s': startup, 'peak_rss_mb': round(peak_rss_mb(), 1),
                'loader_workers': loader_workers, 'loader_peak_rss_mb': round(loader_peak_mb, 1),
                'data_wait_s': round(data_wait_s, 3),
                'cpu_s': round(time.process_time() - self.cpu_at_start, 2),
                'loader_cpu_s': round(loader_cpu_s, 2)}

    def samples_per_s(self, global_batch: int) -> Optional[float]:
        """Global training samples per second after the first iteration (evaluations and
        checkpoints in between included), or None with fewer than two iterations."""
        if self.first is None or self.last[1] <= self.first[1] or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) * global_batch / (self.last[0] - self.first[0])

    def summary(self, world, global_batch: int, loader=None,
                data_wait_s: float = 0.0) -> Dict[str, Any]:
        """Every rank's numbers, and rank 0's samples/s. Collective."""
        mine = (self.rank_summary(loader.workers, loader.worker_peak_rss_mb, data_wait_s,
                                  loader.worker_cpu_s)
                if loader else self.rank_summary(data_wait_s=data_wait_s))
        median = self.median_iteration_s()
        return {'ranks': world.allgather_obj(mine),
                'train_samples_per_s': self.samples_per_s(global_batch),
                'median_iteration_s': median,
                'startup_from': 'process start' if self.age_at_start is not None
                else 'train() call'}
