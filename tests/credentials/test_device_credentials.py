"""Credentials signed through real devices, end to end: swtpm (TpmKeyStore) and
SoftHSM2 (Pkcs11KeyStore), never a software key.

- X.509: a root CA whose key is in one device, an intermediate in the other, an
  X509-SVID issued from a CSR signed by a device workload key; custos'
  verifier and the ``openssl verify`` CLI both accept the chain;
- JWT-SVIDs minted by device keys validate with custos and with PyJWT;
- WITs minted by an issuer key in one device for a workload key in the other
  (every pairing), WPTs signed by the workload's device key, replay refused;
- WIMSE HTTP message signatures (request and signed response) by device keys;
- the httpx client auth (both variants) with its keys in the TPM, against a
  relying party built with ``build_request_verifier``;
- while all this happens, no device key hands out its private half.

The stores are opened once per module (one TPM connection, one PKCS#11 login)
and keys are made once per (device, algorithm, role): the PKCS#11 token is
shared by the whole session, so names carry a random suffix and the keys are
deleted at the end.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID
from joserfc import jws

from custos.bundle import USE_JWT_SVID, USE_WIT_SVID, BundleSet, JwtAuthority, TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.integrations.auth import WimseAuth
from custos.integrations.problem import http_status
from custos.jwtsvid import JwtBadSignatureError, mint_jwt_svid, validate_jwt_svid
from custos.keys import (
    Algorithm,
    ExportRefusedError,
    KeyStore,
    StoreKey,
    UnsupportedAlgorithmError,
)
from custos.keys.jose import joserfc_key
from custos.keys.pkcs11 import Pkcs11KeyStore
from custos.keys.tpm import TpmKeyStore
from custos.testing.softhsm import SoftHSMToken
from custos.testing.swtpm import SwtpmInstance
from custos.wimse.digest import ContentDigestMismatchError
from custos.wimse.errors import ReplayError, WimseError, WptError, WptReplayError
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import HttpSignatureVerifier, sign_request, sign_response
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.signer import LocalProofSigner
from custos.wimse.verifier import build_request_verifier
from custos.wimse.wit import (
    VerifiedWit,
    WitVerifier,
    b64url_decode_strict,
    json_object_strict,
    mint_wit,
)
from custos.wimse.wpt import WptMintError, WptVerifier, create_wpt, wpt_headers
from custos.x509 import CertificateAuthority, X509SvidUntrustedError, verify_x509_svid

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
SERVER = SpiffeId.parse("spiffe://example.org/ns/prod/sa/api")
ORIGIN = "https://api.example.org"
JWT_AUD = "spiffe://example.org/api"
# "Now" is pinned for the verifiers (so replay caches and clocks agree) but is
# the real time, so PyJWT, which always reads the real clock, agrees too.
NOW = int(time.time())

TPM, P11 = "tpm", "pkcs11"


# -- the devices -----------------------------------------------------------------------


class Devices:
    """One TPM store and one PKCS#11 store, and the keys made in them (memoized)."""

    def __init__(self, tpm: TpmKeyStore, hsm: Pkcs11KeyStore) -> None:
        self.stores: dict[str, KeyStore] = {TPM: tpm, P11: hsm}
        self.keys: dict[tuple[str, str, str], StoreKey] = {}

    def key(self, device: str, alg: str, role: str = "k") -> StoreKey:
        """The key for (device, alg, role), made on first use."""
        memo = (device, alg, role)
        if memo not in self.keys:
            store = self.stores[device]
            name = f"cred-{role}-{alg.lower()}-{uuid.uuid4().hex[:12]}"
            store.create(name, alg)
            self.keys[memo] = store.get(name)
        return self.keys[memo]

    def close(self) -> None:
        hsm = self.stores[P11]
        try:
            for (device, _, _), key in self.keys.items():
                if device == P11:
                    hsm.delete(key.name)
        finally:
            for store in self.stores.values():
                store.close()


@pytest.fixture(scope="module")
def devices(
    swtpm: SwtpmInstance, softhsm_session: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Devices]:
    tpm = TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path_factory.mktemp("tpm-keys"))
    try:
        hsm = Pkcs11KeyStore(module=softhsm_session.module, uri=softhsm_session.uri)
    except BaseException:
        tpm.close()
        raise
    devs = Devices(tpm, hsm)
    yield devs
    devs.close()


def assert_sealed(*keys: StoreKey) -> None:
    """Every way ``cryptography`` offers to read a private key refuses."""
    for key in keys:
        private = key.private_key()
        with pytest.raises(ExportRefusedError):
            private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        with pytest.raises(ExportRefusedError):
            private.private_bytes(
                Encoding.DER,
                PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"a passphrase"),
            )
        if isinstance(private, ed25519.Ed25519PrivateKey):
            with pytest.raises(ExportRefusedError):
                private.private_bytes_raw()
        else:
            with pytest.raises(ExportRefusedError):
                private.private_numbers()
        if isinstance(private, ec.EllipticCurvePrivateKey):
            peer = ec.generate_private_key(private.curve).public_key()
            with pytest.raises(ExportRefusedError):
                private.exchange(ec.ECDH(), peer)


def spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der


def header_of(token: str) -> dict[str, Any]:
    return json_object_strict(b64url_decode_strict(token.split(".")[0]))


def flip_signature(token: str) -> str:
    """The token with one character inside the signature changed (never the
    last one: its low bits may be padding that decodes to the same bytes)."""
    head, body, sig = token.split(".")
    i = len(sig) // 2
    sig = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]
    return f"{head}.{body}.{sig}"


def wit_bundles(issuer: StoreKey, kid: str) -> BundleSet:
    authority = JwtAuthority(kid, issuer.public_key(), use=USE_WIT_SVID)  # type: ignore[arg-type]
    return BundleSet([TrustBundle(TD, jwt_authorities=(authority,))])


def device_wit(issuer: StoreKey, kid: str, subject: SpiffeId, workload: StoreKey, **kw: Any) -> str:
    """A WIT signed in the issuer's device for the workload's device key."""
    return mint_wit(
        joserfc_key(issuer),
        str(issuer.alg),
        kid,
        subject,
        workload.public_jwk(),
        timedelta(hours=1),
        **kw,
    )


# -- 1. X.509: root, intermediate and the SVID's CSR all signed in devices -------------------


def device_csr(key: StoreKey) -> bytes:
    """A CSR signed by the device key (proof of possession made in the device)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    )
    hash_alg = None if key.alg == Algorithm.EdDSA else key.alg.spec.hash_algorithm()
    csr = builder.sign(key.private_key(), hash_alg)  # type: ignore[arg-type]
    assert csr.is_signature_valid
    return csr.public_bytes(Encoding.PEM)


def openssl_verify(tmp: Path, root: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> str:
    """``openssl verify`` of the leaf, the root as the only trust anchor and the
    intermediates as untrusted; ``-x509_strict`` adds OpenSSL's RFC 5280 profile
    checks. Returns the combined output; raises if OpenSSL refuses."""
    (tmp / "root.pem").write_bytes(root.public_bytes(Encoding.PEM))
    (tmp / "inter.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain[1:]))
    (tmp / "leaf.pem").write_bytes(chain[0].public_bytes(Encoding.PEM))
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp / "root.pem")]
    if len(chain) > 1:
        args += ["-untrusted", str(tmp / "inter.pem")]
    result = subprocess.run(
        [*args, str(tmp / "leaf.pem")], capture_output=True, text=True, timeout=30, check=False
    )
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"openssl verify refused the chain:\n{out}")
    return out


CA_PAIRS = [
    # (root device, root alg), (intermediate device, intermediate alg)
    pytest.param((P11, "ES256"), (TPM, "ES256"), id="root-p11-es256_inter-tpm-es256"),
    pytest.param((TPM, "ES384"), (P11, "ES384"), id="root-tpm-es384_inter-p11-es384"),
    # The one RSA case: a TPM PS256 intermediate signs certificates with RSASSA-PSS.
    pytest.param((P11, "ES384"), (TPM, "PS256"), id="root-p11-es384_inter-tpm-ps256"),
]
LEAF_KEYS = [
    pytest.param((TPM, "ES256"), id="leaf-tpm-es256"),
    pytest.param((TPM, "ES384"), id="leaf-tpm-es384"),
    pytest.param((P11, "EdDSA"), id="leaf-p11-eddsa"),
]


@pytest.mark.parametrize("leaf_dev", LEAF_KEYS)
@pytest.mark.parametrize(("root_dev", "inter_dev"), CA_PAIRS)
def test_x509_svid_chain_signed_in_devices(
    devices: Devices,
    tmp_path: Path,
    root_dev: tuple[str, str],
    inter_dev: tuple[str, str],
    leaf_dev: tuple[str, str],
) -> None:
    root_key = devices.key(*root_dev, role="root")
    inter_key = devices.key(*inter_dev, role="inter")
    workload = devices.key(*leaf_dev, role="svid")

    root = CertificateAuthority.self_signed(
        root_key.private_key(),  # type: ignore[arg-type]
        TD,
        ttl=timedelta(days=1),
    )
    inter = CertificateAuthority.intermediate(
        inter_key.private_key(),  # type: ignore[arg-type]
        TD,
        root,
        timedelta(hours=6),
    )
    svid = inter.sign_x509_svid(
        device_csr(workload), WORKLOAD, timedelta(minutes=30), dns_names=["web.example.org"]
    )

    # Every signature in the chain was made in a device, and checks.
    root.certificate.verify_directly_issued_by(root.certificate)
    inter.certificate.verify_directly_issued_by(root.certificate)
    svid.leaf.verify_directly_issued_by(inter.certificate)
    assert svid.cert_chain == (svid.leaf, inter.certificate)
    # The SVID certifies the device key itself, and the CAs their device keys.
    assert spki(svid.leaf.public_key()) == spki(workload.public_key())
    assert spki(inter.certificate.public_key()) == spki(inter_key.public_key())
    assert spki(root.certificate.public_key()) == spki(root_key.public_key())

    bundles = BundleSet([TrustBundle(TD, (root.certificate,))])
    assert verify_x509_svid(svid.cert_chain, bundles) == WORKLOAD
    # No -partial_chain: the root is self-signed and is the trust anchor, so
    # OpenSSL builds the whole path leaf -> intermediate -> root.
    out = openssl_verify(tmp_path, root.certificate, svid.cert_chain)
    assert "leaf.pem: OK" in out

    # Negative: a root of the same name made by another device key is not this
    # trust domain's authority; neither verifier lets it vouch for the chain.
    other_root = CertificateAuthority.self_signed(
        devices.key(P11, "ES256", role="rogue-root").private_key(),  # type: ignore[arg-type]
        TD,
        ttl=timedelta(days=1),
        subject=root.certificate.subject,
    )
    with pytest.raises(X509SvidUntrustedError):
        verify_x509_svid(svid.cert_chain, BundleSet([TrustBundle(TD, (other_root.certificate,))]))
    with pytest.raises(AssertionError, match="openssl verify refused"):
        openssl_verify(tmp_path, other_root.certificate, svid.cert_chain)

    assert_sealed(root_key, inter_key, workload)


def test_openssl_needs_the_intermediate(devices: Devices, tmp_path: Path) -> None:
    """Without the (untrusted) intermediate OpenSSL has no path to the root: the
    positive test above passes because the chain is complete, not by accident."""
    root = CertificateAuthority.self_signed(
        devices.key(P11, "ES256", role="root").private_key(),  # type: ignore[arg-type]
        TD,
        ttl=timedelta(days=1),
    )
    inter = CertificateAuthority.intermediate(
        devices.key(TPM, "ES256", role="inter").private_key(),  # type: ignore[arg-type]
        TD,
        root,
        timedelta(hours=1),
    )
    svid = inter.sign_x509_svid(
        device_csr(devices.key(TPM, "ES256", role="svid")), WORKLOAD, timedelta(minutes=5)
    )
    with pytest.raises(AssertionError, match="unable to get local issuer certificate"):
        openssl_verify(tmp_path, root.certificate, (svid.leaf,))


# -- 2. JWT-SVIDs minted in devices --------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "alg"),
    # No EdDSA: JWT-SVID 2.1 allows RS*/ES*/PS* only (EdDSA is refused; tests/jwtsvid).
    [(TPM, "ES256"), (P11, "ES256"), (P11, "PS256")],
    ids=["tpm-es256", "p11-es256", "p11-ps256"],
)
def test_jwt_svid_minted_in_device(devices: Devices, device: str, alg: str) -> None:
    key = devices.key(device, alg, role="jwt")
    kid = f"jwt-{device}-{alg}"
    token = mint_jwt_svid(
        joserfc_key(key),
        alg,
        kid,
        WORKLOAD,
        [JWT_AUD],
        timedelta(minutes=5),
        now=datetime.now(UTC),
    )
    assert header_of(token) == {"typ": "JWT", "alg": alg, "kid": kid}
    authority = JwtAuthority(kid, key.public_key(), use=USE_JWT_SVID)  # type: ignore[arg-type]
    bundles = BundleSet([TrustBundle(TD, jwt_authorities=(authority,))])

    svid = validate_jwt_svid(token, JWT_AUD, bundles)
    assert svid.spiffe_id == WORKLOAD and svid.audience == (JWT_AUD,)
    claims = pyjwt.decode(token, key.public_key(), algorithms=[alg], audience=JWT_AUD)  # type: ignore[arg-type]
    assert claims["sub"] == str(WORKLOAD)

    # Negative: the device's signature is what makes it valid.
    forged = flip_signature(token)
    with pytest.raises(JwtBadSignatureError):
        validate_jwt_svid(forged, JWT_AUD, bundles)
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(forged, key.public_key(), algorithms=[alg], audience=JWT_AUD)  # type: ignore[arg-type]
    assert_sealed(key)


# -- 3. WITs and WPTs: issuer in one device, workload in another --------------------------------

DEVICE_PAIRS = [
    # (issuer device, issuer alg), (workload device, workload alg)
    pytest.param((P11, "ES256"), (TPM, "ES256"), id="issuer-p11_workload-tpm"),
    pytest.param((TPM, "ES256"), (P11, "ES256"), id="issuer-tpm_workload-p11"),
    pytest.param((P11, "ES384"), (TPM, "ES384"), id="issuer-p11-es384_workload-tpm-es384"),
    pytest.param((TPM, "ES256"), (TPM, "ES384"), id="issuer-tpm_workload-tpm-es384"),
    pytest.param((P11, "ES256"), (P11, "EdDSA"), id="issuer-p11_workload-p11-eddsa"),
    pytest.param((P11, "EdDSA"), (TPM, "ES256"), id="issuer-p11-eddsa_workload-tpm"),
]


@pytest.mark.parametrize(("issuer_dev", "workload_dev"), DEVICE_PAIRS)
def test_wit_and_wpt_signed_in_devices(
    devices: Devices, issuer_dev: tuple[str, str], workload_dev: tuple[str, str]
) -> None:
    issuer = devices.key(*issuer_dev, role="wit-issuer")
    workload = devices.key(*workload_dev, role="wit-workload")
    kid = f"wit-{issuer_dev[0]}"
    wit = device_wit(issuer, kid, WORKLOAD, workload, now=NOW - 60)
    assert header_of(wit) == {"alg": issuer_dev[1], "kid": kid, "typ": "wit+jwt"}

    wit_verifier = WitVerifier(wit_bundles(issuer, kid), now=NOW)
    verified = wit_verifier.verify(wit)
    assert verified.subject == WORKLOAD
    assert verified.cnf_alg == workload_dev[1]
    assert spki(verified.cnf_public_key) == spki(workload.public_key())

    target = "/pay?amount=10"
    wpt = create_wpt(joserfc_key(workload), wit, ORIGIN + target, now=NOW)
    # The proof's alg is the WIT's cnf alg, i.e. the workload key's own.
    assert header_of(wpt) == {"alg": workload_dev[1], "typ": "wpt+jwt"}
    request = HttpMessage.request(
        "GET", target, [("Host", "api.example.org"), *wpt_headers(wit, wpt)]
    )
    verifier = WptVerifier(
        wit_verifier=wit_verifier,
        audiences=[ORIGIN],
        replay=MemoryReplayCache(clock=lambda: NOW),
        now=NOW,
    )
    caller = verifier.verify(request)
    assert caller.subject == WORKLOAD and caller.wire == "wpt-02"
    assert caller.wpt_claims["aud"] == ORIGIN + "/pay"
    # An independent JOSE implementation agrees the device signed it. Its clock is the
    # real one while this WPT was made at NOW (module import, minutes earlier in a long
    # run): expiry was checked above at NOW, so pyjwt checks signature and audience only.
    pyjwt.decode(
        wpt,
        workload.public_key(),  # type: ignore[arg-type]
        algorithms=[workload_dev[1]],
        audience=ORIGIN + "/pay",
        options={"verify_exp": False, "verify_iat": False},
    )

    # Replay: the same request again is refused.
    with pytest.raises(WptReplayError):
        verifier.verify(request)

    # Another device key (the issuer's) cannot make proofs for this WIT: the
    # sender refuses, and a proof forged past that check is refused on receipt.
    with pytest.raises(WptMintError) as info:
        create_wpt(joserfc_key(issuer), wit, ORIGIN + target, now=NOW)
    assert info.value.code == "wpt_mint_wrong_key"
    intruder = devices.key(*workload_dev, role="intruder")
    claims = json_object_strict(b64url_decode_strict(wpt.split(".")[1]))
    claims["jti"] = "forged-" + uuid.uuid4().hex
    forged = jws.serialize_compact(
        {"alg": workload_dev[1], "typ": "wpt+jwt"},
        json.dumps(claims).encode(),
        joserfc_key(intruder),
        algorithms=[workload_dev[1]],
    )
    bad = HttpMessage.request(
        "GET", target, [("Host", "api.example.org"), *wpt_headers(wit, forged)]
    )
    with pytest.raises(WptError) as refused:
        verifier.verify(bad)
    assert refused.value.code == "wpt_bad_signature"

    assert_sealed(issuer, workload, intruder)


# -- 4. HTTP message signatures by device keys ----------------------------------------------

HTTPSIG_CASES = [
    # (issuer), (caller's workload key), (callee's key: signs the response)
    pytest.param((P11, "ES256"), (TPM, "ES256"), (P11, "ES384"), id="caller-tpm_callee-p11"),
    pytest.param((TPM, "ES256"), (P11, "EdDSA"), (TPM, "ES256"), id="caller-p11-eddsa_callee-tpm"),
]


def order_request() -> HttpMessage:
    headers = [("Host", "api.example.org"), ("Content-Type", "application/json")]
    return HttpMessage.request("POST", "/v1/orders?dry=1", headers, b'{"item": "ice cream"}')


@pytest.mark.parametrize(("issuer_dev", "caller_dev", "callee_dev"), HTTPSIG_CASES)
def test_http_signatures_signed_in_devices(
    devices: Devices,
    issuer_dev: tuple[str, str],
    caller_dev: tuple[str, str],
    callee_dev: tuple[str, str],
) -> None:
    issuer = devices.key(*issuer_dev, role="sig-issuer")
    caller_key = devices.key(*caller_dev, role="sig-caller")
    callee_key = devices.key(*callee_dev, role="sig-callee")
    kid = "sig-issuer"
    bundles = wit_bundles(issuer, kid)
    caller_wit = device_wit(issuer, kid, WORKLOAD, caller_key, now=NOW - 10)
    callee_wit = device_wit(issuer, kid, SERVER, callee_key, now=NOW - 10)
    audience = ORIGIN + "/v1/orders"

    # The StoreKey is the signer: .alg and .sign, the signature made in the device.
    signed = sign_request(
        order_request(),
        signer=caller_key,
        wit=caller_wit,
        audience=audience,
        created=NOW,
        sign_response=True,
    )
    server_side = HttpSignatureVerifier(
        WitVerifier(bundles, now=NOW), MemoryReplayCache(clock=lambda: NOW), [ORIGIN], now=NOW
    )
    seen = server_side.verify_request(signed)
    assert seen.subject == str(WORKLOAD) and seen.sign_response is True
    assert isinstance(seen.wit, VerifiedWit) and seen.wit.cnf_alg == caller_dev[1]
    with pytest.raises(ReplayError):
        server_side.verify_request(signed)

    # The callee answers with a response signed through its own device key.
    response = HttpMessage.response(201, [("Content-Type", "application/json")], b'{"id": 7}')
    signed_response = sign_response(
        response, request=signed, signer=callee_key, wit=callee_wit, created=NOW
    )
    client_side = HttpSignatureVerifier(
        WitVerifier(bundles, now=NOW), MemoryReplayCache(clock=lambda: NOW), [], now=NOW
    )
    answer = client_side.verify_response(signed_response, signed)
    assert answer is not None and answer.subject == str(SERVER)
    assert answer.params["wimse-req-nonce"] == seen.nonce

    # Negative: a body changed in transit no longer matches the signed digest.
    fresh = sign_request(
        order_request(), signer=caller_key, wit=caller_wit, audience=audience, created=NOW
    )
    tampered = HttpMessage.request(
        "POST", fresh.target or "", fresh.headers, b'{"item": "ice cream", "qty": 1000}'
    )
    with pytest.raises(ContentDigestMismatchError):
        server_side.verify_request(tampered)
    # ... and a response signed by another device key (same algorithm, so the
    # sender's own alg check passes) does not speak for the callee's WIT.
    intruder = devices.key(*callee_dev, role="sig-intruder")
    wrong = sign_response(response, request=signed, signer=intruder, wit=callee_wit, created=NOW)
    with pytest.raises(WimseError) as refused:
        client_side.verify_response(wrong, signed)
    assert refused.value.code == "signature_invalid", refused.value.code

    assert_sealed(issuer, caller_key, callee_key, intruder)


# -- 5. The httpx client auth with its keys in the TPM -------------------------------------------


@pytest.mark.parametrize("variant", ["wpt", "http-signature"])
def test_httpx_client_auth_through_tpm(devices: Devices, variant: str) -> None:
    issuer = devices.key(TPM, "ES256", role="auth-issuer")
    workload = devices.key(TPM, "ES256", role="auth-workload")
    bundles = wit_bundles(issuer, "auth-ca")
    # The real clock throughout: LocalProofSigner stamps proofs with it.
    wit = device_wit(issuer, "auth-ca", WORKLOAD, workload)
    verifier = build_request_verifier(bundles, [ORIGIN], variants=[variant])
    received: list[HttpMessage] = []

    def relying_party(request: httpx.Request) -> httpx.Response:
        message = HttpMessage.request(
            request.method,
            request.url.raw_path.decode("ascii"),
            request.headers.multi_items(),
            request.content or None,
        )
        received.append(message)
        try:
            caller = verifier.verify(message)
        except WimseError as e:
            return httpx.Response(http_status(e), json={"code": e.code})
        return httpx.Response(200, json={"subject": caller.subject, "variant": caller.variant})

    auth = WimseAuth(LocalProofSigner(workload, wit), variant=variant)  # type: ignore[arg-type]
    with httpx.Client(
        base_url=ORIGIN, auth=auth, transport=httpx.MockTransport(relying_party)
    ) as client:
        first = client.post("/v1/orders?dry=1", json={"item": "ice cream"})
        second = client.get("/v1/orders/7")
    for reply in (first, second):
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"subject": str(WORKLOAD), "variant": variant}
    if variant == "wpt":
        assert received[0].get_all("authorization")[0].startswith("WPT ")
    else:
        assert received[0].get("signature") and received[0].get("content-digest")

    # Negative: a captured request cannot be replayed, nor re-aimed elsewhere.
    with pytest.raises(WimseError) as replayed:
        verifier.verify(received[1])
    assert replayed.value.code in ("wpt_replayed", "replayed_proof")
    moved = HttpMessage.request("GET", "/admin", received[1].headers, None)
    with pytest.raises(WimseError):
        verifier.verify(moved)

    assert_sealed(issuer, workload)


@pytest.mark.parametrize("device", [TPM, P11])
def test_async_client_signs_concurrently_through_device(devices: Devices, device: str) -> None:
    """httpx.AsyncClient + WimseAuth signs in worker threads: many requests in
    flight at once all reach the one device (a TPM context and a PKCS#11 session
    that must not be used from two threads at a time) and every proof verifies."""
    issuer = devices.key(TPM if device == P11 else P11, "ES256", role="async-issuer")
    workload = devices.key(device, "ES256", role="async-workload")
    bundles = wit_bundles(issuer, "async-ca")
    wit = device_wit(issuer, "async-ca", WORKLOAD, workload)
    verifier = build_request_verifier(bundles, [ORIGIN])
    jtis: set[str] = set()

    def relying_party(request: httpx.Request) -> httpx.Response:
        message = HttpMessage.request(
            request.method, request.url.raw_path.decode("ascii"), request.headers.multi_items()
        )
        try:
            verifier.verify(message)
        except WimseError as e:
            return httpx.Response(http_status(e), json={"code": e.code})
        wpt = message.get_all("authorization")[0].split(" ", 1)[1]
        jtis.add(json_object_strict(b64url_decode_strict(wpt.split(".")[1]))["jti"])
        return httpx.Response(204)

    async def run() -> list[httpx.Response]:
        auth = WimseAuth(LocalProofSigner(workload, wit))
        async with httpx.AsyncClient(
            base_url=ORIGIN, auth=auth, transport=httpx.MockTransport(relying_party)
        ) as client:
            return await asyncio.gather(*(client.get(f"/items/{i}") for i in range(12)))

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [204] * 12, [r.text for r in replies]
    assert len(jtis) == 12
    assert_sealed(issuer, workload)


PSS_ASKS = [
    pytest.param(
        ("sign", padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=20)), id="salt-20"
    ),
    pytest.param(
        ("sign", padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=32)),
        id="mgf1-sha384",
    ),
    # cryptography's own documented idiom; the CSR's AlgorithmIdentifier then
    # declares the maximum salt length (222 bytes for RSA-2048).
    pytest.param(
        (
            "csr",
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        ),
        id="csr-max-salt",
    ),
]


@pytest.mark.parametrize("ask", PSS_ASKS)
def test_device_pss_key_honours_or_refuses_pss_parameters(
    devices: Devices, ask: tuple[str, padding.PSS]
) -> None:
    """A PS256 TPM key asked for PSS parameters it cannot produce must refuse
    (UnsupportedAlgorithmError), never return a signature under other parameters."""
    how, pss = ask
    key = devices.key(TPM, "PS256", role="inter")  # the one RSA key of this module
    private = key.private_key()
    assert isinstance(private, rsa.RSAPrivateKey)
    data = b"to be signed"
    try:
        if how == "csr":
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
                .sign(private, hashes.SHA256(), rsa_padding=pss)
            )
        else:
            sig = private.sign(data, pss, hashes.SHA256())
    except UnsupportedAlgorithmError:
        return  # refusing what the device cannot do is the correct answer
    if how == "csr":
        assert csr.is_signature_valid, "the device signed the CSR under other PSS parameters"
    else:
        public = key.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(sig, data, pss, hashes.SHA256())


# -- 6. Non-exportability, every algorithm each device was used with --------------------------


@pytest.mark.parametrize(
    ("device", "alg"),
    [
        (TPM, "ES256"),
        (TPM, "ES384"),
        (TPM, "PS256"),
        (P11, "ES256"),
        (P11, "ES384"),
        (P11, "EdDSA"),
    ],
)
def test_device_keys_refuse_export(devices: Devices, device: str, alg: str) -> None:
    # role="inter" / "root" etc. reuse the keys the tests above signed with when
    # this worker ran them; otherwise a key is made here.
    key = devices.key(device, alg, role="inter" if alg == "PS256" else "k")
    private = key.private_key()
    assert_sealed(key)
    # The adapter still signs (the device does), and the signature verifies.
    data = b"sealed but usable"
    sig = key.sign(data)
    pub = key.public_key()
    if isinstance(private, ed25519.Ed25519PrivateKey):
        assert isinstance(pub, ed25519.Ed25519PublicKey)
        pub.verify(private.sign(data), data)
        pub.verify(sig, data)
    elif isinstance(private, rsa.RSAPrivateKey):
        assert isinstance(pub, rsa.RSAPublicKey)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        pub.verify(sig, data, pss, hashes.SHA256())
        pub.verify(private.sign(data, pss, hashes.SHA256()), data, pss, hashes.SHA256())
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        ecdsa = ec.ECDSA(key.alg.spec.hash_algorithm())
        pub.verify(private.sign(data, ecdsa), data, ecdsa)
        # key.sign gives the JOSE form, r || s.
        half = len(sig) // 2
        r, s = int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
        pub.verify(encode_dss_signature(r, s), data, ecdsa)
    if device == TPM:
        # The TPM key on disk is a TSS2 PRIVATE KEY blob, wrapped by the TPM's
        # primary key: no software key loader can read it.
        store = devices.stores[TPM]
        assert isinstance(store, TpmKeyStore)
        blob = store.key_path(key.name).read_bytes()
        assert blob.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
        with pytest.raises((ValueError, TypeError)):
            serialization.load_pem_private_key(blob, password=None)
