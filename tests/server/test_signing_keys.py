"""The server's signing keys (issue 8): publish before signing, retire only after
the last credential expires, prune, restart, concurrent servers, and keys
deleted behind our back.  Real key stores (exportable files, a SoftHSM token)
on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, text

from custos.bundle import BundleSet
from custos.errors import CustosError
from custos.identity import SpiffeId
from custos.jwtsvid import mint_jwt_svid, validate_jwt_svid
from custos.keys import (
    ExportableKeyStore,
    KeyNotFoundError,
    KeyStore,
    KeyStoreConfig,
    open_key_store,
)
from custos.server.datastore import Datastore, NotFoundError
from custos.server.signing_keys import SigningKeyError, SigningKeys, trust_bundle

from .conftest import TRUST_DOMAIN

T0 = 1_800_000_000.0
DELAY = 300.0


@pytest.fixture(params=["exportable", "pkcs11"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> KeyStoreConfig:
    if request.param == "exportable":
        return KeyStoreConfig(store="exportable", key_dir=tmp_path / "keys")
    hsm = request.getfixturevalue("softhsm")
    return KeyStoreConfig(store="pkcs11", pkcs11_module=hsm.module, pkcs11_uri=hsm.uri)


@pytest.fixture
def key_store(store_config: KeyStoreConfig) -> Iterator[KeyStore]:
    with open_key_store(store_config) as ks:
        yield ks


def _manager(ds: Datastore, ks: KeyStore, purpose: str = "jwt-svid") -> SigningKeys:
    return SigningKeys(ds, ks, purpose, key_name=f"server-{purpose}", propagation_delay=DELAY)


def _kids(manager: SigningKeys) -> set[str]:
    return {a.kid for a in manager.bundle().jwt_authorities}


def _mint(manager: SigningKeys, now: float, ttl: float) -> str:
    key = manager.current()
    token = mint_jwt_svid(
        key.key,
        kid=key.kid,
        spiffe_id=f"spiffe://{TRUST_DOMAIN}/w",
        audience="rp",
        ttl=ttl,
        now=now,
    )
    manager.note_issued(key.kid, now + ttl)
    return token


def test_new_key_is_in_the_bundle_before_it_signs(store: Datastore, key_store: KeyStore) -> None:
    keys = _manager(store, key_store)
    first = keys.ensure_active(now=T0)
    assert _kids(keys) == {first.kid}
    nxt = keys.prepare(now=T0 + 10)
    assert nxt.record.status == "published"
    assert _kids(keys) == {first.kid, nxt.kid}
    assert keys.current().kid == first.kid  # published, not signing
    assert keys.prepare(now=T0 + 20).kid == nxt.kid  # one next key, not two
    assert keys.activate(now=T0 + 10 + DELAY - 1) is None  # not propagated yet
    activated = keys.activate(now=T0 + 10 + DELAY)
    assert activated is not None and activated.kid == nxt.kid
    assert keys.current().kid == nxt.kid
    uses = {a.kid: a.use for a in keys.bundle().jwt_authorities}
    assert uses == {first.kid: "jwt-svid", nxt.kid: "jwt-svid"}


def test_old_credential_verifies_until_it_expires_then_key_is_pruned(
    store: Datastore, key_store: KeyStore
) -> None:
    keys = _manager(store, key_store)
    old = keys.ensure_active(now=T0)
    token = _mint(keys, T0, 3600)
    keys.prepare(now=T0)
    new = keys.activate(now=T0 + DELAY)
    assert new is not None and new.kid != old.kid
    bundles = BundleSet([keys.bundle()])
    assert validate_jwt_svid(token, "rp", bundles, now=T0 + 1800).spiffe_id == SpiffeId.parse(
        f"spiffe://{TRUST_DOMAIN}/w"
    )
    assert keys.prune(now=T0 + 3599) == []  # its credential is still valid
    assert old.kid in _kids(keys)
    assert keys.prune(now=T0 + 3601) == [old.kid]
    assert _kids(keys) == {new.kid}
    with pytest.raises(KeyNotFoundError):
        key_store.info(old.record.key_name)
    with pytest.raises(NotFoundError):
        store.signing_keys.get(old.kid)


def test_note_issued_only_raises_last_not_after(store: Datastore, key_store: KeyStore) -> None:
    keys = _manager(store, key_store)
    key = keys.ensure_active(now=T0)
    keys.note_issued(key.kid, T0 + 2000)
    keys.note_issued(key.kid, datetime.fromtimestamp(T0 + 1500, UTC))
    assert store.signing_keys.get(key.kid).last_not_after == T0 + 2000
    with pytest.raises(NotFoundError) as err:
        keys.note_issued("no-such-kid", T0)
    assert err.value.code == "signing_key_unknown"


def test_restart_finds_same_active_key_and_bundle(
    store_url: str, store_config: KeyStoreConfig
) -> None:
    with (
        Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds,
        open_key_store(store_config) as ks,
    ):
        keys = _manager(ds, ks)
        active = keys.ensure_active(now=T0).kid
        keys.prepare(now=T0 + 1)
        before = [a.jwk() for a in keys.bundle().jwt_authorities]
    with (
        Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds,
        open_key_store(store_config) as ks,
    ):
        keys = _manager(ds, ks)
        assert keys.ensure_active(now=T0 + 2).kid == active
        assert [a.jwk() for a in keys.bundle().jwt_authorities] == before


def _stored_rows(url: str) -> str:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return repr(conn.execute(text("SELECT * FROM signing_keys")).all())
    finally:
        engine.dispose()


def test_datastore_rows_hold_no_private_key(
    store: Datastore, store_url: str, tmp_path: Path
) -> None:
    with ExportableKeyStore(tmp_path / "keys") as ks:
        keys = _manager(store, ks, "x509-ca")
        key = keys.ensure_active(now=T0)
        private = ks.export_private_key(key.record.key_name)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        scalar = private.private_numbers().private_value
        stored = _stored_rows(store_url)
        assert key.kid in stored and key.record.key_name in stored
        assert "PRIVATE" not in stored
        for form in (
            str(scalar),
            f"{scalar:x}",
            private.private_bytes(
                Encoding.DER,
                PrivateFormat.PKCS8,
                NoEncryption(),
            ).hex(),
        ):
            assert form not in stored


@pytest.mark.parametrize("purpose", ["jwt-svid", "x509-ca"])
def test_key_deleted_behind_our_back_is_a_clear_error(
    store: Datastore, key_store: KeyStore, purpose: str
) -> None:
    keys = _manager(store, key_store, purpose)
    key = keys.ensure_active(now=T0)
    key_store.delete(key.record.key_name)
    for call in (keys.current, keys.bundle, lambda: keys.ensure_active(now=T0)):
        with pytest.raises(SigningKeyError) as err:
            call()
        assert err.value.code == "signing_key_missing"
        assert key.kid in str(err.value)
    # the way out: a forced rotation, then the lost key is pruned once retired
    new = keys.rotate_now(now=T0 + 1)
    assert keys.current().kid == new.kid != key.kid
    assert keys.prune(now=T0 + 1 + DELAY) == [key.kid]
    assert keys.bundle() is not None


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(Encoding.PEM)


def test_ca_roots_current_and_previous_until_retired(store: Datastore, key_store: KeyStore) -> None:
    keys = SigningKeys(
        store,
        key_store,
        "x509-ca",
        key_name="ca",
        propagation_delay=DELAY,
        ca_ttl=timedelta(days=2),
    )
    first = keys.ensure_active(now=T0)
    svid = first.ca().sign_x509_svid(
        _csr(),
        SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/w"),
        timedelta(hours=1),
        now=datetime.fromtimestamp(T0, UTC),
    )
    keys.note_issued(first.kid, svid.expires_at)
    assert svid.leaf.issuer == first.certificate().subject
    svid.leaf.verify_directly_issued_by(first.certificate())
    assert keys.bundle().x509_authorities == (first.certificate(),)
    assert keys.bundle().jwt_authorities == ()
    second = keys.rotate_now(now=T0 + 60)
    roots = keys.bundle().x509_authorities
    assert roots == (first.certificate(), second.certificate())
    assert keys.prune(now=T0 + 3599) == []
    assert keys.prune(now=T0 + 3601) == [first.kid]
    assert keys.bundle().x509_authorities == (second.certificate(),)


def test_wit_keys_are_published_as_wit_svid(store: Datastore, key_store: KeyStore) -> None:
    jwt = _manager(store, key_store, "jwt-svid")
    wit = _manager(store, key_store, "wit")
    jwt_key, wit_key = jwt.ensure_active(now=T0), wit.ensure_active(now=T0)
    bundle = trust_bundle(store.trust_domain, jwt, wit)
    assert {(a.kid, a.use) for a in bundle.jwt_authorities} == {
        (jwt_key.kid, "jwt-svid"),
        (wit_key.kid, "wit-svid"),
    }


def test_rotate_now_signs_at_once_and_says_so(
    store: Datastore, key_store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    keys = _manager(store, key_store)
    old = keys.ensure_active(now=T0)
    with caplog.at_level(logging.WARNING, logger="custos.server.signing_keys"):
        new = keys.rotate_now(now=T0 + 1)
    assert keys.current().kid == new.kid != old.kid
    assert "forced rotation" in caplog.text and new.kid in caplog.text
    assert store.signing_keys.get(old.kid).status == "retired"


def test_unknown_purpose_and_hostile_times(store: Datastore, key_store: KeyStore) -> None:
    with pytest.raises(SigningKeyError) as err:
        SigningKeys(store, key_store, "ssh", key_name="k")
    assert err.value.code == "signing_key_purpose"
    with pytest.raises(SigningKeyError) as err:
        SigningKeys(store, key_store, "x509-ca", key_name="ca", alg="EdDSA")
    assert err.value.code == "signing_key_alg"
    for name in ("", "-x", "a/b", "x" * 129):
        with pytest.raises(CustosError) as bad:
            SigningKeys(store, key_store, "jwt-svid", key_name=name)
        assert bad.value.code == "invalid_key_name"
    with pytest.raises(CustosError):
        SigningKeys(store, key_store, "jwt-svid", key_name="k", propagation_delay=float("nan"))
    keys = _manager(store, key_store)
    key = keys.ensure_active(now=T0)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(CustosError):  # CustosError
            keys.note_issued(key.kid, bad)  # type: ignore[arg-type]
        with pytest.raises(CustosError):
            keys.prune(now=bad)  # type: ignore[arg-type]


def _race(store_url: str, ks: KeyStore, step: Callable[[SigningKeys], object]) -> None:
    """Four servers, each with its own datastore connection pool, one step at once.

    They share one key store object, as servers share one HSM: an exportable
    store reads its directory when opened (a single-server tier, decision 0031).
    """
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def server() -> None:
        try:
            with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
                keys = _manager(ds, ks)
                barrier.wait()
                step(keys)
        except BaseException as exc:  # noqa: BLE001 - the main thread asserts on it
            errors.append(exc)

    threads = [threading.Thread(target=server) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_servers_rotating_at_once_make_one_key(store_url: str, tmp_path: Path) -> None:
    with ExportableKeyStore(tmp_path / "keys") as ks:
        _race(store_url, ks, lambda k: k.ensure_active(now=T0))
        _race(store_url, ks, lambda k: k.prepare(now=T0 + 1))
        _race(store_url, ks, lambda k: k.activate(now=T0 + 1 + DELAY))
        with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
            records = ds.signing_keys.of_purpose("jwt-svid")
        # no orphan keys in the store: one per record
        assert sorted(i.name for i in ks.list()) == sorted(r.key_name for r in records)
    assert [r.status for r in records] == ["retired", "active"]


def test_scheduled_rotation_follows_the_period(store: Datastore, key_store: KeyStore) -> None:
    keys = SigningKeys(
        store, key_store, "wit", key_name="wit", propagation_delay=DELAY, rotation_period=6000
    )
    first = keys.rotate(now=T0)
    assert keys.rotate(now=T0 + 2999).kid == first.kid
    assert len(keys.keys()) == 1  # nothing prepared before half the period
    assert keys.rotate(now=T0 + 3000).kid == first.kid
    nxt = [k for k in keys.keys() if k.record.status == "published"]
    assert len(nxt) == 1 and nxt[0].kid in {a.kid for a in keys.bundle().jwt_authorities}
    assert keys.rotate(now=T0 + 4999).kid == first.kid
    assert keys.rotate(now=T0 + 5000).kid == nxt[0].kid  # five sixths: the next key signs
    # the old key signed nothing: it goes once servers can no longer hold it
    assert keys.rotate(now=T0 + 5000 + DELAY).kid == nxt[0].kid
    assert [k.kid for k in keys.keys()] == [nxt[0].kid]


def test_servers_with_their_own_hsm_sessions_make_one_key(
    store_url: str, request: pytest.FixtureRequest
) -> None:
    """Each server opens its own PKCS#11 store on one SoftHSM token, as servers
    sharing a network HSM do; keys one makes the others find."""
    hsm = request.getfixturevalue("softhsm")
    config = KeyStoreConfig(store="pkcs11", pkcs11_module=hsm.module, pkcs11_uri=hsm.uri)
    barrier = threading.Barrier(3)
    active: list[str] = []
    errors: list[BaseException] = []

    def server() -> None:
        try:
            with (
                Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds,
                open_key_store(config) as ks,
            ):
                keys = _manager(ds, ks)
                barrier.wait()
                active.append(keys.ensure_active(now=T0).kid)
                barrier.wait()
                keys.prepare(now=T0 + 1)
                barrier.wait()
                keys.activate(now=T0 + 1 + DELAY)
                barrier.wait()
                active.append(keys.current().kid)
        except BaseException as exc:  # noqa: BLE001 - the main thread asserts on it
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=server) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(active[:3])) == 1 and len(set(active[3:])) == 1
    assert active[0] != active[3]
    with open_key_store(config) as ks, Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
        records = ds.signing_keys.of_purpose("jwt-svid")
        assert [r.status for r in records] == ["retired", "active"]
        assert sorted(i.name for i in ks.list()) == sorted(r.key_name for r in records)
