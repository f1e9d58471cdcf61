"""The operator CLI with explicit flags (the contract suite drives it through the
CUSTOS_* variables): ``custos keys ... --tcti/--key-dir/--pkcs11-module/--pkcs11-uri``,
``sign --format der``, ``custos tpm info``, and a wrong PIN that never reaches stderr.

Each test runs the real ``custos`` command in a child process against a real swtpm
or SoftHSM token.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
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
    exportable = custos("keys", "uri", "--store", "exportable", "--name", name)
    assert exportable.returncode == 2 and "only PKCS#11" in exportable.stderr


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


# ---- conventions (issue 7, "what a new user tripped on") -----------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["keys"],
        ["keys", "list"],
        ["keys", "create"],
        ["keys", "info"],
        ["keys", "sign"],
        ["keys", "uri"],
        ["tpm", "info"],
        ["wimse"],
        ["wimse", "sign-wpt"],
        ["jwt"],
    ],
)
def test_dash_h_is_help_everywhere(argv: list[str]) -> None:
    result = custos(*argv, "-h")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "-h, --help" in result.stdout


def test_help_shows_the_default_key_directory_and_the_variables() -> None:
    text = ok(custos("keys", "list", "-h"))
    flat = " ".join(text.split())
    assert "/var/lib/custos/keys" in flat
    for var in ("CUSTOS_STORE", "CUSTOS_KEY_DIR", "CUSTOS_TCTI", "TPM2TOOLS_TCTI", "TSS2_TCTI"):
        assert var in flat, var


def test_store_from_the_environment_and_list_as_json(tmp_path: Path) -> None:
    key_dir = str(tmp_path / "keys")
    env = {"CUSTOS_STORE": "exportable", "CUSTOS_KEY_DIR": key_dir}
    ok(custos("keys", "create", "--name", "a", extra_env=env))
    ok(custos("keys", "create", "--name", "b", "--alg", "EdDSA", extra_env=env))
    listed = json.loads(ok(custos("keys", "list", "--output", "json", extra_env=env)))
    assert listed == [
        {"name": "a", "alg": "ES256", "store": "exportable"},
        {"name": "b", "alg": "EdDSA", "store": "exportable"},
    ]
    assert json.loads(ok(custos("keys", "list", "-o", "json", extra_env=env))) == listed
    info = json.loads(ok(custos("keys", "info", "--name", "b", "-o", "json", extra_env=env)))
    assert info == {"name": "b", "alg": "EdDSA", "store": "exportable"}
    assert "alg: ES256" in ok(custos("keys", "info", "--name", "a", extra_env=env))
    # the flag wins over the variable
    flagged = custos("keys", "list", "--store", "pkcs11", extra_env=env)
    assert flagged.returncode == 1 and "pkcs11" in flagged.stderr


def test_memory_store_is_refused_with_a_reason() -> None:
    for argv in (["keys", "create", "--name", "k"], ["keys", "list"]):
        result = custos(*argv, "--store", "memory")
        assert result.returncode == 2, result.stderr
        assert "memory" in result.stderr and "process" in result.stderr
        assert "Traceback" not in result.stderr
    via_env = custos("keys", "list", extra_env={"CUSTOS_STORE": "memory"})
    assert via_env.returncode == 2 and "process" in via_env.stderr


@pytest.mark.parametrize("store", ["exportable", "tpm"])
def test_read_only_commands_create_no_directory(store: str, tmp_path: Path, swtpm: Any) -> None:
    missing = tmp_path / "not" / "here"
    flags = ["--store", store, "--key-dir", str(missing), "--tcti", swtpm.tcti]
    assert ok(custos("keys", "list", *flags)) == ""
    assert json.loads(ok(custos("keys", "list", *flags, "-o", "json"))) == []
    msg = tmp_path / "msg"
    msg.write_bytes(b"m")
    for argv in (
        ["info", "--name", "k"],
        ["public", "--name", "k"],
        ["sign", "--name", "k", "--input", str(msg)],
    ):
        result = custos("keys", *argv, *flags)
        assert result.returncode == 1, (argv, result.stderr)
        assert "key_not_found" in result.stderr and str(missing) in result.stderr
        assert "Traceback" not in result.stderr
    uri = custos("keys", "uri", "--name", "k", *flags)
    assert uri.returncode == 2 and "only PKCS#11" in uri.stderr
    assert not (tmp_path / "not").exists()


def test_tcti_from_tpm2_tools_variables_and_the_allowlist(swtpm: Any, tmp_path: Path) -> None:
    key_dir = str(tmp_path / "keys")
    ok(custos("keys", "create", "--store", "tpm", "--tcti", swtpm.tcti, "--key-dir", key_dir,
              "--name", "t"))  # fmt: skip
    for var in ("TPM2TOOLS_TCTI", "TSS2_TCTI"):
        listed = ok(custos("keys", "list", "--store", "tpm", "--key-dir", key_dir,
                           extra_env={var: swtpm.tcti}))  # fmt: skip
        assert "t\tES256" in listed.splitlines(), var
    # CUSTOS_TCTI comes first: a dead port there wins over a working TPM2TOOLS_TCTI.
    first = custos("keys", "list", "--store", "tpm", "--key-dir", key_dir,
                   extra_env={"CUSTOS_TCTI": "swtpm:host=127.0.0.1,port=1",
                              "TPM2TOOLS_TCTI": swtpm.tcti})  # fmt: skip
    assert first.returncode == 1 and "unavailable" in first.stderr.lower()
    marker = tmp_path / "ran"
    for how in ({"args": ("--tcti", f"cmd:touch {marker}")},
                {"env": {"TPM2TOOLS_TCTI": f"cmd:touch {marker}"}}):  # fmt: skip
        result = custos("keys", "list", "--store", "tpm", "--key-dir", key_dir,
                        *how.get("args", ()), extra_env=how.get("env"))  # type: ignore[arg-type]  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "not allowed" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_sign_input_is_a_bounded_regular_file_or_stdin(tmp_path: Path) -> None:
    env = {"CUSTOS_STORE": "exportable", "CUSTOS_KEY_DIR": str(tmp_path / "keys")}
    ok(custos("keys", "create", "--name", "s", extra_env=env))
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(64 << 20)  # sparse; over the 16 MiB cap
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: opening it for reading would block
    for path in ("/dev/zero", str(huge), str(fifo), str(tmp_path)):
        result = custos("keys", "sign", "--name", "s", "--input", path, extra_env=env)
        assert result.returncode == 1, (path, result.stderr)
        assert "unreadable_file" in result.stderr and "Traceback" not in result.stderr, path
    # stdin ('-') still works, and is bounded too
    msg = tmp_path / "msg"
    msg.write_bytes(b"from stdin")
    with open(msg, "rb") as stdin:
        piped = subprocess.run(
            [sys.executable, "-m", "custos", "keys", "sign", "--name", "s", "--input", "-"],
            stdin=stdin, capture_output=True, text=True, timeout=120,
            env={**os.environ, **env},
        )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert len(b64url_decode(piped.stdout.strip())) == 64
    with open(huge, "rb") as stdin:
        too_big = subprocess.run(
            [sys.executable, "-m", "custos", "keys", "sign", "--name", "s", "--input", "-"],
            stdin=stdin, capture_output=True, text=True, timeout=120,
            env={**os.environ, **env},
        )  # fmt: skip
    assert too_big.returncode == 1 and "larger than" in too_big.stderr


_BLOCK_PKCS11 = """
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    # As on a machine without python-pkcs11 (the pkcs11 extra).
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "pkcs11":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
try:
    import pkcs11
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the blocker did not block")
from custos.cli.main import main
sys.argv = ["custos", *sys.argv[1:]]
main()
"""


def test_keys_uri_without_the_pkcs11_extra_is_clear(swtpm: Any, tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    flags = ["--store", "tpm", "--tcti", swtpm.tcti, "--key-dir", str(key_dir)]
    name = f"cli-{uuid.uuid4().hex[:8]}"
    ok(custos("keys", "create", *flags, "--name", name))
    try:
        for store_flags in (flags, ["--store", "pkcs11", "--pkcs11-module", "/nonexistent.so"]):
            result = subprocess.run(
                [sys.executable, "-c", _BLOCK_PKCS11, "keys", "uri", *store_flags, "--name", name],
                capture_output=True,
                text=True,
                timeout=120,
                env={k: v for k, v in os.environ.items() if not k.startswith("CUSTOS_")},
            )
            assert "Traceback" not in result.stderr, result.stderr
            assert result.returncode != 0
            if store_flags is flags:
                # A TPM key has no pkcs11: URI, with or without the extra.
                assert "only PKCS#11" in result.stderr, result.stderr
            else:
                assert "missing_extra" in result.stderr and "custos[pkcs11]" in result.stderr
    finally:
        ok(custos("keys", "delete", *flags, "--name", name))
