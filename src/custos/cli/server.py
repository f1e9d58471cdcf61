"""``custos server``: write a single-machine configuration, and check one.

``server run`` (a later slice) loads its file with the same
:func:`custos.server.config.load_server_config`, so ``check-config`` says exactly
what ``run`` would refuse.
"""

from __future__ import annotations

import click

from custos.server.config import load_server_config
from custos.server.init import init_server

_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=_CONTEXT)
def server() -> None:
    """The custos server: configuration (init, check-config)."""


@server.command("init", context_settings=_CONTEXT)
@click.option("--trust-domain", required=True, help="the trust domain, e.g. example.org")
@click.option(
    "--data-dir",
    required=True,
    help="directory for server.toml, the SQLite datastore, the keys and the admin "
    "socket (created with mode 0700 if missing)",
)
def init_cmd(trust_domain: str, data_dir: str) -> None:
    """Write DATA_DIR/server.toml, a working single-machine configuration.

    An existing server.toml is never overwritten.
    """
    click.echo(str(init_server(trust_domain, data_dir)))


@server.command("check-config", context_settings=_CONTEXT)
@click.option(
    "--config",
    "config_path",
    required=True,
    envvar="CUSTOS_SERVER_CONFIG",
    show_envvar=True,
    help="the server's TOML configuration file",
)
def check_config_cmd(config_path: str) -> None:
    """Validate a server configuration: prints "ok", or one line naming the bad key."""
    load_server_config(config_path)
    click.echo("ok")
