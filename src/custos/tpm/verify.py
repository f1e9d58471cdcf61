"""Checking what a TPM said, without a TPM: public areas, quotes, certify statements.

Server side of TPM node attestation.  Every input is attacker-supplied bytes, so
every function here is bounded (sizes checked before parsing), parses whole
buffers (no trailing bytes) with tpm2-tss' own unmarshallers (``TPM2B_PUBLIC``,
``TPMS_ATTEST``, ``TPMT_SIGNATURE``), verifies the AK's signature *before*
interpreting what it signed, and reports every failure as
:class:`AttestationEvidenceError` with a stable ``code``:

``bad_public``             a TPM2B_PUBLIC that does not parse, is oversized, has
                           trailing bytes, or holds no RSA / ECC key
``ak_not_restricted``      an AK without restricted | sign | fixedTPM | fixedParent |
                           sensitiveDataOrigin, or with decrypt
``ak_bad_algorithm``       an AK that is not ECC P-256 ECDSA-SHA256 with a SHA-256 name
``bad_signature``          a signature that does not parse, is of another scheme, or
                           does not verify with the AK
``bad_attest``             a TPMS_ATTEST that does not parse, is oversized or has
                           trailing bytes
``bad_magic``              not TPM_GENERATED_VALUE (the TPM did not make it)
``wrong_attest_type``      a certify statement where a quote was expected, or back
``nonce_mismatch``         extraData is not the nonce the server sent
``pcr_selection_mismatch`` the quote covers other PCRs than the server asked for
``pcr_values_mismatch``    the reported PCR values are not exactly the quoted ones
``pcr_digest_mismatch``    the quoted digest is not the digest of the reported values
``certify_name_mismatch``  the certified name is not the name of the key's public area
``key_not_resident``       the certified key is not fixedTPM | fixedParent |
                           sensitiveDataOrigin
``certify_key_mismatch``   the certified key is not the key the caller expected
``tpm_clock_regressed``    clock, resetCount or restartCount went back
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPML_PCR_SELECTION, TPMS_ATTEST, TPMT_SIGNATURE

from custos.errors import CustosError

#: A TPM2B_PUBLIC is at most a few hundred bytes (RSA-4096: ~600).
MAX_PUBLIC_BYTES = 1024
#: A TPMS_ATTEST of a quote or certify is a few hundred bytes.
MAX_ATTEST_BYTES = 1024
#: A TPMT_SIGNATURE (ECDSA P-256: 72 bytes; RSA-4096: 518).
MAX_SIGNATURE_BYTES = 1024

#: PCR banks and their digest sizes (names as tpm2-tools writes them).
BANKS: dict[str, tuple[int, int]] = {
    "sha1": (int(TPM2_ALG.SHA1), 20),
    "sha256": (int(TPM2_ALG.SHA256), 32),
    "sha384": (int(TPM2_ALG.SHA384), 48),
    "sha512": (int(TPM2_ALG.SHA512), 64),
}
_BANK_BY_ALG = {alg: name for name, (alg, _) in BANKS.items()}
_NAME_ALGS = (TPM2_ALG.SHA256, TPM2_ALG.SHA384, TPM2_ALG.SHA512)

#: What an AK's public area must say (:func:`ak_public_checked`).
AK_REQUIRED = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
#: What a certified key must have to be resident: it never leaves this TPM, and the
#: TPM generated its secret.
RESIDENT = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN


class AttestationEvidenceError(CustosError):
    """Evidence from a TPM (or claiming to be) is malformed, unsigned or says the wrong thing."""

    code = "attestation_evidence_invalid"


def _fail(code: str, message: str) -> AttestationEvidenceError:
    return AttestationEvidenceError(message, code=code)


def _whole(cls: Any, data: bytes, limit: int, code: str, what: str) -> Any:
    """``cls.unmarshal(data)``, refusing oversized input, failures and trailing bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise _fail(code, f"{what}: expected bytes")
    data = bytes(data)
    if not data or len(data) > limit:
        raise _fail(code, f"{what}: {len(data)} bytes (1 to {limit} expected)")
    try:
        value, used = cls.unmarshal(data)
    except TSS2_Exception as e:
        raise _fail(code, f"{what} does not parse: {e}") from e
    except Exception as e:  # a tpm2-pytss surprise on hostile bytes: still refused
        raise _fail(code, f"{what} does not parse: {e!r}") from e
    if used != len(data):
        raise _fail(code, f"{what}: {len(data) - used} trailing bytes")
    return value


def parse_public(data: bytes, *, what: str) -> TPM2B_PUBLIC:
    """A marshalled TPM2B_PUBLIC holding an RSA or ECC key, parsed whole (code ``bad_public``)."""
    public = _whole(TPM2B_PUBLIC, data, MAX_PUBLIC_BYTES, "bad_public", what)
    if int.from_bytes(bytes(data[:2]), "big") != len(data) - 2:
        raise _fail("bad_public", f"{what}: its size field is not its length")
    area = public.publicArea
    if area.type not in (TPM2_ALG.RSA, TPM2_ALG.ECC):
        raise _fail("bad_public", f"{what}: neither an RSA nor an ECC key")
    if area.nameAlg not in _NAME_ALGS:
        raise _fail("bad_public", f"{what}: name algorithm {area.nameAlg} is not SHA-2")
    public_key(public, what=what)  # the key itself must be usable
    return public


def public_key(public: TPM2B_PUBLIC, *, what: str = "public area") -> PublicKeyTypes:
    """The ``cryptography`` public key of a TPM2B_PUBLIC (code ``bad_public``)."""
    try:
        return serialization.load_der_public_key(public.to_der())
    except Exception as e:  # ValueError, unsupported curve, invalid point...
        raise _fail("bad_public", f"{what}: not a usable public key ({e})") from e


def name(public: TPM2B_PUBLIC) -> bytes:
    """The TPM name of a public area: nameAlg || H(TPMT_PUBLIC)."""
    return bytes(public.get_name())


def spki_sha256(key: PublicKeyTypes) -> str:
    """The EK hash: lower-case hex SHA-256 of the DER SubjectPublicKeyInfo."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _check_ak(public: TPM2B_PUBLIC) -> None:
    area = public.publicArea
    attrs = int(area.objectAttributes)
    missing = TPMA_OBJECT(AK_REQUIRED & ~attrs)
    if missing or attrs & TPMA_OBJECT.DECRYPT:
        why = f"lacks {missing!s}" if missing else "can decrypt"
        raise _fail(
            "ak_not_restricted",
            f"the attestation key {why}: an AK must be a restricted signing key that "
            "never leaves its TPM (restricted, sign, fixedTPM, fixedParent, "
            "sensitiveDataOrigin; no decrypt)",
        )
    ecc = area.parameters.eccDetail
    if (
        area.type != TPM2_ALG.ECC
        or area.nameAlg != TPM2_ALG.SHA256
        or ecc.curveID != TPM2_ECC.NIST_P256
        or ecc.scheme.scheme != TPM2_ALG.ECDSA
        or ecc.scheme.details.ecdsa.hashAlg != TPM2_ALG.SHA256
    ):
        raise _fail(
            "ak_bad_algorithm",
            "the attestation key is not an ECC P-256 ECDSA-SHA256 key with a SHA-256 name",
        )


def ak_public_checked(data: bytes) -> TPM2B_PUBLIC:
    """An AK's marshalled TPM2B_PUBLIC: parsed and checked (see the module's codes)."""
    public = parse_public(data, what="attestation key public area")
    _check_ak(public)
    return public


def _signed(ak_public: TPM2B_PUBLIC, attest: bytes, signature: bytes) -> TPMS_ATTEST:
    """Check the AK and its signature over ``attest``, then parse ``attest``."""
    _check_ak(ak_public)
    sig = _whole(TPMT_SIGNATURE, signature, MAX_SIGNATURE_BYTES, "bad_signature", "signature")
    if sig.sigAlg != TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != TPM2_ALG.SHA256:
        raise _fail("bad_signature", "the signature is not ECDSA-SHA256 (the AK's scheme)")
    if not isinstance(attest, (bytes, bytearray)) or not attest:
        raise _fail("bad_attest", "the attestation is empty")
    try:
        sig.verify_signature(ak_public, bytes(attest))
    except InvalidSignature as e:
        raise _fail("bad_signature", "the attestation key did not sign this attestation") from e
    except Exception as e:  # r/s out of range and the like
        raise _fail("bad_signature", f"the signature cannot be checked: {e!r}") from e
    parsed = _whole(TPMS_ATTEST, attest, MAX_ATTEST_BYTES, "bad_attest", "attestation")
    if parsed.magic != TPM2_GENERATED.VALUE:
        raise _fail("bad_magic", "the attestation does not start with TPM_GENERATED_VALUE")
    return parsed


def selection_string(selection: TPML_PCR_SELECTION) -> str:
    """A PCR selection as tpm2-tools writes it: ``sha256:0,1,7`` (banks joined by ``+``)."""
    parts = []
    for i in range(int(selection.count)):
        sel = selection.pcrSelections[i]
        bank = _BANK_BY_ALG.get(int(sel.hash))
        if bank is None:
            raise _fail("pcr_selection_mismatch", f"unknown PCR bank {int(sel.hash):#x}")
        bits = bytes(sel.pcrSelect)[: int(sel.sizeofSelect)]
        indices = [8 * n + b for n, byte in enumerate(bits) for b in range(8) if byte >> b & 1]
        parts.append(f"{bank}:{','.join(map(str, indices))}")
    return "+".join(parts)


def selected_pcrs(selection: str) -> list[tuple[str, int]]:
    """(bank, index) in the order the TPM hashes them (banks as listed, indices rising)."""
    out: list[tuple[str, int]] = []
    for part in selection.split("+"):
        bank, _, indices = part.partition(":")
        out.extend((bank, int(i)) for i in indices.split(",") if i)
    return out


#: PCRs 0-23 (the PC Client platform's 24), written in ASCII decimal without leading zeros.
PCR_COUNT = 24
_PCR_INDEX = re.compile(r"0|[1-9][0-9]?")
#: Longest selection text accepted (four banks of 24 PCRs is under 300 characters).
MAX_SELECTION_CHARS = 512


def canonical_selection(selection: str) -> str:
    """``selection`` ("sha256:7,0,1") as the TPM would report it ("sha256:0,1,7").

    Strict, as tpm2-tools' own parser is not: banks of :data:`BANKS` each named once,
    PCR indices 0 to 23 in ASCII decimal, nothing empty (``ValueError`` otherwise; an
    empty selection, ``sha256:all`` or ``sha256:24`` would quote something else than
    what the caller read)."""
    if not isinstance(selection, str) or not 0 < len(selection) <= MAX_SELECTION_CHARS:
        raise ValueError(
            f"a PCR selection is 1 to {MAX_SELECTION_CHARS} characters such as 'sha256:0,1,7'"
        )
    parts: list[str] = []
    seen: set[str] = set()
    for part in selection.split("+"):
        bank, sep, indices = part.partition(":")
        if not sep or bank not in BANKS:
            raise ValueError(
                f"a PCR selection is '<bank>:<index>,...' per bank, banks {', '.join(BANKS)} "
                "joined by '+' (e.g. 'sha256:0,1,7')"
            )
        if bank in seen:
            raise ValueError(f"a PCR selection names the bank {bank} twice")
        seen.add(bank)
        chosen: set[int] = set()
        for index in indices.split(","):
            if not _PCR_INDEX.fullmatch(index) or int(index) >= PCR_COUNT:
                raise ValueError(f"a PCR index is 0 to {PCR_COUNT - 1} (in {bank})")
            chosen.add(int(index))
        parts.append(f"{bank}:{','.join(map(str, sorted(chosen)))}")
    return "+".join(parts)


@dataclass(frozen=True)
class QuoteFacts:
    """What a verified quote says."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    #: The quoted selection, e.g. "sha256:0,1,7".
    pcr_selection: str
    #: (bank, index) -> value, in the order the TPM hashed them.
    pcr_values: dict[tuple[str, int], bytes]


def verify_quote(
    ak_public: TPM2B_PUBLIC,
    attest: bytes,
    signature: bytes,
    nonce: bytes,
    pcr_values: dict[tuple[str, int], bytes],
    expected_selection: str,
) -> QuoteFacts:
    """Check a TPM2_Quote: AK signature, magic, type, nonce, selection, PCR digest."""
    parsed = _signed(ak_public, attest, signature)
    if parsed.type != TPM2_ST.ATTEST_QUOTE:
        raise _fail("wrong_attest_type", "the attestation is not a quote")
    if not hmac.compare_digest(bytes(parsed.extraData), bytes(nonce)):
        raise _fail("nonce_mismatch", "the quote is not for this challenge's nonce")
    quoted = parsed.attested.quote
    got = selection_string(quoted.pcrSelect)
    if got != canonical_selection(expected_selection):
        raise _fail(
            "pcr_selection_mismatch", f"the quote covers PCRs {got!r}, not {expected_selection!r}"
        )
    values = _quoted_values(quoted, got, pcr_values)
    clock = parsed.clockInfo
    return QuoteFacts(
        clock=int(clock.clock),
        reset_count=int(clock.resetCount),
        restart_count=int(clock.restartCount),
        safe=bool(clock.safe),
        firmware_version=int(parsed.firmwareVersion),
        pcr_selection=got,
        pcr_values=values,
    )


def _quoted_values(
    quoted: Any, got: str, pcr_values: dict[tuple[str, int], bytes]
) -> dict[tuple[str, int], bytes]:
    """``pcr_values`` in the order the TPM hashed them, checked to be exactly the PCRs
    of the quote's selection (``quoted``: its TPMS_QUOTE_INFO; ``got``: its selection
    as a string) and to hash to its digest."""
    order = selected_pcrs(got)
    if len(set(order)) != len(order) or set(pcr_values) != set(order):
        raise _fail("pcr_values_mismatch", f"the reported PCR values are not those of {got!r}")
    digest = hashlib.sha256()  # the AK's scheme hash (ECDSA-SHA256)
    values: dict[tuple[str, int], bytes] = {}
    for bank, index in order:
        value = pcr_values[(bank, index)]
        if not isinstance(value, (bytes, bytearray)) or len(value) != BANKS[bank][1]:
            raise _fail("pcr_values_mismatch", f"PCR {bank}:{index} has a wrong-sized value")
        values[(bank, index)] = bytes(value)
        digest.update(value)
    if not hmac.compare_digest(digest.digest(), bytes(quoted.pcrDigest)):
        raise _fail("pcr_digest_mismatch", "the reported PCR values are not the quoted ones")
    return values


def quote_covers(attest: bytes, pcr_values: dict[tuple[str, int], bytes]) -> bool:
    """Whether a quote the caller's own TPM just made (``attest``: its TPMS_ATTEST; no
    signature check: this is not evidence from somebody else) is over exactly
    ``pcr_values``: the agent's check that no PCR moved between its read and the
    quote, the same digest check :func:`verify_quote` makes on the server."""
    parsed = _whole(TPMS_ATTEST, attest, MAX_ATTEST_BYTES, "bad_attest", "attestation")
    if parsed.type != TPM2_ST.ATTEST_QUOTE:
        raise _fail("wrong_attest_type", "the attestation is not a quote")
    try:
        quoted = parsed.attested.quote
        _quoted_values(quoted, selection_string(quoted.pcrSelect), pcr_values)
    except AttestationEvidenceError as e:
        if e.code == "pcr_digest_mismatch":
            return False
        raise
    return True


@dataclass(frozen=True)
class CertifyFacts:
    """What a verified TPM2_Certify says about the certified key."""

    name: bytes
    attributes: TPMA_OBJECT
    public: TPM2B_PUBLIC


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_certify(
    ak_public: TPM2B_PUBLIC,
    attest: bytes,
    signature: bytes,
    key_public: bytes,
    *,
    expected_key: PublicKeyTypes | None = None,
) -> CertifyFacts:
    """Check a TPM2_Certify of the key whose marshalled TPM2B_PUBLIC is ``key_public``.

    extraData is not checked: residency needs no freshness, since a fixedTPM key
    cannot leave its TPM (docs/decisions/0060).
    """
    parsed = _signed(ak_public, attest, signature)
    if parsed.type != TPM2_ST.ATTEST_CERTIFY:
        raise _fail("wrong_attest_type", "the attestation is not a certify statement")
    public = parse_public(key_public, what="certified key public area")
    key_name = name(public)
    if not hmac.compare_digest(bytes(parsed.attested.certify.name), key_name):
        raise _fail(
            "certify_name_mismatch", "the certify statement is about another key than this one"
        )
    attrs = TPMA_OBJECT(int(public.publicArea.objectAttributes))
    if attrs & RESIDENT != RESIDENT:
        raise _fail(
            "key_not_resident",
            "the certified key can leave its TPM or was imported (fixedTPM, fixedParent "
            "and sensitiveDataOrigin are required)",
        )
    if expected_key is not None and _spki(public_key(public)) != _spki(expected_key):
        raise _fail("certify_key_mismatch", "the certified key is not the expected key")
    return CertifyFacts(name=key_name, attributes=attrs, public=public)


def check_monotonic(previous: tuple[int, int, int] | None, current: QuoteFacts) -> None:
    """The TPM's (clock, reset_count, restart_count) never goes back between attestations.

    resetCount never decreases; with the same resetCount, restartCount never
    decreases; the clock never goes back unless resetCount or restartCount grew
    (code ``tpm_clock_regressed``).
    """
    if previous is None:
        return
    clock, reset, restart = previous
    cur = (current.clock, current.reset_count, current.restart_count)
    if current.reset_count < reset:
        why = "resetCount went back"
    elif current.reset_count == reset and current.restart_count < restart:
        why = "restartCount went back"
    elif (
        current.reset_count == reset and current.restart_count == restart and current.clock < clock
    ):
        why = "the clock went back"
    else:
        return
    raise _fail(
        "tpm_clock_regressed",
        f"{why} since the last attestation ({previous} -> {cur}): a replayed quote or a "
        "TPM whose state was rolled back",
    )


__all__ = [
    "AK_REQUIRED",
    "BANKS",
    "MAX_ATTEST_BYTES",
    "MAX_PUBLIC_BYTES",
    "MAX_SIGNATURE_BYTES",
    "RESIDENT",
    "AttestationEvidenceError",
    "CertifyFacts",
    "QuoteFacts",
    "ak_public_checked",
    "canonical_selection",
    "check_monotonic",
    "name",
    "parse_public",
    "public_key",
    "quote_covers",
    "selected_pcrs",
    "selection_string",
    "spki_sha256",
    "verify_certify",
    "verify_quote",
]
