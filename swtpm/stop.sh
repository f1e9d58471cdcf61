#!/usr/bin/env bash
# Stop the swtpm started by start.sh for STATE_DIR (SIGTERM, then SIGKILL after 5 s).
#
#   swtpm/stop.sh STATE_DIR
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
pidfile="$1/swtpm.pid"
if [[ ! -f "$pidfile" ]]; then
    echo "no $pidfile: swtpm not running for $1" >&2
    exit 0
fi
pid="$(cat "$pidfile")"
# Only signal the process if it still is an swtpm (the pid may have been recycled).
if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == swtpm* ]]; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
fi
rm -f "$pidfile"
echo "swtpm stopped"
