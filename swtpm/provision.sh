#!/usr/bin/env bash
# Provision a TPM 2.0 state with EK certificates (RSA-2048 + ECC P-384) and a
# platform certificate, using private swtpm_setup / swtpm_localca configuration
# files inside STATE_DIR (nothing is written under /etc or /var).
#
#   swtpm/provision.sh STATE_DIR
#
# Safe to run twice: a STATE_DIR that already holds a complete TPM is kept as it is
# (same EK); a half-made one (a run killed midway) is an error naming it.
#
# Layout (see src/custos/testing/swtpm.py, the one implementation):
#   STATE_DIR/conf/   swtpm_setup.conf, swtpm-localca.conf, swtpm-localca.options
#   STATE_DIR/tpm/    the TPM state (swtpm --tpmstate dir=STATE_DIR/tpm)
#   STATE_DIR/ca/     issuercert.pem + swtpm-localca-rootca-cert.pem (EK cert chain)
#   STATE_DIR/ek/     DER copies of the EK certificates
set -euo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"  # -P: the real checkout, also via a symlink
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi
# Works from a checkout without installing custos (the rig needs no test framework).
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m custos.testing.swtpm provision "$1"
