"""``TSS2 PRIVATE KEY`` files: read, parse, validate completely, serialize.

The format of tpm2-openssl, tpm2-tss-engine and ``tpm2_encodeobject``: a PEM
``TSS2 PRIVATE KEY`` holding the OID 2.23.133.10.1.3 (loadable key), emptyAuth,
the parent handle, and the key's TPM2B_PUBLIC and TPM2B_PRIVATE.  The private part
is wrapped by the parent's seed: useless outside this TPM, but anybody who can read
the blob and talk to this TPM can use it.

A key file is data from the disk, so everything in it is checked before any of it
reaches the TPM: the file is a small regular file, the armour and the DER are
exact (nothing before, after or in between), the public area parses and its key
is a supported one, the attributes are those of a workload signing key (or of an
attestation key, for :mod:`custos.tpm.ak`), and the private part has a plausible
size.  Whether the private part belongs to the public area only the TPM can say:
see :meth:`custos.tpm.context.TpmContext.verify`.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey

from custos._files import UnreadableFileError, read_small_file
from custos.keys.algorithms import Algorithm
from custos.tpm.errors import BadKeyBlobError
from custos.tpm.templates import (
    AK_ATTRIBUTES,
    FORBIDDEN_ATTRIBUTES,
    KEY_ATTRIBUTES,
    algorithm_of,
)

#: A key file is a few hundred bytes (RSA-2048: ~1.2 KiB); anything far larger is not one.
MAX_KEY_FILE_BYTES = 16 * 1024
#: A TPM2B_PRIVATE holds an integrity HMAC (2 + digest) and the encrypted sensitive
#: area; TPMs cap it at sizeof(_PRIVATE), about 1.5 KiB for RSA-2048 / SHA-512.
MIN_PRIVATE_BYTES = 2 + 32
MAX_PRIVATE_BYTES = 2048

_BEGIN = "-----BEGIN TSS2 PRIVATE KEY-----"
_END = "-----END TSS2 PRIVATE KEY-----"
_NAME_ALGS = (TPM2_ALG.SHA256, TPM2_ALG.SHA384)

#: (inode, mtime in ns, size): a file changed or replaced gets another stamp.
Stamp = tuple[int, int, int]


@dataclass(frozen=True)
class KeyBlob:
    """A validated key file: the blob and what was derived from its public area."""

    tss: Any  # TSSPrivKey
    alg: Algorithm
    public_key: PublicKeyTypes
    attributes: TPMA_OBJECT
    #: The TPM name the public area hashes to (nameAlg || H(TPMT_PUBLIC)).
    name: bytes

    def to_pem(self) -> bytes:
        return bytes(self.tss.to_pem())


def read_key_file(path: str, *, what: str) -> tuple[Stamp, bytes]:
    """The stamp and bytes of a key file, read as a small regular file.

    The stamp is taken *before* reading: if the file is replaced in between, the
    next stat shows another stamp and the file is read again, never the reverse.
    ``FileNotFoundError`` passes through (the caller says "no such key"); anything
    else unreadable (a FIFO, a device, a directory, too large, no permission) is a
    :class:`BadKeyBlobError`.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:  # a path through a regular file, no permission, a loop...
        raise BadKeyBlobError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    try:
        data = read_small_file(path, max_bytes=MAX_KEY_FILE_BYTES, what=what)
    except UnreadableFileError as e:
        if e.reason == "missing":
            raise FileNotFoundError(path) from e
        raise BadKeyBlobError(e.message) from e
    return (st.st_ino, st.st_mtime_ns, st.st_size), data


def _unarmor(data: bytes, what: str) -> bytes:
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise BadKeyBlobError(f"{what} is not a PEM file (not ASCII)") from None
    if not (text.startswith(_BEGIN) and text.endswith(_END)):
        raise BadKeyBlobError(
            f"{what} is not a TSS2 PRIVATE KEY (it must be exactly one "
            f"'{_BEGIN}' ... '{_END}' block)"
        )
    body = "".join(text[len(_BEGIN) : -len(_END)].split())
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise BadKeyBlobError(f"{what}: the PEM body is not valid base64") from None


def parse_key_blob(data: bytes, *, what: str = "key file") -> Any:
    """A ``TSSPrivKey`` from PEM bytes, or :class:`BadKeyBlobError` (never another error).

    Exact: the DER must be the canonical encoding of what it decodes to, so trailing
    bytes in it or in the TPM2B fields are refused too.
    """
    der = _unarmor(data, what)
    try:
        tss = TSSPrivKey.from_der(der)
        canonical = bytes(tss.to_der())
    except Exception as e:  # asn1 / unmarshal errors of every kind: all "not a key"
        raise BadKeyBlobError(f"{what} is not a valid TSS2 PRIVATE KEY ({type(e).__name__})") from e
    if canonical != der:
        raise BadKeyBlobError(f"{what} is not a valid TSS2 PRIVATE KEY (extra or non-DER bytes)")
    return tss


def _check(tss: Any, what: str, required: TPMA_OBJECT, forbidden: TPMA_OBJECT) -> KeyBlob:
    if tss.parent != TPM2_RH.OWNER or not tss.empty_auth:
        raise BadKeyBlobError(
            f"{what} has parent {int(tss.parent):#x} / auth; custos only uses keys under "
            "the owner-hierarchy primary (0x40000001) with empty auth"
        )
    size = len(bytes(tss.private))
    if not MIN_PRIVATE_BYTES <= size <= MAX_PRIVATE_BYTES:
        raise BadKeyBlobError(f"{what} has a private part of implausible size ({size} bytes)")
    public = tss.public.publicArea
    if public.nameAlg not in _NAME_ALGS:
        raise BadKeyBlobError(f"{what} has an unsupported name algorithm {public.nameAlg!s}")
    attributes = TPMA_OBJECT(public.objectAttributes)
    # Custody check: a planted or imported key that the TPM could duplicate (no
    # fixedTPM / fixedParent), or whose secret came from outside (no
    # sensitiveDataOrigin), is not a device-held key; a restricted key is an
    # attestation key, not a workload key.
    missing = required & ~attributes
    extra = attributes & forbidden
    if missing or extra:
        kind = "workload signing key" if forbidden & TPMA_OBJECT.RESTRICTED else "attestation key"
        why = [f"lacks {TPMA_OBJECT(missing)!s}"] if missing else []
        why += [f"has {TPMA_OBJECT(extra)!s}"] if extra else []
        if extra & TPMA_OBJECT.RESTRICTED:
            why.append("a restricted key is an attestation key, not a workload key")
        raise BadKeyBlobError(
            f"{what} is not a non-duplicable TPM-generated {kind}: it {'; '.join(why)} "
            f"(attributes {attributes!s})"
        )
    alg = algorithm_of(public)
    try:
        public_key = serialization.load_der_public_key(tss.public.to_der())
        name = bytes(tss.public.get_name())
    except Exception as e:  # a point off the curve, a bad modulus: not a key
        raise BadKeyBlobError(f"{what} holds an invalid public key ({type(e).__name__})") from e
    return KeyBlob(tss, alg, public_key, attributes, name)


def signing_key_blob(data: bytes, *, what: str = "key file") -> KeyBlob:
    """A workload signing key: parse and validate completely (see the module doc)."""
    tss = parse_key_blob(data, what=what)
    return _check(tss, what, KEY_ATTRIBUTES, FORBIDDEN_ATTRIBUTES)


def attestation_key_blob(data: bytes, *, what: str = "attestation key file") -> KeyBlob:
    """An attestation key (restricted signing, ECC P-256): parse and validate completely."""
    tss = parse_key_blob(data, what=what)
    blob = _check(tss, what, AK_ATTRIBUTES, TPMA_OBJECT.DECRYPT)
    if blob.alg is not Algorithm.ES256:
        raise BadKeyBlobError(f"{what} is not an ECC P-256 attestation key")
    return blob


def serialize_key_blob(private: Any, public: Any) -> bytes:
    """The ``TSS2 PRIVATE KEY`` PEM of a key made under the owner storage primary."""
    return bytes(TSSPrivKey(private, public, empty_auth=True, parent=TPM2_RH.OWNER).to_pem())


__all__ = [
    "MAX_KEY_FILE_BYTES",
    "KeyBlob",
    "Stamp",
    "attestation_key_blob",
    "parse_key_blob",
    "read_key_file",
    "serialize_key_blob",
    "signing_key_blob",
]
