"""distmulti doctor on this (CPU-only) install, and its verdict logic. The GPU stack itself is
checked in the GPU images by tests/deploy/test_images.py (every CUDA library loads, kernels
compile for sm_80 and sm_90, no GPU needed)."""
import json
import sys

import pytest

from distmulti import doctor
from tests.helpers import run_cli

try:
    import cupy  # noqa: F401
    HAS_CUPY = True
except Exception:
    HAS_CUPY = False

cpu_only = pytest.mark.skipif(HAS_CUPY, reason='CuPy is installed here: not a CPU-only install')


@cpu_only
def test_on_the_cpu_install_it_says_there_is_no_gpu_stack_and_exits_0():
    proc = run_cli(['doctor', '--json'])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(proc.stdout)
    assert rep['gpus'] == 0 and rep['kernel_compile'] == {} and rep['cupy'] is None
    assert rep['gpu_stack'].startswith('none') and rep['ready'] is True
    assert rep['python'] == '.'.join(map(str, sys.version_info[:3]))
    import numpy
    assert rep['numpy'] == numpy.__version__ and rep['chainer'] == '7.8.1'
    import distmulti._compat
    assert rep['compat_patches'] == distmulti._compat.APPLIED
    # The venv's Open MPI wheel: its CUDA extension answers, and it is not CUDA-aware.
    assert rep['mpi']['library'].startswith('Open MPI v5')
    assert rep['mpi']['cuda_aware'] is False
    assert rep['mpi']['how'] == 'MPIX_Query_cuda_support()'
    words = run_cli(['doctor'])
    assert words.returncode == 0
    assert 'GPU stack: none (CuPy is not installed' in words.stdout
    assert words.stdout.rstrip().endswith('ready for CPU training (no GPU stack installed)')


@cpu_only
def test_asking_for_a_gpu_without_a_gpu_stack_exits_1_with_what_to_install():
    proc = run_cli(['doctor', '--device', 'gpu'])
    assert proc.returncode == 1
    assert "NOT READY: no GPU stack: CuPy is not installed; install with sh install.sh -e " \
           "'.[gpu]'" in proc.stdout


def report(**changes):
    rep = {'problems': [], 'mpi': {'library': 'Open MPI v4.1.4', 'cuda_aware': False},
           'cupy': '13.6.0', 'gpus': 0, 'gpu_error': 'cudaErrorNoDevice'}
    rep.update(changes)
    return rep


def test_the_verdict_names_the_first_thing_to_fix():
    assert doctor.problems_for(report(), 'auto') == []  # a complete stack, no GPU: fine
    assert doctor.problems_for(report(), 'gpu') == ['no GPU visible (cudaErrorNoDevice)']
    assert doctor.problems_for(report(gpus=2), 'gpu') == []
    broken = report(problems=['cuBLAS does not load: libcublas.so.12: cannot open'])
    assert doctor.problems_for(broken, 'gpu')[0].startswith('cuBLAS does not load')
    assert doctor.problems_for(broken, 'cpu') == []  # the CPU does not need cuBLAS
    no_mpi = report(mpi={'error': 'mpi4py does not initialise MPI (x)'})
    assert doctor.problems_for(no_mpi, 'cpu') == ['MPI: mpi4py does not initialise MPI (x)']


def test_an_mpi_that_does_not_start_is_reported_not_raised():
    rep = doctor.mpi_report(python='/bin/false')
    assert rep['error'].startswith('mpi4py does not initialise MPI')


def test_an_architecture_is_checked_before_compiling():
    assert doctor.compile_kernels('90') == "'90' is not an architecture like sm_90"


@pytest.mark.skipif(not HAS_CUPY, reason='needs CuPy and NVRTC (the GPU image has them)')
def test_kernels_compile_for_sm_80_and_sm_90_without_a_gpu():
    assert doctor.compile_kernels('sm_80') is True
    assert doctor.compile_kernels('sm_90') is True
