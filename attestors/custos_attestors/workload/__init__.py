"""Workload attestors (agent side only): a caller on the agent's socket -> selectors."""
