#!/bin/sh
# Fills wheels/ with what bench/gpu_check.sh installs on a GPU machine that has Python 3.12,
# numpy 2, CuPy 14 and PyTorch but no package index (about 12 MB; the device tool carries at
# most 64 MiB: pass carry=["wheels"], the folder ignores itself in git):
#   chainer 7.8.1   built here from its sdist (pure Python; the build needs setuptools<74)
#   distmulti       built from this tree
#   six             needed by chainer, not brought by PyTorch
#   pytest          and its dependencies, for the GPU tests
#   scikit-learn    only for the file of handwritten digits that the embedded data reads
#                   (installed without its dependencies: nothing imports sklearn)
# Usage: sh bench/build_wheels.sh      (PYTHON=... to build with another interpreter)
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TARGET="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64"

rm -rf wheels
mkdir wheels
echo '*' > wheels/.gitignore
# The same constraint file install.sh uses, so that chainer's sdist builds (pip < 26.2 reads
# PIP_CONSTRAINT inside build isolation, newer pips PIP_BUILD_CONSTRAINT).
PIP_CONSTRAINT="$PWD/constraints.txt"
PIP_BUILD_CONSTRAINT="$PWD/constraints.txt"
PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_CONSTRAINT PIP_BUILD_CONSTRAINT PIP_DISABLE_PIP_VERSION_CHECK
"$PYTHON" -m pip wheel --no-deps -w wheels 'chainer==7.8.1' .
# Downloads for the GPU machine's Python: its numpy is 2.x, so the constraints (numpy<2) stay
# out of these.
unset PIP_CONSTRAINT PIP_BUILD_CONSTRAINT
# shellcheck disable=SC2086
"$PYTHON" -m pip download $TARGET -d wheels six 'pytest>=7'
# shellcheck disable=SC2086
"$PYTHON" -m pip download $TARGET --no-deps -d wheels 'scikit-learn>=1.2'
ls -l wheels
du -sh wheels
