"""``custos plugins list``: every installed attestor plugin, from the three entry-point
groups, without importing any (decision 0099)."""

from __future__ import annotations

import json

import click

from custos.plugin.discovery import GROUPS, installed, kind_label


@click.group()
def plugins() -> None:
    """Installed attestor plugins."""


@plugins.command("list")
@click.option(
    "--output",
    "-o",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: a table; json: a list of objects.",
)
def list_cmd(output: str) -> None:
    """Every installed attestor (built-in or third party): name, kind, distribution.

    Plugins are listed from their entry points (groups custos.agent.node_attestors,
    custos.server.node_attestors, custos.workload_attestors); none is imported, so a
    plugin that fails to import is still listed.  A name registered twice in one group
    is an error (plugin_duplicate), as when loading.
    """
    found = installed()
    if output == "json":
        rows = [
            {
                "name": p.name,
                "kind": p.kind,
                "group": GROUPS[p.kind],
                "distribution": p.distribution,
                "entry_point": p.value,
            }
            for p in found
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("NAME", "KIND", "DISTRIBUTION", "ENTRY POINT")]
    table += [(p.name, kind_label(p.kind), p.distribution or "-", p.value) for p in found]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        click.echo("  ".join([*cells, row[3]]))


__all__ = ["plugins"]
