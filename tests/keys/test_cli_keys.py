"""The operator CLI with explicit flags (the contract suite drives it through the
CUSTOS_* variables): ``custos keys ... --tcti/--key-dir/--pkcs11-module/--pkcs11-uri``,
``sign --format der``, ``custos tpm info``, and a wrong PIN that never reaches stderr.

Each test runs the real ``custos`` command in a child process against a real swtpm
or SoftHSM token.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import import_key

from cli_runner import run_custos as custos
from custos.keys.signatures import raw_to_der


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_of(jwk: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    key = import_key(jwk).public_key
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def exercise_store(flags: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
    """create / public / sign (jose + der) / list / delete through the given flags."""
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = json.loads(ok(custos("keys", "create", *flags, "--name", name, extra_env=env)))
    assert created["kty"] == "EC" and created["crv"] == "P-256"
    assert "d" not in created
    public = json.loads(ok(custos("keys", "public", *flags, "--name", name, extra_env=env)))
    assert public == created
    pub = public_key_of(public)

    data = tmp_path / "msg.bin"
    data.write_bytes(b"custos signs this through the device\n")
    args = ("keys", "sign", *flags, "--name", name, "--input", str(data))
    jose = ok(custos(*args, extra_env=env)).strip()
    raw = b64url_decode(jose)
    assert len(raw) == 64  # r || s, 32 bytes each
    pub.verify(raw_to_der(raw, 32), data.read_bytes(), ec.ECDSA(hashes.SHA256()))

    der = base64.b64decode(ok(custos(*args, "--format", "der", extra_env=env)).strip())
    assert der[0] == 0x30  # an ASN.1 SEQUENCE, not r||s
    pub.verify(der, data.read_bytes(), ec.ECDSA(hashes.SHA256()))
    # A changed message does not verify: the check can fail.
    with pytest.raises(InvalidSignature):
        pub.verify(der, data.read_bytes() + b"x", ec.ECDSA(hashes.SHA256()))

    listing = ok(custos("keys", "list", *flags, extra_env=env))
    assert f"{name}\tES256" in listing.splitlines()
    assert f"deleted {name}" in ok(custos("keys", "delete", *flags, "--name", name, extra_env=env))
    gone = custos("keys", "public", *flags, "--name", name, extra_env=env)
    assert gone.returncode == 1 and "key_not_found" in gone.stderr


def test_tpm_verbs_with_flags(swtpm_factory: Any, tmp_path: Path) -> None:
    tpm = swtpm_factory()  # a TPM of its own: no other test's objects in its slots
    flags = ["--store", "tpm", "--tcti", tpm.tcti, "--key-dir", str(tmp_path / "keys")]
    exercise_store(flags, tmp_path)


def test_pkcs11_verbs_with_flags(softhsm: Any, tmp_path: Path) -> None:
    flags = ["--store", "pkcs11", "--pkcs11-module", softhsm.module, "--pkcs11-uri", softhsm.uri]
    exercise_store(flags, tmp_path, env=dict(softhsm.env))


def test_pkcs11_key_uri_command(softhsm: Any) -> None:
    flags = ["--store", "pkcs11", "--pkcs11-module", softhsm.module, "--pkcs11-uri", softhsm.uri]
    env = dict(softhsm.env)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    ok(custos("keys", "create", *flags, "--name", name, extra_env=env))
    try:
        uri = ok(custos("keys", "uri", *flags, "--name", name, extra_env=env)).strip()
        assert uri.startswith("pkcs11:") and f"object={name}" in uri and "type=private" in uri
        assert "pin" not in uri.lower()
    finally:
        ok(custos("keys", "delete", *flags, "--name", name, extra_env=env))
    memory = custos("keys", "uri", "--store", "memory", "--name", name)
    assert memory.returncode == 2 and "only PKCS#11" in memory.stderr


def test_pkcs11_wrong_pin_is_clear_and_never_echoed(softhsm: Any) -> None:
    wrong = "Wr0ngPin-" + uuid.uuid4().hex[:8]
    uri = f"pkcs11:token={softhsm.token_label}?pin-value={wrong}"
    result = custos(
        "keys",
        "list",
        "--store",
        "pkcs11",
        "--pkcs11-module",
        softhsm.module,
        "--pkcs11-uri",
        uri,
        extra_env=dict(softhsm.env),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "pin" in result.stderr.lower()  # says what is wrong ...
    assert wrong not in result.stderr and wrong not in result.stdout  # ... never what was typed
    assert softhsm.pin not in result.stderr


def test_tpm_info_command(swtpm: Any) -> None:
    text = ok(custos("tpm", "info", "--tcti", swtpm.tcti))
    fields = dict(line.split(": ", 1) for line in text.splitlines())
    assert fields["manufacturer"] == "IBM"  # swtpm reports IBM's vendor id
    major, minor, *_ = fields["firmware_version"].split(".")
    assert int(major) >= 0 and int(minor) >= 0
    assert "sha256" in fields["pcr_banks"]
    assert fields["ek_certificate_subject"]
    assert fields["ek_certificate_issuer"] == "CN=swtpm-localca"

    doc = json.loads(ok(custos("tpm", "info", "--json", "--tcti", swtpm.tcti)))
    assert doc["firmware_version"] == fields["firmware_version"]
    assert set(doc["ek_certificates"]) >= {"rsa2048"}


def test_tpm_info_without_a_device_is_a_clear_error() -> None:
    # A port nothing listens on: the TPM is unavailable, and the command says so.
    result = custos("tpm", "info", "--tcti", "swtpm:host=127.0.0.1,port=1")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "unavailable" in result.stderr.lower()
