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

from collections.abc import Awaitable, Callable

from custos.plugin import AgentCatalog, NodeAttestationResult, ServerCatalog


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


__all__ = ["attest_in_process", "no_challenge"]
