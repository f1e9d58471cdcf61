"""``custos tpm``: what the TPM says about itself (info, ek) and attestation by hand
(quote, certify) in the formats tpm2-tools and openssl check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from custos._extras import extra_needed
from custos.tpm.tcti import resolve_tcti

_CONTEXT = {"help_option_names": ["-h", "--help"]}
_TCTI_HELP = (
    "TPM TCTI: device, swtpm, mssim or tabrmd, e.g. device:/dev/tpmrm0 or swtpm:port=2321 "
    "[env CUSTOS_TCTI, then TPM2TOOLS_TCTI, then TSS2_TCTI; default device:/dev/tpmrm0]"
)


def _text(value: Any) -> str:
    """One value as an operator reads it: no Python reprs, lists joined, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) or "none"
    return str(value)


def info_lines(data: dict[str, Any]) -> list[str]:
    """``name: value`` lines of :func:`custos.tpm.info.tpm_info`'s result."""
    lines = []
    for key, value in data.items():
        if key == "spec":
            lines.append(
                f"spec: TPM {value['family']}, level {value['level']}, "
                f"revision {value['revision']:.2f}"
            )
        elif key == "ek_certificates":
            for profile, cert in value.items():
                if "error" in cert:
                    lines.append(f"ek_certificate[{profile}]: {cert['error']}")
                else:
                    lines.append(
                        f"ek_certificate[{profile}]: subject {cert['subject']}; issuer "
                        f"{cert['issuer']}; serial {cert['serial']}; not after {cert['not_after']}"
                    )
            if not value:
                lines.append("ek_certificates: none")
        else:
            lines.append(f"{key}: {_text(value)}")
    return lines


@click.group(context_settings=_CONTEXT)
def tpm() -> None:
    """Inspect the TPM (info, ek); quote PCRs and certify keys for other verifiers."""


@tpm.command(context_settings=_CONTEXT)
@click.option("--tcti", default=None, help=_TCTI_HELP)
@click.option(
    "--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="output format",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, hidden=True, help="same as --output json")
def info(tcti: str | None, output: str, as_json: bool) -> None:
    """Manufacturer, firmware, PCR banks and the EK certificates' subject and issuer."""
    with extra_needed("tpm"):
        from custos.tpm.info import tpm_info

    data = tpm_info(resolve_tcti(tcti, explicit_source="--tcti"))
    if as_json or output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for line in info_lines(data):
        click.echo(line)


# ---- attestation: ek, quote, certify -----------------------------------------------

#: The CLI's own attestation key file, under the key directory unless --ak says otherwise.
DEFAULT_AK_FILE = "attestation-key.pem"

_AK_HELP = (
    "the attestation key (AK) file that signs: a TSS2 PRIVATE KEY of a restricted ECC "
    "P-256 key under the owner storage primary. Created in the TPM and written here "
    f"(mode 0600) when absent [default KEY_DIR/{DEFAULT_AK_FILE}]. It is the CLI's own "
    "AK, not the one the agent's TPM attestor activated with the server"
)
_KEY_DIR_HELP = "TPM key directory [env CUSTOS_KEY_DIR; default /var/lib/custos/keys]"


def _output_option(func: Any) -> Any:
    return click.option(
        "--output", "-o", type=click.Choice(["text", "json"]), default="text",
        show_default=True, help="output format",
    )(func)  # fmt: skip


def _key_dir(key_dir: Path | None) -> Path:
    from custos.keys.config import DEFAULT_KEY_DIR

    if key_dir is not None:
        return key_dir
    env = os.environ.get("CUSTOS_KEY_DIR")
    return Path(env) if env else DEFAULT_KEY_DIR


def _cert_fields(cert: Any) -> dict[str, str]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding

    return {
        "subject": cert.subject.rfc4514_string() or "(empty)",
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "pem": cert.public_bytes(Encoding.PEM).decode(),
    }


def ek_report(tcti: str) -> dict[str, Any]:
    """EK certificates per profile and the EK hashes (``custos tpm ek``)."""
    from tpm2_pytss import TSS2_Exception

    from custos.keys.errors import DeviceUnavailableError
    from custos.tpm.context import open_esapi
    from custos.tpm.ek import EK_CERT_INDICES, ek_certificate, ek_public_key
    from custos.tpm.errors import TpmError, is_device_loss
    from custos.tpm.verify import spki_sha256

    ectx = open_esapi(tcti)
    try:
        certs: dict[str, Any] = {}
        hashes: dict[str, str] = {}
        for profile in EK_CERT_INDICES:
            try:
                cert = ek_certificate(ectx, profile)
            except TpmError as e:
                certs[profile] = {"error": str(e)}
                cert = None
            else:
                if cert is not None:
                    certs[profile] = _cert_fields(cert)
            # Low-range EKs exist from their template alone; a high-range one only
            # with its certificate (and NV template).
            if profile != "ecc-p384" or cert is not None:
                try:
                    hashes[profile] = spki_sha256(ek_public_key(ectx, profile))
                except TpmError as e:
                    hashes[profile] = f"error: {e}"
        return {
            "tcti": tcti,
            "ek_profile": "rsa2048",
            "ek_hash": hashes.get("rsa2048"),
            "ek_hashes": hashes,
            "ek_certificates": certs,
        }
    except TSS2_Exception as e:
        if is_device_loss(e):
            raise DeviceUnavailableError(f"lost the TPM at {tcti!r} ({e})") from e
        raise TpmError(f"the TPM at {tcti!r} refused: {e}") from e
    finally:
        ectx.close()


@tpm.command(context_settings=_CONTEXT)
@click.option("--tcti", default=None, help=_TCTI_HELP)
@_output_option
def ek(tcti: str | None, output: str) -> None:
    """The EK certificates (per EK profile) and the EK hash.

    The EK hash is the lower-case hex SHA-256 of the DER SubjectPublicKeyInfo of the
    RSA-2048 EK: the last segment of the agent ID
    spiffe://TD/custos/agent/tpm/<EK hash>, the tpm:ek_pubhash selector and what
    an EK allowlist holds. Needs the endorsement hierarchy's (default: empty) password.
    """
    with extra_needed("tpm"):
        import tpm2_pytss  # noqa: F401

    data = ek_report(resolve_tcti(tcti, explicit_source="--tcti"))
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    click.echo(f"ek_hash: {_text(data['ek_hash'])} (rsa2048 EK)")
    for profile, value in data["ek_hashes"].items():
        click.echo(f"ek_hash[{profile}]: {value}")
    for profile, cert in data["ek_certificates"].items():
        if "error" in cert:
            click.echo(f"ek_certificate[{profile}]: {cert['error']}")
        else:
            click.echo(
                f"ek_certificate[{profile}]: subject {cert['subject']}; issuer {cert['issuer']}; "
                f"serial {cert['serial']}; not after {cert['not_after']}; sha256 {cert['sha256']}"
            )
    if not data["ek_certificates"]:
        click.echo("ek_certificates: none")


def _load_or_create_ak(ctx: Any, path: Path) -> Any:
    """The AK in ``path``; created (and written, 0600, never over a file) when absent."""
    from custos._files import UnreadableFileError, read_small_file
    from custos.tpm.ak import create_ak, load_ak

    def read() -> bytes:  # a regular file only: a FIFO would block, a device never end
        try:
            return read_small_file(path, max_bytes=64 * 1024, what="AK file")
        except UnreadableFileError as e:
            if e.reason == "missing":
                raise FileNotFoundError(str(path)) from None
            raise click.ClickException(e.message) from None

    try:
        try:
            data = read()
        except FileNotFoundError:
            ak = create_ak(ctx)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # another run created it meanwhile: use that one
                return load_ak(read(), what=str(path))
            with os.fdopen(fd, "wb") as f:
                f.write(ak.to_pem())
            return ak
    except OSError as e:  # a path through a regular file, a directory, no permission
        raise click.ClickException(f"AK file {path}: {e.strerror or e}") from None
    return load_ak(data, what=str(path))


def _out_dir(out: Path) -> Path:
    """``--out``, created (with its parents) and writable, checked before the TPM is used."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(
            f"cannot create the directory {out}: {e.strerror or e}", param_hint="--out"
        ) from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{out} is not a writable directory", param_hint="--out")
    return out


def _write(out: Path, name: str, data: bytes) -> None:
    try:
        (out / name).write_bytes(data)
    except OSError as e:
        raise click.ClickException(f"cannot write {out / name}: {e.strerror or e}") from None


def _ak_pem(ak: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bytes(ak.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))


def _nonce(value: str, *, allow_empty: bool) -> bytes:
    if len(value) % 2 or not all(c in "0123456789abcdefABCDEF" for c in value):
        raise click.BadParameter("not hex (an even number of hex digits)", param_hint="--nonce")
    nonce = bytes.fromhex(value)
    if len(nonce) > 64 or (not nonce and not allow_empty):
        raise click.BadParameter("1 to 64 bytes of hex", param_hint="--nonce")
    return nonce


def tpm2_tools_pcrs(selection: str, values: list[bytes]) -> bytes:
    """PCR values in tpm2-tools' "serialized" PCR file format, what ``tpm2_quote -o``
    writes and ``tpm2_checkquote -f`` reads without ``-l``: the C structs
    TPML_PCR_SELECTION, a 32-bit count, then TPML_DIGESTs of up to 8 values (in
    selection order), in the host's layout (tpm2-tools fwrite()s them; little-endian
    hosts only, as tpm2-tools converts the integers with htole).  Laid out by
    tpm2-pytss' cffi types, so no offsets are written by hand.
    """
    import sys

    from tpm2_pytss._libtpm2_pytss import ffi
    from tpm2_pytss.types import TPML_DIGEST, TPML_PCR_SELECTION

    if sys.byteorder != "little":
        raise click.ClickException("quote.pcrs is written on little-endian hosts only")
    chunks = [TPML_DIGEST(values[i : i + 8]) for i in range(0, len(values), 8)]
    selection_struct = TPML_PCR_SELECTION.parse(selection)
    return b"".join(
        [
            bytes(ffi.buffer(selection_struct._cdata)),
            len(chunks).to_bytes(4, "little"),
            *(bytes(ffi.buffer(chunk._cdata)) for chunk in chunks),
        ]
    )


def _pcr_values(ctx: Any, selection: str) -> dict[tuple[str, int], bytes]:
    """The current values of the PCRs of ``selection`` (several TPM2_PCR_Reads if needed)."""
    from tpm2_pytss.types import TPML_PCR_SELECTION

    from custos.tpm.verify import selected_pcrs

    wanted = selected_pcrs(selection)
    values: dict[tuple[str, int], bytes] = {}

    def read(ectx: Any) -> None:
        for bank, index in wanted:
            _, _, digests = ectx.pcr_read(TPML_PCR_SELECTION.parse(f"{bank}:{index}"))
            if int(digests.count) != 1:
                raise click.ClickException(f"the TPM has no PCR {bank}:{index}")
            values[(bank, index)] = bytes(digests.digests[0])

    ctx.device(read)
    return values


@tpm.command(context_settings=_CONTEXT)
@click.option("--nonce", required=True, help="the verifier's nonce (qualifying data), hex")
@click.option(
    "--pcrs", default="sha256:0,1,2,3,7", show_default=True,
    help="PCRs to quote, as tpm2-tools writes them (sha256:0,1,7; banks joined by +)",
)  # fmt: skip
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
    help="directory for ak.pem, quote.msg, quote.sig, quote.pcrs (created)",
)  # fmt: skip
@click.option("--ak", "ak_file", type=click.Path(path_type=Path, dir_okay=False), help=_AK_HELP)
@click.option("--key-dir", type=click.Path(path_type=Path, file_okay=False), help=_KEY_DIR_HELP)
@click.option("--tcti", default=None, help=_TCTI_HELP)
def quote(
    nonce: str, pcrs: str, out_dir: Path, ak_file: Path | None, key_dir: Path | None,
    tcti: str | None,
) -> None:  # fmt: skip
    """TPM2_Quote of PCRs with the CLI's attestation key, in tpm2_checkquote's formats.

    Writes ak.pem (the AK's public key), quote.msg (the TPMS_ATTEST), quote.sig (the
    TPMT_SIGNATURE) and quote.pcrs (the selection and PCR values in tpm2-tools'
    "serialized" format, as tpm2_quote -o writes them);
    check them with

      tpm2_checkquote -u ak.pem -m quote.msg -s quote.sig -f quote.pcrs -q NONCE -g sha256

    The AK is --ak (see there): created on first use, so keep the file to quote with
    the same key again.
    """
    with extra_needed("tpm"):
        from custos.tpm.ak import quote as tpm_quote
        from custos.tpm.context import shared_context
        from custos.tpm.verify import (
            AttestationEvidenceError,
            canonical_selection,
            parse_public,
            verify_quote,
        )

    raw_nonce = _nonce(nonce, allow_empty=False)
    try:
        selection = canonical_selection(pcrs)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--pcrs") from None
    ak_path = ak_file or _key_dir(key_dir) / DEFAULT_AK_FILE
    _out_dir(out_dir)
    with shared_context(resolve_tcti(tcti, explicit_source="--tcti")) as ctx:
        ak = _load_or_create_ak(ctx, ak_path)
        ak_public = parse_public(bytes(ak.tss.public.marshal()), what=str(ak_path))
        for attempt in range(3):  # a PCR extended between read and quote: read again
            values = _pcr_values(ctx, selection)
            attest, sig = tpm_quote(ctx, ak, selection, raw_nonce)
            msg, sig_bytes = bytes(attest), bytes(sig.marshal())
            try:
                verify_quote(ak_public, msg, sig_bytes, raw_nonce, values, selection)
                break
            except AttestationEvidenceError as e:
                if e.code != "pcr_digest_mismatch" or attempt == 2:
                    raise
    _write(out_dir, "ak.pem", _ak_pem(ak))
    _write(out_dir, "quote.msg", msg)
    _write(out_dir, "quote.sig", sig_bytes)
    _write(out_dir, "quote.pcrs", tpm2_tools_pcrs(selection, list(values.values())))
    click.echo(f"quoted {selection} with the AK {ak_path}; wrote {out_dir}/")
    for (bank, index), value in values.items():
        click.echo(f"  {bank}:{index}: {value.hex()}")


@tpm.command(context_settings=_CONTEXT)
@click.option("--key", "key_name", required=True, help="name of a key of the TPM key store")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
    help="directory for attest.bin, sig.der, ak.pem, key.pub (created)",
)  # fmt: skip
@click.option("--nonce", default="", help="qualifying data to include, hex [default: none]")
@click.option("--ak", "ak_file", type=click.Path(path_type=Path, dir_okay=False), help=_AK_HELP)
@click.option("--key-dir", type=click.Path(path_type=Path, file_okay=False), help=_KEY_DIR_HELP)
@click.option("--tcti", default=None, help=_TCTI_HELP)
def certify(
    key_name: str, out_dir: Path, nonce: str, ak_file: Path | None, key_dir: Path | None,
    tcti: str | None,
) -> None:  # fmt: skip
    """TPM2_Certify: the CLI's attestation key signs that a key store key lives in this TPM.

    Writes attest.bin (the TPMS_ATTEST), sig.der (the AK's DER ECDSA signature over
    it), ak.pem (the AK's public key) and key.pub (the key's TPM2B_PUBLIC); check the
    signature with

      openssl dgst -sha256 -verify ak.pem -signature sig.der attest.bin

    and that attest.bin names the key (its TPM name) with fixedTPM, fixedParent and
    sensitiveDataOrigin, as custos' server does.
    """
    with extra_needed("tpm"):
        from custos.keys.base import check_key_name
        from custos.keys.tpm import SUFFIX
        from custos.tpm.ak import AK_ALGORITHM
        from custos.tpm.ak import certify as tpm_certify
        from custos.tpm.blobs import read_key_file, signing_key_blob
        from custos.tpm.context import shared_context
        from custos.tpm.signatures import der_signature
        from custos.tpm.verify import parse_public, verify_certify

    raw_nonce = _nonce(nonce, allow_empty=True)
    _out_dir(out_dir)
    directory = _key_dir(key_dir)
    path = directory / f"{check_key_name(key_name)}{SUFFIX}"
    try:
        _stamp, data = read_key_file(str(path), what=f"key {key_name!r}")
    except FileNotFoundError:
        raise click.ClickException(f"no key {key_name!r} in {directory}") from None
    key = signing_key_blob(data, what=f"key {key_name!r}")
    ak_path = ak_file or directory / DEFAULT_AK_FILE
    with shared_context(resolve_tcti(tcti, explicit_source="--tcti")) as ctx:
        ak = _load_or_create_ak(ctx, ak_path)
        attest, sig = tpm_certify(ctx, ak, key, raw_nonce)
    msg, key_public = bytes(attest), bytes(key.tss.public.marshal())
    ak_public = parse_public(bytes(ak.tss.public.marshal()), what=str(ak_path))
    facts = verify_certify(ak_public, msg, bytes(sig.marshal()), key_public,
                           expected_key=key.public_key)  # fmt: skip
    _write(out_dir, "attest.bin", msg)
    _write(out_dir, "sig.der", der_signature(AK_ALGORITHM, sig))
    _write(out_dir, "ak.pem", _ak_pem(ak))
    _write(out_dir, "key.pub", key_public)
    click.echo(
        f"certified key {key_name!r} (name {facts.name.hex()}) with the AK {ak_path}; "
        f"wrote {out_dir}/"
    )
