"""Key residency evidence: the node attestor's AK certifies ``tpm``-custody keys.

When the agent's node attestor plugin is a :class:`~custos.plugin.protocols.KeyCertifier`
(the ``tpm`` attestor: it holds an attestation key activated against the EK), every key
the agent asks the server to certify that lives in the ``tpm`` custody tier goes with a
TPM2_Certify statement by that AK (``KeyCustody.tpm_certify_info``,
``tpm_certify_signature``, ``tpm_public``): the agent's own key in the attestation start
message, each workload key in its X.509-SVID and WIT requests.  The server checks the
statement against the AK it activated and records the residency as ``proven``.

- A key outside the ``tpm`` tier, or an attestor that is not a certifier (a join
  token), gets no evidence: the server records a ``tpm`` key as ``unproven``.
- The plugin answers ``None`` when it cannot certify (no AK yet): no evidence either.
- A plugin that raises, or answers something else than three bounded byte strings, is a
  :class:`KeyCertifyError`: the request is not sent without evidence the agent was
  supposed to have (it is retried like any other device failure).

The calls are synchronous TPM commands: async code runs them in a worker thread.
Decision 0071 has the reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from custos.errors import CustosError
from custos.plugin.protocols import KeyCertifier

if TYPE_CHECKING:
    from custos.keys import KeyStore, StoreKey
    from custos.plugin.catalog import LoadedAgentNodeAttestor

log = logging.getLogger(__name__)

#: The custody tier whose keys get certify evidence.
TPM_TIER = "tpm"
#: The largest field a certifier may return (a TPMS_ATTEST, TPMT_SIGNATURE or
#: TPM2B_PUBLIC of an RSA-4096 key is well under this).
MAX_EVIDENCE_FIELD = 4096


class KeyCertifyError(CustosError):
    """The node attestor could not certify a ``tpm``-custody key."""

    code = "key_certify_failed"


@dataclass(frozen=True)
class CertifyEvidence:
    """A TPM2_Certify of one key by the AK: TPMS_ATTEST and TPMT_SIGNATURE (both
    marshalled) and the key's TPM2B_PUBLIC (marshalled)."""

    attest: bytes
    signature: bytes
    tpm_public: bytes


class KeyResidency:
    """Certify evidence for keys, from ``plugin`` (named ``name``) when it certifies.

    ``KeyResidency(None)`` (or a plugin that is no certifier) never has evidence."""

    def __init__(self, plugin: object | None, name: str = "") -> None:
        self._certifier: KeyCertifier | None = plugin if isinstance(plugin, KeyCertifier) else None
        self._name = name

    @classmethod
    def of(cls, attestor: LoadedAgentNodeAttestor) -> KeyResidency:
        """The residency evidence of the agent catalog's node attestor."""
        return cls(attestor.plugin, attestor.name)

    @property
    def certifies(self) -> bool:
        """True when the node attestor can prove ``tpm`` keys resident."""
        return self._certifier is not None

    def evidence(self, key: StoreKey, tier: str) -> CertifyEvidence | None:
        """The certify evidence for ``key`` (in custody ``tier``), or ``None`` when
        there is none to give (see the module docstring).  Blocking: TPM commands."""
        if self._certifier is None or tier != TPM_TIER:
            return None
        return self.evidence_for(key.store, key.name)

    def evidence_for(self, store: KeyStore, name: str) -> CertifyEvidence | None:
        """As :meth:`evidence`, for key ``name`` of the ``tpm`` tier's ``store``."""
        if self._certifier is None:
            return None
        key_path = getattr(store, "key_path", None)
        if store.kind != TPM_TIER or key_path is None:
            raise KeyCertifyError(
                f"the {TPM_TIER} custody tier's store is {store.kind!r}: no key file to certify"
            )
        path = str(key_path(name))
        try:
            answer = self._certifier.certify_key(name, path)
        except CustosError as e:
            raise KeyCertifyError(
                f"node attestor {self._name!r} could not certify key {name!r}: "
                f"[{e.code}] {e.message}"
            ) from e
        except Exception as e:
            raise KeyCertifyError(
                f"node attestor {self._name!r} failed to certify key {name!r}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if answer is None:
            log.info(
                "node attestor %s has no attestation key to certify %s with yet; "
                "its residency is unproven",
                self._name,
                name,
            )
            return None
        return _checked(answer, self._name, name)


def _checked(answer: object, plugin: str, name: str) -> CertifyEvidence:
    if not isinstance(answer, tuple) or len(answer) != 3:
        raise KeyCertifyError(
            f"node attestor {plugin!r} answered certify_key({name!r}) with "
            f"{type(answer).__name__}; expected (attest, signature, tpm_public) or None"
        )
    fields = []
    for what, value in zip(("attest", "signature", "tpm_public"), answer, strict=True):
        if not isinstance(value, bytes) or not value or len(value) > MAX_EVIDENCE_FIELD:
            raise KeyCertifyError(
                f"node attestor {plugin!r}: certify_key({name!r}) {what} must be 1 to "
                f"{MAX_EVIDENCE_FIELD} bytes"
            )
        fields.append(value)
    return CertifyEvidence(*fields)


__all__ = [
    "MAX_EVIDENCE_FIELD",
    "TPM_TIER",
    "CertifyEvidence",
    "KeyCertifyError",
    "KeyResidency",
]
