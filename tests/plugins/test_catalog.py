"""The plugin catalog: constraints, load/configure/close, selector stamping, agent
IDs, error wrapping, and a full node attestation through both halves.

Plugins are real distributions on sys.path (see conftest.py), loaded through
entry points; the plugins themselves are test code, the catalog is not mocked.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from acme_source import AGENT_HALF, ENTRY_POINTS, PLUGINS
from plugin_site import install_dist

from custos.errors import CustosError
from custos.identity import SpiffeId
from custos.plugin import (
    AgentCatalog,
    AttestationExchangeError,
    DuplicatePluginError,
    NodeAttestationResult,
    PeerCredentials,
    PluginCallError,
    PluginConfig,
    PluginConfigError,
    PluginLoadError,
    PluginMisbehavedError,
    Selector,
    ServerCatalog,
)
from custos.plugin.catalog import (
    MAX_ATTESTATION_KEY_BYTES,
    MAX_ATTESTATION_MESSAGE_BYTES,
    MAX_CHALLENGES,
)

TD = "example.org"


@pytest.fixture
def acme(site: Path) -> Path:
    install_dist(
        site, "acme_plugins", ENTRY_POINTS, {"acme_plugins": PLUGINS, "acme_agent_half": AGENT_HALF}
    )
    return site


def events() -> list[tuple[str, str]]:
    return list(sys.modules["acme_plugins"].EVENTS)


@pytest.fixture
def me() -> Any:
    fd = os.pidfd_open(os.getpid())
    yield PeerCredentials(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), pidfd=fd)
    os.close(fd)


def agent(*workloads: PluginConfig, node: tuple[PluginConfig, ...] | None = None) -> AgentCatalog:
    nodes = node if node is not None else (PluginConfig("acme_node", {"tag": "node"}),)
    return AgentCatalog.load(TD, node_attestors=nodes, workload_attestors=workloads)


# -- constraints (checked before anything is imported) -------------------------------


@pytest.mark.parametrize(
    ("nodes", "workloads", "message"),
    [
        ((), (PluginConfig("acme_one"),), "exactly 1 agent node attestor, got 0"),
        (
            (PluginConfig("acme_node"), PluginConfig("acme_other")),
            (PluginConfig("acme_one"),),
            "exactly 1 agent node attestor, got 2",
        ),
        ((PluginConfig("acme_node"),), (), "at least 1 workload attestor, got 0"),
        (
            (PluginConfig("acme_node"),),
            (PluginConfig("acme_one"), PluginConfig("acme_one")),
            "'acme_one' is configured twice",
        ),
        ((PluginConfig("acme_node"),), (PluginConfig("Bad Name"),), "invalid plugin name"),
    ],
)
def test_agent_constraints(acme: Path, nodes: Any, workloads: Any, message: str) -> None:
    with pytest.raises(PluginConfigError, match=message):
        AgentCatalog.load(TD, node_attestors=nodes, workload_attestors=workloads)
    assert "acme_plugins" not in sys.modules


def test_server_needs_a_node_attestor_and_takes_several(acme: Path) -> None:
    with pytest.raises(PluginConfigError, match="at least 1 server node attestor, got 0"):
        ServerCatalog.load(TD, node_attestors=())
    with ServerCatalog.load(
        TD, node_attestors=[PluginConfig("acme_node"), PluginConfig("acme_other")]
    ) as server:
        assert sorted(server.node_attestors) == ["acme_node", "acme_other"]


def test_server_never_imports_the_agent_half(acme: Path) -> None:
    with ServerCatalog.load(TD, node_attestors=[PluginConfig("acme_node")]):
        pass
    assert "acme_plugins" in sys.modules
    assert "acme_agent_half" not in sys.modules


# -- lifecycle -------------------------------------------------------------------------


def test_a_failing_third_plugin_closes_the_first_two(acme: Path) -> None:
    with pytest.raises(
        PluginCallError, match=r"workload attestor 'acme_three' failed in configure"
    ):
        agent(
            PluginConfig("acme_one", {"tag": "one"}),
            PluginConfig("acme_two", {"tag": "two"}),
            PluginConfig("acme_three", {"tag": "three", "fail_configure": True}),
        )
    closed = [tag for event, tag in events() if event == "close"]
    # Reverse order; the failed one was constructed, so it is closed too.
    assert closed == ["three", "two", "one", "node"]


def test_a_plugin_that_is_not_an_attestor_is_refused_and_the_rest_closed(acme: Path) -> None:
    with pytest.raises(PluginLoadError, match=r"'broken'.*does not implement.*WorkloadAttestor"):
        agent(PluginConfig("acme_one", {"tag": "one"}), PluginConfig("broken"))
    assert [tag for event, tag in events() if event == "close"] == ["one", "node"]


def test_a_server_half_must_say_whether_it_can_reattest(acme: Path) -> None:
    with pytest.raises(PluginMisbehavedError, match="supports_reattestation must be a bool"):
        ServerCatalog.load(
            TD, node_attestors=[PluginConfig("acme_node", {"tag": "a"}), PluginConfig("acme_bad")]
        )
    # acme_bad was started (then refused before configure): it is closed too.
    assert [tag for event, tag in events() if event == "close"] == ["?", "a"]


def test_close_errors_are_raised_not_swallowed(acme: Path) -> None:
    catalog = agent(
        PluginConfig("acme_one", {"tag": "one", "fail_close": True}),
        PluginConfig("acme_two", {"tag": "two", "fail_close": True}),
    )
    with pytest.raises(PluginCallError, match="'acme_two' failed in close") as exc:
        catalog.close()
    assert isinstance(exc.value.__cause__, OSError)
    assert any("acme_one" in note for note in exc.value.__notes__)
    assert [tag for event, tag in events() if event == "close"] == ["two", "one", "node"]
    catalog.close()  # once only
    assert len([e for e in events() if e[0] == "close"]) == 3


def test_catalog_lists_name_kind_and_distribution(acme: Path) -> None:
    with agent(PluginConfig("acme_one")) as catalog:
        listed = [(p.name, p.kind, p.distribution) for p in catalog.plugins()]
    assert listed == [
        ("acme_node", "agent_node_attestor", "acme_plugins"),
        ("acme_one", "workload_attestor", "acme_plugins"),
    ]


def test_plugins_get_a_read_only_copy_of_their_config(acme: Path) -> None:
    settings: dict[str, object] = {"tag": "one"}
    with agent(PluginConfig("acme_one", settings)) as catalog:
        plugin: Any = catalog.workload_attestors[0].plugin
        settings["tag"] = "changed"
        assert plugin.config["tag"] == "one"
        assert str(plugin.core.trust_domain) == TD


# -- workload attestation ---------------------------------------------------------------


def test_selectors_are_stamped_with_the_plugin_name(acme: Path, me: PeerCredentials) -> None:
    with agent(
        PluginConfig("acme_one"), PluginConfig("evil", {"values": ["unix:uid:0"]})
    ) as catalog:
        got = asyncio.run(catalog.attest_workload(me))
    assert got == (Selector("acme_one", f"uid:{os.getuid()}"), Selector("evil", "unix:uid:0"))
    assert Selector("unix", "uid:0") not in got


def test_a_plugin_choosing_a_selector_type_is_refused(acme: Path, me: PeerCredentials) -> None:
    with agent(PluginConfig("evil", {"forge": True})) as catalog:
        with pytest.raises(PluginMisbehavedError, match=r"'evil'.*sets the type") as exc:
            asyncio.run(catalog.attest_workload(me))
    assert exc.value.plugin == "evil" and exc.value.code == "plugin_misbehaved"


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ("uid:1", "sequence of strings"),
        (["uid:1\n"], "control or format character"),
        (["\u202euid:0"], "control or format character"),
        ([""], "empty"),
        (["x" * 2000], "longer than"),
        ([f"n:{i}" for i in range(300)], "at most 256"),
    ],
)
def test_bad_selector_values_are_refused(
    acme: Path, me: PeerCredentials, values: object, reason: str
) -> None:
    with agent(PluginConfig("acme_one", {"values": values})) as catalog:
        with pytest.raises(PluginMisbehavedError, match=reason):
            asyncio.run(catalog.attest_workload(me))


def test_plugin_errors_are_wrapped_with_the_plugin_name(acme: Path, me: PeerCredentials) -> None:
    with agent(PluginConfig("acme_one"), PluginConfig("acme_two", {"raise": True})) as catalog:
        with pytest.raises(PluginCallError, match="'acme_two' failed in attest") as exc:
            asyncio.run(catalog.attest_workload(me))
    assert isinstance(exc.value.__cause__, ValueError)
    assert exc.value.plugin == "acme_two" and exc.value.kind == "workload_attestor"


# -- node attestation, both halves ----------------------------------------------------


def wire(
    server: ServerCatalog, name: str, results: list[NodeAttestationResult | CustosError]
) -> Callable[[bytes], Awaitable[bytes | None]]:
    """An in-process transport: the agent half's messages go to the server half."""
    answers: asyncio.Queue[bytes] = asyncio.Queue()
    challenges: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def challenge(data: bytes) -> bytes:
        await challenges.put(data)
        return await answers.get()

    async def run(payload: bytes) -> None:
        try:
            results.append(await server.attest_node(name, payload, challenge))
        except CustosError as e:  # handed to the test, which raises it
            results.append(e)
        finally:
            await challenges.put(None)

    started = False

    async def exchange(message: bytes) -> bytes | None:
        nonlocal started
        if not started:
            started = True
            asyncio.get_running_loop().create_task(run(message))
        else:
            await answers.put(message)
        return await challenges.get()

    return exchange


def attest_node(agent_config: dict[str, Any], server_config: dict[str, Any]) -> Any:
    async def go() -> NodeAttestationResult:
        results: list[NodeAttestationResult | CustosError] = []
        with (
            ServerCatalog.load(
                TD, node_attestors=[PluginConfig("acme_node", server_config)]
            ) as server,
            agent(
                PluginConfig("acme_one"), node=(PluginConfig("acme_node", agent_config),)
            ) as catalog,
        ):
            await catalog.node_attestor.attest(wire(server, "acme_node", results))
        if isinstance(results[0], CustosError):
            raise results[0]
        return results[0]

    return asyncio.run(go())


def test_node_attestation_through_both_halves(acme: Path) -> None:
    result = attest_node({"payload": "node-a"}, {"rounds": 2, "agent_path": ["rack-7", "node-a"]})
    assert result.agent_id == SpiffeId.parse(
        "spiffe://example.org/custos/agent/acme_node/rack-7/node-a"
    )
    assert result.selectors == (Selector("acme_node", "payload:node-a"),)
    assert result.can_reattest is True and result.plugin == "acme_node"
    assert result.attestation_key == b""


def test_the_attestation_key_is_carried_through(acme: Path) -> None:
    result = attest_node({}, {"attestation_key": b"\x00\x58tpm2b-public"})
    assert result.attestation_key == b"\x00\x58tpm2b-public"


@pytest.mark.parametrize("key", ["text", b"x" * (MAX_ATTESTATION_KEY_BYTES + 1), None])
def test_a_malformed_attestation_key_is_the_plugins_fault(acme: Path, key: object) -> None:
    with pytest.raises(PluginMisbehavedError, match="attestation_key must be bytes"):
        attest_node({}, {"attestation_key": key})


@pytest.mark.parametrize(
    "path",
    [[], [".."], ["a/b"], [""], ["sp ace"], "host-1", ["x"] * 9],
)
def test_agent_path_segments_are_validated(acme: Path, path: object) -> None:
    with pytest.raises(PluginMisbehavedError, match=r"agent path|agent_path"):
        attest_node({}, {"agent_path": path})


def test_a_plugin_cannot_challenge_forever(acme: Path) -> None:
    async def answer(data: bytes) -> bytes:
        return data[::-1]

    async def go() -> None:
        config = PluginConfig("acme_node", {"rounds": MAX_CHALLENGES + 5})
        with ServerCatalog.load(TD, node_attestors=[config]) as server:
            await server.attest_node("acme_node", b"p", answer)

    with pytest.raises(PluginMisbehavedError, match=f"more than {MAX_CHALLENGES} challenges"):
        asyncio.run(go())


def test_the_agent_half_refuses_endless_challenges(acme: Path) -> None:
    with pytest.raises(AttestationExchangeError, match="server sent more than"):
        attest_node({}, {"rounds": MAX_CHALLENGES + 5})


def test_hostile_payloads_and_answers_are_refused(acme: Path) -> None:
    async def no_answer(data: bytes) -> bytes:
        return b"x" * (MAX_ATTESTATION_MESSAGE_BYTES + 1)

    async def go() -> None:
        with ServerCatalog.load(TD, node_attestors=[PluginConfig("acme_node")]) as server:
            with pytest.raises(AttestationExchangeError, match="payload is empty"):
                await server.attest_node("acme_node", b"", no_answer)
            with pytest.raises(AttestationExchangeError, match="payload is"):
                await server.attest_node("acme_node", b"x" * (1 << 20), no_answer)
            with pytest.raises(AttestationExchangeError, match="answer is"):
                await server.attest_node("acme_node", b"p", no_answer)
            with pytest.raises(AttestationExchangeError, match="no server node attestor named"):
                await server.attest_node("tpm", b"p", no_answer)

    asyncio.run(go())


def test_two_entry_points_of_one_distribution_with_one_name_are_refused(acme: Path) -> None:
    install_dist(
        acme,
        "acme_twice",
        "[custos.workload_attestors]\ntwice = acme_twice:A\ntwice = acme_twice:B\n",
        {"acme_twice": "A = B = None\n"},
    )
    with pytest.raises(DuplicatePluginError, match="'twice' is registered twice"):
        agent(PluginConfig("twice"), node=(PluginConfig("acme_node"),))


def test_peer_credentials_are_checked() -> None:
    from custos.plugin import InvalidPeerCredentialsError

    for bad in ({"pid": 0}, {"uid": True}, {"gid": -1}, {"pidfd": 1 << 40}, {"pid": "1"}):
        fields: dict[str, Any] = {"pid": 1, "uid": 0, "gid": 0, "pidfd": 3, **bad}
        with pytest.raises(InvalidPeerCredentialsError):
            PeerCredentials(**fields)


def test_plugin_settings_never_show_in_repr() -> None:
    # settings may hold a secret (a join token): a logged PluginConfig must not show it
    config = PluginConfig("join_token", {"token": "s3cret-join-token"})
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
    assert config.config["token"] == "s3cret-join-token"
