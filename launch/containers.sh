#!/usr/bin/env bash
# Several containers of the distmulti image on one host, one MPI job across them: N-1 worker
# containers run sshd, a launcher container runs `distmulti launch --hostfile` over ssh, as
# on a cluster. Works with podman (CNI or netavark network backend) or docker; everything it
# creates is removed at the end.
#
#   launch/containers.sh -n 3 -- --epoch 8            # results in ./runs/containers
#   launch/containers.sh -n 2 --image distmulti:cpu --results /data/runs -- --iterations 500
#   launch/containers.sh -n 3 --subnet 192.168.77.0/24 --dry-run -- --epoch 8
#
# Names do not depend on the engine's DNS (Debian's and Ubuntu's podman with the CNI backend
# has none on a named network): the script makes a bridge network with a fixed subnet
# (--subnet; by default the first of 10.213.0.0/24 .. 10.213.15.0/24 that the engine
# accepts), gives the launcher the subnet's address .2 and worker wI address .(2+I) (--ip),
# puts every container's name and address into every container's /etc/hosts (--add-host),
# and writes the hostfile with those names.
#
# The ssh key pair is made for this run inside a volume and removed with it (never baked in
# the image, never written to the host). Exit status: the launcher's (`distmulti launch`
# exits 0 only when the run wrote its result.json); 2 for bad arguments, 1 when the engine
# refuses the network.
set -euo pipefail

# The default subnets, tried in this order; a given --subnet is the only one tried.
DEFAULT_SUBNETS=(10.213.{0..15}.0/24)

usage() {
    cat <<'EOF'
usage: launch/containers.sh [-n N] [--image IMAGE] [--results DIR] [--subnet CIDR]
                            [--mpi-arg ARG]... [--dry-run] -- TRAIN_ARGS

  -n N             ranks = containers (default 2): 1 launcher + N-1 workers, one rank each
  --image IMAGE    the distmulti image (default distmulti:cpu; build it with docker/README.md)
  --results DIR    host folder mounted at /results in every container (default runs/containers);
                   the training writes to /results/run unless TRAIN_ARGS give --out
  --subnet CIDR    IPv4 subnet of the run's network, e.g. 192.168.77.0/24; it must not overlap
                   the host's networks or the engine's other networks (default: the first of
                   10.213.0.0/24 .. 10.213.15.0/24 the engine accepts). The launcher gets
                   address .2, worker wI address .(2+I)
  --mpi-arg ARG    extra mpiexec argument, repeatable
  --dry-run        print the engine commands and the hostfile, run nothing
environment: CONTAINER_ENGINE (default: podman if installed, else docker; may hold extra
             global flags, e.g. "podman --root /srv/podman"), CONTAINER_RUN_FLAGS (extra
             flags for every `run`, e.g. ulimits)
EOF
}

die() {  # die STATUS MESSAGE...: one line on stderr, then exit STATUS
    local status=$1
    shift
    echo "containers.sh: $*" >&2
    exit "$status"
}

n=2
image=distmulti:cpu
results=runs/containers
subnet=
dry_run=false
mpi_args=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        -n) n=${2:?-n needs a number}; shift 2 ;;
        --image) image=${2:?--image needs a name}; shift 2 ;;
        --results) results=${2:?--results needs a folder}; shift 2 ;;
        --subnet) subnet=${2:?--subnet needs a CIDR, e.g. 10.213.0.0/24}; shift 2 ;;
        --subnet=*) subnet=${1#--subnet=}; shift ;;
        --mpi-arg) mpi_args+=("--mpi-arg=${2:?--mpi-arg needs a value}"); shift 2 ;;
        --mpi-arg=*) mpi_args+=("$1"); shift ;;
        --dry-run) dry_run=true; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "containers.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
case "$n" in
    ''|*[!0-9]*) die 2 "-n must be a whole number >= 2, got '$n'" ;;
esac
if [ "$n" -lt 2 ]; then
    die 2 "-n must be >= 2 (one launcher and at least one worker), got $n;" \
          "for one container run the image directly"
fi
train_args=("$@")
has_out=false
for arg in "${train_args[@]}"; do
    case "$arg" in --out|--out=*|-o) has_out=true ;; esac
done
if ! "$has_out"; then
    train_args+=(--out /results/run)
fi

# -- addresses ---------------------------------------------------------------------------------

int_to_ip() {  # int_to_ip N: dotted quad of the 32-bit number N
    echo "$(($1 >> 24 & 255)).$(($1 >> 16 & 255)).$(($1 >> 8 & 255)).$(($1 & 255))"
}

# check_subnet CIDR: sets net_base (the network address as a number); exits 2 unless CIDR is
# an IPv4 network address with a prefix that leaves room for the gateway and n containers.
check_subnet() {
    local cidr=$1 addr prefix a b c d size
    addr=${cidr%/*}
    prefix=${cidr#*/}
    if ! [[ "$cidr" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]]; then
        die 2 "--subnet must be an IPv4 network in CIDR form such as 10.213.0.0/24, got '$cidr'"
    fi
    IFS=. read -r a b c d <<<"$addr"
    if [ $((10#$a)) -gt 255 ] || [ $((10#$b)) -gt 255 ] || [ $((10#$c)) -gt 255 ] \
       || [ $((10#$d)) -gt 255 ] || [ $((10#$prefix)) -lt 8 ] || [ $((10#$prefix)) -gt 30 ]; then
        die 2 "--subnet must have four numbers 0-255 and a prefix length 8-30, got '$cidr'"
    fi
    prefix=$((10#$prefix))
    size=$((1 << (32 - prefix)))
    net_base=$(((10#$a << 24) + (10#$b << 16) + (10#$c << 8) + 10#$d))
    if [ $((net_base % size)) -ne 0 ]; then
        die 2 "--subnet '$cidr' has host bits set; its network is" \
              "$(int_to_ip $((net_base - net_base % size)))/$prefix"
    fi
    # Not usable: the network address, the gateway (.1, the engines' default) and broadcast.
    if [ "$n" -gt $((size - 3)) ]; then
        die 2 "--subnet '$cidr' has room for $((size - 3)) containers, -n $n needs $n;" \
              "give a larger one (a shorter prefix)"
    fi
}

if [ -n "$subnet" ]; then
    subnets=("$subnet")
else
    subnets=("${DEFAULT_SUBNETS[@]}")
fi
for candidate in "${subnets[@]}"; do
    check_subnet "$candidate"
done

names=(launcher)
for i in $(seq 1 $((n - 1))); do
    names+=("w$i")
done

# -- the engine --------------------------------------------------------------------------------

if [ -n "${CONTAINER_ENGINE:-}" ]; then
    read -r -a engine <<<"$CONTAINER_ENGINE"
elif command -v podman >/dev/null 2>&1; then
    engine=(podman)
elif command -v docker >/dev/null 2>&1; then
    engine=(docker)
else
    die 2 "neither podman nor docker found; set CONTAINER_ENGINE"
fi
read -r -a run_flags <<<"${CONTAINER_RUN_FLAGS:-}"

exec 3>&1  # --dry-run prints here, also from calls whose output is discarded
engine_do() {  # engine_do ARG...: runs the engine with ARG..., or with --dry-run prints it
    if "$dry_run"; then
        printf '%q' "${engine[0]}" >&3
        printf ' %q' "${engine[@]:1}" "$@" >&3
        printf '\n' >&3
    else
        "${engine[@]}" "$@"
    fi
}

if "$dry_run"; then
    case "$results" in /*) ;; *) results=$PWD/$results ;; esac
else
    mkdir -p "$results"
    results=$(cd "$results" && pwd)
    if [ "$(id -u)" = 0 ]; then
        chown 1000:1000 "$results"  # the image's user mpiuser writes there
    fi
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
if ! "$dry_run"; then
    trap cleanup EXIT
    trap 'exit 130' INT TERM
fi

# The network: the given subnet, or the first default one the engine accepts. A default one
# is passed over only when the engine says it is taken (another run, another network).
chosen=
for candidate in "${subnets[@]}"; do
    if "$dry_run"; then
        engine_do network create --subnet "$candidate" "$net"
        chosen=$candidate
        break
    fi
    if err=$("${engine[@]}" network create --subnet "$candidate" "$net" 2>&1 >/dev/null); then
        chosen=$candidate
        break
    fi
    err=$(printf '%s' "$err" | tr '\n' ' ')
    if [ -n "$subnet" ]; then
        die 1 "the engine refused a network with --subnet $candidate ($err);" \
              "choose a private subnet that overlaps none of the host's or the engine's" \
              "networks with --subnet CIDR"
    fi
    if ! grep -qiE 'overlap|already|in use|conflict' <<<"$err"; then
        die 1 "the engine refused a network with --subnet $candidate ($err)"
    fi
done
if [ -z "$chosen" ]; then
    die 1 "the engine took none of the default subnets ${DEFAULT_SUBNETS[0]} .." \
          "${DEFAULT_SUBNETS[-1]} (last refusal: $err); choose a free one with --subnet CIDR"
fi
check_subnet "$chosen"
ips=()
add_hosts=()
for k in "${!names[@]}"; do
    ips+=("$(int_to_ip $((net_base + 2 + k)))")
    add_hosts+=(--add-host "${names[k]}:${ips[k]}")
done

engine_do volume create "$keys" >/dev/null
common=(--network "$net" "${add_hosts[@]}" -v "$keys:/home/mpiuser/.ssh"
        -v "$results:/results" "${run_flags[@]}")

# A key pair for this run only, made by the image's user inside the volume.
keygen='ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519 && cd ~/.ssh'
keygen+=' && cp id_ed25519.pub authorized_keys && chmod 600 authorized_keys'
engine_do run --rm --network none -v "$keys:/home/mpiuser/.ssh" "${run_flags[@]}" "$image" \
    sh -c "$keygen"

for k in $(seq 1 $((n - 1))); do
    containers+=("$id-${names[k]}")
    engine_do run -d --name "$id-${names[k]}" --hostname "${names[k]}" --ip "${ips[k]}" \
        "${common[@]}" "$image" /usr/sbin/sshd -De -f /home/mpiuser/.sshd_config >/dev/null
done

placement=
for k in "${!names[@]}"; do
    placement="$placement ${names[k]} ${ips[k]},"
done
echo "containers.sh: $n ranks on network $net ($chosen):${placement%,}" >&2
if "$dry_run"; then
    echo "# hostfile (/tmp/hostfile in the launcher):" >&3
    printf '#   %s slots=1\n' "${names[@]}" >&3
fi
containers+=("$id-launcher")
status=0
# shellcheck disable=SC2016  # $HOSTS and $@ expand inside the container
engine_do run --name "$id-launcher" --hostname launcher --ip "${ips[0]}" "${common[@]}" \
    -e HOSTS="${names[*]}" "$image" sh -c \
    'for h in $HOSTS; do echo "$h slots=1"; done > /tmp/hostfile && exec "$@"' containers.sh \
    distmulti launch -n "$n" --hostfile /tmp/hostfile "${mpi_args[@]}" -- "${train_args[@]}" \
    || status=$?
exit "$status"
