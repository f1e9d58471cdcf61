"""Rotation and faults of workload credentials: a fresh key per rotation, old keys
deleted only after their credentials expired, the server down past half the TTL,
an agent restart served from its data directory, and ``kill -9`` mid-rotation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_workloads import check_credentials, tier_config
from test_workloads_rig import (
    Clock,
    RecordingMemoryStore,
    RigNode,
    bounded,
    by_entry,
    entry,
    until,
)

from custos.agent.custody import Custody
from custos.agent.identities import WorkloadIdentity
from custos.agent.workloads import WorkloadManager, key_name, parse_key_name
from custos.bundle import TrustBundle
from custos.keys import ExportableKeyStore, KeyStoreConfig
from custos.server.admin.client import AdminClient
from custos.testing.server import (
    ServerProcess,
    ServerRig,
    join_token_agent,
    running_server,
    server_agent,
)

NO_POLL = {"events": {"poll_interval": "1h"}}
HERE = Path(__file__).parent


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    rig = ServerRig.create(sections=NO_POLL)
    yield rig
    rig.destroy()


@pytest.mark.parametrize("tier", ["memory", "tpm"])
def test_each_rotation_makes_a_new_key_and_old_keys_go_after_expiry(
    rig: ServerRig, tier: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Short real TTLs (4 s): three rotations, each a new key shared by both credentials."""
    store = RecordingMemoryStore(time.time)
    custody = (
        Custody({"memory": store})
        if tier == "memory"
        else Custody.open({tier: tier_config(tier, tmp_path, request)})
    )

    async def main() -> None:
        async with running_server(rig) as srv, await server_agent(srv) as agent:
            async with AdminClient(srv.admin_socket) as admin:
                made = await admin.create_entry(
                    entry(
                        "/short",
                        str(agent.identity.spiffe_id),
                        x509_svid_ttl=4,
                        wit_ttl=4,
                        key_custody=tier,
                    )
                )
            manager = WorkloadManager(node=RigNode(agent), custody=custody, data_dir=tmp_path)
            seen: list[WorkloadIdentity] = []
            async with manager:
                generation = manager.identities.generation
                while len(seen) < 4:
                    generation = await bounded(manager.identities.wait_changed(generation))
                    current = by_entry(manager.identities.all(), made.id)
                    if current is not None and (not seen or current.key is not seen[-1].key):
                        check_credentials(current, agent, "spiffe://example.org/short")
                        seen.append(current)
                # a new key each time (a slow machine may skip a number: never reused)
                parsed = [parse_key_name(i.key.name) for i in seen]
                generations = [p[1] for p in parsed if p is not None and p[0] == made.id]
                assert generations == sorted(set(generations)) and len(generations) == 4
                assert generations[0] == 1
                old = [i.key.name for i in seen[:2]]
                tier_store = custody.store_for(tier)
                await until(lambda: not {k.name for k in tier_store.list()} & set(old))
        await custody.close()
        if tier == "memory":
            for identity in seen[:2]:
                # deleted, and not before its credentials expired
                assert store.deleted[identity.key.name] >= identity.not_after

    asyncio.run(main())


def test_rotation_at_half_life_with_jitter_on_the_injected_clock(
    rig: ServerRig, tmp_path: Path
) -> None:
    clock = Clock()
    store = RecordingMemoryStore(clock)
    custody = Custody({"memory": store})

    async def main() -> None:
        async with running_server(rig) as srv, await server_agent(srv) as agent:
            parent = str(agent.identity.spiffe_id)
            manager = WorkloadManager(
                node=RigNode(agent), custody=custody, data_dir=tmp_path, now=clock, jitter=0.1
            )
            async with manager, AdminClient(srv.admin_socket) as admin:
                made = await admin.create_entry(entry("/r", parent, x509_svid_ttl=600, wit_ttl=600))
                first = await until(lambda: by_entry(manager.identities.all(), made.id))
                life = first.not_after - clock()
                # 44 % of the life: before the earliest jittered rotation (45 %)
                clock.offset = 0.44 * life
                manager.wake()
                # a barrier: a second entry served means a step ran after the clock moved
                other = await admin.create_entry(entry("/barrier", parent, "unix:uid:9"))
                await until(lambda: by_entry(manager.identities.all(), other.id))
                assert by_entry(manager.identities.all(), made.id) is first
                # 56 %: after the latest one
                clock.offset = 0.56 * life
                manager.wake()
                second = await until(
                    lambda: (i := by_entry(manager.identities.all(), made.id)) is not first and i
                )
                assert second.key.name == key_name(made.id, 2)
                assert first.key.name not in store.deleted  # its credentials are still valid
        await custody.close()

    asyncio.run(main())


def test_server_down_serves_cached_credentials_until_they_expire(
    rig: ServerRig, tmp_path: Path
) -> None:
    clock = Clock()
    custody = Custody({"memory": RecordingMemoryStore(clock)})

    async def main() -> None:
        stack = contextlib.AsyncExitStack()
        srv = await stack.enter_async_context(running_server(rig))
        agent = await server_agent(srv)
        async with AdminClient(srv.admin_socket) as admin:
            made = await admin.create_entry(
                entry("/down", str(agent.identity.spiffe_id), x509_svid_ttl=600, wit_ttl=600)
            )
        node = RigNode(agent)
        manager = WorkloadManager(node=node, custody=custody, data_dir=tmp_path, now=clock)
        async with manager:
            first = await until(lambda: by_entry(manager.identities.all(), made.id))
            await stack.aclose()  # the server goes away
            clock.offset = 0.6 * (first.not_after - time.time())
            manager.wake()
            await until(lambda: any(e.retryable for e in node.refusals), manager.wake)
            # past half the TTL, rotation failing: the cached credentials are served
            assert by_entry(manager.identities.all(), made.id) is first
            clock.offset = first.not_after - time.time() + 1.0
            manager.wake()
            assert by_entry(manager.identities.all(), made.id) is None
            # the step that saw the expiry dropped the file too
            state = tmp_path / "workloads" / f"{made.id}.json"
            await until(lambda: not state.exists(), manager.wake)
            # the server is back: the stream reconnects and new credentials come
            clock.offset = 0.0
            async with running_server(rig):
                again = await until(lambda: by_entry(manager.identities.all(), made.id))
                # a fresh key (failed attempts used up generation numbers: never reused)
                entry_id, generation = parse_key_name(again.key.name) or ("", 0)
                assert (entry_id, generation > 1) == (made.id, True)
                check_credentials(again, agent, "spiffe://example.org/down")
        await agent.close()
        await custody.close()

    asyncio.run(main())


@pytest.mark.parametrize("tier", ["exportable", "tpm"])
def test_a_restarted_agent_serves_from_its_data_dir_without_the_server(
    rig: ServerRig, tier: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    configs = {tier: tier_config(tier, tmp_path, request), "memory": KeyStoreConfig(store="memory")}
    data_dir = tmp_path / "data"

    async def main() -> None:
        stack = contextlib.AsyncExitStack()
        srv = await stack.enter_async_context(running_server(rig))
        agent = await server_agent(srv)
        parent = str(agent.identity.spiffe_id)
        async with AdminClient(srv.admin_socket) as admin:
            kept = await admin.create_entry(entry("/kept", parent, key_custody=tier))
            lost = await admin.create_entry(entry("/lost", parent, "unix:uid:2"))
        custody = Custody.open(configs)
        async with WorkloadManager(node=RigNode(agent), custody=custody, data_dir=data_dir) as m:
            before = await until(lambda: len(m.identities.all()) == 2 and m.identities.all())
        await custody.close()
        await stack.aclose()  # no server from here on

        custody = Custody.open(configs)
        async with WorkloadManager(node=RigNode(agent), custody=custody, data_dir=data_dir) as m:
            # served at start, before (without) any answer from the server
            [restored] = m.identities.all()
            assert restored.entry_id == kept.id
            assert restored.key.name == by_entry(before, kept.id).key.name  # type: ignore[union-attr]
            assert restored.wit == by_entry(before, kept.id).wit  # type: ignore[union-attr]
            check_credentials(restored, agent, "spiffe://example.org/kept")
            # the memory tier's key died with the process: its credentials are dropped
            assert not (data_dir / "workloads" / f"{lost.id}.json").exists()
        await custody.close()
        await agent.close()

    asyncio.run(main())


# ---- kill -9 mid-rotation --------------------------------------------------------------

#: The agent's workload side in a child process: attests with a join token, serves the
#: entry, and on SIGUSR1 moves its clock past the rotation time (the test's driver, not
#: a seam in the code under test).
CHILD = """
import asyncio, signal, sys, time
from pathlib import Path
from custos.agent.custody import Custody
from custos.agent.workloads import WorkloadManager
from custos.bundle import TrustBundle
from custos.keys import KeyStoreConfig
from custos.testing.server import join_token_agent
from test_workloads_rig import Clock, RigNode

address, bundle_json, secret, data_dir, key_dir = sys.argv[1:6]

async def main():
    bundle = TrustBundle.from_spiffe_json("example.org", bundle_json)
    agent = await join_token_agent(address, bundle, secret)
    clock = Clock()
    custody = Custody.open({"exportable": KeyStoreConfig(store="exportable", key_dir=key_dir)})
    manager = WorkloadManager(node=RigNode(agent), custody=custody, data_dir=Path(data_dir),
                              now=clock)
    def advance():
        clock.offset = 400.0
        manager.wake()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, advance)
    async with manager:
        await asyncio.Event().wait()

asyncio.run(main())
"""


def _wait_for(check: object, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 60.0
    while not check():  # type: ignore[operator]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_kill_9_between_key_creation_and_credentials_leaves_a_consistent_state(
    rig: ServerRig, tmp_path: Path
) -> None:
    data_dir, key_dir = tmp_path / "data", tmp_path / "keys"
    alias = "spiffe://example.org/node/crash"

    async def setup() -> tuple[str, str, str, str]:
        async with AdminClient(rig.admin_socket) as admin:
            token = await admin.generate_token(ttl=600, spiffe_id=alias)
            again = await admin.generate_token(ttl=600, spiffe_id=alias)
            made = await admin.create_entry(
                entry("/crash", alias, x509_svid_ttl=600, wit_ttl=600, key_custody="exportable")
            )
            bundle = await admin.get_bundle()
        return token.token, again.token, made.id, bundle.spiffe_bundle

    with ServerProcess(rig) as server:
        secret, second_secret, entry_id, bundle_json = asyncio.run(setup())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                rig.agent_api_address,
                bundle_json,
                secret,
                str(data_dir),
                str(key_dir),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        state = data_dir / "workloads" / f"{entry_id}.json"
        new_key = key_dir / f"{key_name(entry_id, 2)}.pem"
        try:
            _wait_for(state.exists, "the first credentials", child)
            # The server stops answering: the rotation creates its key, then waits.
            os.kill(server.pid, signal.SIGSTOP)
            try:
                child.send_signal(signal.SIGUSR1)
                _wait_for(new_key.exists, "the rotation's new key", child)
                child.kill()
                child.wait(30)
            finally:
                os.kill(server.pid, signal.SIGCONT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(30)
        assert json.loads(state.read_text())["generation"] == 1
        assert new_key.exists()  # what the kill left: a key no credential file names

        async def restart() -> None:
            bundle = TrustBundle.from_spiffe_json("example.org", bundle_json)
            agent = await join_token_agent(rig.agent_api_address, bundle, second_secret)
            clock = Clock()
            custody = Custody.open(
                {"exportable": KeyStoreConfig(store="exportable", key_dir=key_dir)}
            )
            manager = WorkloadManager(
                node=RigNode(agent), custody=custody, data_dir=data_dir, now=clock
            )
            async with manager:
                [served] = manager.identities.all()
                assert served.key.name == key_name(entry_id, 1)
                check_credentials(served, agent, "spiffe://example.org/crash")
                assert not new_key.exists()  # the orphan is gone
                store = custody.store_for("exportable")
                assert [k.name for k in store.list()] == [key_name(entry_id, 1)]
                # the next rotation never reuses the orphan's generation
                clock.offset = 400.0
                manager.wake()
                rotated = await until(
                    lambda: (i := by_entry(manager.identities.all(), entry_id)) is not served and i
                )
                assert rotated.key.name == key_name(entry_id, 3)
                check_credentials(rotated, agent, "spiffe://example.org/crash")
            await custody.close()
            await agent.close()
            # the file names the key the store holds
            assert json.loads(state.read_text())["key_name"] == key_name(entry_id, 3)
            assert isinstance(ExportableKeyStore(key_dir).info(key_name(entry_id, 3)).name, str)

        asyncio.run(restart())


def test_a_node_without_identity_makes_no_keys_and_keeps_serving(
    rig: ServerRig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = RecordingMemoryStore(clock)
    custody = Custody({"memory": store})

    async def main() -> None:
        async with running_server(rig) as srv, await server_agent(srv) as agent:
            node = RigNode(agent)
            manager = WorkloadManager(node=node, custody=custody, data_dir=tmp_path, now=clock)
            async with manager, AdminClient(srv.admin_socket) as admin:
                made = await admin.create_entry(
                    entry("/n", str(agent.identity.spiffe_id), x509_svid_ttl=600, wit_ttl=600)
                )
                first = await until(lambda: by_entry(manager.identities.all(), made.id))
                node.lost = True
                clock.offset = 0.6 * (first.not_after - time.time())
                manager.wake()
                await until(lambda: "could not get workload credentials" in caplog.text)
                assert store.created == [first.key.name]  # no key made for nothing
                assert by_entry(manager.identities.all(), made.id) is first
                assert "step failed" not in caplog.text
        await custody.close()

    asyncio.run(main())
