"""The rig of the node-attestor server tests: a real server configured with one
attestor's tables, and an agent attesting to it over the Agent API through the real
client library.

Why this module: the server tests of ``aws_iid``, ``gcp_iit``, ``azure_msi``,
``k8s_psat`` and ``tpm`` each carried their own copy of the same scaffolding: a
``ServerRig`` made and destroyed around the test, a memory key store for the agent's
keys, and an ``attest`` that loads an agent catalog with the attestor, opens a channel
to the server's Agent API trusting its bundle, and calls ``attest_agent``. Only the
server's sections and the agent attestor's settings differ; those are the arguments.
The fake metadata / JWKS / API servers stay in each test: they are what differs.

Import the fixture by name (``from common.server_attestor_rig import keys``): pytest
finds it in the test module's namespace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from custos.agent.client.attest import AgentIdentity, attest_agent
from custos.agent.client.channel import open_channel
from custos.keys import KeyStore, KeyStoreConfig, open_key_store
from custos.plugin import AgentCatalog, PluginConfig
from custos.server.app import Server
from custos.testing.server import TRUST_DOMAIN, ServerRig

#: The rig's trust domain (``ServerRig``'s default): agents' SPIFFE IDs are under it.
TD = TRUST_DOMAIN


@contextmanager
def server_rig(sections: Mapping[str, Mapping[str, object]]) -> Iterator[ServerRig]:
    """A server's configuration and files with ``sections`` added (the attestor's
    tables), removed afterwards whatever the test's outcome."""
    rig = ServerRig.create(sections=sections)
    try:
        yield rig
    finally:
        rig.destroy()


@contextmanager
def memory_keys() -> Iterator[KeyStore]:
    """A memory key store for agents' keys, closed afterwards."""
    store = open_key_store(KeyStoreConfig(store="memory"))
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def keys() -> Iterator[KeyStore]:
    """One memory key store for the test's agents (a key a name: see :func:`attest`)."""
    with memory_keys() as store:
        yield store


async def attest(
    srv: Server, attestor: PluginConfig, keys: KeyStore | None = None, key_name: str = "agent"
) -> AgentIdentity:
    """Attest an agent to ``srv`` with the node attestor ``attestor`` (and the
    ``example`` workload attestor) and a new ES256 key ``key_name`` made in ``keys`` —
    or, when ``keys`` is None, in a memory store of this call's own, closed after it."""
    if keys is None:
        with memory_keys() as own:
            return await attest(srv, attestor, own, key_name)
    keys.create(key_name, "ES256")
    with AgentCatalog.load(
        TD, node_attestors=[attestor], workload_attestors=[PluginConfig("example")]
    ) as catalog:
        async with open_channel(
            srv.agent_api_address,
            bundle=srv.ctx.bundle(),
            server_name=srv.ctx.config.agent_api.dns_name,
        ) as channel:
            return await attest_agent(
                channel, attestor=catalog.node_attestor, key=keys.get(key_name), custody="memory"
            )


__all__ = ["TD", "attest", "keys", "memory_keys", "server_rig"]
