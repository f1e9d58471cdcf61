#!/usr/bin/env bash
# Stop the swtpm started by start.sh for STATE_DIR (SIGTERM, then SIGKILL after 5 s).
#
#   swtpm/stop.sh STATE_DIR
#
# Safe to run twice: with nothing running it says so and exits 0.
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
pidfile="$1/swtpm.pid"
if [[ ! -s "$pidfile" ]]; then
    rm -f "$pidfile"
    echo "swtpm not running for $1 (no pid file)"
    exit 0
fi
pid="$(cat "$pidfile")"
# Only signal the process if it still is an swtpm (the pid may have been recycled).
if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == swtpm* ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "swtpm stopped (pid $pid)"
else
    rm -f "$pidfile"
    echo "swtpm not running for $1 (stale pid file removed)"
fi
