"""azure_msi and k8s_psat server-side verification benchmarks (issue 11, "Speed").

azure_msi: the aim is server-side verification within 1.5x of the raw signature check.
The limit is measured in the same run: ``cryptography``'s RSA PKCS#1 v1.5 SHA-256
verify of the token's signature over its signing input, nothing else. Then custos:

- the server half's checks alone (``AzureMsiServerAttestor._verify``: decode, JWS split,
  kid lookup, signature, tenant, issuer, audience, lifetime, xms_mirid);
- the server half through the catalog (``ServerCatalog.attest_node``: the generator
  protocol, the agent ID and selector stamping), as the server's AttestAgent calls it.

k8s_psat: the verification is a TokenReview (a network round trip) plus a pod and a node
read, so the figures are p50/p99 against the local fake API server (HTTPS on loopback,
custos.testing.fake_kube, in a thread of this process), with the ratio to one bare
TokenReview made with the same ``kubernetes`` client.

The floor row is the parsing no verification can skip (the evidence JSON and the strict
decode of the JWS, no check), as a ratio to the limit: the aim of 1.5x leaves 0.5x for it,
every check and the catalog together.

ratio = p50 / the limit's p50. Nothing here asserts on time.

    python bench/attest_k8s_azure.py    (or BENCH_ONLY=k8s-azure python bench/run.py)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from timing import Result, header, measure, row, timed_async

TD = "bench.example"
RESOURCE = "https://custos.example/attest"
N_AZURE = int(os.environ.get("BENCH_N_AZURE", "2000"))
N_K8S = int(os.environ.get("BENCH_N_K8S", "300"))


def _section(title: str) -> None:
    print(f"\n### {title}\n")
    print(header())


async def _no_challenge(data: bytes) -> bytes:
    raise AssertionError("no challenge expected")


def bench_azure(base: Path, section: Callable[[str], None] = _section) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from custos._jose import decode_compact
    from custos.plugin import PluginConfig, ServerCatalog
    from custos.testing.fake_azure import FakeAzure
    from custos_attestors.node.azure_msi import wire
    from custos_attestors.node.azure_msi.jwt import b64url

    azure = FakeAzure()
    token = azure.mint(RESOURCE)
    payload = wire.encode(token)
    head, body, sig = token.split(".")
    signing_input, signature = f"{head}.{body}".encode(), b64url(sig, "signature")
    public = azure.key.private.public_key()

    def raw() -> None:
        public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())

    config = {
        "jwks_file": azure.write_jwks(base / "jwks.json"),
        "tenants": {azure.tenant: {"resource": RESOURCE}},
    }
    limit = measure("limit: RSA-2048 PKCS#1 v1.5 verify (cryptography)", raw, N_AZURE, warmup=50)
    floor = measure(
        "floor: evidence JSON + strict JWS decode (no check)",
        lambda: decode_compact(json.loads(payload)["token"], max_length=wire.MAX_TOKEN_CHARS),
        N_AZURE,
        warmup=50,
    )

    async def run() -> tuple[list[float], list[float]]:
        with ServerCatalog.load(TD, node_attestors=[PluginConfig("azure_msi", config)]) as srv:
            plugin = srv.node_attestors["azure_msi"].plugin

            async def checks() -> None:
                await plugin._verify(payload)  # type: ignore[attr-defined]

            async def catalog() -> None:
                await srv.attest_node("azure_msi", payload, _no_challenge)

            return await timed_async(checks, N_AZURE, 50), await timed_async(catalog, N_AZURE, 50)

    checks, catalog = asyncio.run(run())
    section("Node attestation: azure_msi server-side verification (ratio = p50 / raw verify)")
    print(row(limit, limit))
    print(row(floor, limit, note="parsing alone"))
    print(row(Result("custos: azure_msi server checks (_verify)", checks), limit))
    print(row(Result("custos: azure_msi via ServerCatalog.attest_node", catalog), limit))


def bench_k8s(base: Path, section: Callable[[str], None] = _section) -> None:
    from kubernetes import client, config

    from custos.plugin import PluginConfig, ServerCatalog
    from custos.testing.fake_kube import FakeKube, make_tls
    from custos_attestors.node.k8s_psat import wire

    fake = FakeKube(make_tls(base / "tls"))
    node = fake.add_node("node-a", zone="z1")
    pod = fake.add_pod("custos", "custos-agent-1", node, "custos-agent", {"app": "custos"})
    with fake.running():
        kubeconfig = fake.write_kubeconfig(base / "kubeconfig")
        token = fake.token(pod, ["custos-server"])
        payload = wire.encode("prod", token)

        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        api = client.ApiClient(configuration)
        auth = client.AuthenticationV1Api(api)
        review = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=["custos-server"])
        )
        try:
            limit = measure(
                "limit: one TokenReview (kubernetes client, loopback HTTPS)",
                lambda: auth.create_token_review(review, _request_timeout=5),
                N_K8S,
                warmup=10,
            )
        finally:
            api.close()
        settings = {
            "clusters": {
                "prod": {
                    "service_account_allow_list": ["custos:custos-agent"],
                    "kube_config_file": kubeconfig,
                    "allowed_node_label_keys": ["zone"],
                    "allowed_pod_label_keys": ["app"],
                }
            }
        }

        async def run() -> list[float]:
            with ServerCatalog.load(TD, node_attestors=[PluginConfig("k8s_psat", settings)]) as srv:

                async def attest() -> None:
                    await srv.attest_node("k8s_psat", payload, _no_challenge)

                return await timed_async(attest, N_K8S, 10)

        full = asyncio.run(run())
    section("Node attestation: k8s_psat against a local API server (ratio = p50 / TokenReview)")
    print(row(limit, limit))
    print(
        row(
            Result("custos: k8s_psat via attest_node (review + pod + node)", full),
            limit,
        )
    )


def bench_k8s_azure_rows(section: Callable[[str], None] = _section) -> None:
    """The rows above, for bench/run.py (``BENCH_ONLY=k8s-azure``)."""
    with tempfile.TemporaryDirectory(prefix="custos-bench-k8s-azure-") as tmp:
        base = Path(tmp)
        bench_azure(base, section)
        bench_k8s(base, section)


def main() -> int:
    bench_k8s_azure_rows()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
