"""The contract every key store honours: memory, exportable, tpm (swtpm), pkcs11 (SoftHSM).

Each test runs once per backend through the ``store_env`` fixture.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from joserfc import jws
from joserfc.jwk import import_key

from custos.keys import (
    Algorithm,
    ExportRefusedError,
    InvalidKeyNameError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStore,
    UnsupportedAlgorithmError,
)
from custos.keys.jose import joserfc_key
from custos.keys.signatures import raw_to_der

if TYPE_CHECKING:  # the fixture's type, for readers and editors
    from conftest import StoreEnv

Namer = Callable[[str], str]


def verify_jose(pub: object, alg: Algorithm, data: bytes, sig: bytes) -> None:
    """Verify a JOSE-form signature with cryptography; raises InvalidSignature."""
    spec = alg.spec
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(raw_to_der(sig, spec.coordinate_size), data, ec.ECDSA(spec.hash_algorithm()))
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(sig, data)
    elif isinstance(pub, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            if spec.pss
            else padding.PKCS1v15()
        )
        pub.verify(sig, data, pad, spec.hash_algorithm())
    else:  # pragma: no cover - a new key type must be added here
        raise AssertionError(type(pub))


def algs_of(store: KeyStore) -> list[Algorithm]:
    return sorted(store.supported_algorithms, key=lambda a: a.value)


def test_es256_supported_everywhere(store: KeyStore) -> None:
    assert Algorithm.ES256 in store.supported_algorithms


def test_sign_verify_round_trip_every_algorithm(store: KeyStore, unique_name: Namer) -> None:
    data = b"custos contract payload"
    for alg in algs_of(store):
        name = unique_name(alg.value.lower())
        info = store.create(name, alg)
        assert info.alg is alg and info.name == name
        sig = store.sign(name, data)
        pub = store.public_key(name)
        verify_jose(pub, alg, data, sig)
        with pytest.raises(InvalidSignature):
            verify_jose(pub, alg, data + b"!", sig)


def test_public_jwk_matches_public_key(store: KeyStore, unique_name: Namer) -> None:
    name = unique_name("jwk")
    store.create(name, "ES256")
    jwk = store.public_jwk(name)
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256"
    assert "d" not in jwk
    assert len(jwk["kid"]) == 43  # RFC 7638 SHA-256 thumbprint, base64url
    imported = import_key({k: v for k, v in jwk.items()}, "EC")
    pem = store.public_key(name).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert imported.as_pem(private=False) == pem


def test_openssl_cli_verifies_signature(
    store: KeyStore, unique_name: Namer, tmp_path: Path
) -> None:
    name = unique_name("ossl")
    store.create(name, "ES256")
    data = b"verified by the openssl command line"
    der = raw_to_der(store.sign(name, data), 32)
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "sig.der").write_bytes(der)
    (tmp_path / "pub.pem").write_bytes(
        store.public_key(name).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    ok = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    (tmp_path / "data").write_bytes(data + b"x")
    bad = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


def test_keys_survive_restart_in_a_new_process(
    store_env: StoreEnv, store: KeyStore, unique_name: Namer, tmp_path: Path
) -> None:
    if not store.persistent:
        pytest.skip(f"the {store.kind} store holds keys in process memory by design")
    name = unique_name("persist")
    store.create(name, "ES256")
    pub = store.public_key(name)
    # A restart: this process lets go of the device before the next one starts. For
    # the TPM it is also required, not a courtesy: swtpm (like mssim and /dev/tpm0)
    # has no resource manager, and its three object slots are shared by every client.
    # An open store holds the primary and, once it has signed, a cached key (two
    # slots); the CLI needs its own primary and the key (two more), so it would fail
    # with "object slots are exhausted". Stores within one process share one context (see
    # test_tpm.py::test_two_stores_in_one_process_share_the_tpm); two processes need
    # /dev/tpmrm0 or tpm2-abrmd. See docs/decisions/0010-tpm-no-resource-manager.md.
    store.close()
    data = tmp_path / "msg"
    data.write_bytes(b"signed by another process")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "custos",
            "keys",
            "sign",
            "--store",
            store_env.kind,
            "--name",
            name,
            "--input",
            str(data),
        ],
        env=store_env.cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    sig = base64.urlsafe_b64decode(out.stdout.strip() + "==")
    verify_jose(pub, Algorithm.ES256, data.read_bytes(), sig)
    # and this process, reopening the store, still finds it
    again = store_env.open()
    assert name in [k.name for k in again.list()]


def test_delete_really_deletes(store_env: StoreEnv, store: KeyStore, unique_name: Namer) -> None:
    name = unique_name("del")
    store.create(name, "ES256")
    store.delete(name)
    assert name not in [k.name for k in store.list()]
    with pytest.raises(KeyNotFoundError):
        store.sign(name, b"x")
    with pytest.raises(KeyNotFoundError):
        store.delete(name)
    if store.persistent:
        store.close()
        with pytest.raises(KeyNotFoundError):
            store_env.open().public_key(name)


def test_list_shows_created_keys(store: KeyStore, unique_name: Namer) -> None:
    a, b = unique_name("la"), unique_name("lb")
    store.create(a, "ES256")
    store.create(b, "ES256")
    listed = {k.name: k for k in store.list()}
    assert listed[a].alg is Algorithm.ES256 and listed[a].store == store.kind
    assert b in listed


def test_unknown_key_is_a_clear_error(store: KeyStore) -> None:
    with pytest.raises(KeyNotFoundError, match="no-such-key"):
        store.sign("no-such-key", b"x")
    with pytest.raises(KeyNotFoundError):
        store.public_jwk("no-such-key")


def test_duplicate_name_refused(store: KeyStore, unique_name: Namer) -> None:
    name = unique_name("dup")
    store.create(name, "ES256")
    with pytest.raises(KeyExistsError):
        store.create(name, "ES256")


def test_unsupported_algorithm_is_a_clear_error(store: KeyStore, unique_name: Namer) -> None:
    with pytest.raises(UnsupportedAlgorithmError, match="HS256"):
        store.create(unique_name("hs"), "HS256")
    with pytest.raises(UnsupportedAlgorithmError, match="none"):
        store.create(unique_name("none"), "none")
    missing = [a for a in Algorithm if a not in store.supported_algorithms]
    for alg in missing:
        with pytest.raises(UnsupportedAlgorithmError, match=alg.value):
            store.create(unique_name("x"), alg)


@pytest.mark.parametrize(
    "bad", ["", "../etc/passwd", "a/b", "-lead", "x" * 129, "a\x00b", "dot.", "web\n"]
)
def test_hostile_key_names_refused(store: KeyStore, bad: str) -> None:
    with pytest.raises(InvalidKeyNameError):
        store.create(bad, "ES256")


def test_sign_digest_checks_length(store: KeyStore, unique_name: Namer) -> None:
    name = unique_name("dg")
    store.create(name, "ES256")
    with pytest.raises(UnsupportedAlgorithmError):
        store.sign_digest(name, b"short")


def test_private_key_object_refuses_export(store: KeyStore, unique_name: Namer) -> None:
    if store.kind == "exportable":
        pytest.skip("the exportable tier exports by design (export_private_key)")
    name = unique_name("exp")
    store.create(name, "ES256")
    key = store.get(name).private_key()
    with pytest.raises(ExportRefusedError):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(ExportRefusedError):
        key.private_numbers()  # type: ignore[union-attr]
    assert not hasattr(store, "export_private_key")


def test_joserfc_signs_a_jws_through_the_store(store: KeyStore, unique_name: Namer) -> None:
    for alg in algs_of(store):
        name = unique_name("jws" + alg.value.lower())
        store.create(name, alg)
        key = joserfc_key(store.get(name))
        token = jws.serialize_compact(
            {"alg": alg.value}, b'{"hello":"device"}', key, algorithms=[alg.value]
        )
        public = import_key(store.public_jwk(name))
        obj = jws.deserialize_compact(token, public, algorithms=[alg.value])
        assert obj.payload == b'{"hello":"device"}'


def test_csr_builder_signs_through_the_store(store: KeyStore, unique_name: Namer) -> None:
    name = unique_name("csr")
    store.create(name, "ES256")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custos")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/w")]),
            critical=False,
        )
        .sign(store.get(name).private_key(), hashes.SHA256())  # type: ignore[arg-type]
    )
    assert csr.is_signature_valid
    assert csr.public_key() == store.public_key(name)


@pytest.mark.slow
def test_concurrent_signing_8_threads_x_500(store: KeyStore, unique_name: Namer) -> None:
    name = unique_name("conc")
    store.create(name, "ES256")
    pub = store.public_key(name)
    results: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        try:
            local = []
            for i in range(500):
                msg = f"thread {t} message {i}".encode()
                local.append((msg, store.sign(name, msg)))
            with lock:
                results.extend(local)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(results) == 4000
    for msg, sig in results:
        verify_jose(pub, Algorithm.ES256, msg, sig)


def test_cli_create_and_public_print_the_jwk(store_env: StoreEnv, unique_name: Namer) -> None:
    name = unique_name("cli")
    base = [sys.executable, "-m", "custos", "keys"]
    env = store_env.cli_env()
    if store_env.kind == "memory":
        # A memory key would die with the CLI process: the CLI refuses the store, saying so.
        refused = subprocess.run(
            [*base, "create", "--store", "memory", "--name", name],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2 and "process" in refused.stderr, refused.stderr
        return
    created = subprocess.run(
        [*base, "create", "--store", store_env.kind, "--name", name, "--alg", "ES256"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    jwk = json.loads(created.stdout)
    public = subprocess.run(
        [*base, "public", "--store", store_env.kind, "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(public.stdout) == jwk
    listed = subprocess.run(
        [*base, "list", "--store", store_env.kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert name in listed.stdout
    deleted = subprocess.run(
        [*base, "delete", "--store", store_env.kind, "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deleted.returncode == 0, deleted.stderr
    gone = subprocess.run(
        [*base, "public", "--store", store_env.kind, "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gone.returncode != 0 and "key_not_found" in gone.stderr


def test_config_rejects_bad_values_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from custos.keys import KeyStoreConfig, StoreConfigError

    with pytest.raises(StoreConfigError, match="store"):
        KeyStoreConfig.from_env("floppy")
    monkeypatch.setenv("CUSTOS_TPM_LOADED_KEYS", "-1")
    with pytest.raises(StoreConfigError, match="tpm_loaded_keys"):
        KeyStoreConfig.from_env("tpm")
    monkeypatch.setenv("CUSTOS_TPM_LOADED_KEYS", "0")
    assert KeyStoreConfig.from_env("tpm").tpm_loaded_keys == 0
    # explicit values win over the environment
    monkeypatch.setenv("CUSTOS_TCTI", "swtpm:host=127.0.0.1,port=1")
    assert KeyStoreConfig.from_env("tpm", tcti="tabrmd").tcti == "tabrmd"


def test_pkcs11_store_without_module_or_uri_is_a_config_error() -> None:
    from custos.keys import KeyStoreConfig, StoreConfigError, open_key_store

    with pytest.raises(StoreConfigError, match="module"):
        open_key_store(KeyStoreConfig(store="pkcs11"))
