"""Lets chainer 7.8.1 import and train on today's stack: numpy 2, Python 3.12, setuptools 74
and newer (or none), CuPy 14 (which has no cuDNN), CuPy 13 with its CUDA libraries as PyPI
wheels (which it does not find by itself) and without a cuDNN library.

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
import ctypes
import importlib.util
import os
import re
import sys
import types
import warnings
from typing import List, Optional

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
    _cuda_libraries_from_wheels()
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


# (folder under site-packages/nvidia, soname) of each CUDA 12 library CuPy 13 links by name,
# in the order they are loaded; their own dependencies resolve through their RUNPATHs.
CUDA12_WHEEL_LIBRARIES = (
    ('cuda_nvrtc', 'libnvrtc.so.12'),
    ('cublas', 'libcublas.so.12'), ('curand', 'libcurand.so.10'), ('cufft', 'libcufft.so.11'),
    ('cusparse', 'libcusparse.so.12'), ('cusolver', 'libcusolver.so.11'),
    ('cudnn', 'libcudnn_ops_infer.so.8'), ('cudnn', 'libcudnn_ops_train.so.8'),
    ('cudnn', 'libcudnn_cnn_infer.so.8'), ('cudnn', 'libcudnn_cnn_train.so.8'),
    ('cudnn', 'libcudnn_adv_infer.so.8'), ('cudnn', 'libcudnn_adv_train.so.8'),
    ('cudnn', 'libcudnn.so.8'),
)
#: soname -> path of every library that _cuda_libraries_from_wheels loaded.
LOADED_FROM_WHEELS = {}


def cupy_version() -> Optional[str]:
    """The installed CuPy's version, read from its files (CuPy is not imported), or None."""
    try:
        spec = importlib.util.find_spec('cupy')
    except Exception:
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), '_version.py')) as f:
            found = re.search(r"__version__ = '([^']+)'", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def _cuda_libraries_from_wheels() -> None:
    # CuPy 13 links cuBLAS, cuRAND, cuFFT, cuSPARSE, cuSOLVER, NVRTC and cuDNN by soname
    # (cupy_backends/cuda/libs/*.so) and looks for none of them in pip's nvidia-* wheels
    # (cupy/_environment.py finds only NCCL and cuTENSOR there), so with the CUDA libraries
    # installed as wheels (the gpu extra) its first use fails with "libcublas.so.12: cannot
    # open shared object file" unless LD_LIBRARY_PATH names every wheel's folder. Loading each
    # wheel's library by its path first makes the dynamic linker reuse it for that soname,
    # so no path has to be set. A library this process can already load by soname (a system
    # CUDA toolkit on the library path) is left to that; CuPy 14 finds the wheels itself
    # (cuda-pathfinder) and is left alone.
    if not sys.platform.startswith('linux'):
        return
    version = cupy_version()
    if version is None or not version.startswith('13.'):
        return
    try:
        spec = importlib.util.find_spec('nvidia')
    except Exception:
        return
    if spec is None or not spec.submodule_search_locations:
        return
    roots = list(spec.submodule_search_locations)
    for folder, soname in CUDA12_WHEEL_LIBRARIES:
        paths = [os.path.join(root, folder, 'lib', soname) for root in roots]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path is None:
            continue
        try:
            ctypes.CDLL(soname)  # already on the library path: use that one
            continue
        except OSError:
            pass
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:  # CuPy reports the library when it needs it; doctor says why
            continue
        LOADED_FROM_WHEELS[soname] = path
    if LOADED_FROM_WHEELS:
        _done('cuda libraries from wheels')


def _cupy_without_cudnn() -> None:
    # CuPy 14 dropped cuDNN: it has neither cupy.cudnn nor cupy.cuda.cudnn; CuPy 13 has both
    # modules, but they fail to import when the cuDNN library cannot be loaded
    # (cupy.cuda.cudnn.available is then False). chainer's chainer/backends/cuda.py then
    # leaves cudnn_enabled = False and _cudnn_version = -1,
    # so should_use_cudnn() is always False and every function takes its plain CuPy
    # kernels (convolution via im2col + tensordot, pooling, relu and softmax kernels), as
    # wanted. What goes wrong is that `import chainer` (relu.py builds a kernel at import)
    # warns 'cuDNN is not enabled. Please reinstall CuPy after you install cudnn', advice
    # that does not help: CuPy 14 has no cuDNN at all, and CuPy 13 needs the library (the
    # gpu extra's nvidia-cudnn-cu12), not a reinstall. CHAINER_CUDNN=0 is chainer's own switch
    # for "do not use cuDNN": it gives the same state without that warning. So whether cuDNN
    # is there is decided by loading it as chainer would (the library, not the module's
    # presence). A value the user set is kept; child processes (MPI ranks) inherit the
    # variable, and compute the same anyway.
    if 'chainer' in sys.modules or 'CHAINER_CUDNN' in os.environ:
        return
    try:
        if importlib.util.find_spec('cupy') is None:
            return
        has_module = all(importlib.util.find_spec(name) is not None
                         for name in ('cupy.cudnn', 'cupy.cuda.cudnn'))
    except ModuleNotFoundError:  # 'cupy.cuda' is not a package: no cudnn under it
        has_module = False
    except Exception:  # CuPy itself fails to import: chainer will run without CUDA
        return
    if has_module and not _cudnn_loads():
        os.environ['CHAINER_CUDNN'] = '0'
        _done('cuDNN library missing')
    elif not has_module:
        os.environ['CHAINER_CUDNN'] = '0'
        _done('cupy without cudnn')


def _cudnn_loads() -> bool:
    """Whether CuPy's cuDNN binding loads (what chainer's ``import cupy.cudnn`` needs). CuPy's
    own warning about a missing library is not shown: chainer reports the state."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import cupy.cuda.cudnn as libcudnn
            if not getattr(libcudnn, 'available', True):
                return False
            importlib.import_module('cupyx.cudnn')
        return True
    except Exception:  # ImportError (no libcudnn.so.8), or CuPy failing on this machine
        return False
