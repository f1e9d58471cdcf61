"""Attestation keys (AK): restricted ECC P-256 signing keys for TPM2_Quote / TPM2_Certify.

A restricted signing key signs only digests the TPM made itself (a TPMS_ATTEST
that starts with TPM_GENERATED_VALUE), so a signature by it proves "this TPM said
so": PCR values (quote) or "this other key lives in me, with these attributes"
(certify).  That is what TPM node attestation builds on.  As in go-attestation,
the AK lives under the owner storage primary (:data:`~custos.tpm.templates.PARENT_TEMPLATE`),
and is tied to the EK by credential activation, not by its parent.

An AK is kept as a ``TSS2 PRIVATE KEY`` like a workload key, but the workload
:class:`~custos.keys.tpm.TpmKeyStore` refuses it (restricted), and this module
refuses anything but an AK.  Every use loads it, checks the name the TPM computes
against the blob's public area, runs the command and flushes it, under the
context's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from tpm2_pytss.types import TPML_PCR_SELECTION

from custos.keys.algorithms import Algorithm
from custos.tpm.blobs import KeyBlob, Stamp, attestation_key_blob, serialize_key_blob
from custos.tpm.context import LoadedKey, TpmContext
from custos.tpm.signatures import SCHEMES
from custos.tpm.templates import ak_template

T = TypeVar("T")

#: The one scheme an AK signs with (fixed in its public area): ECDSA P-256 SHA-256.
AK_ALGORITHM = Algorithm.ES256


def create_ak(ctx: TpmContext) -> KeyBlob:
    """Create a new AK in the TPM of ``ctx``; keep ``blob.to_pem()`` to use it again."""
    private, public = ctx.device(lambda ectx: ctx.create(ak_template()))
    return attestation_key_blob(serialize_key_blob(private, public), what="new attestation key")


def load_ak(pem: bytes, *, what: str = "attestation key file") -> KeyBlob:
    """An AK from its ``TSS2 PRIVATE KEY`` bytes, validated completely (no TPM call)."""
    return attestation_key_blob(pem, what=what)


def with_ak(ctx: TpmContext, ak: KeyBlob, op: Callable[[Any, Any], T]) -> T:
    """``op(ectx, ak_handle)`` with the AK loaded (name checked), flushed afterwards."""

    def run(ectx: Any) -> T:
        handle = ctx.load_checked("attestation key", ak)
        try:
            return op(ectx, handle)
        finally:
            ctx.flush(handle)

    return ctx.device(run)


def quote(
    ctx: TpmContext, ak: KeyBlob, pcrs: str | TPML_PCR_SELECTION, nonce: bytes
) -> tuple[Any, Any]:
    """TPM2_Quote: the AK signs the digest of the selected PCRs and ``nonce``.

    ``pcrs`` as tpm2-tools writes it ("sha256:0,1,7").  Returns the TPM2B_ATTEST
    and the TPMT_SIGNATURE (see :func:`custos.tpm.signatures.der_signature`).
    """
    selection = TPML_PCR_SELECTION.parse(pcrs) if isinstance(pcrs, str) else pcrs
    result: tuple[Any, Any] = with_ak(
        ctx, ak, lambda ectx, h: ectx.quote(h, selection, nonce, SCHEMES[AK_ALGORITHM])
    )
    return result


def certify(
    ctx: TpmContext,
    ak: KeyBlob,
    key: KeyBlob,
    nonce: bytes,
    *,
    loaded: tuple[LoadedKey, Stamp] | None = None,
) -> tuple[Any, Any]:
    """TPM2_Certify: the AK signs that ``key`` (a key file of ours, empty auth) is loaded
    in this TPM, with its name (and so its public area and attributes).

    ``loaded``: the key's entry in the context's loaded-key cache and the stamp of the
    file ``key`` was read from (a store key: the handle its store keeps loaded serves,
    :meth:`TpmContext.with_key`); without it the key is loaded, checked and flushed.
    The AK is loaded first, so a load that needs room flushes cached keys before the
    cache is looked at.  Returns the TPM2B_ATTEST and the TPMT_SIGNATURE.
    """
    scheme = SCHEMES[AK_ALGORITHM]

    def op(ectx: Any, ak_handle: Any) -> tuple[Any, Any]:
        def run(handle: Any) -> tuple[Any, Any]:
            result: tuple[Any, Any] = ectx.certify(handle, ak_handle, nonce, scheme)
            return result

        if loaded is not None:
            return ctx.with_key(loaded[0], loaded[1], key, run)
        handle = ctx.load_checked("key to certify", key)
        try:
            return run(handle)
        finally:
            ctx.flush(handle)

    return with_ak(ctx, ak, op)


__all__ = ["AK_ALGORITHM", "certify", "create_ak", "load_ak", "quote", "with_ak"]
