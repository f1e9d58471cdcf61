"""The agent's configuration: one TOML file, validated into a frozen :class:`AgentConfig`.

As with the server's (:mod:`custos.server.config`, decision 0030), every mistake is
one :class:`AgentConfigError` whose message is one line naming the key by its
dotted path (``server.address: ...``), and input values are never quoted: a join
token or a ``pkcs11_uri`` PIN must not reach a terminal or a log.

Layout (``docs/configuration.md``, "Agent", has every key)::

    trust_domain = "example.org"
    socket = "/run/custos/agent.sock"
    data_dir = "/var/lib/custos/agent"

    [server]
    address = "custos.example.org:8081"
    bundle_file = "/etc/custos/bundle.pem"     # or: insecure_bootstrap = true

    [node_attestor.join_token]
    token_file = "/etc/custos/join-token"      # or token = "...", or CUSTOS_JOIN_TOKEN

    [workload_attestors.unix]
    discover_workload_path = true

    [custody.tpm]
    tcti = "device:/dev/tpmrm0"
    [custody.memory]

Decision 0047 has the reasons for the choices the issue leaves open.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from custos._files import UnreadableFileError, read_small_text

# Shared with the server's loader so both files read and fail alike (decision 0047).
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
from custos.identity.errors import InvalidIdentifierError
from custos.identity.selector import check_selector_type
from custos.keys.config import KeyStoreConfig, StoreKind
from custos.plugin.catalog import PluginConfig

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/custos/agent.sock")
DEFAULT_DATA_DIR = Path("/var/lib/custos/agent")
DEFAULT_SERVER_NAME = "custos-server"
#: Where the join token comes from when the file gives neither ``token`` nor ``token_file``.
JOIN_TOKEN_ENV = "CUSTOS_JOIN_TOKEN"  # noqa: S105 -- a variable name, not a secret
#: A join token file holds one short secret.
MAX_TOKEN_FILE_BYTES = 4096
#: Custody tiers, in the order the agent key's default prefers them (contract, issue 9).
CUSTODY_TIERS: tuple[StoreKind, ...] = ("tpm", "pkcs11", "memory", "exportable")
#: Logged (WARNING) whenever a configuration with ``insecure_bootstrap = true`` is loaded.
INSECURE_BOOTSTRAP_WARNING = (
    "INSECURE BOOTSTRAP: server.insecure_bootstrap = true -- the agent trusts whatever "
    "certificate the server at {address} presents on first contact (trust on first use). "
    "Anyone who can intercept that connection can impersonate the server. Use "
    "server.bundle_file outside development."
)


class AgentConfigError(CustosError):
    """The agent configuration file is missing, unreadable or invalid."""

    code = "agent_config"


class _Section(BaseModel):
    # Input values are never quoted in errors: a token or a URI may carry a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def _absolute_path(value: Path | None) -> Path | None:
    return None if value is None else absolute_path(value)


class ServerConnectionConfig(_Section):
    """How the agent reaches and trusts its server's Agent API."""

    address: str
    #: The DNS name in the server's certificate (its ``agent_api.dns_name``).
    server_name: str = DEFAULT_SERVER_NAME
    #: The trust bundle (PEM X.509 roots, or SPIFFE bundle JSON) the server is verified with.
    bundle_file: ConfigPath | None = None
    #: Development only: trust the server's certificate on first use, logged loudly.
    insecure_bootstrap: Annotated[bool, Field(strict=True)] = False

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str) -> str:
        return check_dns_name(value)

    @field_validator("bundle_file")
    @classmethod
    def _bundle_absolute(cls, value: Path | None) -> Path | None:
        return _absolute_path(value)

    @model_validator(mode="after")
    def _one_trust_source(self) -> ServerConnectionConfig:
        if (self.bundle_file is None) == (not self.insecure_bootstrap):
            raise PydanticCustomError(
                "server_trust",
                "give exactly one of bundle_file (the server's trust bundle) and "
                "insecure_bootstrap = true (development only)",
            )
        return self


class JoinTokenSettings(_Section):
    """``[node_attestor.join_token]``: the token inline, from a file, or from the
    environment (``CUSTOS_JOIN_TOKEN``), in that order; the file gives at most one."""

    token: str = Field(repr=False, min_length=1, max_length=256)
    token_file: ConfigPath | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "token" in data and "token_file" in data:
            raise PydanticCustomError("join_token", "give token or token_file, not both")
        if "token_file" in data:
            source = data["token_file"]
            if not isinstance(source, str) or "\0" in source or not source.startswith("/"):
                raise PydanticCustomError("token_file", "token_file must be an absolute path")
            try:
                text = read_small_text(source, max_bytes=MAX_TOKEN_FILE_BYTES, what="token_file")
            except UnreadableFileError as e:
                raise PydanticCustomError("token_file", e.message) from None
            return {**data, "token": text.strip()}
        if "token" not in data:
            from_env = os.environ.get(JOIN_TOKEN_ENV, "").strip()
            if not from_env:
                raise PydanticCustomError(
                    "join_token",
                    f"a join token is needed: token, token_file, or {JOIN_TOKEN_ENV} "
                    "in the environment",
                )
            return {**data, "token": from_env}
        return data


def _plugin_name(name: str, what: str) -> None:
    try:
        check_selector_type(name)
    except InvalidIdentifierError:
        raise PydanticCustomError(
            "plugins",
            "a plugin name is lower-case letters, digits, '_' and '-' ({what}.<name>)",
            {"what": what},
        ) from None


def _plugin_tables(value: object, what: str) -> dict[str, dict[str, object]]:
    """``[<what>.<name>]`` tables: plugin name -> its settings (checked by the plugin)."""
    if not isinstance(value, dict):
        raise PydanticCustomError("plugins", "must be a table of [{what}.<name>] tables",
                                  {"what": what})  # fmt: skip
    out: dict[str, dict[str, object]] = {}
    for name, settings in value.items():
        _plugin_name(name, what)
        if not isinstance(settings, dict):
            raise PydanticCustomError(
                "plugins", "{what}.{name} must be a table of settings", {"what": what, "name": name}
            )
        out[name] = dict(settings)
    return out


class NodeAttestorTables(BaseModel):
    """``[node_attestor.<name>]``: exactly one table.  ``join_token`` is checked here
    (its token is resolved); other plugins' settings are theirs to check."""

    model_config = ConfigDict(extra="allow", frozen=True, hide_input_in_errors=True)
    # Typed extras: every other [node_attestor.<name>] must be a table.
    __pydantic_extra__: dict[str, dict[str, object]] = Field(init=False, repr=False)

    join_token: JoinTokenSettings | None = Field(default=None, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                _plugin_name(name, "node_attestor")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> NodeAttestorTables:
        count = len(self.names)
        if count != 1:
            raise PydanticCustomError(
                "node_attestor",
                "exactly one [node_attestor.<name>] table is needed, found {count}",
                {"count": count},
            )
        return self

    @property
    def names(self) -> list[str]:
        extra = list(self.__pydantic_extra__ or {})
        return (["join_token"] if self.join_token is not None else []) + extra

    def plugin(self) -> PluginConfig:
        """The one node attestor, as the catalog loads it (secrets stay out of repr)."""
        if self.join_token is not None:
            return PluginConfig("join_token", {"token": self.join_token.token})
        name, settings = next(iter((self.__pydantic_extra__ or {}).items()))
        return PluginConfig(name, dict(settings))


def _tier_table(tier: StoreKind) -> BeforeValidator:
    def add_store(value: object) -> object:
        if not isinstance(value, dict):
            return value
        given = value.get("store", tier)
        if given != tier:
            raise PydanticCustomError(
                "custody_store",
                "store is the table's name ({tier}); leave it out",
                {"tier": tier},
            )
        return {**value, "store": tier}

    return BeforeValidator(add_store)


class CustodyConfig(_Section):
    """``[custody.<tier>]``: the key stores this node offers, one per custody tier.
    An entry whose tier is absent is refused by the agent (logged and counted)."""

    tpm: Annotated[KeyStoreConfig | None, _tier_table("tpm")] = None
    pkcs11: Annotated[KeyStoreConfig | None, _tier_table("pkcs11")] = None
    memory: Annotated[KeyStoreConfig | None, _tier_table("memory")] = None
    exportable: Annotated[KeyStoreConfig | None, _tier_table("exportable")] = None

    @field_validator("pkcs11")
    @classmethod
    def _pkcs11_token(cls, value: KeyStoreConfig | None) -> KeyStoreConfig | None:
        if value is not None and not value.pkcs11_uri:
            raise PydanticCustomError("pkcs11_uri", "the pkcs11 tier needs pkcs11_uri")
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> CustodyConfig:
        if not self.tiers:
            raise PydanticCustomError(
                "custody", "at least one [custody.<tier>] table is needed (tpm, pkcs11, memory, "
                "exportable)"
            )  # fmt: skip
        return self

    @property
    def tiers(self) -> tuple[StoreKind, ...]:
        """The configured tiers, in :data:`CUSTODY_TIERS` order."""
        return tuple(t for t in CUSTODY_TIERS if getattr(self, t) is not None)


def _default_custody() -> CustodyConfig:
    return CustodyConfig(memory=KeyStoreConfig(store="memory"))


class AgentKeyConfig(_Section):
    #: The tier of the agent's own key; by default tpm, else pkcs11, else memory.
    custody: StoreKind | None = None


# The bounds and defaults match custos.agent.workload_api.limits.WorkloadApiLimits
# (a test checks that they do).
class WorkloadApiConfig(_Section):
    """``[workload_api]``: per-uid limits of the workload socket."""

    requests_per_second: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = 200.0
    burst: Annotated[int, Field(ge=1, le=1_000_000, strict=True)] = 400
    max_streams_per_uid: Annotated[int, Field(ge=1, le=100_000, strict=True)] = 64
    max_message_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024, strict=True)] = (
        4 * 1024 * 1024
    )
    attestation_cache_seconds: Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)] = 1.0
    # Each connection holds two file descriptors (socket, pidfd): at most 65,536.
    max_connections_per_uid: Annotated[int, Field(ge=1, le=65_536, strict=True)] = 256

    @field_validator("requests_per_second", "attestation_cache_seconds", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise PydanticCustomError("number", "must be a number, not true or false")
        return value


class RotationConfig(_Section):
    #: Workload credentials are renewed at half their lifetime, moved by up to this
    #: fraction of it either way (0.1: between 40 % and 60 % of the lifetime).
    jitter: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.1

    @field_validator("jitter", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise PydanticCustomError("number", "must be a number, not true or false")
        return value


def _socket_path(value: Path) -> Path:
    absolute_path(value)
    if len(os.fsencode(value)) > MAX_SOCKET_PATH_BYTES:
        raise PydanticCustomError("socket_path", "a Unix socket path is at most 107 bytes long")
    return value


class AgentConfig(_Section):
    """The whole agent configuration (``agent.toml``)."""

    trust_domain: TrustDomainField
    server: ServerConnectionConfig
    node_attestor: NodeAttestorTables = Field(repr=False)
    workload_attestors: Annotated[
        dict[str, dict[str, object]],
        PlainValidator(lambda v: _plugin_tables(v, "workload_attestors")),
    ] = Field(default_factory=lambda: {"unix": dict[str, object]()})
    custody: CustodyConfig = Field(default_factory=_default_custody)
    agent_key: AgentKeyConfig = AgentKeyConfig()
    socket: ConfigPath = DEFAULT_SOCKET
    data_dir: ConfigPath = DEFAULT_DATA_DIR
    workload_api: WorkloadApiConfig = WorkloadApiConfig()
    rotation: RotationConfig = RotationConfig()

    @field_validator("socket")
    @classmethod
    def _socket(cls, value: Path) -> Path:
        return _socket_path(value)

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: Path) -> Path:
        return absolute_path(value)

    @field_validator("workload_attestors")
    @classmethod
    def _some_workload_attestor(cls, value: dict[str, dict[str, object]]) -> dict[str, Any]:
        if not value:
            raise PydanticCustomError(
                "workload_attestors", "at least one [workload_attestors.<name>] table is needed"
            )
        return value

    @model_validator(mode="after")
    def _agent_key_tier(self) -> AgentConfig:
        tier = self.agent_key.custody
        if tier is not None and tier not in self.custody.tiers:
            raise PydanticCustomError(
                "agent_key",
                "agent_key.custody names the {tier} tier, but there is no [custody.{tier}] table",
                {"tier": tier},
            )
        return self

    @property
    def agent_key_custody(self) -> StoreKind:
        """The tier of the agent's own key: as configured, else tpm, else pkcs11, else
        memory (issue 9 contract)."""
        if self.agent_key.custody is not None:
            return self.agent_key.custody
        tiers = self.custody.tiers
        return next((t for t in ("tpm", "pkcs11") if t in tiers), "memory")

    def key_store(self, tier: StoreKind) -> KeyStoreConfig:
        """The key store of one custody tier.  TPM key blobs and exportable PEMs go to
        ``<data_dir>/keys/<tier>`` unless the table sets ``key_dir``.  The memory tier is
        always available for the agent key (it needs no settings)."""
        config: KeyStoreConfig | None = (
            getattr(self.custody, tier, None) if tier in CUSTODY_TIERS else None
        )
        if config is None:
            if tier == "memory":
                return KeyStoreConfig(store="memory")
            raise AgentConfigError(f"custody.{tier}: this node has no {tier} tier")
        if "key_dir" in config.model_fields_set:
            return config
        moved: KeyStoreConfig = config.model_copy(
            update={"key_dir": self.data_dir / "keys" / tier}
        )
        return moved

    def key_stores(self) -> dict[StoreKind, KeyStoreConfig]:
        """Every configured tier's key store (see :meth:`key_store`)."""
        return {tier: self.key_store(tier) for tier in self.custody.tiers}

    def node_attestor_plugin(self) -> PluginConfig:
        return self.node_attestor.plugin()

    def workload_attestor_plugins(self) -> list[PluginConfig]:
        return [PluginConfig(name, dict(s)) for name, s in self.workload_attestors.items()]


def agent_config_from_toml(text: str, *, source: str = "<string>") -> AgentConfig:
    """Parse and validate an ``agent.toml`` document; one-line :class:`AgentConfigError`.

    ``CUSTOS_JOIN_TOKEN`` is read here when the join_token table names no token.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message gives line and column, never the offending text.
        raise AgentConfigError(f"{source}: TOML syntax error: {e}") from None
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as e:
        raise AgentConfigError(f"{source}: {one_line(e)}") from None
    if config.server.insecure_bootstrap:
        log.warning(INSECURE_BOOTSTRAP_WARNING.format(address=config.server.address))
    return config


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate the agent configuration file at *path* (a bounded regular file)."""
    try:
        text = read_small_text(path, max_bytes=MAX_CONFIG_BYTES, what="agent config")
    except UnreadableFileError as e:
        raise AgentConfigError(e.message) from None
    return agent_config_from_toml(text, source=os.fspath(path))


__all__ = [
    "CUSTODY_TIERS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_SERVER_NAME",
    "DEFAULT_SOCKET",
    "INSECURE_BOOTSTRAP_WARNING",
    "JOIN_TOKEN_ENV",
    "AgentConfig",
    "AgentConfigError",
    "AgentKeyConfig",
    "CustodyConfig",
    "JoinTokenSettings",
    "NodeAttestorTables",
    "RotationConfig",
    "ServerConnectionConfig",
    "WorkloadApiConfig",
    "agent_config_from_toml",
    "load_agent_config",
]
