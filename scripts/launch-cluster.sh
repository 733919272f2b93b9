#!/usr/bin/env bash
# Start a multi-node pdserve cluster by hand (see docs/cluster.md).
#
#   scripts/launch-cluster.sh head [pdserve serve args...]
#       ray start --head on this node, then pdserve serve --address auto with the args given
#       (it replaces this shell, so SIGTERM to this pid drains the server).
#   scripts/launch-cluster.sh worker HEAD_IP[:PORT] [ray start args...]
#       ray start --address HEAD_IP:PORT on this node (PORT defaults to $RAY_PORT).
#
# Environment: PDSERVE_BIN (default pdserve), RAY_BIN (default ray), RAY_PORT (default 6379).
set -euo pipefail

PDSERVE_BIN="${PDSERVE_BIN:-pdserve}"
RAY_BIN="${RAY_BIN:-ray}"
RAY_PORT="${RAY_PORT:-6379}"

usage() {
    echo "usage: $0 head [pdserve serve args...]" >&2
    echo "       $0 worker HEAD_IP[:PORT] [ray start args...]" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
role="$1"
shift

case "$role" in
    head)
        "$RAY_BIN" start --head --port="$RAY_PORT"
        exec "$PDSERVE_BIN" serve --address auto "$@"
        ;;
    worker)
        [[ $# -ge 1 && -n "$1" ]] || usage
        head="$1"
        shift
        [[ "$head" == *:* ]] || head="$head:$RAY_PORT"
        exec "$RAY_BIN" start --address="$head" "$@"
        ;;
    *)
        usage
        ;;
esac
