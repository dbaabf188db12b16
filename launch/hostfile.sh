#!/usr/bin/env bash
# Train on several hosts listed in a hostfile: `distmulti launch --hostfile HOSTFILE`, with the
# ranks' environment forwarded by distmulti and, optionally, the network for MPI traffic
# chosen. mpiexec reaches the other hosts over ssh (see launch/README.md for the set-up).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/hostfile.sh [-n N] [--iface NET] [--mpi-arg ARG]... [--dry-run] HOSTFILE [-- TRAIN_ARGS...]

Runs `distmulti train TRAIN_ARGS` on the hosts of HOSTFILE through mpiexec and ssh.

  HOSTFILE         Open MPI format (`host slots=K`) or MPICH format (`host:K`), one host a
                   line, `#` comments; the first host listed takes rank 0
  -n, --nprocs N   number of ranks (default: the sum of the slots, 1 for a host without any)
  --iface NET      the network MPI uses between hosts: an interface name (eth0) or, with
                   Open MPI, a CIDR (10.0.0.0/24). Open MPI: --mca btl_tcp_if_include NET
                   --prtemca oob_tcp_if_include NET; MPICH: -iface NET
  --dead-link-timeout S
                   Open MPI: end the job when the control connection to a host has been
                   silent for about S seconds (TCP keepalive on mpiexec's connections to its
                   remote daemons; default 60, 0 = Open MPI's own default of 8 minutes).
                   Without it a host whose network link goes away hangs the job. MPICH: ignored
  --mpi-arg ARG    extra mpiexec argument, repeatable (e.g. --mpi-arg -x --mpi-arg MY_VAR)
  --dry-run        print the mpiexec command instead of running it
  -h, --help       this text

Forwarded to every rank when set here (by distmulti launch): PATH, LD_LIBRARY_PATH,
PYTHONPATH, VIRTUAL_ENV, OMP_NUM_THREADS and every DISTMULTI_*, NCCL_*, CUDA_*, CHAINER_*,
CUPY_* variable.

Environment: DISTMULTI  the distmulti command (default: this repository's .venv/bin/distmulti
                        if it exists, else distmulti on PATH)
             MPIEXEC    the mpiexec to use (default: the one distmulti finds: beside its
                        Python, else on PATH)
Exit status: distmulti launch's: 0 only when the run completed (this run wrote OUT/result.json,
last, on rank 0); else mpiexec's non-zero status, or 1 when mpiexec exited 0 without
result.json (Open MPI can, after losing a host); 2 for bad arguments (docs/operators.md,
"Exit codes").

Example: launch/hostfile.sh --iface 10.0.0.0/24 hosts -- --epoch 8 --out /shared/runs/a
USAGE
}

die() { echo "launch/hostfile.sh: $*" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
distmulti=${DISTMULTI:-}
if [[ -z $distmulti ]]; then
    if [[ -x $here/../.venv/bin/distmulti ]]; then
        distmulti=$here/../.venv/bin/distmulti
    else
        distmulti=distmulti
    fi
fi

nprocs=
iface=
dead_link=60
hostfile=
opts=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -n|--nprocs) [[ $# -ge 2 ]] || die "$1 needs a value"; nprocs=$2; shift 2 ;;
        --iface)     [[ $# -ge 2 ]] || die "$1 needs a value"; iface=$2; shift 2 ;;
        --iface=*)   iface=${1#--iface=}; shift ;;
        --dead-link-timeout)   [[ $# -ge 2 ]] || die "$1 needs a value"; dead_link=$2; shift 2 ;;
        --dead-link-timeout=*) dead_link=${1#--dead-link-timeout=}; shift ;;
        --mpi-arg)   [[ $# -ge 2 ]] || die "$1 needs a value"; opts+=("--mpi-arg=$2"); shift 2 ;;
        --mpi-arg=*) opts+=("$1"); shift ;;
        --dry-run)   opts+=(--dry-run); shift ;;
        -h|--help)   usage; exit 0 ;;
        --)          shift; break ;;
        -*)          usage >&2; die "unknown option '$1' (training arguments go after --)" ;;
        *)           [[ -z $hostfile ]] || die "one HOSTFILE only, got '$hostfile' and '$1'"
                     hostfile=$1; shift ;;
    esac
done
[[ -n $hostfile ]] || { usage >&2; die "no HOSTFILE given"; }
[[ -f $hostfile ]] || die "hostfile '$hostfile' does not exist"

if [[ -z $nprocs ]]; then
    # Sum of `slots=K` (Open MPI) or `host:K` (MPICH); a host line without either counts 1.
    nprocs=$(awk '{ sub(/#.*/, "") } NF {
                      n = 1
                      for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7)
                      if ($1 ~ /:[0-9]+$/) n = substr($1, index($1, ":") + 1)
                      total += n
                  } END { print total + 0 }' "$hostfile")
    [[ $nprocs -ge 1 ]] || die "hostfile '$hostfile' lists no hosts"
fi

if [[ -n ${MPIEXEC:-} ]]; then
    opts+=("--mpiexec=$MPIEXEC")
fi
[[ $dead_link =~ ^[0-9]+$ ]] || die "--dead-link-timeout must be a whole number of seconds, got '$dead_link'"

flavor=
if [[ -n $iface || $dead_link -gt 0 ]]; then
    mpiexec=${MPIEXEC:-}
    if [[ -z $mpiexec ]]; then   # the one distmulti would use: first word of its command
        mpiexec=$("$distmulti" launch -n 1 --dry-run -- | xargs -n 1 | sed -n 1p) ||
            die "cannot find the mpiexec that $distmulti uses (set MPIEXEC)"
    fi
    version=$("$mpiexec" --version 2>&1) || die "cannot run '$mpiexec --version'"
    if [[ $version == *"Open MPI) "[1-4].* ]]; then
        flavor=ompi4        # ORTE: runtime parameters are --mca
    elif [[ $version == *"Open MPI"* ]]; then
        flavor=ompi5        # PRRTE: runtime parameters are --prtemca
    else
        flavor=hydra        # MPICH, Intel MPI
    fi
fi
rt=--prtemca
[[ $flavor == ompi4 ]] && rt=--mca
if [[ -n $iface ]]; then
    if [[ $flavor == hydra ]]; then
        opts+=(--mpi-arg=-iface "--mpi-arg=$iface")
    else
        opts+=(--mpi-arg=--mca --mpi-arg=btl_tcp_if_include "--mpi-arg=$iface"
               "--mpi-arg=$rt" --mpi-arg=oob_tcp_if_include "--mpi-arg=$iface")
    fi
fi
if [[ $dead_link -gt 0 && $flavor == ompi* ]]; then
    # Idle for S/2 s, then 3 unanswered probes S/6 s apart: the connection is declared dead.
    idle=$(( dead_link / 2 > 0 ? dead_link / 2 : 1 ))
    interval=$(( (dead_link - idle + 2) / 3 > 0 ? (dead_link - idle + 2) / 3 : 1 ))
    opts+=("--mpi-arg=$rt" --mpi-arg=oob_tcp_keepalive_time "--mpi-arg=$idle"
           "--mpi-arg=$rt" --mpi-arg=oob_tcp_keepalive_intvl "--mpi-arg=$interval"
           "--mpi-arg=$rt" --mpi-arg=oob_tcp_keepalive_probes --mpi-arg=3)
fi

exec "$distmulti" launch -n "$nprocs" --hostfile "$hostfile" ${opts[@]+"${opts[@]}"} -- "$@"
