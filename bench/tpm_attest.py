"""TPM node attestation benchmarks (issue 10, "Speed"), on swtpm.

Aims: a first attestation (EK read, AK creation, activation, quote, verify) <= 200 ms;
a re-attestation with a quote (the AK known to the server) <= 30 ms.

The limit is measured in the same run: the same TPM commands and checks called
directly through ``custos.tpm`` in one process, nothing else (EK certificate and public
area read, EK trust check, AK created, MakeCredential, ActivateCredential, quote,
quote verified; for the re-attestation: quote and its verification).  Then custos:

- the ``tpm`` plugin pair, in process (the two halves through their catalogs, the wire
  JSON, the datastore rows: the clock check and the activated AK);
- ``AttestAgent`` over gRPC against a running server (the server in this process, its
  Agent API on loopback TLS), as the agent does it: a fresh agent key in the TPM, its
  CSR, the AK's certify of it, the attestation, the X.509-SVID and WIT issued.

ratio = p50 / the limit's p50. Nothing here asserts on time.

    python bench/tpm_attest.py          (or BENCH_ONLY=tpm-attest python bench/run.py)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TSS2_LOG", "esys+none,tcti+none")

from timing import Result, header, measure, row, timed_async

TD = "bench.example"
PCRS = "sha256:0,1,2,3,7"
N_FIRST = int(os.environ.get("BENCH_N_ATTEST", "30"))
N_AGAIN = int(os.environ.get("BENCH_N_REATTEST", "100"))


def _section(title: str) -> None:
    print(f"\n### {title}\n")
    print(header())


def limit_rows(tcti: str, ca_files: list[Path]) -> tuple[Result, Result]:
    """The TPM and crypto work alone, through custos.tpm (no plugin, wire or datastore)."""
    import secrets

    from cryptography import x509
    from tpm2_pytss.types import TPML_PCR_SELECTION

    from custos.tpm import activation, verify
    from custos.tpm.ak import create_ak, quote
    from custos.tpm.context import shared_context
    from custos.tpm.ek import ek_certificate
    from custos.tpm.ekcert import EkTrust

    roots = [c for f in ca_files for c in x509.load_pem_x509_certificates(f.read_bytes())]
    trust = EkTrust(roots, frozenset())
    selection = TPML_PCR_SELECTION.parse(PCRS)

    with shared_context(tcti) as ctx:

        def pcr_values() -> dict[tuple[str, int], bytes]:
            _, _, digests = ctx.device(lambda ectx: ectx.pcr_read(selection))
            indexes = [int(i) for i in PCRS.split(":")[1].split(",")]
            return {("sha256", i): bytes(digests.digests[k]) for k, i in enumerate(indexes)}

        def quoted(ak: Any, ak_public: Any) -> None:
            nonce = secrets.token_bytes(32)
            values = pcr_values()
            attest, sig = quote(ctx, ak, PCRS, nonce)
            verify.verify_quote(
                ak_public, bytes(attest.marshal())[2:], bytes(sig.marshal()), nonce, values, PCRS
            )

        def first() -> None:
            cert = ctx.device(lambda ectx: ek_certificate(ectx, "rsa2048"))
            ek_public = activation.ek_public_area(ctx, "rsa2048")
            trust.check(verify.public_key(ek_public), cert, [])
            ak = create_ak(ctx)
            ak_public = verify.ak_public_checked(bytes(ak.tss.public.marshal()))
            secret, blob, encrypted = activation.make_credential(ek_public, verify.name(ak_public))
            got = activation.activate_credential(ctx, ak, "rsa2048", blob, encrypted)
            assert got == secret
            quoted(ak, ak_public)

        ak = create_ak(ctx)
        ak_public = verify.ak_public_checked(bytes(ak.tss.public.marshal()))
        return (
            measure("limit: custos.tpm calls, first attestation", first, N_FIRST, warmup=3),
            measure(
                "limit: custos.tpm quote + verify_quote",
                lambda: quoted(ak, ak_public),
                N_AGAIN,
                warmup=5,
            ),
        )


def plugin_rows(tcti: str, ca_files: list[Path], base: Path) -> tuple[Result, Result]:
    """The two plugin halves through their catalogs (wire JSON, datastore) in process."""
    from custos.plugin import AgentCatalog, PluginConfig, ServerCatalog
    from custos.server.datastore import Datastore

    async def run() -> tuple[list[float], list[float]]:
        with Datastore.open(f"sqlite:///{base / 'plugin.db'}", trust_domain=TD) as store:
            server = ServerCatalog.load(
                TD,
                node_attestors=[
                    PluginConfig(
                        "tpm",
                        {
                            "ek_ca_bundle": [str(p) for p in ca_files],
                            "pcrs": PCRS,
                            "datastore": store,
                        },
                    )
                ],
            )

            def agent_catalog() -> AgentCatalog:
                return AgentCatalog.load(
                    TD,
                    node_attestors=[PluginConfig("tpm", {"tcti": tcti})],
                    workload_attestors=[PluginConfig("unix")],
                )

            async def exchange(agent: AgentCatalog) -> None:
                flow = agent.node_attestor.plugin.attestation_flow()
                try:
                    first = await anext(flow)
                    await server.attest_node("tpm", first, flow.asend)
                finally:
                    await flow.aclose()

            async def fresh() -> None:
                # A new agent half each time: a new AK, so the server activates it.
                with agent_catalog() as agent:
                    await exchange(agent)

            with server:
                first = await timed_async(fresh, N_FIRST, warmup=3)
                with agent_catalog() as agent:
                    await exchange(agent)  # the server now holds this AK
                    again = await timed_async(lambda: exchange(agent), N_AGAIN, warmup=3)
        return first, again

    first, again = asyncio.run(run())
    return (
        Result("custos: tpm plugin pair, first attestation", first),
        Result("custos: tpm plugin pair, re-attestation (quote)", again),
    )


def server_rows(tcti: str, ca_files: list[Path], base: Path) -> tuple[Result, Result, Result]:
    """AttestAgent over gRPC against a running server, as the agent attests."""
    from custos.agent.client.attest import attest_agent
    from custos.agent.client.channel import DEFAULT_SERVER_NAME, open_channel
    from custos.keys.tpm import TpmKeyStore
    from custos.plugin import AgentCatalog, PluginConfig
    from custos.testing.server import ServerRig, running_server

    rig = ServerRig(
        base / "server",
        trust_domain=TD,
        sections={"node_attestors.tpm": {"ek_ca_bundle": [str(p) for p in ca_files], "pcrs": PCRS}},
    )

    async def run() -> tuple[list[float], list[float], list[float]]:
        async with running_server(rig) as srv:
            bundle = await asyncio.to_thread(srv.ctx.bundle)
            channel = open_channel(
                srv.agent_api_address, bundle=bundle, server_name=DEFAULT_SERVER_NAME
            )
            store = TpmKeyStore(tcti=tcti, key_dir=base / "agent-keys")
            store.create("agent", "ES256")
            key = store.get("agent")
            generation = [0]

            async def attest(agent: AgentCatalog, new_key: bool) -> None:
                use = key
                if new_key:  # the agent's renewal: a fresh key each time
                    generation[0] += 1
                    name = f"agent-{generation[0]}"
                    await asyncio.to_thread(store.create, name, "ES256")
                    use = store.get(name)
                await attest_agent(channel, attestor=agent.node_attestor, key=use, custody="tpm")
                if new_key:
                    await asyncio.to_thread(store.delete, use.name)

            def agent_catalog() -> AgentCatalog:
                return AgentCatalog.load(
                    TD,
                    node_attestors=[PluginConfig("tpm", {"tcti": tcti})],
                    workload_attestors=[PluginConfig("unix")],
                )

            async def fresh() -> None:
                with agent_catalog() as agent:
                    await attest(agent, new_key=True)

            try:
                first = await timed_async(fresh, N_FIRST, warmup=3)
                with agent_catalog() as agent:
                    await attest(agent, new_key=False)
                    same = await timed_async(
                        lambda: attest(agent, new_key=False), N_AGAIN, warmup=3
                    )
                    renewal = await timed_async(
                        lambda: attest(agent, new_key=True), N_AGAIN, warmup=3
                    )
            finally:
                channel.close()
                store.close()
        return first, same, renewal

    first, same, renewal = asyncio.run(run())
    return (
        Result("custos: AttestAgent (gRPC), first attestation", first),
        Result("custos: AttestAgent re-attestation, same key", same),
        Result("custos: AttestAgent renewal (new TPM key)", renewal),
    )


def bench_tpm_attestation_rows(
    section: Callable[[str], None], tcti: str, ca_files: list[Path], base: Path
) -> None:
    """The rows of ``make bench`` (``section`` prints a title and the header)."""
    base.mkdir(parents=True, exist_ok=True)
    limit_first, limit_again = limit_rows(tcti, ca_files)
    plugin_first, plugin_again = plugin_rows(tcti, ca_files, base)
    grpc_first, grpc_same, grpc_renewal = server_rows(tcti, ca_files, base)
    section("TPM node attestation, first (aim <= 200 ms; ratio = p50 / the custos.tpm calls)")
    print(row(limit_first))
    print(row(plugin_first, limit_first))
    print(row(grpc_first, limit_first, note="+ agent key, CSR, certify, SVID + WIT"))
    section("TPM re-attestation with a quote (aim <= 30 ms; ratio = p50 / quote + verify)")
    print(row(limit_again))
    print(row(plugin_again, limit_again))
    print(row(grpc_same, limit_again, note="+ CSR, certify, SVID + WIT"))
    print(row(grpc_renewal, limit_again, note="+ new TPM key, CSR, certify, SVID + WIT"))


def main() -> int:
    from custos.testing import swtpm as tpm_rig

    with tempfile.TemporaryDirectory(prefix="custos-bench-") as tmp:
        root = Path(tmp)
        state = tpm_rig.provision(root / "tpm")
        tpm = tpm_rig.start_instance(state.root)
        try:
            print(f"custos TPM attestation bench — python {sys.version.split()[0]}, "
                  f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")  # fmt: skip
            bench_tpm_attestation_rows(_section, tpm.tcti, list(state.ek_ca_certs), root)
        finally:
            tpm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
