"""``distmulti doctor``: what this node or image offers for training, checked, in words or JSON.

It reports Python, numpy, chainer and CuPy with the compatibility patches applied; the MPI
library mpi4py is linked to and whether it is CUDA-aware; every CUDA library CuPy loads (the
file and its version) or why it does not load; the GPUs visible; and whether NVRTC compiles
CuPy-style elementwise and reduction kernels for given GPU architectures. Compiling needs no
GPU and no driver, so a GPU image can be checked on a machine without either.

Exit status: 0 when everything the requested device needs works, 1 with the first thing to
fix. Without CuPy (a CPU-only install) there is nothing GPU-related to check: it says so.
"""
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Sequence

DEFAULT_ARCHES = ('sm_80', 'sm_90')
MPI_TIMEOUT = 60

# name, the CuPy module that binds the library (package, name: taken as CuPy takes it, as an
# attribute of the package, so that CuPy 14 loads the library first through cuda-pathfinder),
# the library's file name stem, and its version query: ('property', symbol) for
# <lib>GetProperty(MAJOR|MINOR|PATCH, int*), ('int', symbol) for f(int*) -> e.g. 22501,
# ('size_t', symbol) for size_t f(void), ('nvrtc', symbol) for f(int*, int*).
CUDA_LIBRARIES = (
    ('CUDA runtime', ('cupy_backends.cuda.api', 'runtime'), 'libcudart', ('runtime', None)),
    ('NVRTC', ('cupy_backends.cuda.libs', 'nvrtc'), 'libnvrtc', ('nvrtc', 'nvrtcVersion')),
    ('cuBLAS', ('cupy_backends.cuda.libs', 'cublas'), 'libcublas',
     ('property', 'cublasGetProperty')),
    ('cuRAND', ('cupy_backends.cuda.libs', 'curand'), 'libcurand',
     ('property', 'curandGetProperty')),
    ('cuSOLVER', ('cupy_backends.cuda.libs', 'cusolver'), 'libcusolver',
     ('property', 'cusolverGetProperty')),
    ('cuSPARSE', ('cupy_backends.cuda.libs', 'cusparse'), 'libcusparse',
     ('property', 'cusparseGetProperty')),
    ('cuFFT', ('cupy.cuda', 'cufft'), 'libcufft', ('property', 'cufftGetProperty')),
    ('NCCL', ('cupy.cuda', 'nccl'), 'libnccl', ('int', 'ncclGetVersion')),
    ('cuDNN', ('cupy.cuda', 'cudnn'), 'libcudnn', ('size_t', 'cudnnGetVersion')),
)
# Training works without these: chainer then takes its own kernels (CHAINER_CUDNN=0).
OPTIONAL_LIBRARIES = ('cuDNN',)
# cuda-pathfinder's names (CuPy 14 loads the libraries through it).
_PATHFINDER_NAMES = {'libcudart': 'cudart', 'libnvrtc': 'nvrtc', 'libcublas': 'cublas',
                     'libcurand': 'curand', 'libcusolver': 'cusolver',
                     'libcusparse': 'cusparse', 'libcufft': 'cufft', 'libnccl': 'nccl',
                     'libcudnn': 'cudnn'}

# Kernels in the form CuPy generates them (cupy/_core: CArray/CIndexer parameters, CUPY_FOR,
# a shared-memory tree reduction), after CuPy's own header lines, so that compiling them
# exercises what a first CuPy kernel needs: CuPy's headers, CUDA's cuda_fp16.h (float16),
# the CCCL include paths and NVRTC for the architecture.
ELEMENTWISE_KERNEL = r'''
extern "C" __global__ void distmulti_doctor_relu(
    const CArray<float16, 1, true, true> _raw_x, CArray<float, 1, true, true> _raw_y,
    CIndexer<1, true> _ind) {
  CUPY_FOR(i, _ind.size()) {
    _ind.set(i);
    const float16 &x = _raw_x[_ind.get()];
    float &y = _raw_y[_ind.get()];
    y = max(float(x), 0.0f);
  }
}
'''
REDUCTION_KERNEL = r'''
typedef float _type_reduce;
extern "C" __global__ void distmulti_doctor_sum(
    const CArray<float, 1, true, true> _raw_in0, CArray<float, 1, true, true> _raw_out0,
    CIndexer<1, true> _in_ind, CIndexer<1, true> _out_ind, const int _block_stride) {
  __shared__ char _sdata_raw[512 * sizeof(_type_reduce)];
  _type_reduce *_sdata = reinterpret_cast<_type_reduce*>(_sdata_raw);
  unsigned int _tid = threadIdx.x;
  _type_reduce _s = _type_reduce(0);
  for (ptrdiff_t _i = blockIdx.x * blockDim.x + _tid; _i < _in_ind.size();
       _i += (ptrdiff_t)blockDim.x * gridDim.x) {
    _in_ind.set(_i);
    _s += _raw_in0[_in_ind.get()];
  }
  _sdata[_tid] = _s;
  __syncthreads();
  for (unsigned int _j = blockDim.x / 2; _j >= _block_stride && _j > 0; _j >>= 1) {
    if (_tid < _j) _sdata[_tid] += _sdata[_tid + _j];
    __syncthreads();
  }
  if (_tid == 0) {
    _out_ind.set(0);
    atomicAdd(&_raw_out0[_out_ind.get()], _sdata[0]);
  }
}
'''


def report(arches: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Everything ``distmulti doctor --json`` prints, as a dictionary."""
    import numpy
    import distmulti  # noqa: F401  applies the compatibility patches first
    from distmulti import _compat
    from distmulti._version import __version__
    out: Dict[str, Any] = {
        'distmulti': __version__, 'python': platform.python_version(),
        'numpy': numpy.__version__, 'chainer': _version_of('chainer'),
        'compat_patches': list(_compat.APPLIED), 'mpi': mpi_report(),
        'cupy': _compat.cupy_version(), 'cuda_libraries': {}, 'nccl': None, 'cudnn': None,
        'gpus': 0, 'gpu_devices': [], 'kernel_compile': {}, 'problems': [],
    }
    if out['cupy'] is None:
        out['gpu_stack'] = 'none (CuPy is not installed: a CPU-only install)'
        return out
    try:
        import cupy  # noqa: F401
    except Exception as e:  # a broken install: nothing below can work
        out['problems'].append(f'CuPy {out["cupy"]} does not import ({_one_line(e)}); '
                               f'reinstall with the gpu extra')
        out['gpu_stack'] = 'broken'
        return out
    out['gpu_stack'] = f'CuPy {out["cupy"]}'
    out['chainer_cuda'] = _chainer_cuda()
    out['cuda_libraries'] = cuda_libraries(int(out['cupy'].split('.')[0]))
    for name, entry in out['cuda_libraries'].items():
        if 'error' in entry and name not in OPTIONAL_LIBRARIES:
            out['problems'].append(f'{name} does not load: {entry["error"]}')
    out['nccl'] = out['cuda_libraries'].get('NCCL', {}).get('version')
    out['cudnn'] = out['cuda_libraries'].get('cuDNN', {}).get('version')
    out['gpu_devices'], gpu_error = gpus()
    out['gpus'] = len(out['gpu_devices'])
    if gpu_error:
        out['gpu_error'] = gpu_error
    if not arches:
        arches = sorted({d['arch'] for d in out['gpu_devices']}) or list(DEFAULT_ARCHES)
    for arch in arches:
        out['kernel_compile'][arch] = compile_kernels(arch)
        if out['kernel_compile'][arch] is not True:
            out['problems'].append(f'CuPy kernels do not compile for {arch}: '
                                   f'{out["kernel_compile"][arch]}')
    return out


def problems_for(rep: Dict[str, Any], device: str) -> List[str]:
    """What stands between this machine and training on ``device`` (auto, cpu or gpu)."""
    found = list(rep['problems'])
    if 'error' in rep['mpi']:
        found.append(f'MPI: {rep["mpi"]["error"]}')
    if device == 'cpu':
        return [p for p in found if p.startswith('MPI')]
    if device == 'gpu':
        if rep['cupy'] is None:
            found.insert(0, "no GPU stack: CuPy is not installed; install with "
                            "sh install.sh -e '.[gpu]'")
        elif rep['gpus'] == 0:
            found.append(f'no GPU visible ({rep.get("gpu_error") or "CUDA sees 0 devices"})')
    return found


def mpi_report(python: str = sys.executable, timeout: float = MPI_TIMEOUT) -> Dict[str, Any]:
    """The MPI library mpi4py loads and whether it is CUDA-aware, asked in a child process
    (initialising MPI here could hang or abort the doctor itself)."""
    try:
        proc = subprocess.run([python, '-c', _MPI_PROBE], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'initialising MPI did not finish within {timeout:.0f} s'}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        return {'error': f'mpi4py does not initialise MPI ({tail[:300]})'}
    return json.loads(lines[-1])


# Run in a child process. Open MPI: MPIX_Query_cuda_support() from its CUDA extension
# (1 when built with CUDA and CUDA support is on at run time); MPICH 4:
# MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA = 0, &flag); either looked up in the libmpi
# file that mpi4py loaded. Without the symbol, Open MPI's ompi_info answers; else unknown.
_MPI_PROBE = r'''
import ctypes, json, re, shutil, subprocess
from mpi4py import MPI
out = {'library': MPI.Get_library_version().replace('\0', '').strip().splitlines()[0],
       'mpi4py': __import__('mpi4py').__version__, 'cuda_aware': None, 'how': 'unknown'}
maps = open('/proc/self/maps').read()
libs = sorted(set(re.findall(r'(/\S*/lib(?:mpi|mpich)\.so[.\d]*)\s*$', maps, re.M)))
out['path'] = libs[0] if libs else None
for path in libs:
    lib = ctypes.CDLL(path)
    if hasattr(lib, 'MPIX_Query_cuda_support'):
        out['cuda_aware'] = bool(lib.MPIX_Query_cuda_support())
        out['how'] = 'MPIX_Query_cuda_support()'
        break
    if hasattr(lib, 'MPIX_GPU_query_support'):
        flag = ctypes.c_int(0)
        lib.MPIX_GPU_query_support(0, ctypes.byref(flag))
        out['cuda_aware'] = bool(flag.value)
        out['how'] = 'MPIX_GPU_query_support(CUDA)'
        break
else:
    if shutil.which('ompi_info'):
        text = subprocess.run(['ompi_info', '--parsable', '--all'], capture_output=True,
                              text=True, timeout=30).stdout
        found = re.search(r'mpi_built_with_cuda_support:value:(\w+)', text)
        if found:
            out['cuda_aware'] = found.group(1) == 'true'
            out['how'] = 'ompi_info (built with CUDA support)'
print(json.dumps(out))
'''


def cuda_libraries(cupy_major: int) -> Dict[str, Dict[str, Any]]:
    """``{name: {'path', 'version'} or {'error'}}`` for each CUDA library CuPy uses, loaded
    as CuPy loads it (importing the CuPy module that binds it)."""
    import importlib
    found: Dict[str, Dict[str, Any]] = {}
    for name, module, stem, query in CUDA_LIBRARIES:
        if name == 'cuDNN' and cupy_major >= 14:
            found[name] = {'path': None, 'version': None,
                           'note': 'CuPy 14 has no cuDNN binding; chainer uses its own kernels'}
            continue
        package, attr = module
        try:
            mod = getattr(importlib.import_module(package), attr, None)
            if not isinstance(mod, types.ModuleType):
                mod = importlib.import_module(f'{package}.{attr}')
            if getattr(mod, 'available', True) is False:
                raise ImportError(f'CuPy could not load {stem}')
        except Exception as e:
            found[name] = {'error': _one_line(e)}
            continue
        path = _mapped_library(stem) or _pathfinder_path(stem)
        entry: Dict[str, Any] = {'path': path}
        try:
            entry['version'] = _library_version(query, path)
        except Exception as e:  # the library loads; its version could not be asked
            entry['version'] = None
            entry['version_error'] = _one_line(e)
        if path is None and name == 'CUDA runtime':
            entry['path'] = f'linked into CuPy ({mod.__file__})'
        found[name] = entry
    return found


def gpus() -> tuple:
    """([{'index', 'name', 'compute_capability', 'arch'}], error or None) of visible GPUs."""
    import cupy
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver (a build machine, a container without --gpus)
        return [], _one_line(e)
    devices = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props['name']
        cc = f'{props["major"]}{props["minor"]}'
        devices.append({'index': index,
                        'name': name.decode() if isinstance(name, bytes) else str(name),
                        'compute_capability': f'{props["major"]}.{props["minor"]}',
                        'arch': f'sm_{cc}'})
    return devices, None


def compile_kernels(arch: str) -> Any:
    """True when NVRTC compiles the elementwise and reduction kernels for ``arch`` (sm_XY)
    with CuPy's headers and options, else the compiler's message. Needs no GPU."""
    if not re.fullmatch(r'sm_\d{2,3}', arch):
        return f'{arch!r} is not an architecture like sm_90'
    try:
        from cupy._core import core
        from cupy.cuda import compiler
        from cupy_backends.cuda.libs import nvrtc
        names = list(core._cupy_header_list)
        # CuPy 14 keeps float16 in its own header, which it adds to kernels that use it.
        if os.path.isfile(os.path.join(core._get_header_dir_path(), 'cupy', 'float16.cuh')):
            names.append('cupy/float16.cuh')
        header = ''.join(f'#include <{name}>\n' for name in names)
        # CuPy 13 adds the CUDA runtime wheel's headers in the compiler module; CuPy 14's
        # assemble_cupy_compiler_options finds them itself (cuda-pathfinder).
        wheel_headers = getattr(compiler, '_get_extra_include_dir_opts', lambda: ())
        options = tuple(core.assemble_cupy_compiler_options(())) + tuple(wheel_headers()) + (
            f'-arch={arch}', '--device-as-default-execution-space')
        for source in (ELEMENTWISE_KERNEL, REDUCTION_KERNEL):
            program = nvrtc.createProgram(header + source, 'distmulti_doctor.cu', (), ())
            try:
                try:
                    nvrtc.compileProgram(program, options)
                except Exception as e:
                    log = nvrtc.getProgramLog(program).strip()
                    return _one_line(f'{e}: {log}' if log else e, 600)
                if not nvrtc.getCUBIN(program):
                    return 'NVRTC produced no code'
            finally:
                nvrtc.destroyProgram(program)
    except Exception as e:
        return _one_line(e, 600)
    return True


def format_report(rep: Dict[str, Any], problems: List[str]) -> str:
    """The report in words, one fact a line, the verdict last."""
    mpi = rep['mpi']
    lines = [f'distmulti {rep["distmulti"]}, Python {rep["python"]}, numpy {rep["numpy"]}, '
             f'chainer {rep["chainer"]}',
             f'compatibility patches: {", ".join(rep["compat_patches"]) or "none"}']
    if 'error' in mpi:
        lines.append(f'MPI: {mpi["error"]}')
    else:
        aware = {True: 'CUDA-aware', False: 'not CUDA-aware',
                 None: 'CUDA-awareness unknown'}[mpi['cuda_aware']]
        lines.append(f'MPI: {mpi["library"].split(", package:")[0]} ({mpi["path"]}), {aware} '
                     f'({mpi["how"]})')
    lines.append(f'GPU stack: {rep["gpu_stack"]}')
    for name, entry in rep['cuda_libraries'].items():
        if 'error' in entry:
            optional = (' (optional: chainer uses its own kernels instead)'
                        if name in OPTIONAL_LIBRARIES else '')
            lines.append(f'  {name}: MISSING ({entry["error"]}){optional}')
        elif entry.get('note'):
            lines.append(f'  {name}: {entry["note"]}')
        else:
            lines.append(f'  {name} {entry.get("version") or "(version unknown)"}: '
                         f'{entry["path"]}')
    if rep['cupy'] is not None:
        found = ', '.join(f'{d["index"]}: {d["name"]} (compute capability '
                          f'{d["compute_capability"]})' for d in rep['gpu_devices'])
        lines.append(f'GPUs visible: {rep["gpus"]}' + (f' ({found})' if found else
                                                        f' ({rep.get("gpu_error", "")})'))
        for arch, result in rep['kernel_compile'].items():
            lines.append(f'kernel compile {arch}: {"ok" if result is True else result}')
    if problems:
        lines.append(f'NOT READY: {problems[0]}')
        lines += [f'  also: {p}' for p in problems[1:]]
    elif rep['cupy'] is None:
        lines.append('ready for CPU training (no GPU stack installed)')
    else:
        lines.append('ready' + ('' if rep['gpus'] else
                                ' (GPU stack complete; no GPU visible here)'))
    return '\n'.join(lines)


def run(arches: Optional[Sequence[str]], device: str, as_json: bool,
        write: Callable[[str], None] = print) -> int:
    """Runs the checks, writes the report, returns the exit status."""
    rep = report(arches)
    problems = problems_for(rep, device)
    rep['problems'] = problems
    rep['ready'] = not problems
    write(json.dumps(rep, indent=2, sort_keys=True) if as_json else format_report(rep, problems))
    return 0 if not problems else 1


def _chainer_cuda() -> Dict[str, Any]:
    from chainer.backends import cuda
    return {'available': bool(cuda.available), 'cudnn_enabled': bool(cuda.cudnn_enabled)}


def _mapped_library(stem: str) -> Optional[str]:
    """The file of ``stem``.so* that this process has mapped, if any."""
    try:
        with open('/proc/self/maps') as f:
            maps = f.read()
    except OSError:
        return None
    found = re.findall(rf'(/\S*/{re.escape(stem)}\.so[.\d]*)\s*$', maps, re.M)
    return found[0] if found else None


def _pathfinder_path(stem: str) -> Optional[str]:
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        return load_nvidia_dynamic_lib(_PATHFINDER_NAMES[stem]).abs_path
    except Exception:  # not CuPy 14, or pathfinder does not know it
        return None


def _library_version(query, path: Optional[str]) -> Optional[str]:
    kind, symbol = query
    if kind == 'runtime':
        import cupy
        v = cupy.cuda.runtime.runtimeGetVersion()
        return f'{v // 1000}.{v % 1000 // 10}'
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    fn = getattr(lib, symbol)
    if kind == 'nvrtc':
        major, minor = ctypes.c_int(), ctypes.c_int()
        fn(ctypes.byref(major), ctypes.byref(minor))
        return f'{major.value}.{minor.value}'
    if kind == 'property':
        parts = []
        for prop in (0, 1, 2):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
            value = ctypes.c_int()
            fn(prop, ctypes.byref(value))
            parts.append(str(value.value))
        return '.'.join(parts)
    if kind == 'int':  # NCCL: 22501 -> 2.25.1 (2.9 and newer: major*10000 + minor*100 + patch)
        value = ctypes.c_int()
        fn(ctypes.byref(value))
        v = value.value
        return f'{v // 10000}.{v % 10000 // 100}.{v % 100}'
    fn.restype = ctypes.c_size_t  # cuDNN 8: 8907 -> 8.9.7
    v = fn()
    return f'{v // 1000}.{v % 1000 // 100}.{v % 100}'


def _version_of(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception as e:
        return f'does not import ({_one_line(e)})'


def _one_line(error: Any, limit: int = 300) -> str:
    text = ' '.join(str(error).split())
    if isinstance(error, BaseException) and not text:
        text = type(error).__name__
    return text[:limit]
