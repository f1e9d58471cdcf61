"""A custos server for tests and demos (no pytest import).

- :class:`ServerRig` writes a ``server.toml`` like ``custos server init`` does, but
  with free loopback ports, a short private directory (the admin socket path must fit
  in 107 bytes) and the datastore URL you give (SQLite in the directory by default).
- ``async with running_server(config) as srv`` runs :class:`custos.server.app.Server`
  in the current event loop.
- :class:`ServerProcess` runs ``custos server run --config FILE`` as a subprocess and
  waits until its admin socket answers the gRPC health check; ``kill()`` (SIGKILL),
  ``terminate()`` (SIGTERM), ``restart()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from custos.errors import CustosError
from custos.server.config import ServerConfig, load_server_config

if TYPE_CHECKING:  # the rig imports the server (grpc) only when it runs one
    from grpclib.client import Channel

    from custos.agent.client.attest import AgentIdentity
    from custos.agent.client.calls import AgentApiClient
    from custos.bundle import TrustBundle
    from custos.keys import StoreKey
    from custos.server.app import Server

TRUST_DOMAIN = "example.org"
#: What ``custos server run`` prints on stdout once everything listens.
READY_LINE = "custos server ready"
_READY_TIMEOUT = 60.0


class ServerRigError(CustosError):
    """The test server could not be configured, started or reached."""

    code = "server_rig_error"


def new_csr() -> bytes:
    """A DER CSR for a fresh P-256 key (what a workload's key would sign)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=True)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ServerRigError(f"cannot write {type(value).__name__} into a rig config")


@dataclass
class ServerRig:
    """One server's directory and configuration file.

    ``sections`` adds or overrides tables and keys, e.g.
    ``{"agent_api": {"max_message_bytes": 65536}, "node_attestors.acme": {}}``;
    ``with_http=True`` turns the ``/metrics`` listener on at a free port.  Several
    servers on one datastore: give them the same ``datastore_url`` and a shared
    ``key_store`` (a SoftHSM token); a shared exportable ``key_dir`` works only for
    servers started one after another (that store reads its directory when it opens).
    """

    base: Path
    trust_domain: str = TRUST_DOMAIN
    datastore_url: str | None = None
    with_http: bool = False
    sections: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    #: Where the three signing keys live (exportable tier); servers that share a
    #: datastore must share it, as they share an HSM in production.
    key_dir: Path | None = None
    #: A whole key-store table for the three keys instead (e.g. a shared SoftHSM
    #: token: ``{"store": "pkcs11", "pkcs11_uri": ..., "pkcs11_module": ...}``).
    key_store: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.agent_api_port = free_port()
        self.http_port = free_port() if self.with_http else None
        self.config_path = self.base / "server.toml"
        self.config_path.write_text(self.render(), encoding="utf-8")

    @classmethod
    def create(cls, **kwargs: object) -> ServerRig:
        """A rig in a fresh short directory under the system temp dir (caller cleans
        up with :meth:`destroy`)."""
        base = Path(tempfile.mkdtemp(prefix="custos-srv-"))
        return cls(base, **kwargs)  # type: ignore[arg-type]

    @property
    def admin_socket(self) -> Path:
        return self.base / "admin.sock"

    @property
    def agent_api_address(self) -> str:
        return f"127.0.0.1:{self.agent_api_port}"

    @property
    def url(self) -> str:
        return self.datastore_url or f"sqlite:///{self.base / 'datastore.sqlite3'}"

    def render(self) -> str:
        keys = self.key_dir or self.base / "keys"
        tables: dict[str, dict[str, object]] = {
            "datastore": {"url": self.url},
            "agent_api": {"address": self.agent_api_address},
            "admin": {"socket": str(self.admin_socket)},
            "ca": {"key_name": "custos-ca", "ttl": "24h"},
            "ca.key_store": {"store": "exportable", "key_dir": str(keys)},
            "jwt_svid": {"key_name": "custos-jwt-svid"},
            "jwt_svid.key_store": {"store": "exportable", "key_dir": str(keys)},
            "wit": {"key_name": "custos-wit"},
            "wit.key_store": {"store": "exportable", "key_dir": str(keys)},
        }
        if self.key_store is not None:
            for purpose in ("ca", "jwt_svid", "wit"):
                tables[f"{purpose}.key_store"] = dict(self.key_store)
        if self.http_port is not None:
            tables["http"] = {"address": f"127.0.0.1:{self.http_port}"}
        for name, values in self.sections.items():
            tables.setdefault(name, {}).update(values)
        lines = [f"trust_domain = {_toml(self.trust_domain)}", ""]
        for name, values in tables.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)

    def config(self) -> ServerConfig:
        return load_server_config(self.config_path)

    def destroy(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.asynccontextmanager
async def running_server(config: ServerConfig | ServerRig) -> AsyncIterator[Server]:
    """Run a server in this event loop for the ``async with`` block."""
    from custos.server.app import Server

    if isinstance(config, ServerRig):
        config = config.config()
    async with Server(config) as srv:
        yield srv


class ServerProcess:
    """``custos server run --config FILE`` in a subprocess (stderr to ``server.log``)."""

    def __init__(
        self,
        rig: ServerRig,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.rig = rig
        self.args = tuple(args)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = rig.base / "server.log"
        self._log_start = 0

    def start(self, *, wait: bool = True) -> ServerProcess:
        if self.process is not None and self.process.poll() is None:
            raise ServerRigError("the server process is already running")
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "custos",
                    "server",
                    "run",
                    "--config",
                    str(self.rig.config_path),
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        """Until the admin socket answers SERVING (the process logs why it did not)."""
        from custos.server.health import admin_health  # grpc only when a server runs

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerRigError(
                    f"custos server run exited with {self.process.returncode}: {self.log_tail()}"
                )
            # The ready line first: a socket left by a killed predecessor may exist.
            if self._said_ready() and asyncio.run(admin_health(self.rig.admin_socket)):
                return
            time.sleep(0.1)
        raise ServerRigError(f"custos server did not become ready: {self.log_tail()}")

    def _said_ready(self) -> bool:
        try:
            return READY_LINE.encode() in self.log_path.read_bytes()[self._log_start :]
        except OSError:
            return False

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerRigError("the server process is not started")
        return self.process.pid

    def kill(self) -> int:
        """SIGKILL (no clean-up at all, as a crash or an OOM kill); returns the status."""
        return self._signal(signal.SIGKILL)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the clean stop; returns the exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def restart(self) -> ServerProcess:
        self.terminate()
        return self.start()

    def _signal(self, sig: signal.Signals, timeout: float = 30.0) -> int:
        if self.process is None:
            raise ServerRigError("the server process is not started")
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise ServerRigError(f"the server did not stop after {sig.name}") from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ServerRigError):
                self.terminate()


@dataclass
class RigAgent:
    """An agent attested with a join token through the real client library: its
    identity, its key (a memory-store key), its channel and its Agent API client."""

    identity: AgentIdentity
    key: StoreKey
    channel: Channel
    client: AgentApiClient
    address: str
    bundle: TrustBundle
    server_name: str

    async def close(self) -> None:
        self.channel.close()

    def reconnect(self, address: str | None = None) -> AgentApiClient:
        """A client on a new channel (to *address*, e.g. another server), same identity."""
        from custos.agent.client.calls import AgentApiClient
        from custos.agent.client.channel import open_channel

        channel = open_channel(
            address or self.address, bundle=self.bundle, server_name=self.server_name
        )
        return AgentApiClient(channel, self.identity, self.key)

    async def __aenter__(self) -> RigAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def join_token_agent(
    address: str,
    bundle: TrustBundle,
    secret: str,
    *,
    server_name: str = "custos-server",
    trust_domain: str = TRUST_DOMAIN,
) -> RigAgent:
    """Attest a new agent (fresh P-256 key in a memory store) with the join token
    *secret* at the Agent API on *address*, trusting *bundle*."""
    from custos.agent.client.attest import attest_agent
    from custos.agent.client.calls import AgentApiClient
    from custos.agent.client.channel import open_channel
    from custos.keys import KeyStoreConfig, open_key_store
    from custos.plugin import AgentCatalog, PluginConfig

    store = open_key_store(KeyStoreConfig(store="memory"))
    store.create("agent", "ES256")
    key = store.get("agent")
    channel = open_channel(address, bundle=bundle, server_name=server_name)
    try:
        with AgentCatalog.load(
            trust_domain,
            node_attestors=[PluginConfig("join_token", {"token": secret})],
            workload_attestors=[PluginConfig("example")],
        ) as catalog:
            identity = await attest_agent(
                channel, attestor=catalog.node_attestor, key=key, custody="memory"
            )
    except BaseException:
        channel.close()
        raise
    return RigAgent(
        identity=identity,
        key=key,
        channel=channel,
        client=AgentApiClient(channel, identity, key),
        address=address,
        bundle=bundle,
        server_name=server_name,
    )


async def server_agent(srv: Server) -> RigAgent:
    """A join-token agent of the in-loop server *srv* (token made in its datastore)."""
    _, secret = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
    return await join_token_agent(
        srv.agent_api_address,
        await asyncio.to_thread(srv.ctx.bundle),
        secret,
        server_name=srv.config.agent_api.dns_name,
        trust_domain=srv.config.trust_domain.name,
    )


__all__ = [
    "TRUST_DOMAIN",
    "RigAgent",
    "ServerProcess",
    "ServerRig",
    "ServerRigError",
    "free_port",
    "join_token_agent",
    "new_csr",
    "running_server",
    "server_agent",
]
