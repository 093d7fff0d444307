#!/usr/bin/env bash
# Emulate a two-node cluster on one machine and run the GRACE MoE workload on it (as root).
#
# Two Linux network namespaces ("nodes") joined by one veth pair; the inter-node link is shaped
# with tc (tbf, default 1 Gbit/s each direction; netem delay when the kernel has sch_netem).
# Each node runs 4 gloo ranks under torchrun: ranks of one node talk over loopback (the node's
# own address is routed through lo), ranks of different nodes over the shaped veth
# (GLOO_SOCKET_IFNAME=<veth>, MASTER_ADDR=<node 0's veth address>). Everything created here is
# removed on exit, failure, Ctrl-C or SIGTERM (trap), and --cleanup removes leftovers of an
# earlier run (idempotent).
#
#   sudo bash scripts/emulate_cluster.sh            # full set (about 10-12 min on 2 shared cores)
#   sudo bash scripts/emulate_cluster.sh --quick    # reduced set, about 2 minutes (124 s measured)
#   sudo bash scripts/emulate_cluster.sh --rate 10gbit --delay 0 --out /tmp/x.json
#   sudo bash scripts/emulate_cluster.sh --cleanup  # remove what an interrupted run left
#
# Exit codes: 0 ok, 1 the workload failed, 2 bad arguments or not root / missing tools.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="grace-emu"
RATE="1gbit"
DELAY="0.5ms"
GPUS_PER_NODE=4
SUBNET="10.211.0"
PORT=29611
QUICK=0
CLEANUP_ONLY=0
NODE_COMMAND=""
OUT=""
PY="${GRACE_PY:-}"
WORKLOAD_ARGS=()

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  --quick               reduced configuration set (about 2 minutes)
  --rate RATE           inter-node bandwidth per direction, tc syntax (default $RATE)
  --delay DELAY         one-way inter-node delay, tc syntax; 0 = none (default $DELAY; needs sch_netem)
  --gpus-per-node N     ranks per node (default $GPUS_PER_NODE)
  --out PATH            result JSON (default benchmarks/results/emulated_cluster.json)
  --prefix NAME         name prefix of the namespaces and veth devices (default $PREFIX)
  --port N              rendezvous port on node 0 (default $PORT)
  --python PATH         python interpreter (default \$GRACE_PY, else .venv/bin/python, else python3)
  --node-command CMD    run CMD in every node instead of the workload (\$NODE, \$ADDR, \$IFACE set)
  --cleanup             only remove namespaces/devices left by an earlier run with this prefix
  -- ARGS...            further arguments for scripts/cluster_workload.py
  -h, --help            this help
EOF
}

die() { echo "emulate_cluster: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --quick) QUICK=1 ;;
        --cleanup) CLEANUP_ONLY=1 ;;
        --rate|--delay|--gpus-per-node|--out|--prefix|--port|--python|--node-command)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
                --rate) RATE="$2" ;;
                --delay) DELAY="$2" ;;
                --gpus-per-node) GPUS_PER_NODE="$2" ;;
                --out) OUT="$2" ;;
                --prefix) PREFIX="$2" ;;
                --port) PORT="$2" ;;
                --python) PY="$2" ;;
                --node-command) NODE_COMMAND="$2" ;;
            esac
            shift ;;
        --) shift; WORKLOAD_ARGS=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

[[ "$RATE" =~ ^[0-9]+(\.[0-9]+)?([kmgt]?bit|[kmgt]?bps)$ ]] || die "--rate '$RATE' is not a tc rate such as 1gbit or 500mbit"
[[ "$DELAY" =~ ^(0|[0-9]+(\.[0-9]+)?(us|ms|s))$ ]] || die "--delay '$DELAY' is not a tc time such as 0.5ms (or 0)"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node '$GPUS_PER_NODE' is not a positive integer"
[[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1024 && "$PORT" -le 65535 ]] || die "--port '$PORT' is not in 1024..65535"
[[ "$PREFIX" =~ ^[a-z][a-z0-9-]{0,9}$ ]] || die "--prefix '$PREFIX' must be 1-10 lowercase letters, digits or '-', starting with a letter"

if [[ "$(id -u)" -ne 0 ]]; then
    die "must run as root (it creates network namespaces, veth devices and tc qdiscs); try: sudo bash $0 $*"
fi
for tool in ip tc; do command -v "$tool" >/dev/null || die "'$tool' not found (install iproute2)"; done

NS=("$PREFIX-n0" "$PREFIX-n1")
VETH=("${PREFIX}-v0" "${PREFIX}-v1")
ADDR=("$SUBNET.1" "$SUBNET.2")
PIDS=()

cleanup() {
    local pid ns
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    PIDS=()
    for ns in "${NS[@]}"; do
        # processes still inside a namespace (e.g. orphaned ranks) go first, then the namespace
        if ip netns pids "$ns" >/dev/null 2>&1; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
            ip netns del "$ns" 2>/dev/null
        fi
    done
    # a veth left in the root namespace by a half-finished setup
    ip link del "${VETH[0]}" 2>/dev/null
    return 0
}

if [[ $CLEANUP_ONLY -eq 1 ]]; then
    cleanup
    echo "emulate_cluster: removed namespaces ${NS[*]} and their devices (if they existed)"
    exit 0
fi

if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
[[ -x "$PY" ]] || die "python '$PY' not found (give --python or GRACE_PY)"
[[ -n "$OUT" ]] || OUT="$ROOT/benchmarks/results/emulated_cluster.json"

on_signal() { echo "emulate_cluster: interrupted, cleaning up" >&2; cleanup; exit 130; }
trap cleanup EXIT
trap on_signal INT TERM

cleanup  # leftovers of an earlier run with this prefix
set -e
for i in 0 1; do ip netns add "${NS[$i]}"; done
ip link add "${VETH[0]}" netns "${NS[0]}" type veth peer name "${VETH[1]}" netns "${NS[1]}"
DELAY_APPLIED=0
for i in 0 1; do
    ip -n "${NS[$i]}" link set lo up
    ip -n "${NS[$i]}" addr add "${ADDR[$i]}/24" dev "${VETH[$i]}"
    ip -n "${NS[$i]}" link set "${VETH[$i]}" up
    parent="root"
    if [[ "$DELAY" != "0" ]]; then
        if tc -n "${NS[$i]}" qdisc add dev "${VETH[$i]}" root handle 1: netem delay "$DELAY" 2>/dev/null; then
            parent="parent 1:"; DELAY_APPLIED=1
        elif [[ $i -eq 0 ]]; then
            echo "emulate_cluster: WARNING: no delay applied (this kernel has no sch_netem qdisc); link is rate-shaped only" >&2
        fi
    fi
    # shellcheck disable=SC2086
    tc -n "${NS[$i]}" qdisc add dev "${VETH[$i]}" $parent handle 2: tbf rate "$RATE" burst 256kb latency 100ms
done
set +e
APPLIED_DELAY="$DELAY"; [[ $DELAY_APPLIED -eq 1 ]] || APPLIED_DELAY="0"
echo "emulate_cluster: nodes ${NS[*]} (${ADDR[*]}), link ${VETH[0]}<->${VETH[1]} rate $RATE delay $APPLIED_DELAY, $GPUS_PER_NODE ranks per node"
echo "emulate_cluster: load: $(uptime)"

run_node() {  # $1 = node index; runs in the background, in its own process group
    local i=$1
    if [[ -n "$NODE_COMMAND" ]]; then
        setsid ip netns exec "${NS[$i]}" env NODE="$i" ADDR="${ADDR[$i]}" IFACE="${VETH[$i]}" bash -c "$NODE_COMMAND" &
    else
        local extra=(--iface "${VETH[$i]}" --link-rate "$RATE" --link-delay "$APPLIED_DELAY" --out "$OUT")
        [[ $QUICK -eq 1 ]] && extra+=(--quick)
        setsid ip netns exec "${NS[$i]}" env GLOO_SOCKET_IFNAME="${VETH[$i]}" OMP_NUM_THREADS=1 PYTHONPATH="$ROOT" \
            GRACE_NO_PROGRESS=1 "$PY" -m torch.distributed.run --nnodes 2 --nproc-per-node "$GPUS_PER_NODE" \
            --node-rank "$i" --master-addr "${ADDR[0]}" --master-port "$PORT" \
            "$ROOT/scripts/cluster_workload.py" "${extra[@]}" "${WORKLOAD_ARGS[@]}" &
    fi
    PIDS+=($!)
}

cd "$ROOT"
run_node 0
run_node 1
rc=0
for pid in "${PIDS[@]}"; do wait "$pid" || rc=$?; done
PIDS=()
echo "emulate_cluster: load after: $(uptime)"
if [[ $rc -ne 0 ]]; then
    echo "emulate_cluster: the workload failed (exit $rc)" >&2
    exit 1
fi
exit 0
