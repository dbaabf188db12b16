"""The files a run keeps in its ``--out`` folder and the exit codes of its processes.

Every module that reads or writes one of these (training, checkpoints, the supervisor, the
watchdog, evaluate/predict, the launch scripts through ``distmulti status``) takes the name
from here, so that a name or a code is defined once.
"""
import os

#: Written last by rank 0: the run completed. Holds the run id, world size and results.
RESULT_FILE = 'result.json'
#: Every trained parameter (keys ``base/...``, ``<head>/...``), written just before the result.
MODEL_FILE = 'model.npz'
#: One JSON entry per evaluation (Chainer's LogReport).
LOG_FILE = 'log'
#: Touched by rank 0's watchdog while the run is healthy; read by the supervisor.
HEARTBEAT_FILE = '.distmulti-heartbeat'
#: Held by the running job's rank 0: one run per output folder.
LOCK_FILE = '.distmulti-lock'
#: ``checkpoint_iter_N.npz`` and its manifest ``checkpoint_iter_N.json``.
CHECKPOINT_PREFIX = 'checkpoint_iter_'
#: Folder of the TensorBoard event files (``--tensorboard``): runs ``train`` and ``validation``.
TENSORBOARD_DIR = 'tensorboard'
#: Prefix of the temporary files that atomic writes rename into place.
TMP_PREFIX = '.tmp-'

# -- exit codes (the operators' guide has the table) -------------------------------------------
#: The run completed (its result.json is there).
EXIT_OK = 0
#: Training failed: a non-finite loss, a crash, or a job that ended without its result.json.
EXIT_FAILED = 1
#: The user's input is wrong (flags, config, data, checkpoint, output folder): do not retry.
EXIT_USAGE = 2
#: The hang watchdog ended the job: a rank made no progress (retry from a checkpoint).
EXIT_HANG = 3
#: Stopped on request (SIGTERM, SIGINT, SIGHUP, SIGUSR1) after writing a checkpoint: resume
#: with ``--resume auto``. 75 is EX_TEMPFAIL of sysexits.h: "try again later".
EXIT_STOPPED = 75
#: Statuses a shell gives a process ended by a signal (128 + SIGINT, SIGKILL, SIGTERM).
EXIT_SIGINT, EXIT_SIGKILL, EXIT_SIGTERM = 130, 137, 143


def path(out: str, name: str) -> str:
    """``out/name``."""
    return os.path.join(out, name)
