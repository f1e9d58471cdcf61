"""Test rigs for custos and for services built on it: a real swtpm and a real
SoftHSM2 token as pytest fixtures (installed as the ``custos`` pytest plugin)."""
