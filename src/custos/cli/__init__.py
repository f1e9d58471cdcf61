"""The ``custos`` operator command line."""
