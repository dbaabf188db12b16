#!/usr/bin/env bash
# The prepared GPU check: on one machine with a CUDA GPU, Python 3.12, numpy 2, CuPy 14 and
# PyTorch, and no package index, it
#   1. stops at once (exit 2) when wheels/ is missing;
#   2. installs the wheels carried in wheels/ (made here by `sh bench/build_wheels.sh`) into
#      a folder of its own, only those the machine lacks (never numpy, CuPy or torch);
#   3. preflight: CuPy allocates and reduces on GPU 0, its generator repeats after a seed,
#      chainer sees CUDA, NCCL answers; the first that fails stops everything (exit 2) with
#      a one-line reason;
#   4. runs `distmulti doctor --device gpu`, the GPU tests (pytest -m gpu) and the
#      compatibility tests against the real CuPy;
#   5. trains the default 3-head network on GPU 0 (`distmulti train --device @cupy:0`);
#   6. times one iteration of the same network in distmulti and in plain PyTorch
#      (bench/gpu_vs_torch.py, batch 64 and 1024),
# each step under a timeout (together at most 8 minutes: 45 + 45 + 30 + 90 + 90 + 90 + 75
# seconds), then prints which steps passed and, last, the timing table.
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
    timeout 45 "$PY" -m pip install --quiet --no-deps --no-index --ignore-requires-python \
        --disable-pip-version-check --target "$SITE" "${wheels[@]}"
else
    timeout 45 "$PY" -c 'import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" "${wheels[@]}"
fi || { say "installing the wheels failed" >&2; exit 2; }

# 3. Preflight, before anything long: each check stops the script with a one-line reason.
export GPU_CHECK_DEVICE=$DEVICE
timeout 45 "$PY" - <<'EOF' || exit 2
import os
import platform
import sys


def stop(reason):
    sys.exit(f'gpu_check: preflight failed: {reason}; nothing else was run')


try:
    import distmulti
    import chainer
    import numpy
    from chainer.backends import cuda
except Exception as e:
    stop(f'distmulti does not import ({type(e).__name__}: {e})')
print(f'gpu_check: Python {platform.python_version()}, numpy {numpy.__version__}, chainer '
      f'{chainer.__version__}, distmulti {distmulti.__version__} from {distmulti.__file__}; '
      f'compatibility patches: {", ".join(distmulti._compat.APPLIED) or "none"}')
if os.environ['GPU_CHECK_DEVICE'] != 'cuda':
    sys.exit(0)
try:
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as e:  # not installed, no driver
    stop(f'no CUDA GPU usable through CuPy ({type(e).__name__}: {e})')
if count < 1:
    stop('CuPy sees no CUDA GPU')
try:
    total = float(cupy.ones(1 << 20, dtype=cupy.float32).sum())
except Exception as e:
    stop(f'CuPy cannot allocate and reduce on GPU 0 ({type(e).__name__}: {e})')
if total != float(1 << 20):
    stop(f'CuPy summed 2**20 ones to {total}')
try:
    cupy.random.seed(0)
    first = cupy.random.rand(8).get()
    cupy.random.seed(0)
    again = cupy.random.rand(8).get()
except Exception as e:
    stop(f"CuPy's random generator fails ({type(e).__name__}: {e})")
if not (first == again).all():
    stop("CuPy's random generator does not repeat after seeding")
if not cuda.available:
    stop('chainer does not see CUDA (chainer.backends.cuda.available is False)')
try:
    from cupy.cuda import nccl
    nccl_version = nccl.get_version()
except Exception as e:
    stop(f'NCCL is not available to CuPy ({type(e).__name__}: {e})')
name = cupy.cuda.runtime.getDeviceProperties(0)['name']
name = name.decode() if isinstance(name, bytes) else name
print(f'gpu_check: preflight ok: {count} GPU(s), GPU 0 {name}, CuPy {cupy.__version__}, '
      f'NCCL {nccl_version}, cuDNN in chainer: {cuda.cudnn_enabled}')
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
    DOCTOR_DEVICE=gpu
    TRAIN=()
    BENCH=(--device cuda --batches '64,1024')
else
    SPEC=@numpy
    DOCTOR_DEVICE=cpu
    TRAIN=(--iterations 60 --train-size 960 --test-size 200)
    BENCH=(--device cpu --batches 64 --quick)
fi
# 4. The doctor (on the CPU: that the CPU install is complete), the GPU tests (skipped, with
# the reason, on the CPU), then the compatibility tests, which
# check chainer against this machine's real CuPy. `-p distmulti` imports distmulti (and so
# applies distmulti._compat) before test modules that import chainer first are collected.
step doctor 30 "$PY" -m distmulti doctor --device "$DOCTOR_DEVICE"
step gpu-tests 90 "$PY" -m pytest -p no:cacheprovider -p distmulti -q -rs -m gpu \
    tests/unit/test_gpu.py
step compat-tests 90 "$PY" -m pytest -p no:cacheprovider -q -rs tests/unit/test_compat.py
# 5. The single-GPU fallback, from the installed wheel (run outside the tree).
step train 90 env -C "$WORK" "$PY" -m distmulti train --device "$SPEC" "${TRAIN[@]}" \
    --no-progress --no-plot --out "$WORK/train"
# 6. distmulti against PyTorch.
if "$PY" -c 'import torch' 2>/dev/null; then
    step timing 75 "$PY" bench/gpu_vs_torch.py "${BENCH[@]}"
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
