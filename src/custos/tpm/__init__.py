"""The public TPM layer.

One shared ESAPI context per TCTI, templates, key blobs, EK/NV reads, attestation keys.
"""
