"""Lets chainer 7.8.1 import and train on today's stack: numpy 2, Python 3.12, setuptools 74
and newer (or none), CuPy 14 (which has no cuDNN).

``distmulti/__init__.py`` calls :func:`apply` before anything imports chainer (a script
that imports chainer first fails on numpy 2). Every patch first checks that its breakage is
present here and otherwise does nothing: with numpy 1.26, Python 3.11 and setuptools<74 only
``numpy.float`` (gone since numpy 1.24) is added. ``apply`` may run any number of times;
:data:`APPLIED` names the patches this process needed.

What is *not* patched, because distmulti never reaches it (see docs/compat.md):
``chainermn.iterators.multi_node_iterator`` (``int()`` of a shape-(1,) array; distmulti
scatters datasets and iterates locally) and ``chainermn.communicators._memory_utility.
unpack_params`` (``xp.array(..., copy=False)`` with a dtype change; only reached when
parameters are not of ``chainer.get_dtype()``, float32 by default).
"""
import importlib.util
import os
import sys
import types
import warnings
from typing import List

import numpy

#: Names of the patches applied in this process, in order.
APPLIED: List[str] = []

# numpy 1.26's table, built from dtypes that numpy 2 still has.
_SCTYPES = {
    'int': [numpy.int8, numpy.int16, numpy.int32, numpy.int64],
    'uint': [numpy.uint8, numpy.uint16, numpy.uint32, numpy.uint64],
    'float': [numpy.float16, numpy.float32, numpy.float64, numpy.longdouble],
    'complex': [numpy.complex64, numpy.complex128, numpy.clongdouble],
    'others': [bool, object, bytes, str, numpy.void],
}


def apply() -> List[str]:
    """Applies every patch this stack needs (idempotent); returns :data:`APPLIED`."""
    _numpy_sctypes()
    _numpy_float_alias()
    _chainer_environment_check()
    _cupy_without_cudnn()
    return APPLIED


def _done(name: str) -> None:
    if name not in APPLIED:
        APPLIED.append(name)


def _has(module: types.ModuleType, name: str) -> bool:
    # numpy 1.20-1.23 still serve np.float with a DeprecationWarning (an error under -W error).
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return hasattr(module, name)


def _numpy_sctypes() -> None:
    # numpy 2 removed np.sctypes. chainer/functions/array/as_strided.py reads
    # np.sctypes['int'] at import (so `import chainer` raises AttributeError) and
    # np.sctypes['float'] in its backward.
    if not _has(numpy, 'sctypes'):
        numpy.sctypes = {kind: list(types_) for kind, types_ in _SCTYPES.items()}
        _done('numpy.sctypes')


def _numpy_float_alias() -> None:
    # numpy 1.24 removed the alias np.float (= float). F.resize_images uses
    # `dtype=numpy.float` (chainer/functions/array/resize_images.py) and raises
    # AttributeError. It is the only removed alias chainer and chainermn use in code
    # (np.bool appears only in a docstring, and numpy 2 has np.bool again).
    if not _has(numpy, 'float'):
        numpy.float = float
        _done('numpy.float')


def _chainer_environment_check() -> None:
    # `import chainer` runs chainer/_environment_check.py, which imports
    # numpy.distutils.system_info (absent on Python 3.12 with numpy 2, and failing with
    # setuptools 74 and newer: no distutils.msvccompiler) and pkg_resources (absent from
    # setuptools 82 and newer, and wherever setuptools is not installed). Its checks only
    # warn: about Python 3.5.0, about Accelerate on macOS, and about CuPy/iDeep versions
    # outside chainer 7's ranges. When either import fails here, chainer gets this
    # module's no-op check instead, so neither numpy.distutils nor setuptools is needed
    # at run time.
    if 'chainer' in sys.modules or 'chainer._environment_check' in sys.modules:
        return
    missing = [name for name in ('numpy.distutils.system_info', 'pkg_resources')
               if not _imports(name)]
    if not missing:
        return
    module = types.ModuleType('chainer._environment_check', (
        'Stand-in installed by distmulti._compat: chainer\'s own check needs '
        + ' and '.join(missing) + ', which cannot be imported here.'))
    module.check = lambda: None
    sys.modules['chainer._environment_check'] = module
    _done('chainer._environment_check')


def _imports(name: str) -> bool:
    """Whether ``import name`` succeeds (its warnings, about chainer's use of deprecated
    modules, are not shown; chainer's own import of it later is then a no-op)."""
    try:
        if importlib.util.find_spec(name.split('.')[0]) is None:
            return False
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            importlib.import_module(name)
        return True
    except Exception:  # ImportError, or an AttributeError/OSError inside the module
        return False


def _cupy_without_cudnn() -> None:
    # CuPy 14 dropped cuDNN: it has neither cupy.cudnn nor cupy.cuda.cudnn. chainer's
    # chainer/backends/cuda.py then leaves cudnn_enabled = False and _cudnn_version = -1,
    # so should_use_cudnn() is always False and every function takes its plain CuPy
    # kernels (convolution via im2col + tensordot, pooling, relu and softmax kernels), as
    # wanted. What goes wrong is that `import chainer` (relu.py builds a kernel at import)
    # warns 'cuDNN is not enabled. Please reinstall CuPy after you install cudnn', advice
    # that cannot work with CuPy 14. CHAINER_CUDNN=0 is chainer's own switch for "do not
    # use cuDNN": it gives the same state without that warning. A value the user set is
    # kept; child processes (MPI ranks) inherit the variable, and compute the same anyway.
    if 'chainer' in sys.modules or 'CHAINER_CUDNN' in os.environ:
        return
    try:
        if importlib.util.find_spec('cupy') is None:
            return
        has_cudnn = all(importlib.util.find_spec(name) is not None
                        for name in ('cupy.cudnn', 'cupy.cuda.cudnn'))
    except ModuleNotFoundError:  # 'cupy.cuda' is not a package: no cudnn under it
        has_cudnn = False
    except Exception:  # CuPy itself fails to import: chainer will run without CUDA
        return
    if not has_cudnn:
        os.environ['CHAINER_CUDNN'] = '0'
        _done('cupy without cudnn')
