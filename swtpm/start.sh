#!/usr/bin/env bash
# Start swtpm on a provisioned STATE_DIR (see provision.sh), daemonized with a pid
# file, and wait until it answers on its control channel.
#
#   swtpm/start.sh STATE_DIR PORT      # TPM on PORT, control channel on PORT+1
#   export CUSTOS_TCTI="swtpm:host=127.0.0.1,port=PORT"
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: $0 STATE_DIR PORT" >&2
    exit 2
fi
state="$(cd "$1" && pwd)"
port="$2"
ctrl=$((port + 1))
for tool in swtpm swtpm_ioctl; do
    command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install swtpm swtpm-tools" >&2; exit 1; }
done
[[ -d "$state/tpm" ]] || { echo "$state/tpm missing: run swtpm/provision.sh $1 first" >&2; exit 1; }
if [[ -f "$state/swtpm.pid" ]] && kill -0 "$(cat "$state/swtpm.pid")" 2>/dev/null; then
    echo "swtpm already running for $state (pid $(cat "$state/swtpm.pid"))" >&2
    exit 1
fi
swtpm socket --tpm2 \
    --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$ctrl,bindaddr=127.0.0.1" \
    --flags not-need-init,startup-clear \
    --tpmstate "dir=$state/tpm" \
    --pid "file=$state/swtpm.pid" \
    --log "file=$state/swtpm.log,level=1" \
    --daemon
for _ in $(seq 1 100); do
    if swtpm_ioctl --tcp "127.0.0.1:$ctrl" -c >/dev/null 2>&1; then
        echo "swtpm running: pid $(cat "$state/swtpm.pid"), TCTI swtpm:host=127.0.0.1,port=$port"
        exit 0
    fi
    sleep 0.05
done
echo "swtpm did not answer on 127.0.0.1:$ctrl; see $state/swtpm.log" >&2
exit 1
