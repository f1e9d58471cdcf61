"""``custos tpm info``: what the TPM says about itself, as text or JSON."""

from __future__ import annotations

import json
from typing import Any

import click

from custos._extras import extra_needed
from custos.tpm.tcti import resolve_tcti

_CONTEXT = {"help_option_names": ["-h", "--help"]}
_TCTI_HELP = (
    "TPM TCTI: device, swtpm, mssim or tabrmd, e.g. device:/dev/tpmrm0 or swtpm:port=2321 "
    "[env CUSTOS_TCTI, then TPM2TOOLS_TCTI, then TSS2_TCTI; default device:/dev/tpmrm0]"
)


def _text(value: Any) -> str:
    """One value as an operator reads it: no Python reprs, lists joined, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "none"
    return str(value)


def info_lines(data: dict[str, Any]) -> list[str]:
    """``name: value`` lines of :func:`custos.tpm.info.tpm_info`'s result."""
    lines = []
    for key, value in data.items():
        if key == "spec":
            lines.append(
                f"spec: TPM {value['family']}, level {value['level']}, "
                f"revision {value['revision']:.2f}"
            )
        elif key == "ek_certificates":
            for profile, cert in value.items():
                if "error" in cert:
                    lines.append(f"ek_certificate[{profile}]: {cert['error']}")
                else:
                    lines.append(
                        f"ek_certificate[{profile}]: subject {cert['subject']}; issuer "
                        f"{cert['issuer']}; serial {cert['serial']}; not after {cert['not_after']}"
                    )
            if not value:
                lines.append("ek_certificates: none")
        else:
            lines.append(f"{key}: {_text(value)}")
    return lines


@click.group(context_settings=_CONTEXT)
def tpm() -> None:
    """Inspect the TPM."""


@tpm.command(context_settings=_CONTEXT)
@click.option("--tcti", default=None, help=_TCTI_HELP)
@click.option(
    "--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="output format",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, hidden=True, help="same as --output json")
def info(tcti: str | None, output: str, as_json: bool) -> None:
    """Manufacturer, firmware, PCR banks and the EK certificates' subject and issuer."""
    with extra_needed("tpm"):
        from custos.tpm.info import tpm_info

    data = tpm_info(resolve_tcti(tcti, explicit_source="--tcti"))
    if as_json or output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for line in info_lines(data):
        click.echo(line)
