"""``custos wit fetch``, ``wpt sign``, ``jwt fetch``, ``x509 fetch`` and ``agent
healthcheck``: a workload's view of the agent's socket (decision 0053).

Each takes ``--socket unix:///path`` (default: ``SPIFFE_ENDPOINT_SOCKET``) and
``--timeout``; they fail at once when no agent answers (one ``error [code]: ...``
line, exit 1) rather than wait for one, as ``spire-agent api`` does.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from custos.errors import CustosError

if TYPE_CHECKING:
    from custos.client import SyncWorkloadClient

_F = TypeVar("_F", bound=Callable[..., Any])
_CONTEXT = {"help_option_names": ["-h", "--help"]}


class WorkloadOutputError(CustosError):
    """``x509 fetch`` cannot write its files."""

    code = "workload_output"


def _socket_options(f: _F) -> _F:
    f = click.option("--timeout", type=float, default=10.0, show_default=True,
                     help="seconds the call may take")(f)
    return click.option(
        "--socket", "socket_", metavar="unix:///PATH", default=None,
        help="the agent's socket (default: $SPIFFE_ENDPOINT_SOCKET)",
    )(f)


def _spiffe_id_option(f: _F) -> _F:
    return click.option("--spiffe-id", default=None,
                        help="which of this process's identities (default: its default one)")(f)


def _client(socket_: str | None, timeout: float) -> SyncWorkloadClient:
    from custos.client import SyncWorkloadClient

    # A command answers now: no waiting for an agent that is not there.
    return SyncWorkloadClient(socket_, timeout=timeout, wait_for_ready=False)


# -- custos wit / wpt -------------------------------------------------------------------

@click.group(context_settings=_CONTEXT)
def wit() -> None:
    """Workload Identity Tokens from the agent."""


@wit.command("fetch", context_settings=_CONTEXT)
@_spiffe_id_option
@_socket_options
def wit_fetch(spiffe_id: str | None, socket_: str | None, timeout: float) -> None:
    """Print this process's WIT (compact form; the key stays in the agent)."""
    with _client(socket_, timeout) as client:
        click.echo(client.fetch_wit(spiffe_id).wit)


@click.group(context_settings=_CONTEXT)
def wpt() -> None:
    """Workload Proof Tokens signed by the agent."""


@wpt.command("sign", context_settings=_CONTEXT)
@click.option("--audience", required=True, metavar="URL", help="the target URI of the request")
@click.option("--headers", is_flag=True,
              help="print the WIT and WPT header lines (from one call: they always match)")
@click.option("--txn-token", default=None, help="a Txn-Token the proof binds (tth)")
@click.option("--ttl", type=int, default=None, help="the WPT's lifetime in seconds (1-300)")
@_spiffe_id_option
@_socket_options
def wpt_sign(audience: str, headers: bool, txn_token: str | None, ttl: int | None,
             spiffe_id: str | None, socket_: str | None, timeout: float) -> None:
    """Print a WPT for one request to URL (with --headers, the header lines to send)."""
    from custos.wimse.wpt import wpt_headers

    with _client(socket_, timeout) as client:
        signed = client.sign_wpt(audience, ttl=ttl, txn_token=txn_token, spiffe_id=spiffe_id)
    if not headers:
        click.echo(signed.wpt)
        return
    # One SignWPT call gave both: the WPT's wth is the hash of exactly this WIT.
    for name, value in wpt_headers(signed.wit, signed.wpt):
        click.echo(f"{name}: {value}")
    if txn_token is not None:
        click.echo(f"Txn-Token: {txn_token}")


# -- custos jwt fetch --------------------------------------------------------------------

@click.command("fetch", context_settings=_CONTEXT)
@click.option("--audience", "audiences", multiple=True, required=True,
              help="an audience of the JWT-SVID (repeat for more)")
@_spiffe_id_option
@_socket_options
def jwt_fetch(audiences: tuple[str, ...], spiffe_id: str | None, socket_: str | None,
              timeout: float) -> None:
    """Print a JWT-SVID of this process for the audiences."""
    with _client(socket_, timeout) as client:
        click.echo(client.fetch_jwt_svid(list(audiences), spiffe_id=spiffe_id).token)


# -- custos x509 fetch -------------------------------------------------------------------

@click.group(context_settings=_CONTEXT)
def x509() -> None:
    """X.509-SVIDs from the agent."""


def _write(directory: Path, name: str, data: bytes, mode: int) -> None:
    """``directory/name`` replaced atomically, with ``mode`` from its first byte."""
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")  # 0600 from the start
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, directory / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


@x509.command("fetch", context_settings=_CONTEXT)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="directory for svid.pem, svid.key (0600) and bundle.pem")
@_spiffe_id_option
@_socket_options
def x509_fetch(out_dir: Path, spiffe_id: str | None, socket_: str | None,
               timeout: float) -> None:
    """Write this process's X.509-SVID, its key and the bundle (``exportable`` entries only)."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    from custos.client import WorkloadApiDeniedError
    from custos.identity import SpiffeId

    with _client(socket_, timeout) as client:
        svids = client.fetch_x509_svids()
    wanted = SpiffeId.parse(spiffe_id) if spiffe_id else svids[0].spiffe_id
    chosen = next((s for s in svids if s.spiffe_id == wanted), None)
    if chosen is None:
        raise WorkloadApiDeniedError(f"no exportable X.509-SVID for {wanted}")
    key = chosen.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(out_dir, "svid.pem", b"".join(c.public_bytes(Encoding.PEM)
                                             for c in chosen.cert_chain), 0o644)
        _write(out_dir, "svid.key", key, 0o600)
        _write(out_dir, "bundle.pem", b"".join(c.public_bytes(Encoding.PEM)
                                               for c in chosen.bundle), 0o644)
    except OSError as e:
        raise WorkloadOutputError(f"cannot write to {out_dir}: {e.strerror or e}") from e
    click.echo(f"{chosen.spiffe_id}: wrote svid.pem, svid.key and bundle.pem to {out_dir}")


# -- custos agent healthcheck ------------------------------------------------------------

@click.command("healthcheck", context_settings=_CONTEXT)
@_socket_options
def healthcheck(socket_: str | None, timeout: float) -> None:
    """Exit 0 when the agent answers on its socket (a Ping: no attestation)."""
    with _client(socket_, timeout) as client:
        client.ping()
    click.echo("Agent is healthy.")


__all__ = ["healthcheck", "jwt_fetch", "wit", "wpt", "x509"]
