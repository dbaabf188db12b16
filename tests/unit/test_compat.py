"""distmulti._compat: each patch is needed where its breakage exists, fixes it, and is left
out elsewhere; training on numpy 2 gives numpy 1.26's numbers.

A patch is tested by running chainer in a fresh process with every patch but that one (it
must break there) and with all of them (it must work). Breakages that this interpreter does
not have are simulated where that is honest (a module made unimportable, a stand-in CuPy
without cuDNN) and skipped, with the reason, where not (np.sctypes exists before numpy 2).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import distmulti  # noqa: F401  first: applies distmulti._compat before chainer is imported
from distmulti import _compat

import chainer
import chainer.functions as F
from chainer import optimizers as O
from chainer.datasets import TupleDataset
from chainer.iterators import SerialIterator

from distmulti import BaseCNN, MLPHead, MultiHeadNet, MultiHeadUpdater

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPAT_FILE = os.path.join(ROOT, 'distmulti', '_compat.py')
NUMPY = tuple(int(part) for part in np.__version__.split('.')[:2])
PATCHES = ('_numpy_sctypes', '_numpy_float_alias', '_chainer_environment_check',
           '_cuda_libraries_from_wheels', '_cupy_without_cudnn')


def run_python(code, env=None):
    """Runs ``code`` in a new interpreter (this one's), from the repository root."""
    full_env = dict(os.environ, PYTHONWARNINGS='default')
    full_env.pop('CHAINER_CUDNN', None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=full_env)


def with_patches(code, skip=(), before=''):
    """Code that loads _compat.py on its own (not through distmulti, which would apply all
    patches), runs ``before``, applies every patch not in ``skip``, then runs ``code``."""
    calls = ''.join(f'compat.{name}()\n' for name in PATCHES if name not in skip)
    return (f'import importlib.util, sys\n{textwrap.dedent(before)}\n'
            f'spec = importlib.util.spec_from_file_location("compat", {COMPAT_FILE!r})\n'
            'compat = importlib.util.module_from_spec(spec)\n'
            'spec.loader.exec_module(compat)\n'
            f'{calls}{textwrap.dedent(code)}')


def test_apply_is_idempotent_and_lists_what_this_stack_needed():
    before = list(_compat.APPLIED)
    assert _compat.apply() == before and _compat.apply() == before
    assert len(set(before)) == len(before)
    assert ('numpy.sctypes' in before) == (NUMPY >= (2, 0))
    assert ('numpy.float' in before) == (NUMPY >= (1, 24))
    assert isinstance(np.sctypes['int'], list) and np.float is float


# --- np.sctypes --------------------------------------------------------------------------

@pytest.mark.skipif(NUMPY < (2, 0), reason=f'numpy {np.__version__} still has np.sctypes')
def test_without_the_sctypes_patch_chainer_does_not_import_on_numpy_2():
    proc = run_python(with_patches('import chainer', skip=['_numpy_sctypes']))
    assert proc.returncode != 0 and 'sctypes' in proc.stderr, proc.stderr[-2000:]


def test_sctypes_is_numpy_1_table_and_as_strided_works():
    assert np.sctypes['int'] == [np.int8, np.int16, np.int32, np.int64]
    assert np.float32 in np.sctypes['float'] and np.float64 in np.sctypes['float']
    # chainer/functions/array/as_strided.py reads np.sctypes in its backward.
    x = chainer.Variable(np.arange(6, dtype=np.float32))
    y = F.as_strided(x, (2, 2), (2, 1))  # windows [0, 1] and [2, 3] (strides in elements)
    F.sum(y).backward()
    np.testing.assert_array_equal(x.grad, [1, 1, 1, 1, 0, 0])


# --- np.float ----------------------------------------------------------------------------

@pytest.mark.skipif(NUMPY < (1, 24), reason=f'numpy {np.__version__} still has np.float')
def test_without_the_float_alias_resize_images_fails():
    code = '''
        import numpy as np, chainer.functions as F
        F.resize_images(np.ones((1, 1, 2, 2), np.float32), (4, 4))
    '''
    proc = run_python(with_patches(code, skip=['_numpy_float_alias']))
    assert proc.returncode != 0 and "attribute 'float'" in proc.stderr, proc.stderr[-2000:]


def test_resize_images_works():
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    y = F.resize_images(x, (3, 3)).array
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0, 0], [[0, .5, 1], [1, 1.5, 2], [2, 2.5, 3]], rtol=1e-6)


# --- chainer's environment check: numpy.distutils, pkg_resources ------------------------

@pytest.mark.parametrize('module', ['numpy.distutils', 'pkg_resources'])
def test_chainer_imports_when_numpy_distutils_or_pkg_resources_cannot(module):
    # numpy.distutils: gone with numpy 2 on Python 3.12, broken by setuptools >= 74;
    # pkg_resources: gone from setuptools >= 82 or without setuptools. Simulated here by
    # making the module unimportable before anything imports it.
    block = f'sys.modules[{module!r}] = None'
    broken = run_python(with_patches('import chainer', skip=['_chainer_environment_check'],
                                     before=block))
    assert broken.returncode != 0 and 'ModuleNotFoundError' in broken.stderr, \
        broken.stderr[-2000:]
    fixed = run_python(with_patches('''
        import chainer
        assert 'chainer._environment_check' in compat.APPLIED, compat.APPLIED
        assert chainer._environment_check.check() is None
        print('ok')
    ''', before=block))
    assert fixed.returncode == 0 and 'ok' in fixed.stdout, fixed.stderr[-2000:]


def test_environment_check_is_replaced_only_where_chainer_would_fail():
    probe = run_python('''
        import warnings; warnings.simplefilter('ignore')
        for name in ('numpy.distutils.system_info', 'pkg_resources'):
            try:
                __import__(name)
            except Exception:
                print(name)
    ''')
    failing = probe.stdout.split()
    assert ('chainer._environment_check' in _compat.APPLIED) == bool(failing), failing
    if not failing:  # chainer's own check ran
        assert chainer._environment_check.__file__.endswith('_environment_check.py')


# --- CuPy 14: no cupy.cudnn --------------------------------------------------------------

# A stand-in for CuPy, enough for chainer.backends.cuda to import with available = True.
# Its kernels do nothing: this checks chainer's cuDNN detection, not any GPU computation.
FAKE_CUPY = '''
import importlib.machinery, types

class _Any:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else _Any()
    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _Any()

def _module(name, package=False, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        m.__path__ = []
    m.__dict__.update(attrs)
    m.__getattr__ = lambda attr: _Any()
    sys.modules[name] = m
    if '.' in name:
        parent, _, child = name.rpartition('.')
        setattr(sys.modules[parent], child, m)
    return m

class _Device:
    def __init__(self, device=None): self.id = device or 0

_module('cupy', True, __version__=CUPY_VERSION, ndarray=type('ndarray', (), {}),
        ElementwiseKernel=_Any, ReductionKernel=_Any, RawKernel=_Any)
_module('cupy._util', PerformanceWarning=type('PerformanceWarning', (Warning,), {}))
_module('cupy.cuda', True, Device=_Device, Event=type('Event', (), {}),
        Stream=type('Stream', (), {}))
_module('cupy.cuda.cublas')
for name in ('cupyx', 'cupyx.scipy'):
    _module(name, True)
_module('cupyx.scipy.linalg')
_module('cupyx.scipy.special')
if CUDNN == 'library':
    _module('cupy.cudnn', getVersion=lambda: 8900)
    _module('cupy.cuda.cudnn', getVersion=lambda: 8900, available=True)
    _module('cupyx.cudnn')
elif CUDNN == 'module only':
    # CuPy 13 without the cuDNN library: cupy.cuda.cudnn imports with available = False
    # (cupy/cuda/cudnn.py catches the ImportError); cupy.cudnn (cupyx.cudnn) does not import.
    import importlib.abc

    class _NoLibcudnn(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError('libcudnn.so.8: cannot open shared object file: No such file '
                              'or directory')

    class _Finder:
        def find_spec(self, name, path=None, target=None):
            if name in ('cupy.cudnn', 'cupyx.cudnn'):
                return importlib.machinery.ModuleSpec(name, _NoLibcudnn())
            return None

    sys.meta_path.insert(0, _Finder())
    _module('cupy.cuda.cudnn', available=False)
'''

CUDNN_REPORT = '''
import json, os, chainer
from chainer.backends import cuda
print(json.dumps({'available': cuda.available, 'cudnn_enabled': cuda.cudnn_enabled,
                  'version': cuda._cudnn_version, 'auto': chainer.should_use_cudnn('>=auto'),
                  'always': chainer.should_use_cudnn('==always'),
                  'env': os.environ.get('CHAINER_CUDNN'), 'applied': compat.APPLIED}))
'''


def run_with_fake_cupy(with_cudnn, skip=(), env=None, cudnn=None):
    """``cudnn``: 'library' (CuPy 13 with cuDNN), 'module only' (CuPy 13 without the cuDNN
    library) or 'none' (CuPy 14); by default from ``with_cudnn``."""
    cudnn = cudnn or ('library' if with_cudnn else 'none')
    before = f'CUPY_VERSION = {"14.2.0" if cudnn == "none" else "13.6.0"!r}\n' \
             f'CUDNN = {cudnn!r}\n{FAKE_CUPY}'
    proc = run_python(with_patches(CUDNN_REPORT, skip=skip, before=before), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_cupy_without_cudnn_uses_the_plain_cupy_paths_without_a_wrong_warning():
    report, stderr = run_with_fake_cupy(with_cudnn=False)
    assert report['available'] and not report['cudnn_enabled'] and report['version'] == -1
    assert not report['auto'] and not report['always']
    assert report['env'] == '0' and 'cupy without cudnn' in report['applied']
    assert 'cuDNN is not enabled' not in stderr


def test_without_the_cudnn_patch_chainer_tells_to_reinstall_cupy_with_cudnn():
    report, stderr = run_with_fake_cupy(with_cudnn=False, skip=['_cupy_without_cudnn'])
    # chainer's own detection already avoids cuDNN; the patch removes the wrong advice.
    assert report['available'] and not report['cudnn_enabled'] and not report['auto']
    assert 'cuDNN is not enabled' in stderr and 'reinstall CuPy' in stderr


def test_cupy_13_without_the_cudnn_library_gets_no_reinstall_advice():
    report, stderr = run_with_fake_cupy(with_cudnn=False, cudnn='module only')
    assert report['available'] and not report['cudnn_enabled'] and not report['auto']
    assert report['env'] == '0' and 'cuDNN library missing' in report['applied']
    assert 'cuDNN is not enabled' not in stderr


def test_without_the_patch_cupy_13_without_the_library_is_told_to_reinstall():
    report, stderr = run_with_fake_cupy(with_cudnn=False, cudnn='module only',
                                        skip=['_cupy_without_cudnn'])
    assert not report['cudnn_enabled'] and 'reinstall CuPy' in stderr


def test_cupy_with_cudnn_is_left_alone():
    report, stderr = run_with_fake_cupy(with_cudnn=True)
    assert report['available'] and report['cudnn_enabled'] and report['version'] == 8900
    assert report['auto'] and report['env'] is None
    assert 'cupy without cudnn' not in report['applied']


def test_a_chainer_cudnn_setting_of_the_user_is_kept():
    report, _ = run_with_fake_cupy(with_cudnn=False, env={'CHAINER_CUDNN': '1'})
    assert report['env'] == '1' and 'cupy without cudnn' not in report['applied']


def test_with_the_installed_cupy_chainer_reports_its_cudnn_state():
    """The real CuPy, where one imports (no GPU is needed to import it)."""
    probe = run_python('import distmulti, cupy, cupyx.scipy.linalg, cupyx.scipy.special')
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ['?'])[-1]
        pytest.skip(f'CuPy does not import here: {last[:200]}')
    proc = run_python(with_patches(CUDNN_REPORT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    modules = run_python('import importlib.util as u; print(all(u.find_spec(n) is not None '
                         'for n in ("cupy.cudnn", "cupy.cuda.cudnn")))').stdout.strip()
    # Loaded as chainer would, after the patches (CuPy 13 finds cuDNN's wheel through them).
    loads = run_python(with_patches('import cupy.cudnn, cupy.cuda.cudnn')).returncode == 0
    assert report['available'] and report['cudnn_enabled'] == loads
    # CuPy 13 has the modules (they fail to load without the cuDNN library); CuPy 14 not.
    assert ('cupy without cudnn' in report['applied']) == (modules == 'False')
    assert ('cuDNN library missing' in report['applied']) == (modules == 'True' and not loads)
    if not loads:
        assert 'cuDNN is not enabled' not in proc.stderr and not report['auto']


# --- the same numbers as numpy 1.26 ------------------------------------------------------

def reference_run():
    """4 updates of a 3-head net with all 7 optimizer kinds, weights and ignored labels;
    returns the reported values (means over the updates) and two fingerprints (sum, and
    a cosine-weighted sum) of every parameter, plus the dtypes and report types seen."""
    rs = np.random.RandomState(0)
    x = rs.rand(24, 1, 8, 24).astype(np.float32)
    y = rs.randint(0, 10, (24, 3)).astype(np.int32)
    y[::5, 1] = -1
    y[3] = -1
    runs = {
        'a': lambda: {'base': O.Adam(alpha=1e-2), 'head0': O.MomentumSGD(lr=0.05),
                      'head1': O.RMSprop(lr=1e-3), 'head2': O.SGD(lr=0.1)},
        'b': lambda: {'base': O.NesterovAG(lr=0.02), 'head0': O.AdaGrad(lr=0.05),
                      'head1': O.AdaDelta(), 'head2': O.Adam(alpha=1e-3, amsgrad=True)},
    }
    out, dtypes, report_types = {}, set(), set()
    for run, make in runs.items():
        np.random.seed(0)
        net = MultiHeadNet(BaseCNN(channels=4, features=16), [MLPHead(10, hidden=8)
                                                              for _ in range(3)])
        net.initialize(x[:1])
        opts = make()
        for part, opt in opts.items():
            opt.setup(getattr(net, part))
        it = SerialIterator(TupleDataset(x, y), 8, shuffle=False)
        upd = MultiHeadUpdater(it, net, opts, loss_weights=[1.0, 0.5, 2.0])
        summary = chainer.DictSummary()
        for _ in range(4):
            observation = {}
            with chainer.Reporter().scope(observation):
                upd.update()
            report_types |= {type(v) for v in observation.values()}
            summary.add(observation)
        for key, value in summary.compute_mean().items():
            out[f'{run} {key}'] = [float(value)]
        for name, p in sorted(net.namedparams()):
            w = np.cos(np.arange(p.size)).reshape(p.shape)
            out[f'{run} {name}'] = [float(p.array.sum(dtype=np.float64)),
                                   float((p.array * w).sum(dtype=np.float64))]
            dtypes |= {p.array.dtype, p.grad.dtype}
            dtypes |= {v.dtype for v in p.update_rule.state.values()}
    return out, dtypes, report_types


# Computed with numpy 1.26.4 and chainer 7.8.1 on Python 3.11 by
# `python tests/unit/test_compat.py` (numpy 2.5.5 gave the same values to the last digit).
REFERENCE = json.loads('''
{
 "a /base/conv1/W": [-3.1510029970668256, -0.6881299277735462],
 "a /base/conv1/b": [-0.023090695729479194, 0.06090598413502596],
 "a /base/conv2/W": [0.39383876661304384, -3.295366833286932],
 "a /base/conv2/b": [-0.05962947697844356, -0.02833878954116395],
 "a /base/fc/W": [-22.866973305803185, -0.4185326493056344],
 "a /base/fc/b": [-0.03904410568065941, 0.021891325754331392],
 "a /head0/l1/W": [-0.4834412526106462, -2.5718508846335935],
 "a /head0/l1/b": [0.008988206391222775, -0.006683534225888901],
 "a /head0/l2/W": [-3.345183963247109, -1.1430945027264952],
 "a /head0/l2/b": [-2.3283064365386963e-09, -0.0153965017855814],
 "a /head1/l1/W": [2.850978430826217, 0.06702251708684681],
 "a /head1/l1/b": [-0.04301401972770691, -0.014796381467866958],
 "a /head1/l2/W": [-3.0202178698964417, 2.034399877070541],
 "a /head1/l2/b": [-0.04633252648636699, 0.037492272723946896],
 "a /head2/l1/W": [-2.371289527975023, -3.154769909162204],
 "a /head2/l1/b": [0.06442844681441784, 0.08559605678435891],
 "a /head2/l2/W": [-1.195597748272121, 1.3546438316263192],
 "a /head2/l2/b": [-1.5366822481155396e-08, -0.20329396892922494],
 "a main/accuracy_all": [0.0],
 "a main/head0/accuracy": [0.03571428571428571],
 "a main/head0/loss": [2.298150828906468],
 "a main/head1/accuracy": [0.13571428571428573],
 "a main/head1/loss": [2.297776356197539],
 "a main/head2/accuracy": [0.10267857142857142],
 "a main/head2/loss": [2.275599990572248],
 "a main/loss": [7.998238988149735],
 "b /base/conv1/W": [-2.8679293850436807, -0.8138389698837263],
 "b /base/conv1/b": [0.02221356227528304, 0.02280586615711271],
 "b /base/conv2/W": [0.7938097858568653, -3.2904406423289974],
 "b /base/conv2/b": [0.03159158187918365, 0.024238587053257002],
 "b /base/fc/W": [-3.0221411354523298, -0.620765336228945],
 "b /base/fc/b": [0.003176045458531007, 0.012199468330407016],
 "b /head0/l1/W": [-1.7356690997257829, -1.8807243630284907],
 "b /head0/l1/b": [-0.09765148162841797, 0.09423940199128089],
 "b /head0/l2/W": [-5.65170393884182, -1.9676592283692615],
 "b /head0/l2/b": [0.1155109778046608, -0.006389299877699338],
 "b /head1/l1/W": [3.101753798313439, 0.11726629591944793],
 "b /head1/l1/b": [-0.01077885739505291, -0.008412091408060034],
 "b /head1/l2/W": [-2.542588485754095, 2.0124985078360353],
 "b /head1/l2/b": [-0.031031235121190548, 0.02765558864720691],
 "b /head2/l1/W": [-2.356229075230658, -3.126170901603315],
 "b /head2/l1/b": [0.010714217438362539, 0.009414967660541174],
 "b /head2/l2/W": [-1.2840710449963808, 1.305312990968436],
 "b /head2/l2/b": [-0.0024660933122504503, -0.007285874112660079],
 "b main/accuracy_all": [0.0],
 "b main/head0/accuracy": [0.03571428571428571],
 "b main/head0/loss": [2.306314553533282],
 "b main/head1/accuracy": [0.08571428571428572],
 "b main/head1/loss": [2.3090415239334106],
 "b main/head2/accuracy": [0.0625],
 "b main/head2/loss": [2.2896256957735335],
 "b main/loss": [8.040086707047053]
}
''')


def test_training_gives_numpy_1_26_numbers_in_float32():
    out, dtypes, report_types = reference_run()
    # NEP 50 (numpy 2) would show as float64 creeping into parameters, gradients or
    # optimizer states; distmulti reports Python floats, so summaries add in float64.
    assert dtypes == {np.dtype(np.float32)}, dtypes
    assert report_types == {float}, report_types
    assert set(out) == set(REFERENCE)
    # numpy 2.5.5 gave these values exactly on this machine's CPU; other CPUs get other
    # OpenBLAS kernels (OPENBLAS_CORETYPE=Haswell: up to 5e-6 relative after 4 updates).
    for key, expected in REFERENCE.items():
        np.testing.assert_allclose(out[key], expected, rtol=1e-4, atol=1e-5, err_msg=key)


if __name__ == '__main__':
    print(json.dumps(reference_run()[0], indent=1, sort_keys=True))
