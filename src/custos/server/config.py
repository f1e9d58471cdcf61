"""The server's configuration: one TOML file, validated into a frozen :class:`ServerConfig`.

Every mistake in the file (an unknown key, a wrong type, a bad value, a TOML syntax
error, a missing or unreadable file) is one :class:`ServerConfigError` whose message is
one line naming the key by its dotted path (``ca.ttl: ...``).  Input values are never
quoted: a ``pkcs11_uri`` may carry a PIN and a PostgreSQL URL a password.

Keys live in key stores (``pkcs11``, ``tpm``, or the ``exportable`` file tier for
development), never in the datastore; the ``memory`` store is refused because a CA key
that dies with the process would orphan every credential it signed (decision 0030).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from custos._files import UnreadableFileError, read_small_text
from custos._numbers import InvalidNumberError, seconds
from custos.config_fields import (
    MAX_CONFIG_BYTES,
    MAX_SOCKET_PATH_BYTES,
    ConfigPath,
    TrustDomainField,
    absolute_path,
    check_dns_name,
    one_line,
    parse_address,
)
from custos.errors import CustosError
from custos.keys.base import check_key_name
from custos.keys.config import KeyStoreConfig
from custos.keys.errors import InvalidKeyNameError

DEFAULT_DATA_DIR = Path("/var/lib/custos/server")
DEFAULT_AGENT_API_ADDRESS = "127.0.0.1:8081"
DEFAULT_AGENT_API_DNS_NAME = "custos-server"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Below 64 KiB one attestation message would not fit; above 64 MiB is a typo.
MIN_MESSAGE_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_DAY = 86400.0
# A TTL above these is a typo (a missing unit, an extra zero), not a policy.
MAX_SVID_TTL = 366 * _DAY
MAX_CA_TTL = 20 * 366 * _DAY

# Go's duration units as SPIRE's configs write them ("1h", "5m", "1h30m", "30s").
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:h|m|s))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}

_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"

#: A plugin's entry-point name as a [node_attestors.<name>] table names it.
_PLUGIN_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ServerConfigError(CustosError):
    """The server configuration file is missing, unreadable or invalid."""

    code = "server_config"


def parse_duration(value: object, *, name: str, maximum: float) -> timedelta:
    """A TTL from a config: ``"1h"``, ``"5m"``, ``"1h30m"``, ``"30s"`` or a number of
    seconds; finite, at least one second and at most *maximum* seconds."""
    if isinstance(value, str):
        text = value.strip()
        if not _DURATION_RE.fullmatch(text):
            raise InvalidNumberError(
                'must be a duration such as "1h", "5m", "1h30m" or "30s", or a number of seconds'
            )
        value = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
    if isinstance(value, timedelta):
        value = value.total_seconds()
    number = seconds(value, name=name, minimum=1.0, maximum=maximum)
    return timedelta(seconds=number)


def format_duration(value: timedelta) -> str:
    """The shortest of ``"1h"``, ``"5m"``, ``"30s"`` that says *value* exactly."""
    total = value.total_seconds()
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if total >= size and math.isclose(total % size, 0.0, abs_tol=1e-9):
            return f"{int(total // size)}{unit}"
    return f"{int(total)}s" if total == int(total) else f"{total}s"


def _ttl_check(maximum: float) -> Callable[[object], timedelta]:
    def check(value: object) -> timedelta:
        try:
            return parse_duration(value, name="the TTL in seconds", maximum=maximum)
        except InvalidNumberError as e:
            # As a pydantic error, so that it is reported (with its key) like any other.
            raise PydanticCustomError("duration", e.message) from None

    return check


_AS_TEXT = PlainSerializer(lambda value: format_duration(value), return_type=str)
SvidTtl = Annotated[timedelta, PlainValidator(_ttl_check(MAX_SVID_TTL)), _AS_TEXT]
CaTtl = Annotated[timedelta, PlainValidator(_ttl_check(MAX_CA_TTL)), _AS_TEXT]


class _Section(BaseModel):
    # Input values are never quoted in errors: a URI or URL may carry a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class SigningKeyConfig(_Section):
    """Where one of the server's signing keys lives: a name in a key store."""

    key_name: str
    key_store: KeyStoreConfig

    @field_validator("key_name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            return check_key_name(value)
        except InvalidKeyNameError as e:
            raise PydanticCustomError("key_name", e.message) from None

    @field_validator("key_store")
    @classmethod
    def _durable(cls, value: KeyStoreConfig) -> KeyStoreConfig:
        if value.store == "memory":
            raise PydanticCustomError(
                "memory_store",
                "the memory store loses its keys when the server stops; "
                "use pkcs11, tpm, or exportable (development)",
            )
        return value


class CaConfig(SigningKeyConfig):
    """The server's X.509 CA: self-signed root, or an intermediate under an upstream root."""

    ttl: CaTtl = timedelta(hours=24)
    upstream_cert: ConfigPath | None = None
    upstream_key: ConfigPath | None = None

    @field_validator("upstream_cert", "upstream_key")
    @classmethod
    def _upstream_absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else absolute_path(value)

    @model_validator(mode="after")
    def _upstream_pair(self) -> CaConfig:
        if (self.upstream_cert is None) != (self.upstream_key is None):
            raise PydanticCustomError(
                "upstream_pair",
                "upstream_cert and upstream_key go together (both for an intermediate CA, "
                "neither for a self-signed root)",
            )
        return self

    @property
    def self_signed(self) -> bool:
        return self.upstream_cert is None


class CredentialConfig(SigningKeyConfig):
    """A JWT-SVID or WIT signing key and the default lifetime of what it signs."""

    default_ttl: SvidTtl


class JwtSvidConfig(CredentialConfig):
    default_ttl: SvidTtl = timedelta(minutes=5)


class WitConfig(CredentialConfig):
    default_ttl: SvidTtl = timedelta(hours=1)


class X509SvidConfig(_Section):
    default_ttl: SvidTtl = timedelta(hours=1)


class DatastoreConfig(_Section):
    # repr=False: a PostgreSQL URL may carry a password, and configs get logged.
    url: str = Field(default=f"sqlite:///{DEFAULT_DATA_DIR}/datastore.sqlite3", repr=False)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_datastore_url(value)
        return value


def check_datastore_url(url: str) -> None:
    """``sqlite:///<absolute path>`` or ``postgresql[+driver]://...``; nothing else.

    Messages never quote the URL: it may carry a password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise PydanticCustomError("datastore_url", "must be a sqlite:/// or postgresql:// URL")
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else None
        if path is None or path in ("", ":memory:") or "?" in path:
            raise PydanticCustomError(
                "datastore_url",
                "a SQLite URL names a database file: sqlite:////absolute/path.sqlite3",
            )
        if not path.startswith("/"):
            raise PydanticCustomError(
                "datastore_url",
                "a SQLite path must be absolute (four slashes: sqlite:////var/lib/...)",
            )
        if "\0" in path:
            raise PydanticCustomError("datastore_url", "the path must not contain a NUL character")
        return
    if scheme == "postgresql" or scheme.startswith("postgresql+"):
        try:
            urlsplit(url).port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError:
            raise PydanticCustomError("datastore_url", "the PostgreSQL URL is malformed") from None
        return
    raise PydanticCustomError(
        "datastore_url", "only sqlite:/// and postgresql:// datastores are supported"
    )


def _optional_address(value: str | None) -> str | None:
    if value is not None:
        parse_address(value)
    return value


class AgentApiConfig(_Section):
    address: str = DEFAULT_AGENT_API_ADDRESS
    #: The DNS SAN of the server's TLS certificate: agents verify it (grpcio checks
    #: only DNS and IP SANs), and no workload certificate or entry may carry it.
    dns_name: str = DEFAULT_AGENT_API_DNS_NAME
    #: The largest gRPC message the Agent API receives or sends (a batch of CSRs).
    max_message_bytes: Annotated[
        int, Field(ge=MIN_MESSAGE_BYTES, le=MAX_MESSAGE_BYTES, strict=True)
    ] = DEFAULT_MAX_MESSAGE_BYTES

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("dns_name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        return check_dns_name(value)

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]


class AdminConfig(_Section):
    socket: ConfigPath = DEFAULT_DATA_DIR / "admin.sock"
    #: uids allowed on the admin socket besides root (0 is always allowed).
    allowed_uids: tuple[Annotated[int, Field(ge=0, le=_MAX_UID, strict=True)], ...] = ()

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: Path) -> Path:
        absolute_path(value)
        if len(os.fsencode(value)) > MAX_SOCKET_PATH_BYTES:
            raise PydanticCustomError("socket_path", "a Unix socket path is at most 107 bytes long")
        return value

    @property
    def uids(self) -> frozenset[int]:
        """Every uid the admin socket accepts: root and ``allowed_uids``."""
        return frozenset((0, *self.allowed_uids))


class JoinTokenConfig(_Section):
    #: Lifetime of a join token when ``custos token generate`` is given no ``--ttl``.
    default_ttl: SvidTtl = timedelta(minutes=10)


class HttpConfig(_Section):
    """The plain-HTTP operations listener: ``/metrics`` and ``/healthz``; off when
    ``address`` is not set."""

    address: str | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return _optional_address(value)


class FederationConfig(_Section):
    """The SPIFFE federation bundle endpoint (``https_web`` profile): the trust
    domain's bundle as SPIFFE bundle JSON over TLS, with a web-PKI certificate the
    operator gives.  Off when ``address`` is not set."""

    address: str | None = None
    cert_file: ConfigPath | None = None
    key_file: ConfigPath | None = None
    #: ``spiffe_refresh_hint`` of the served bundle.
    refresh_hint: SvidTtl = timedelta(minutes=5)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return _optional_address(value)

    @field_validator("cert_file", "key_file")
    @classmethod
    def _files_absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else absolute_path(value)

    @model_validator(mode="after")
    def _complete(self) -> FederationConfig:
        if self.address is not None and (self.cert_file is None or self.key_file is None):
            raise PydanticCustomError(
                "federation_tls",
                "the https_web federation endpoint needs cert_file and key_file "
                "(a web-PKI certificate chain and its key, PEM)",
            )
        return self


class EventsConfig(_Section):
    #: How often a server re-reads the entry change sequence even without a
    #: notification (a safety net for a lost PostgreSQL NOTIFY; SQLite's only source
    #: of other processes' writes).
    poll_interval: SvidTtl = timedelta(seconds=5)


def _plugin_settings(value: object) -> dict[str, dict[str, object]]:
    if not isinstance(value, dict):
        raise PydanticCustomError("node_attestors", "must be a table of [node_attestors.<name>]")
    out: dict[str, dict[str, object]] = {}
    for name, settings in value.items():
        if not isinstance(name, str) or not _PLUGIN_NAME_RE.fullmatch(name):
            # Never echoed: the name is the file's (it could hold anything, a newline).
            raise PydanticCustomError(
                "node_attestors",
                "a node attestor's name (its entry point) is 1-64 letters, digits, '_', '-' or '.'",
            )
        if not isinstance(settings, dict):
            raise PydanticCustomError(
                "node_attestors",
                "[node_attestors.{name}] must be a table of settings",
                {"name": name},
            )
        enabled = settings.get("enabled", True)
        if not isinstance(enabled, bool):
            raise PydanticCustomError(
                "node_attestors",
                "node_attestors.{name}.enabled must be true or false",
                {"name": name},
            )
        if "datastore" in settings:
            raise PydanticCustomError(
                "node_attestors",
                "node_attestors.{name}.datastore is given to the plugin by the server, "
                "not by the file",
                {"name": name},
            )
        out[str(name)] = dict(settings)
    return out


class ServerConfig(_Section):
    """The whole server configuration (``server.toml``)."""

    trust_domain: TrustDomainField
    ca: CaConfig
    jwt_svid: JwtSvidConfig
    wit: WitConfig
    x509_svid: X509SvidConfig = X509SvidConfig()
    datastore: DatastoreConfig = DatastoreConfig()
    agent_api: AgentApiConfig = AgentApiConfig()
    admin: AdminConfig = AdminConfig()
    join_token: JoinTokenConfig = JoinTokenConfig()
    http: HttpConfig = HttpConfig()
    federation: FederationConfig = FederationConfig()
    events: EventsConfig = EventsConfig()
    #: ``[node_attestors.<name>]``: settings per server node attestor (plugin name);
    #: ``enabled = false`` turns one off.  ``join_token`` is on unless turned off.
    node_attestors: Annotated[dict[str, dict[str, object]], PlainValidator(_plugin_settings)] = (
        Field(default_factory=dict, repr=False)
    )

    def node_attestor_settings(self) -> dict[str, dict[str, object]]:
        """The enabled node attestors and their settings (``enabled`` removed);
        ``join_token`` first unless the file turns it off."""
        tables = {"join_token": {}, **self.node_attestors}
        return {
            name: {k: v for k, v in settings.items() if k != "enabled"}
            for name, settings in tables.items()
            if settings.get("enabled", True)
        }

    @model_validator(mode="after")
    def _svid_fits_ca(self) -> ServerConfig:
        # An X.509-SVID cannot outlive the CA that signs it (SPIRE clamps; we say so).
        if self.x509_svid.default_ttl >= self.ca.ttl:
            raise PydanticCustomError(
                "ttl_order", "x509_svid.default_ttl must be shorter than ca.ttl"
            )
        return self


def server_config_from_toml(text: str, *, source: str = "<string>") -> ServerConfig:
    """Parse and validate a ``server.toml`` document; one-line :class:`ServerConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message gives line and column, never the offending text.
        raise ServerConfigError(f"{source}: TOML syntax error: {e}") from None
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ServerConfigError(f"{source}: {one_line(e)}") from None


def load_server_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read and validate the server configuration file at *path* (a bounded regular file)."""
    try:
        text = read_small_text(path, max_bytes=MAX_CONFIG_BYTES, what="server config")
    except UnreadableFileError as e:
        raise ServerConfigError(e.message) from None
    return server_config_from_toml(text, source=os.fspath(path))


__all__ = [
    "MAX_CA_TTL",
    "MAX_SVID_TTL",
    "AdminConfig",
    "AgentApiConfig",
    "CaConfig",
    "DatastoreConfig",
    "EventsConfig",
    "FederationConfig",
    "HttpConfig",
    "JoinTokenConfig",
    "JwtSvidConfig",
    "ServerConfig",
    "ServerConfigError",
    "SigningKeyConfig",
    "WitConfig",
    "X509SvidConfig",
    "check_datastore_url",
    "check_dns_name",
    "format_duration",
    "load_server_config",
    "parse_address",
    "parse_duration",
    "server_config_from_toml",
]
