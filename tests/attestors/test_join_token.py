"""The join_token node attestor pair, loaded by name through the real catalogs and
entry points, against a real datastore (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.node_attestor_rig import attest_in_process, no_challenge
from custos.errors import CustosError
from custos.plugin import (
    AgentCatalog,
    AttestationExchangeError,
    NodeAttestationResult,
    PluginConfig,
    ServerCatalog,
)
from custos.plugin.errors import PluginCallError
from custos.server.datastore import Datastore

TD = "example.org"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Datastore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'datastore.db'}"
    else:
        url = request.getfixturevalue("postgres_db")
    with Datastore.open(url, trust_domain=TD) as ds:
        yield ds


@pytest.fixture
def server(store: Datastore) -> Iterator[ServerCatalog]:
    with ServerCatalog.load(
        TD, node_attestors=[PluginConfig("join_token", {"datastore": store})]
    ) as catalog:
        yield catalog


_challenge = no_challenge("join_token")


async def attest(server: ServerCatalog, secret: str) -> NodeAttestationResult:
    """The agent half (loaded by its catalog) talking to the server half."""
    with AgentCatalog.load(
        TD,
        node_attestors=[PluginConfig("join_token", {"token": secret})],
        workload_attestors=[PluginConfig("example")],
    ) as agent:
        return await attest_in_process(server, "join_token", agent)


def refusal(server: ServerCatalog, secret: str) -> PluginCallError:
    with pytest.raises(PluginCallError) as info:
        asyncio.run(attest(server, secret))
    assert secret not in str(info.value)
    assert secret not in repr(info.value.__cause__)
    return info.value


def test_a_token_attests_an_agent_named_after_its_id(
    server: ServerCatalog, store: Datastore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token, secret = store.join_tokens.create(600)
    result = asyncio.run(attest(server, secret))
    assert str(result.agent_id) == f"spiffe://{TD}/custos/agent/join_token/{token.id}"
    assert result.plugin == "join_token"
    assert result.selectors == ()
    assert result.can_reattest is False
    assert store.join_tokens.get(token.id).consumed_at is not None
    assert secret not in str(result)
    assert secret not in caplog.text


def test_the_same_token_twice_is_refused_the_second_time(
    server: ServerCatalog, store: Datastore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, secret = store.join_tokens.create(600)
    asyncio.run(attest(server, secret))
    error = refusal(server, secret)
    assert isinstance(error.__cause__, CustosError)
    assert error.__cause__.code == "join_token_used"
    assert secret not in caplog.text


def test_two_concurrent_attestations_with_one_token_exactly_one_wins(
    server: ServerCatalog, store: Datastore
) -> None:
    _, secret = store.join_tokens.create(600)

    async def both() -> list[NodeAttestationResult | BaseException]:
        return await asyncio.gather(
            attest(server, secret), attest(server, secret), return_exceptions=True
        )

    outcomes = asyncio.run(both())
    won = [o for o in outcomes if isinstance(o, NodeAttestationResult)]
    lost = [o for o in outcomes if isinstance(o, PluginCallError)]
    assert len(won) == 1 and len(lost) == 1
    assert isinstance(lost[0].__cause__, CustosError)
    assert lost[0].__cause__.code == "join_token_used"


def test_an_expired_token_is_refused(server: ServerCatalog, store: Datastore) -> None:
    _, secret = store.join_tokens.create(60, now=time.time() - 3600)
    error = refusal(server, secret)
    assert isinstance(error.__cause__, CustosError)
    assert error.__cause__.code == "join_token_expired"


def test_an_unknown_token_is_refused(server: ServerCatalog) -> None:
    secret = "never-issued-" + "x" * 30
    error = refusal(server, secret)
    assert isinstance(error.__cause__, CustosError)
    assert error.__cause__.code == "join_token_unknown"


def test_a_banned_agents_token_is_refused(server: ServerCatalog, store: Datastore) -> None:
    token, secret = store.join_tokens.create(600)
    agent_id = f"spiffe://{TD}/custos/agent/join_token/{token.id}"
    store.agents.attested(
        agent_id, attestor="join_token", selectors=(), serial="1", expires_at=time.time() + 600
    )
    store.agents.ban(agent_id)
    error = refusal(server, secret)
    assert isinstance(error.__cause__, CustosError)
    assert error.__cause__.code == "agent_banned"


def test_the_server_half_needs_a_datastore() -> None:
    with pytest.raises(PluginCallError, match="Datastore"):
        ServerCatalog.load(TD, node_attestors=[PluginConfig("join_token", {"datastore": "x"})])


def test_the_agent_half_refuses_a_missing_or_odd_token() -> None:
    for config in ({}, {"token": ""}, {"token": 42}, {"token": "a\nb"}, {"token": "t", "x": 1}):
        with pytest.raises(PluginCallError):
            AgentCatalog.load(
                TD,
                node_attestors=[PluginConfig("join_token", config)],
                workload_attestors=[PluginConfig("example")],
            )


def _server_only(store: Datastore, payload: bytes) -> None:
    with ServerCatalog.load(
        TD, node_attestors=[PluginConfig("join_token", {"datastore": store})]
    ) as catalog:
        asyncio.run(catalog.attest_node("join_token", payload, _challenge))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Datastore]:
    with Datastore.open(f"sqlite:///{tmp_path / 'fuzz.db'}", trust_domain=TD) as ds:
        yield ds


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        st.binary(max_size=2048),
        st.text(max_size=300).map(str.encode),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=40),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda v, t: json.dumps({"v": v, "token": t}).encode(),
            st.one_of(st.integers(), st.booleans(), st.text(max_size=4)),
            st.one_of(st.none(), st.integers(), st.text(max_size=300)),
        ),
    )
)
def test_malformed_evidence_is_a_clean_custos_error(
    sqlite_store: Datastore, payload: bytes
) -> None:
    with pytest.raises(CustosError):
        _server_only(sqlite_store, payload)


def test_oversized_evidence_is_refused_without_echoing_it(sqlite_store: Datastore) -> None:
    token, secret = sqlite_store.join_tokens.create(600)
    for payload, error in (
        (b'{"v":1,"token":"' + secret.encode() + b'"}' + b" " * 2000, PluginCallError),
        (secret.encode() * 2000, AttestationExchangeError),
    ):
        with pytest.raises(error) as info:
            _server_only(sqlite_store, payload)
        assert secret not in str(info.value)
        assert secret not in repr(info.value.__cause__)
    # Neither refusal spent the token.
    assert sqlite_store.join_tokens.get(token.id).consumed_at is None
