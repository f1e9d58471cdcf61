"""X.509 CA: CA and SVID certificate profiles, CSR checks, SVID verification
(positive and one negative test per X509-SVID rule), and signing through a
custos key-store key (device-style object that refuses to export)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from custos.bundle import BundleSet, TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.keys import ExportRefusedError, MemoryKeyStore
from custos.x509 import (
    CertificateAuthority,
    CsrError,
    X509CaError,
    X509SvidError,
    X509SvidUntrustedError,
    verify_x509_svid,
)

TD = TrustDomain("example.org")
OTHER = TrustDomain("other.example")
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return CertificateAuthority.self_signed(_p256(), TD, ttl=timedelta(days=30))


@pytest.fixture(scope="module")
def inter(root: CertificateAuthority) -> CertificateAuthority:
    return CertificateAuthority.intermediate(_p256(), TD, root, timedelta(days=1))


@pytest.fixture(scope="module")
def bundles(root: CertificateAuthority) -> BundleSet:
    return BundleSet([TrustBundle(TD, (root.certificate,))])


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    *,
    sans: Sequence[x509.GeneralName] = (),
    pem: bool = False,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "requested-cn")])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(Encoding.PEM if pem else Encoding.DER)


def ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


# ------------------------------------------------------------------ CA profile


def test_root_ca_profile(root: CertificateAuthority) -> None:
    cert = root.certificate
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca  # type: ignore[attr-defined]
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign  # type: ignore[attr-defined]
    assert not ku.value.digital_signature  # type: ignore[attr-defined]
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]  # type: ignore[attr-defined]
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest  # type: ignore[attr-defined]
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert root.chain == (cert,) and root.root is cert and root.intermediates == ()
    assert root.trust_domain == TD
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=30) <= life <= timedelta(days=30, seconds=11)


def test_intermediate_ca(root: CertificateAuthority, inter: CertificateAuthority) -> None:
    cert = inter.certificate
    cert.verify_directly_issued_by(root.certificate)
    assert inter.chain == (cert, root.certificate)
    assert inter.intermediates == (cert,)
    assert inter.root == root.certificate
    assert cert.subject != root.certificate.subject
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(root.certificate, x509.SubjectKeyIdentifier).value.digest  # type: ignore[attr-defined]
    assert ext(cert, x509.BasicConstraints).value.ca  # type: ignore[attr-defined]


def test_intermediate_lifetime_clamped_to_parent(root: CertificateAuthority) -> None:
    long = CertificateAuthority.intermediate(_p256(), TD, root, timedelta(days=365))
    assert long.certificate.not_valid_after_utc == root.certificate.not_valid_after_utc


def test_rsa_ca(rsa_key: rsa.RSAPrivateKey) -> None:
    ca = CertificateAuthority.self_signed(rsa_key, TD, ttl=timedelta(hours=1))
    svid = ca.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5))
    bundles = BundleSet([TrustBundle(TD, (ca.certificate,))])
    assert verify_x509_svid(svid.cert_chain, bundles) == WORKLOAD


def test_ed25519_ca_key_is_refused() -> None:
    with pytest.raises(X509CaError, match="Ed25519 CA keys are not supported"):
        CertificateAuthority.self_signed(
            ed25519.Ed25519PrivateKey.generate(), TD, ttl=timedelta(hours=1)
        )


def test_ca_constructor_checks(root: CertificateAuthority) -> None:
    with pytest.raises(X509CaError, match="does not match"):
        CertificateAuthority(_p256(), root.chain)
    with pytest.raises(X509CaError, match="needs its certificate"):
        CertificateAuthority(_p256(), ())
    svid = root.sign_x509_svid(make_csr(leaf_key := _p256()), WORKLOAD, timedelta(minutes=5))
    with pytest.raises(X509CaError, match="not a CA"):
        CertificateAuthority(leaf_key, (svid.leaf,))
    with pytest.raises(X509CaError, match="ttl must be positive"):
        CertificateAuthority.self_signed(_p256(), TD, ttl=timedelta(0))


# ------------------------------------------------------------------ SVID profile


def test_svid_profile_ec(root: CertificateAuthority) -> None:
    leaf_key = _p256()
    # The CSR asks for other names; the CA must ignore all of them.
    csr = make_csr(
        leaf_key,
        sans=[
            x509.UniformResourceIdentifier("spiffe://example.org/admin"),
            x509.UniformResourceIdentifier("spiffe://other.example/x"),
            x509.DNSName("evil.example"),
        ],
    )
    svid = root.sign_x509_svid(csr, WORKLOAD, timedelta(minutes=10), ["web.example.org"])
    leaf = svid.leaf
    assert svid.spiffe_id == WORKLOAD
    assert svid.cert_chain == (leaf,)
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]  # type: ignore[attr-defined]
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]  # type: ignore[attr-defined]
    assert "requested-cn" not in leaf.subject.rfc4514_string()
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca  # type: ignore[attr-defined]
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature  # type: ignore[attr-defined]
    assert not ku.value.key_encipherment  # type: ignore[attr-defined]
    assert not ku.value.key_cert_sign and not ku.value.crl_sign  # type: ignore[attr-defined]
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}  # type: ignore[call-overload]
    assert ext(leaf, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        leaf_key.public_key()
    )
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(root.certificate, x509.SubjectKeyIdentifier).value.digest  # type: ignore[attr-defined]
    assert 0 < leaf.serial_number < 2**128
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(minutes=10) <= life <= timedelta(minutes=10, seconds=11)
    assert svid.expires_at == leaf.not_valid_after_utc
    leaf.verify_directly_issued_by(root.certificate)
    loaded = x509.load_pem_x509_certificates(svid.to_pem())
    assert loaded == [leaf]
    assert svid.to_der_chain() == leaf.public_bytes(Encoding.DER)


def test_svid_serials_are_random(root: CertificateAuthority) -> None:
    csr = make_csr(_p256())
    serials = {
        root.sign_x509_svid(csr, WORKLOAD, timedelta(minutes=1)).leaf.serial_number
        for _ in range(5)
    }
    assert len(serials) == 5


def test_svid_rsa_key_gets_key_encipherment(
    root: CertificateAuthority, rsa_key: rsa.RSAPrivateKey
) -> None:
    svid = root.sign_x509_svid(make_csr(rsa_key, pem=True), WORKLOAD, timedelta(minutes=5))
    ku = ext(svid.leaf, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["p384", "ed25519"])
def test_svid_other_key_types(root: CertificateAuthority, bundles: BundleSet, kind: str) -> None:
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
        ec.generate_private_key(ec.SECP384R1())
        if kind == "p384"
        else ed25519.Ed25519PrivateKey.generate()
    )
    svid = root.sign_x509_svid(make_csr(key), WORKLOAD, timedelta(minutes=5))
    assert verify_x509_svid(svid.cert_chain, bundles) == WORKLOAD


def test_svid_ttl_clamped_to_ca(root: CertificateAuthority) -> None:
    svid = root.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(days=3650))
    assert svid.leaf.not_valid_after_utc == root.certificate.not_valid_after_utc


def test_svid_from_intermediate_carries_chain(
    inter: CertificateAuthority, bundles: BundleSet, root: CertificateAuthority
) -> None:
    svid = inter.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5))
    assert svid.cert_chain == (svid.leaf, inter.certificate)
    assert root.certificate not in svid.cert_chain
    assert verify_x509_svid(svid.cert_chain, bundles) == WORKLOAD
    # without the intermediate the leaf does not chain to the root
    with pytest.raises(X509SvidUntrustedError):
        verify_x509_svid(svid.cert_chain[:1], bundles)


# ------------------------------------------------------------------ issuance refusals


def test_malformed_csr() -> None:
    ca = CertificateAuthority.self_signed(_p256(), TD, ttl=timedelta(hours=1))
    for junk in (
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ):
        with pytest.raises(CsrError, match="malformed CSR") as info:
            ca.sign_x509_svid(junk, WORKLOAD, timedelta(minutes=5))
        assert info.value.code == "invalid_csr"
    with pytest.raises(CsrError, match="larger than"):
        ca.sign_x509_svid(b"0" * 100_000, WORKLOAD, timedelta(minutes=5))


def _tamper(der: bytes) -> bytes:
    """Flip a bit in the CSR signature (the DER's last byte), keeping it parseable."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def test_csr_with_bad_signature_is_refused(root: CertificateAuthority) -> None:
    # Proof of possession: someone holding only a public key (e.g. another
    # workload's) must not get it certified.
    csr = _tamper(make_csr(_p256()))
    x509.load_der_x509_csr(csr)  # still parses
    with pytest.raises(CsrError, match="signature is invalid"):
        root.sign_x509_svid(csr, WORKLOAD, timedelta(minutes=5))


def test_csr_signature_is_checked_before_key_type(root: CertificateAuthority) -> None:
    csr = _tamper(make_csr(ec.generate_private_key(ec.SECP521R1())))
    with pytest.raises(CsrError, match="signature is invalid"):
        root.sign_x509_svid(csr, WORKLOAD, timedelta(minutes=5))


def test_csr_key_types_refused(root: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="secp521r1"):
        root.sign_x509_svid(
            make_csr(ec.generate_private_key(ec.SECP521R1())), WORKLOAD, timedelta(minutes=5)
        )
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(CsrError, match="1024 bits"):
        root.sign_x509_svid(make_csr(weak), WORKLOAD, timedelta(minutes=5))


def test_spiffe_id_outside_trust_domain_is_refused(root: CertificateAuthority) -> None:
    with pytest.raises(X509CaError, match="not in this CA's trust domain"):
        root.sign_x509_svid(
            make_csr(_p256()), SpiffeId.parse("spiffe://other.example/w"), timedelta(minutes=5)
        )
    with pytest.raises(X509CaError, match="must have a path"):
        root.sign_x509_svid(make_csr(_p256()), TD.spiffe_id(), timedelta(minutes=5))


@pytest.mark.parametrize(
    "bad", ["", "-bad.example", "a..b", "exa mple.org", "*.com", "caf\u00e9.org", "a" * 64 + ".org"]
)
def test_bad_dns_names_are_refused(root: CertificateAuthority, bad: str) -> None:
    with pytest.raises(X509CaError, match="DNS name"):
        root.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5), [bad])


def test_wildcard_dns_name_is_allowed(root: CertificateAuthority) -> None:
    svid = root.sign_x509_svid(
        make_csr(_p256()), WORKLOAD, timedelta(minutes=5), ["*.svc.example.org"]
    )
    assert "*.svc.example.org" in ext(
        svid.leaf, x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)  # type: ignore[attr-defined]


def test_long_dns_name_goes_to_san_only(root: CertificateAuthority) -> None:
    long_name = ".".join(["a" * 60] * 3) + ".example.org"
    assert len(long_name) > 64
    svid = root.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5), [long_name])
    assert svid.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    san = ext(svid.leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [long_name]  # type: ignore[attr-defined]
    short = root.sign_x509_svid(
        make_csr(_p256()), WORKLOAD, timedelta(minutes=5), ["web.example.org"]
    )
    cn = short.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["web.example.org"]


def test_bad_ttl_and_expired_ca(root: CertificateAuthority) -> None:
    with pytest.raises(X509CaError, match="ttl must be positive"):
        root.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(0))
    later = root.certificate.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(X509CaError, match="expired"):
        root.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5), now=later)
    with pytest.raises(X509CaError, match="timezone-aware"):
        root.sign_x509_svid(
            make_csr(_p256()), WORKLOAD, timedelta(minutes=5), now=datetime(2030, 1, 1)
        )


# ------------------------------------------------------------------ device-style CA key


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256"])
def test_ca_key_from_key_store(alg: str) -> None:
    """The CA signs through StoreKey.private_key(), which never exports."""
    store = MemoryKeyStore()
    store.create("ca", alg)
    store.create("inter", "ES256")
    device_key = store.get("ca").private_key()
    with pytest.raises(ExportRefusedError):
        device_key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    ca = CertificateAuthority.self_signed(device_key, TD, ttl=timedelta(hours=1))  # type: ignore[arg-type]
    inter = CertificateAuthority.intermediate(
        store.get("inter").private_key(), TD, ca, timedelta(minutes=30)
    )  # type: ignore[arg-type]
    bundles = BundleSet([TrustBundle(TD, (ca.certificate,))])
    for issuer in (ca, inter):
        svid = issuer.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5))
        assert verify_x509_svid(svid.cert_chain, bundles) == WORKLOAD
    assert ca.certificate.public_key() == store.public_key("ca")


# ------------------------------------------------------------------ verification negatives


def craft_leaf(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    *,
    uris: Sequence[str] = (str(WORKLOAD),),
    with_san: bool = True,
    ca: bool | None = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """A leaf built by hand, to break exactly one rule at a time."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
        .issuer_name(issuer.subject)
        .public_key(_p256().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(not_after or now + timedelta(minutes=10))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, key_cert_sign, crl_sign, False, False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    if with_san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def root_pair() -> tuple[ec.EllipticCurvePrivateKey, CertificateAuthority]:
    key = _p256()
    return key, CertificateAuthority.self_signed(key, TD, ttl=timedelta(days=1))


def _bundles_for(ca: CertificateAuthority) -> BundleSet:
    return BundleSet([TrustBundle(TD, (ca.certificate,))])


def test_crafted_leaf_passes_when_valid(
    root_pair: tuple[ec.EllipticCurvePrivateKey, CertificateAuthority],
) -> None:
    key, ca = root_pair
    assert verify_x509_svid([craft_leaf(key, ca.certificate)], _bundles_for(ca)) == WORKLOAD
    # no basicConstraints at all is not a CA either
    assert (
        verify_x509_svid([craft_leaf(key, ca.certificate, ca=None)], _bundles_for(ca)) == WORKLOAD
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"uris": [str(WORKLOAD), "spiffe://example.org/admin"]}, "exactly one URI SAN, found 2"),
        ({"with_san": False}, "no subjectAltName"),
        ({"uris": ["https://example.org/web"]}, "not a valid SPIFFE ID"),
        ({"uris": ["spiffe://example.org"]}, "has no path"),
        ({"ca": True}, "is a CA"),
        ({"key_cert_sign": True}, "keyCertSign"),
        ({"crl_sign": True}, "cRLSign"),
    ],
)
def test_leaf_rules(
    root_pair: tuple[ec.EllipticCurvePrivateKey, CertificateAuthority],
    kwargs: dict[str, object],
    fragment: str,
) -> None:
    key, ca = root_pair
    leaf = craft_leaf(key, ca.certificate, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(X509SvidError, match=fragment) as info:
        verify_x509_svid([leaf], _bundles_for(ca))
    assert info.value.code == "invalid_x509_svid"


def test_leaf_with_dns_san_only_has_no_spiffe_id(
    root_pair: tuple[ec.EllipticCurvePrivateKey, CertificateAuthority],
) -> None:
    key, ca = root_pair
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(_p256().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(minutes=10))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("web.example.org")]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(X509SvidError, match="exactly one URI SAN, found 0"):
        verify_x509_svid([leaf], _bundles_for(ca))


def test_expired_leaf_is_untrusted(
    root_pair: tuple[ec.EllipticCurvePrivateKey, CertificateAuthority],
) -> None:
    key, ca = root_pair
    leaf = craft_leaf(key, ca.certificate)
    later = leaf.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(X509SvidUntrustedError) as info:
        verify_x509_svid([leaf], _bundles_for(ca), now=later)
    assert info.value.code == "x509_svid_untrusted"


def test_leaf_from_unknown_ca_is_untrusted(
    root_pair: tuple[ec.EllipticCurvePrivateKey, CertificateAuthority],
) -> None:
    _, ca = root_pair
    rogue_key = _p256()
    # A rogue CA with the same subject as the real one: only the signature tells them apart.
    rogue = CertificateAuthority.self_signed(
        rogue_key, TD, ttl=timedelta(days=1), subject=ca.certificate.subject
    )
    leaf = craft_leaf(rogue_key, rogue.certificate)
    with pytest.raises(X509SvidUntrustedError, match="does not verify"):
        verify_x509_svid([leaf, rogue.certificate], _bundles_for(ca))


def test_ca_of_one_domain_cannot_vouch_for_another() -> None:
    """Federation: example.org's CA issues a cert claiming an other.example ID.
    Both bundles are trusted, but only other.example's CA may vouch for it."""
    key_a = _p256()
    ca_a = CertificateAuthority.self_signed(key_a, TD, ttl=timedelta(days=1))
    ca_b = CertificateAuthority.self_signed(_p256(), OTHER, ttl=timedelta(days=1))
    bundles = BundleSet(
        [TrustBundle(TD, (ca_a.certificate,)), TrustBundle(OTHER, (ca_b.certificate,))]
    )
    forged = craft_leaf(key_a, ca_a.certificate, uris=["spiffe://other.example/payments"])
    with pytest.raises(X509SvidUntrustedError):
        verify_x509_svid([forged], bundles)
    # and the CA refuses to issue it in the first place
    with pytest.raises(X509CaError):
        ca_a.sign_x509_svid(
            make_csr(_p256()),
            SpiffeId.parse("spiffe://other.example/payments"),
            timedelta(minutes=5),
        )


def test_no_bundle_for_trust_domain(root: CertificateAuthority) -> None:
    svid = root.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5))
    with pytest.raises(X509SvidUntrustedError, match=r"no X\.509 authorities"):
        verify_x509_svid(svid.cert_chain, BundleSet())
    with pytest.raises(X509SvidUntrustedError, match=r"no X\.509 authorities"):
        verify_x509_svid(svid.cert_chain, BundleSet([TrustBundle(TD)]))


def test_empty_chain_and_naive_time(root: CertificateAuthority, bundles: BundleSet) -> None:
    with pytest.raises(X509SvidError, match="empty"):
        verify_x509_svid([], bundles)
    svid = root.sign_x509_svid(make_csr(_p256()), WORKLOAD, timedelta(minutes=5))
    with pytest.raises(X509SvidError, match="timezone-aware"):
        verify_x509_svid(svid.cert_chain, bundles, now=datetime(2030, 1, 1))
