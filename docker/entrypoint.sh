#!/bin/sh
# Entrypoint of the distmulti images (CPU and GPU): makes this container's sshd host key,
# adapts Kubeflow mpi-operator's launcher settings, then runs the command it was given.
set -eu

# 1. sshd host key, generated at container start so that no two containers share one and
# none is baked into the image. It goes to $DISTMULTI_SSHD_DIR (default ~/.sshd), which
# ~/.sshd_config names. Under mpi-operator the mounted ~/.ssh/id_rsa is a host key as well
# (sshd_config lists both), so a worker whose `command:` bypasses this script still has
# one. A home that is not writable (another uid, read-only root filesystem) is reported,
# not fatal: only sshd needs the key.
sshd_dir=${DISTMULTI_SSHD_DIR:-${HOME:-/home/mpiuser}/.sshd}
host_key="$sshd_dir/ssh_host_ed25519_key"
if [ ! -s "$host_key" ]; then
    if ! { mkdir -p "$sshd_dir" && chmod 700 "$sshd_dir" && rm -f "$host_key" "$host_key.pub" \
           && ssh-keygen -q -t ed25519 -N '' -C "sshd host key" -f "$host_key"; } >/dev/null 2>&1
    then
        echo "entrypoint.sh: could not write an sshd host key to $host_key" \
             "(uid $(id -u)); sshd will only start with a mounted ~/.ssh/id_rsa" >&2
    fi
fi

# 2. mpi-operator gives the launcher Open MPI 4 settings (OMPI_MCA_orte_*, plm_rsh_args).
# Open MPI 5 (the CPU image's) reads its runtime's names (PRTE_MCA_*) and silently ignores
# the old ones, running every rank on the launcher: copy them over. Open MPI 4 (the GPU
# image's) ignores the PRTE_ names.
copy_mca() {  # copy_mca FROM TO: export TO=$FROM when FROM is set and TO is not
    if eval "[ -n \"\${$1:-}\" ] && [ -z \"\${$2:-}\" ]"; then
        eval "export $2=\"\$$1\""
    fi
}
copy_mca OMPI_MCA_orte_default_hostfile PRTE_MCA_prte_default_hostfile
copy_mca OMPI_MCA_orte_keep_fqdn_hostnames PRTE_MCA_prte_keep_fqdn_hostnames
copy_mca OMPI_MCA_orte_set_default_slots PRTE_MCA_prte_set_default_slots
copy_mca OMPI_MCA_plm_rsh_args PRTE_MCA_plm_ssh_args

# 3. As mpi-operator's own images do: on the launcher, wait until this pod's and every
# worker's name resolves (their DNS records appear a little after the pods), at most
# DISTMULTI_DNS_WAIT seconds per name (default 60), then go on and let mpiexec report.
if [ "${K_MPI_JOB_ROLE:-}" = launcher ]; then
    hostfile=${OMPI_MCA_orte_default_hostfile:-/etc/mpi/hostfile}
    hosts=$(hostname)
    if [ -r "$hostfile" ]; then
        hosts="$hosts $(sed -e 's/#.*//' -e 's/[[:space:]:].*//' "$hostfile")"
    fi
    for host in $hosts; do
        waited=0
        until getent hosts "$host" >/dev/null; do
            if [ "$waited" -ge "${DISTMULTI_DNS_WAIT:-60}" ]; then
                echo "entrypoint.sh: $host does not resolve after ${waited}s" >&2
                break
            fi
            sleep 2
            waited=$((waited + 2))
        done
    done
fi

if [ "$#" -eq 0 ]; then
    set -- distmulti --help
fi
exec "$@"
