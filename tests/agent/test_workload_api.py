"""The agent's Workload API socket, served for real (grpclib on a tmp Unix socket,
in a thread of its own) from :class:`custos.agent.identities.WorkloadIdentities`
holding real credentials (a CA, WITs, JWT-SVIDs minted here with keys in a
memory / exportable key store) and attested through a real
:class:`custos.plugin.catalog.AgentCatalog` whose workload attestor is a tiny
third-party plugin installed for the test (selectors ``wapitest:uid:<uid>``,
read from the kernel's credentials; it can be held at a gate to let a caller
die mid-attestation).

The rig (``wapi`` fixture) is shared with test_pyspiffe_compat.py.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from grpclib.client import Channel, StreamUnaryMethod, UnaryStreamMethod, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from custos._proto import wimse_v1_pb2 as wpb
from custos._proto import workload_pb2 as pb
from custos._proto.wimse_v1_grpc import WimseSigningStub
from custos.agent.client.attest import der_chain
from custos.agent.client.calls import IssuedJwt
from custos.agent.identities import WorkloadIdentities, WorkloadIdentity
from custos.agent.workload_api import (
    WorkloadApiConfigError,
    WorkloadApiLimits,
    WorkloadApiServer,
    WorkloadSocketError,
    process_exited,
    serve_workload_api,
)
from custos.bundle import JwtAuthority, TrustBundle
from custos.identity import Selector, SpiffeId, TrustDomain
from custos.jwtsvid import mint_jwt_svid
from custos.keys import ExportableKeyStore, MemoryKeyStore
from custos.keys.base import KeyStore
from custos.plugin.catalog import AgentCatalog, PluginConfig
from custos.wimse.wit import mint_wit, token_hash
from custos.x509.ca import CertificateAuthority

T = TypeVar("T")
TD = TrustDomain.parse("example.org")
SPIFFE_MD = {"workload.spiffe.io": "true"}
ME = f"wapitest:uid:{os.getuid()}"

_ATTESTOR = textwrap.dedent(
    """
    import asyncio

    #: set by a test: attestation waits until it is set (ENTERED tells the test it waits)
    GATE = None
    ENTERED = None
    SEEN = []
    FAIL = False

    class CallerAttestor:
        def configure(self, config, core):
            pass

        async def attest(self, peer):
            SEEN.append(peer.pid)
            if FAIL:
                raise RuntimeError("the attestor broke: /secret/detail")
            if GATE is not None:
                ENTERED.set()
                await GATE.wait()
            return [f"uid:{peer.uid}"]

        def close(self):
            pass
    """
)


# -- the issuing side, in the test ---------------------------------------------------


@dataclass
class Authority:
    """What the server would hold: the CA, the WIT and JWT-SVID keys, the bundle."""

    ca: CertificateAuthority
    keys: MemoryKeyStore
    bundle: TrustBundle

    @classmethod
    def create(cls) -> Authority:
        keys = MemoryKeyStore()
        ca = CertificateAuthority.self_signed(
            ec.generate_private_key(ec.SECP256R1()), TD, ttl=timedelta(days=1)
        )
        keys.create("wit-ca")
        keys.create("jwt-ca")
        wit, jwt = keys.get("wit-ca"), keys.get("jwt-ca")
        bundle = TrustBundle(
            TD,
            x509_authorities=(ca.root,),
            jwt_authorities=(
                JwtAuthority("wit-1", wit.public_key(), use="wit-svid"),
                JwtAuthority("jwt-1", jwt.public_key(), use="jwt-svid"),
            ),
        )
        return cls(ca, keys, bundle)

    def identity(
        self,
        store: KeyStore,
        entry_id: str,
        spiffe_id: str,
        custody: str,
        selectors: Sequence[str],
        hint: str = "",
    ) -> WorkloadIdentity:
        name = f"wl-{entry_id}-1"
        store.create(name)
        key = store.get(name)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key.private_key(), hashes.SHA256())
        )
        sid = SpiffeId.parse(spiffe_id)
        svid = self.ca.sign_x509_svid(csr.public_bytes(Encoding.DER), sid, timedelta(hours=1))
        wit = mint_wit(self.keys.get("wit-ca"), kid="wit-1", subject=sid,
                       workload_public_jwk=key, ttl=timedelta(hours=1))
        return WorkloadIdentity(
            entry_id=entry_id,
            spiffe_id=sid,
            hint=hint,
            custody=custody,
            selectors=tuple(Selector.parse(s) for s in selectors),
            x509_svid=svid.cert_chain,
            wit=wit,
            key=key,
            not_after=svid.expires_at.timestamp(),
        )


@dataclass
class _LocalIssuer:
    """The Agent API's NewJWTSVID, answered here by the test's authority."""

    authority: Authority
    ids: dict[str, SpiffeId] = field(default_factory=dict)
    calls: int = 0

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> IssuedJwt:
        self.calls += 1
        token = mint_jwt_svid(self.authority.keys.get("jwt-ca"), kid="jwt-1",
                              spiffe_id=self.ids[entry_id], audience=list(audience),
                              ttl=timedelta(minutes=5))
        payload = json.loads(_b64(token.split(".")[1]))
        return IssuedJwt(token, float(payload["exp"]))


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class _Node:
    """The agent's own identity as WorkloadIdentities sees it (bundle + client)."""

    def __init__(self, authority: Authority) -> None:
        self.bundle = authority.bundle
        self.client = _LocalIssuer(authority)
        self.generation = 0
        self.refused: list[Exception] = []

    async def wait_changed(self, seen: int) -> int:
        await asyncio.Event().wait()
        return seen

    def report_refused(self, error: Exception) -> None:
        self.refused.append(error)


# -- the rig ----------------------------------------------------------------------------


class Rig:
    """A Workload API server running in its own thread and event loop."""

    def __init__(self, tmp: Path, limits: WorkloadApiLimits,
                 attestors: Sequence[PluginConfig] = (PluginConfig("wapitest", {}),),
                 **serve: Any) -> None:
        self.socket = tmp / "run" / "agent.sock"
        self.authority = Authority.create()
        self.memory = MemoryKeyStore()
        self.exportable = ExportableKeyStore()
        self.node = _Node(self.authority)
        self.attestor = importlib.import_module("acme_wapi")
        self.catalog = AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("join_token", {"token": "t0k3n"})],
            workload_attestors=list(attestors),
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.identities: WorkloadIdentities = self.run(self._make_source)
        self.server: WorkloadApiServer = self.run(
            lambda: serve_workload_api(self.socket, identities=self.identities,
                                       catalog=self.catalog, limits=limits, **serve)
        )

    async def _make_source(self) -> WorkloadIdentities:
        return WorkloadIdentities(self.node)

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def go() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(go(), self._loop).result(timeout=30)

    def soon(self, fn: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def publish(self, *identities: WorkloadIdentity) -> None:
        for i in identities:
            self.node.client.ids[i.entry_id] = i.spiffe_id

        async def go() -> None:
            self.identities.publish(identities)

        self.run(go)

    def serve(self, entry_id: str, spiffe_id: str, custody: str = "exportable",
              selectors: Sequence[str] = (ME,), hint: str = "") -> WorkloadIdentity:
        store = self.exportable if custody == "exportable" else self.memory
        return self.authority.identity(store, entry_id, spiffe_id, custody, selectors, hint)

    def gate(self) -> tuple[asyncio.Event, asyncio.Event]:
        async def go() -> tuple[asyncio.Event, asyncio.Event]:
            self.attestor.GATE, self.attestor.ENTERED = asyncio.Event(), asyncio.Event()
            return self.attestor.GATE, self.attestor.ENTERED

        return self.run(go)

    def close(self) -> None:
        self.run(self.server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self.catalog.close()


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    info = site / "acme_wapi-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-wapi\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[custos.workload_attestors]\nwapitest = acme_wapi:CallerAttestor\n"
    )
    (site / "acme_wapi.py").write_text(_ATTESTOR)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    sys.modules.pop("acme_wapi", None)


@contextmanager
def make_rig(tmp_path: Path, limits: WorkloadApiLimits | None = None,
             attestors: Sequence[PluginConfig] = (PluginConfig("wapitest", {}),),
             **serve: Any) -> Iterator[Rig]:
    rig = Rig(tmp_path, limits or WorkloadApiLimits(), attestors, **serve)
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def wapi(plugin_site: Path, tmp_path: Path) -> Iterator[Rig]:
    with make_rig(tmp_path) as rig:
        yield rig


# -- clients ------------------------------------------------------------------------------


def unary(rig: Rig, path: str, request: Any, reply: type, metadata: Any = SPIFFE_MD) -> Any:
    async def go() -> Any:
        channel = Channel(path=str(rig.socket))
        try:
            method = UnaryUnaryMethod(channel, path, type(request), reply)
            return await method(request, metadata=metadata, timeout=10)
        finally:
            channel.close()

    return asyncio.run(go())


def first(rig: Rig, path: str, request: Any, reply: type, metadata: Any = SPIFFE_MD) -> Any:
    """The first message of a server stream."""

    async def go() -> Any:
        channel = Channel(path=str(rig.socket))
        try:
            method = UnaryStreamMethod(channel, path, type(request), reply)
            async with method.open(metadata=metadata, timeout=10) as stream:
                await stream.send_message(request, end=True)
                message = await stream.recv_message()
                await stream.cancel()  # the server stream never ends by itself
                return message
        finally:
            channel.close()

    return asyncio.run(go())


def signing(rig: Rig, call: Callable[[WimseSigningStub], Awaitable[T]]) -> T:
    async def go() -> T:
        channel = Channel(path=str(rig.socket))
        try:
            return await call(WimseSigningStub(channel))
        finally:
            channel.close()

    return asyncio.run(go())


def status_of(fn: Callable[[], object]) -> tuple[Status, str | None]:
    with pytest.raises(GRPCError) as e:
        fn()
    return e.value.status, e.value.message


X509 = "/SpiffeWorkloadAPI/FetchX509SVID"
WIT = "/SpiffeWorkloadAPI/FetchWITSVID"
JWT = "/SpiffeWorkloadAPI/FetchJWTSVID"


# -- the gate: who may ask ---------------------------------------------------------------


def test_a_spiffe_call_without_the_security_header_is_refused(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a"))
    for path, request, reply in (
        (X509, pb.X509SVIDRequest(), pb.X509SVIDResponse),
        ("/SpiffeWorkloadAPI/FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse),
    ):
        status, message = status_of(
            lambda p=path, q=request, r=reply: first(wapi, p, q, r, metadata=None)  # type: ignore[misc]
        )
        assert status is Status.INVALID_ARGUMENT
        assert message == "security header missing from request"
    status, _ = status_of(lambda: unary(wapi, JWT, pb.JWTSVIDRequest(audience=["x"]),
                                        pb.JWTSVIDResponse,
                                        metadata={"workload.spiffe.io": "false"}))
    assert status is Status.INVALID_ARGUMENT
    assert wapi.attestor.SEEN == []  # refused before anything looked at the caller


def test_a_caller_with_no_entry_gets_permission_denied(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/other", selectors=["wapitest:uid:4242"]))
    for fn in (
        lambda: first(wapi, X509, pb.X509SVIDRequest(), pb.X509SVIDResponse),
        lambda: unary(wapi, JWT, pb.JWTSVIDRequest(audience=["x"]), pb.JWTSVIDResponse),
        lambda: first(wapi, WIT, pb.WITSVIDRequest(), pb.WITSVIDResponse),
        lambda: signing(wapi, lambda s: s.SignWPT(wpb.SignWPTRequest(audience="https://b/"))),
        lambda: signing(wapi, lambda s: s.FetchWIT(wpb.FetchWITRequest())),
    ):
        assert status_of(fn) == (Status.PERMISSION_DENIED, "no identity issued")


def test_device_held_identities_are_failed_precondition_naming_the_custos_call(
    wapi: Rig,
) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    status, message = status_of(lambda: first(wapi, X509, pb.X509SVIDRequest(),
                                              pb.X509SVIDResponse))
    assert status is Status.FAILED_PRECONDITION
    assert message is not None and "custos.wimse.v1.WimseSigning/FetchX509Chain" in message
    status, message = status_of(lambda: first(wapi, WIT, pb.WITSVIDRequest(),
                                              pb.WITSVIDResponse))
    assert status is Status.FAILED_PRECONDITION
    assert message is not None and "custos.wimse.v1.WimseSigning/FetchWIT" in message
    # ... and no key material of the device-held identity is served anywhere.
    chain = signing(wapi, lambda s: s.FetchX509Chain(wpb.FetchX509ChainRequest()))
    assert chain.spiffe_id == "spiffe://example.org/a" and chain.x509_svid


def test_only_exportable_identities_are_served_with_their_keys(wapi: Rig) -> None:
    wapi.publish(
        wapi.serve("e1", "spiffe://example.org/device", custody="memory"),
        wapi.serve("e2", "spiffe://example.org/exp", hint="external"),
    )
    reply = first(wapi, X509, pb.X509SVIDRequest(), pb.X509SVIDResponse)
    assert [s.spiffe_id for s in reply.svids] == ["spiffe://example.org/exp"]
    assert reply.svids[0].hint == "external" and reply.svids[0].x509_svid_key
    wit = first(wapi, WIT, pb.WITSVIDRequest(), pb.WITSVIDResponse)
    assert [s.spiffe_id for s in wit.svids] == ["spiffe://example.org/exp"]
    assert json.loads(wit.svids[0].wit_svid_key)["d"]


def test_a_caller_that_dies_during_attestation_is_denied(wapi: Rig, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # The caller connects and asks; while it is being attested it forks (the
    # grandchild keeps the connection open, as a process that hands its socket
    # on would) and exits. The kernel's pid for the connection is now a dead
    # process whose PID could be reused: the call must be refused.
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a"))
    gate, entered = wapi.gate()
    client = tmp_path / "client.py"
    client.write_text(textwrap.dedent(f"""
        import asyncio, os, sys, time
        from grpclib.client import Channel, UnaryUnaryMethod
        from custos._proto import workload_pb2 as pb

        async def main():
            channel = Channel(path={str(wapi.socket)!r})
            method = UnaryUnaryMethod(channel, {JWT!r}, pb.JWTSVIDRequest, pb.JWTSVIDResponse)
            call = asyncio.ensure_future(
                method(pb.JWTSVIDRequest(audience=["x"]), metadata={SPIFFE_MD!r}))
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            if call.done():
                print("served" if not call.exception() else "refused", flush=True)
            keeper = os.fork()
            if keeper == 0:
                time.sleep(60)
                os._exit(0)
            print(keeper, flush=True)
            os._exit(0)

        asyncio.run(main())
    """))
    child = subprocess.Popen([sys.executable, str(client)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    keeper = 0
    try:
        assert child.stdin is not None and child.stdout is not None
        assert asyncio.run_coroutine_threadsafe(entered.wait(), wapi._loop).result(30) is True
        child.stdin.write("\n")
        child.stdin.flush()
        keeper = int(child.stdout.readline())
        child.wait(timeout=30)
        caplog.set_level("WARNING", logger="custos.agent.workload_api")
        before = wapi.node.client.calls
        wapi.soon(gate.set)
        for _ in range(500):
            if any("exited" in r.getMessage() for r in caplog.records):
                break
            wapi.run(lambda: asyncio.sleep(0.01))
    finally:
        if keeper:
            os.kill(keeper, signal.SIGKILL)
        child.kill()
        child.wait()
    refusals = [r.getMessage() for r in caplog.records if "exited" in r.getMessage()]
    assert refusals == [
        f"workload API: /SpiffeWorkloadAPI/FetchJWTSVID refused: pid {child.pid} exited "
        "during attestation"
    ]
    assert wapi.node.client.calls == before  # nothing was issued for it


def test_the_alive_check_sees_a_zombie_as_exited() -> None:
    # The race window itself: a caller that exited (not yet reaped, so its PID
    # cannot be reused yet, but also not alive) must count as gone;
    # pidfd_send_signal(fd, 0) would still succeed for it.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    pidfd = os.pidfd_open(child.pid)
    try:
        assert not process_exited(pidfd)
        assert child.stdin is not None
        child.stdin.close()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, still a zombie
        assert process_exited(pidfd)
        signal.pidfd_send_signal(pidfd, 0)  # what a liveness check by signal would accept
    finally:
        child.wait()
        os.close(pidfd)


# -- the custos signing API -----------------------------------------------------------------


def test_a_workload_cannot_get_a_wpt_signed_for_another_workloads_identity(wapi: Rig) -> None:
    mine = wapi.serve("e1", "spiffe://example.org/mine", custody="memory")
    theirs = wapi.serve("e2", "spiffe://example.org/theirs", custody="memory",
                        selectors=["wapitest:uid:4242"])
    wapi.publish(mine, theirs)
    for fn in (
        lambda s: s.SignWPT(wpb.SignWPTRequest(spiffe_id=str(theirs.spiffe_id),
                                               audience="https://b.example/")),
        lambda s: s.FetchWIT(wpb.FetchWITRequest(spiffe_id=str(theirs.spiffe_id))),
        lambda s: s.SignHttpRequest(wpb.SignHttpRequestRequest(
            spiffe_id=str(theirs.spiffe_id), audience="https://b.example/",
            request=wpb.HttpRequest(method="GET", target="/"))),
        lambda s: s.FetchX509Chain(wpb.FetchX509ChainRequest(spiffe_id=str(theirs.spiffe_id))),
    ):
        assert status_of(lambda f=fn: signing(wapi, f)) == (  # type: ignore[misc]
            Status.PERMISSION_DENIED, "no identity issued")
    status, _ = status_of(lambda: unary(
        wapi, JWT, pb.JWTSVIDRequest(audience=["x"], spiffe_id=str(theirs.spiffe_id)),
        pb.JWTSVIDResponse))
    assert status is Status.PERMISSION_DENIED
    # Its own identity it gets, and the WPT is bound to the WIT returned with it.
    reply = signing(wapi, lambda s: s.SignWPT(wpb.SignWPTRequest(audience="https://b.example/")))
    assert reply.spiffe_id == str(mine.spiffe_id) and reply.wit == mine.wit
    claims = json.loads(_b64(reply.wpt.split(".")[1]))
    assert claims["aud"] == "https://b.example/"
    assert claims["wth"] == token_hash(mine.wit)


def test_bad_input_to_a_signing_call_is_invalid_argument_with_the_code(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/mine", custody="memory"))
    status, message = status_of(lambda: signing(
        wapi, lambda s: s.SignWPT(wpb.SignWPTRequest(audience="https://b/", ttl_seconds=100000))))
    assert status is Status.INVALID_ARGUMENT and message is not None
    status, _ = status_of(lambda: signing(
        wapi, lambda s: s.SignWPT(wpb.SignWPTRequest(spiffe_id="not an id", audience="x"))))
    assert status is Status.INVALID_ARGUMENT


# -- limits ----------------------------------------------------------------------------------


@pytest.fixture
def tight(plugin_site: Path, tmp_path: Path) -> Iterator[Rig]:
    limits = WorkloadApiLimits(
        requests_per_second=0.001, burst=3, max_message_bytes=2048, max_streams_per_uid=1
    )
    with make_rig(tmp_path, limits) as rig:
        yield rig


def test_the_rate_limit_trips_per_uid(tight: Rig) -> None:
    tight.publish(tight.serve("e1", "spiffe://example.org/a", custody="memory"))
    for _ in range(3):
        signing(tight, lambda s: s.Ping(wpb.PingRequest()))
    status, message = status_of(lambda: signing(tight, lambda s: s.Ping(wpb.PingRequest())))
    assert (status, message) == (Status.RESOURCE_EXHAUSTED, "rate limit exceeded")


def test_an_oversized_message_is_refused_and_the_server_keeps_serving(plugin_site: Path,
                                                                      tmp_path: Path) -> None:
    with make_rig(tmp_path, WorkloadApiLimits(max_message_bytes=2048)) as rig:
        rig.publish(rig.serve("e1", "spiffe://example.org/a", custody="memory"))
        big = wpb.SignWPTRequest(audience="https://b/", other_tokens={"x-big": "a" * 4096})
        status, message = status_of(lambda: signing(rig, lambda s: s.SignWPT(big)))
        assert (status, message) == (Status.RESOURCE_EXHAUSTED, "request message too large")
        signing(rig, lambda s: s.Ping(wpb.PingRequest()))


def test_streams_per_uid_are_bounded(tight: Rig) -> None:
    tight.publish(tight.serve("e1", "spiffe://example.org/a"))

    async def two_streams() -> Status:
        channel = Channel(path=str(tight.socket))
        try:
            method = UnaryStreamMethod(channel, X509, pb.X509SVIDRequest, pb.X509SVIDResponse)
            async with method.open(metadata=SPIFFE_MD, timeout=10) as one:
                await one.send_message(pb.X509SVIDRequest(), end=True)
                assert (await one.recv_message()) is not None
                with pytest.raises(GRPCError) as e:
                    async with method.open(metadata=SPIFFE_MD, timeout=10) as two:
                        await two.send_message(pb.X509SVIDRequest(), end=True)
                        await two.recv_message()
                await one.cancel()
                return e.value.status
        finally:
            channel.close()

    assert asyncio.run(two_streams()) is Status.RESOURCE_EXHAUSTED


def test_limits_refuse_nonsense() -> None:
    for bad in (
        {"requests_per_second": float("nan")},
        {"burst": 0},
        {"burst": True},
        {"max_message_bytes": 10},
        {"attestation_cache_seconds": -1},
        {"max_connections_per_uid": 0},
        {"max_connections_per_uid": True},
        {"max_connections_per_uid": 2.5},
        {"max_connections_per_uid": 65_537},
    ):
        with pytest.raises(WorkloadApiConfigError):
            WorkloadApiLimits(**bad)  # type: ignore[arg-type]
    with pytest.raises(WorkloadApiConfigError, match="unknown key 'rate'"):
        WorkloadApiLimits.from_mapping({"rate": 5})


# -- the socket file --------------------------------------------------------------------------


def test_the_socket_is_0666_in_a_0755_directory_and_removed_on_close(plugin_site: Path,
                                                                     tmp_path: Path) -> None:
    with make_rig(tmp_path) as rig:
        assert rig.socket.stat().st_mode & 0o777 == 0o666
        assert rig.socket.parent.stat().st_mode & 0o777 == 0o755
        # A second agent on the same socket is refused: the first is alive.
        with pytest.raises(WorkloadSocketError, match="in use"):
            rig.run(lambda: serve_workload_api(rig.socket, identities=rig.identities,
                                               catalog=rig.catalog,
                                               limits=WorkloadApiLimits()))
    assert not (tmp_path / "run" / "agent.sock").exists()


def test_a_file_in_the_way_is_not_replaced(plugin_site: Path, tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    path.write_text("not a socket")

    async def go() -> None:
        await serve_workload_api(path, identities=WorkloadIdentities(_Node(Authority.create())),
                                 catalog=AgentCatalog.load(TD, node_attestors=[
                                     PluginConfig("join_token", {"token": "t"})],
                                     workload_attestors=[PluginConfig("wapitest", {})]))

    with pytest.raises(WorkloadSocketError, match="not a socket"):
        asyncio.run(go())
    assert path.read_text() == "not a socket"


# -- served credentials ---------------------------------------------------------------------


def test_openssl_verifies_the_served_chain_and_the_uri_san_is_the_entry(wapi: Rig,
                                                                       tmp_path: Path) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/web"))
    reply = first(wapi, X509, pb.X509SVIDRequest(), pb.X509SVIDResponse)
    svid = reply.svids[0]
    chain = der_chain(svid.x509_svid)
    roots = der_chain(svid.bundle)
    leaf = tmp_path / "leaf.pem"
    ca = tmp_path / "ca.pem"
    leaf.write_bytes(chain[0].public_bytes(Encoding.PEM))
    ca.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in roots))
    out = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(leaf)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/web"]
    # The chain served without a key by the custos call is the same one.
    same = signing(wapi, lambda s: s.FetchX509Chain(wpb.FetchX509ChainRequest()))
    assert same.x509_svid == svid.x509_svid and same.bundle == svid.bundle


def test_the_x509_stream_sends_the_full_set_again_on_a_change(wapi: Rig) -> None:
    a = wapi.serve("e1", "spiffe://example.org/a")
    wapi.publish(a)

    async def two_updates() -> list[list[str]]:
        channel = Channel(path=str(wapi.socket))
        try:
            method = UnaryStreamMethod(channel, X509, pb.X509SVIDRequest, pb.X509SVIDResponse)
            async with method.open(metadata=SPIFFE_MD, timeout=10) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                got = [[s.spiffe_id for s in (await stream.recv_message()).svids]]
                await asyncio.to_thread(wapi.publish, a, wapi.serve("e2", "spiffe://example.org/b"))
                got.append([s.spiffe_id for s in (await stream.recv_message()).svids])
                await stream.cancel()
                return got
        finally:
            channel.close()

    assert asyncio.run(two_updates()) == [
        ["spiffe://example.org/a"], ["spiffe://example.org/a", "spiffe://example.org/b"]
    ]


def test_wit_bundles_and_jwt_bundles_are_jwks_per_trust_domain(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    wit = first(wapi, "/SpiffeWorkloadAPI/FetchWITBundles", pb.WITBundlesRequest(),
                pb.WITBundlesResponse)
    keys = json.loads(wit.bundles["spiffe://example.org"])["keys"]
    assert [(k["kid"], k["use"]) for k in keys] == [("wit-1", "wit-svid")]
    jwt = first(wapi, "/SpiffeWorkloadAPI/FetchJWTBundles", pb.JWTBundlesRequest(),
                pb.JWTBundlesResponse)
    keys = json.loads(jwt.bundles["spiffe://example.org"])["keys"]
    assert [(k["kid"], k["use"]) for k in keys] == [("jwt-1", "jwt-svid")]


# -- hostile requests: a clear status, never INTERNAL ----------------------------------------


def test_a_malformed_request_message_is_invalid_argument(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    # Field 2 of JWTSVIDRequest is a string: invalid UTF-8 there does not parse.
    garbage = pb.X509SVID(x509_svid=b"\xff\xfe")
    status, message = status_of(lambda: unary(wapi, JWT, garbage, pb.JWTSVIDResponse))
    assert (status, message) == (Status.INVALID_ARGUMENT, "malformed request message")


def test_a_call_without_a_request_message_is_invalid_argument(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))

    async def no_message() -> None:
        channel = Channel(path=str(wapi.socket))
        try:
            # A client-streaming method object: grpclib lets it end without a message.
            method = StreamUnaryMethod(channel, "/custos.wimse.v1.WimseSigning/SignWPT",
                                       wpb.SignWPTRequest, wpb.SignWPTResponse)
            async with method.open(timeout=10) as stream:
                await stream.send_request(end=True)
                await stream.recv_message()
        finally:
            channel.close()

    status, message = status_of(lambda: asyncio.run(no_message()))
    assert (status, message) == (Status.INVALID_ARGUMENT, "request message missing")


@pytest.mark.parametrize("audience", [[], [""], ["a"] * 17, ["a" * 257]])
def test_jwt_svid_audiences_are_checked_before_the_server_is_asked(
    wapi: Rig, audience: list[str]
) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    status, _ = status_of(lambda: unary(wapi, JWT, pb.JWTSVIDRequest(audience=audience),
                                        pb.JWTSVIDResponse))
    assert status is Status.INVALID_ARGUMENT
    assert wapi.node.client.calls == 0


@pytest.mark.parametrize("request_", [
    wpb.HttpRequest(method="", target="/"),
    wpb.HttpRequest(method="GET", target=""),
    wpb.HttpRequest(method="GET", target="/", headers=[wpb.HttpField(name="X", value="a\r\nb")]),
])
def test_a_bad_http_request_to_sign_is_invalid_argument(wapi: Rig,
                                                        request_: wpb.HttpRequest) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    status, _ = status_of(lambda: signing(wapi, lambda s: s.SignHttpRequest(
        wpb.SignHttpRequestRequest(request=request_, audience="https://b.example/"))))
    assert status is Status.INVALID_ARGUMENT


def test_a_bad_status_to_sign_is_invalid_argument(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    status, _ = status_of(lambda: signing(wapi, lambda s: s.SignHttpResponse(
        wpb.SignHttpResponseRequest(status=7, request=wpb.HttpRequest(method="GET",
                                                                      target="/")))))
    assert status is Status.INVALID_ARGUMENT


def test_attestation_is_reused_on_a_connection_and_redone_on_a_new_one(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))

    async def on_one_channel(calls: int) -> None:
        channel = Channel(path=str(wapi.socket))
        try:
            stub = WimseSigningStub(channel)
            for _ in range(calls):
                await stub.FetchWIT(wpb.FetchWITRequest())
        finally:
            channel.close()

    asyncio.run(on_one_channel(3))
    assert len(wapi.attestor.SEEN) == 1
    asyncio.run(on_one_channel(1))
    assert len(wapi.attestor.SEEN) == 2


def test_a_closed_connection_releases_its_callers_pidfd(wapi: Rig) -> None:
    # Without the release a pidfd per connection lingered until the garbage
    # collector found the connection's reference cycles (~50 after 300 calls).
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))

    async def connections(n: int) -> None:
        for _ in range(n):
            channel = Channel(path=str(wapi.socket))
            await WimseSigningStub(channel).FetchWIT(wpb.FetchWITRequest())
            channel.close()

    asyncio.run(connections(5))
    wapi.run(lambda: asyncio.sleep(0.05))
    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(connections(100))
    wapi.run(lambda: asyncio.sleep(0.05))
    assert len(os.listdir("/proc/self/fd")) <= before + 5


def test_a_released_caller_counts_as_exited() -> None:
    from custos.agent.workload_api import Caller
    from custos.plugin.protocols import PeerCredentials

    pidfd = os.pidfd_open(os.getpid())
    caller = Caller(PeerCredentials(pid=os.getpid(), uid=0, gid=0, pidfd=pidfd))
    assert not caller.exited()
    caller.release()
    assert caller.exited()
    with pytest.raises(OSError):
        os.fstat(pidfd)  # closed (and a second release is a no-op)
    caller.release()


def test_a_failing_attestor_is_internal_without_its_detail(wapi: Rig,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    wapi.attestor.FAIL = True
    caplog.set_level("ERROR", logger="custos.agent.workload_api")
    status, message = status_of(lambda: signing(wapi, lambda s: s.FetchWIT(wpb.FetchWITRequest())))
    assert (status, message) == (Status.INTERNAL, "workload attestation failed")
    assert any("/secret/detail" in r.getMessage() for r in caplog.records)  # the log has it


def test_a_stream_ends_permission_denied_when_the_last_identity_goes(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a"))

    async def watch() -> Status:
        channel = Channel(path=str(wapi.socket))
        try:
            method = UnaryStreamMethod(channel, X509, pb.X509SVIDRequest, pb.X509SVIDResponse)
            # The status arrives in the trailers: grpclib raises it when the stream closes.
            with pytest.raises(GRPCError) as e:
                async with method.open(metadata=SPIFFE_MD, timeout=10) as stream:
                    await stream.send_message(pb.X509SVIDRequest(), end=True)
                    assert (await stream.recv_message()) is not None
                    await asyncio.to_thread(wapi.publish)
                    assert (await stream.recv_message()) is None
            return e.value.status
        finally:
            channel.close()

    assert asyncio.run(watch()) is Status.PERMISSION_DENIED


def test_a_rate_limited_uid_is_logged_once_per_episode(tight: Rig,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="custos.agent.workload_api")
    for _ in range(3):
        signing(tight, lambda s: s.Ping(wpb.PingRequest()))
    for _ in range(5):
        status_of(lambda: signing(tight, lambda s: s.Ping(wpb.PingRequest())))
    assert len([r for r in caplog.records if "rate limit" in r.getMessage()]) == 1


def test_connections_per_uid_are_bounded(plugin_site: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="custos.agent.workload_api")

    def probe(path: Path) -> bytes:
        """What the agent sends a new connection first: its HTTP/2 settings, or EOF."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(str(path))
            return raw.recv(64)

    with make_rig(tmp_path, max_connections_per_uid=3) as rig:
        rig.publish(rig.serve("e1", "spiffe://example.org/a", custody="memory"))

        async def go() -> tuple[list[bytes], bytes]:
            held = [Channel(path=str(rig.socket)) for _ in range(3)]
            try:
                for channel in held:
                    await WimseSigningStub(channel).Ping(wpb.PingRequest(), timeout=10)
                refused = [await asyncio.to_thread(probe, rig.socket) for _ in range(2)]
                held.pop().close()
                # Once the agent has seen that close, a new connection is accepted.
                for _ in range(100):
                    accepted = await asyncio.to_thread(probe, rig.socket)
                    if accepted:
                        return refused, accepted
                    await asyncio.sleep(0.05)
                return refused, b""
            finally:
                for channel in held:
                    channel.close()

        refused, accepted = asyncio.run(go())
        assert refused == [b"", b""] and accepted
    assert len([r for r in caplog.records if "connection from pid" in r.getMessage()]) == 1


def test_connections_per_uid_is_a_limit_and_the_argument_still_overrides_it(
    plugin_site: Path, tmp_path: Path,
) -> None:
    assert WorkloadApiLimits().max_connections_per_uid == 256
    assert WorkloadApiLimits.from_mapping(
        {"max_connections_per_uid": 2}).max_connections_per_uid == 2

    def refused_after(rig: Rig, held_count: int) -> bool:
        """Hold ``held_count`` connections; is one more closed at once?"""
        async def go() -> bool:
            held = [Channel(path=str(rig.socket)) for _ in range(held_count)]
            try:
                for channel in held:
                    await WimseSigningStub(channel).Ping(wpb.PingRequest(), timeout=10)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                    raw.settimeout(10)
                    await asyncio.to_thread(raw.connect, str(rig.socket))
                    return await asyncio.to_thread(raw.recv, 64) == b""
            finally:
                for channel in held:
                    channel.close()

        return asyncio.run(go())

    with make_rig(tmp_path / "a", WorkloadApiLimits(max_connections_per_uid=2)) as rig:
        assert refused_after(rig, 2)
    with make_rig(tmp_path / "b", WorkloadApiLimits(max_connections_per_uid=2),
                  max_connections_per_uid=4) as rig:
        assert not refused_after(rig, 2) and refused_after(rig, 4)
    path = tmp_path / "c.sock"
    with pytest.raises(WorkloadApiConfigError, match="max_connections_per_uid"):
        asyncio.run(serve_workload_api(  # type: ignore[arg-type]
            path, identities=None, catalog=None, max_connections_per_uid=0))
    assert not path.exists()


def test_a_hint_is_unique_among_the_svids_returned(wapi: Rig) -> None:
    # SPIFFE Workload API 5.2.1 / 6.2.1 / 7.2.1: servers MUST keep a non-empty hint
    # unique in one response; the first identity (by entry id) keeps it.
    wapi.publish(
        wapi.serve("e1", "spiffe://example.org/a", hint="internal"),
        wapi.serve("e2", "spiffe://example.org/b", hint="internal"),
        wapi.serve("e3", "spiffe://example.org/c"),
        wapi.serve("e4", "spiffe://example.org/d"),
    )
    reply = first(wapi, X509, pb.X509SVIDRequest(), pb.X509SVIDResponse)
    assert [(s.spiffe_id, s.hint) for s in reply.svids] == [
        ("spiffe://example.org/a", "internal"), ("spiffe://example.org/c", ""),
        ("spiffe://example.org/d", ""),
    ]
    jwt = unary(wapi, JWT, pb.JWTSVIDRequest(audience=["x"]), pb.JWTSVIDResponse)
    assert [s.spiffe_id for s in jwt.svids] == [
        "spiffe://example.org/a", "spiffe://example.org/c", "spiffe://example.org/d"
    ]


def test_hint_uniqueness_counts_only_what_the_response_carries(wapi: Rig) -> None:
    # The device-held identity is not in an X.509-SVID response, so its hint
    # does not take the exportable one's place.
    wapi.publish(
        wapi.serve("e1", "spiffe://example.org/dev", custody="memory", hint="internal"),
        wapi.serve("e2", "spiffe://example.org/exp", hint="internal"),
    )
    reply = first(wapi, X509, pb.X509SVIDRequest(), pb.X509SVIDResponse)
    assert [(s.spiffe_id, s.hint) for s in reply.svids] == [
        ("spiffe://example.org/exp", "internal")
    ]


def test_the_bundle_streams_send_a_new_bundle_when_it_changes(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", "spiffe://example.org/a", custody="memory"))
    added = Authority.create().ca.root

    async def watch() -> list[int]:
        channel = Channel(path=str(wapi.socket))
        try:
            method = UnaryStreamMethod(channel, "/SpiffeWorkloadAPI/FetchX509Bundles",
                                       pb.X509BundlesRequest, pb.X509BundlesResponse)
            async with method.open(metadata=SPIFFE_MD, timeout=10) as stream:
                await stream.send_message(pb.X509BundlesRequest(), end=True)
                sizes = [len(der_chain((await stream.recv_message()).bundles[
                    "spiffe://example.org"]))]

                async def rotate() -> None:
                    wapi.node.bundle = wapi.node.bundle.with_x509_authority(added)
                    wapi.identities.bump()

                await asyncio.to_thread(wapi.run, rotate)
                sizes.append(len(der_chain((await stream.recv_message()).bundles[
                    "spiffe://example.org"])))
                await stream.cancel()
                return sizes
        finally:
            channel.close()

    assert asyncio.run(watch()) == [1, 2]
