"""HTTP messages and the origin / request-target rules that WIMSE proofs bind to."""
