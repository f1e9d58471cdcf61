"""Issue 10 end to end (real swtpm provisioned by swtpm_localca, our server, our agent):
the agent attests with the ``tpm`` node attestor (EK certificate chained to the local
CA, AK activated against the EK, quote), its own key and a workload key are certified
by the AK, the server records both as TPM-resident ("proven"), and the workload signs a
WPT whose WIT binds that TPM key; a relying party verifies it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from custos._proto import types_v1_pb2
from custos.agent.app import Agent
from custos.agent.config import agent_config_from_toml
from custos.agent.residency import KeyResidency
from custos.client import WorkloadClient
from custos.dev import (
    TRUST_DOMAIN,
    _agent_toml,
    _DeviceSetup,
    dev_environment,
    wait_for_identities,
)
from custos.identity import SpiffeId
from custos.keys.jwk import public_jwk_members
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerRig, running_server
from custos.testing.swtpm import SwtpmInstance
from custos.tpm.context import shared_context
from custos.tpm.ek import ek_public_key
from custos.tpm.verify import parse_public, spki_sha256, verify_certify
from custos.wimse.http.message import HttpMessage
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.wit import WitVerifier
from custos.wimse.wpt import WptVerifier, wpt_headers

BOUND = 60.0
ORIGIN = "https://pay.example"
STRICT = f"spiffe://{TRUST_DOMAIN}/dev/tpm-strict"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="custos-te-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    decoded: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined,no-any-return]


def test_tpm_attested_agent_serves_a_wpt_signed_by_a_proven_tpm_resident_key(
    short_dir: Path,
) -> None:
    async def main() -> None:
        async with dev_environment(short_dir / "d", device="tpm") as env:
            agent, datastore = env.agent, env.server.ctx.datastore
            assert env.attestor == "tpm"
            tcti = agent.config.key_stores()["tpm"].tcti  # type: ignore[attr-defined]

            # The agent ID is the SHA-256 of the EK's SubjectPublicKeyInfo (RSA EK).
            with shared_context(tcti) as ctx:
                ek_hash = spki_sha256(ctx.device(lambda ectx: ek_public_key(ectx, "rsa2048")))
            agent_id = agent.node.identity.spiffe_id
            assert agent_id == SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/custos/agent/tpm/{ek_hash}")
            selectors = {str(s) for s in agent.node.identity.selectors}
            assert f"tpm:ek_pubhash:{ek_hash}" in selectors
            assert "tpm:ek_issuer:swtpm-localca" in selectors
            assert any(s.startswith("tpm:pcr:sha256:0:") for s in selectors)

            # An entry that requires proven residency is served too.
            async with AdminClient(env.admin_socket) as admin:
                await admin.create_entry(
                    types_v1_pb2.Entry(
                        spiffe_id=STRICT,
                        parent_id=str(agent_id),
                        selectors=[f"unix:uid:{os.getuid()}"],
                        key_custody="tpm",
                        hint="tpm-strict",
                        require_residency=True,
                    )
                )
            await wait_for_identities(agent, {STRICT})
            served = next(i for i in agent.identities.all() if str(i.spiffe_id) == STRICT)
            assert served.custody == "tpm"

            async with asyncio.timeout(BOUND):
                async with WorkloadClient(f"unix://{env.socket_path}") as client:
                    wit, wpt = await client.sign_wpt(f"{ORIGIN}/pay", spiffe_id=STRICT)
            bundle = agent.identities.bundle()

            # The relying party: the WIT verifies and the WPT is signed by its cnf key ...
            verifier = WptVerifier(
                wit_verifier=WitVerifier(bundle, profile="spiffe"),
                audiences=[ORIGIN],
                replay=MemoryReplayCache(),
            )
            caller = verifier.verify(HttpMessage.request("POST", "/pay", wpt_headers(wit, wpt)))
            assert str(caller.subject) == STRICT
            cnf = claims(wit)["cnf"]
            assert isinstance(cnf, dict)
            # ... and that key is the TPM key the agent holds for the entry.
            members = public_jwk_members(served.key.public_key())
            assert {k: cnf["jwk"].get(k) for k in members} == members

            # The server recorded the workload key and the agent's key as TPM-resident.
            records = await asyncio.to_thread(datastore.audit.since, 0)
            strict = [r for r in records if r.identity == STRICT]
            assert {r.event for r in strict} >= {"x509-svid", "wit"}
            assert all((r.custody, r.residency) == ("tpm", "proven") for r in strict), strict
            attested = [r for r in records if r.event == "attestation"]
            assert attested and attested[-1].identity == str(agent_id)
            assert (attested[-1].custody, attested[-1].residency) == ("tpm", "proven")

            # Independently: the AK the server activated certifies that very key as
            # fixedTPM | fixedParent | sensitiveDataOrigin in this TPM.
            row = await asyncio.to_thread(datastore.agents.get, agent_id)
            ak_public = parse_public(row.attestation_key, what="the agent's AK")
            evidence = KeyResidency.of(agent.catalog.node_attestor).evidence(served.key, "tpm")
            assert evidence is not None
            verify_certify(
                ak_public,
                evidence.attest,
                evidence.signature,
                evidence.tpm_public,
                expected_key=served.key.public_key(),
            )

    asyncio.run(main())


def test_a_restarted_tpm_agent_attests_again_and_keeps_proving_residency(
    short_dir: Path,
) -> None:
    """A restored identity is not enough on a TPM node: the agent attests again at start
    (same EK, same AK from its ak_file: a quote, no new activation), so the server holds
    the AK this process certifies with, and new tpm keys are still proven resident."""

    async def main() -> None:
        async with dev_environment(short_dir / "d", device="tpm") as env:
            datastore = env.server.ctx.datastore
            config, agent_id = env.agent.config, env.agent.node.identity.spiffe_id
            first_key = env.agent.node.key_name
            await env.agent.stop()
            async with Agent(config) as again:
                assert again.node.identity.spiffe_id == agent_id
                assert again.node.key_name != first_key  # attested again with a new key
                async with AdminClient(env.admin_socket) as admin:
                    await admin.create_entry(
                        types_v1_pb2.Entry(
                            spiffe_id=STRICT,
                            parent_id=str(agent_id),
                            selectors=[f"unix:uid:{os.getuid()}"],
                            key_custody="tpm",
                            require_residency=True,
                        )
                    )
                await wait_for_identities(again, {STRICT})
            records = await asyncio.to_thread(datastore.audit.since, 0)
            attestations = [r for r in records if r.event == "attestation"]
            assert len(attestations) == 2
            assert all(r.identity == str(agent_id) for r in attestations)
            assert all(r.residency == "proven" for r in attestations)
            strict = [r for r in records if r.identity == STRICT]
            assert strict and all(r.residency == "proven" for r in strict)

    asyncio.run(main())


def test_a_join_token_agent_sends_no_evidence_its_tpm_keys_are_unproven(
    swtpm: SwtpmInstance, short_dir: Path
) -> None:
    """The other side of residency: a join-token agent with a tpm custody tier has no AK,
    so its tpm keys carry no certify statement. The server issues them with residency
    "unproven", and refuses an entry that requires proven residency (residency_unproven,
    which the agent logs for that entry and retries) while serving the others."""
    refusals: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "code", "") == "residency_unproven":
                refusals.append(record)

    handler = Catch()
    logging.getLogger("custos.agent.workloads").addHandler(handler)

    async def main() -> None:
        rig = ServerRig(short_dir / "server", trust_domain=TRUST_DOMAIN)
        async with running_server(rig) as srv, AdminClient(rig.admin_socket) as admin:
            _, token = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
            bundle_file = short_dir / "bundle.json"
            (await asyncio.to_thread(srv.ctx.bundle)).save(bundle_file)
            toml = _agent_toml(
                socket=short_dir / "agent.sock",
                data_dir=short_dir / "agent",
                address=srv.agent_api_address,
                bundle_file=bundle_file,
                token=token,
                device="tpm",
                setup=_DeviceSetup(custody_table=f'tcti = "{swtpm.tcti}"\n', detail="swtpm"),
            )
            config = agent_config_from_toml(toml, source="test")
            async with Agent(config) as agent:
                assert not agent.node.residency.certifies
                agent_id = str(agent.node.identity.spiffe_id)
                assert "/custos/agent/join_token/" in agent_id
                lax, strict = f"spiffe://{TRUST_DOMAIN}/lax", STRICT
                for spiffe_id, required in ((strict, True), (lax, False)):
                    await admin.create_entry(
                        types_v1_pb2.Entry(
                            spiffe_id=spiffe_id,
                            parent_id=agent_id,
                            selectors=[f"unix:uid:{os.getuid()}"],
                            key_custody="tpm",
                            require_residency=required,
                        )
                    )
                await wait_for_identities(agent, {lax})
                async with asyncio.timeout(BOUND):
                    while not refusals:
                        await asyncio.sleep(0.05)
                assert strict not in {str(i.spiffe_id) for i in agent.identities.all()}
            records = await asyncio.to_thread(srv.ctx.datastore.audit.since, 0)
            [attested] = [r for r in records if r.event == "attestation"]
            assert (attested.custody, attested.residency) == ("tpm", "unproven")
            issued = [r for r in records if r.identity == lax]
            assert issued and all((r.custody, r.residency) == ("tpm", "unproven") for r in issued)
            assert not [r for r in records if r.identity == strict]

    try:
        asyncio.run(main())
    finally:
        logging.getLogger("custos.agent.workloads").removeHandler(handler)
    assert STRICT in refusals[0].getMessage()
