"""A TPM node attestation's writes through a real server and swtpm (decision 0108): the
`tpm` attestor's clock row is written in the attestation's one unit of work with the
credentials' audit rows, the signing keys' bookkeeping, the agent row and the
attestation's audit row. An attestation refused after its quote was checked (here by
the PCR policy) writes its refusal audit line and nothing else: no clock row."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from tpm2_pytss.constants import ESYS_TR

from common.server_attestor_rig import attest, server_rig
from custos.agent.client.errors import AgentApiError
from custos.plugin import PluginConfig
from custos.testing.server import running_server
from custos.testing.swtpm import SwtpmInstance
from custos.tpm import verify
from custos.tpm.context import shared_context


def _ek_hash(tpm: SwtpmInstance) -> str:
    der = next(p for p in tpm.state.ek_certs if "rsa2048" in p.name).read_bytes()
    return verify.spki_sha256(x509.load_der_x509_certificate(der).public_key())


def _pcr(tpm: SwtpmInstance, index: int) -> bytes:
    with shared_context(tpm.tcti) as ctx:
        _, _, digests = ctx.device(lambda ectx: ectx.pcr_read(f"sha256:{index}"))
    return bytes(digests.digests[0])


def _extend(tpm: SwtpmInstance, index: int, data: bytes) -> None:
    with shared_context(tpm.tcti) as ctx:
        ctx.device(lambda ectx: ectx.pcr_event(ESYS_TR.PCR0 + index, data))


def test_a_tpm_attestation_refused_after_its_quote_writes_no_clock_row(
    swtpm_factory: Callable[..., SwtpmInstance],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tpm = swtpm_factory()  # PCR 7 is extended below: a TPM of this test's own
    ek_hash = _ek_hash(tpm)
    attestor = {"ek_ca_bundle": [str(p) for p in tpm.state.ek_ca_certs], "pcrs": "sha256:0,7"}
    policy = (  # as an operator writes it: an array of tables under the attestor's
        "[[node_attestors.tpm.pcr_policy]]\n"
        'name = "rack-4"\n'
        f'match = ["tpm:ek_pubhash:{ek_hash}"]\n'
        "[node_attestors.tpm.pcr_policy.pcrs]\n"
        f'"sha256:7" = ["{_pcr(tpm, 7).hex()}"]\n'
    )
    agent = PluginConfig("tpm", {"tcti": tpm.tcti, "ak_file": str(tmp_path / "ak.pem")})
    caplog.set_level(logging.INFO, logger="custos.audit")

    async def scenario() -> None:
        with server_rig({"node_attestors.tpm": attestor}) as rig:
            with rig.config_path.open("a", encoding="utf-8") as f:
                f.write(policy)
            async with running_server(rig) as srv:
                store = srv.ctx.datastore
                first = await attest(srv, agent)
                again = await attest(srv, agent, key_name="again")  # re-attests: a quote
                node = store.tpm_nodes.get(ek_hash)
                assert node is not None and node.updated_at > 0
                rows = store.audit.since(0)
                # Each attestation: its attestation row and its X.509-SVID and WIT rows.
                assert (
                    sorted(r.event for r in rows)
                    == ["attestation"] * 2 + ["wit"] * 2 + ["x509-svid"] * 2
                )
                assert again.spiffe_id == first.spiffe_id
                agent_row = store.agents.get(first.spiffe_id)

                _extend(tpm, 7, b"a bootloader nobody approved")
                with pytest.raises(AgentApiError) as info:
                    await attest(srv, agent, key_name="refused")
                assert info.value.code == "pcr_policy"
                # Its quote was later than the stored one and passed the clock check;
                # the policy refused it afterwards: nothing of it was written.
                assert store.tpm_nodes.get(ek_hash) == node
                assert store.audit.since(0) == rows
                assert store.agents.get(first.spiffe_id) == agent_row

    asyncio.run(scenario())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "custos.audit"]
    refusals = [line for line in lines if line.get("outcome") == "refused"]
    assert [(x["event"], x["attestor"], x["code"]) for x in refusals] == [
        ("attestation", "tpm", "pcr_policy")
    ]
