"""The agent's own identity (``custos.agent.node``) and its persistence
(``custos.agent.state``) against a real server (``custos.testing.server``).

A join token is spent by its first attestation, so an agent that serves after a
restart with the same (spent) token has provably not attested again.  Every wait is
bounded; nothing here asserts how fast anything happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from custos.agent.client.calls import AgentApiClient
from custos.agent.client.errors import AgentApiError
from custos.agent.client.streams import stream_bundle
from custos.agent.node import (
    STATE_FILE,
    Backoff,
    NodeIdentity,
    NodeIdentityError,
    ServerConnection,
    load_bootstrap_bundle,
)
from custos.agent.state import StateError, ensure_private_dir, read_json, write_json_atomic
from custos.bundle import TrustBundle
from custos.identity import TrustDomain
from custos.keys import KeyStore, KeyStoreConfig, open_key_store
from custos.plugin import AgentCatalog, PluginConfig
from custos.server.app import Server
from custos.testing.server import ServerRig, running_server

TD = TrustDomain.parse("example.org")
BOUND = 30.0
T = TypeVar("T")


async def bounded(aw: Awaitable[T], timeout: float = BOUND) -> T:
    return await asyncio.wait_for(aw, timeout)


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    # Agent credentials live x509_svid.default_ttl: short, so a renewal falls due in
    # the test; no poll wake-ups needed.
    rig = ServerRig.create(
        sections={"x509_svid": {"default_ttl": "16s"}, "events": {"poll_interval": "1h"}}
    )
    yield rig
    rig.destroy()


def exportable_store(base: Path) -> KeyStore:
    """A key store that survives a restart (a directory of PEM files)."""
    return open_key_store(KeyStoreConfig(store="exportable", key_dir=base / "keys"))


async def new_token(srv: Server) -> str:
    _, secret = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
    return secret


async def write_bundle(srv: Server, path: Path) -> Path:
    bundle = await asyncio.to_thread(srv.ctx.bundle)
    await asyncio.to_thread(bundle.save, path)
    return path


@asynccontextmanager
async def node_of(
    srv: Server,
    base: Path,
    token: str,
    store: KeyStore,
    *,
    custody: str = "exportable",
    **options: Any,
) -> AsyncIterator[NodeIdentity]:
    base.mkdir(exist_ok=True)
    bundle_file = await write_bundle(srv, base / "bundle.json")
    with AgentCatalog.load(
        TD,
        node_attestors=[PluginConfig("join_token", {"token": token})],
        workload_attestors=[PluginConfig("example")],
    ) as catalog:
        node = NodeIdentity(
            trust_domain=TD,
            server=ServerConnection(srv.agent_api_address, bundle_file=bundle_file),
            attestor=catalog.node_attestor,
            store=store,
            custody=custody,
            data_dir=base / "data",
            backoff=Backoff(0.1, 0.5),
            **options,
        )
        await node.start()
        try:
            yield node
        finally:
            await node.stop()


async def authenticated(client: AgentApiClient) -> TrustBundle:
    """One authenticated call (the first message of StreamBundle)."""
    stream = stream_bundle(client)
    try:
        return await bounded(anext(stream))
    finally:
        await stream.aclose()


def agent_keys(store: KeyStore) -> list[str]:
    return [k.name for k in store.list() if k.name.startswith("custos-agent-")]


class Records(logging.Handler):
    """Log records of ``custos.agent.node``, with an event per wanted text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.waiting: dict[str, asyncio.Event] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        for text, event in self.waiting.items():
            if text in message:
                event.set()

    async def wait_for(self, text: str) -> None:
        event = self.waiting.setdefault(text, asyncio.Event())
        if any(text in m for m in self.messages):
            return
        await bounded(event.wait())


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("custos.agent")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


# ---- persistence ----------------------------------------------------------------------


def test_state_written_atomically_private_and_read_back(tmp_path: Path) -> None:
    data = ensure_private_dir(tmp_path / "a" / "data")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    write_json_atomic(data / "s.json", {"x": 1})
    write_json_atomic(data / "s.json", {"x": 2})
    assert stat.S_IMODE((data / "s.json").stat().st_mode) == 0o600
    assert read_json(data / "s.json") == {"x": 2}
    assert os.listdir(data) == ["s.json"]  # no temporary file left behind
    assert read_json(data / "missing.json") is None


def test_a_loose_data_dir_is_tightened(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    ensure_private_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StateError, match=r"not a directory|cannot create"):
        ensure_private_dir(tmp_path / "f")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000, b'{"x": NaN}', b"x" * (2 << 20)],
    ids=["syntax", "not-object", "not-utf8", "deep", "nan", "too-large"],
)
def test_a_corrupt_state_file_is_logged_and_treated_as_absent(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="custos.agent.state"):
        assert read_json(path) is None
    assert "ignoring" in caplog.text and str(path) in caplog.text


def test_a_state_path_that_is_a_fifo_is_not_opened_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.json"
    os.mkfifo(path)
    with caplog.at_level(logging.WARNING, logger="custos.agent.state"):
        assert read_json(path) is None
    assert "not a regular file" in caplog.text


def test_an_unwritable_state_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot write state file"):
        write_json_atomic(tmp_path / "missing-dir" / "s.json", {"x": 1})
    with pytest.raises(StateError, match="cannot encode"):
        write_json_atomic(tmp_path / "s.json", {"x": float("nan")})


def test_bootstrap_bundle_file_pem_spiffe_and_broken(tmp_path: Path) -> None:
    from datetime import timedelta

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    from custos.x509 import CertificateAuthority

    ca = CertificateAuthority.self_signed(
        ec.generate_private_key(ec.SECP256R1()), TD, ttl=timedelta(days=1)
    )
    root = ca.certificate
    pem = tmp_path / "roots.pem"
    pem.write_bytes(root.public_bytes(Encoding.PEM))
    assert load_bootstrap_bundle(pem, TD).x509_authorities == (root,)
    spiffe = tmp_path / "bundle.json"
    TrustBundle(TD, x509_authorities=(root,)).save(spiffe)
    assert load_bootstrap_bundle(spiffe, TD).x509_authorities == (root,)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(NodeIdentityError, match=r"server\.bundle_file"):
        load_bootstrap_bundle(tmp_path / "bad.json", TD)
    with pytest.raises(NodeIdentityError, match="does not exist"):
        load_bootstrap_bundle(tmp_path / "nope.pem", TD)


# ---- attestation, restart ---------------------------------------------------------------


def test_attest_then_a_restarted_agent_serves_without_attesting_again(
    rig: ServerRig, tmp_path: Path
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            token = await new_token(srv)
            store = exportable_store(tmp_path)
            async with node_of(srv, tmp_path, token, store) as node:
                first = node.identity
                assert str(first.spiffe_id).startswith("spiffe://example.org/custos/agent/")
                assert agent_keys(store) == ["custos-agent-1"]
                await authenticated(node.client)
            state = tmp_path / "data" / STATE_FILE
            assert stat.S_IMODE(state.stat().st_mode) == 0o600
            assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
            # The token is spent: attesting with it again is refused...
            with pytest.raises(NodeIdentityError, match="attestation refused"):
                other = tmp_path / "other"
                async with node_of(srv, other, token, exportable_store(other)):
                    pass
            # ...so a restarted agent that serves with it did not attest.
            async with node_of(srv, tmp_path, token, exportable_store(tmp_path)) as again:
                assert again.identity.spiffe_id == first.spiffe_id
                assert again.identity.wit == first.wit
                assert again.key_name == "custos-agent-1"
                await authenticated(again.client)

    asyncio.run(main())


def test_the_agent_key_in_a_tpm_survives_a_restart(
    rig: ServerRig, tmp_path: Path, swtpm: Any
) -> None:
    config = KeyStoreConfig(store="tpm", tcti=swtpm.tcti, key_dir=tmp_path / "tpm-keys")

    async def main() -> None:
        async with running_server(rig) as srv:
            token = await new_token(srv)
            with open_key_store(config) as store:
                async with node_of(srv, tmp_path, token, store, custody="tpm") as node:
                    first = node.identity.spiffe_id
                    await authenticated(node.client)
            with open_key_store(config) as store:
                async with node_of(srv, tmp_path, token, store, custody="tpm") as node:
                    assert node.identity.spiffe_id == first
                    assert node.key_name == "custos-agent-1"
                    await authenticated(node.client)  # a WPT signed inside the TPM

    asyncio.run(main())


def test_a_corrupt_state_file_means_attest_again_or_a_clear_error(
    rig: ServerRig, tmp_path: Path, records: Records
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            token = await new_token(srv)
            store = exportable_store(tmp_path)
            async with node_of(srv, tmp_path, token, store) as node:
                first = node.identity.spiffe_id
            (tmp_path / "data" / STATE_FILE).write_bytes(b'{"version": 1, "trunc')
            # The token is spent: no way to attest again -> one clear error.
            with pytest.raises(NodeIdentityError, match="attestation refused") as refused:
                async with node_of(srv, tmp_path, token, store):
                    pass
            assert refused.value.code == "join_token_used"
            await records.wait_for("ignoring corrupt state file")
            # A valid token: attests again; the key the lost state named is deleted.
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                assert node.identity.spiffe_id != first
                assert agent_keys(store) == [node.key_name]
                await authenticated(node.client)

    asyncio.run(main())


def test_a_state_whose_key_is_gone_attests_again(
    rig: ServerRig, tmp_path: Path, records: Records
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            store = exportable_store(tmp_path)
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                first = node.identity.spiffe_id
            store.delete(node.key_name)
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                assert node.identity.spiffe_id != first  # attested again, with the new token
                await authenticated(node.client)
            await records.wait_for("not using the persisted agent identity")

    asyncio.run(main())


# ---- eviction -------------------------------------------------------------------------


def test_an_evicted_agent_reattests_only_with_a_new_token(
    rig: ServerRig, tmp_path: Path, records: Records
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            store = exportable_store(tmp_path)
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                first = node.identity.spiffe_id
                await asyncio.to_thread(srv.ctx.datastore.agents.evict, first)
                with pytest.raises(AgentApiError) as refused:
                    await authenticated(node.client)
                assert refused.value.code == "agent_evicted"
                node.report_refused(refused.value)
                failure = await bounded(node.wait_failed())
                # One clear line: what happened, what the server said, what to do.
                assert failure.code == "join_token_used", failure
                assert "must attest again" in failure.message
                assert "join token" in failure.message
            # Restarted with a new token: the persisted identity is still unexpired and
            # is used, the server refuses it, the agent attests with the new token.
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                seen = node.generation
                try:
                    await authenticated(node.client)
                except AgentApiError as e:
                    node.report_refused(e)
                await bounded(node.wait_changed(seen))
                while node.identity.spiffe_id == first:
                    await bounded(node.wait_changed(node.generation))
                assert node.failure is None
                await authenticated(node.client)
                await records.wait_for("deleted agent key custos-agent-1 (replaced)")
                assert agent_keys(store) == [node.key_name]

    asyncio.run(main())


# ---- renewal, server down -------------------------------------------------------------


def test_server_down_backoff_keeps_the_identity_then_renews_with_a_new_key(
    rig: ServerRig, tmp_path: Path, records: Records
) -> None:
    async def main() -> None:
        store = exportable_store(tmp_path)
        async with running_server(rig) as srv:
            token = await new_token(srv)
            bundle_file = await write_bundle(srv, tmp_path / "bundle.json")
            address = srv.agent_api_address
        with AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("join_token", {"token": token})],
            workload_attestors=[PluginConfig("example")],
        ) as catalog:
            node = NodeIdentity(
                trust_domain=TD,
                server=ServerConnection(address, bundle_file=bundle_file),
                attestor=catalog.node_attestor,
                store=store,
                custody="exportable",
                data_dir=tmp_path / "data",
                backoff=Backoff(0.2, 1.0),
            )
            async with running_server(rig):
                await node.start()
            try:
                first, seen = node.identity, node.generation
                # The server is down when the renewal falls due (half of 16 s).
                await records.wait_for("could not renew the agent identity")
                await records.wait_for("retrying in")
                assert node.identity is first and node.failure is None
                assert node.key_name == "custos-agent-1"
                async with running_server(rig):
                    await bounded(node.wait_changed(seen))
                    assert node.failure is None
                    renewed = node.identity
                    assert renewed.spiffe_id == first.spiffe_id  # RenewAgent, not a new agent
                    assert renewed.wit != first.wit
                    assert node.key_name == "custos-agent-2"
                    # The old key goes right after the new identity is on disk and in use.
                    await records.wait_for("deleted agent key custos-agent-1 (replaced)")
                    assert agent_keys(store) == ["custos-agent-2"]
                    await authenticated(node.client)
                    saved = read_json(tmp_path / "data" / STATE_FILE)
                    assert saved is not None and saved["generation"] == 2
            finally:
                await node.stop()

    asyncio.run(main())


def test_no_bundle_and_no_insecure_bootstrap_is_a_clear_error(
    rig: ServerRig, tmp_path: Path
) -> None:
    async def main() -> None:
        with AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("join_token", {"token": "x" * 32})],
            workload_attestors=[PluginConfig("example")],
        ) as catalog:
            node = NodeIdentity(
                trust_domain=TD,
                server=ServerConnection(rig.agent_api_address),
                attestor=catalog.node_attestor,
                store=exportable_store(tmp_path),
                custody="exportable",
                data_dir=tmp_path / "data",
            )
            with pytest.raises(NodeIdentityError, match="bundle_file") as e:
                await node.start()
            assert e.value.code == "node_no_bundle"

    asyncio.run(main())


def test_persisted_state_is_json_naming_the_key(rig: ServerRig, tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            async with node_of(srv, tmp_path, await new_token(srv), exportable_store(tmp_path)):
                pass
        saved = json.loads((tmp_path / "data" / STATE_FILE).read_text())
        assert saved["generation"] == 1 and saved["custody"] == "exportable"
        assert saved["x509_svid"].startswith("-----BEGIN CERTIFICATE-----")

    asyncio.run(main())


# ---- the bundle -----------------------------------------------------------------------


def test_a_ca_rotation_updates_the_bundle_and_reopens_the_channel(
    rig: ServerRig, tmp_path: Path
) -> None:
    from custos.server.admin.client import AdminClient

    async def main() -> None:
        async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
            store = exportable_store(tmp_path)
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                before, channel = node.bundle, node.client.channel
                seen = node.generation
                kids = await admin.rotate_keys()
                # The keys may arrive in more than one update (one per key published).
                while len(node.bundle.x509_authorities) == len(before.x509_authorities) or not {
                    a.kid for a in node.bundle.jwt_authorities
                } >= {kids[1], kids[2]}:
                    seen = await bounded(node.wait_changed(seen))
                assert node.client.channel is not channel  # the new roots are trusted
                await authenticated(node.client)
                saved = read_json(tmp_path / "data" / STATE_FILE)
                assert saved is not None
                persisted = TrustBundle.from_spiffe_json(TD, saved["bundle"])
                assert set(persisted.x509_authorities) == set(node.bundle.x509_authorities)
            # A restart uses the persisted (newer) bundle, not the bootstrap file.
            async with node_of(srv, tmp_path, "spent" * 8, store) as node:
                assert len(node.bundle.x509_authorities) == len(before.x509_authorities) + 1

    asyncio.run(main())


def test_a_banned_agent_fails_with_one_clear_error(rig: ServerRig, tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            async with node_of(
                srv, tmp_path, await new_token(srv), exportable_store(tmp_path)
            ) as node:
                await asyncio.to_thread(srv.ctx.datastore.agents.ban, node.identity.spiffe_id)
                with pytest.raises(AgentApiError) as refused:
                    await authenticated(node.client)
                node.report_refused(refused.value)
                failure = await bounded(node.wait_failed())
                assert failure.code == "agent_banned"
                assert (
                    "banned" in failure.message and str(node.identity.spiffe_id) in failure.message
                )

    asyncio.run(main())


def test_insecure_bootstrap_attests_then_trusts_the_bundle_it_got(
    rig: ServerRig, tmp_path: Path, records: Records
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            token = await new_token(srv)
            with AgentCatalog.load(
                TD,
                node_attestors=[PluginConfig("join_token", {"token": token})],
                workload_attestors=[PluginConfig("example")],
            ) as catalog:
                node = NodeIdentity(
                    trust_domain=TD,
                    server=ServerConnection(srv.agent_api_address, insecure_bootstrap=True),
                    attestor=catalog.node_attestor,
                    store=exportable_store(tmp_path),
                    custody="exportable",
                    data_dir=tmp_path / "data",
                )
                async with node:
                    await authenticated(node.client)
                    server_bundle = await asyncio.to_thread(srv.ctx.bundle)
                    assert set(node.bundle.x509_authorities) == set(server_bundle.x509_authorities)
            # The pin was logged loudly (custos.agent.client.channel's warning).
            assert any("INSECURE BOOTSTRAP" in m for m in records.messages)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("generation", True),
        ("wit", None),
        ("wit", "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"),
        ("x509_svid", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
        ("trust_domain", "evil.example"),
        ("expires_at", 1.0),
        ("selectors", "unix:uid:0"),
        ("bundle", "{}"),
    ],
)
def test_a_tampered_state_is_not_used_the_agent_attests_again(
    rig: ServerRig, tmp_path: Path, records: Records, field: str, value: object
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            store = exportable_store(tmp_path)
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                first = node.identity.spiffe_id
            path = tmp_path / "data" / STATE_FILE
            saved = json.loads(path.read_text())
            saved[field] = value
            path.write_text(json.dumps(saved))
            async with node_of(srv, tmp_path, await new_token(srv), store) as node:
                assert node.identity.spiffe_id != first
                await authenticated(node.client)
            await records.wait_for("not using the persisted agent identity")

    asyncio.run(main())


def test_keys_a_crash_left_behind_are_deleted_at_start(rig: ServerRig, tmp_path: Path) -> None:
    """``kill -9`` between creating a renewal's key and storing its identity leaves a key
    nothing names (and after storing it, the previous key): both go at the next start."""

    async def main() -> None:
        async with running_server(rig) as srv:
            token = await new_token(srv)
            store = exportable_store(tmp_path)
            async with node_of(srv, tmp_path, token, store) as node:
                first = node.identity.spiffe_id
            store.create("custos-agent-2", "ES256")  # a renewal's key, identity never stored
            store.create("custos-agent-0", "ES256")  # an older generation never deleted
            store.create("wl-web-1", "ES256")  # not the agent's: left alone
            # (An exportable store reads its directory when it opens: a fresh one each time.)
            async with node_of(srv, tmp_path, token, exportable_store(tmp_path)) as node:
                assert node.identity.spiffe_id == first  # restored, not attested
                now = exportable_store(tmp_path)
                assert agent_keys(now) == ["custos-agent-1"]
                assert "wl-web-1" in [k.name for k in now.list()]
                await authenticated(node.client)

    asyncio.run(main())


def test_no_server_at_the_first_start_is_one_clear_error_after_the_bound(
    rig: ServerRig, tmp_path: Path, records: Records
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            bundle_file = await write_bundle(srv, tmp_path / "bundle.json")
        # The server is gone (its port closed): retried with backoff, then one error.
        with AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("join_token", {"token": "x" * 32})],
            workload_attestors=[PluginConfig("example")],
        ) as catalog:
            node = NodeIdentity(
                trust_domain=TD,
                server=ServerConnection(rig.agent_api_address, bundle_file=bundle_file),
                attestor=catalog.node_attestor,
                store=exportable_store(tmp_path),
                custody="exportable",
                data_dir=tmp_path / "data",
                backoff=Backoff(0.05, 0.2),
                start_timeout=1.5,
            )
            with pytest.raises(NodeIdentityError) as e:
                await node.start()
            assert e.value.code == "node_attestation_unavailable"
            assert rig.agent_api_address in e.value.message
            await records.wait_for("node attestation failed (agent_api_unavailable")
            # The keys of the failed attempts are gone.
            assert agent_keys(exportable_store(tmp_path)) == []

    asyncio.run(main())
