"""The composition root: the only place that wires the server's parts together.

``async with Server(config) as srv`` (or ``await srv.start()`` / ``await
srv.stop()``) opens, in order: the datastore, the key stores, the three signing-key
managers (a first key each on a fresh datastore), the auditor, the issuer, the change
events, the plugin catalog and the :class:`ServerContext`; then it serves the Agent
API (grpcio over TLS), the admin API (grpclib on its Unix socket), the optional HTTP
and federation listeners, and runs the background maintenance (key rotation and
pruning, join-token pruning, TLS renewal).  ``stop()`` closes everything in reverse
order; a failure half way through ``start()`` closes what was opened and raises one
:class:`ServerStartError` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from custos._files import UnreadableFileError, read_small_file
from custos._proto import agent_v1_pb2
from custos.errors import CustosError
from custos.identity import TrustDomain
from custos.keys import KeyStore, open_key_store
from custos.keys.config import KeyStoreConfig
from custos.plugin.catalog import PluginConfig, ServerCatalog
from custos.server.admin import serve_admin
from custos.server.agent_api import attestation, bundles, entries, svids
from custos.server.audit import Auditor
from custos.server.config import CaConfig, ServerConfig
from custos.server.context import ServerContext, server_id
from custos.server.datastore import Datastore, DatastoreUnavailableError
from custos.server.entitlement import Entitlement
from custos.server.events import ChangeEvents
from custos.server.federation import MAX_PEM_BYTES, federation_listener
from custos.server.health import OVERALL, AgentApiHealth
from custos.server.http import HttpListener, Response
from custos.server.issuer import Issuer
from custos.server.metrics import CallMetricsInterceptor, ServerMetrics
from custos.server.signing_keys import SigningKeys
from custos.server.tls import ServerCertificate, ServerTls, make_server_certificate
from custos.x509.ca import CertificateAuthority
from custos.x509.errors import X509CaError

log = logging.getLogger(__name__)

#: The Agent API's services, each a module with ``register(server, ctx)``.
AGENT_API_PARTS = (attestation, svids, entries, bundles)
#: The Agent API's services by full name, as the health service reports them.
AGENT_API_SERVICES = tuple(
    service.full_name for service in agent_v1_pb2.DESCRIPTOR.services_by_name.values()
)
#: How often the maintenance task runs (key rotation follows SPIRE's schedule
#: thresholds, so a minute's resolution is plenty).
MAINTENANCE_INTERVAL_SECONDS = 60.0
#: How long ``stop()`` lets in-flight Agent API calls finish.
STOP_GRACE_SECONDS = 2.0
#: HTTP/2 streams one Agent API connection may have open at once (grpc's default is
#: unbounded): an agent needs two push streams plus its calls in flight (decision 0056).
MAX_CONCURRENT_STREAMS = 100


class ServerStartError(CustosError):
    """The server could not start (a port in use, a key store that does not open...)."""

    code = "server_start"


class Server:
    """One custos server process's parts, started and stopped in order."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._ctx: ServerContext | None = None
        self._grpc: grpc.aio.Server | None = None
        self._tls: ServerTls | None = None
        self._health = AgentApiHealth()
        self._listeners: list[HttpListener] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._agent_api_port: int | None = None
        self._kids: frozenset[str] = frozenset()
        self._started = False

    # -- public surface --------------------------------------------------------

    @property
    def ctx(self) -> ServerContext:
        if self._ctx is None:
            raise ServerStartError("the server is not started")
        return self._ctx

    @property
    def agent_api_address(self) -> str:
        """``host:port`` the Agent API listens on."""
        port = self._agent_api_port or self.config.agent_api.port
        host = self.config.agent_api.host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def admin_socket(self) -> str:
        return str(self.config.admin.socket)

    @property
    def http_address(self) -> str | None:
        return self._listener_address("http")

    @property
    def federation_address(self) -> str | None:
        return self._listener_address("federation")

    @property
    def listeners(self) -> tuple[HttpListener, ...]:
        """The HTTP and federation listeners that are serving."""
        return tuple(self._listeners)

    @property
    def health(self) -> AgentApiHealth:
        return self._health

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            raise ServerStartError("the server is already started")
        self._started = True
        try:
            await self._start()
        except BaseException as e:
            await self.stop()
            if isinstance(e, CustosError) and not isinstance(e, ServerStartError):
                raise ServerStartError(f"{e.message} [{e.code}]") from e
            if isinstance(e, OSError):
                raise ServerStartError(f"cannot start: {e.strerror or e}") from e
            raise
        for service in AGENT_API_SERVICES:
            self._health.set(service, True)
        self._health.set_all(True)
        log.info(
            "custos server for %s ready: Agent API %s, admin socket %s",
            self.config.trust_domain,
            self.agent_api_address,
            self.admin_socket,
        )

    async def stop(self) -> None:
        """Close everything that was opened, newest first.  Idempotent."""
        self._health.set_all(False)
        while self._closers:
            close = self._closers.pop()
            try:
                await close()
            except Exception:
                log.exception("error while stopping the server")
        self._ctx = None
        self._grpc = None
        self._tls = None
        self._listeners.clear()
        self._agent_api_port = None
        self._started = False

    # -- start-up ----------------------------------------------------------------

    async def _start(self) -> None:
        config = self.config
        td = config.trust_domain
        datastore = await asyncio.to_thread(Datastore.open, config.datastore.url, trust_domain=td)
        self._on_stop_sync(datastore.close)
        # Before serving: every server of this database refuses this name in entries and
        # workload certificates from now on (decision 0055).
        await asyncio.to_thread(datastore.server_names.record, config.agent_api.dns_name)

        stores = _KeyStores()
        self._on_stop_sync(stores.close)
        upstream = load_upstream_ca(config.ca, td)
        ca_keys, jwt_keys, wit_keys = (
            SigningKeys(
                datastore,
                stores.open(section.key_store),
                purpose,
                key_name=section.key_name,
                ca_ttl=config.ca.ttl,
                upstream=upstream if purpose == "x509-ca" else None,
            )
            for purpose, section in (
                ("x509-ca", config.ca),
                ("jwt-svid", config.jwt_svid),
                ("wit", config.wit),
            )
        )
        for keys in (ca_keys, jwt_keys, wit_keys):
            # One scheduled step now (a first key on a fresh datastore; a rotation or
            # prune that fell due while the server was down), not a minute later.
            await asyncio.to_thread(keys.rotate)
        await asyncio.to_thread(_replace_expired_ca, ca_keys)

        metrics = ServerMetrics()
        auditor = Auditor(datastore)
        own_id = server_id(td)
        issuer = Issuer(
            config=config,
            datastore=datastore,
            ca_keys=ca_keys,
            jwt_keys=jwt_keys,
            wit_keys=wit_keys,
            auditor=auditor,
            metrics=metrics,
            entitlement=Entitlement(datastore, own_id),
        )
        events = ChangeEvents(
            datastore,
            config.datastore.url,
            poll_interval=config.events.poll_interval.total_seconds(),
        )
        await events.start()
        self._closers.append(events.stop)

        catalog = ServerCatalog.load(
            td,
            node_attestors=[
                PluginConfig(name, {**settings, "datastore": datastore})
                for name, settings in config.node_attestor_settings().items()
            ],
        )
        self._on_stop_sync(catalog.close)

        ctx = ServerContext(
            config=config,
            datastore=datastore,
            ca_keys=ca_keys,
            jwt_keys=jwt_keys,
            wit_keys=wit_keys,
            catalog=catalog,
            metrics=metrics,
            auditor=auditor,
            issuer=issuer,
            events=events,
        )
        self._ctx = ctx
        self._kids = await asyncio.to_thread(_kids, ctx)

        await self._serve_agent_api(ctx)
        await self._serve_admin(ctx)
        await self._serve_http(ctx)
        self._spawn(self._maintenance(ctx), "maintenance")

    async def _serve_agent_api(self, ctx: ServerContext) -> None:
        config = ctx.config
        first = await asyncio.to_thread(self._new_certificate, ctx)
        self._tls = ServerTls(first)
        limit = config.agent_api.max_message_bytes
        server = grpc.aio.server(
            interceptors=[CallMetricsInterceptor(ctx.metrics)],
            options=[
                ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # one server per port: a second process on the same address is an
                # error, not a silent share of the traffic
                ("grpc.so_reuseport", 0),
            ],
        )
        self._health.register(server)
        for part in AGENT_API_PARTS:
            part.register(server, ctx)
        try:
            port = server.add_secure_port(config.agent_api.address, self._tls.credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            raise ServerStartError(
                f"agent_api.address: cannot listen on {config.agent_api.address} "
                "(in use, or not an address of this machine)"
            )
        self._agent_api_port = port

        async def close() -> None:
            await server.stop(STOP_GRACE_SECONDS)

        self._closers.append(close)
        await server.start()
        self._grpc = server

    async def _serve_admin(self, ctx: ServerContext) -> None:
        server = await serve_admin(ctx)
        self._closers.append(server.close)

    async def _serve_http(self, ctx: ServerContext) -> None:
        config = ctx.config
        if config.http.address is not None:
            await self._listen(_operations_listener(config.http.address, ctx, self._health))
        if config.federation.address is not None:
            await self._listen(federation_listener(config.federation, ctx.bundle))

    async def _listen(self, listener: HttpListener) -> None:
        try:
            await listener.start()
        except OSError as e:
            raise ServerStartError(
                f"{listener.name}.address: cannot listen on {listener.host}:{listener.port} "
                f"({e.strerror or e})"
            ) from None
        self._listeners.append(listener)
        self._closers.append(listener.close)

    # -- background work -----------------------------------------------------------

    def _spawn(self, coroutine: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        task.set_name(f"custos-server-{name}")

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

        self._closers.append(cancel)

    async def _maintenance(self, ctx: ServerContext) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_SECONDS)
            await self.maintain_once(ctx)

    async def maintain_once(self, ctx: ServerContext | None = None) -> None:
        """One round of maintenance: rotate/prune signing keys (telling agents when
        the bundle changed), prune expired join tokens, renew the TLS certificate."""
        ctx = ctx or self.ctx
        try:
            for keys in (ctx.ca_keys, ctx.jwt_keys, ctx.wit_keys):
                await asyncio.to_thread(keys.rotate)
            await asyncio.to_thread(_replace_expired_ca, ctx.ca_keys)
            # Compared with the last round, not with before this round's rotation: a
            # key another server (or `rotate-keys`) added counts too.
            kids = await asyncio.to_thread(_kids, ctx)
            if kids != self._kids:
                self._kids = kids
                ctx.events.bundle_changed()
            await asyncio.to_thread(ctx.datastore.join_tokens.prune)
            await self.renew_tls(ctx)
            self._health.set_all(True)
        except DatastoreUnavailableError as e:
            ctx.metrics.datastore_errors.labels(operation="maintenance").inc()
            self._health.set_all(False)
            log.warning("maintenance skipped: %s", e.message)
        except CustosError as e:
            log.error("maintenance failed: %s [%s]", e.message, e.code)
        except Exception:
            # The loop must survive anything: a dead maintenance task would stop key
            # rotation silently.
            log.exception("maintenance failed")

    async def renew_tls(self, ctx: ServerContext | None = None, *, force: bool = False) -> None:
        """A new Agent API certificate when the current one is half way through its
        life, when the signing CA key changed, or when *force*."""
        ctx = ctx or self.ctx
        if self._tls is None:
            return
        current = self._tls.current
        ca = await asyncio.to_thread(lambda: ctx.ca_keys.current().ca())
        due = datetime.now(UTC) >= current.renew_at()
        if force or due or ca.certificate.fingerprint(hashes.SHA256()) != current.ca_fingerprint:
            self._tls.update(await asyncio.to_thread(self._new_certificate, ctx))

    def _new_certificate(self, ctx: ServerContext) -> ServerCertificate:
        ca = ctx.ca_keys.current().ca()
        return make_server_certificate(ca, ctx.server_id, ctx.config.agent_api.dns_name)

    # -- helpers -------------------------------------------------------------------

    def _on_stop_sync(self, close: Callable[[], object]) -> None:
        async def run() -> None:
            await asyncio.to_thread(close)

        self._closers.append(run)

    def _listener_address(self, name: str) -> str | None:
        for listener in self._listeners:
            if listener.name == name:
                return listener.address
        return None


def _replace_expired_ca(ca_keys: SigningKeys) -> None:
    """A CA whose certificate expired (the servers were all down longer than its
    lifetime) cannot sign anything: replace it at once.  Nothing valid chains to it,
    so skipping the propagation delay breaks no relying party (SPIRE does the same)."""
    current = ca_keys.current()
    expires = current.certificate().not_valid_after_utc
    if datetime.now(UTC) < expires:
        return
    log.warning(
        "the active CA certificate (key %s) expired at %s; replacing it now",
        current.kid,
        expires.isoformat(),
    )
    ca_keys.rotate_now()


def load_upstream_ca(config: CaConfig, trust_domain: TrustDomain) -> CertificateAuthority | None:
    """The upstream root CA the server's intermediates are signed by (``ca.upstream_cert``
    and ``ca.upstream_key``, PEM), or None for a self-signed root.  Like SPIRE's
    ``disk`` UpstreamAuthority: the server reads the upstream key to sign its own
    intermediate at each CA key rotation."""
    if config.upstream_cert is None or config.upstream_key is None:
        return None
    try:
        chain = x509.load_pem_x509_certificates(
            read_small_file(config.upstream_cert, max_bytes=MAX_PEM_BYTES, what="upstream_cert")
        )
    except UnreadableFileError as e:
        raise ServerStartError(f"ca.upstream_cert: {e.message}") from None
    except ValueError:
        raise ServerStartError("ca.upstream_cert: not a PEM certificate chain") from None
    try:
        key = serialization.load_pem_private_key(
            read_small_file(config.upstream_key, max_bytes=MAX_PEM_BYTES, what="upstream_key"),
            password=None,
        )
    except UnreadableFileError as e:
        raise ServerStartError(f"ca.upstream_key: {e.message}") from None
    except (ValueError, TypeError):
        raise ServerStartError("ca.upstream_key: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ServerStartError("ca.upstream_key: the upstream key must be ECDSA or RSA")
    try:
        return CertificateAuthority(key, chain, trust_domain)
    except X509CaError as e:
        raise ServerStartError(f"ca.upstream_cert: {e.message}") from None


class _KeyStores:
    """One store per distinct key-store configuration (three purposes often share
    one token or directory; a PKCS#11 token wants one logged-in session)."""

    def __init__(self) -> None:
        self._open: list[tuple[KeyStoreConfig, KeyStore]] = []

    def open(self, config: KeyStoreConfig) -> KeyStore:
        for known, store in self._open:
            if known == config:
                return store
        store = open_key_store(config)
        self._open.append((config, store))
        return store

    def close(self) -> None:
        for _, store in reversed(self._open):
            close = getattr(store, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        self._open.clear()


def _kids(ctx: ServerContext) -> frozenset[str]:
    return frozenset(
        k.kid for keys in (ctx.ca_keys, ctx.jwt_keys, ctx.wit_keys) for k in keys.keys()
    )


def _operations_listener(address: str, ctx: ServerContext, health: AgentApiHealth) -> HttpListener:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics() -> Response:
        return Response(200, generate_latest(ctx.metrics.registry), CONTENT_TYPE_LATEST)

    async def healthz() -> Response:
        from custos.server.health import SERVING

        if health.status(OVERALL) == SERVING:
            return Response(200, b"ok\n")
        return Response(503, b"not serving\n")

    return HttpListener(address, {"/metrics": metrics, "/healthz": healthz}, name="http")


__all__ = ["AGENT_API_PARTS", "Server", "ServerStartError"]
