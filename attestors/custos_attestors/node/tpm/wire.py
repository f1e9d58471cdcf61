"""The three messages between the ``tpm`` plugin halves: payload, challenge, answer.

Each is a compact JSON object ``{"v": 1, ...}`` whose binary fields are unpadded
base64url (RFC 4648 section 5).  Decoding is the server's first contact with hostile
bytes (and the agent's, for the challenge), so every decoder

- bounds the message before parsing it, and every field after (a TPM2B_PUBLIC is at
  most :data:`MAX_PUBLIC_BYTES`, an EK certificate :data:`MAX_CERT_BYTES`, ...);
- takes exactly the keys of its message (an unknown key, a duplicate key or a
  missing one is refused: a peer speaking another version says so with ``v``);
- checks every type (``true`` is not ``1``) and the base64url alphabet strictly;
- never repeats any part of the input in its error (code ``tpm_evidence_invalid``).

The layout is the shared contract of issue 10 (docs/attestors.md, "tpm")::

    payload   {v, ek_profile, ek_public, ek_cert?, ek_intermediates, ak_public}
    challenge {v, nonce, pcrs, credential_blob?, secret?}
    answer    {v, activated_secret?, quote_attest, quote_signature, pcr_values, event_log?}

``event_log`` is the log zlib-compressed (RFC 1950), inflated by the server with a bound
(:data:`MAX_EVENT_LOG_BYTES`): a compression bomb is refused after that many bytes.

``credential_blob`` and ``secret`` (the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET of
TPM2_MakeCredential) travel together or not at all: absent when the server already
holds this AK as activated for this EK (a re-attestation, quote only).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from custos.errors import CustosError
from custos_attestors.node.tpm.policy import (
    DIGEST_SIZES,
    PcrSelection,
    PolicyConfigError,
    parse_pcr_key,
    parse_pcr_selection,
)

VERSION = 1

#: The EK profiles an agent may name (custos.tpm.ek.EK_CERT_INDICES).
EK_PROFILES = ("rsa2048", "ecc-p256", "ecc-p384")

#: A TPM2B_PUBLIC: an RSA-2048 EK with a policy digest is ~ 320 bytes, RSA-4096 ~ 580.
MAX_PUBLIC_BYTES = 1024
#: One DER certificate: EK certificates are 1-2 KiB.
MAX_CERT_BYTES = 4096
#: Intermediate CA certificates an agent may send with its EK certificate.
MAX_INTERMEDIATES = 4
#: The nonce is exactly this long (``secrets.token_bytes(32)``).
NONCE_BYTES = 32
#: TPM2B_ID_OBJECT (an HMAC and an encrypted seed-sized secret): ~ 70 bytes.
MAX_CREDENTIAL_BLOB_BYTES = 512
#: TPM2B_ENCRYPTED_SECRET: 258 bytes for an RSA-2048 EK, ~ 100 for ECC.
MAX_ENCRYPTED_SECRET_BYTES = 1024
#: The secret TPM2_ActivateCredential returns (a TPM2B_DIGEST: at most 64 bytes).
MAX_ACTIVATED_SECRET_BYTES = 64
#: TPMS_ATTEST of a quote is a few hundred bytes; TPMT_SIGNATURE likewise.
MAX_ATTEST_BYTES = 1024
MAX_SIGNATURE_BYTES = 1024
#: A binary event log (TCG2 crypto-agile), as the agent read it: real ones are 10-100 KiB.
MAX_EVENT_LOG_BYTES = 1024 * 1024
#: On the wire the log is zlib-compressed (GUIDs, zero digests and repeated variable
#: names compress well), and the whole answer must fit the catalog's 64 KiB bound
#: once base64url-encoded (4/3 larger): 46 KiB compressed does.
MAX_EVENT_LOG_WIRE_BYTES = 46 * 1024
#: The catalog's bound on one attestation message (custos.plugin.catalog).
MAX_MESSAGE_BYTES = 64 * 1024
#: PCR values in one answer: 24 PCRs in each of four banks.
MAX_PCR_VALUES = 96

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class TpmEvidenceError(CustosError):
    """A ``tpm`` attestation message is malformed, oversized, of an unknown version or
    shape; no message repeats any part of the input."""

    code = "tpm_evidence_invalid"


# ---- helpers -----------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(value: object, what: str, limit: int, *, minimum: int = 1) -> bytes:
    if not isinstance(value, str):
        raise TpmEvidenceError(f"{what} must be a base64url string")
    # 4/3 of the byte limit, before decoding anything.
    if len(value) > (limit * 4 + 2) // 3 or not _B64URL.fullmatch(value) or len(value) % 4 == 1:
        raise TpmEvidenceError(f"{what} is not unpadded base64url of at most {limit} bytes")
    try:
        data = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise TpmEvidenceError(f"{what} is not base64url") from None
    if b64url(data) != value:  # non-canonical trailing bits
        raise TpmEvidenceError(f"{what} is not canonical base64url")
    if not minimum <= len(data) <= limit:
        raise TpmEvidenceError(f"{what} must be {minimum} to {limit} bytes")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise TpmEvidenceError("a tpm attestation message repeats a key")
        out[key] = value
    return out


def _load(data: object, what: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise TpmEvidenceError(f"the tpm {what} must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise TpmEvidenceError(f"the tpm {what} is {len(data)} bytes; at most {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except TpmEvidenceError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TpmEvidenceError(f"the tpm {what} is not UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise TpmEvidenceError(f"the tpm {what} must be a JSON object")
    keys = set(message)
    if not required <= keys or not keys <= required | optional:
        raise TpmEvidenceError(
            f"the tpm {what} must have the keys {', '.join(sorted(required))}"
            + (f" (optional: {', '.join(sorted(optional))})" if optional else "")
        )
    version = message["v"]
    if type(version) is not int or version != VERSION:
        raise TpmEvidenceError(f"unsupported tpm {what} version; this is {VERSION}")
    return message


def _dump(message: Mapping[str, object]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise TpmEvidenceError(f"a tpm attestation message would be {len(data)} bytes")
    return data


# ---- payload -----------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """What the agent sends first: its EK (and certificates) and its AK."""

    ek_profile: str
    ek_public: bytes  # TPM2B_PUBLIC, marshalled
    ak_public: bytes  # TPM2B_PUBLIC, marshalled
    ek_cert: bytes | None = None  # DER
    ek_intermediates: tuple[bytes, ...] = ()  # DER each

    def encode(self) -> bytes:
        message: dict[str, object] = {
            "v": VERSION,
            "ek_profile": self.ek_profile,
            "ek_public": b64url(self.ek_public),
            "ek_intermediates": [b64url(c) for c in self.ek_intermediates],
            "ak_public": b64url(self.ak_public),
        }
        if self.ek_cert is not None:
            message["ek_cert"] = b64url(self.ek_cert)
        # Round-trip through the decoder: the agent never sends what the server refuses.
        data = _dump(message)
        decode_payload(data)
        return data


def decode_payload(data: object) -> Payload:
    m = _load(
        data,
        "payload",
        {"v", "ek_profile", "ek_public", "ek_intermediates", "ak_public"},
        {"ek_cert"},
    )
    profile = m["ek_profile"]
    if not isinstance(profile, str) or profile not in EK_PROFILES:
        raise TpmEvidenceError(f"ek_profile must be one of {', '.join(EK_PROFILES)}")
    chain = m["ek_intermediates"]
    if not isinstance(chain, list) or len(chain) > MAX_INTERMEDIATES:
        raise TpmEvidenceError(f"ek_intermediates must be a list of at most {MAX_INTERMEDIATES}")
    return Payload(
        ek_profile=profile,
        ek_public=_unb64(m["ek_public"], "ek_public", MAX_PUBLIC_BYTES),
        ak_public=_unb64(m["ak_public"], "ak_public", MAX_PUBLIC_BYTES),
        ek_cert=_unb64(m["ek_cert"], "ek_cert", MAX_CERT_BYTES) if "ek_cert" in m else None,
        ek_intermediates=tuple(
            _unb64(c, "an ek_intermediates entry", MAX_CERT_BYTES) for c in chain
        ),
    )


# ---- challenge ---------------------------------------------------------------


@dataclass(frozen=True)
class ChallengeMessage:
    """The server's challenge: a fresh nonce, the PCRs to quote, and (first
    attestation of this AK) the credential to activate."""

    nonce: bytes
    pcrs: PcrSelection
    credential_blob: bytes | None = None
    secret: bytes | None = None  # the encrypted secret (TPM2B_ENCRYPTED_SECRET)

    @property
    def activation(self) -> bool:
        return self.credential_blob is not None

    def encode(self) -> bytes:
        message: dict[str, object] = {
            "v": VERSION,
            "nonce": b64url(self.nonce),
            "pcrs": str(self.pcrs),
        }
        if self.credential_blob is not None or self.secret is not None:
            if self.credential_blob is None or self.secret is None:
                raise TpmEvidenceError("credential_blob and secret go together")
            message["credential_blob"] = b64url(self.credential_blob)
            message["secret"] = b64url(self.secret)
        data = _dump(message)
        decode_challenge(data)
        return data


def decode_challenge(data: object) -> ChallengeMessage:
    m = _load(data, "challenge", {"v", "nonce", "pcrs"}, {"credential_blob", "secret"})
    nonce = _unb64(m["nonce"], "nonce", NONCE_BYTES, minimum=NONCE_BYTES)
    if not isinstance(m["pcrs"], str):
        raise TpmEvidenceError("pcrs must be a string such as 'sha256:0,1,7'")
    try:
        pcrs = parse_pcr_selection(m["pcrs"])
    except PolicyConfigError:
        raise TpmEvidenceError("pcrs is not a PCR selection such as 'sha256:0,1,7'") from None
    if ("credential_blob" in m) != ("secret" in m):
        raise TpmEvidenceError("credential_blob and secret go together")
    if "credential_blob" in m:
        return ChallengeMessage(
            nonce,
            pcrs,
            _unb64(m["credential_blob"], "credential_blob", MAX_CREDENTIAL_BLOB_BYTES),
            _unb64(m["secret"], "secret", MAX_ENCRYPTED_SECRET_BYTES),
        )
    return ChallengeMessage(nonce, pcrs)


# ---- answer ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """The agent's answer: the activated secret (when asked), the quote, the PCR
    values it covers, and optionally the measured-boot event log."""

    quote_attest: bytes  # TPMS_ATTEST, marshalled (the TPM2B_ATTEST's contents)
    quote_signature: bytes  # TPMT_SIGNATURE, marshalled
    pcr_values: Mapping[tuple[str, int], bytes] = field(default_factory=dict)
    activated_secret: bytes | None = None
    event_log: bytes | None = None

    def encode(self) -> bytes:
        message: dict[str, object] = {
            "v": VERSION,
            "quote_attest": b64url(self.quote_attest),
            "quote_signature": b64url(self.quote_signature),
            "pcr_values": {
                f"{bank}:{index}": value.hex()
                for (bank, index), value in sorted(self.pcr_values.items())
            },
        }
        if self.activated_secret is not None:
            message["activated_secret"] = b64url(self.activated_secret)
        if self.event_log is not None:
            message["event_log"] = b64url(zlib.compress(self.event_log, 9))
        data = _dump(message)
        decode_answer(data)
        return data


_HEX = re.compile(r"[0-9a-f]*")


def _inflate(data: bytes) -> bytes:
    """The event log, inflated: one whole zlib stream of at most MAX_EVENT_LOG_BYTES."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_EVENT_LOG_BYTES + 1)
    except zlib.error:
        raise TpmEvidenceError("event_log is not a zlib stream") from None
    if len(out) > MAX_EVENT_LOG_BYTES or inflater.unconsumed_tail:
        raise TpmEvidenceError(f"event_log inflates to more than {MAX_EVENT_LOG_BYTES} bytes")
    if not inflater.eof or inflater.unused_data or not out:
        raise TpmEvidenceError("event_log is not one whole zlib stream of a non-empty log")
    return out


def decode_answer(data: object) -> Answer:
    m = _load(
        data,
        "answer",
        {"v", "quote_attest", "quote_signature", "pcr_values"},
        {"activated_secret", "event_log"},
    )
    raw_values = m["pcr_values"]
    if not isinstance(raw_values, dict) or len(raw_values) > MAX_PCR_VALUES:
        raise TpmEvidenceError(f"pcr_values must be an object of at most {MAX_PCR_VALUES} PCRs")
    values: dict[tuple[str, int], bytes] = {}
    for key, value in raw_values.items():
        try:
            bank, index = parse_pcr_key(key)
        except PolicyConfigError:
            raise TpmEvidenceError("a pcr_values key is not '<bank>:<index>'") from None
        size = DIGEST_SIZES[bank]
        if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
            raise TpmEvidenceError(
                f"the value of PCR {bank}:{index} must be {size} bytes in lower-case hex"
            )
        values[(bank, index)] = bytes.fromhex(value)
    return Answer(
        quote_attest=_unb64(m["quote_attest"], "quote_attest", MAX_ATTEST_BYTES),
        quote_signature=_unb64(m["quote_signature"], "quote_signature", MAX_SIGNATURE_BYTES),
        pcr_values=values,
        activated_secret=(
            _unb64(m["activated_secret"], "activated_secret", MAX_ACTIVATED_SECRET_BYTES)
            if "activated_secret" in m
            else None
        ),
        event_log=(
            _inflate(_unb64(m["event_log"], "event_log", MAX_EVENT_LOG_WIRE_BYTES))
            if "event_log" in m
            else None
        ),
    )


__all__ = [
    "EK_PROFILES",
    "MAX_EVENT_LOG_BYTES",
    "MAX_EVENT_LOG_WIRE_BYTES",
    "MAX_MESSAGE_BYTES",
    "NONCE_BYTES",
    "VERSION",
    "Answer",
    "ChallengeMessage",
    "Payload",
    "TpmEvidenceError",
    "b64url",
    "decode_answer",
    "decode_challenge",
    "decode_payload",
]
