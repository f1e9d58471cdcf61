"""The public TPM layer: what the key store and TPM attestation build on.

Modules, one job each:

- :mod:`custos.tpm.tcti` — the TCTI allowlist and where a TCTI comes from (no libtss2 needed);
- :mod:`custos.tpm.context` — one shared ESAPI context per TCTI per process: its lock, the
  storage primary, object-slot accounting, the flush of stale handles on reconnect, and
  loading a key file checked by name;
- :mod:`custos.tpm.templates` — public-area templates (storage primary, workload keys, AK);
- :mod:`custos.tpm.blobs` — ``TSS2 PRIVATE KEY`` files: read, validate completely, serialize;
- :mod:`custos.tpm.ek` — EK certificates in NV and EK public keys;
- :mod:`custos.tpm.ak` — attestation keys: create, TPM2_Quote, TPM2_Certify;
- :mod:`custos.tpm.activation` — MakeCredential (server, no TPM) and ActivateCredential
  (agent): proving an AK lives in the TPM of an EK;
- :mod:`custos.tpm.verify` — checking TPM evidence without a TPM: public areas, quotes,
  certify statements, the clock / reset / restart counters (:class:`AttestationEvidenceError`);
- :mod:`custos.tpm.ekcert` — trusting an EK: its certificate chaining to a manufacturer CA
  bundle, or its hash on an allowlist (docs/tpm-ek-certificates.md);
- :mod:`custos.tpm.eventlog` — TCG2 crypto-agile measured-boot event logs: parse, replay;
- :mod:`custos.tpm.signatures` — signing schemes, TPMT_SIGNATURE to JOSE or DER;
- :mod:`custos.tpm.errors` — TPM errors and telling a lost device from a refusal;
- :mod:`custos.tpm.info` — what a TPM says about itself (``custos tpm info``).

Importing this package loads nothing from tpm2-pytss; the modules that call libtss2 keep
its stderr logging quiet unless ``TSS2_LOG`` is set (:mod:`custos.tpm._tss`).
"""
