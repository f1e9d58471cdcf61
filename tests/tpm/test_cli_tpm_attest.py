"""``custos tpm ek | quote | certify`` on the session swtpm, checked by tpm2-tools and openssl."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from tpm2_pytss.constants import TPM2_ST
from tpm2_pytss.types import TPMS_ATTEST

from cli_runner import run_custos
from custos.keys.tpm import TpmKeyStore
from custos.testing.swtpm import SwtpmInstance
from custos.tpm.ak import load_ak
from custos.tpm.verify import ak_public_checked, name, parse_public, public_key, spki_sha256

_CLEAR = {"TPM2TOOLS_TCTI": "", "TSS2_TCTI": ""}
NONCE = "00112233445566778899aabbccddeeff"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is installed by make (tpm2-tools / openssl)"
    return path


def _checkquote(out: Path, nonce: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("tpm2_checkquote"), "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig",
         "-f", "quote.pcrs", "-q", nonce, "-g", "sha256"],
        cwd=out, capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_quote_with_another_nonce_is_rejected_by_tpm2_checkquote(
    swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    out = tmp_path / "q"
    result = run_custos("tpm", "quote", "--tcti", swtpm.tcti, "--nonce", NONCE,
                        "--key-dir", str(tmp_path / "keys"), "--out", str(out),
                        extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _checkquote(out, "ff" * 16).returncode != 0
    # ... and a changed PCR value too.
    pcrs = bytearray((out / "quote.pcrs").read_bytes())
    pcrs[132 + 4 + 4 + 2] ^= 1  # the first byte of the first value (after its UINT16 size)
    (out / "quote.pcrs").write_bytes(bytes(pcrs))
    assert _checkquote(out, NONCE).returncode != 0


def test_quote_is_accepted_by_tpm2_checkquote(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    out, keys = tmp_path / "q", tmp_path / "keys"
    result = run_custos("tpm", "quote", "--tcti", swtpm.tcti, "--nonce", NONCE,
                        "--pcrs", "sha256:0,1,2,3,7", "--key-dir", str(keys), "--out", str(out),
                        extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sha256:0,1,2,3,7" in result.stdout
    check = _checkquote(out, NONCE)
    assert check.returncode == 0, check.stderr + check.stdout
    # tpm2-tools' serialized form: TPML_PCR_SELECTION, count, one TPML_DIGEST (C layout).
    assert len((out / "quote.pcrs").read_bytes()) == 132 + 4 + 532
    # The AK was created under the key directory, private, and is reused.
    ak_file = keys / "attestation-key.pem"
    assert stat.S_IMODE(ak_file.stat().st_mode) == 0o600
    ak_public_checked(_ak_public(ak_file))
    first = (out / "ak.pem").read_bytes()
    again = run_custos("tpm", "quote", "--tcti", swtpm.tcti, "--nonce", "01",
                       "--ak", str(ak_file), "--out", str(tmp_path / "q2"),
                       extra_env=_CLEAR)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "q2" / "ak.pem").read_bytes() == first
    assert _checkquote(tmp_path / "q2", "01").returncode == 0


def _ak_public(path: Path) -> bytes:
    return bytes(load_ak(path.read_bytes()).tss.public.marshal())


def test_certify_signature_tampered_fails_openssl(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    keys, out = tmp_path / "keys", tmp_path / "c"
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=keys) as store:
        store.create("web", "ES256")
    result = run_custos("tpm", "certify", "--tcti", swtpm.tcti, "--key", "web",
                        "--key-dir", str(keys), "--out", str(out), extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 0, result.stderr
    attest = bytearray((out / "attest.bin").read_bytes())
    attest[-1] ^= 1
    (out / "attest.bin").write_bytes(bytes(attest))
    check = subprocess.run(
        [_tool("openssl"), "dgst", "-sha256", "-verify", "ak.pem", "-signature", "sig.der",
         "attest.bin"],
        cwd=out, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode != 0


def test_certify_is_checked_by_openssl(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    keys, out = tmp_path / "keys", tmp_path / "c"
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=keys) as store:
        store.create("web", "ES256")
        web_key = store.public_key("web")
    result = run_custos("tpm", "certify", "--tcti", swtpm.tcti, "--key", "web",
                        "--key-dir", str(keys), "--out", str(out), extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [_tool("openssl"), "dgst", "-sha256", "-verify", "ak.pem", "-signature", "sig.der",
         "attest.bin"],
        cwd=out, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0 and "Verified OK" in check.stdout, check.stderr
    # attest.bin is a certify statement naming the key of key.pub, a resident key.
    parsed, used = TPMS_ATTEST.unmarshal((out / "attest.bin").read_bytes())
    assert used == len((out / "attest.bin").read_bytes())
    assert parsed.type == TPM2_ST.ATTEST_CERTIFY
    key_public = parse_public((out / "key.pub").read_bytes(), what="key")
    assert bytes(parsed.attested.certify.name) == name(key_public)
    assert spki_sha256(public_key(key_public)) == spki_sha256(web_key)
    ak_public_checked(_ak_public(keys / "attestation-key.pem"))


def test_certify_of_a_missing_key(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    result = run_custos("tpm", "certify", "--tcti", swtpm.tcti, "--key", "nope",
                        "--key-dir", str(tmp_path), "--out", str(tmp_path / "c"),
                        extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 1
    assert "no key 'nope'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("nonce", ["xyz", "", "00" * 65])
def test_quote_refuses_bad_nonces(nonce: str, tmp_path: Path) -> None:
    result = run_custos("tpm", "quote", "--tcti", "swtpm:port=1", "--nonce", nonce,
                        "--out", str(tmp_path / "q"), extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 2 and "--nonce" in result.stderr


def test_ek_json_and_text(swtpm: SwtpmInstance) -> None:
    result = run_custos("tpm", "ek", "-o", "json", "--tcti", swtpm.tcti, extra_env=_CLEAR)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    rsa_cert = next(p for p in swtpm.state.ek_certs if "rsa" in p.name)
    cert = x509.load_der_x509_certificate(rsa_cert.read_bytes())
    assert doc["ek_hash"] == spki_sha256(cert.public_key())
    assert doc["ek_profile"] == "rsa2048"
    assert set(doc["ek_certificates"]) == {"rsa2048", "ecc-p384"}
    assert doc["ek_certificates"]["rsa2048"]["issuer"] == "CN=swtpm-localca"
    assert x509.load_pem_x509_certificate(doc["ek_certificates"]["rsa2048"]["pem"].encode()) == cert
    assert set(doc["ek_hashes"]) == {"rsa2048", "ecc-p256", "ecc-p384"}
    text = run_custos("tpm", "ek", "--tcti", swtpm.tcti, extra_env=_CLEAR)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"ek_hash: {doc['ek_hash']} (rsa2048 EK)\n")
    assert "ek_certificate[rsa2048]: subject CN=unknown; issuer CN=swtpm-localca" in text.stdout


def test_help_says_which_ak_signs() -> None:
    for verb in ("quote", "certify"):
        result = run_custos("tpm", verb, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert "attestation-key.pem" in text and "--ak" in text
        assert "not the one the agent" in text
