#!/usr/bin/env bash
# Start swtpm on a provisioned STATE_DIR (see provision.sh), daemonized with a pid
# file, and wait until it answers on its control channel.
#
#   swtpm/start.sh STATE_DIR PORT      # TPM on PORT, control channel on PORT+1
#   export CUSTOS_TCTI="swtpm:host=127.0.0.1,port=PORT"
#
# Exit 0 when swtpm runs (also when it already ran for STATE_DIR on PORT: safe to run
# twice); 1 with the reason on stderr otherwise (missing tools, unprovisioned state,
# a port held by another process and which one, swtpm's own error and log).
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: $0 STATE_DIR PORT" >&2
    exit 2
fi
fail() { echo "swtpm/start.sh: $*" >&2; exit 1; }
[[ "$2" =~ ^[0-9]+$ ]] && (( $2 >= 1 && $2 <= 65534 )) || fail "PORT must be a number in 1-65534, not '$2'"
[[ -d "$1" ]] || fail "$1 does not exist: run swtpm/provision.sh $1 first"
state="$(cd "$1" && pwd)"
port="$2"
ctrl=$((port + 1))
tcti="swtpm:host=127.0.0.1,port=$port"
for tool in swtpm swtpm_ioctl; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install swtpm swtpm-tools"
done
compgen -G "$state/tpm/tpm2-*.permall" >/dev/null \
    || fail "$state holds no provisioned TPM: run swtpm/provision.sh $1 first"

answers() { swtpm_ioctl --tcp "127.0.0.1:$1" -c >/dev/null 2>&1; }
pidfile="$state/swtpm.pid"
if [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
        && [[ "$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null)" == swtpm* ]]; then
    pid="$(cat "$pidfile")"
    if answers "$ctrl" && ss -H -ltnp "sport = :$port" 2>/dev/null | grep -q "pid=$pid,"; then
        echo "swtpm already running: pid $pid, TCTI $tcti"
        exit 0
    fi
    fail "swtpm already runs for $state (pid $pid) on other ports: swtpm/stop.sh $1 first"
fi
rm -f "$pidfile"  # stale: its process is gone

# Who holds a port: "pid N (command)", or what ss can say without privileges.
holder() {
    local line
    line="$(ss -H -tanp "sport = :$1" 2>/dev/null | head -n 1)"
    [[ -n "$line" ]] || return 1
    if [[ "$line" =~ \(\"([^\"]+)\",pid=([0-9]+) ]]; then
        echo "pid ${BASH_REMATCH[2]} (${BASH_REMATCH[1]})"
    else
        echo "a process of another user ($(awk '{print $1}' <<<"$line"))"
    fi
}
for p in "$port" "$ctrl"; do
    if who="$(holder "$p")"; then
        role=TPM; [[ "$p" == "$ctrl" ]] && role=control
        fail "port $p (the $role port) on 127.0.0.1 is taken by $who; pick another PORT (swtpm uses PORT and PORT+1)"
    fi
done

log="$state/swtpm.log"
if ! err="$(swtpm socket --tpm2 \
        --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
        --ctrl "type=tcp,port=$ctrl,bindaddr=127.0.0.1" \
        --flags not-need-init,startup-clear \
        --tpmstate "dir=$state/tpm" \
        --pid "file=$pidfile" \
        --log "file=$log,level=1" \
        --daemon 2>&1)"; then
    fail "swtpm did not start: ${err:-no message}$( [[ -s "$log" ]] && printf '\nlast lines of %s:\n%s' "$log" "$(tail -n 5 "$log")")"
fi
for _ in $(seq 1 100); do
    if answers "$ctrl"; then
        echo "swtpm running: pid $(cat "$pidfile"), TCTI $tcti"
        exit 0
    fi
    sleep 0.05
done
fail "swtpm did not answer on 127.0.0.1:$ctrl within 5 s; see $log"
