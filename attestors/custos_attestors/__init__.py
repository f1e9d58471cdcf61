"""custos' built-in attestor plugins.

They are packaged with custos (see ``[tool.hatch.build.targets.wheel]`` in
pyproject.toml) but loaded exactly as a third party's are: through the
``custos.agent.node_attestors``, ``custos.server.node_attestors`` and
``custos.workload_attestors`` entry-point groups (see :mod:`custos.plugin`).
Nothing in ``custos`` imports this package directly, so a built-in has no
privilege a third-party plugin lacks.
"""
