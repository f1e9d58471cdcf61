"""Node attestors (each a pair of halves in its own subpackage)."""
