"""The rig of the node attestors' in-process tests: the agent half and the server half,
each loaded by its catalog, talking to each other in this process (no server, no gRPC;
for that, see :mod:`common.server_attestor_rig`).

Why this module: the tests of ``join_token``, ``azure_msi`` and ``k8s_psat`` each
carried their own copy of the same exchange (the agent half's message handed to the
server half, its one result kept) and of the challenge callback of an attestor that
must not challenge. Only the attestor's name and catalogs differ; those are the
arguments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hypothesis import strategies as st

from custos.errors import CustosError
from custos.plugin import AgentCatalog, NodeAttestationResult, ServerCatalog
from custos.plugin.errors import PluginCallError


def no_challenge(name: str) -> Callable[[bytes], Awaitable[bytes]]:
    """The challenge callback for ``name``, an attestor that must not challenge: it
    fails the test if called."""

    async def challenge(data: bytes) -> bytes:
        raise AssertionError(f"{name} must not challenge")

    return challenge


async def attest_in_process(
    server: ServerCatalog, name: str, agent: AgentCatalog
) -> NodeAttestationResult:
    """``agent``'s node attestor talking to ``server``'s ``name`` half (which must not
    challenge); the one result of the attestation."""
    challenge = no_challenge(name)
    results: list[NodeAttestationResult] = []

    async def exchange(message: bytes) -> bytes | None:
        results.append(await server.attest_node(name, message, challenge))
        return None

    await agent.node_attestor.attest(exchange)
    [result] = results
    return result


def attest_flipped(
    server: ServerCatalog, name: str, payload: bytes, data: st.DataObject
) -> NodeAttestationResult | None:
    """``payload`` with one byte (drawn from ``data``) flipped by a drawn non-zero mask,
    sent to ``server``'s ``name`` half (which must not challenge): its result if it
    still attests, None if it is refused — cleanly, with a custos error as the cause
    (anything else fails the test)."""
    flipped = bytearray(payload)
    index = data.draw(st.integers(0, len(flipped) - 1))
    flipped[index] ^= data.draw(st.integers(1, 255))
    try:
        return asyncio.run(server.attest_node(name, bytes(flipped), no_challenge(name)))
    except PluginCallError as e:
        assert isinstance(e.__cause__, CustosError), repr(e.__cause__)
        return None


__all__ = ["attest_flipped", "attest_in_process", "no_challenge"]
