"""distmulti: shared-base, multi-head Chainer training, from one CPU to many GPUs."""
# First: lets chainer 7.8.1 import on numpy 2 / Python 3.12 / CuPy 14 (see _compat.py).
from distmulti import _compat
_compat.apply()
from distmulti._version import __version__
from distmulti.config import TrainConfig
from distmulti.errors import (CheckpointError, ConfigError, DataError, DeviceError,
                              DistmultiError, ExportError, NonFiniteLossError)
from distmulti.evaluator import MultiHeadEvaluator
from distmulti.export import export_onnx
from distmulti.models import BaseCNN, BatchNormCNN, LossHead, MLPHead, MultiHeadNet, default_net
from distmulti.training import train
from distmulti.updater import MultiHeadUpdater

__all__ = [
    '__version__', 'BaseCNN', 'BatchNormCNN', 'CheckpointError', 'ConfigError', 'DataError',
    'DeviceError', 'DistmultiError', 'ExportError', 'LossHead', 'MLPHead', 'MultiHeadEvaluator',
    'MultiHeadNet', 'MultiHeadUpdater', 'NonFiniteLossError', 'TrainConfig', 'default_net',
    'export_onnx', 'train',
]
