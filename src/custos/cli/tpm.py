"""``custos tpm info``."""

from __future__ import annotations

import json
import os

import click

from custos.keys.config import DEFAULT_TCTI


@click.group()
def tpm() -> None:
    """Inspect the TPM."""


@tpm.command()
@click.option("--tcti", default=None, help="TPM TCTI [env CUSTOS_TCTI; default device:/dev/tpmrm0]")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def info(tcti: str | None, as_json: bool) -> None:
    """Manufacturer, firmware, PCR banks and the EK certificate's subject and issuer."""
    from custos.tpm.info import tpm_info

    data = tpm_info(tcti or os.environ.get("CUSTOS_TCTI") or DEFAULT_TCTI)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    for key, value in data.items():
        click.echo(f"{key}: {value}")
