"""Workload credentials end to end (custos.agent.workloads / identities / custody):
a real server in the test's loop, an agent attested with a join token, entries
written through the admin API, keys in real stores (swtpm, SoftHSM, memory,
exportable)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
)
from test_workloads_rig import (
    TD,
    Clock,
    RecordingMemoryStore,
    RigNode,
    bounded,
    by_entry,
    entry,
    until,
)

from custos.agent.client.errors import AgentApiError
from custos.agent.custody import Custody, CustodyError, CustodyTierMissingError
from custos.agent.identities import WorkloadIdentities, WorkloadIdentity
from custos.agent.workloads import REFUSED_TIER_MISSING, WorkloadManager, key_name
from custos.bundle import BundleSet
from custos.identity import Selector
from custos.keys import (
    ExportRefusedError,
    KeyNotFoundError,
    KeyStore,
    KeyStoreConfig,
    MemoryKeyStore,
    open_key_store,
)
from custos.server.admin.client import AdminClient
from custos.server.app import Server
from custos.testing.server import RigAgent, ServerRig, running_server, server_agent
from custos.wimse.wit import verify_wit
from custos.x509 import verify_x509_svid

NO_POLL = {"events": {"poll_interval": "1h"}}


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    rig = ServerRig.create(sections=NO_POLL)
    yield rig
    rig.destroy()


def serve(
    rig: ServerRig, scenario: Callable[[Server, RigAgent, AdminClient], Awaitable[None]]
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            async with await server_agent(srv) as agent, AdminClient(srv.admin_socket) as admin:
                await scenario(srv, agent, admin)

    asyncio.run(main())


def spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]


def tier_config(tier: str, tmp_path: Path, request: pytest.FixtureRequest) -> KeyStoreConfig:
    if tier == "tpm":
        tpm = request.getfixturevalue("swtpm")
        return KeyStoreConfig(store="tpm", tcti=tpm.tcti, key_dir=tmp_path / "tpm-keys")
    if tier == "pkcs11":
        hsm = request.getfixturevalue("softhsm")
        return KeyStoreConfig(store="pkcs11", pkcs11_module=hsm.module, pkcs11_uri=hsm.uri)
    return KeyStoreConfig(store=tier, key_dir=tmp_path / f"{tier}-keys")  # type: ignore[arg-type]


def check_credentials(identity: WorkloadIdentity, agent: RigAgent, spiffe_id: str) -> None:
    """X.509 URI SAN == the entry's ID, chain and WIT verify, both for identity.key."""
    bundles = BundleSet([agent.identity.bundle])
    leaf = identity.x509_svid[0]
    assert str(verify_x509_svid(identity.x509_svid, bundles)) == spiffe_id
    assert spki(leaf.public_key()) == spki(identity.key.public_key())
    wit = verify_wit(identity.wit, bundles, profile="spiffe")
    assert str(wit.subject) == spiffe_id
    assert spki(wit.cnf_public_key) == spki(identity.key.public_key())
    assert identity.not_after <= leaf.not_valid_after_utc.timestamp()
    assert identity.not_after <= wit.expires_at


@pytest.mark.parametrize("tier", ["memory", "exportable", "pkcs11", "tpm"])
def test_an_entry_gets_credentials_for_one_key_in_its_tier(
    rig: ServerRig, tier: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    custody = Custody.open({tier: tier_config(tier, tmp_path, request)})
    data_dir = tmp_path / "data"

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        node = RigNode(agent)
        async with WorkloadManager(node=node, custody=custody, data_dir=data_dir) as manager:
            made = await admin.create_entry(
                entry("/web", str(agent.identity.spiffe_id), "unix:uid:1000", key_custody=tier)
            )
            source = manager.identities
            [identity] = await until(lambda: source.identities_for([Selector("unix", "uid:1000")]))
            assert identity.entry_id == made.id
            assert identity.custody == tier
            assert identity.key.name == key_name(made.id, 1)
            # the key lives in the tier's store, and only there
            assert identity.key.store is custody.store_for(tier)
            custody.store_for(tier).info(identity.key.name)
            check_credentials(identity, agent, f"spiffe://{TD}/web")

            if tier == "exportable":
                der = identity.private_key_pkcs8()
                assert spki(load_der_private_key(der, None).public_key()) == spki(
                    identity.key.public_key()
                )
                jwk = identity.private_jwk()
                assert {"kty", "crv", "x", "y", "d", "alg"} <= set(jwk)
            else:
                with pytest.raises(ExportRefusedError):
                    identity.private_key_pkcs8()
                with pytest.raises(ExportRefusedError):
                    identity.private_jwk()

            state = json.loads((data_dir / "workloads" / f"{made.id}.json").read_text())
            assert (state["generation"], state["key_name"], state["tier"]) == (
                1,
                identity.key.name,
                tier,
            )
            assert state["wit"] == identity.wit
        await custody.close()

    serve(rig, scenario)


def test_selectors_must_all_be_the_callers_and_the_first_identity_is_by_entry_id(
    rig: ServerRig, tmp_path: Path
) -> None:
    custody = Custody({"memory": MemoryKeyStore()})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        parent = str(agent.identity.spiffe_id)
        async with WorkloadManager(node=RigNode(agent), custody=custody, data_dir=tmp_path) as m:
            # a node-group entry (spiffe_id selector) is no workload: no key for it; made
            # first, so every later entry set holds it
            await admin.create_entry(entry("/group", parent, f"spiffe_id:{parent}"))
            a = await admin.create_entry(entry("/a", parent, "unix:uid:1000"))
            b = await admin.create_entry(entry("/b", parent, "unix:uid:1000", "unix:gid:50"))
            c = await admin.create_entry(entry("/c", parent, "unix:uid:2000"))
            source = m.identities
            await until(lambda: len(source.all()) == 3)
            uid = Selector("unix", "uid:1000")
            gid = Selector("unix", "gid:50")
            assert [i.entry_id for i in source.identities_for([uid])] == [a.id]
            both = source.identities_for([uid, gid, Selector("unix", "user:x")])
            assert [i.entry_id for i in both] == sorted([a.id, b.id])
            assert source.identities_for([gid]) == []
            assert source.identities_for([]) == []
            keys = {k.name for k in custody.store_for("memory").list()}
            assert keys == {key_name(e.id, 1) for e in (a, b, c)}
        await custody.close()

    serve(rig, scenario)


def test_a_tier_the_node_lacks_is_refused_and_counted_once(rig: ServerRig, tmp_path: Path) -> None:
    custody = Custody({"memory": MemoryKeyStore()})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        parent = str(agent.identity.spiffe_id)
        async with WorkloadManager(node=RigNode(agent), custody=custody, data_dir=tmp_path) as m:
            tpm = await admin.create_entry(entry("/tpm", parent, key_custody="tpm"))
            await until(lambda: m.refused[REFUSED_TIER_MISSING] == 1)
            # a later entry set (another entry) is served and does not count it again
            ok = await admin.create_entry(entry("/ok", parent, "unix:uid:7"))
            await until(lambda: by_entry(m.identities.all(), ok.id))
            assert m.refused[REFUSED_TIER_MISSING] == 1
            assert by_entry(m.identities.all(), tpm.id) is None
            assert [k.name for k in custody.store_for("memory").list()] == [key_name(ok.id, 1)]
            with pytest.raises(CustodyTierMissingError):
                custody.store_for("tpm")
            # a new revision of the refused entry is refused (and counted) again
            tpm.hint = "still tpm"
            await admin.update_entry(tpm)
            await until(lambda: m.refused[REFUSED_TIER_MISSING] == 2)
        await custody.close()

    serve(rig, scenario)


def test_a_deleted_entry_is_no_longer_served_and_its_key_goes_after_expiry(
    rig: ServerRig, tmp_path: Path
) -> None:
    clock = Clock()
    store = RecordingMemoryStore(clock)
    custody = Custody({"memory": store})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        parent = str(agent.identity.spiffe_id)
        manager = WorkloadManager(
            node=RigNode(agent), custody=custody, data_dir=tmp_path, now=clock
        )
        async with manager:
            made = await admin.create_entry(entry("/gone", parent, x509_svid_ttl=600, wit_ttl=600))
            identity = await until(lambda: by_entry(manager.identities.all(), made.id))
            seen = manager.identities.generation
            await admin.delete_entry(made.id)
            await bounded(manager.identities.wait_changed(seen))
            await until(lambda: by_entry(manager.identities.all(), made.id) is None)
            assert not (tmp_path / "workloads" / f"{made.id}.json").exists()
            # its key stays until its credentials expire ...
            store.info(identity.key.name)
            clock.offset = identity.not_after - clock() + 1.0
            manager.wake()
            await until(lambda: identity.key.name in store.deleted, manager.wake)
            assert store.deleted[identity.key.name] >= identity.not_after
            with pytest.raises(KeyNotFoundError):
                store.info(identity.key.name)
        await custody.close()

    serve(rig, scenario)


def test_jwt_svids_are_cached_per_entry_and_audience_until_half_their_life(
    rig: ServerRig, tmp_path: Path
) -> None:
    clock = Clock()
    custody = Custody({"memory": MemoryKeyStore()})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        parent = str(agent.identity.spiffe_id)
        manager = WorkloadManager(
            node=RigNode(agent), custody=custody, data_dir=tmp_path, now=clock
        )
        async with manager:
            made = await admin.create_entry(entry("/jwt", parent, jwt_svid_ttl=300))
            identity = await until(lambda: by_entry(manager.identities.all(), made.id))
            source = manager.identities
            first, again = await asyncio.gather(
                source.jwt_svid(identity, ["spiffe://example.org/api"]),
                source.jwt_svid(identity, ["spiffe://example.org/api"]),
            )
            assert first == again
            other = await source.jwt_svid(identity, ["spiffe://example.org/db"])
            assert other != first
            # the audience set, not its order or repeats, names the cached token
            assert await source.jwt_svid(identity, ["b", "a"]) == await source.jwt_svid(
                identity, ["a", "b", "a"]
            )
            clock.offset = 151.0  # past half of 300 s
            assert await source.jwt_svid(identity, ["spiffe://example.org/api"]) != first
        await custody.close()

    serve(rig, scenario)


def test_the_jwt_cache_is_bounded(rig: ServerRig, tmp_path: Path) -> None:
    custody = Custody({"memory": MemoryKeyStore()})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        node = RigNode(agent)
        source = WorkloadIdentities(node, jwt_cache_size=2)
        async with WorkloadManager(
            node=node, custody=custody, data_dir=tmp_path, identities=source
        ) as manager:
            made = await admin.create_entry(entry("/jwt", str(agent.identity.spiffe_id)))
            identity = await until(lambda: by_entry(manager.identities.all(), made.id))
            a = await source.jwt_svid(identity, ["a"])
            await source.jwt_svid(identity, ["b"])
            await source.jwt_svid(identity, ["c"])  # evicts "a", the least recently used
            assert await source.jwt_svid(identity, ["c"]) == await source.jwt_svid(identity, ["c"])
            assert await source.jwt_svid(identity, ["a"]) != a
        await custody.close()

    serve(rig, scenario)


def test_custody_refuses_a_table_whose_store_is_not_its_tier(tmp_path: Path) -> None:
    with pytest.raises(CustodyError, match="must be 'tpm'"):
        Custody.open({"tpm": KeyStoreConfig(store="memory")})
    with pytest.raises(CustodyError, match="unknown custody tier"):
        Custody.open({"disk": KeyStoreConfig(store="memory")})
    store: KeyStore = open_key_store(KeyStoreConfig(store="exportable", key_dir=tmp_path))
    with pytest.raises(CustodyError):
        Custody({"memory": store})


def test_a_bundle_change_moves_the_generation_and_a_renewal_alone_does_not(
    rig: ServerRig, tmp_path: Path
) -> None:
    custody = Custody({"memory": MemoryKeyStore()})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        node = RigNode(agent)
        async with WorkloadManager(node=node, custody=custody, data_dir=tmp_path) as manager:
            source = manager.identities
            before = source.generation
            node.replace(client=agent.reconnect())  # a renewal: same bundle
            # a barrier: an entry served means the manager looked after the renewal
            made = await admin.create_entry(entry("/b", str(agent.identity.spiffe_id)))
            await until(lambda: by_entry(source.all(), made.id))
            after_entry = source.generation
            assert after_entry == before + 1  # the entry's publication, nothing else
            rotated = agent.identity.bundle.with_sequence((agent.identity.bundle.sequence or 0) + 1)
            node.replace(bundle=rotated)
            assert await bounded(source.wait_changed(after_entry)) == after_entry + 1
            assert source.bundle() is rotated
            node.client.channel.close()
        await custody.close()

    serve(rig, scenario)


HOSTILE_STATES: dict[str, Callable[[dict[str, Any]], object]] = {
    "not json": lambda good: b"{not json",
    "a list": lambda good: [good],
    "another version": lambda good: {**good, "version": 99},
    "an infinite expiry": lambda good: {**good, "not_after": 1e999},
    "a string expiry": lambda good: {**good, "not_after": "never"},
    "another key's generation": lambda good: {**good, "generation": 7},
    "a generation of true": lambda good: {**good, "generation": True},
    "garbage PEM": lambda good: {**good, "x509_svid_pem": "-----BEGIN CERTIFICATE-----\nAAAA"},
    "another entry": lambda good: {**good, "entry": {**good["entry"], "id": "other"}},
    "a bad selector": lambda good: {**good, "entry": {**good["entry"], "selectors": ["nocolon"]}},
    "entry not an object": lambda good: {**good, "entry": 5},
    "an empty WIT": lambda good: {**good, "wit": ""},
    "expired": lambda good: {**good, "not_after": 1000.0, "issued_at": 10.0},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_STATES))
def test_a_bad_credential_file_is_not_served_and_its_key_goes(
    rig: ServerRig, tmp_path: Path, case: str
) -> None:
    """Each damaged or altered file: a log line, the file and its key removed, a start
    that serves nothing (and no traceback)."""
    config = KeyStoreConfig(store="exportable", key_dir=tmp_path / "keys")
    data_dir = tmp_path / "data"

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        custody = Custody.open({"exportable": config})
        async with WorkloadManager(node=RigNode(agent), custody=custody, data_dir=data_dir) as m:
            made = await admin.create_entry(
                entry("/x", str(agent.identity.spiffe_id), key_custody="exportable")
            )
            identity = await until(lambda: by_entry(m.identities.all(), made.id))
        await custody.close()
        path = data_dir / "workloads" / f"{made.id}.json"
        good = json.loads(path.read_text())
        bad = HOSTILE_STATES[case](good)
        path.write_bytes(bad if isinstance(bad, bytes) else json.dumps(bad).encode())

        custody = Custody.open({"exportable": config})
        # A node whose server is gone: only the file could make it serve anything.
        dead = RigNode(agent, agent.reconnect("127.0.0.1:1"))
        async with WorkloadManager(node=dead, custody=custody, data_dir=data_dir) as m:
            assert m.identities.all() == []
            assert not path.exists()
            with pytest.raises(KeyNotFoundError):
                custody.store_for("exportable").info(identity.key.name)
        dead.client.channel.close()
        await custody.close()

    serve(rig, scenario)


def test_a_credential_change_reissues_with_a_new_key_and_a_selector_change_does_not(
    rig: ServerRig, tmp_path: Path
) -> None:
    custody = Custody({"memory": MemoryKeyStore()})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        parent = str(agent.identity.spiffe_id)
        async with WorkloadManager(node=RigNode(agent), custody=custody, data_dir=tmp_path) as m:
            made = await admin.create_entry(entry("/e", parent, "unix:uid:1"))
            first = await until(lambda: by_entry(m.identities.all(), made.id))
            # selectors and hint: the same key and credentials, published again
            made.selectors[:] = ["unix:uid:2"]
            made.hint = "two"
            made = await admin.update_entry(made)
            moved = await until(
                lambda: (i := by_entry(m.identities.all(), made.id)) and i.hint == "two" and i
            )
            assert (moved.key.name, moved.wit) == (first.key.name, first.wit)
            assert moved.selectors == (Selector("unix", "uid:2"),)
            assert m.identities.identities_for([Selector("unix", "uid:1")]) == []
            state = json.loads((tmp_path / "workloads" / f"{made.id}.json").read_text())
            assert state["entry"]["selectors"] == ["unix:uid:2"]
            # a TTL: new credentials, for a new key
            made.x509_svid_ttl = 1800
            made = await admin.update_entry(made)
            again = await until(
                lambda: (
                    (i := by_entry(m.identities.all(), made.id)) and i.key is not first.key and i
                )
            )
            assert again.key.name == key_name(made.id, 2)
            check_credentials(again, agent, f"spiffe://{TD}/e")
        await custody.close()

    serve(rig, scenario)


def test_credentials_are_asked_for_at_most_100_entries_per_call(
    rig: ServerRig, tmp_path: Path
) -> None:
    custody = Custody({"memory": MemoryKeyStore()})
    metric = "custos_server_call_seconds_count"

    def calls(srv: Server, method: str) -> float:
        labels = {"method": f"/custos.agent.v1.Svids/{method}", "code": "OK"}
        return srv.ctx.metrics.registry.get_sample_value(metric, labels) or 0.0

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        parent = str(agent.identity.spiffe_id)
        for n in range(150):
            await admin.create_entry(entry(f"/many/{n}", parent, f"unix:uid:{n}"))
        # the manager starts after all of them exist: its first set holds all 150
        async with WorkloadManager(node=RigNode(agent), custody=custody, data_dir=tmp_path) as m:
            await until(lambda: len(m.identities.all()) == 150)
        assert (calls(srv, "BatchNewX509SVID"), calls(srv, "BatchNewWIT")) == (2.0, 2.0)
        await custody.close()

    serve(rig, scenario)


def test_a_refused_jwt_svid_is_the_servers_error_and_the_node_hears_of_it(
    rig: ServerRig, tmp_path: Path
) -> None:
    custody = Custody({"memory": MemoryKeyStore()})

    async def scenario(srv: Server, agent: RigAgent, admin: AdminClient) -> None:
        node = RigNode(agent)
        async with WorkloadManager(node=node, custody=custody, data_dir=tmp_path) as manager:
            made = await admin.create_entry(entry("/j", str(agent.identity.spiffe_id)))
            identity = await until(lambda: by_entry(manager.identities.all(), made.id))
            await admin.delete_entry(made.id)
            # the entry is gone on the server: the agent is no longer entitled to it
            with pytest.raises(AgentApiError) as refused:
                await manager.identities.jwt_svid(identity, ["spiffe://example.org/api"])
            assert node.refusals[-1] is refused.value
            assert refused.value.code != "internal"
        await custody.close()

    serve(rig, scenario)
