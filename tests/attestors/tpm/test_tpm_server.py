"""The tpm attestor through a real server: its ``[node_attestors.tpm]`` table as an
operator writes it in server.toml (a PCR policy as an array of tables), the agent
attesting over the Agent API with the attestation client, and re-attestation at
renewal: a node whose PCRs leave the policy stops getting credentials (logged, counted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from tpm_attestor_rig import ek_hash_of, extend, read_pcr

from common.server_attestor_rig import TD, attest, server_rig
from custos.agent.client.attest import AgentIdentity
from custos.agent.client.errors import AgentApiError
from custos.plugin import PluginConfig
from custos.server.app import Server
from custos.testing.server import ServerRig, running_server
from custos.testing.swtpm import SwtpmInstance


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


async def _attest(srv: Server, tpm: SwtpmInstance, ak_file: Path) -> AgentIdentity:
    """An agent of its own key store, attested with ``tpm`` (its AK kept in ``ak_file``)."""
    return await attest(srv, PluginConfig("tpm", {"tcti": tpm.tcti, "ak_file": str(ak_file)}))


def test_a_node_leaving_the_pcr_policy_stops_getting_credentials_at_renewal(
    swtpm_factory: Callable[..., SwtpmInstance],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tpm = swtpm_factory()  # PCRs are extended: a TPM of this test's own
    ek_hash = ek_hash_of(tpm)
    pcr7 = read_pcr(tpm, "sha256", 7).hex()
    attestor = {
        "ek_ca_bundle": [str(p) for p in tpm.state.ek_ca_certs],
        "pcrs": "sha256:0,7",
    }
    # The policy as an operator writes it: an array of tables under the attestor's.
    policy = (
        "[[node_attestors.tpm.pcr_policy]]\n"
        'name = "rack-4"\n'
        f"match = {_toml_list([f'tpm:ek_pubhash:{ek_hash}'])}\n"
        "[node_attestors.tpm.pcr_policy.pcrs]\n"
        f'"sha256:7" = {_toml_list([pcr7])}\n'
    )
    caplog.set_level(logging.WARNING)

    async def scenario(rig: ServerRig) -> tuple[AgentIdentity, AgentApiError, float]:
        async with running_server(rig) as srv:
            first = await _attest(srv, tpm, tmp_path / "ak.pem")
            extend(tpm, 7, b"a bootloader nobody approved")
            with pytest.raises(AgentApiError) as info:
                await _attest(srv, tpm, tmp_path / "ak.pem")
            refused = srv.ctx.metrics.registry.get_sample_value(
                "custos_server_attestations_total", {"attestor": "tpm", "outcome": "refused"}
            )
            return first, info.value, refused or 0.0

    with server_rig({"node_attestors.tpm": attestor}) as rig:
        with rig.config_path.open("a", encoding="utf-8") as f:
            f.write(policy)
        first, error, refused = asyncio.run(scenario(rig))
    assert str(first.spiffe_id) == f"spiffe://{TD}/custos/agent/tpm/{ek_hash}"
    assert first.reattestable is True
    values = {s.value for s in first.selectors if s.type == "tpm"}
    assert f"ek_pubhash:{ek_hash}" in values and f"pcr:sha256:7:{pcr7}" in values
    assert error.code == "pcr_policy"
    assert refused == 1.0
    assert "outside the PCR policy" in caplog.text
