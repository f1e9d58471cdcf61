"""``custos server``: write a single-machine configuration, check one, run the
server, ask a running one whether it is healthy.

``server run`` loads its file with the same
:func:`custos.server.config.load_server_config` as ``check-config``, so
``check-config`` says exactly what ``run`` would refuse.
"""

from __future__ import annotations

import asyncio
import os
import sys

import click

from custos.cli.admin import _Admin, _admin_command
from custos.server.config import load_server_config
from custos.server.init import init_server

_CONTEXT = {"help_option_names": ["-h", "--help"]}


_CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    required=True,
    envvar="CUSTOS_SERVER_CONFIG",
    show_envvar=True,
    help="the server's TOML configuration file",
)


@click.group(context_settings=_CONTEXT)
def server() -> None:
    """The custos server: configuration (init, check-config), run, healthcheck,
    rotate-keys."""


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
@_CONFIG_OPTION
def check_config_cmd(config_path: str) -> None:
    """Validate a server configuration: prints "ok", or one line naming the bad key."""
    load_server_config(config_path)
    click.echo("ok")


@server.command("run", context_settings=_CONTEXT)
@_CONFIG_OPTION
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="log records at this level and above go to stderr",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="one line per record: text, or one JSON object",
)
def run_cmd(config_path: str, log_level: str, log_format: str) -> None:
    """Run the server in the foreground until SIGTERM or SIGINT.

    Prints "custos server ready: ..." with its addresses on stdout once it serves.
    """
    # grpc's C core writes its own stderr lines (``E1204 ... add_port.cc ...``) before
    # the custos line that says the same; it reads this once, when grpc is imported
    # (below). An operator's explicit setting is kept (to debug grpc itself).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from custos.server.run import configure_logging, ready_line, run_server

    config = load_server_config(config_path)
    configure_logging(log_level, log_format)

    def ready(srv: object) -> None:
        click.echo(ready_line(srv))  # type: ignore[arg-type]
        sys.stdout.flush()

    asyncio.run(run_server(config, on_ready=ready))


@server.command("healthcheck", context_settings=_CONTEXT)
@click.option("--verbose", "-v", is_flag=True, help="say why it is unhealthy")
@_admin_command
def healthcheck_cmd(api: _Admin, verbose: bool) -> None:
    """Exit 0 when the server answers its gRPC health check with SERVING, else 1.

    `--output json` prints {"healthy": true|false, "admin_socket": PATH} either way.
    """
    from custos.server.admin.client import socket_path
    from custos.server.health import admin_health

    path = socket_path(api.socket)
    healthy = asyncio.run(admin_health(path))
    if api.output == "json":
        api.emit({"healthy": healthy, "admin_socket": path}, "")
    elif healthy:
        click.echo("server is healthy")
    elif verbose or not os.path.exists(path):
        click.echo(f"server is unhealthy: no SERVING answer on {path}", err=True)
    else:
        click.echo("server is unhealthy", err=True)
    if not healthy:
        sys.exit(1)
