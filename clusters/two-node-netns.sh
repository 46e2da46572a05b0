#!/usr/bin/env bash
# A real two-node Ray cluster on one Linux machine: each node in its own network
# namespace, the two joined by a veth link, nothing reachable from or to the
# outside (the namespaces have no route beyond their own /30).
#
#   clusters/two-node-netns.sh up STATE_DIR [--token] [--head-cpus N] [--worker-cpus N] [--worker-gpus N]
#   clusters/two-node-netns.sh exec STATE_DIR head|worker COMMAND...   # e.g. a driver, inside a namespace
#   clusters/two-node-netns.sh node-id STATE_DIR head|worker           # the node's Ray node id (hex)
#   clusters/two-node-netns.sh kill-worker STATE_DIR                   # SIGKILL every process of the worker node
#   clusters/two-node-netns.sh down STATE_DIR                          # stop both nodes, delete the namespaces
#
# Needs root (ip netns) and `ray` on PATH (or RAY=/path/to/ray). `up` writes
# STATE_DIR/cluster.env (HEAD_ADDRESS, the namespace names, the token path) and
# prints HEAD_ADDRESS. With --token every process runs with RAY_AUTH_MODE=token
# and a fresh token in STATE_DIR/auth_token (passed as RAY_AUTH_TOKEN_PATH);
# without it the cluster takes no token. RAY_* variables set by the caller
# (e.g. RAY_health_check_period_ms) reach every Ray process. See docs/cluster.md.
set -euo pipefail

usage() { sed -n '6,10p' "$0" | cut -c3- >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 state=$2
shift 2
RAY=${RAY:-ray}

load() {
    [ -f "$state/cluster.env" ] || { echo "no cluster in $state (run: $0 up $state)" >&2; exit 2; }
    # shellcheck disable=SC1091
    . "$state/cluster.env"
}

ray_env() {  # the environment of every Ray process of this cluster, and of a driver
    # routable node addresses (the variable =0 would bind Ray to loopback only)
    echo RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="$AUTH_MODE"
    if [ "$AUTH_MODE" = token ]; then echo RAY_AUTH_TOKEN_PATH="$TOKEN_PATH"; fi
}

in_ns() {  # in_ns NAMESPACE COMMAND...: run with the cluster's environment, no token from the caller's
    local ns=$1
    shift
    # shellcheck disable=SC2046
    ip netns exec "$ns" env -u RAY_AUTH_TOKEN -u RAY_ADDRESS $(ray_env) "$@"
}

ns_pids() { ip netns pids "$1" 2>/dev/null || true; }

ns_of() { case $1 in head) echo "$NS_HEAD" ;; worker) echo "$NS_WORKER" ;; *) usage ;; esac; }

node_id() {  # from the command line of the node's raylet
    local pid
    for pid in $(ns_pids "$(ns_of "$1")"); do
        tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^--node_id=//p'
    done | head -n 1
}

kill_ns() {  # SIGTERM, then SIGKILL, every process in a namespace (only this cluster's: the namespace is ours)
    local ns=$1 pids
    for sig in TERM KILL; do
        pids=$(ns_pids "$ns")
        [ -n "$pids" ] || return 0
        # shellcheck disable=SC2086
        kill -s "$sig" $pids 2>/dev/null || true
        for _ in $(seq 20); do
            [ -n "$(ns_pids "$ns")" ] || return 0
            sleep 0.1
        done
    done
}

up() {
    local token=0 head_cpus=1 worker_cpus=1 worker_gpus=0
    while [ $# -gt 0 ]; do
        case $1 in
            --token) token=1; shift ;;
            --head-cpus) head_cpus=$2; shift 2 ;;
            --worker-cpus) worker_cpus=$2; shift 2 ;;
            --worker-gpus) worker_gpus=$2; shift 2 ;;
            *) usage ;;
        esac
    done
    mkdir -p "$state"
    state=$(cd "$state" && pwd)
    [ ! -f "$state/cluster.env" ] || { echo "$state already holds a cluster; run: $0 down $state" >&2; exit 2; }
    # unique names: several clusters (or test runs) may be up at once; the /30 is private to each pair
    local id=$$ octet=$(( $$ % 250 + 1 ))
    NS_HEAD=gns$id-h NS_WORKER=gns$id-w
    HEAD_IP=10.77.$octet.1 WORKER_IP=10.77.$octet.2
    HEAD_ADDRESS=$HEAD_IP:6379
    AUTH_MODE=$([ $token = 1 ] && echo token || echo disabled)
    TOKEN_PATH=$state/auth_token
    cat > "$state/cluster.env" <<EOF
NS_HEAD=$NS_HEAD
NS_WORKER=$NS_WORKER
HEAD_IP=$HEAD_IP
WORKER_IP=$WORKER_IP
HEAD_ADDRESS=$HEAD_ADDRESS
AUTH_MODE=$AUTH_MODE
TOKEN_PATH=$TOKEN_PATH
EOF
    trap 'echo "up failed; cleaning up" >&2; down' ERR
    if [ $token = 1 ]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$TOKEN_PATH")
    fi
    ip netns add "$NS_HEAD"
    ip netns add "$NS_WORKER"
    ip link add "v$id-h" netns "$NS_HEAD" type veth peer name "v$id-w" netns "$NS_WORKER"
    ip -n "$NS_HEAD" addr add "$HEAD_IP/30" dev "v$id-h"
    ip -n "$NS_WORKER" addr add "$WORKER_IP/30" dev "v$id-w"
    for ns in "$NS_HEAD" "$NS_WORKER"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "v$id-${ns: -1}" up
    done
    local common=(--include-dashboard=false --disable-usage-stats --object-store-memory=200000000)
    in_ns "$NS_HEAD" "$RAY" start --head --node-ip-address="$HEAD_IP" --port=6379 --num-cpus="$head_cpus" \
        --num-gpus=0 --temp-dir="$state/head" "${common[@]}" > "$state/head.log" 2>&1
    in_ns "$NS_WORKER" "$RAY" start --address="$HEAD_ADDRESS" --node-ip-address="$WORKER_IP" \
        --num-cpus="$worker_cpus" --num-gpus="$worker_gpus" --temp-dir="$state/worker" "${common[@]:1}" \
        > "$state/worker.log" 2>&1
    trap - ERR
    echo "$HEAD_ADDRESS"
}

down() {
    load
    for ns in "$NS_WORKER" "$NS_HEAD"; do
        kill_ns "$ns"
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$state/head" "$state/worker" "$state/auth_token" "$state/cluster.env"
}

case $cmd in
    up) up "$@" ;;
    down) down ;;
    exec)
        load
        [ $# -ge 2 ] || usage
        ns=$(ns_of "$1")
        shift
        in_ns "$ns" "$@"
        ;;
    node-id)
        load
        [ $# -eq 1 ] || usage
        node_id "$1"
        ;;
    kill-worker)
        load
        pids=$(ns_pids "$NS_WORKER")
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -KILL $pids
        ;;
    *) usage ;;
esac
