"""What changed when azure_msi moved onto the JOSE core and the shared JWKS source
(decision 0090, "Since"): strict decoding, the header refused before any key fetch, and
a stale key set served through an outage with fetch attempts spaced."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from common.node_attestor_rig import no_challenge
from custos.errors import CustosError
from custos.plugin import PluginConfig, ServerCatalog
from custos.plugin.errors import PluginCallError
from custos.testing.fake_azure import FakeAzure, SigningKey
from custos_attestors.node._jwks import JwksError, parse_rsa_jwks
from custos_attestors.node.azure_msi import wire

TD = "example.org"
RESOURCE = "https://custos.example.org/attest"


_no_challenge = no_challenge("azure_msi")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _code(srv: ServerCatalog, token: str) -> str:
    with pytest.raises(PluginCallError) as info:
        asyncio.run(srv.attest_node("azure_msi", wire.encode(token), _no_challenge))
    cause = info.value.__cause__
    assert isinstance(cause, CustosError), repr(cause)
    return cause.code


@pytest.fixture
def azure() -> Iterator[FakeAzure]:
    with FakeAzure().running() as fake:
        yield fake


def _url_server(azure: FakeAzure) -> ServerCatalog:
    config = {"jwks_url": azure.jwks_url, "tenants": {azure.tenant: {"resource": RESOURCE}}}
    return ServerCatalog.load(TD, node_attestors=[PluginConfig("azure_msi", config)])


def test_a_signed_token_with_a_duplicated_claim_is_refused(
    azure: FakeAzure, tmp_path: Path
) -> None:
    # Two "oid" members: which one a parser keeps is its choice, so none is kept.
    claims = json.dumps(azure.claims(RESOURCE), separators=(",", ":"))
    body = claims[:-1] + ',"oid":"00000000-0000-0000-0000-000000000000"}'
    head = _b64(json.dumps({"alg": "RS256", "kid": azure.key.kid}).encode())
    signing_input = f"{head}.{_b64(body.encode())}"
    signature = azure.key.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    token = f"{signing_input}.{_b64(signature)}"
    config = {
        "jwks_file": azure.write_jwks(tmp_path / "jwks.json"),
        "tenants": {azure.tenant: {"resource": RESOURCE}},
    }
    with ServerCatalog.load(TD, node_attestors=[PluginConfig("azure_msi", config)]) as srv:
        assert _code(srv, token) == "azure_msi_token_invalid"
        # A non-canonical base64url signature: the 256-byte signature leaves 4 unused
        # bits in its last character; setting one spells the same bytes another way.
        good = azure.mint(RESOURCE)
        assert len(good.rsplit(".", 1)[1]) % 4 == 2
        odd = good[:-1] + {"A": "B", "Q": "R", "g": "h", "w": "x"}[good[-1]]
        assert _code(srv, odd) == "azure_msi_token_invalid"


@pytest.mark.parametrize("header", [{"jku": "https://evil.example/k"}, {"alg": "HS256"}])
def test_a_bad_header_is_refused_before_any_key_fetch(
    azure: FakeAzure, header: dict[str, Any]
) -> None:
    forger = SigningKey()  # an unknown kid would otherwise trigger a fetch
    with _url_server(azure) as srv:
        assert _code(srv, azure.mint(RESOURCE, key=forger, header=header)) == (
            "azure_msi_bad_algorithm"
        )
    assert azure.jwks_requests == 0


def test_a_stale_set_is_served_through_an_outage_and_the_url_is_not_hammered(
    azure: FakeAzure, caplog: pytest.LogCaptureFixture
) -> None:
    with _url_server(azure) as srv:
        asyncio.run(srv.attest_node("azure_msi", wire.encode(azure.mint(RESOURCE)), _no_challenge))
        assert azure.jwks_requests == 1
        token = azure.mint(RESOURCE)
        azure.stop()  # the endpoint goes away
        source = srv.node_attestors["azure_msi"].plugin._keys  # type: ignore[attr-defined]
        source._fetched_ok -= 7200  # the set is two hours old: stale
        source._fetched -= 7200
        caplog.set_level(logging.WARNING)
        for _ in range(3):
            result = asyncio.run(srv.attest_node("azure_msi", wire.encode(token), _no_challenge))
            assert result.agent_id.path.endswith(azure.principal)
    # One failed attempt, logged once; the next two were inside the 30 s spacing.
    assert caplog.text.count("azure_msi JWKS") == 1


def test_a_jwks_document_is_bounded_and_strict() -> None:
    key = SigningKey().jwk()
    with pytest.raises(JwksError, match="larger"):
        parse_rsa_jwks(json.dumps({"keys": [key]}).encode(), max_bytes=100, max_keys=4)
    with pytest.raises(JwksError, match="1 to 1 keys"):
        parse_rsa_jwks(json.dumps({"keys": [key, key]}).encode(), max_bytes=10**6, max_keys=1)
    with pytest.raises(JwksError, match="twice"):
        parse_rsa_jwks(json.dumps({"keys": [key, key]}).encode(), max_bytes=10**6, max_keys=4)
    with pytest.raises(JwksError, match="strict"):
        parse_rsa_jwks(b'{"keys": [], "keys": []}', max_bytes=10**6, max_keys=4)
    with pytest.raises(JwksError, match="8192"):
        parse_rsa_jwks(
            json.dumps({"keys": [SigningKey(bits=8200).jwk()]}).encode(),
            max_bytes=10**6,
            max_keys=4,
        )
    # Keys for another use or algorithm, or without a kid, are skipped.
    other = [
        {**key, "kid": "enc", "use": "enc"},
        {**key, "kid": "rs512", "alg": "RS512"},
        {k: v for k, v in key.items() if k != "kid"},
        key,
    ]
    parsed = parse_rsa_jwks(json.dumps({"keys": other}).encode(), max_bytes=10**6, max_keys=4)
    assert list(parsed.keys) == [key["kid"]]
