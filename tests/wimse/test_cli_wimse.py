"""``custos wimse verify``, ``custos wimse sign-wpt`` and ``custos jwt validate``,
run as real subprocesses (``python -m custos ...``).

- the draft-ietf-wimse-wpt-01 example request (vectors file, section 2)
  verifies under the draft's Identity Server key with "now" pinned; any changed
  header exits 1 with problem JSON;
- the draft -06 HTTP-signature request (vectors file, section 3): its WIT's
  issuer key was never published, so it is refused (exit 1, a WIT code); the
  same request re-signed with the draft's caller key under a WIT we mint
  verifies (variant http-signature);
- WPTs made by ``custos wimse sign-wpt`` (exportable store, --key-dir) in both
  wire forms verify with ``custos wimse verify``;
- ``custos jwt validate`` prints a JWT-SVID's claims and exits 1 on a wrong audience.
"""

from __future__ import annotations

import base64
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli_runner import run_custos as custos
from custos.bundle import USE_JWT_SVID, JwtAuthority, TrustBundle
from custos.identity import SpiffeId, TrustDomain, WimseId
from custos.jwtsvid import mint_jwt_svid
from custos.keys.jose import joserfc_key
from custos.keys.software import MemoryKeyStore
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import sign_request
from custos.wimse.wit import mint_wit

# -- draft-ietf-wimse-wpt-01 section 2 / workload-creds-02 section 5.1 (vectors section 1-2) --

DRAFT_WIT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6Ikp1bmUgNSIsInR5cCI6IndpdCtqd3QifQ.eyJjbmYiOnsiandrIjp7ImFsZyI"
    "6IkVkRFNBIiwiY3J2IjoiRWQyNTUxOSIsImt0eSI6Ik9LUCIsIngiOiIxQ1hYdmZsTl9MVlZzSXNZWHNVdkIwM0ptbE"
    "dXZUNIcVFWdW91Q0Y5MmJnIn19LCJleHAiOjE3NDU1MTI1MTAsImlhdCI6MTc0NTUwODkxMCwianRpIjoieC1fMUNUTD"
    "JjY2EzQ1NFNGN3Yl9sIiwic3ViIjoid2ltc2U6Ly9leGFtcGxlLmNvbS9zcGVjaWZpYy13b3JrbG9hZCJ9.6KraSQUxW"
    "dl9dxFQ3Fj6dPY0Vi88OkwFwZpAIOhLeq6AbXAnLLQgOp8U9UDGcBuYF3KiNv6oKQD1ZWAzrMZOJw"
)
DRAFT_WPT = (
    "eyJhbGciOiJFZERTQSIsInR5cCI6IndwdCtqd3QifQ.eyJhdGgiOiJDTDR3amZwUm1OZi1iZFlJYllMblY5ZDVyTUFSR3"
    "dLWUUxMHdVd3pDMGpJIiwiYXVkIjoiaHR0cHM6Ly93b3JrbG9hZC5leGFtcGxlLmNvbS9wYXRoIiwiZXhwIjoxNzQ1NTE"
    "wMDE2LCJqdGkiOiJfX2J3YzRFU0MzYWNjMkxUQzEtX3giLCJ3dGgiOiJBYVlVZkMzNEQxZGkyRnhRTHBpSUpKN1NnOFZ"
    "aNm84T0Nkd1NmOUlUb0xnIn0.PI7d9AcYhLoEgPgbJvcM132lkBKnM1NXU-5hZUzVTIyj2dRJaTLFs6e5NYv5gg6AqcV7"
    "NvkYCwfgMgWasWQzCA"
)
IDENTITY_SERVER_JWK = {
    "kty": "EC",
    "kid": "June 5",
    "crv": "P-256",
    "x": "kXqnA2Op7hgd4zRMbw0iFcc_hDxUxhojxOFVGjE2gks",
    "y": "n__VndPMR021-59UAs0b9qDTFT-EZtT6xSNs_xFskLo",
}
ACCESS_TOKEN = "16_mAd0GiwaZokU26_0902100"
WPT01_HEADERS = {
    "Host": "workload.example.com",
    "Content-Type": "application/json",
    "Authorization": f"Bearer {ACCESS_TOKEN}",
    "Workload-Identity-Token": DRAFT_WIT,
    "Workload-Proof-Token": DRAFT_WPT,
}
VECTOR_NOW = "1745509000"
# The example WPT's exp lies ~17 minutes after VECTOR_NOW, beyond the default
# 300 s bound on how far ahead an exp may be; the draft's proof needs more room.
VECTOR_MAX_TTL = "1200"

# -- draft-ietf-wimse-http-signature-06 section 3.6 (vectors section 3) --

SVC_A_D = "HQdG2ekHF4COyoHNYvCh2fMHhIaKvkrStjmyfndFyGI"
SVC_A_JWK = {
    "alg": "EdDSA",
    "crv": "Ed25519",
    "kty": "OKP",
    "x": "ZjlVT4COsCkQO9HIo6tDWAXayQ0MymoFUKJRIQ7S8R8",
}
SIG_WIT_A = (
    "eyJhbGciOiJFZERTQSIsImtpZCI6Imlzc3Vlci1rZXkiLCJ0eXAiOiJ3aXQrand0In0.eyJjbmYiOnsiandrIjp7Im"
    "FsZyI6IkVkRFNBIiwiY3J2IjoiRWQyNTUxOSIsImtpZCI6InN2Yy1hLWtleSIsImt0eSI6Ik9LUCIsIngiOiJaamxW"
    "VDRDT3NDa1FPOUhJbzZ0RFdBWGF5UTBNeW1vRlVLSlJJUTdTOFI4In19LCJleHAiOjE3ODUxNTYwOTcsImlhdCI6MT"
    "c4NTE1NTc5NywiaXNzIjoiaHR0cHM6Ly9leGFtcGxlLmNvbS9pc3N1ZXIiLCJqdGkiOiJ3aXQtMTc4NTE1NTc5NzIx"
    "NjU0NTcxOSIsInN1YiI6IndpbXNlOi8vZXhhbXBsZS5jb20vc3ZjQSJ9.BqJfcsbrYlS9GSQ7NpFBBVz4CeszShqleI"
    "yr2sSnd0Ic6l2HXX27giZcdAOGnXjtv_7h-9vV16GZbVcrQt6hCg"
)
SIG_REQ_HEADERS = {
    "Host": "svcb.example.com",
    "Signature": (
        "wimse=:zSK+kx5EnoZct9FZ6LMYzfx0mk32oI/hHpB7y4rgHxkRDcAA72yBW5xgzA03"
        "nKviXLjL7nphq840Uwznp6IKAw==:"
    ),
    "Signature-Input": (
        'wimse=("@method" "@request-target" "workload-identity-token");created=1785155797;'
        'expires=1785156097;nonce="abcd1111";tag="wimse-workload-to-workload";'
        'wimse-aud="https://svcb.example.com/gimme-ice-cream";wimse-sign-response'
    ),
    "Workload-Identity-Token": SIG_WIT_A,
}
SIG_URL = "https://svcb.example.com/gimme-ice-cream?flavor=vanilla"
SIG_NOW = "1785155800"


def header_args(headers: dict[str, str]) -> list[str]:
    out: list[str] = []
    for name, value in headers.items():
        out += ["-H", f"{name}: {value}"]
    return out


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def problem_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 1, (result.stdout, result.stderr)
    doc: dict[str, Any] = json.loads(result.stdout)
    assert set(doc) == {"type", "title", "status", "code"}
    assert doc["type"] == f"urn:custos:problem:{doc['code']}"
    return doc


@pytest.fixture
def draft_jwks(tmp_path: Path) -> Path:
    return write_json(tmp_path / "jwks.json", {"keys": [IDENTITY_SERVER_JWK]})


def verify_wpt01(
    jwks: Path, headers: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return custos(
        "wimse",
        "verify",
        "--bundle",
        str(jwks),
        "--now",
        VECTOR_NOW,
        "--max-ttl",
        VECTOR_MAX_TTL,
        "--method",
        "POST",
        "--url",
        "https://workload.example.com/path",
        *header_args(headers),
        *extra,
    )


# -- the wpt-01 example --


def test_verify_the_wpt01_example(draft_jwks: Path) -> None:
    result = verify_wpt01(draft_jwks, WPT01_HEADERS)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout) == {
        "sub": "wimse://example.com/specific-workload",
        "trust_domain": "example.com",
        "variant": "wpt",
    }
    # The same with the trust domain stated (the way to run it for real).
    stated = verify_wpt01(draft_jwks, WPT01_HEADERS, "--trust-domain", "example.com")
    assert stated.returncode == 0, stated.stdout


def test_wpt01_example_with_a_changed_header_exits_1(draft_jwks: Path) -> None:
    changed = dict(WPT01_HEADERS, Authorization=f"Bearer {ACCESS_TOKEN[:-1]}1")
    assert problem_of(verify_wpt01(draft_jwks, changed)) == {
        "type": "urn:custos:problem:wpt_ath_mismatch",
        "title": "Unauthorized",
        "status": 401,
        "code": "wpt_ath_mismatch",
    }
    flipped = DRAFT_WIT[:100] + ("A" if DRAFT_WIT[100] != "A" else "B") + DRAFT_WIT[101:]
    wit_changed = dict(WPT01_HEADERS, **{"Workload-Identity-Token": flipped})
    assert problem_of(verify_wpt01(draft_jwks, wit_changed))["status"] == 400
    # Without --max-ttl the example proof's far exp is refused (the default bound).
    strict = custos(
        "wimse",
        "verify",
        "--bundle",
        str(draft_jwks),
        "--now",
        VECTOR_NOW,
        "--method",
        "POST",
        "--url",
        "https://workload.example.com/path",
        *header_args(WPT01_HEADERS),
    )
    assert problem_of(strict)["code"] == "wpt_exp_too_far"
    # The wpt-01 form can be switched off.
    assert problem_of(verify_wpt01(draft_jwks, WPT01_HEADERS, "--no-wpt01"))["status"] == 401


def test_wpt01_example_refused_under_another_trust_domain(draft_jwks: Path) -> None:
    result = verify_wpt01(draft_jwks, WPT01_HEADERS, "--trust-domain", "example.org")
    assert problem_of(result)["code"] == "wit_unknown_trust_domain"


def test_verify_help_calls_the_default_a_debugging_convenience() -> None:
    result = custos("wimse", "verify", "--help")
    assert result.returncode == 0
    assert "DEBUGGING CONVENIENCE" in result.stdout


# -- the http-signature-06 example --


class Ed25519JwkSigner:
    """The draft's caller key (a raw JWK ``d``) as an httpsig signer."""

    alg = "EdDSA"

    def __init__(self, d: str) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(d + "="))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def svc_wit(store: MemoryKeyStore, subject: str) -> str:
    """A WIT our issuer minted for the draft's caller key (at the draft's time)."""
    return mint_wit(
        joserfc_key(store.get("issuer")),
        "EdDSA",
        "issuer-key",
        WimseId.parse(subject),
        SVC_A_JWK,
        timedelta(minutes=5),
        now=1785155797,
    )


def test_http_signature_example(tmp_path: Path) -> None:
    store = MemoryKeyStore()
    store.create("issuer", "EdDSA")
    jwks = write_json(
        tmp_path / "issuer.json", {"keys": [dict(store.public_jwk("issuer"), kid="issuer-key")]}
    )

    def verify(headers: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return custos(
            "wimse",
            "verify",
            "--bundle",
            str(jwks),
            "--trust-domain",
            "example.com",
            "--now",
            SIG_NOW,
            "--method",
            "GET",
            "--url",
            SIG_URL,
            *header_args(headers),
        )

    # As published: the WIT's issuer key was generated at run time and never
    # published, so no bundle can vouch for it (ours has a different key under
    # the same kid) -- refused before the signature is looked at.
    assert problem_of(verify(SIG_REQ_HEADERS))["code"] == "wit_bad_signature"

    # The same request, signed with the draft's caller key, under a WIT for
    # wimse://example.com/svcA that our issuer minted for that key.
    wit = svc_wit(store, "wimse://example.com/svcA")
    request = HttpMessage.request(
        "GET", "/gimme-ice-cream?flavor=vanilla", [("Host", "svcb.example.com")]
    )
    signed = sign_request(
        request,
        signer=Ed25519JwkSigner(SVC_A_D),
        wit=wit,
        audience="https://svcb.example.com/gimme-ice-cream",
        created=1785155797,
        ttl=300,
        nonce="abcd1111",
        sign_response=True,
    )
    headers = dict(signed.headers)
    assert headers["Signature-Input"].endswith(
        'nonce="abcd1111";tag="wimse-workload-to-workload";'
        'wimse-aud="https://svcb.example.com/gimme-ice-cream";wimse-sign-response'
    )
    result = verify(headers)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout) == {
        "sub": "wimse://example.com/svcA",
        "trust_domain": "example.com",
        "variant": "http-signature",
    }
    # A changed covered header (the WIT of someone else) or target: exit 1.
    other = svc_wit(store, "wimse://example.com/svcC")
    assert problem_of(verify(dict(headers, **{"Workload-Identity-Token": other})))["code"] == (
        "signature_invalid"
    )
    moved = custos(
        "wimse",
        "verify",
        "--bundle",
        str(jwks),
        "--trust-domain",
        "example.com",
        "--now",
        SIG_NOW,
        "--method",
        "GET",
        "--url",
        "https://svcb.example.com/gimme-ice-cream?flavor=chocolate",
        *header_args(headers),
    )
    assert problem_of(moved)["status"] == 400


# -- sign-wpt -> verify --


@pytest.fixture
def issued(tmp_path: Path) -> dict[str, Path]:
    """An exportable workload key made by ``custos keys create``, a WIT for it
    minted under a CA key, and the CA's JWKS."""
    key_dir = tmp_path / "keys"
    made = custos(
        "keys", "create", "--store", "exportable", "--key-dir", str(key_dir), "--name", "wl"
    )
    assert made.returncode == 0, made.stderr
    workload_jwk = json.loads(made.stdout)
    ca = MemoryKeyStore()
    ca.create("ca", "ES256")
    wit = mint_wit(
        joserfc_key(ca.get("ca")),
        "ES256",
        "ca-1",
        SpiffeId.parse("spiffe://example.org/ns/shop/sa/web"),
        workload_jwk,
        timedelta(minutes=10),
    )
    (tmp_path / "wit.jwt").write_text(wit + "\n")
    jwks = write_json(tmp_path / "ca.json", {"keys": [dict(ca.public_jwk("ca"), kid="ca-1")]})
    return {"key_dir": key_dir, "wit": tmp_path / "wit.jwt", "jwks": jwks}


def sign_wpt(issued: dict[str, Path], audience: str, *extra: str) -> list[str]:
    result = custos(
        "wimse",
        "sign-wpt",
        "--store",
        "exportable",
        "--key-dir",
        str(issued["key_dir"]),
        "--name",
        "wl",
        "--wit",
        str(issued["wit"]),
        "--audience",
        audience,
        "--headers",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def verify_lines(
    issued: dict[str, Path], url: str, lines: list[str], *extra: str
) -> subprocess.CompletedProcess[str]:
    args: list[str] = []
    for line in lines:
        args += ["-H", line]
    return custos(
        "wimse",
        "verify",
        "--bundle",
        str(issued["jwks"]),
        "--trust-domain",
        "example.org",
        "--method",
        "POST",
        "--url",
        url,
        *args,
        *extra,
    )


def test_sign_wpt_then_verify(issued: dict[str, Path]) -> None:
    lines = sign_wpt(issued, "https://api.example.org/pay?ignored=1")
    assert [line.split(":", 1)[0] for line in lines] == ["Workload-Identity-Token", "Authorization"]
    assert lines[1].startswith("Authorization: WPT ")
    result = verify_lines(issued, "https://api.example.org/pay?amount=5", lines)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout) == {
        "sub": "spiffe://example.org/ns/shop/sa/web",
        "trust_domain": "example.org",
        "variant": "wpt",
    }
    # Another route on the same origin: the proof's aud does not match.
    other = verify_lines(issued, "https://api.example.org/payroll", lines)
    assert problem_of(other)["code"] == "wpt_bad_audience"
    # A JWKS that does not hold the CA key: the WIT is refused with a 400.
    stranger = MemoryKeyStore()
    stranger.create("ca", "ES256")
    write_json(issued["jwks"], {"keys": [dict(stranger.public_jwk("ca"), kid="ca-1")]})
    refused = verify_lines(issued, "https://api.example.org/pay", lines)
    assert problem_of(refused) == {
        "type": "urn:custos:problem:wit_bad_signature",
        "title": "Bad Request",
        "status": 400,
        "code": "wit_bad_signature",
    }


def test_sign_wpt_wpt01_form_with_txn_token(issued: dict[str, Path]) -> None:
    lines = sign_wpt(
        issued,
        "https://api.example.org/pay",
        "--wire",
        "wpt-01",
        "--txn-token",
        "txn.a.b",
        "--access-token",
        "at-42",
    )
    names = [line.split(":", 1)[0] for line in lines]
    assert names == [
        "Workload-Identity-Token",
        "Workload-Proof-Token",
        "Txn-Token",
        "Authorization",
    ]
    result = verify_lines(issued, "https://api.example.org/pay", lines)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["variant"] == "wpt"
    swapped = [line if not line.startswith("Txn-Token") else "Txn-Token: txn.a.c" for line in lines]
    assert problem_of(verify_lines(issued, "https://api.example.org/pay", swapped))["code"] == (
        "wpt_tth_mismatch"
    )


def test_sign_wpt_bare_token_and_no_wit(issued: dict[str, Path]) -> None:
    result = custos(
        "wimse",
        "sign-wpt",
        "--store",
        "exportable",
        "--key-dir",
        str(issued["key_dir"]),
        "--name",
        "wl",
        "--wit",
        str(issued["wit"]),
        "--audience",
        "https://api.example.org/x",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().count(".") == 2
    # A request with no WIT at all: a problem, not a traceback.
    bare = custos(
        "wimse",
        "verify",
        "--bundle",
        str(issued["jwks"]),
        "--method",
        "GET",
        "--url",
        "https://api.example.org/x",
        "-H",
        f"Authorization: WPT {result.stdout.strip()}",
    )
    assert problem_of(bare)["code"] == "wit_missing"


# -- jwt validate --


def test_jwt_validate(tmp_path: Path) -> None:
    ca = MemoryKeyStore()
    ca.create("jwt", "ES256")
    td = TrustDomain.parse("example.org")
    bundle = TrustBundle(
        td,
        jwt_authorities=(JwtAuthority("jwt-1", ca.get("jwt").public_key(), use=USE_JWT_SVID),),  # type: ignore[arg-type]
    )
    path = tmp_path / "bundle.json"
    path.write_text(bundle.to_spiffe_json())
    issued_at = datetime(2026, 1, 1, tzinfo=UTC)
    token = mint_jwt_svid(
        joserfc_key(ca.get("jwt")),
        "ES256",
        "jwt-1",
        SpiffeId.parse("spiffe://example.org/ns/shop/sa/web"),
        ["https://api.example.org"],
        timedelta(minutes=5),
        now=issued_at,
    )
    now = str(int(issued_at.timestamp()) + 60)
    ok = custos(
        "jwt",
        "validate",
        "--bundle",
        str(path),
        "--audience",
        "https://api.example.org",
        "--now",
        now,
        token,
    )
    assert ok.returncode == 0, (ok.stdout, ok.stderr)
    doc = json.loads(ok.stdout)
    assert doc["sub"] == "spiffe://example.org/ns/shop/sa/web"
    assert doc["aud"] == ["https://api.example.org"]
    assert doc["claims"]["sub"] == doc["sub"]
    assert doc["claims"]["iat"] == int(issued_at.timestamp())
    wrong = custos(
        "jwt",
        "validate",
        "--bundle",
        str(path),
        "--trust-domain",
        "example.org",
        "--audience",
        "https://evil.example.org",
        "--now",
        now,
        token,
    )
    assert problem_of(wrong)["code"] == "jwt_bad_audience"
    late = custos(
        "jwt",
        "validate",
        "--bundle",
        str(path),
        "--audience",
        "https://api.example.org",
        "--now",
        str(int(issued_at.timestamp()) + 3600),
        token,
    )
    assert problem_of(late)["code"] == "jwt_expired"


# -- review findings: hostile inputs give clear errors, never tracebacks ---------


def test_cli_hostile_bundle_and_clock_give_clear_errors(tmp_path: Path) -> None:
    bundle = tmp_path / "weird.json"
    bundle.write_text(json.dumps({"keys": [{"kty": "EC", "use": ["jwt-svid"]}]}))
    deep = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).rstrip(b"=").decode()
    verify = custos(
        "wimse",
        "verify",
        "--bundle",
        str(bundle),
        "--method",
        "GET",
        "--url",
        "https://a.example/x",
        "-H",
        f"Workload-Identity-Token: e30.{deep}.c2ln",
    )
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert json.loads(verify.stdout)["code"] == "wit_malformed"
    jwt = custos(
        "jwt",
        "validate",
        "--bundle",
        str(bundle),
        "--audience",
        "a",
        "--now",
        "1e20",
        "e30.e30.c2ln",
    )
    assert jwt.returncode == 2 and "Traceback" not in jwt.stderr and "--now" in jwt.stderr


# -- the operator's own input: problem JSON on stdout, the detail on stderr -------


@pytest.mark.parametrize(
    ("content", "trust_domain", "code"),
    [
        ("not json", "example.org", "bundle_invalid"),
        ("[1]", "example.org", "bundle_invalid"),
        ('{"keys": [{"kty": "oct", "kid": "h"}]}', "example.org", "bundle_invalid"),
        ('{"keys": []}', "Example.org", "trust_domain_invalid"),
        # without --trust-domain: the bundle is read after the token's sub is peeked
        ("not json", None, "bundle_invalid"),
    ],
)
def test_cli_unusable_bundle_or_trust_domain_gives_problem_json(
    tmp_path: Path, content: str, trust_domain: str | None, code: str
) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_text(content)
    wit_payload = base64.urlsafe_b64encode(b'{"sub":"spiffe://example.org/w"}').rstrip(b"=")
    args = ["wimse", "verify", "--bundle", str(bundle), "--method", "GET"]
    wit_header = f"Workload-Identity-Token: e30.{wit_payload.decode()}.c2ln"
    args += ["--url", "https://a.example/x", "-H", wit_header]
    if trust_domain is not None:
        args += ["--trust-domain", trust_domain]
    result = custos(*args)
    assert problem_of(result)["code"] == code
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    jwt = ["jwt", "validate", "--bundle", str(bundle), "--audience", "a"]
    jwt += ["--trust-domain", trust_domain] if trust_domain is not None else []
    jwt.append(f"e30.{wit_payload.decode()}.c2ln")
    assert problem_of(custos(*jwt))["code"] == code


# -- issue 7: --other-token, absolute audiences, JWT-SVID codes, unreadable files -------


def test_verify_other_token_names_the_tokens_understood(issued: dict[str, Path]) -> None:
    """A WPT whose ``oth`` binds a token the relying party does not know is
    refused; ``--other-token NAME`` (repeatable) names the ones it knows."""
    result = custos(
        "wimse",
        "sign-wpt",
        "--store",
        "exportable",
        "--key-dir",
        str(issued["key_dir"]),
        "--name",
        "wl",
        "--wit",
        str(issued["wit"]),
        "--audience",
        "https://api.example.org/pay",
        "--other-token",
        "X-Session=s-1",
        "--other-token",
        "X-Tenant=t-9",
        "--headers",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "X-Session: s-1" in lines and "X-Tenant: t-9" in lines
    unknown = verify_lines(issued, "https://api.example.org/pay", lines)
    assert problem_of(unknown)["code"] == "wpt_oth_unknown"
    only_one = verify_lines(
        issued, "https://api.example.org/pay", lines, "--other-token", "X-Session"
    )
    assert problem_of(only_one)["code"] == "wpt_oth_unknown"
    both = verify_lines(
        issued,
        "https://api.example.org/pay",
        lines,
        "--other-token",
        "X-Session",
        "--other-token",
        "x-tenant",
    )
    assert both.returncode == 0, (both.stdout, both.stderr)
    bad = verify_lines(issued, "https://api.example.org/pay", lines, "--other-token", "a b")
    assert bad.returncode == 2 and "--other-token" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "audience",
    [
        "/pay",
        "api.example.org/pay",
        "https:///pay",
        "",
        "https://api.example.org/p ay",
        "pay",
        # urlsplit raises ValueError("Invalid IPv6 URL") on these (audit of issue 7, item 12)
        "https://[::1/pay",
        "https://::1]/pay",
        "https://user:pw@api.example.org/pay",
    ],
)
def test_sign_wpt_audience_must_be_an_absolute_uri(issued: dict[str, Path], audience: str) -> None:
    result = custos(
        "wimse",
        "sign-wpt",
        "--store",
        "exportable",
        "--key-dir",
        str(issued["key_dir"]),
        "--name",
        "wl",
        "--wit",
        str(issued["wit"]),
        "--audience",
        audience,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--audience" in result.stderr and "absolute URI" in result.stderr
    assert "Traceback" not in result.stderr


def test_sign_wpt_takes_a_non_http_absolute_audience(issued: dict[str, Path]) -> None:
    aud = "spiffe://example.org/custos/server/agent/attest"
    result = custos(
        "wimse",
        "sign-wpt",
        "--store",
        "exportable",
        "--key-dir",
        str(issued["key_dir"]),
        "--name",
        "wl",
        "--wit",
        str(issued["wit"]),
        "--audience",
        aud,
        "--output",
        "json",
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"wpt", "headers"}
    payload = doc["wpt"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == aud
    assert [h[0] for h in doc["headers"]] == ["Workload-Identity-Token", "Authorization"]


def _special_files(tmp_path: Path) -> dict[str, Path]:
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    latin = tmp_path / "latin1.jwt"
    latin.write_bytes(b"\xe9t\xe9.\xff\xfe.x")
    return {"fifo": fifo, "zero": Path("/dev/zero"), "not_utf8": latin, "dir": tmp_path}


@pytest.mark.parametrize("kind", ["fifo", "zero", "not_utf8", "dir"])
def test_sign_wpt_unreadable_wit_file_is_a_clear_error(
    issued: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    wit = _special_files(tmp_path)[kind]
    result = custos(
        "wimse",
        "sign-wpt",
        "--store",
        "exportable",
        "--key-dir",
        str(issued["key_dir"]),
        "--name",
        "wl",
        "--wit",
        str(wit),
        "--audience",
        "https://api.example.org/pay",
    )
    assert result.returncode in (1, 2), (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert str(wit) in result.stderr or "--wit" in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "zero", "not_utf8"])
def test_verify_bundle_unreadable_or_body_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    special = _special_files(tmp_path)[kind]
    wit_payload = base64.urlsafe_b64encode(b'{"sub":"spiffe://example.org/w"}').rstrip(b"=")
    base = ["wimse", "verify", "--method", "POST", "--url", "https://a.example/x"]
    base += ["-H", f"Workload-Identity-Token: e30.{wit_payload.decode()}.c2ln"]
    bundle = write_json(tmp_path / "b.json", {"keys": []})
    as_bundle = custos(*base, "--bundle", str(special), "--trust-domain", "example.org")
    # A file that cannot be read is unreadable; bytes that are not strict UTF-8
    # JSON are an invalid bundle, as TrustBundle says.
    expected = "bundle_invalid" if kind == "not_utf8" else "bundle_unreadable"
    assert problem_of(as_bundle)["code"] == expected
    assert "Traceback" not in as_bundle.stderr
    if kind != "not_utf8":  # a body is bytes: any bytes are a body
        as_body = custos(*base, "--bundle", str(bundle), "--body-file", str(special))
        assert as_body.returncode in (1, 2) and "Traceback" not in as_body.stderr
        assert str(special) in as_body.stderr


def test_jwt_validate_errors_carry_jwt_svid_codes(tmp_path: Path) -> None:
    bundle = write_json(tmp_path / "b.json", {"keys": []})
    args = ["jwt", "validate", "--bundle", str(bundle), "--audience", "a"]
    not_a_jwt = custos(*args, "not-a-jwt")
    assert problem_of(not_a_jwt)["code"] == "jwt_malformed"
    payload = base64.urlsafe_b64encode(b'{"sub":"https://x"}').rstrip(b"=").decode()
    bad_sub = custos(*args, f"e30.{payload}.c2ln")
    assert problem_of(bad_sub)["code"] == "jwt_bad_subject"
    no_sub = custos(*args, "e30.e30.c2ln")
    assert problem_of(no_sub)["code"] in ("jwt_missing_claim", "jwt_malformed")
    assert not problem_of(no_sub)["code"].startswith("wit_")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_now_is_a_usage_error(tmp_path: Path, value: str) -> None:
    bundle = write_json(tmp_path / "b.json", {"keys": []})
    result = custos(
        "wimse",
        "verify",
        "--bundle",
        str(bundle),
        "--trust-domain",
        "example.org",
        "--now",
        value,
        "--method",
        "GET",
        "--url",
        "https://a.example/x",
    )
    assert result.returncode == 2 and "--now" in result.stderr
    assert "Traceback" not in result.stderr


def test_hostile_header_bytes_are_refused_clearly(tmp_path: Path) -> None:
    """Arguments that are not UTF-8 reach Python as lone surrogates; a header,
    URL or method made of them ends in problem JSON or a usage error."""
    import os
    import sys

    bundle = write_json(tmp_path / "b.json", {"keys": []})
    cases = [
        [b"-H", b"Workload-Identity-Token: \xff\xfe.e30.c2ln", b"--url", b"https://a.example/x"],
        [b"-H", b"X-\xe9: v", b"--url", b"https://a.example/x"],
        [b"--url", b"https://a.example/\xff"],
        [b"--url", b"https://\xff.example/x"],
        [b"-H", b"Authorization: WPT " + b"a" * 100_000, b"--url", b"https://a.example/x"],
    ]
    for extra in cases:
        argv = [os.fsencode(sys.executable), b"-m", b"custos", b"wimse", b"verify"]
        argv += [b"--bundle", os.fsencode(bundle), b"--trust-domain", b"example.org"]
        argv += [b"--method", b"GET", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTOS_")}
        env["PYTHONWARNINGS"] = "ignore"
        done = subprocess.run(argv, capture_output=True, timeout=120, env=env, check=False)
        stderr = done.stderr.decode("utf-8", "replace")
        assert done.returncode in (1, 2), (extra, done.stdout, stderr)
        assert "Traceback" not in stderr, (extra, stderr)
        if done.returncode == 1:
            assert json.loads(done.stdout)["code"]


# -- audit of issue 7: URLs urlsplit cannot parse, strict bundle JSON, the -06 form ------


@pytest.mark.parametrize(
    "url", ["https://[::1/pay", "https://::1]/pay", "https://[fe80::1%eth0]/x"]
)
def test_verify_unparsable_url_is_a_usage_error(tmp_path: Path, url: str) -> None:
    bundle = write_json(tmp_path / "b.json", {"keys": []})
    result = custos(
        "wimse",
        "verify",
        "--bundle",
        str(bundle),
        "--trust-domain",
        "example.org",
        "--method",
        "GET",
        "--url",
        url,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--url" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "why"),
    [
        # Python's json takes the last "keys"; the library's reader refuses both.
        ('{"keys": [], "keys": []}', "duplicate member"),
        ('{"keys": [], "x": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
        ('{"keys": [], "x": ' + "[" * 40 + "]" * 40 + "}", "nested too deeply"),
        ('{"keys": [], "spiffe_refresh_hint": NaN}', "NaN"),
    ],
)
def test_verify_reads_the_bundle_with_the_strict_json_reader(
    tmp_path: Path, content: str, why: str
) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_text(content)
    base = ["--bundle", str(bundle), "--trust-domain", "example.org"]
    verify = custos("wimse", "verify", *base, "--method", "GET", "--url", "https://a.example/x")
    assert problem_of(verify)["code"] == "bundle_invalid"
    assert why in verify.stderr and "Traceback" not in verify.stderr
    jwt = custos("jwt", "validate", *base, "--audience", "a", "e30.e30.c2ln")
    assert problem_of(jwt)["code"] == "bundle_invalid"
    assert why in jwt.stderr


def test_verify_accept_draft_06_lets_the_old_signature_form_in(tmp_path: Path) -> None:
    store = MemoryKeyStore()
    store.create("issuer", "EdDSA")
    jwks = write_json(
        tmp_path / "issuer.json", {"keys": [dict(store.public_jwk("issuer"), kid="issuer-key")]}
    )
    wit = svc_wit(store, "wimse://example.com/svcA")
    request = HttpMessage.request(
        "GET", "/gimme-ice-cream?flavor=vanilla", [("Host", "svcb.example.com")]
    )
    signed = sign_request(
        request,
        signer=Ed25519JwkSigner(SVC_A_D),
        wit=wit,
        audience="https://svcb.example.com/gimme-ice-cream",
        created=1785155797,
        ttl=300,
        form="draft-06",
    )
    assert '"@request-target"' in dict(signed.headers)["Signature-Input"]

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return custos(
            "wimse",
            "verify",
            "--bundle",
            str(jwks),
            "--trust-domain",
            "example.com",
            "--now",
            SIG_NOW,
            "--method",
            "GET",
            "--url",
            SIG_URL,
            *header_args(dict(signed.headers)),
            *extra,
        )

    assert problem_of(verify())["code"] == "draft06_form_refused"
    accepted = verify("--accept-draft-06")
    assert accepted.returncode == 0, (accepted.stdout, accepted.stderr)
    assert json.loads(accepted.stdout)["variant"] == "http-signature"
    assert "--accept-draft-06" in custos("wimse", "verify", "--help").stdout
