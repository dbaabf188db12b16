#!/usr/bin/env bash
# Several containers of the distmulti image on one host, one MPI job across them: N-1 worker
# containers run sshd, a launcher container runs `distmulti launch --hostfile` over ssh, as
# on a cluster. Works with podman or docker; everything it creates is removed at the end.
#
#   launch/containers.sh -n 3 -- --epoch 8            # results in ./runs/containers
#   launch/containers.sh -n 2 --image distmulti:cpu --results /data/runs -- --iterations 500
#
# The ssh key pair is made for this run inside a volume and removed with it (never baked in
# the image, never written to the host). Exit status: the launcher's (`distmulti launch`
# exits 0 only when the run wrote its result.json).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/containers.sh [-n N] [--image IMAGE] [--results DIR] [--mpi-arg ARG]... -- TRAIN_ARGS

  -n N             ranks = containers (default 2): 1 launcher + N-1 workers, one rank each
  --image IMAGE    the distmulti image (default distmulti:cpu; build it with docker/README.md)
  --results DIR    host folder mounted at /results in every container (default runs/containers);
                   the training writes to /results/run unless TRAIN_ARGS give --out
  --mpi-arg ARG    extra mpiexec argument, repeatable
environment: CONTAINER_ENGINE (default: podman if installed, else docker; may hold extra
             global flags, e.g. "podman --root /srv/podman"), CONTAINER_RUN_FLAGS (extra
             flags for every `run`, e.g. ulimits)
EOF
}

n=2
image=distmulti:cpu
results=runs/containers
mpi_args=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        -n) n=${2:?-n needs a number}; shift 2 ;;
        --image) image=${2:?--image needs a name}; shift 2 ;;
        --results) results=${2:?--results needs a folder}; shift 2 ;;
        --mpi-arg) mpi_args+=("--mpi-arg=${2:?--mpi-arg needs a value}"); shift 2 ;;
        --mpi-arg=*) mpi_args+=("$1"); shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "containers.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$n" in
    ''|*[!0-9]*) echo "containers.sh: -n must be a whole number >= 2, got '$n'" >&2; exit 2 ;;
esac
if [ "$n" -lt 2 ]; then
    echo "containers.sh: -n must be >= 2 (one launcher and at least one worker), got $n;" \
         "for one container run the image directly" >&2
    exit 2
fi
train_args=("$@")
has_out=false
for arg in "${train_args[@]}"; do
    case "$arg" in --out|--out=*|-o) has_out=true ;; esac
done
if ! "$has_out"; then
    train_args+=(--out /results/run)
fi

if [ -n "${CONTAINER_ENGINE:-}" ]; then
    read -r -a engine <<<"$CONTAINER_ENGINE"
elif command -v podman >/dev/null 2>&1; then
    engine=(podman)
elif command -v docker >/dev/null 2>&1; then
    engine=(docker)
else
    echo "containers.sh: neither podman nor docker found; set CONTAINER_ENGINE" >&2
    exit 2
fi
read -r -a run_flags <<<"${CONTAINER_RUN_FLAGS:-}"

mkdir -p "$results"
results=$(cd "$results" && pwd)
if [ "$(id -u)" = 0 ]; then
    chown 1000:1000 "$results"  # the image's user mpiuser writes there
fi

id=distmulti-$$
net=$id-net
keys=$id-keys
containers=()
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    for c in "${containers[@]}"; do
        "${engine[@]}" rm -f "$c" >/dev/null 2>&1 || true
    done
    "${engine[@]}" network rm "$net" >/dev/null 2>&1 || true
    "${engine[@]}" volume rm -f "$keys" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"${engine[@]}" network create "$net" >/dev/null
"${engine[@]}" volume create "$keys" >/dev/null
common=(--network "$net" -v "$keys:/home/mpiuser/.ssh" -v "$results:/results"
        "${run_flags[@]}")

# A key pair for this run only, made by the image's user inside the volume.
"${engine[@]}" run --rm "${common[@]}" "$image" sh -c \
    'ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519 &&
     cp ~/.ssh/id_ed25519.pub ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys'

hosts="launcher slots=1"
for i in $(seq 1 $((n - 1))); do
    name=$id-w$i
    containers+=("$name")
    "${engine[@]}" run -d --name "$name" --hostname "w$i" --network-alias "w$i" "${common[@]}" \
        "$image" /usr/sbin/sshd -De -f /home/mpiuser/.sshd_config >/dev/null
    hosts="$hosts
w$i slots=1"
done

containers+=("$id-launcher")
echo "containers.sh: $n ranks on containers launcher$(seq -s '' -f ' w%g' 1 $((n - 1)))" >&2
status=0
# shellcheck disable=SC2016  # $HOSTS and $@ expand inside the container
"${engine[@]}" run --name "$id-launcher" --hostname launcher --network-alias launcher \
    "${common[@]}" -e HOSTS="$hosts" "$image" sh -c \
    'printf "%s\n" "$HOSTS" > /tmp/hostfile && exec "$@"' containers.sh \
    distmulti launch -n "$n" --hostfile /tmp/hostfile "${mpi_args[@]}" -- "${train_args[@]}" \
    || status=$?
exit "$status"
