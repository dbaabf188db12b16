"""Errors a user can cause. The CLI prints them as one line, without a traceback."""
import os


class DistmultiError(Exception):
    """Base of every error that is the user's to fix (bad input, bad config).

    ``collective=True`` marks an error that every rank of a distributed run raises at the same
    point (found by a collective check, or by the same check on the same data), so the ranks
    can all exit cleanly instead of aborting the MPI job.
    """

    def __init__(self, message: str = '', collective: bool = False):
        super().__init__(message)
        self.collective = collective


class ConfigError(DistmultiError, ValueError):
    """A configuration value, flag or config-file key is not allowed."""


class DataError(DistmultiError, ValueError):
    """A dataset's shapes, dtypes or labels do not fit the model."""


class CheckpointError(DistmultiError, ValueError):
    """A checkpoint or model file cannot be read safely."""


class OutputError(DistmultiError, RuntimeError):
    """A file cannot be written: the output folder is missing, read-only, in use by another
    run, or its filesystem is full. What was written before stays valid."""


class TrainingStopped(DistmultiError):
    """The training stopped on request (a signal) after writing a checkpoint; it can be
    continued with ``--resume auto``. Not an error: the CLI exits with ``EXIT_STOPPED``."""


class DeviceError(DistmultiError, RuntimeError):
    """The requested device does not exist or cannot be used here."""


class NonFiniteLossError(DistmultiError, FloatingPointError):
    """A head's loss became NaN or infinite; training stopped before the update."""


class ExportError(DistmultiError, ValueError):
    """The network cannot be written as ONNX (or the onnx package is missing)."""

class SampleError(DataError):
    """A sample could not be read, or what was read is not valid (names the file or row)."""


def data_error(message: str) -> DataError:
    """A DataError that every rank raises alike (they all read the same files)."""
    return DataError(message, collective=True)


def check_file(path: str, what: str) -> None:
    """Raises :func:`data_error` naming ``what`` unless ``path`` is an existing regular file."""
    if not os.path.exists(path):
        raise data_error(f'{what} {path} does not exist')
    if not os.path.isfile(path):
        raise data_error(f'{what} {path} is not a file')
