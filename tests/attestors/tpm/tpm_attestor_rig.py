"""The rig of the tpm attestor tests: a swtpm, a datastore, the two plugin halves
loaded through their catalogs, and an exchange a test may tamper with."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from tpm2_pytss.constants import ESYS_TR

from custos.errors import CustosError
from custos.plugin import AgentCatalog, NodeAttestationResult, PluginConfig, ServerCatalog
from custos.plugin.errors import PluginCallError
from custos.server.datastore import Datastore
from custos.tpm import verify
from custos.tpm.context import shared_context

TD = "example.org"
Transform = Callable[[bytes], bytes]


def same(data: bytes) -> bytes:
    return data


# ---- rig -------------------------------------------------------------------------


@dataclass
class Rig:
    tpm: Any  # SwtpmInstance
    store: Datastore
    tmp: Path
    server_settings: dict[str, object] = field(default_factory=dict)
    agent_settings: dict[str, object] = field(default_factory=dict)
    payloads: list[bytes] = field(default_factory=list)
    challenges: list[bytes] = field(default_factory=list)
    answers: list[bytes] = field(default_factory=list)

    @property
    def ca_bundle(self) -> list[str]:
        return [str(p) for p in self.tpm.state.ek_ca_certs]

    def server(self, **settings: object) -> ServerCatalog:
        config = {"ek_ca_bundle": self.ca_bundle, **self.server_settings, **settings}
        return ServerCatalog.load(
            TD, node_attestors=[PluginConfig("tpm", {**config, "datastore": self.store})]
        )

    def agent(self, **settings: object) -> AgentCatalog:
        config = {"tcti": self.tpm.tcti, "ak_file": str(self.tmp / "ak.pem")}
        return AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("tpm", {**config, **self.agent_settings, **settings})],
            workload_attestors=[PluginConfig("example")],
        )

    async def exchange(
        self,
        server: ServerCatalog,
        agent: AgentCatalog,
        *,
        payload: Transform = same,
        challenge: Transform = same,
        answer: Transform = same,
        delay: float = 0.0,
    ) -> NodeAttestationResult:
        """One attestation, the agent half answering the server half, each message
        passed through the given transform on its way."""
        flow = agent.node_attestor.plugin.attestation_flow()

        async def respond(data: bytes) -> bytes:
            self.challenges.append(data)
            reply = await flow.asend(challenge(data))
            self.answers.append(reply)
            await asyncio.sleep(delay)
            return answer(reply)

        try:
            first = await anext(flow)
            self.payloads.append(first)
            return await server.attest_node("tpm", payload(first), respond)
        finally:
            await flow.aclose()

    def attest(self, **kwargs: Any) -> NodeAttestationResult:
        async def run() -> NodeAttestationResult:
            with self.server() as server, self.agent() as agent:
                return await self.exchange(server, agent, **kwargs)

        return asyncio.run(run())

    def refused(self, **kwargs: Any) -> CustosError:
        with pytest.raises(PluginCallError) as info:
            self.attest(**kwargs)
        cause = info.value.__cause__
        assert isinstance(cause, CustosError), info.value
        return cause


def rsa_ek_certificate(tpm: Any) -> x509.Certificate:
    """A swtpm instance's RSA EK certificate (as its CA issued it)."""
    return x509.load_der_x509_certificate(
        next(p for p in tpm.state.ek_certs if "rsa2048" in p.name).read_bytes()
    )


def ek_hash_of(rig: Rig | Any) -> str:
    """The EK hash of a rig's TPM (or of a swtpm instance), from its RSA EK certificate."""
    tpm = rig.tpm if isinstance(rig, Rig) else rig
    return verify.spki_sha256(rsa_ek_certificate(tpm).public_key())


def ek_certificate_for(
    tpm: Any, public_key: CertificatePublicKeyTypes, *, with_extensions: bool
) -> bytes:
    """A certificate (DER) the trusted swtpm CA really issues, with the subject and
    validity of ``tpm``'s RSA EK certificate (and its extensions, if
    ``with_extensions``), but for ``public_key``: not the EK's key."""
    ca_dir = tpm.state.ca_dir
    issuer = x509.load_pem_x509_certificate((ca_dir / "issuercert.pem").read_bytes())
    signer = serialization.load_pem_private_key((ca_dir / "signkey.pem").read_bytes(), None)
    real = rsa_ek_certificate(tpm)
    builder = x509.CertificateBuilder(
        issuer_name=issuer.subject,
        subject_name=real.subject,
        public_key=public_key,
        serial_number=x509.random_serial_number(),
        not_valid_before=real.not_valid_before_utc,
        not_valid_after=real.not_valid_after_utc,
        extensions=list(real.extensions) if with_extensions else [],
    )
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


def edit(data: bytes, **changes: object) -> bytes:
    message = json.loads(data)
    for key, value in changes.items():
        if value is None:
            message.pop(key, None)
        else:
            message[key] = value
    return json.dumps(message).encode()


def extend(tpm: Any, pcr: int, data: bytes) -> None:
    """TPM2_PCR_Event: every active bank of ``pcr`` extended with H(data)."""
    with shared_context(tpm.tcti) as ctx:
        ctx.device(lambda ectx: ectx.pcr_event(ESYS_TR.PCR0 + pcr, data))


def read_pcr(tpm: Any, bank: str, pcr: int) -> bytes:
    with shared_context(tpm.tcti) as ctx:
        _, _, digests = ctx.device(lambda ectx: ectx.pcr_read(f"{bank}:{pcr}"))
    return bytes(digests.digests[0])
