"""gcp_iit through the real server (AttestAgent over gRPC, with its challenge): the
token is bound to the attestation's nonce, so the same instance re-attests; a token
from another project is refused with the attestor's code and a log line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status

from common import server_attestor_rig
from common.server_attestor_rig import TD, server_rig
from custos.agent.client.attest import AgentIdentity
from custos.agent.client.errors import AgentApiError
from custos.keys import KeyStore
from custos.plugin import PluginConfig
from custos.server.app import Server
from custos.testing.fake_gcp import INSTANCE_ID, PROJECT, FakeGceMetadata, GcpSigner
from custos.testing.server import ServerRig, running_server

keys = server_attestor_rig.keys  # the shared fixture


@pytest.fixture
def google() -> GcpSigner:
    return GcpSigner()


@pytest.fixture
def rig(google: GcpSigner, tmp_path: Path) -> Iterator[ServerRig]:
    jwks = tmp_path / "certs.json"
    jwks.write_text(json.dumps(google.jwks()))
    sections = {
        "jwks_file": str(jwks),
        "project_allowlist": [PROJECT],
        "audience": "custos-test",
    }
    with server_rig({"node_attestors.gcp_iit": sections}) as rig:
        yield rig


async def attest(srv: Server, keys: KeyStore, url: str, key_name: str) -> AgentIdentity:
    attestor = PluginConfig("gcp_iit", {"endpoint": url, "audience": "custos-test"})
    return await server_attestor_rig.attest(srv, attestor, keys, key_name)


def test_an_instance_attests_and_re_attests_with_fresh_tokens(
    rig: ServerRig, keys: KeyStore, google: GcpSigner
) -> None:
    async def scenario() -> None:
        with FakeGceMetadata(google) as metadata:
            async with running_server(rig) as srv:
                first = await attest(srv, keys, metadata.url, "a1")
                assert str(first.spiffe_id) == (
                    f"spiffe://{TD}/custos/agent/gcp_iit/{PROJECT}/{INSTANCE_ID}"
                )
                assert first.reattestable is True
                again = await attest(srv, keys, metadata.url, "a2")
                assert again.spiffe_id == first.spiffe_id
        assert len(set(metadata.audiences)) == 2
        assert all(a.startswith("custos-test/") for a in metadata.audiences)

    asyncio.run(scenario())


def test_another_project_is_permission_denied_and_logged(
    rig: ServerRig, keys: KeyStore, google: GcpSigner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    def other(claims: dict[str, Any]) -> dict[str, Any]:
        claims["google"]["compute_engine"]["project_id"] = "someone-else"
        return claims

    async def scenario() -> None:
        with FakeGceMetadata(google, claims=other) as metadata:
            async with running_server(rig) as srv:
                with pytest.raises(AgentApiError) as info:
                    await attest(srv, keys, metadata.url, "b1")
                assert info.value.code == "gcp_iit_project_not_allowed"
                assert info.value.status == Status.PERMISSION_DENIED

    asyncio.run(scenario())
    assert "node attestation with 'gcp_iit' refused" in caplog.text
