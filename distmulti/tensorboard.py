"""``--tensorboard``: every number of the log as TensorBoard scalars, under ``OUT/tensorboard/``.

Rank 0 writes, with tensorboardX (no TensorFlow), one TensorBoard run per split:
``OUT/tensorboard/train`` and ``OUT/tensorboard/validation``. A tag names the metric first and
the head second (``loss/head0``, ``accuracy/head0``), because TensorBoard groups charts by the
tag's first component: the heads' charts sit side by side in the ``loss`` and ``accuracy``
sections, and each chart shows the training and the validation curve. The step is the
iteration. The values are the log's entries themselves, written as each one is appended.
"""
import os
from typing import Dict, Optional, Sequence, Tuple

from chainer.training import Extension, PRIORITY_READER

from distmulti.errors import ConfigError

TRAIN_RUN, VALIDATION_RUN = 'train', 'validation'
_PREFIXES = (('validation/main/', VALIDATION_RUN), ('main/', TRAIN_RUN))
#: Log keys of the whole network, renamed so that they join the per-head sections.
_RENAMED = {'loss': 'loss/total', 'accuracy_all': 'accuracy/all_heads',
            'samples': 'samples/evaluated', 'accuracy_all_samples': 'samples/accuracy_all'}
_OTHER = {'epoch': 'progress/epoch', 'elapsed_time': 'time/elapsed_s'}


def check_available() -> None:
    """Raises ConfigError when tensorboardX is not installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ConfigError('--tensorboard needs tensorboardX: pip install '
                          '"distmulti[tensorboard]" (or sh install.sh -e ".[tensorboard]")'
                          ) from None


def tag_for(key: str, head_names: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(run, tag) of a log key; None for ``iteration``, which is the step.

    ``main/head0/loss`` -> (train, ``loss/head0``); ``validation/main/accuracy_all`` ->
    (validation, ``accuracy/all_heads``); ``lr/base``, ``time/...`` and other keys keep their
    name in the train run.
    """
    if key == 'iteration':
        return None
    for prefix, run in _PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            head, _, metric = rest.partition('/')
            if head in head_names and metric:
                return run, f'{metric}/{head}'
            return run, _RENAMED.get(rest, rest)
    return TRAIN_RUN, _OTHER.get(key, key)


class TensorBoardReport(Extension):
    """Writes each new entry of ``log_report`` (a ``chainer.training.extensions.LogReport``).

    Register it on rank 0 only; it runs after the LogReport of the same iteration.

    Args:
        log_report: the LogReport whose entries are written.
        logdir: the folder of the runs (``OUT/tensorboard``).
        head_names: the network's head names, for the tags.
    """

    trigger = (1, 'iteration')
    priority = PRIORITY_READER - 1

    def __init__(self, log_report, logdir: str, head_names: Sequence[str]):
        check_available()
        self._log_report = log_report
        self._logdir = logdir
        self._head_names = list(head_names)
        self._writers: Dict[str, object] = {}
        self._written = 0

    def initialize(self, trainer) -> None:
        # On resume the log already holds the earlier entries (and their events exist):
        # write only the new ones, and hide the events a stopped run wrote after its checkpoint.
        self._written = len(self._log_report.log)
        self._purge_step = trainer.updater.iteration + 1 if trainer.updater.iteration else None

    def __call__(self, trainer) -> None:
        log = self._log_report.log
        if len(log) == self._written:
            return
        for entry in log[self._written:]:
            step = int(entry['iteration'])
            for key, value in entry.items():
                where = tag_for(key, self._head_names)
                if where is not None and isinstance(value, (int, float)):
                    self._writer(where[0]).add_scalar(where[1], float(value), step)
        self._written = len(log)
        for writer in self._writers.values():
            writer.flush()

    def finalize(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _writer(self, run: str):
        if run not in self._writers:
            from tensorboardX import SummaryWriter
            self._writers[run] = SummaryWriter(os.path.join(self._logdir, run),
                                               purge_step=getattr(self, '_purge_step', None))
        return self._writers[run]
