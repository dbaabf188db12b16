"""PNG plots of the training log, drawn by a separate process so that they cost the
training loop almost nothing.

Chainer's PlotReport draws every figure on the training thread at each log point (about a
fifth of the wall time of the default run, measured before this module existed), and a
drawing thread in the same process would compete with training for the interpreter lock.
``LogPlots`` instead sends each new log entry to ``distmulti/_plotter.py``, a small process
started at the first log point; it draws from the whole log so far, so the plots also cover
the part of a run before a resume (the log is in the checkpoint). At the end of training it
finishes the last drawing before ``finalize`` returns.
"""
import importlib.util
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

from chainer.training import extension

from distmulti.runfiles import TMP_PREFIX

PLOTTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_plotter.py')
FINISH_TIMEOUT_S = 120


def available() -> bool:
    """Whether matplotlib can be imported (plots are skipped without it)."""
    return importlib.util.find_spec('matplotlib') is not None


class LogPlots(extension.Extension):
    """Draws ``{filename: [log keys]}`` against ``x_key`` (``epoch`` or ``iteration``) from
    ``log_report``'s entries, at the log's trigger, in a process of its own.

    Register it after the LogReport, with the same trigger.
    """

    priority = extension.PRIORITY_READER

    def __init__(self, log_report, plots: Dict[str, List[str]], x_key: str,
                 log: Optional[Callable[[str], None]] = None):
        self._log_report = log_report
        self._plots = dict(plots)
        self._x_key = x_key
        self._say = log or (lambda msg: None)
        self._proc: Optional[subprocess.Popen] = None
        self._sent = 0
        self._broken = False

    def __call__(self, trainer):
        entries = self._log_report.log
        if self._broken or len(entries) <= self._sent:
            return
        if self._proc is None:
            self._start(trainer.out)
        self._send(entries[self._sent:])
        self._sent = len(entries)

    def finalize(self):
        """Ends the drawing process after its last drawing (waits for it)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=FINISH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self._say(f'plots: the drawing process did not finish within '
                      f'{FINISH_TIMEOUT_S} s; the PNGs may be behind the log')

    def _start(self, out: str) -> None:
        env = dict(os.environ, MPLBACKEND='Agg', OMP_NUM_THREADS='1')
        self._proc = subprocess.Popen([sys.executable, PLOTTER], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, env=env, text=True)
        self._write({'out': os.path.abspath(out), 'x_key': self._x_key,
                     'plots': self._plots, 'tmp_prefix': TMP_PREFIX})

    def _send(self, entries) -> None:
        self._write(list(entries))

    def _write(self, obj) -> None:
        if self._broken:
            return
        try:
            self._proc.stdin.write(json.dumps(obj) + '\n')
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self._broken = True
            self._say('plots: the drawing process ended early; no more PNGs in this run')
