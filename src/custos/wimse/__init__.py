"""IETF WIMSE: Workload Identity Tokens, Workload Proof Tokens, HTTP message signatures."""
