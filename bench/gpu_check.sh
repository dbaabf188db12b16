#!/usr/bin/env bash
# The prepared GPU check: on one machine with a CUDA GPU, Python 3.12, numpy 2, CuPy 14 and
# PyTorch, and no package index, it
#   1. stops at once (exit 2) when no GPU is usable through CuPy, or wheels/ is missing;
#   2. installs the wheels carried in wheels/ (made here by `sh bench/build_wheels.sh`) into
#      a folder of its own, only those the machine lacks (never numpy, CuPy or torch);
#   3. runs the GPU tests (pytest -m gpu) and the compatibility tests against the real CuPy;
#   4. trains the default 3-head network on GPU 0 (`distmulti train --device @cupy:0`);
#   5. times one iteration of the same network in distmulti and in plain PyTorch
#      (bench/gpu_vs_torch.py, batch 64 and 1024),
# each step under a timeout, then prints which steps passed and, last, the timing table.
# Usage, from the repository root: bash bench/gpu_check.sh
#   PYTHON=python3.12  the interpreter to use (default python3)
#   OUT=DIR            where the logs and the training run go (default: a temporary folder);
#                      the wheels are installed into a temporary folder of their own
#   DEVICE=cpu         rehearsal on a machine without a GPU: the same steps on the CPU (GPU
#                      tests skip, training and timing on the CPU, shorter); checks this script
# Exit status: 0 every step passed, 1 a step failed (see the summary), 2 nothing could run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}

say() { echo "gpu_check: $*"; }

if ! ls wheels/chainer-7.8.1-*.whl wheels/distmulti-*.whl >/dev/null 2>&1; then
    say "wheels/ has no chainer or distmulti wheel: run 'sh bench/build_wheels.sh' where" \
        "there is a package index, and carry wheels/ along" >&2
    exit 2
fi
if [ "$DEVICE" = cuda ]; then
    if ! timeout 120 "$PY" - <<'EOF'
import sys
try:
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
except Exception as e:  # not installed, no driver, no device
    sys.exit(f'gpu_check: no CUDA GPU usable through CuPy here ({type(e).__name__}: {e}); '
             'nothing was run (DEVICE=cpu rehearses the steps on the CPU)')
if n < 1:
    sys.exit('gpu_check: CuPy sees no CUDA GPU here; nothing was run')
name = cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()
print(f'gpu_check: {n} GPU(s), GPU 0: {name}')
EOF
    then
        exit 2
    fi
fi

WORK=${OUT:-$(mktemp -d)}/gpu_check
SITE=$(mktemp -d)/site  # not under OUT: only the logs and the training run come back
mkdir -p "$WORK"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 2. Install what is missing, with pip if there is one, else by unpacking the wheels (they
# are zip files laid out as site-packages; no console scripts are needed: python -m is used).
missing() {  # missing MODULE: true when the machine cannot import MODULE (a find, no import)
    ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" \
        2>/dev/null
}
wheels=(wheels/chainer-7.8.1-*.whl wheels/distmulti-*.whl)
missing six && wheels+=(wheels/six-*.whl)
missing pytest && wheels+=(wheels/pytest-*.whl wheels/pluggy-*.whl wheels/iniconfig-*.whl
                            wheels/packaging-*.whl wheels/pygments-*.whl)
missing sklearn && wheels+=(wheels/scikit_learn-*.whl)  # only its digits file is read
say "installing into $SITE: ${wheels[*]}"
rm -rf "$SITE"
if "$PY" -m pip --version >/dev/null 2>&1; then
    timeout 180 "$PY" -m pip install --quiet --no-deps --no-index --ignore-requires-python \
        --disable-pip-version-check --target "$SITE" "${wheels[@]}"
else
    timeout 180 "$PY" -c 'import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" "${wheels[@]}"
fi || { say "installing the wheels failed" >&2; exit 2; }

timeout 300 "$PY" - <<'EOF' || { say "distmulti does not import; nothing else was run" >&2; exit 2; }
import platform
import distmulti
import chainer
import numpy
from chainer.backends import cuda
from importlib import metadata
try:
    setuptools_version = metadata.version('setuptools')
except metadata.PackageNotFoundError:
    setuptools_version = 'not installed'
try:
    import torch
    torch_version = f'{torch.__version__} (CUDA {torch.version.cuda})'
except ImportError:
    torch_version = 'not installed'
cupy_version = cuda.cupy.__version__ if cuda.available else 'not available'
print(f'gpu_check: Python {platform.python_version()}, numpy {numpy.__version__}, '
      f'setuptools {setuptools_version}, CuPy {cupy_version}, cuDNN in chainer: '
      f'{cuda.cudnn_enabled}, PyTorch {torch_version}, chainer {chainer.__version__}, '
      f'distmulti {distmulti.__version__} from {distmulti.__file__}')
print(f'gpu_check: compatibility patches applied: {", ".join(distmulti._compat.APPLIED)}')
EOF

SUMMARY=()
FAILED=0
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a timeout, output to screen and log
    local name=$1 limit=$2
    shift 2
    say "--- $name (at most ${limit} s): $*"
    local start rc took
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    took=$(( $(date +%s) - start ))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("ok      $name (${took} s)")
    else
        local why="exit $rc"
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit} s"
        SUMMARY+=("FAILED  $name: $why (${took} s), log $WORK/$name.log")
        FAILED=1
    fi
}

if [ "$DEVICE" = cuda ]; then
    SPEC=@cupy:0
    TRAIN=()
    BENCH=(--device cuda --batches '64,1024')
else
    SPEC=@numpy
    TRAIN=(--iterations 60 --train-size 960 --test-size 200)
    BENCH=(--device cpu --batches 64 --quick)
fi
# 3. GPU tests (skipped, with the reason, on the CPU), then the compatibility tests, which
# check chainer against this machine's real CuPy. `-p distmulti` imports distmulti (and so
# applies distmulti._compat) before test modules that import chainer first are collected.
step gpu-tests 300 "$PY" -m pytest -p no:cacheprovider -p distmulti -q -rs -m gpu \
    tests/unit/test_gpu.py
step compat-tests 180 "$PY" -m pytest -p no:cacheprovider -q -rs tests/unit/test_compat.py
# 4. The single-GPU fallback, from the installed wheel (run outside the tree).
step train 300 env -C "$WORK" "$PY" -m distmulti train --device "$SPEC" "${TRAIN[@]}" \
    --no-progress --no-plot --out "$WORK/train"
# 5. distmulti against PyTorch.
if "$PY" -c 'import torch' 2>/dev/null; then
    step timing 300 "$PY" bench/gpu_vs_torch.py "${BENCH[@]}"
else
    SUMMARY+=("FAILED  timing: PyTorch is not installed for $PY")
    FAILED=1
fi

echo
say "summary (logs in $WORK):"
printf '  %s\n' "${SUMMARY[@]}"
if [ -f "$WORK/timing.log" ]; then
    echo
    sed -n '/^distmulti .* vs PyTorch/,$p' "$WORK/timing.log"
fi
exit "$FAILED"
