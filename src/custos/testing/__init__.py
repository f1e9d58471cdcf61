"""Test rigs for custos and for services built on it: a real swtpm
(:mod:`custos.testing.swtpm`) and a real SoftHSM2 token
(:mod:`custos.testing.softhsm`), usable from any script, and the pytest fixtures
built on them in :mod:`custos.testing.plugin` (installed as the ``custos``
pytest plugin). Only the plugin module imports pytest."""
