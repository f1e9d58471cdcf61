"""Cloud node attestation benchmarks (issue 11, "Speed"): aws_iid and gcp_iit.

Server-side verification of each attestor's evidence against the raw signature check
in the same run (aim <= 1.5x):

- aws_iid: the raw check is one RSA-2048 PKCS#1 v1.5 SHA-256 verify of the identity
  document (cryptography).  custos: the server half through its catalog
  (``ServerCatalog.attest_node``): wire decode, the verify, the document's fields,
  the allowlist, the selectors and agent ID checked by the catalog; and the plugin's
  ``verify`` alone (the same minus the catalog's generator and selector checks).  Also
  with three configured certificates, the matching one last (the server then tries
  the key that verified last first: after the first call, one verify per call).
- gcp_iit: the raw check is one RSA-2048 verify of the JWS signing input.  custos:
  the server half's verification of the answer (wire decode, the strict JWS decode of
  custos' JOSE core, header, kid lookup in the cached JWKS, the verify, claims,
  audience, google.compute_engine shapes, selectors); next to it joserfc's decode and
  claims registry alone (the path before decision 0115).  The full exchange (hello,
  challenge, answer) needs a token minted for each challenge's nonce; it is shown with
  the fake Google's RS256 signing inside, next to that signing alone.

Each section also prints its floor: the parsing no verification can skip (the JSON
and base64 of the evidence, no check at all), as a ratio to the raw check; the aim
of 1.5x leaves 0.5x for the floor, every check and the catalog together.

ratio = p50 / the raw check's p50.  Nothing here asserts on time.

    python bench/attest_cloud.py        (or BENCH_ONLY=cloud-attest python bench/run.py)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from timing import Result, header, measure, row, timed_async

TD = "bench.example"
N = int(os.environ.get("BENCH_N_CLOUD", "2000"))


def _section(title: str) -> None:
    print(f"\n### {title}\n")
    print(header())


def _timed_async(label: str, call: Callable[[], Awaitable[object]], n: int) -> Result:
    return Result(label, asyncio.run(timed_async(call, n)))


def bench_aws(base: Path, section: Callable[[str], None] = _section) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from custos.plugin import PluginConfig, ServerCatalog
    from custos.testing.fake_aws import AwsSigner
    from custos_attestors.node.aws_iid import wire

    aws, others = AwsSigner(), [AwsSigner(), AwsSigner()]
    document, signature = aws.signed()
    payload = wire.encode(document, signature)
    public = aws.key.public_key()
    paths = []
    for i, signer in enumerate([*others, aws]):
        path = base / f"aws-{i}.pem"
        path.write_bytes(signer.certificate_pem)
        paths.append(str(path))

    async def no_challenge(data: bytes) -> bytes:
        raise AssertionError

    section("aws_iid: server-side verification (ratio = p50 / raw RSA-SHA256 verify)")
    raw = measure(
        "raw: cryptography RSA-2048 PKCS1v15 SHA-256 verify",
        lambda: public.verify(signature, document, padding.PKCS1v15(), hashes.SHA256()),
        N,
    )
    print(row(raw))

    def floor() -> object:
        message = json.loads(payload)
        binascii.a2b_base64(message["signature"], strict_mode=True)
        return json.loads(binascii.a2b_base64(message["document"], strict_mode=True))

    print(
        row(
            measure("floor: JSON + 2 base64 + document JSON (no check)", floor, N),
            raw,
            note="parsing alone",
        )
    )
    config = {"certificates": paths[-1:], "account_allowlist": ["123456789012"]}
    with ServerCatalog.load(TD, node_attestors=[PluginConfig("aws_iid", config)]) as server:
        plugin = server.node_attestors["aws_iid"].plugin
        alone = measure(
            "custos: aws_iid plugin verify alone (no catalog)", lambda: plugin.verify(payload), N
        )
    print(row(alone, raw, note="aim <= 1.5x"))
    for label, certs in (
        ("custos: aws_iid via the catalog, 1 certificate", paths[-1:]),
        ("custos: aws_iid via the catalog, 3 certificates", paths),
    ):
        config = {"certificates": certs, "account_allowlist": ["123456789012"]}
        with ServerCatalog.load(TD, node_attestors=[PluginConfig("aws_iid", config)]) as server:
            result = _timed_async(
                label, lambda s=server: s.attest_node("aws_iid", payload, no_challenge), N
            )
        print(row(result, raw, note="aim <= 1.5x"))


def bench_gcp(base: Path, section: Callable[[str], None] = _section) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import KeySet

    from custos._jose import decode_compact
    from custos.plugin import PluginConfig, ServerCatalog
    from custos.testing.fake_gcp import GcpSigner
    from custos_attestors.node.gcp_iit import wire

    google = GcpSigner()
    jwks = base / "certs.json"
    jwks.write_text(json.dumps(google.jwks(GcpSigner(), GcpSigner())))
    audience = "custos/" + "n" * 22
    token = google.token(google.claims(audience))
    answer = wire.encode_token(token)
    signing_input, sig_b64 = token.rsplit(".", 1)
    sig = base64.urlsafe_b64decode(sig_b64 + "==")
    public = google.key.get_op_key("verify")
    keyset = KeySet.import_key_set(json.loads(jwks.read_text()))
    jose_registry = jose_jwt.JWTClaimsRegistry(
        leeway=60, iss={"essential": True, "value": "https://accounts.google.com"}
    )

    section("gcp_iit: server-side verification (ratio = p50 / raw RS256 verify)")
    raw = measure(
        "raw: cryptography RSA-2048 RS256 verify of the JWS",
        lambda: public.verify(sig, signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()),
        N,
    )
    print(row(raw))
    print(
        row(
            measure(
                "floor: answer JSON + strict JWS decode (no check)",
                lambda: decode_compact(json.loads(answer)["token"], max_length=8192),
                N,
            ),
            raw,
            note="parsing alone",
        )
    )
    config = {"jwks_file": str(jwks), "project_allowlist": ["my-project-1"]}
    with ServerCatalog.load(TD, node_attestors=[PluginConfig("gcp_iit", config)]) as server:
        plugin = server.node_attestors["gcp_iit"].plugin

        async def verify_answer() -> object:
            return await plugin.verify(wire.decode_token(answer), audience)

        verified = _timed_async("custos: gcp_iit token verification (3-key JWKS)", verify_answer, N)
        print(row(verified, raw, note="aim <= 1.5x"))
        library = measure(
            "  (joserfc jwt.decode + claims validate alone)",
            lambda: jose_registry.validate(
                jose_jwt.decode(token, keyset, algorithms=["RS256"]).claims
            ),
            N,
        )
        print(row(library, raw, note="joserfc: the path before decision 0115"))

        async def mint(data: bytes) -> bytes:
            asked = json.loads(data)["audience"]
            return wire.encode_token(google.token(google.claims(asked)))

        mint_only = measure(
            "  (fake Google: RS256 token minting alone)",
            lambda: google.token(google.claims(audience)),
            N // 4,
        )
        full = _timed_async(
            "  custos: full exchange incl. minting",
            lambda: server.attest_node("gcp_iit", wire.encode_hello(), mint),
            N // 4,
        )
        print(row(mint_only))
        print(row(full, raw, note=f"minus minting: {(full.p50 - mint_only.p50) * 1e6:.0f} µs"))


def bench_cloud_attestation_rows(section: Callable[[str], None] = _section) -> None:
    """The rows above, for bench/run.py (``BENCH_ONLY=cloud-attest``)."""
    with tempfile.TemporaryDirectory(prefix="custos-bench-cloud-") as tmp:
        bench_aws(Path(tmp), section)
        bench_gcp(Path(tmp), section)


def main() -> int:
    print(f"custos cloud attestation benchmarks — python {sys.version.split()[0]}")
    bench_cloud_attestation_rows()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
