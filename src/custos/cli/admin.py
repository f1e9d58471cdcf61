"""``custos entry|token|agent|bundle`` and ``custos server rotate-keys``: the admin
API over the server's Unix socket (docs/cli.md).

Flags follow SPIRE's ``spire-server entry|token|agent|bundle`` commands.  Every
command takes ``--admin-socket`` (or ``$CUSTOS_ADMIN_SOCKET``; a path or a
``unix://`` URL), ``--config`` (read the socket from a server configuration) and
``--output pretty|json``.  IDs, selectors and durations are checked here before
anything is sent; the server checks everything again (the trust domain, DNS
names, revisions) and nothing is written when either refuses.  Errors print one
``error [code]: message`` line and exit 1 (decision 0001).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import click

from custos._extras import extra_needed
from custos._numbers import InvalidNumberError
from custos.errors import CustosError
from custos.identity import Selector, coerce_spiffe_id
from custos.server.config import format_duration, load_server_config, parse_duration

if TYPE_CHECKING:  # grpclib and protobuf are imported when a command runs
    from custos._proto import admin_v1_pb2, types_v1_pb2
    from custos.server.admin.client import AdminClient

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_CONTEXT = {"help_option_names": ["-h", "--help"]}
_CUSTODIES = ("tpm", "pkcs11", "memory", "exportable")
#: Longest TTL the CLI sends (the datastore's own bound: ten years).
_MAX_TTL = 10 * 365 * 86400.0
_MATCHES = ("exact", "subset", "superset", "any")


class AdminInputError(CustosError, ValueError):
    """A command-line value is unusable; nothing was sent to the server."""

    code = "invalid_input"


# -- common options ---------------------------------------------------------------


@dataclass(frozen=True)
class _Admin:
    """Where the server is and how to print: what every command is given."""

    socket: str | None
    output: str

    def run(self, call: Callable[[AdminClient], Awaitable[T]]) -> T:
        with extra_needed("grpc"):
            from custos.server.admin.client import AdminClient

        async def go() -> T:
            async with AdminClient(self.socket) as client:
                return await call(client)

        return asyncio.run(go())

    def emit(self, data: Any, pretty: str) -> None:
        if self.output == "json":
            click.echo(json.dumps(data, indent=2, sort_keys=True))
        else:
            click.echo(pretty)


def _admin_command(func: F) -> F:
    """Add ``--admin-socket``, ``--config`` and ``--output``; call ``func(admin, ...)``."""

    @click.option(
        "--admin-socket",
        envvar="CUSTOS_ADMIN_SOCKET",
        show_envvar=True,
        default=None,
        help="the server's admin socket (a path or unix:// URL); default: the one in "
        "--config, else /var/lib/custos/server/admin.sock",
    )
    @click.option(
        "--config",
        "config_path",
        envvar="CUSTOS_SERVER_CONFIG",
        default=None,
        help="read the admin socket path from this server configuration",
    )
    @click.option(
        "--output",
        "-o",
        type=click.Choice(["pretty", "json"]),
        default="pretty",
        show_default=True,
        help="pretty: for people; json: one JSON document (docs/cli.md shows its shape)",
    )
    @functools.wraps(func)
    def wrapper(
        admin_socket: str | None, config_path: str | None, output: str, **kwargs: Any
    ) -> Any:
        if admin_socket is None and config_path is not None:
            admin_socket = str(load_server_config(config_path).admin.socket)
        return func(_Admin(admin_socket, output), **kwargs)

    return wrapper  # type: ignore[return-value]


# -- input checks (before anything is sent) -------------------------------------


def _spiffe_id(value: str, flag: str) -> str:
    try:
        return str(coerce_spiffe_id(value))
    except CustosError as e:
        raise AdminInputError(f"{flag}: {e.message}", code=e.code) from None


def _selectors(values: Sequence[str]) -> list[str]:
    out = []
    for value in values:
        try:
            out.append(str(Selector.parse(value)))
        except CustosError as e:
            raise AdminInputError(f"--selector {value[:80]!r}: {e.message}", code=e.code) from None
    return out


def _ttl(value: str | None, flag: str) -> int:
    """A duration flag ("1h", "5m", "90s", "3600") in whole seconds; 0 when not given
    (the server's default)."""
    if value is None:
        return 0
    given: str | float = value
    try:
        # A bare number is seconds, as in the config file (where it is a TOML number).
        given = float(value)
    except ValueError:
        pass
    try:
        seconds = parse_duration(given, name=flag, maximum=_MAX_TTL).total_seconds()
    except InvalidNumberError as e:
        raise AdminInputError(f"{flag} {value[:40]!r}: {e.message}", code=e.code) from None
    return math.ceil(seconds)


def _expires_at(value: str | None) -> int:
    """``--expires-at``: Unix seconds, an ISO 8601 time (UTC when no offset) or
    ``never``; 0 on the wire is never."""
    if value is None or value.strip().lower() == "never":
        return 0
    try:
        at = float(value) if value.strip().isdigit() else _iso(value)
    except ValueError:
        raise AdminInputError(
            f"--expires-at {value[:40]!r}: give Unix seconds or an ISO 8601 time "
            "such as 2027-01-31T12:00:00Z",
            code="invalid_time",
        ) from None
    if at <= datetime.now(UTC).timestamp():
        raise AdminInputError(f"--expires-at {value[:40]!r} is in the past", code="invalid_time")
    return math.ceil(at)


def _iso(value: str) -> float:
    parsed = datetime.fromisoformat(value.strip())
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# -- output -------------------------------------------------------------------------


def _time(value: int) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")


def _duration(value: int) -> str:
    return format_duration(timedelta(seconds=value))


def entry_json(entry: types_v1_pb2.Entry) -> dict[str, Any]:
    """The ``--output json`` shape of one entry (docs/cli.md)."""
    return {
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "selectors": list(entry.selectors),
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "wit_ttl": entry.wit_ttl,
        "dns_names": list(entry.dns_names),
        "key_custody": entry.key_custody,
        "hint": entry.hint,
        "admin": entry.admin,
        "downstream": entry.downstream,
        "expires_at": entry.expires_at or None,
        "revision": entry.revision,
        "require_residency": entry.require_residency,
    }


def _entry_pretty(entry: types_v1_pb2.Entry) -> str:
    rows = [
        ("Entry ID", entry.id),
        ("SPIFFE ID", entry.spiffe_id),
        ("Parent ID", entry.parent_id),
        ("Revision", str(entry.revision)),
        ("X509-SVID TTL", _duration(entry.x509_svid_ttl)),
        ("JWT-SVID TTL", _duration(entry.jwt_svid_ttl)),
        ("WIT TTL", _duration(entry.wit_ttl)),
        *(("Selector", s) for s in entry.selectors),
        *(("DNS name", d) for d in entry.dns_names),
        ("Key custody", entry.key_custody),
        ("Expires at", _time(entry.expires_at) if entry.expires_at else "never"),
    ]
    rows += [("Hint", entry.hint)] if entry.hint else []
    rows += [("Admin", "true")] if entry.admin else []
    rows += [("Downstream", "true")] if entry.downstream else []
    rows += [("Residency", "required (TPM-proven keys only)")] if entry.require_residency else []
    return _table(rows)


def agent_json(agent: admin_v1_pb2.Agent) -> dict[str, Any]:
    """The ``--output json`` shape of one agent (docs/cli.md)."""
    return {
        "id": agent.id,
        "attestor": agent.attestor,
        "selectors": list(agent.selectors),
        "serial": agent.serial,
        "expires_at": agent.expires_at,
        "evicted": agent.evicted,
        "banned": agent.banned,
        "updated_at": agent.updated_at,
        # base64 of the activated AK's TPM2B_PUBLIC; null: no AK (not TPM-attested)
        "attestation_key": base64.b64encode(agent.attestation_key).decode("ascii")
        if agent.attestation_key
        else None,
    }


def _agent_pretty(agent: admin_v1_pb2.Agent) -> str:
    return _table(
        [
            ("Agent ID", agent.id),
            ("Attestor", agent.attestor),
            *(("Selector", s) for s in agent.selectors),
            ("Serial", agent.serial),
            ("Expires at", _time(agent.expires_at)),
            ("Evicted", str(agent.evicted).lower()),
            ("Banned", str(agent.banned).lower()),
            ("Updated at", _time(agent.updated_at)),
            (
                "Attestation key",
                "sha256:" + hashlib.sha256(agent.attestation_key).hexdigest()
                if agent.attestation_key
                else "none",
            ),
        ]
    )


def _table(rows: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"{name:<15}: {value}" for name, value in rows)


def _many(items: Sequence[str], one: str, many: str) -> str:
    head = f"Found {len(items)} {one if len(items) == 1 else many}"
    return "\n\n".join([head, *items])


# -- custos entry ---------------------------------------------------------------------


@click.group(context_settings=_CONTEXT)
def entry() -> None:
    """Registration entries: which workloads get which SPIFFE IDs."""


def _entry_flags(*, create: bool) -> Callable[[F], F]:
    """The entry's fields as flags; on update every flag is optional (unchanged)."""

    def decorate(func: F) -> F:
        flag_default = False if create else None
        for option in reversed(
            [
                click.option("--spiffe-id", required=create, help="the workload's SPIFFE ID"),
                click.option(
                    "--parent-id",
                    required=create,
                    help="the agent (or parent entry) that serves this entry",
                ),
                click.option(
                    "--selector",
                    "selectors",
                    multiple=True,
                    required=create,
                    help="type:value, e.g. unix:uid:1001 (repeat for more; on update, "
                    "the given set replaces the old one)",
                ),
                click.option("--x509-ttl", help="X.509-SVID lifetime, e.g. 1h (default: server's)"),
                click.option("--jwt-ttl", help="JWT-SVID lifetime, e.g. 5m (default: server's)"),
                click.option("--wit-ttl", help="WIT lifetime, e.g. 1h (default: server's)"),
                click.option(
                    "--custody",
                    type=click.Choice(_CUSTODIES),
                    default="memory" if create else None,
                    show_default=create,
                    help="where the workload's private key lives",
                ),
                click.option(
                    "--dns",
                    "dns_names",
                    multiple=True,
                    help="DNS SAN for the X.509-SVID (repeatable; on update, replaces)",
                ),
                click.option("--hint", default=None, help="a label for operators and workloads"),
                click.option("--admin/--no-admin", default=flag_default, help="admin workload"),
                click.option(
                    "--downstream/--no-downstream",
                    default=flag_default,
                    help="downstream (nested) server",
                ),
                click.option(
                    "--expires-at",
                    help="when the entry stops being served: Unix seconds, ISO 8601 or "
                    "'never' (the default)",
                ),
                click.option(
                    "--require-residency/--no-require-residency",
                    default=flag_default,
                    help="issue only for keys the agent's TPM proved resident (TPM2_Certify "
                    "by its attested AK); needs --custody tpm; an agent without an AK is "
                    "refused (residency_unproven)",
                ),
            ]
        ):
            func = option(func)
        return func

    return decorate


@entry.command("create", context_settings=_CONTEXT)
@_entry_flags(create=True)
@_admin_command
def entry_create(api: _Admin, **flags: Any) -> None:
    """Create a registration entry (like spire-server entry create)."""
    from custos._proto import types_v1_pb2

    message = types_v1_pb2.Entry(
        spiffe_id=_spiffe_id(flags["spiffe_id"], "--spiffe-id"),
        parent_id=_spiffe_id(flags["parent_id"], "--parent-id"),
        selectors=_selectors(flags["selectors"]),
        x509_svid_ttl=_ttl(flags["x509_ttl"], "--x509-ttl"),
        jwt_svid_ttl=_ttl(flags["jwt_ttl"], "--jwt-ttl"),
        wit_ttl=_ttl(flags["wit_ttl"], "--wit-ttl"),
        dns_names=list(flags["dns_names"]),
        key_custody=flags["custody"],
        hint=flags["hint"] or "",
        admin=flags["admin"],
        downstream=flags["downstream"],
        expires_at=_expires_at(flags["expires_at"]),
        require_residency=flags["require_residency"],
    )
    created = api.run(lambda c: c.create_entry(message))
    api.emit(entry_json(created), _entry_pretty(created))


@entry.command("update", context_settings=_CONTEXT)
@click.argument("entry_id")
@click.option(
    "--revision",
    type=click.IntRange(min=1),
    default=None,
    help="the revision you read (refused if the entry changed since); default: the "
    "revision read by this command",
)
@_entry_flags(create=False)
@_admin_command
def entry_update(api: _Admin, entry_id: str, revision: int | None, **flags: Any) -> None:
    """Change the given fields of entry ENTRY_ID; the others stay as they are."""
    # Check every flag before reading: bad input must not reach the server.
    changes: dict[str, Any] = {}
    if flags["spiffe_id"] is not None:
        changes["spiffe_id"] = _spiffe_id(flags["spiffe_id"], "--spiffe-id")
    if flags["parent_id"] is not None:
        changes["parent_id"] = _spiffe_id(flags["parent_id"], "--parent-id")
    for flag, field in (
        ("x509_ttl", "x509_svid_ttl"),
        ("jwt_ttl", "jwt_svid_ttl"),
        ("wit_ttl", "wit_ttl"),
    ):
        if flags[flag] is not None:
            changes[field] = _ttl(flags[flag], "--" + flag.replace("_", "-"))
    if flags["expires_at"] is not None:
        changes["expires_at"] = _expires_at(flags["expires_at"])
    for flag, field in (
        ("custody", "key_custody"),
        ("hint", "hint"),
        ("admin", "admin"),
        ("downstream", "downstream"),
        ("require_residency", "require_residency"),
    ):
        if flags[flag] is not None:
            changes[field] = flags[flag]
    selectors = _selectors(flags["selectors"]) if flags["selectors"] else None
    dns_names = list(flags["dns_names"]) if flags["dns_names"] else None

    async def update(client: AdminClient) -> types_v1_pb2.Entry:
        current = await client.get_entry(entry_id)
        for name, value in changes.items():
            setattr(current, name, value)
        if selectors is not None:
            current.ClearField("selectors")
            current.selectors.extend(selectors)
        if dns_names is not None:
            current.ClearField("dns_names")
            current.dns_names.extend(dns_names)
        if revision is not None:
            current.revision = revision
        return await client.update_entry(current)

    updated = api.run(update)
    api.emit(entry_json(updated), _entry_pretty(updated))


@entry.command("show", context_settings=_CONTEXT)
@click.argument("entry_id")
@_admin_command
def entry_show(api: _Admin, entry_id: str) -> None:
    """Show entry ENTRY_ID."""
    found = api.run(lambda c: c.get_entry(entry_id))
    api.emit(entry_json(found), _entry_pretty(found))


@entry.command("list", context_settings=_CONTEXT)
@click.option("--parent-id", default=None, help="only entries with this parent")
@click.option("--spiffe-id", default=None, help="only entries for this SPIFFE ID")
@click.option("--selector", "selectors", multiple=True, help="type:value (repeatable)")
@click.option(
    "--match",
    type=click.Choice(_MATCHES),
    default="exact",
    show_default=True,
    help="how --selector compares with each entry's selectors",
)
@_admin_command
def entry_list(
    api: _Admin,
    parent_id: str | None,
    spiffe_id: str | None,
    selectors: tuple[str, ...],
    match: str,
) -> None:
    """List registration entries, optionally filtered."""
    parent = _spiffe_id(parent_id, "--parent-id") if parent_id is not None else ""
    spiffe = _spiffe_id(spiffe_id, "--spiffe-id") if spiffe_id is not None else ""
    wanted = tuple(_selectors(selectors))
    found = api.run(
        lambda c: c.list_entries(parent_id=parent, spiffe_id=spiffe, selectors=wanted, match=match)
    )
    api.emit(
        {"entries": [entry_json(e) for e in found]},
        _many([_entry_pretty(e) for e in found], "entry", "entries"),
    )


@entry.command("delete", context_settings=_CONTEXT)
@click.argument("entry_id")
@click.option(
    "--revision",
    type=click.IntRange(min=1),
    default=None,
    help="delete only if the entry is still at this revision",
)
@_admin_command
def entry_delete(api: _Admin, entry_id: str, revision: int | None) -> None:
    """Delete entry ENTRY_ID."""
    api.run(lambda c: c.delete_entry(entry_id, revision=revision or 0))
    api.emit({"deleted": entry_id}, f"Deleted entry {entry_id}")


@entry.command("count", context_settings=_CONTEXT)
@_admin_command
def entry_count(api: _Admin) -> None:
    """How many registration entries there are."""
    count = api.run(lambda c: c.count_entries())
    api.emit({"count": count}, f"{count} registration entr{'y' if count == 1 else 'ies'}")


# -- custos token ----------------------------------------------------------------------


@click.group(context_settings=_CONTEXT)
def token() -> None:
    """Join tokens: one-time secrets that let a new node's agent attest."""


@token.command("generate", context_settings=_CONTEXT)
@click.option("--ttl", default=None, help="how long the token is valid, e.g. 10m (default), 1h")
@click.option(
    "--spiffe-id",
    default=None,
    help="also create an alias entry: this SPIFFE ID for the agent that uses the token",
)
@_admin_command
def token_generate(api: _Admin, ttl: str | None, spiffe_id: str | None) -> None:
    """Make a join token (shown once) for `custos agent` on a new node."""
    seconds = _ttl(ttl, "--ttl")
    alias = _spiffe_id(spiffe_id, "--spiffe-id") if spiffe_id is not None else ""
    made = api.run(lambda c: c.generate_token(ttl=seconds, spiffe_id=alias))
    data = {
        "token": made.token,
        "token_id": made.token_id,
        "expires_at": made.expires_at,
        "agent_id": made.agent_id,
        "alias": entry_json(made.alias) if made.HasField("alias") else None,
    }
    rows = [
        ("Token", made.token),
        ("Token ID", made.token_id),
        ("Agent ID", made.agent_id),
        ("Expires at", _time(made.expires_at)),
    ]
    if made.HasField("alias"):
        rows.append(("Alias entry", f"{made.alias.id} ({made.alias.spiffe_id})"))
    api.emit(data, _table(rows))


# -- custos agent ----------------------------------------------------------------------


@click.group(context_settings=_CONTEXT)
def agent() -> None:
    """Attested node agents: list, show, evict, ban."""


@agent.command("list", context_settings=_CONTEXT)
@_admin_command
def agent_list(api: _Admin) -> None:
    """List the attested agents."""
    found = api.run(lambda c: c.list_agents())
    api.emit(
        {"agents": [agent_json(a) for a in found]},
        _many([_agent_pretty(a) for a in found], "agent", "agents"),
    )


def _agent_verb(name: str, doc: str) -> None:
    """``custos agent show|evict|ban AGENT_ID``: one call on one agent."""

    @agent.command(name, context_settings=_CONTEXT, help=doc)
    @click.argument("agent_id")
    @_admin_command
    def command(api: _Admin, agent_id: str) -> None:
        checked = _spiffe_id(agent_id, "AGENT_ID")
        calls = {"show": "get_agent", "evict": "evict_agent", "ban": "ban_agent"}
        found = api.run(lambda c: getattr(c, calls[name])(checked))
        api.emit(agent_json(found), _agent_pretty(found))


_agent_verb("show", "Show agent AGENT_ID (its SPIFFE ID).")
_agent_verb(
    "evict",
    "Evict agent AGENT_ID: it must attest again before it gets anything (SPIRE's agent evict).",
)
_agent_verb("ban", "Ban agent AGENT_ID: it is evicted and can never attest again under this ID.")


# -- custos bundle, custos server rotate-keys ---------------------------------------------


@click.group(context_settings=_CONTEXT)
def bundle() -> None:
    """The trust domain's bundle, as the server publishes it."""


@bundle.command("show", context_settings=_CONTEXT)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["spiffe", "pem", "jwks"]),
    default="spiffe",
    show_default=True,
    help="spiffe: the SPIFFE bundle document; pem: the X.509 roots; jwks: the "
    "JWT-SVID and WIT keys",
)
@_admin_command
def bundle_show(api: _Admin, fmt: str) -> None:
    """Print the trust domain's bundle."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from custos.server.wire import bundle_from_proto

    message = api.run(lambda c: c.get_bundle())
    parsed = bundle_from_proto(message)
    content: Any
    if fmt == "pem":
        content = "".join(
            c.public_bytes(Encoding.PEM).decode("ascii") for c in parsed.x509_authorities
        )
        text = content.rstrip("\n")
    elif fmt == "jwks":
        content = {"keys": [a.jwk() for a in parsed.jwt_authorities]}
        text = json.dumps(content, indent=2)
    else:
        content = json.loads(message.spiffe_bundle)
        text = json.dumps(content, indent=2)
    data = {
        "trust_domain": message.trust_domain,
        "sequence_number": message.sequence_number,
        "format": fmt,
        "bundle": content,
    }
    api.emit(data, text)


@click.command("rotate-keys", context_settings=_CONTEXT)
@_admin_command
def rotate_keys(api: _Admin) -> None:
    """Make new CA, JWT-SVID and WIT signing keys and sign with them now.

    Relying parties that have not fetched the new bundle reject what the new keys
    sign until they do: the scheduled rotation (no command) avoids that.
    """
    kids = api.run(lambda c: c.rotate_keys())
    # The server rotates, and answers, in this order (admin.services.RotateKeys).
    keys = list(zip(("x509-ca", "jwt-svid", "wit"), kids, strict=False))
    api.emit(
        {"keys": [{"purpose": purpose, "kid": kid} for purpose, kid in keys]},
        "\n".join(f"{purpose:<9} {kid}" for purpose, kid in keys),
    )
