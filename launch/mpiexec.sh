#!/usr/bin/env bash
# Train on N ranks of this machine: a thin wrapper around `distmulti launch -n N -- ...`.
# distmulti builds the mpiexec command (Open MPI or MPICH): --allow-run-as-root as root,
# --oversubscribe past the core count, one core share of OpenMP threads per rank, ranks as
# `python -m mpi4py -m distmulti train` so one failing rank ends the job. See launch/README.md.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/mpiexec.sh [-n N] [--mpi-arg ARG]... [--dry-run] [-- TRAIN_ARGS...]

Runs `distmulti train TRAIN_ARGS` on N ranks of this machine through mpiexec.

  -n, --nprocs N   number of ranks (default: the number of cores, from nproc)
  --mpi-arg ARG    extra mpiexec argument, repeatable (e.g. --mpi-arg --bind-to --mpi-arg none)
  --dry-run        print the mpiexec command instead of running it
  -h, --help       this text

Environment: DISTMULTI  the distmulti command (default: this repository's .venv/bin/distmulti
                        if it exists, else distmulti on PATH)
Exit status: distmulti launch's: 0 only when the run completed (this run wrote OUT/result.json,
last, on rank 0); else mpiexec's non-zero status, or 1 when mpiexec exited 0 without
result.json; 2 for bad arguments (docs/operators.md, "Exit codes").

Example: launch/mpiexec.sh -n 2 -- --epoch 1 --out runs/two
USAGE
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
distmulti=${DISTMULTI:-}
if [[ -z $distmulti ]]; then
    if [[ -x $here/../.venv/bin/distmulti ]]; then
        distmulti=$here/../.venv/bin/distmulti
    else
        distmulti=distmulti
    fi
fi

nprocs=$(nproc)
opts=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -n|--nprocs) [[ $# -ge 2 ]] || { echo "launch/mpiexec.sh: $1 needs a value" >&2; exit 2; }
                     nprocs=$2; shift 2 ;;
        --mpi-arg)   [[ $# -ge 2 ]] || { echo "launch/mpiexec.sh: $1 needs a value" >&2; exit 2; }
                     opts+=("--mpi-arg=$2"); shift 2 ;;
        --mpi-arg=*) opts+=("$1"); shift ;;
        --dry-run)   opts+=(--dry-run); shift ;;
        -h|--help)   usage; exit 0 ;;
        --)          shift; break ;;
        *)           echo "launch/mpiexec.sh: unknown option '$1' (training arguments go after --)" >&2
                     usage >&2; exit 2 ;;
    esac
done

exec "$distmulti" launch -n "$nprocs" ${opts[@]+"${opts[@]}"} -- "$@"
