"""The composition root: start, serve, stop, start again; the Agent API's TLS and
health; the operations listener."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from common.eventually import eventually
from common.grpcio_channel import grpcio_channel
from custos.agent.client.calls import X509Params
from custos.agent.client.streams import stream_bundle
from custos.bundle import TrustBundle
from custos.identity import TrustDomain
from custos.server.admin.client import AdminClient
from custos.server.app import Server, ServerStartError
from custos.server.config import ServerConfig
from custos.server.datastore import NotFoundError
from custos.server.health import HealthCheckRequest, HealthCheckResponse
from custos.testing.server import RigAgent, ServerRig, new_csr, running_server, server_agent

ConfigFactory = Callable[..., ServerConfig]
RigFactory = Callable[..., ServerRig]


def _roots(bundle: TrustBundle) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in bundle.x509_authorities)


async def agent_api_health(
    srv: Server, *, server_name: str | None = None, service: str = ""
) -> int:
    """The overall status over the Agent API's TLS, verified against the bundle."""
    creds = grpc.ssl_channel_credentials(root_certificates=_roots(srv.ctx.bundle()))
    name = server_name or srv.config.agent_api.dns_name
    async with grpc.aio.secure_channel(
        srv.agent_api_address, creds, options=[("grpc.ssl_target_name_override", name)]
    ) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        reply = await check(HealthCheckRequest(service=service), timeout=10)
        return int(reply.status)


def raw_channel(agent: RigAgent) -> grpc.aio.Channel:
    """A grpcio channel to ``agent``'s server, to send raw bytes (the agent's own
    client is grpclib's, decision 0126)."""
    return grpcio_channel(agent.address, bundle=agent.bundle, server_name=agent.server_name)


async def peer_certificate(address: str) -> x509.Certificate:
    import ssl

    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der)


def test_agent_api_serves_tls_with_the_server_svid_and_health(
    server_config_factory: ConfigFactory,
) -> None:
    config = server_config_factory()

    async def run() -> None:
        async with running_server(config) as srv:
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING
            for service in ("Attestation", "Svids", "Entries", "Bundles"):
                status = await agent_api_health(srv, service=f"custos.agent.v1.{service}")
                assert status == HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await agent_api_health(srv, service="custos.agent.v1.Nope")
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            leaf = await peer_certificate(srv.agent_api_address)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
                "spiffe://example.org/custos/server"
            ]
            assert san.get_values_for_type(x509.DNSName) == ["custos-server"]
            # A client that expects another name is refused by TLS itself.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent_api_health(srv, server_name="not-custos")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(run())


def test_the_tls_certificate_is_renewed_without_closing_the_port(
    server_config_factory: ConfigFactory,
) -> None:
    config = server_config_factory()

    async def run() -> None:
        async with running_server(config) as srv, await server_agent(srv) as agent:
            # An agent's open stream (its bundle stream) survives the renewal.
            stream = stream_bundle(agent.client)
            first = await anext(stream)
            before = await peer_certificate(srv.agent_api_address)
            await srv.renew_tls(force=True)
            after = await peer_certificate(srv.agent_api_address)
            assert after.serial_number != before.serial_number
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING
            await asyncio.to_thread(srv.ctx.jwt_keys.prepare)
            await srv.maintain_once()
            second = await asyncio.wait_for(anext(stream), 30)
            assert len(second.jwt_authorities) == len(first.jwt_authorities) + 1
            await stream.aclose()

    asyncio.run(run())


def test_start_stop_twice_keeps_the_keys(server_config_factory: ConfigFactory) -> None:
    config = server_config_factory()

    async def run() -> tuple[TrustBundle, TrustBundle]:
        async with running_server(config) as srv:
            first = srv.ctx.bundle()
        srv = Server(config)
        await srv.start()
        try:
            second = srv.ctx.bundle()
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING
        finally:
            await srv.stop()
            await srv.stop()  # idempotent
        return first, second

    first, second = asyncio.run(run())
    assert first.x509_authorities == second.x509_authorities
    assert [a.kid for a in first.jwt_authorities] == [a.kid for a in second.jwt_authorities]


def test_a_started_server_refuses_a_second_start(server_config_factory: ConfigFactory) -> None:
    config = server_config_factory()

    async def run() -> None:
        async with running_server(config) as srv:
            with pytest.raises(ServerStartError, match="already started"):
                await srv.start()

    asyncio.run(run())


def test_agent_api_port_in_use_is_one_line_and_nothing_stays_open(
    server_config_factory: ConfigFactory,
) -> None:
    config = server_config_factory()
    with socket.socket() as taken:
        taken.bind((config.agent_api.host, config.agent_api.port))
        taken.listen()

        async def run() -> None:
            srv = Server(config)
            with pytest.raises(ServerStartError) as info:
                await srv.start()
            assert info.value.message.startswith("agent_api.address: cannot listen on")
            assert "\n" not in info.value.message

        asyncio.run(run())
    # Everything opened before the failure was closed: the same config starts now.

    async def again() -> None:
        async with running_server(config) as srv:
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING

    asyncio.run(again())


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def test_http_listener_serves_metrics_and_healthz(server_config_factory: ConfigFactory) -> None:
    config = server_config_factory(with_http=True)

    async def run() -> None:
        async with running_server(config) as srv:
            base = f"http://{srv.http_address}"
            status, body = await asyncio.to_thread(_get, base + "/healthz")
            assert (status, body) == (200, b"ok\n")
            status, body = await asyncio.to_thread(_get, base + "/metrics")
            assert status == 200
            assert b"custos_server_issued" in body
            status, _ = await asyncio.to_thread(_get, base + "/nope")
            assert status == 404
            srv.health.set("", False)
            status, _ = await asyncio.to_thread(_get, base + "/healthz")
            assert status == 503

    asyncio.run(run())


def test_metrics_count_issuance_and_agent_api_calls(server_config_factory: ConfigFactory) -> None:
    config = server_config_factory(with_http=True)

    async def run() -> None:
        async with running_server(config) as srv, await server_agent(srv) as agent:
            entry = await asyncio.to_thread(
                srv.ctx.datastore.entries.create,
                "spiffe://example.org/w",
                agent.identity.spiffe_id,
                ["unix:uid:1"],
            )
            issued = await agent.client.new_x509_svids(
                [X509Params(entry.id, new_csr(), "memory"), X509Params("nope", new_csr(), "memory")]
            )
            assert issued[0].error is None and issued[1].error is not None
            method = "/custos.agent.v1.Svids/BatchNewX509SVID"
            ok = f'custos_server_call_seconds_count{{code="OK",method="{method}"}} 1.0'
            texts: list[str] = []

            async def metrics_with(line: str) -> bool:
                # A call is counted after its reply has left: the client can be first.
                _, body = await asyncio.to_thread(_get, f"http://{srv.http_address}/metrics")
                texts.append(body.decode())
                return line in texts[-1]

            await eventually(lambda: metrics_with(ok))
            text = texts[-1]
            assert 'custos_server_issued_total{kind="x509-svid"} 1.0' in text
            assert 'custos_server_attestations_total{attestor="join_token",outcome="ok"} 1.0' in (
                text
            )
            assert ok in text
            # A refused call is counted under its status.
            with pytest.raises(grpc.aio.AioRpcError):
                async with raw_channel(agent) as raw:
                    await raw.unary_unary(method)(b"", timeout=10)
            refused = f'code="UNAUTHENTICATED",method="{method}"'
            await eventually(lambda: metrics_with(refused))
            assert refused in texts[-1]

    asyncio.run(run())


def test_a_key_change_seen_by_maintenance_tells_connected_agents(
    server_config_factory: ConfigFactory,
) -> None:
    config = server_config_factory()

    async def run() -> None:
        async with running_server(config) as srv:
            before = srv.ctx.events.bundle_generation
            await srv.maintain_once()
            assert srv.ctx.events.bundle_generation == before  # nothing changed
            # Another server publishes a next key (its own SigningKeys on the datastore).
            await asyncio.to_thread(srv.ctx.wit_keys.prepare)
            await srv.maintain_once()
            assert srv.ctx.events.bundle_generation > before

    asyncio.run(run())


def _upstream(directory: Path) -> tuple[x509.Certificate, Path, Path]:
    """An upstream root CA (as an operator's offline root would be) in two PEM files."""
    from custos.x509.ca import CertificateAuthority

    key = ec.generate_private_key(ec.SECP384R1())
    root = CertificateAuthority.self_signed(key, TrustDomain("example.org"), ttl=timedelta(days=30))
    cert_file, key_file = directory / "upstream.pem", directory / "upstream.key"
    cert_file.write_bytes(root.certificate.public_bytes(Encoding.PEM))
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return root.certificate, cert_file, key_file


def test_an_intermediate_ca_under_the_upstream_root_signs_and_the_bundle_has_the_root(
    server_config_factory: ConfigFactory, tmp_path: Path
) -> None:
    root, cert_file, key_file = _upstream(tmp_path)
    config = server_config_factory(
        sections={"ca": {"upstream_cert": str(cert_file), "upstream_key": str(key_file)}}
    )

    async def run() -> None:
        async with running_server(config) as srv, await server_agent(srv) as agent:
            assert srv.ctx.bundle().x509_authorities == (root,)
            # The agent's own SVID: leaf, then the server's intermediate, under the root.
            chain = agent.identity.x509_svid
            assert len(chain) == 2
            intermediate = chain[1]
            assert intermediate.issuer == root.subject
            intermediate.verify_directly_issued_by(root)
            chain[0].verify_directly_issued_by(intermediate)
            assert intermediate.not_valid_after_utc <= root.not_valid_after_utc
            # The Agent API's TLS certificate chains the same way (clients hold the root).
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING

    asyncio.run(run())


def _leaf_pair(directory: Path) -> tuple[Path, Path]:
    """A certificate that is not a CA (basicConstraints cA false), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")])
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "leaf.pem", directory / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(Encoding.PEM))
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return cert_file, key_file


@pytest.mark.parametrize("damage", ["garbage", "missing", "not_a_ca", "key_mismatch"])
def test_a_bad_upstream_ca_is_one_line_at_start(
    server_config_factory: ConfigFactory, tmp_path: Path, damage: str
) -> None:
    _, cert_file, key_file = _upstream(tmp_path)
    if damage == "garbage":
        cert_file.write_text("not PEM")
    elif damage == "missing":
        key_file.unlink()
    elif damage == "key_mismatch":
        other = tmp_path / "other"
        other.mkdir()
        key_file = _upstream(other)[2]
    else:
        cert_file, key_file = _leaf_pair(tmp_path)
    config = server_config_factory(
        sections={"ca": {"upstream_cert": str(cert_file), "upstream_key": str(key_file)}}
    )

    async def run() -> None:
        with pytest.raises(ServerStartError) as info:
            async with running_server(config):
                pass
        assert info.value.message.startswith("ca.upstream_"), info.value.message
        assert "\n" not in info.value.message

    asyncio.run(run())


def test_a_message_over_max_message_bytes_is_refused_and_the_server_keeps_serving(
    server_config_factory: ConfigFactory,
) -> None:
    config = server_config_factory(sections={"agent_api": {"max_message_bytes": 65536}})

    async def run() -> None:
        async with running_server(config) as srv, await server_agent(srv) as agent:
            method = "/custos.agent.v1.Svids/BatchNewX509SVID"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with raw_channel(agent) as raw:
                    await raw.unary_unary(method)(b"\x0a" + b"\xff" * 70000, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING

    asyncio.run(run())


def test_a_server_restarted_after_its_ca_expired_starts_with_a_new_ca(
    server_config_factory: ConfigFactory,
) -> None:
    # A server left stopped longer than its CA's lifetime (here 3 s; SPIRE does the
    # same for a CA that expired while it was down): the old root is useless, so the
    # server replaces it at once instead of refusing to start.
    config = server_config_factory(
        sections={"ca": {"ttl": "3s"}, "x509_svid": {"default_ttl": "1s"}}
    )

    async def run() -> None:
        async with running_server(config) as srv:
            old = srv.ctx.bundle().x509_authorities
        while datetime.now(UTC) < old[0].not_valid_after_utc:
            await asyncio.sleep(0.2)
        async with running_server(config) as srv:
            current = await asyncio.to_thread(srv.ctx.ca_keys.current)
            assert current.certificate().not_valid_after_utc > datetime.now(UTC)
            assert current.certificate() not in old
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING

    asyncio.run(run())


def test_maintenance_prunes_expired_join_tokens(server_config_factory: ConfigFactory) -> None:
    config = server_config_factory()

    async def run() -> None:
        async with running_server(config) as srv:
            tokens = srv.ctx.datastore.join_tokens
            expired, _ = await asyncio.to_thread(tokens.create, 60, now=time.time() - 120)
            valid, _ = await asyncio.to_thread(tokens.create, 600)
            await srv.maintain_once()
            with pytest.raises(NotFoundError):
                await asyncio.to_thread(tokens.get, expired.id)
            assert (await asyncio.to_thread(tokens.get, valid.id)).id == valid.id

    asyncio.run(run())


def test_the_config_server_init_writes_runs() -> None:
    from custos.server.config import AgentApiConfig, load_server_config
    from custos.server.init import init_server
    from custos.testing.server import free_port

    data_dir = Path(tempfile.mkdtemp(prefix="custos-init-"))
    try:
        written = load_server_config(init_server("example.org", data_dir))
        # Only the port changes: tests never use the defaults.
        config = written.model_copy(
            update={"agent_api": AgentApiConfig(address=f"127.0.0.1:{free_port()}")}
        )

        async def run() -> None:
            async with running_server(config) as srv, await server_agent(srv) as agent:
                assert agent.identity.spiffe_id.path.startswith("/custos/agent/join_token/")
                assert await agent_api_health(srv) == HealthCheckResponse.SERVING
                assert (data_dir / "admin.sock").exists()

        asyncio.run(run())
        assert sorted(p.name for p in data_dir.iterdir()) == [
            "datastore.sqlite3",
            "keys",
            "server.toml",
        ]
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_after_a_ca_rotation_the_tls_certificate_is_signed_by_the_new_ca(
    server_config_factory: ConfigFactory,
) -> None:
    config = server_config_factory()

    async def run() -> None:
        async with running_server(config) as srv:
            before = await peer_certificate(srv.agent_api_address)
            new_ca = (await asyncio.to_thread(srv.ctx.ca_keys.rotate_now)).certificate()
            await srv.maintain_once()
            after = await peer_certificate(srv.agent_api_address)
            after.verify_directly_issued_by(new_ca)
            assert after.serial_number != before.serial_number
            # Agents holding the bundle (both roots) still connect.
            assert await agent_api_health(srv) == HealthCheckResponse.SERVING

    asyncio.run(run())


def test_join_token_default_ttl_from_the_config(server_config_factory: ConfigFactory) -> None:
    config = server_config_factory(sections={"join_token": {"default_ttl": "2m"}})

    async def run() -> None:
        async with running_server(config) as srv:
            async with AdminClient(srv.admin_socket) as admin:
                made = time.time()
                reply = await admin.generate_token()
            assert made + 100 <= reply.expires_at <= time.time() + 120

    asyncio.run(run())


def test_http_port_in_use_is_one_line_naming_the_key(server_config_factory: ConfigFactory) -> None:
    config = server_config_factory(with_http=True)
    assert config.http.address is not None
    host, port = config.http.address.rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()

        async def run() -> None:
            with pytest.raises(ServerStartError) as info:
                async with running_server(config):
                    pass
            assert info.value.message.startswith(f"http.address: cannot listen on {host}:{port}")

        asyncio.run(run())


def test_idle_connections_beyond_the_cap_are_closed_and_the_listener_recovers(
    server_config_factory: ConfigFactory,
) -> None:
    from custos.server.http import MAX_CONNECTIONS

    config = server_config_factory(with_http=True)

    async def run() -> None:
        async with running_server(config) as srv:
            assert srv.http_address is not None
            host, port = srv.http_address.rsplit(":", 1)
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(MAX_CONNECTIONS)]
            (listener,) = srv.listeners
            for _ in range(200):  # until the server has accepted every one of them
                if listener.active_connections == MAX_CONNECTIONS:
                    break
                await asyncio.sleep(0.05)
            assert listener.active_connections == MAX_CONNECTIONS
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            try:
                answer = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed without an answer
            writer.close()
            for _, w in idle:
                w.close()
            status, body = await _until_ok(lambda: _get(f"http://{srv.http_address}/healthz"))
            assert (status, body) == (200, b"ok\n")

    asyncio.run(run())


async def _until_ok(get: Callable[[], tuple[int, bytes]]) -> tuple[int, bytes]:
    for _ in range(50):
        try:
            return await asyncio.to_thread(get)
        except OSError:
            await asyncio.sleep(0.1)
    return await asyncio.to_thread(get)
