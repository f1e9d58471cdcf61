"""``custos agent run``: the node agent in the foreground.

These commands join the ``custos agent`` group of :mod:`custos.cli.admin` (``list``,
``show``, ``evict``, ``ban``: admin calls on the server) — one group per noun, as
SPIRE has ``spire-agent run`` next to ``spire-server agent list``.

``run`` loads its file with :func:`custos.agent.config.load_agent_config`: any
mistake is one ``error [agent_config]: <file>: <key>: ...`` line and exit 1, before
anything starts.
"""

from __future__ import annotations

import asyncio
import sys

import click

_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command("run", context_settings=_CONTEXT)
@click.option(
    "--config",
    "config_path",
    required=True,
    envvar="CUSTOS_AGENT_CONFIG",
    show_envvar=True,
    help="the agent's TOML configuration file",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="log records at this level and above go to stderr",
)
def run_cmd(config_path: str, log_level: str) -> None:
    """Run the node agent in the foreground until SIGTERM or SIGINT.

    Prints "custos agent ready: socket=unix://... spiffe_id=..." on stdout once the
    Workload API listens.
    """
    from custos.agent.config import load_agent_config
    from custos.agent.run import configure_logging, ready_line, run_agent

    configure_logging(log_level)
    config = load_agent_config(config_path)

    def ready(agent: object) -> None:
        click.echo(ready_line(agent))  # type: ignore[arg-type]
        sys.stdout.flush()

    asyncio.run(run_agent(config, on_ready=ready))


__all__ = ["run_cmd"]
