"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class DistmultiError(Exception):
    """Base of every error that is the user's to fix (bad input, bad config)."""


class ConfigError(DistmultiError, ValueError):
    """A configuration value, flag or config-file key is not allowed."""


class DataError(DistmultiError, ValueError):
    """A dataset's shapes, dtypes or labels do not fit the model."""


class CheckpointError(DistmultiError, ValueError):
    """A checkpoint or model file cannot be read safely."""


class DeviceError(DistmultiError, RuntimeError):
    """The requested device does not exist or cannot be used here."""


class NonFiniteLossError(DistmultiError, FloatingPointError):
    """A head's loss became NaN or infinite; training stopped before the update."""
