"""``custos``: one command, one group per domain (keys, tpm, wimse, jwt ...).

Errors from custos print ``error [code]: message`` on stderr and exit 1;
usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from custos import __version__
from custos.cli.admin import agent, bundle, entry, rotate_keys, token
from custos.cli.agent import run_cmd as agent_run
from custos.cli.dev import dev
from custos.cli.keys import keys
from custos.cli.plugins import plugins
from custos.cli.server import server
from custos.cli.tpm import tpm
from custos.cli.wimse import jwt, wimse
from custos.cli.workload import healthcheck, jwt_fetch, wit, wpt, x509
from custos.errors import CustosError


class CustosGroup(click.Group):
    """Turns custos errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CustosError as e:
            click.echo(f"error [{e.code}]: {e.message}", err=True)
            sys.exit(1)


# -h as well as --help, on every command: subcommands inherit it from this group.
@click.group(cls=CustosGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="custos")
def cli() -> None:
    """custos: hardware-backed key custody and workload identity."""


cli.add_command(keys)
cli.add_command(tpm)
cli.add_command(server)
cli.add_command(entry)
cli.add_command(token)
cli.add_command(agent)
agent.add_command(agent_run)
cli.add_command(bundle)
server.add_command(rotate_keys)

cli.add_command(wimse)
cli.add_command(jwt)
jwt.add_command(jwt_fetch)
agent.add_command(healthcheck)
cli.add_command(wit)
cli.add_command(wpt)
cli.add_command(x509)
cli.add_command(dev)
cli.add_command(plugins)


def main() -> None:
    cli(prog_name="custos")
