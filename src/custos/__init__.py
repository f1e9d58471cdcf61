"""custos: hardware-backed attestation and key custody for workload identity."""

__version__ = "0.1.0"
