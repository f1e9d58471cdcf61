"""The ``tpm`` node attestor: a TPM proves which machine the agent runs on.

The agent half (:mod:`.agent`) sends the TPM's endorsement key (EK) with its
certificate and an attestation key (AK), activates the credential the server
encrypts to the EK for the AK, and quotes the PCRs with the server's nonce.  The
server half (:mod:`.server`) trusts the EK by its manufacturer CA or an allowlist,
checks the activation and the quote, the TPM's clock and the PCR policy, and names
the agent after the EK: ``spiffe://TD/custos/agent/tpm/<sha256 of the EK's SPKI>``.
The halves share only the wire format (:mod:`.wire`) and PCR selections (:mod:`.policy`);
a server imports no agent code. See README.md beside this file.
"""
