"""Issue 7 item 10 (PKCS#11): only custody-grade keys are used.

A key that was imported into the token (``C_CreateObject`` with its private
value: someone else had the value) or whose value the token would let out
(``CKA_EXTRACTABLE`` true, ``CKA_SENSITIVE`` false) is refused with
:class:`KeyNotCustodyGradeError` when it is first looked up, against a real
SoftHSM token, and left out of ``list()`` with a warning.  The verdict is kept
with the key's ``CKA_ID`` and object handle: a key replaced under the same name by
an imported one (with a new or the same ``CKA_ID``) is refused on its next lookup.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from custos.keys import KeyStoreError
from custos.keys.errors import KeyNotCustodyGradeError
from custos.keys.pkcs11 import Pkcs11KeyStore
from custos.keys.signatures import raw_to_der
from custos.testing.softhsm import SoftHSMToken

_P256 = encode_named_curve_parameters("secp256r1")


@pytest.fixture
def hsm_store(softhsm: SoftHSMToken) -> Iterator[Pkcs11KeyStore]:
    store = Pkcs11KeyStore(softhsm.module, softhsm.uri)
    yield store
    for info in store.list():
        if info.name.startswith("cg-"):
            store.delete(info.name)
    store.close()


@pytest.fixture
def raw_session(softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore) -> Iterator[pkcs11.Session]:
    """A plain python-pkcs11 session beside the store (it shares the store's login)."""
    lib = pkcs11.lib(os.path.realpath(softhsm.module))
    session = lib.get_token(token_label=softhsm.token_label).open(rw=True)
    yield session
    session.close()


def _name(prefix: str) -> str:
    return f"cg-{prefix}-{uuid.uuid4().hex[:10]}"


def import_p256(
    session: pkcs11.Session, name: str, key_id: bytes | None = None
) -> ec.EllipticCurvePrivateKey:
    """Put a software-made P-256 key on the token with C_CreateObject, as a migration
    tool would: the private object is SENSITIVE and not EXTRACTABLE, but not LOCAL."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_id = key_id or os.urandom(16)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: _P256,
            Attribute.VALUE: scalar,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.LABEL: name,
            Attribute.ID: key_id,
        }
    )
    point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: _P256,
            Attribute.EC_POINT: b"\x04" + bytes([len(point)]) + point,  # DER OCTET STRING
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: True,
            Attribute.LABEL: name,
            Attribute.ID: key_id,
        }
    )
    return key


def generate_exportable(session: pkcs11.Session, name: str) -> None:
    """A key pair generated on the token, but with a private value it would hand out."""
    params: Any = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: _P256}, local=True
    )
    params.generate_keypair(
        store=True,
        label=name,
        id=os.urandom(16),
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        private_template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: False,
            Attribute.EXTRACTABLE: True,
            Attribute.SIGN: True,
        },
        public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False},
    )


def _assert_refused(store: Pkcs11KeyStore, name: str) -> None:
    for call in (
        lambda: store.info(name),
        lambda: store.sign(name, b"m"),
        lambda: store.public_key(name),
        lambda: store.public_jwk(name),
        lambda: store.get(name),
    ):
        with pytest.raises(KeyNotCustodyGradeError) as info:
            call()
        err = info.value
        assert isinstance(err, KeyStoreError) and err.code == "key_not_custody_grade"
        assert name in err.message


def test_imported_private_key_is_refused(
    hsm_store: Pkcs11KeyStore, raw_session: pkcs11.Session
) -> None:
    name = _name("imp")
    key = import_p256(raw_session, name)
    # The token would sign with it: this is a usable key, just not one custody can vouch for.
    handle: Any = raw_session.get_key(ObjectClass.PRIVATE_KEY, label=name)
    digest = b"\x01" * 32
    raw = handle.sign(digest, mechanism=Mechanism.ECDSA)
    key.public_key().verify(raw_to_der(raw, 32), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    _assert_refused(hsm_store, name)
    with pytest.raises(KeyNotCustodyGradeError, match=r"imported|generated"):
        hsm_store.info(name)


def test_extractable_or_not_sensitive_key_is_refused(
    hsm_store: Pkcs11KeyStore, raw_session: pkcs11.Session
) -> None:
    name = _name("ext")
    generate_exportable(raw_session, name)
    _assert_refused(hsm_store, name)
    with pytest.raises(KeyNotCustodyGradeError, match=r"extract|sensitive"):
        hsm_store.sign(name, b"m")


def test_store_made_keys_are_custody_grade_and_others_keep_working(
    softhsm: SoftHSMToken,
    hsm_store: Pkcs11KeyStore,
    raw_session: pkcs11.Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = _name("good")
    hsm_store.create(good, "ES256")
    imported, exportable = _name("imp"), _name("ext")
    import_p256(raw_session, imported)
    generate_exportable(raw_session, exportable)
    # list() names only keys info()/sign() accept (as the TPM store's list does); the
    # skipped ones are said in a warning, so an operator sees why a key is missing.
    with caplog.at_level("WARNING", logger="custos"):
        assert [info.name for info in hsm_store.list()] == [good]
    skipped = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert imported in skipped and exportable in skipped
    # A fresh store (nothing cached) looks the key up on the token and accepts it.
    with Pkcs11KeyStore(softhsm.module, softhsm.uri) as other:
        assert other.info(good).name == good
        pub = other.public_key(good)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        sig = other.sign(good, b"m")
        pub.verify(raw_to_der(sig, 32), b"m", ec.ECDSA(hashes.SHA256()))


def test_key_replaced_by_an_imported_one_is_refused_on_its_next_use(
    hsm_store: Pkcs11KeyStore, raw_session: pkcs11.Session
) -> None:
    name = _name("swap")
    hsm_store.create(name, "ES256")
    hsm_store.sign(name, b"cached handle and verdict")
    for obj in list(raw_session.get_objects({Attribute.LABEL: name})):
        obj.destroy()
    import_p256(raw_session, name)  # same name, new CKA_ID, not generated on the token
    with pytest.raises(KeyNotCustodyGradeError):
        hsm_store.sign(name, b"m")  # the stale handle makes the store look again
    with pytest.raises(KeyNotCustodyGradeError):
        hsm_store.public_key(name)


def test_key_replaced_with_the_same_label_and_cka_id_is_checked_again(
    hsm_store: Pkcs11KeyStore, raw_session: pkcs11.Session
) -> None:
    # The verdict is cached by CKA_ID; a tool that re-creates the key with the same
    # label *and* CKA_ID (an import keeping the old id) must not inherit it.
    name = _name("sameid")
    hsm_store.create(name, "ES256")
    hsm_store.sign(name, b"cached handle and verdict")
    private: Any = raw_session.get_key(ObjectClass.PRIVATE_KEY, label=name)
    key_id = private[Attribute.ID]
    for obj in list(raw_session.get_objects({Attribute.LABEL: name})):
        obj.destroy()
    import_p256(raw_session, name, key_id)
    with pytest.raises(KeyNotCustodyGradeError):
        hsm_store.sign(name, b"m")  # the stale handle makes the store look again
    with pytest.raises(KeyNotCustodyGradeError):
        hsm_store.public_key(name)
    with pytest.raises(KeyNotCustodyGradeError):
        hsm_store.info(name)
