"""Process-group and device helpers.

``LocalComm`` is the single-process world (no MPI). The distributed layer provides the same
small interface (rank, size, intra_rank, allreduce_sum) over a ChainerMN communicator, so the
updater, evaluator and trainer do not care which one they run on.
"""
import numpy as np

import chainer

from distmulti.errors import DeviceError


class LocalComm:
    """A world of one process: rank 0 of 1, reductions are the identity."""

    rank = 0
    size = 1
    intra_rank = 0
    name = 'local'

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of a small host (numpy) array."""
        return np.asarray(array)


def resolve_device(spec: str) -> chainer.backend.Device:
    """Turns a normalised device spec (``@numpy``, ``@cupy:N``, ``@intel64``) into a Device.

    Raises DeviceError with the reason when the device cannot be used on this machine.
    """
    if spec.startswith('@cupy:'):
        index = int(spec.split(':', 1)[1])
        try:
            import cupy
        except ImportError:
            raise DeviceError(f'device {spec} needs CuPy, which is not installed; install '
                              f"distmulti with the gpu extra (pip install '.[gpu]') or use "
                              f'--device -1 for the CPU') from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDA driver missing or broken
            raise DeviceError(f'device {spec}: no usable CUDA GPU here ({e}); use --device -1 '
                              f'for the CPU') from None
        if index >= count:
            raise DeviceError(f'device {spec} does not exist: this machine has {count} GPU(s), '
                              f'numbered 0..{count - 1}')
    elif spec == '@intel64':
        if not chainer.backends.intel64.is_ideep_available():
            raise DeviceError('device @intel64 needs iDeep (pip install ideep4py), which is not '
                              'available here; use --device -1')
    return chainer.get_device(spec)
