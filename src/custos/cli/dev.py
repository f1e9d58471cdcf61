"""``custos dev``: a server and an attested agent in one process (``custos.dev``).

stdout carries exactly two lines once everything is ready, in shell syntax::

    SPIFFE_ENDPOINT_SOCKET=unix:///tmp/custos-dev-x1y2/agent.sock
    CUSTOS_ADMIN_SOCKET=unix:///tmp/custos-dev-x1y2/server/admin.sock

What it built (device, identities) goes to stderr with the logs.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import cast

import click

_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command("dev", context_settings=_CONTEXT)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="keep the state here (started over on each run); default: a temporary "
    "directory removed at stop",
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="the agent's Workload API socket; default: DATA_DIR/agent.sock",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "tpm", "pkcs11", "memory"]),
    default="auto",
    show_default=True,
    help="where the agent's and the workloads' keys live: auto is swtpm when installed, "
    "else SoftHSM2, else memory",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="log records at this level and above go to stderr",
)
def dev(data_dir: Path | None, socket_path: Path | None, device: str, log_level: str) -> None:
    """Run a server and an agent attested to it, for development on one machine.

    Keys in swtpm when installed, else SoftHSM2, else memory. Entries for the current
    user: one identity per custody tier (spiffe://example.org/dev/<tier>). Stops
    cleanly on SIGINT or SIGTERM.
    """
    from custos.agent.run import configure_logging
    from custos.dev import DevEnvironment, Device, run_dev

    configure_logging(log_level)

    def ready(env: DevEnvironment) -> None:
        click.echo(f"custos dev: data in {env.data_dir}", err=True)
        click.echo(f"custos dev: key custody on {env.device}: {env.device_detail}", err=True)
        click.echo(
            f"custos dev: agent {env.agent.node.identity.spiffe_id} attested by {env.attestor}",
            err=True,
        )
        for tier, spiffe_id in env.identities.items():
            click.echo(f"custos dev: identity {spiffe_id} (custody {tier})", err=True)
        for line in env.env_lines:
            click.echo(line)
        sys.stdout.flush()

    chosen = None if device == "auto" else cast(Device, device)
    asyncio.run(run_dev(data_dir, socket_path, device=chosen, on_ready=ready))


__all__ = ["dev"]
