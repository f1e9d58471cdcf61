"""aws_iid through the real server (AttestAgent over gRPC): trust on first use per
instance — the same document attests once, is refused (and logged) until the agent is
evicted, then attests again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.const import Status

from common import server_attestor_rig
from common.server_attestor_rig import TD, server_rig
from custos.agent.client.attest import AgentIdentity
from custos.agent.client.errors import AgentApiError
from custos.keys import KeyStore
from custos.plugin import PluginConfig
from custos.server.app import Server
from custos.testing.fake_aws import AwsSigner, FakeImds
from custos.testing.server import ServerRig, running_server

keys = server_attestor_rig.keys  # the shared fixture
ACCOUNT = "123456789012"


@pytest.fixture
def aws() -> AwsSigner:
    return AwsSigner()


@pytest.fixture
def rig(aws: AwsSigner, tmp_path: Path) -> Iterator[ServerRig]:
    cert = tmp_path / "aws.pem"
    cert.write_bytes(aws.certificate_pem)
    sections = {"certificates": [str(cert)], "account_allowlist": [ACCOUNT]}
    with server_rig({"node_attestors.aws_iid": sections}) as rig:
        yield rig


async def attest(srv: Server, keys: KeyStore, imds_url: str, key_name: str) -> AgentIdentity:
    attestor = PluginConfig("aws_iid", {"endpoint": imds_url})
    return await server_attestor_rig.attest(srv, attestor, keys, key_name)


def test_the_same_document_attests_once_until_the_agent_is_evicted(
    rig: ServerRig, keys: KeyStore, aws: AwsSigner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        with FakeImds(*aws.signed()) as imds:
            async with running_server(rig) as srv:
                first = await attest(srv, keys, imds.url, "a1")
                assert str(first.spiffe_id) == (
                    f"spiffe://{TD}/custos/agent/aws_iid/{ACCOUNT}/us-west-2/i-1234567890abcdef0"
                )
                assert first.reattestable is False
                assert "aws_iid:instance:id:i-1234567890abcdef0" in {
                    str(s) for s in first.selectors
                }

                # The replay: the same (still valid) document, another key.
                with pytest.raises(AgentApiError) as info:
                    await attest(srv, keys, imds.url, "a2")
                assert info.value.code == "agent_already_attested"
                assert info.value.status == Status.PERMISSION_DENIED

                srv.ctx.datastore.agents.evict(first.spiffe_id)
                again = await attest(srv, keys, imds.url, "a3")
                assert again.spiffe_id == first.spiffe_id
                agent = srv.ctx.datastore.agents.get(first.spiffe_id)
                assert agent.attestor == "aws_iid" and not agent.evicted

    asyncio.run(scenario())


def test_a_refusal_is_a_status_with_the_attestors_code_and_a_log_line(
    rig: ServerRig, keys: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        with FakeImds(*AwsSigner().signed()) as imds:  # signed by a key nobody trusts
            async with running_server(rig) as srv:
                with pytest.raises(AgentApiError) as info:
                    await attest(srv, keys, imds.url, "b1")
                assert info.value.code == "aws_iid_signature_invalid"
                assert info.value.status == Status.PERMISSION_DENIED

    asyncio.run(scenario())
    assert "node attestation with 'aws_iid' refused" in caplog.text
    assert "not signed by a configured AWS certificate" in caplog.text
