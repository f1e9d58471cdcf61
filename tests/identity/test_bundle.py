"""Trust bundles: SPIFFE bundle JSON and plain JWKS, round trips, spec rules on
consumption, refusal of private or malformed keys, and bundle sets."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc.jwk import ECKey, RSAKey

from custos.bundle import (
    BundleError,
    BundleSet,
    JwtAuthority,
    TrustBundle,
)
from custos.identity import SpiffeId, TrustDomain
from custos.keys.jwk import public_jwk_members
from custos.x509 import CertificateAuthority

TD = TrustDomain("example.org")
OTHER = TrustDomain("other.example")


def _root(td: TrustDomain = TD) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return CertificateAuthority.self_signed(key, td, ttl=timedelta(days=1)).certificate


def _ec_auth(kid: str, use: str | None = "jwt-svid") -> JwtAuthority:
    return JwtAuthority(kid, ec.generate_private_key(ec.SECP256R1()).public_key(), use=use)


@pytest.fixture(scope="module")
def rsa_pub() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


def _b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def _x509_entry(cert: x509.Certificate) -> dict[str, Any]:
    return {"use": "x509-svid", **public_jwk_members(cert.public_key()), "x5c": [_b64(cert)]}


# ------------------------------------------------------------------ round trips


def test_spiffe_json_roundtrip(rsa_pub: rsa.RSAPublicKey) -> None:
    root = _root()
    bundle = TrustBundle(
        TD,
        (root,),
        (
            _ec_auth("ec-1"),
            JwtAuthority("rsa-1", rsa_pub, use="jwt-svid", alg="RS256"),
            JwtAuthority("ed-1", ed25519.Ed25519PrivateKey.generate().public_key(), use="wit-svid"),
        ),
        sequence=7,
        refresh_hint=300,
    )
    text = bundle.to_spiffe_json()
    doc = json.loads(text)
    assert doc["spiffe_sequence"] == 7
    assert doc["spiffe_refresh_hint"] == 300
    x509_entries = [k for k in doc["keys"] if k["use"] == "x509-svid"]
    assert len(x509_entries) == 1
    assert "kid" not in x509_entries[0]  # spec 6.1: x509-svid entries MUST NOT set kid
    assert base64.b64decode(x509_entries[0]["x5c"][0]) == root.public_bytes(Encoding.DER)
    assert {k["kid"] for k in doc["keys"] if "kid" in k} == {"ec-1", "rsa-1", "ed-1"}
    assert all("d" not in k for k in doc["keys"])

    again = TrustBundle.from_spiffe_json(TD, text)
    assert again == bundle
    assert again.jwt_authority("rsa-1") is not None
    assert again.jwt_authority("rsa-1").alg == "RS256"  # type: ignore[union-attr]
    assert again.jwt_authority("ed-1").use == "wit-svid"  # type: ignore[union-attr]
    assert TrustBundle.from_spiffe_json(TD, text.encode()) == bundle


def test_jwt_authority_jwk_members() -> None:
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    auth = JwtAuthority("k1", public, "jwt-svid", "ES384")
    jwk = auth.jwk()
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-384"
    assert jwk["kid"] == "k1" and jwk["use"] == "jwt-svid" and jwk["alg"] == "ES384"
    assert set(_ec_auth("x", use=None).jwk()) == {"kty", "crv", "x", "y", "kid"}


def test_authority_without_use_is_published_for_both_uses() -> None:
    bundle = TrustBundle(TD, jwt_authorities=(_ec_auth("k", use=None),))
    doc = json.loads(bundle.to_spiffe_json())
    assert [k["use"] for k in doc["keys"]] == ["jwt-svid", "wit-svid"]
    assert {k["kid"] for k in doc["keys"]} == {"k"}
    assert "spiffe_sequence" not in doc


def test_save_and_load(tmp_path: Path) -> None:
    bundle = TrustBundle(TD, (_root(),), (_ec_auth("k"),), sequence=1)
    path = tmp_path / "bundle.json"
    bundle.save(path)
    assert TrustBundle.load(TD, path) == bundle
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.json"]  # no temp file left
    with pytest.raises(BundleError, match="does not exist"):
        TrustBundle.load(TD, tmp_path / "missing.json")
    with pytest.raises(BundleError, match="cannot write"):
        bundle.save(tmp_path / "no-such-dir" / "b.json")


# ------------------------------------------------------------------ spec consumption rules


def test_unknown_or_missing_use_is_ignored_in_spiffe_bundles() -> None:
    auth = _ec_auth("k")
    jwk = auth.jwk()
    doc = {
        "keys": [
            {**jwk, "use": "future-svid"},
            {k: v for k, v in jwk.items() if k != "use"},
            {**_ec_auth("j").jwk()},
        ]
    }
    bundle = TrustBundle.from_spiffe_json(TD, json.dumps(doc))
    assert [a.kid for a in bundle.jwt_authorities] == ["j"]


def test_x509_entry_without_x5c_is_ignored_and_extra_certs_are_ignored() -> None:
    root, other = _root(), _root()
    entry = _x509_entry(root)
    entry["x5c"].append(_b64(other))
    doc = {"keys": [entry, {"use": "x509-svid", "kty": "EC"}, {"use": "x509-svid", "x5c": []}]}
    bundle = TrustBundle.from_spiffe_json(TD, json.dumps(doc))
    assert bundle.x509_authorities == (root,)


def test_wit_svid_key_is_not_a_jwt_svid_authority() -> None:
    wit = _ec_auth("shared", use="wit-svid")
    bundle = TrustBundle(TD, jwt_authorities=(wit,))
    assert bundle.jwt_authority("shared") == wit
    assert bundle.jwt_authority("shared", use="wit-svid") == wit
    assert bundle.jwt_authority("shared", use="jwt-svid") is None
    any_use = _ec_auth("plain", use=None)
    assert bundle.with_jwt_authority(any_use).jwt_authority("plain", use="jwt-svid") == any_use


def test_from_jwks_accepts_keys_without_use_and_preserves_use() -> None:
    a, b, enc = _ec_auth("a", use=None), _ec_auth("b", use="sig"), _ec_auth("c", use="enc")
    doc = {"keys": [a.jwk(), b.jwk(), enc.jwk()]}
    bundle = TrustBundle.from_jwks(TD, json.dumps(doc))
    assert bundle.jwt_authorities == (a, b)
    assert bundle.jwt_authority("a").use is None  # type: ignore[union-attr]
    assert bundle.jwt_authority("b").use == "sig"  # type: ignore[union-attr]


# ------------------------------------------------------------------ refusals


def test_private_ec_key_in_bundle_is_rejected() -> None:
    private = ECKey.generate_key("P-256").as_dict(private=True)
    assert "d" in private
    doc = {"keys": [{**private, "kid": "leak", "use": "jwt-svid"}]}
    with pytest.raises(BundleError, match=r"private key material \(d\)") as info:
        TrustBundle.from_spiffe_json(TD, json.dumps(doc))
    assert info.value.code == "invalid_bundle"
    # even where the entry would otherwise be ignored, and in a plain JWKS
    with pytest.raises(BundleError, match="private key material"):
        TrustBundle.from_spiffe_json(TD, json.dumps({"keys": [{**private, "use": "other"}]}))
    with pytest.raises(BundleError, match="private key material"):
        TrustBundle.from_jwks(TD, json.dumps({"keys": [{**private, "kid": "k"}]}))


def test_private_rsa_key_and_symmetric_key_are_rejected() -> None:
    private = RSAKey.generate_key(2048).as_dict(private=True)
    with pytest.raises(BundleError, match="private key material"):
        TrustBundle.from_jwks(TD, json.dumps({"keys": [{**private, "kid": "r"}]}))
    # An 'oct' key has its secret in "k": refused (it would enable HMAC forgery).
    with pytest.raises(BundleError, match="private key material"):
        hmac_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "h"}
        TrustBundle.from_jwks(TD, json.dumps({"keys": [hmac_key]}))
    with pytest.raises(BundleError, match="symmetric"):
        TrustBundle.from_jwks(TD, json.dumps({"keys": [{"kty": "oct", "kid": "h"}]}))


def _jwt_entry(**overrides: Any) -> dict[str, Any]:
    entry = _ec_auth("k").jwk()
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[]", "not a JSON object"),
        ("{}", "no 'keys' list"),
        ('{"keys": {}}', "no 'keys' list"),
        ('{"keys": ["x"]}', "not a JSON object"),
        ('{"keys": [], "spiffe_sequence": -1}', "must be an integer in 0"),
        ('{"keys": [], "spiffe_sequence": true}', "must be an integer in 0"),
        ('{"keys": [], "spiffe_refresh_hint": "60"}', "must be an integer in 0"),
        ('{"keys": [], "spiffe_sequence": 18446744073709551616}', "must be an integer in 0"),
        (json.dumps({"keys": [_jwt_entry(kid=None)]}), "needs a non-empty 'kid'"),
        (json.dumps({"keys": [_jwt_entry(kid="")]}), "needs a non-empty 'kid'"),
        (json.dumps({"keys": [_jwt_entry(use=5)]}), "'use' must be a string"),
        (json.dumps({"keys": [_jwt_entry(alg=5)]}), "'alg' must be a string"),
        (json.dumps({"keys": [_jwt_entry(kty=None)]}), "needs a 'kty'"),
        (json.dumps({"keys": [_jwt_entry(y=None)]}), "'y' is missing"),
        (json.dumps({"keys": [_jwt_entry(x=7)]}), "'x' is missing or not a string"),
        (json.dumps({"keys": [_jwt_entry(crv="P-999")]}), "invalid EC key"),
        (
            json.dumps(
                {
                    "keys": [
                        {
                            "kty": "EC",
                            "crv": "P-256",
                            "x": "AAAA",
                            "y": "AAAA",
                            "kid": "k",
                            "use": "jwt-svid",
                        }
                    ]
                }
            ),
            "invalid EC key",
        ),
        (
            json.dumps({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["!!notbase64"]}]}),
            "does not hold a DER certificate",
        ),
        (
            json.dumps({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["AAAA"]}]}),
            "does not hold a DER certificate",
        ),
        (json.dumps({"keys": [{"use": "x509-svid", "x5c": "AAAA"}]}), "list of base64"),
    ],
)
def test_malformed_bundles_are_rejected(data: str | bytes, fragment: str) -> None:
    with pytest.raises(BundleError, match=fragment):
        TrustBundle.from_spiffe_json(TD, data)


def test_small_rsa_key_is_rejected() -> None:
    small = public_jwk_members(rsa.generate_private_key(65537, 1024).public_key())
    doc = {"keys": [{**small, "kid": "weak", "use": "jwt-svid"}]}
    with pytest.raises(BundleError, match="at least 2048 needed"):
        TrustBundle.from_spiffe_json(TD, json.dumps(doc))


def test_non_signing_okp_key_is_rejected() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.serialization import PublicFormat

    public = x25519.X25519PrivateKey.generate().public_key()
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    entry = {
        "kty": "OKP",
        "crv": "X25519",
        "x": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "kid": "x",
        "use": "jwt-svid",
    }
    with pytest.raises(BundleError, match="unsupported OKP curve"):
        TrustBundle.from_spiffe_json(TD, json.dumps({"keys": [entry]}))


def test_x5c_must_match_the_jwk_members() -> None:
    root, other = _root(), _root()
    entry = _x509_entry(root)
    entry.update(public_jwk_members(other.public_key()))  # key members of another CA
    with pytest.raises(BundleError, match="does not match the x5c"):
        TrustBundle.from_spiffe_json(TD, json.dumps({"keys": [entry]}))


def test_conflicting_kids_are_rejected_and_duplicates_merged() -> None:
    a1, a2 = _ec_auth("same"), _ec_auth("same")
    with pytest.raises(BundleError, match="share kid 'same'"):
        TrustBundle(TD, jwt_authorities=(a1, a2))
    with pytest.raises(BundleError, match="share kid"):
        TrustBundle.from_spiffe_json(TD, json.dumps({"keys": [a1.jwk(), a2.jwk()]}))
    assert TrustBundle(TD, jwt_authorities=(a1, a1)).jwt_authorities == (a1,)
    root = _root()
    assert TrustBundle(TD, (root, root)).x509_authorities == (root,)


def test_bundle_is_immutable() -> None:
    bundle = TrustBundle(TD)
    root = _root()
    grown = bundle.with_x509_authority(root).with_jwt_authority(_ec_auth("k"))
    assert bundle.x509_authorities == () and bundle.jwt_authorities == ()
    assert grown.x509_authorities == (root,)
    assert grown.without_x509_authority(root).x509_authorities == ()
    assert grown.without_jwt_authority("k").jwt_authority("k") is None
    assert grown.with_sequence(3).sequence == 3
    with pytest.raises(AttributeError):
        grown.sequence = 5  # type: ignore[misc]


def test_bundle_rejects_bad_values() -> None:
    with pytest.raises(BundleError):
        TrustBundle(42)  # type: ignore[arg-type]
    with pytest.raises(BundleError):
        TrustBundle(TD, sequence=-1)
    with pytest.raises(BundleError, match="non-empty 'kid'"):
        _ec_auth("")


# ------------------------------------------------------------------ bundle sets


def test_bundle_set() -> None:
    a = TrustBundle(TD, sequence=1)
    b = TrustBundle(OTHER)
    bundles = BundleSet([a])
    bundles.add(b)
    assert TD in bundles and OTHER in bundles
    assert TrustDomain("nope.example") not in bundles
    assert bundles.get(TD) is a
    assert bundles.get(TrustDomain("nope.example")) is None
    assert set(bundles.trust_domains()) == {TD, OTHER}
    assert set(b.trust_domain for b in bundles) == {TD, OTHER}
    assert len(bundles) == 2
    newer = TrustBundle(TD, sequence=2)
    bundles.add(newer)
    assert bundles.get(TD) is newer and len(bundles) == 2
    bundles.remove(OTHER)
    assert OTHER not in bundles
    with pytest.raises(BundleError):
        bundles.add("not a bundle")  # type: ignore[arg-type]


def test_unknown_key_type_entries_are_ignored() -> None:
    # SPIFFE bundle 4.2.1 / RFC 7517 5: a key type the client does not
    # understand is skipped, and the rest of the bundle still loads.
    doc = {
        "keys": [
            {"kty": "AKP", "use": "jwt-svid", "kid": "pq", "alg": "ML-DSA-44", "pub": "AAAA"},
            _jwt_entry(),
        ]
    }
    for parse in (TrustBundle.from_spiffe_json, TrustBundle.from_jwks):
        bundle = parse(TD, json.dumps(doc))
        assert [a.kid for a in bundle.jwt_authorities] == [_jwt_entry()["kid"]]


def test_symmetric_keys_are_still_refused() -> None:
    # The secret member is refused as private material; without it, the
    # symmetric key type itself is refused.
    doc = {"keys": [{"kty": "oct", "use": "jwt-svid", "kid": "h", "k": "c2VjcmV0"}]}
    with pytest.raises(BundleError, match="private key material"):
        TrustBundle.from_spiffe_json(TD, json.dumps(doc))
    doc = {"keys": [{"kty": "oct", "use": "jwt-svid", "kid": "h"}]}
    with pytest.raises(BundleError, match="symmetric"):
        TrustBundle.from_spiffe_json(TD, json.dumps(doc))


# -- issue 7: bounded reads, the obvious way works for WITs, one JWK import ----------


def test_bundle_file_that_is_a_fifo_or_a_device_is_a_clear_error(tmp_path: Path) -> None:
    # item 9: open() on a FIFO without a writer blocks forever; /dev/zero never ends.
    import os

    fifo = tmp_path / "bundle.fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(BundleError) as info:
            TrustBundle.load(TD, path)
        assert "not a regular file" in info.value.message
        assert info.value.code == "bundle_unreadable"


def test_oversized_bundle_file_is_refused_before_parsing(tmp_path: Path) -> None:
    from custos.bundle.bundle import MAX_BUNDLE_BYTES

    path = tmp_path / "big.json"
    path.write_bytes(b" " * (MAX_BUNDLE_BYTES + 1))
    with pytest.raises(BundleError, match="larger than") as info:
        TrustBundle.load(TD, path)
    assert info.value.code == "bundle_unreadable"


def test_jwks_saved_the_obvious_way_still_verifies_wits(tmp_path: Path) -> None:
    """New-user finding: from_jwks(...).save(...) used to write every key as
    jwt-svid only, and every WIT then failed with wit_key_wrong_use."""
    from joserfc.jwk import ECKey as JoseECKey

    from custos.wimse.wit import mint_wit, verify_wit

    issuer = JoseECKey.generate_key("P-256")
    workload = JoseECKey.generate_key("P-256")
    jwks = {"keys": [{**issuer.as_dict(private=False), "kid": "ca-1"}]}
    path = tmp_path / "bundle.json"
    TrustBundle.from_jwks(TD, json.dumps(jwks)).save(path)

    doc = json.loads(path.read_text())
    # One entry per use, as SPIFFE bundles publish a key meant for both.
    assert sorted(k["use"] for k in doc["keys"]) == ["jwt-svid", "wit-svid"]
    loaded = TrustBundle.load(TD, path)
    assert loaded.jwt_authority("ca-1", use="wit-svid").use == "wit-svid"  # type: ignore[union-attr]
    assert loaded.jwt_authority("ca-1", use="jwt-svid").use == "jwt-svid"  # type: ignore[union-attr]

    sub = SpiffeId.parse("spiffe://example.org/w")
    cnf = {**workload.as_dict(private=False), "alg": "ES256"}
    token = mint_wit(issuer, "ES256", "ca-1", sub, cnf, timedelta(minutes=5))
    assert verify_wit(token, BundleSet([loaded])).subject == sub
    # ... and under the SPIFFE WIT-SVID profile, which wants use: wit-svid.
    assert verify_wit(token, BundleSet([loaded]), profile="spiffe").subject == sub


def test_from_jwks_can_give_keys_one_use() -> None:
    auth = _ec_auth("k", use=None)
    other = {**_ec_auth("j").jwk(), "use": "sig"}
    bundle = TrustBundle.from_jwks(TD, {"keys": [auth.jwk(), other]}, use="wit-svid")
    assert bundle.jwt_authority("k").use == "wit-svid"  # type: ignore[union-attr]
    assert bundle.jwt_authority("j").use == "sig"  # an explicit use is kept
    doc = bundle.to_spiffe_dict()
    assert [k["use"] for k in doc["keys"] if k["kid"] == "k"] == ["wit-svid"]
    with pytest.raises(BundleError, match="use"):
        TrustBundle.from_jwks(TD, {"keys": []}, use="x509-svid")


def test_duplicate_members_in_a_bundle_are_refused() -> None:
    entry = json.dumps(_ec_auth("k").jwk())
    text = '{"keys": [' + entry[:-1] + ', "kid": "other"}]}'
    with pytest.raises(BundleError, match="not valid JSON"):
        TrustBundle.from_spiffe_json(TD, text)
    with pytest.raises(BundleError, match="not valid JSON"):
        TrustBundle.from_jwks(TD, '{"keys": [], "keys": [' + entry + "]}")


def test_weak_keys_are_refused_in_bundles() -> None:
    identity = base64.urlsafe_b64encode(bytes([1]) + bytes(31)).decode().rstrip("=")
    entry = {"kty": "OKP", "crv": "Ed25519", "x": identity, "kid": "e", "use": "wit-svid"}
    with pytest.raises(BundleError, match="small-order"):
        TrustBundle.from_spiffe_json(TD, json.dumps({"keys": [entry]}))
    with pytest.raises(BundleError, match="small-order"):
        JwtAuthority("e", ed25519.Ed25519PublicKey.from_public_bytes(bytes([1]) + bytes(31)))
    good = _ec_auth("k").jwk()
    x = base64.urlsafe_b64decode(good["x"] + "==")
    padded = {**good, "x": base64.urlsafe_b64encode(b"\0" + x).decode().rstrip("=")}
    with pytest.raises(BundleError, match="exactly 32 bytes"):
        TrustBundle.from_spiffe_json(TD, json.dumps({"keys": [padded]}))


def test_plain_trust_domain_strings_are_accepted(tmp_path: Path) -> None:
    bundle = TrustBundle("example.org", jwt_authorities=(_ec_auth("k"),))  # type: ignore[arg-type]
    assert bundle.trust_domain == TD
    assert TrustBundle.from_jwks("spiffe://example.org", {"keys": []}).trust_domain == TD
    bundle.save(tmp_path / "b.json")
    assert TrustBundle.load("example.org", tmp_path / "b.json") == bundle
    bundles = BundleSet([bundle])
    assert bundles.get("example.org") is bundle
    assert "example.org" in bundles
    with pytest.raises(BundleError, match="trust domain"):
        TrustBundle("Example.org")  # type: ignore[arg-type]


@pytest.mark.timeout(120)  # a hang guard, not a timing assertion: linear work takes ~1 s
def test_many_entries_do_not_make_loading_quadratic() -> None:
    # A federated bundle is fetched from another domain: 4 MiB of entries that
    # share one key under many kids (or one kid under many algs) used to cost
    # a thumbprint per pair of entries (2,000 entries: about a minute).
    members = public_jwk_members(ec.generate_private_key(ec.SECP256R1()).public_key())
    kids = [{**members, "kid": f"k{i}", "use": "jwt-svid"} for i in range(6000)]
    algs = [{**members, "kid": "same", "alg": f"A{i}"} for i in range(6000)]
    bundle = TrustBundle.from_spiffe_json(TD, json.dumps({"keys": kids}))
    assert len(bundle.jwt_authorities) == 6000
    assert len(TrustBundle.from_jwks(TD, json.dumps({"keys": algs})).jwt_authorities) == 6000
    # the conflict rule still holds for entries far apart
    other = public_jwk_members(ec.generate_private_key(ec.SECP256R1()).public_key())
    clash = [*algs, {**other, "kid": "same", "alg": "B"}]
    with pytest.raises(BundleError, match="share kid 'same'"):
        TrustBundle.from_jwks(TD, json.dumps({"keys": clash}))
