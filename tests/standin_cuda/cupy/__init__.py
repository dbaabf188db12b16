"""Stand-in for CuPy at the CUDA runtime boundary (see ../README.md). Not CuPy: it records
what would reach a GPU and computes nothing."""
import importlib.machinery
import json
import os
import sys
import types

import numpy

from cupy._version import __version__  # noqa: F401  (14.x: no cuDNN, like CuPy 14)

GPUS = int(os.environ.get('STANDIN_CUDA_GPUS', '2'))
_LOG_DIR = os.environ.get('STANDIN_CUDA_LOG')
_stack = [0]          # the current device; `with Device(i)` pushes, use() replaces the base


class StandInStop(RuntimeError):
    """Raised at the first array allocation: the stand-in cannot compute."""


def record(event, **fields):
    entry = dict(event=event, device=_stack[-1],
                 rank=int(os.environ.get('OMPI_COMM_WORLD_RANK', os.environ.get('PMI_RANK', 0))),
                 **fields)
    if _LOG_DIR:
        with open(os.path.join(_LOG_DIR, f'{os.getpid()}.jsonl'), 'a') as f:
            f.write(json.dumps(entry) + '\n')


class _Any:
    """Whatever chainer builds at import (kernels, fused functions): inert, never a device."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Any()

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _Any()


def _module(name, package=False, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    module.__dict__.update(attrs)
    module.__getattr__ = lambda attr: _Any()
    sys.modules[name] = module
    parent, _, child = name.rpartition('.')
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


class ndarray:  # noqa: N801  (CuPy's name)
    pass


class Device:
    def __init__(self, device=None):
        self.id = _stack[-1] if device is None else int(device)

    def use(self):
        record('use', index=self.id)
        _stack[0] = self.id

    def __enter__(self):
        _stack.append(self.id)
        return self

    def __exit__(self, *exc):
        _stack.pop()

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return self.id

    @property
    def pci_bus_id(self):
        return f'0000:{self.id + 1:02x}:00.0'


def _get_device_count():
    record('count')
    return GPUS


def _alloc(*args, **kwargs):
    record('alloc')
    raise StandInStop(f'stand-in CUDA: array allocation on device {_stack[-1]}')


class RandomState:
    """cuRAND's semantics as CuPy uses them: seed() restarts the stream; draws advance it."""

    def __init__(self, seed=None):
        self._rs = numpy.random.RandomState(seed)  # CuPy: CUPY_SEED or os.urandom

    def seed(self, seed=None):
        record('seed', value=None if seed is None else int(seed))
        self._rs = numpy.random.RandomState(None if seed is None else int(seed) % 2 ** 32)

    def randint(self, low, high=None, size=None):
        record('draw')
        return self._rs.randint(low, high, size)


_random_states = {}


def _get_random_state():
    if _stack[-1] not in _random_states:
        _random_states[_stack[-1]] = RandomState()
    return _random_states[_stack[-1]]


def _seed(seed=None):
    _get_random_state().seed(seed)


class _NcclCommunicator:
    def __init__(self, ndev, comm_id, rank):
        record('nccl', ndev=ndev, nccl_rank=rank)

    def destroy(self):
        pass


_module('cupy._util', PerformanceWarning=type('PerformanceWarning', (Warning,), {}))
_module('cupy.cuda', True, Device=Device, Event=type('Event', (), {}),
        Stream=type('Stream', (), {'null': _Any()}), alloc=_alloc)
_module('cupy.cuda.runtime', getDeviceCount=_get_device_count,
        getDevice=lambda: _stack[-1], is_hip=False)
_module('cupy.cuda.cublas')
_module('cupy.cuda.nccl', get_build_version=lambda: 22501, get_version=lambda: 22501,
        get_unique_id=lambda: (0,) * 128, NcclCommunicator=_NcclCommunicator,
        NcclError=type('NcclError', (RuntimeError,), {}), NCCL_FLOAT=7, NCCL_FLOAT16=6,
        NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_SUM=0)
_module('cupy.random', seed=_seed, get_random_state=_get_random_state, RandomState=RandomState)
for _name in ('asarray', 'array', 'empty', 'zeros', 'ones', 'empty_like', 'zeros_like'):
    globals()[_name] = _alloc
ElementwiseKernel = ReductionKernel = RawKernel = _Any


def get_array_module(*args):
    return numpy  # no stand-in array ever exists: allocating one stops the process


def __getattr__(name):
    return _Any()
