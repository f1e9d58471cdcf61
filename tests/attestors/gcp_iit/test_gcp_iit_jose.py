"""What changed when gcp_iit moved from joserfc's decode to custos' JOSE core and the
shared RS256 steps of ``custos_attestors.node._jwks`` (decision 0115): one strict decode,
the header judged before any key is looked up or fetched, the claims rules joserfc's
registry applied kept one by one."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from custos.errors import CustosError
from custos.plugin import PluginConfig, ServerCatalog
from custos.testing.fake_gcp import PROJECT, FakeJwksServer, GcpSigner, local_tls

TD = "example.org"
AUDIENCE = "custos/" + "n" * 22


@pytest.fixture(scope="module")
def google() -> GcpSigner:
    return GcpSigner()


@pytest.fixture
def config(google: GcpSigner, tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "google-certs.json"
    path.write_text(json.dumps(google.jwks(GcpSigner())))
    return {"jwks_file": str(path), "project_allowlist": [PROJECT]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(google: GcpSigner, header: bytes, payload: bytes) -> str:
    """A JWS of exactly these header and payload bytes, signed with Google's key."""
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    key = google.key.get_op_key("sign")
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _header(google: GcpSigner, **extra: object) -> bytes:
    return json.dumps({"alg": "RS256", "kid": google.kid, "typ": "JWT", **extra}).encode()


def _verify(config: dict[str, object], token: str) -> tuple[list[str], list[str]]:
    async def main() -> tuple[list[str], list[str]]:
        with ServerCatalog.load(TD, node_attestors=[PluginConfig("gcp_iit", config)]) as srv:
            plugin: Any = srv.node_attestors["gcp_iit"].plugin
            result: tuple[list[str], list[str]] = await plugin.verify(token, AUDIENCE)
            return result

    return asyncio.run(main())


def _code(config: dict[str, object], token: str) -> str:
    with pytest.raises(CustosError) as info:
        _verify(config, token)
    return info.value.code


def test_a_good_token_verifies(google: GcpSigner, config: dict[str, object]) -> None:
    path, selectors = _verify(config, google.token(google.claims(AUDIENCE)))
    assert path[0] == PROJECT
    assert f"project-id:{PROJECT}" in selectors


def test_a_duplicated_claim_is_refused(google: GcpSigner, config: dict[str, object]) -> None:
    claims = json.dumps(google.claims(AUDIENCE))
    twice = claims[:-1] + ', "aud": "someone-else"}'
    assert _code(config, _signed(google, _header(google), twice.encode())) == (
        "gcp_iit_token_invalid"
    )
    # The same bytes without the second member verify: the refusal is the duplicate's.
    assert _verify(config, _signed(google, _header(google), claims.encode()))


def test_a_non_canonical_signature_encoding_is_refused(
    google: GcpSigner, config: dict[str, object]
) -> None:
    token = google.token(google.claims(AUDIENCE))
    head, body, sig = token.split(".")
    assert len(sig) % 4 == 2  # RSA-2048: 256 bytes, the last character has 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    stray = alphabet[alphabet.index(sig[-1]) | 1]  # same bytes, a stray low bit set
    assert stray != sig[-1]
    assert _code(config, f"{head}.{body}.{sig[:-1]}{stray}") == "gcp_iit_token_invalid"


@pytest.mark.parametrize(
    "extra",
    [
        {"jku": "https://evil.example/keys"},
        {"x5u": "https://evil.example/cert"},
        {"x5c": ["AAAA"]},
        {"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}},
        {"crit": ["exp"]},
        {"alg": "RS512"},
        {"alg": "none"},
        {"kid": 7},
    ],
)
def test_headers_that_choose_a_key_or_an_algorithm_are_refused(
    google: GcpSigner, config: dict[str, object], extra: dict[str, object]
) -> None:
    payload = json.dumps(google.claims(AUDIENCE)).encode()
    token = _signed(google, _header(google, **extra), payload)
    assert _code(config, token) == "gcp_iit_token_invalid"


def test_a_token_without_a_kid_is_refused(google: GcpSigner, config: dict[str, object]) -> None:
    header = json.dumps({"alg": "RS256", "typ": "JWT"}).encode()
    token = _signed(google, header, json.dumps(google.claims(AUDIENCE)).encode())
    assert _code(config, token) == "gcp_iit_token_invalid"


def _edited(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(claims: dict[str, Any]) -> dict[str, Any]:
        edit(claims)
        return claims

    return apply


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (_edited(lambda c: c.update(exp=str(c["exp"]))), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(exp=True)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(exp=None)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(exp=int(time.time()) - 61)), "gcp_iit_token_expired"),
        (_edited(lambda c: c.update(iat=None)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(iat=int(time.time()) + 3600)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(nbf=int(time.time()) + 3600)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(nbf=None)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.pop("iss")), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(iss=None)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(sub=1)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(jti=["x"])), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(aud=5)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(aud=None)), "gcp_iit_token_invalid"),
        (_edited(lambda c: c.update(aud=[AUDIENCE])), "gcp_iit_audience_mismatch"),
        (_edited(lambda c: c.pop("aud")), "gcp_iit_audience_mismatch"),
    ],
)
def test_the_claims_rules_are_kept(
    google: GcpSigner,
    config: dict[str, object],
    edit: Callable[[dict[str, Any]], dict[str, Any]],
    code: str,
) -> None:
    assert _code(config, google.token(edit(google.claims(AUDIENCE)))) == code


def test_within_the_leeway_is_accepted(google: GcpSigner, config: dict[str, object]) -> None:
    now = int(time.time())
    claims = {**google.claims(AUDIENCE), "exp": now - 30, "iat": now + 30, "nbf": now + 30}
    assert _verify(config, google.token(claims))


def test_a_malformed_or_kid_less_token_costs_no_jwks_fetch(
    google: GcpSigner, tmp_path: Path
) -> None:
    tls = local_tls(tmp_path)
    with FakeJwksServer(google.jwks(), tls) as jwks:
        config: dict[str, object] = {
            "jwks_url": jwks.certs_url,
            "jwks_ca_bundle": str(tls.ca_file),
            "project_allowlist": [PROJECT],
        }
        no_kid = _signed(
            google,
            json.dumps({"alg": "RS256"}).encode(),
            json.dumps(google.claims(AUDIENCE)).encode(),
        )
        for token in ("a.b.c", no_kid):
            assert _code(config, token) == "gcp_iit_token_invalid"
        assert jwks.requests == []
        assert _verify(config, google.token(google.claims(AUDIENCE)))
        assert len(jwks.requests) == 1
