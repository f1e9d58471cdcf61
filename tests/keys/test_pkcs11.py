"""PKCS#11-specific behaviour of the ``pkcs11`` key store, against a real SoftHSM2 token.

The generic sign / verify / delete contract runs in test_contract.py; here: the
RFC 7512 URI parser, what the token enforces (non-exportability), PINs, errors,
recovery when the session or the token goes away, sharing one session between
stores and threads, EdDSA through CKM_EDDSA, keys replaced by another process,
and key URIs other tools (pkcs11-tool, p11tool) can use.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from custos.keys import (
    Algorithm,
    AuthenticationError,
    DeviceUnavailableError,
    KeyNotFoundError,
    KeyStoreError,
    StoreConfigError,
)
from custos.keys.pkcs11 import Pkcs11KeyStore
from custos.keys.pkcs11_uri import PIN_ENV_VAR, Pkcs11Uri, Pkcs11UriError
from custos.keys.signatures import raw_to_der
from custos.testing.softhsm import SoftHSMToken, write_config

Namer = Callable[[str], str]


def verify_es256(pub: object, data: bytes, sig: bytes) -> None:
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(raw_to_der(sig, 32), data, ec.ECDSA(Algorithm.ES256.spec.hash_algorithm()))


def fresh_label(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # SoftHSM labels hold 32 characters


@pytest.fixture
def p11name() -> Namer:
    return lambda prefix: f"p11-{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def hsm_store(softhsm: SoftHSMToken) -> Iterator[Pkcs11KeyStore]:
    store = Pkcs11KeyStore(softhsm.module, softhsm.uri)
    yield store
    for info in store.list():
        if info.name.startswith("p11-"):
            store.delete(info.name)
    store.close()


@pytest.fixture
def raw_session(softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore) -> Iterator[pkcs11.Session]:
    """A plain python-pkcs11 session beside the store: what any other PKCS#11 caller sees.

    It inherits the store's login (PKCS#11 login state is per process and token);
    a public session's close() does not log the store out.
    """
    lib = pkcs11.lib(os.path.realpath(softhsm.module))
    session = lib.get_token(token_label=softhsm.token_label).open(rw=True)
    yield session
    session.close()


# ---- RFC 7512 URIs ---------------------------------------------------------------------


def test_uri_rfc7512_examples() -> None:
    u = Pkcs11Uri.parse(
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
        "id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin"
    )
    assert u.token == "The Software PKCS#11 Softtoken"
    assert u.manufacturer == "Snake Oil, Inc."
    assert u.model == "1.0" and u.object == "my-certificate" and u.type == "cert"
    assert u.id == bytes.fromhex("69953e5cf4bdec91")
    assert u.serial == ""
    assert u.pin_source == "file:/etc/token_pin" and u.pin_value is None

    u = Pkcs11Uri.parse(
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;"
        "library-description=Soft%20Token%20Library;library-version=1.23"
    )
    assert u.library_manufacturer == "Snake Oil, Inc."
    assert u.library_description == "Soft Token Library" and u.library_version == "1.23"

    u = Pkcs11Uri.parse("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;type=cert")
    assert u.token == "A name with a substring %;"
    u = Pkcs11Uri.parse("pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1")
    assert u.token == "Name with a small A with acute: \u00e1"
    u = Pkcs11Uri.parse("pkcs11:slot-description=Sun%20Metaslot;slot-id=5")
    assert u.slot_description == "Sun Metaslot" and u.slot_id == 5
    assert Pkcs11Uri.parse("pkcs11:") == Pkcs11Uri()
    assert Pkcs11Uri.parse("PKCS11:token=x").token == "x"  # schemes are case-insensitive


def test_uri_query_and_vendor_attributes_kept() -> None:
    u = Pkcs11Uri.parse(
        "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a;x-v=1"
        "?pin-source=file:/etc/token_pin&vendor-bbb=value-b"
        "&module-name=softhsm2&module-path=/usr/lib/softhsm/libsofthsm2.so"
    )
    assert u.vendor_path == (("vendor-aaa", "value-a"), ("x-v", "1"))
    assert u.vendor_query == (("vendor-bbb", "value-b"),)
    assert u.module_name == "softhsm2"
    assert u.module_path == "/usr/lib/softhsm/libsofthsm2.so"


def test_uri_str_round_trips_without_the_pin() -> None:
    secret = "pin-" + uuid.uuid4().hex
    u = Pkcs11Uri.parse(f"pkcs11:token=a%20b;id=%00%FF;x-q=%2F?pin-value={secret}&module-name=m")
    text = str(u)
    assert secret not in text and secret not in repr(u)
    again = Pkcs11Uri.parse(text)
    assert again.pin_value is None
    assert again == Pkcs11Uri(
        token="a b", id=b"\x00\xff", vendor_path=(("x-q", "/"),), module_name="m"
    )
    assert u.pin_value == secret  # kept for use, just never shown


@pytest.mark.parametrize(
    "bad",
    [
        "pkcs:token=a",
        "token=a",
        "pkcs11:token=a;token=b",  # duplicate attribute
        "pkcs11:?module-name=a&module-name=b",
        "pkcs11:token=a%zz",  # malformed escape
        "pkcs11:token=a%2",
        "pkcs11:token=a b",  # space must be %20
        "pkcs11:token=a/b",  # "/" must be escaped in the path
        "pkcs11:token",  # no "="
        "pkcs11:token=a;;model=b",
        "pkcs11:Token=a",
        "pkcs11:type=banana",
        "pkcs11:slot-id=abc",
        "pkcs11:library-version=1.2.3",
        "pkcs11:token=%FF",  # not UTF-8 after decoding
        "pkcs11:token=a#frag",
        "pkcs11:?pin-value=1&pin-source=/x",
    ],
)
def test_uri_malformed_rejected(bad: str) -> None:
    with pytest.raises(Pkcs11UriError) as info:
        Pkcs11Uri.parse(bad)
    assert isinstance(info.value, StoreConfigError)
    assert info.value.code == "pkcs11_uri_invalid"


def test_uri_error_does_not_echo_a_malformed_pin() -> None:
    with pytest.raises(Pkcs11UriError) as info:
        Pkcs11Uri.parse("pkcs11:token=t?pin-value=hunter%zz2secret")
    assert "hunter" not in str(info.value) and "secret" not in str(info.value)


def test_pin_source_file_forms(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("s3cr3t-pin\n")
    pin_file.chmod(0o600)
    for source in (f"file:{pin_file}", f"file://{pin_file}", str(pin_file)):
        uri = Pkcs11Uri.parse(f"pkcs11:token=t?pin-source={source}")
        assert uri.resolve_pin(environ={PIN_ENV_VAR: "ignored"}) == "s3cr3t-pin"
    assert "s3cr3t" not in repr(uri) + str(uri)


def test_pin_source_errors(tmp_path: Path) -> None:
    with pytest.raises(Pkcs11UriError, match="missing"):
        Pkcs11Uri.parse(f"pkcs11:?pin-source=file:{tmp_path}/missing").resolve_pin()
    (tmp_path / "empty").write_text("")
    with pytest.raises(Pkcs11UriError, match="empty"):
        Pkcs11Uri.parse(f"pkcs11:?pin-source={tmp_path}/empty").resolve_pin()
    marker = tmp_path / "ran"
    with pytest.raises(Pkcs11UriError, match="not supported"):
        Pkcs11Uri.parse(f"pkcs11:?pin-source=|/usr/bin/touch%20{marker}").resolve_pin()
    assert not marker.exists()  # the command was not run


def test_pin_env_fallback_only_without_pin_in_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIN_ENV_VAR, "from-env")
    assert Pkcs11Uri.parse("pkcs11:token=t").resolve_pin() == "from-env"
    assert Pkcs11Uri.parse("pkcs11:token=t?pin-value=from-uri").resolve_pin() == "from-uri"
    monkeypatch.delenv(PIN_ENV_VAR)
    assert Pkcs11Uri.parse("pkcs11:token=t").resolve_pin() is None


# ---- what the token enforces -----------------------------------------------------------


def test_private_key_is_not_extractable(
    hsm_store: Pkcs11KeyStore, raw_session: pkcs11.Session, p11name: Namer
) -> None:
    name = p11name("nx")
    hsm_store.create(name, "ES256")
    key = raw_session.get_key(ObjectClass.PRIVATE_KEY, label=name)
    with pytest.raises(p11e.AttributeSensitive):
        key[Attribute.VALUE]  # the private scalar: the token refuses to read it out
    assert key[Attribute.SENSITIVE] is True
    assert key[Attribute.ALWAYS_SENSITIVE] is True
    assert key[Attribute.EXTRACTABLE] is False
    assert key[Attribute.NEVER_EXTRACTABLE] is True
    assert key[Attribute.DERIVE] is False
    assert key[Attribute.DECRYPT] is False
    assert key[Attribute.SIGN] is True
    assert key[Attribute.TOKEN] is True and key[Attribute.PRIVATE] is True
    # An attacker holding the PIN tries to make the key exportable: the token says no.
    with pytest.raises(p11e.AttributeReadOnly):
        key[Attribute.EXTRACTABLE] = True
    with pytest.raises(p11e.AttributeReadOnly):
        key[Attribute.SENSITIVE] = False
    assert key[Attribute.EXTRACTABLE] is False
    # ...or to use it with another mechanism (raw ECDH derivation is off, and
    # CKA_ALLOWED_MECHANISMS limits signing to CKM_ECDSA).
    with pytest.raises(p11e.MechanismInvalid):
        key.sign(b"x" * 64, mechanism=pkcs11.Mechanism.ECDSA_SHA256)


def test_pkcs11_tool_reports_never_extractable(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer
) -> None:
    name = p11name("tool")
    hsm_store.create(name, "ES256")
    out = subprocess.run(
        ["pkcs11-tool", "--module", softhsm.module, "--login", "--pin", softhsm.pin,
         "--token-label", softhsm.token_label, "--list-objects", "--type", "privkey"],
        env={**os.environ, **softhsm.env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.split("Private Key Object")
    ours = [b for b in blocks if f"label:      {name}\n" in b]
    assert len(ours) == 1, out.stdout
    access = next(line for line in ours[0].splitlines() if "Access:" in line)
    usage = next(line for line in ours[0].splitlines() if "Usage:" in line)
    assert "never extractable" in access and "sensitive" in access, access
    assert usage.split(":", 1)[1].strip() == "sign", usage


# ---- PINs and configuration errors -------------------------------------------------------


def _assert_pin_nowhere(pin: str, exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for item in chain:
        assert pin not in str(item) and pin not in repr(item)
    assert pin not in caplog.text


def test_wrong_pin_on_the_token(softhsm: SoftHSMToken, caplog: pytest.LogCaptureFixture) -> None:
    token = softhsm.new_token(fresh_label("pin"))  # nobody in this process is logged in there
    wrong = "wrong-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthenticationError) as info:
        Pkcs11KeyStore(token.module, f"pkcs11:token={token.token_label}?pin-value={wrong}")
    assert info.value.code == "device_authentication_failed"
    assert isinstance(info.value.__cause__, p11e.PinIncorrect)
    _assert_pin_nowhere(wrong, info.value, caplog)
    # the right PIN still opens it
    with Pkcs11KeyStore(token.module, token.uri) as good:
        assert token.pin not in repr(good) and token.pin not in str(good)
        assert good.list() == []


def test_wrong_pin_cannot_ride_on_an_existing_login(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    # hsm_store is logged in; PKCS#11 login is per process, so without a check a
    # second store with any PIN at all would get in.
    wrong = "wrong-" + uuid.uuid4().hex
    with pytest.raises(AuthenticationError) as info:
        Pkcs11KeyStore(softhsm.module, f"pkcs11:token={softhsm.token_label}?pin-value={wrong}")
    _assert_pin_nowhere(wrong, info.value, caplog)
    _assert_pin_nowhere(softhsm.pin, info.value, caplog)


def _change_pin(token: SoftHSMToken, old: str, new: str) -> None:
    out = subprocess.run(
        ["pkcs11-tool", "--module", token.module, "--token-label", token.token_label,
         "--login", "--pin", old, "--change-pin", "--new-pin", new],
        env={**os.environ, **token.env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_pin_changed_under_a_running_store_is_not_retried(
    softhsm: SoftHSMToken, caplog: pytest.LogCaptureFixture
) -> None:
    token = softhsm.new_token(fresh_label("chpin"))
    store = Pkcs11KeyStore(token.module, token.uri)
    try:
        store.create("k", "ES256")
        new_pin = "new-" + uuid.uuid4().hex
        _change_pin(token, token.pin, new_pin)
        pkcs11.lib(os.path.realpath(token.module)).reinitialize()  # the login is gone
        with pytest.raises(AuthenticationError):
            store.sign("k", b"x")  # recovery logs in again with the old PIN: refused
        _change_pin(token, new_pin, token.pin)
        # The old PIN is valid again, but the store does not try it again by itself:
        # a real token locks its PIN after a few refusals.
        with pytest.raises(AuthenticationError, match="not trying again"):
            store.sign("k", b"x")
        assert token.pin not in caplog.text and new_pin not in caplog.text
        # SoftHSM re-reads a token's PIN data only at C_Initialize (measured).
        pkcs11.lib(os.path.realpath(token.module)).reinitialize()
        with pytest.raises(AuthenticationError, match="not trying again"):
            store.sign("k", b"x")  # still latched: the store made no attempt of its own
        # Opening a store is the deliberate new attempt; both stores work again.
        with Pkcs11KeyStore(token.module, token.uri) as fresh:
            verify_es256(fresh.public_key("k"), b"y", store.sign("k", b"y"))
    finally:
        store.close()


def test_pin_from_file_and_from_environment(
    softhsm: SoftHSMToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o600)
    with Pkcs11KeyStore(
        softhsm.module, f"pkcs11:token={softhsm.token_label}?pin-source=file:{pin_file}"
    ) as store:
        assert softhsm.pin not in repr(store)
        store.list()
    monkeypatch.setenv(PIN_ENV_VAR, softhsm.pin)
    with Pkcs11KeyStore(softhsm.module, f"pkcs11:token={softhsm.token_label}") as store:
        store.list()
    monkeypatch.delenv(PIN_ENV_VAR)
    with pytest.raises(StoreConfigError, match="CUSTOS_PKCS11_PIN"):
        Pkcs11KeyStore(softhsm.module, f"pkcs11:token={softhsm.token_label}")


def test_missing_or_bogus_module_is_a_config_error(softhsm: SoftHSMToken, tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="does not exist"):
        Pkcs11KeyStore(str(tmp_path / "nope.so"), softhsm.uri)
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(StoreConfigError, match="cannot load"):
        Pkcs11KeyStore(str(bogus), softhsm.uri)
    with pytest.raises(StoreConfigError, match="module-path"):
        Pkcs11KeyStore(softhsm.module, softhsm.uri + f"&module-path={tmp_path}/other.so")


def test_unknown_token_label_is_device_unavailable(softhsm: SoftHSMToken) -> None:
    with pytest.raises(DeviceUnavailableError, match="no-such-token"):
        Pkcs11KeyStore(softhsm.module, f"pkcs11:token=no-such-token?pin-value={softhsm.pin}")


def test_module_named_through_a_symlink_and_directly(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer, tmp_path: Path
) -> None:
    real = os.path.realpath(softhsm.module)
    # A second name for the same library, made here so the test never depends on
    # how the distribution lays out the module (Debian's path is a symlink already).
    alias = tmp_path / "libsofthsm2-alias.so"
    alias.symlink_to(real)
    # python-pkcs11 alone would C_Initialize the same library twice and fail.
    with Pkcs11KeyStore(str(alias), softhsm.uri) as other:
        name = p11name("sym")
        hsm_store.create(name, "ES256")
        verify_es256(hsm_store.public_key(name), b"m", other.sign(name, b"m"))


# ---- keys made elsewhere, algorithms after a restart ------------------------------------


def test_algorithms_recovered_from_the_token_after_restart(softhsm: SoftHSMToken) -> None:
    token = softhsm.new_token(fresh_label("algs"))
    names = {alg: f"k-{alg.value.lower()}" for alg in Algorithm}
    with Pkcs11KeyStore(token.module, token.uri) as store:
        for alg, name in names.items():
            store.create(name, alg)
        publics = {name: store.public_jwk(name) for name in names.values()}
    # the last store closed: the next one starts with empty caches and asks the token
    with Pkcs11KeyStore(token.module, token.uri) as store:
        assert {k.name: k.alg for k in store.list()} == {n: a for a, n in names.items()}
        for alg, name in names.items():
            assert store.info(name).alg is alg
            assert store.public_jwk(name) == publics[name]


def test_key_generated_by_pkcs11_tool_is_usable(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer
) -> None:
    name = p11name("ext")
    out = subprocess.run(
        ["pkcs11-tool", "--module", softhsm.module, "--login", "--pin", softhsm.pin,
         "--token-label", softhsm.token_label, "--keypairgen", "--key-type", "EC:prime256v1",
         "--label", name, "--id", "c0ffee"],
        env={**os.environ, **softhsm.env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert hsm_store.info(name).alg is Algorithm.ES256
    verify_es256(hsm_store.public_key(name), b"interop", hsm_store.sign(name, b"interop"))


# ---- EdDSA ---------------------------------------------------------------------------------


def test_eddsa_key_signs_with_ckm_eddsa(
    hsm_store: Pkcs11KeyStore, raw_session: pkcs11.Session, p11name: Namer
) -> None:
    name = p11name("ed")
    hsm_store.create(name, Algorithm.EdDSA)
    assert raw_session.get_key(ObjectClass.PRIVATE_KEY, label=name).key_type is KeyType.EC_EDWARDS
    pub = hsm_store.public_key(name)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    msg = b"pure Ed25519 over the whole message"
    sig = hsm_store.sign(name, msg)
    assert len(sig) == 64
    pub.verify(sig, msg)
    assert hsm_store.sign(name, msg) == sig  # Ed25519 is deterministic (RFC 8032)
    with pytest.raises(InvalidSignature):
        pub.verify(sig, msg + b".")


# ---- session and token loss ----------------------------------------------------------------


def test_lost_session_is_reopened_transparently(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    name = p11name("lost")
    hsm_store.create(name, "ES256")
    pub = hsm_store.public_key(name)
    verify_es256(pub, b"before", hsm_store.sign(name, b"before"))
    # Another part of the process finalizes the library: every session and login is gone.
    pkcs11.lib(os.path.realpath(softhsm.module)).reinitialize()
    caplog.set_level(logging.WARNING, logger="custos.keys.pkcs11")
    verify_es256(pub, b"after", hsm_store.sign(name, b"after"))
    assert "re-initializing" in caplog.text
    assert softhsm.pin not in caplog.text
    assert name in [k.name for k in hsm_store.list()]


def test_token_gone_and_back(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer
) -> None:
    token = softhsm.new_token(fresh_label("unplug"))
    store = Pkcs11KeyStore(token.module, token.uri)
    try:
        store.create("ec", "ES256")
        store.create("ed", "EdDSA")
        pub = store.public_key("ec")
        with token.unplugged():
            # First call on the still-open session: SoftHSM answers an object search with
            # "nothing" now; the store must not turn that into "key not found".
            with pytest.raises(DeviceUnavailableError):
                store.info("never-cached")
            for _ in range(2):  # stays unavailable, call after call
                with pytest.raises(DeviceUnavailableError, match=r"unavailable|no PKCS#11 token"):
                    store.sign("ec", b"while gone")
            with pytest.raises(DeviceUnavailableError):
                store.list()
            with pytest.raises(DeviceUnavailableError):
                store.create("new", "ES256")
        # back: the next call works and no key was lost
        verify_es256(pub, b"back", store.sign("ec", b"back"))
        assert {k.name for k in store.list()} == {"ec", "ed"}
        ed_pub = store.public_key("ed")
        assert isinstance(ed_pub, ed25519.Ed25519PublicKey)
        ed_pub.verify(store.sign("ed", b"back"), b"back")
        with pytest.raises(KeyNotFoundError):
            store.sign("new", b"x")  # the create while away did not half-happen
    finally:
        store.close()
    with Pkcs11KeyStore(token.module, token.uri) as again:  # and a listing while away lies not
        again.list()
        with token.unplugged(), pytest.raises(DeviceUnavailableError):
            again.list()
    # the other token's store, whose session the re-initialization also dropped, carries on
    name = p11name("other")
    hsm_store.create(name, "ES256")
    verify_es256(hsm_store.public_key(name), b"ok", hsm_store.sign(name, b"ok"))


# ---- threads ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_8_threads_x_500_over_two_stores_sharing_one_session(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer
) -> None:
    second = Pkcs11KeyStore(softhsm.module, softhsm.uri)  # same token: same session and lock
    try:
        ec_name, ed_name = p11name("cc-ec"), p11name("cc-ed")
        hsm_store.create(ec_name, "ES256")
        second.create(ed_name, "EdDSA")
        ec_pub, ed_pub = hsm_store.public_key(ec_name), second.public_key(ed_name)
        assert isinstance(ed_pub, ed25519.Ed25519PublicKey)
        results: list[tuple[str, bytes, bytes]] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(t: int) -> None:
            store = hsm_store if t % 2 else second
            local = []
            try:
                for i in range(500):
                    name = ec_name if (t + i) % 2 else ed_name
                    msg = f"{t}:{i}".encode()
                    local.append((name, msg, store.sign(name, msg)))
                    if i % 100 == 0:
                        store.list()  # object searches interleaved with signing
                with lock:
                    results.extend(local)
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        assert len(results) == 4000
        for name, msg, sig in results:
            if name == ec_name:
                verify_es256(ec_pub, msg, sig)
            else:
                ed_pub.verify(sig, msg)
    finally:
        second.close()


def test_pin_in_the_path_part_is_refused_and_never_echoed() -> None:
    """A PIN put in the path part (a common slip) must not end up in messages."""
    from custos.keys.pkcs11_uri import Pkcs11Uri, Pkcs11UriError

    with pytest.raises(Pkcs11UriError) as exc:
        Pkcs11Uri.parse("pkcs11:token=nosuch;pin-value=SECRET1234")
    assert "SECRET1234" not in str(exc.value)
    vendor = Pkcs11Uri.parse("pkcs11:token=t;x-pin=SECRET1234?x-pin-value=SECRET5678&x-mode=fast")
    for text in (str(vendor), repr(vendor)):
        assert "SECRET1234" not in text and "SECRET5678" not in text
    assert "x-mode=fast" in str(vendor)


# ---- a key replaced by another process -------------------------------------------------------

_REPLACE_SCRIPT = """
import json, sys
from custos.keys.pkcs11 import Pkcs11KeyStore
module, uri, name, alg = sys.argv[1:5]
with Pkcs11KeyStore(module, uri) as b:
    b.delete(name)
    b.create(name, alg)
    print(json.dumps(b.public_jwk(name)))
"""


def _replace_in_another_process(token: SoftHSMToken, name: str, alg: str) -> dict[str, str]:
    """Store B, in a child process: delete ``name`` and create it again."""
    import json
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _REPLACE_SCRIPT, token.module, token.uri, name, alg],
        env={**os.environ, **token.env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    jwk: dict[str, str] = json.loads(out.stdout)
    return jwk


@pytest.mark.parametrize("first", ["public_key", "sign"])
def test_key_replaced_by_another_process_is_seen(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, raw_session: pkcs11.Session,
    p11name: Namer, caplog: pytest.LogCaptureFixture, first: str,
) -> None:  # fmt: skip
    name = p11name("repl")
    hsm_store.create(name, "ES256")
    old_jwk = hsm_store.public_jwk(name)
    verify_es256(hsm_store.public_key(name), b"old", hsm_store.sign(name, b"old"))
    new_jwk = _replace_in_another_process(softhsm, name, "ES256")
    assert new_jwk != old_jwk
    caplog.set_level(logging.WARNING, logger="custos.keys.pkcs11")
    if first == "sign":
        sig = hsm_store.sign(name, b"new")  # the cached handle is stale
        verify_es256(hsm_store.public_key(name), b"new", sig)
    assert hsm_store.public_key(name) == _replace_public(new_jwk)
    assert hsm_store.public_jwk(name) == new_jwk
    verify_es256(_replace_public(new_jwk), b"again", hsm_store.sign(name, b"again"))
    # A stale object handle is not a lost session: no C_Finalize, so the other
    # session in this process (raw_session) is still open.
    assert "re-initializing" not in caplog.text
    assert len(list(raw_session.get_objects({Attribute.LABEL: name}))) == 2


def test_key_replaced_with_another_algorithm(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer
) -> None:
    name = p11name("realg")
    hsm_store.create(name, "ES256")
    hsm_store.sign(name, b"cache the handle")
    new_jwk = _replace_in_another_process(softhsm, name, "EdDSA")
    # The caller asked for an ES256 signature: not silently an EdDSA one.
    with pytest.raises(KeyStoreError, match="replaced"):
        hsm_store.sign(name, b"x")
    assert hsm_store.info(name).alg is Algorithm.EdDSA
    pub = hsm_store.public_key(name)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    assert hsm_store.public_jwk(name) == new_jwk
    pub.verify(hsm_store.sign(name, b"ed"), b"ed")


def test_public_key_after_another_process_replaced_it_with_a_fresh_store(
    softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore, p11name: Namer
) -> None:
    # A second store instance in this process shares the first one's cache.
    name = p11name("repl2")
    hsm_store.create(name, "ES256")
    with Pkcs11KeyStore(softhsm.module, softhsm.uri) as other:
        old = other.public_key(name)
        new_jwk = _replace_in_another_process(softhsm, name, "ES256")
        new = other.public_key(name)
        assert new != old and new == _replace_public(new_jwk)
        verify_es256(new, b"m", other.sign(name, b"m"))
        verify_es256(new, b"m", hsm_store.sign(name, b"m"))


def _replace_public(jwk: dict[str, str]) -> ec.EllipticCurvePublicKey:
    import base64

    def num(v: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)), "big")

    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256"
    return ec.EllipticCurvePublicNumbers(num(jwk["x"]), num(jwk["y"]), ec.SECP256R1()).public_key()


# ---- RFC 7512: the store URI names a token; key_uri() names a key ---------------------------


@pytest.mark.parametrize("attr", ["object=k", "id=%01%02", "type=private", "object=k;type=private"])
def test_key_attributes_in_the_store_uri_are_refused(softhsm: SoftHSMToken, attr: str) -> None:
    uri = f"pkcs11:token={softhsm.token_label};{attr}?pin-value={softhsm.pin}"
    with pytest.raises(StoreConfigError, match="by name") as info:
        Pkcs11KeyStore(softhsm.module, uri)
    assert softhsm.pin not in str(info.value)


def test_library_attributes_are_matched(softhsm: SoftHSMToken, hsm_store: Pkcs11KeyStore) -> None:
    from urllib.parse import quote

    lib = pkcs11.lib(os.path.realpath(softhsm.module))
    major, minor = lib.library_version
    manufacturer = quote(lib.manufacturer_id, safe="")
    description = quote(lib.library_description, safe="")
    base = f"pkcs11:token={softhsm.token_label}"
    pin = f"?pin-value={softhsm.pin}"
    good = (
        f"{base};library-manufacturer={manufacturer};library-description={description};"
        f"library-version={major}.{minor}{pin}"
    )
    with Pkcs11KeyStore(softhsm.module, good) as store:
        store.list()
    for bad in (
        f"library-version={major + 7}.{minor}",
        f"library-version={major}.{minor + 1}",
        "library-manufacturer=Someone%20Else",
        "library-description=Another%20library",
    ):
        with pytest.raises(StoreConfigError, match="module") as info:
            Pkcs11KeyStore(softhsm.module, f"{base};{bad}{pin}")
        assert softhsm.pin not in str(info.value)
    if minor == 0:
        with Pkcs11KeyStore(softhsm.module, f"{base};library-version={major}{pin}") as store:
            store.list()  # "M" means "M.0" (RFC 7512)
    else:
        with pytest.raises(StoreConfigError, match="library-version"):
            Pkcs11KeyStore(softhsm.module, f"{base};library-version={major}{pin}")


def test_key_uri_round_trips_and_other_tools_find_the_key(
    softhsm: SoftHSMToken, tmp_path: Path
) -> None:
    import dataclasses
    import shutil

    token = softhsm.new_token(fresh_label("uri; x%"))  # characters that need escaping
    with Pkcs11KeyStore(token.module, token.uri) as store:
        store.create("k.1", "ES256")
        store.create("k.2", "EdDSA")
        with pytest.raises(KeyNotFoundError):
            store.key_uri("no-such-key")
        text = store.key_uri("k.1")
        assert token.pin not in text and "pin-value" not in text
        uri = Pkcs11Uri.parse(text)
        assert uri.object == "k.1" and uri.type == "private"
        assert uri.token == token.token_label and uri.id is None
        assert uri.serial and uri.manufacturer and uri.model
        assert uri.pin_value is None and uri.pin_source is None
        assert Pkcs11Uri.parse(str(uri)) == uri
        # Its token part, with a PIN, opens a store that sees the key.
        token_part = str(dataclasses.replace(uri, object=None, type=None))
        with Pkcs11KeyStore(token.module, f"{token_part}?pin-value={token.pin}") as again:
            public = again.public_key("k.1")
            verify_es256(public, b"m", store.sign("k.1", b"m"))

    # The other tools get a SoftHSM configuration of their own holding a copy of this
    # token only: GnuTLS (p11tool) reads at most 48 slots, and the session's token
    # directory holds more tokens than that by the end of a full run.
    private = tmp_path / "tools"
    conf = write_config(private)
    shutil.copytree(token.token_dir, private / "tokens" / token.token_dir.name)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    # pkcs11-tool (no URI support) shows the key under the URI's token and object label.
    assert uri.token is not None and uri.object is not None
    out = subprocess.run(
        ["pkcs11-tool", "--module", token.module, "--login", "--pin", token.pin,
         "--token-label", uri.token, "--list-objects", "--type", "privkey"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    labels = [
        b for b in out.stdout.split("Private Key Object") if f"label:      {uri.object}\n" in b
    ]
    assert len(labels) == 1, out.stdout
    # p11tool (GnuTLS/p11-kit) takes the URI itself and finds exactly that key.
    # `make test` installs gnutls-bin; a skip here would hide this check in CI.
    assert shutil.which("p11tool") is not None, "p11tool missing (Debian package gnutls-bin)"
    out = subprocess.run(
        ["p11tool", "--provider", token.module, "--login", "--list-all", text],
        env={**env, "GNUTLS_PIN": token.pin}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Object ") == 1, out.stdout
    assert "Label: k.1\n" in out.stdout and "Private key" in out.stdout
    # ...signs with it, and exports the same public key the store reports
    # (--outfile: printing to the screen makes p11tool pause 3 s).
    pem = tmp_path / "k.1.pem"
    for args in (["--test-sign"], ["--export-pubkey", "--outfile", str(pem)]):
        out = subprocess.run(
            ["p11tool", "--provider", token.module, "--login", *args, text],
            env={**env, "GNUTLS_PIN": token.pin}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    assert serialization.load_pem_public_key(pem.read_bytes()) == public
