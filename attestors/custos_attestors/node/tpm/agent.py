"""Agent half of ``tpm``: sends the EK and the AK, activates the credential, quotes.

Settings (``[node_attestor.tpm]`` in agent.toml; all optional):

``tcti``
    The TPM (``device:/dev/tpmrm0``, ``swtpm:host=...,port=...``, ``tabrmd:...``);
    default: ``CUSTOS_TCTI`` / ``TPM2TOOLS_TCTI`` / ``TSS2_TCTI``, else
    ``device:/dev/tpmrm0`` (:func:`custos.tpm.tcti.resolve_tcti`).  The plugin shares
    the process's one context on that TCTI with the agent's TPM key store.
``ek_profile``
    The EK whose certificate and key are sent and which activates the credential:
    ``rsa2048`` (default; swtpm has one, and MakeCredential to an RSA EK is the
    measured path) or ``ecc-p256``.
``ak_file``
    Absolute path of the attestation key (``TSS2 PRIVATE KEY`` PEM): loaded when it
    exists, else created in the TPM and written there with mode 0600.  Without it the
    AK lives in memory: a restarted agent makes a new one, which the server activates
    again (one more ActivateCredential, ~10 ms on swtpm).
``ek_intermediates``
    Absolute paths of CA certificates (PEM, any number per file, or DER) between the EK
    certificate and the manufacturer root, sent with the payload: some vendors ship them
    with the machine rather than in the server's bundle.  Those the TPM keeps in the TCG EK
    chain NV indices (0x01c00100-0x01c001ff) are sent too (at most 4 in all).
``event_log_file``
    A TCG2 binary event log to send with every answer, e.g.
    ``/sys/kernel/security/tpm0/binary_bios_measurements``; not sent (logged at
    WARNING once) when unreadable or larger than 1 MiB; sent zlib-compressed, and left
    out (WARNING) when even so it would not fit the 64 KiB message.

Every TPM command runs in a worker thread (the shared context's lock serializes them),
so the agent's event loop never waits on the TPM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import threading
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from custos.errors import CustosError
from custos.plugin.protocols import CoreConfig
from custos_attestors.node.tpm import wire
from custos_attestors.node.tpm.policy import DIGEST_SIZES, PcrSelection

log = logging.getLogger(__name__)

#: TCG EK Credential Profile: the NV indices of the EK certificate chain (intermediate CAs,
#: each index one or more concatenated DER certificates).
EK_CHAIN_FIRST, EK_CHAIN_LAST = 0x01C00100, 0x01C001FF
#: EK profiles credential activation works with (custos.tpm.activation.ACTIVATION_PROFILES).
ACTIVATION_PROFILES = ("rsa2048", "ecc-p256", "ecc-p384")
AGENT_KEYS = frozenset({"tcti", "ek_profile", "ak_file", "ek_intermediates", "event_log_file"})
DEFAULT_EK_PROFILE = "rsa2048"
#: Quote and PCR read are retried this often when a PCR moves between them.
QUOTE_ATTEMPTS = 3
#: TPM2_PCR_Read returns at most 8 PCRs per call (TPML_DIGEST holds 8).
_PCR_READ_CHUNK = 8


class TpmAgentConfigError(CustosError, ValueError):
    code = "tpm_attestor_config"


class TpmAgentError(CustosError):
    """The agent half could not make its evidence (the TPM refused, the PCRs kept moving)."""

    code = "tpm_attestation_failed"


def _path(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value or not os.path.isabs(value):
        raise TpmAgentConfigError(f"tpm: {what} must be an absolute path")
    return value


def _intermediates(paths: object) -> tuple[bytes, ...]:
    """DER of every certificate in the ``ek_intermediates`` files (read at configure)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from custos._files import UnreadableFileError, read_small_file

    if not isinstance(paths, list):
        raise TpmAgentConfigError("tpm: ek_intermediates must be a list of file paths")
    out: list[bytes] = []
    for path in paths:
        try:
            data = read_small_file(_path(path, "ek_intermediates"), what="EK intermediate")
        except UnreadableFileError as e:
            raise TpmAgentConfigError(f"tpm: ek_intermediates: {e.message}") from None
        try:
            certs = (
                x509.load_pem_x509_certificates(data)
                if b"-----BEGIN" in data
                else [x509.load_der_x509_certificate(data)]
            )
        except ValueError:
            raise TpmAgentConfigError(
                "tpm: ek_intermediates: a file holds no PEM or DER certificate"
            ) from None
        out += [c.public_bytes(Encoding.DER) for c in certs]
    if len(out) > wire.MAX_INTERMEDIATES or any(len(c) > wire.MAX_CERT_BYTES for c in out):
        raise TpmAgentConfigError(
            f"tpm: ek_intermediates: at most {wire.MAX_INTERMEDIATES} certificates "
            f"of {wire.MAX_CERT_BYTES} bytes"
        )
    return tuple(out)


def _split_der(data: bytes) -> list[bytes]:
    """The DER certificates one after another in an NV index (padding after them ignored)."""
    from custos.tpm.ek import der_prefix

    out: list[bytes] = []
    while len(data) > 2 and data[0] == 0x30 and len(out) < wire.MAX_INTERMEDIATES:
        der = der_prefix(data)
        if len(der) <= 2 or len(der) > min(len(data), wire.MAX_CERT_BYTES):
            break
        out.append(der)
        data = data[len(der) :]
    return out


def _nv_chain(ectx: Any) -> list[bytes]:
    """Intermediate CA certificates the TPM keeps in the EK chain NV indices, each
    checked to parse (a malformed one is skipped with a WARNING: the server decides)."""
    from cryptography import x509
    from tpm2_pytss.constants import TPM2_CAP

    from custos.tpm.ek import read_nv
    from custos.tpm.errors import TpmError

    _more, cap = ectx.get_capability(
        TPM2_CAP.HANDLES, EK_CHAIN_FIRST, EK_CHAIN_LAST - EK_CHAIN_FIRST + 1
    )
    handles = [int(cap.data.handles.handle[i]) for i in range(int(cap.data.handles.count))]
    out: list[bytes] = []
    for index in (h for h in handles if EK_CHAIN_FIRST <= h <= EK_CHAIN_LAST):
        try:
            data = read_nv(ectx, index)
        except TpmError as e:
            log.warning("tpm: EK chain NV index %#010x not read: %s", index, e.message)
            continue
        for der in _split_der(data or b""):
            try:
                x509.load_der_x509_certificate(der)
            except ValueError:
                log.warning("tpm: EK chain NV index %#010x holds a malformed certificate", index)
                continue
            out.append(der)
    return out


class TpmAgentAttestor:
    """The ``tpm`` node attestor, agent half (also a ``KeyCertifier``)."""

    def __init__(self) -> None:
        self._tcti: str | None = None
        self._profile = DEFAULT_EK_PROFILE
        self._ak_file: str | None = None
        self._event_log_file: str | None = None
        self._intermediates: tuple[bytes, ...] = ()
        self._ctx: Any = None  # custos.tpm.context.TpmContext
        self._token: int | None = None
        self._ak: Any = None  # custos.tpm.blobs.KeyBlob
        self._ek: tuple[bytes, bytes | None, tuple[bytes, ...]] | None = None
        #: The last key file certified: (its bytes, its KeyBlob).
        self._certified: tuple[bytes, Any] | None = None
        self._ak_lock = threading.Lock()
        self._warned_log = False

    # -- lifecycle --

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        from custos.tpm.tcti import resolve_tcti

        unknown = set(config) - AGENT_KEYS
        if unknown:
            raise TpmAgentConfigError(
                f"unknown tpm settings: {', '.join(sorted(map(str, unknown)))}"
            )
        tcti = config.get("tcti")
        if tcti is not None and not isinstance(tcti, str):
            raise TpmAgentConfigError("tpm: tcti must be a string")
        profile = config.get("ek_profile", DEFAULT_EK_PROFILE)
        if not isinstance(profile, str) or profile not in ACTIVATION_PROFILES:
            raise TpmAgentConfigError(f"tpm: ek_profile is one of {', '.join(ACTIVATION_PROFILES)}")
        self._tcti = resolve_tcti(tcti, explicit_source="tpm.tcti")
        self._profile = profile
        if "ak_file" in config:
            self._ak_file = _path(config["ak_file"], "ak_file")
        if "event_log_file" in config:
            self._event_log_file = _path(config["event_log_file"], "event_log_file")
        if "ek_intermediates" in config:
            self._intermediates = _intermediates(config["ek_intermediates"])
        from custos.tpm.context import attach

        self._ctx, self._token = attach(self._tcti, 0)

    def close(self) -> None:
        ctx, token = self._ctx, self._token
        self._ctx = self._token = None
        self._ak = self._ek = self._certified = None
        if ctx is not None and token is not None:
            from custos.tpm.context import detach

            detach(ctx, token, "")

    def _context(self) -> Any:
        if self._ctx is None:
            raise RuntimeError("tpm is not configured")
        return self._ctx

    # -- the attestation key --

    def attestation_key(self) -> Any:
        """The AK (KeyBlob): loaded from ``ak_file``, or created (and saved) once."""
        from custos.tpm.ak import create_ak, load_ak
        from custos.tpm.blobs import read_key_file

        with self._ak_lock:
            if self._ak is not None:
                return self._ak
            ctx = self._context()
            path = self._ak_file
            if path is not None:
                try:
                    _, pem = read_key_file(path, what="tpm ak_file")
                except FileNotFoundError:
                    pem = None
                if pem is not None:
                    self._ak = load_ak(pem, what="tpm ak_file")
                    return self._ak
            blob = create_ak(ctx)
            if path is not None:
                try:
                    blob = self._save_ak(path, blob)
                except OSError as e:
                    raise TpmAgentError(
                        f"tpm: cannot write ak_file {path}: {e.strerror or e}"
                    ) from None
            self._ak = blob
            return blob

    @staticmethod
    def _save_ak(path: str, blob: Any) -> Any:
        """Write the AK with mode 0600, never over an existing file (another agent
        process that won the race keeps its AK, and we use that one)."""
        from custos.tpm.ak import load_ak
        from custos.tpm.blobs import read_key_file

        directory = Path(path).parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ak-", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob.to_pem())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                _, pem = read_key_file(path, what="tpm ak_file")
                return load_ak(pem, what="tpm ak_file")
        finally:
            os.unlink(tmp)
        log.info("tpm: created the attestation key %s", path)
        return blob

    # -- evidence --

    def _endorsement(self) -> tuple[bytes, bytes | None, tuple[bytes, ...]]:
        """(EK public area, EK certificate, intermediates), read once per plugin: the EK
        is a primary recreated from its template (~30 ms on swtpm for RSA), and it does
        not change while the TPM keeps its endorsement seed, so renewals skip it."""
        from cryptography.hazmat.primitives.serialization import Encoding

        from custos.tpm.activation import ek_public_area
        from custos.tpm.ek import ek_certificate
        from custos.tpm.errors import TpmError

        with self._ak_lock:
            if self._ek is not None:
                return self._ek
        ctx = self._context()
        ek_public = ek_public_area(ctx, self._profile)
        try:
            cert = ctx.device(lambda ectx: ek_certificate(ectx, self._profile))
        except TpmError as e:
            # A garbled or unreadable certificate: attest without one (the allowlist
            # may still trust the EK; the server says so if not).
            log.warning("tpm: sending no EK certificate: %s", e.message)
            cert = None
        chain = list(self._intermediates)
        for der in ctx.device(_nv_chain):
            if der not in chain and len(chain) < wire.MAX_INTERMEDIATES:
                chain.append(der)
        ek = (
            bytes(ek_public.marshal()),
            cert.public_bytes(Encoding.DER) if cert is not None else None,
            tuple(chain),
        )
        with self._ak_lock:
            self._ek = ek
        return ek

    def _payload(self) -> bytes:
        ak = self.attestation_key()
        ek_public, ek_cert, chain = self._endorsement()
        return wire.Payload(
            ek_profile=self._profile,
            ek_public=ek_public,
            ak_public=bytes(ak.tss.public.marshal()),
            ek_cert=ek_cert,
            ek_intermediates=chain,
        ).encode()

    def _read_pcrs(self, selection: PcrSelection) -> dict[tuple[str, int], bytes]:
        from tpm2_pytss.types import TPML_PCR_SELECTION

        ctx = self._context()
        out: dict[tuple[str, int], bytes] = {}
        for bank, indices in selection.banks:
            for start in range(0, len(indices), _PCR_READ_CHUNK):
                chunk = indices[start : start + _PCR_READ_CHUNK]
                spec = f"{bank}:{','.join(map(str, chunk))}"

                def read(ectx: Any, spec: str = spec) -> list[bytes]:
                    _counter, _sel, digests = ectx.pcr_read(TPML_PCR_SELECTION.parse(spec))
                    return [bytes(digests.digests[i]) for i in range(digests.count)]

                values = ctx.device(read)
                if len(values) != len(chunk) or any(len(v) != DIGEST_SIZES[bank] for v in values):
                    raise TpmAgentError(f"the TPM has no active {bank} bank for PCRs {spec}")
                out.update({(bank, i): v for i, v in zip(chunk, values, strict=True)})
        return out

    def _event_log(self) -> bytes | None:
        if self._event_log_file is None:
            return None
        from custos._files import UnreadableFileError, read_small_file

        try:
            return read_small_file(
                self._event_log_file, max_bytes=wire.MAX_EVENT_LOG_BYTES, what="tpm event log"
            )
        except UnreadableFileError as e:
            if not self._warned_log:
                self._warned_log = True
                log.warning("tpm: not sending the event log: %s", e.message)
            return None

    def _answer(self, challenge: bytes) -> bytes:
        from custos.tpm.activation import activate_credential
        from custos.tpm.ak import quote
        from custos.tpm.verify import quote_covers

        ctx = self._context()
        ak = self.attestation_key()
        message = wire.decode_challenge(challenge)
        activated = None
        if message.credential_blob is not None and message.secret is not None:
            activated = activate_credential(
                ctx, ak, self._profile, message.credential_blob, message.secret
            )
        # Read, then quote: the values sent are the ones quoted unless a PCR was
        # extended in between, which the quote's own PCR digest shows (then again).
        for _ in range(QUOTE_ATTEMPTS):
            before = self._read_pcrs(message.pcrs)
            attest, signature = quote(ctx, ak, str(message.pcrs), message.nonce)
            if quote_covers(bytes(attest), before):
                break
        else:
            raise TpmAgentError(f"the PCRs kept changing during {QUOTE_ATTEMPTS} quotes")
        answer = wire.Answer(
            quote_attest=bytes(attest),
            quote_signature=bytes(signature.marshal()),
            pcr_values=before,
            activated_secret=bytes(activated) if activated is not None else None,
        )
        event_log = self._event_log()
        if event_log is None:
            return answer.encode()
        try:
            return dataclasses.replace(answer, event_log=event_log).encode()
        except wire.TpmEvidenceError as e:
            if not self._warned_log:
                self._warned_log = True
                log.warning(
                    "tpm: not sending the event log (%d bytes): %s", len(event_log), e.message
                )
            return answer.encode()

    async def attestation_flow(self) -> AsyncGenerator[bytes, bytes]:
        self._context()
        challenge = yield await asyncio.to_thread(self._payload)
        while True:  # one challenge per attestation today; answer each that comes
            challenge = yield await asyncio.to_thread(self._answer, challenge)

    # -- key residency (custos.plugin.protocols.KeyCertifier) --

    def certify_key(self, key_name: str, key_path: str) -> tuple[bytes, bytes, bytes] | None:
        """TPM2_Certify of the store key at ``key_path`` by the AK: (TPMS_ATTEST,
        TPMT_SIGNATURE, the key's TPM2B_PUBLIC), each marshalled; None before the
        AK exists (no attestation yet)."""
        from custos.tpm.ak import certify
        from custos.tpm.blobs import read_key_file, signing_key_blob

        if self._ctx is None or self._ak is None:
            return None
        what = f"key {key_name!r}"
        stamp, pem = read_key_file(key_path, what=what)
        # The last file's parse is kept with its bytes (the validation costs ~1 ms of
        # tpm2-pytss): a re-attestation with the same key certifies the very same
        # bytes again.  Other bytes are parsed and validated afresh.
        known = self._certified
        if known is not None and known[0] == pem:
            key = known[1]
        else:
            key = signing_key_blob(pem, what=what)
            self._certified = (pem, key)
        # The store's entry in the shared context's loaded-key cache (TpmKeyStore files
        # its keys under (key directory, name)): the key its CSR was just signed with
        # is certified where it is loaded, not loaded a second time.
        loaded = ((os.path.dirname(key_path), key_name), stamp)
        # No nonce: residency needs no freshness (the key is fixedTPM; see the
        # contract's verify_certify and decision 0068).
        attest, signature = certify(self._ctx, self._ak, key, b"", loaded=loaded)
        return bytes(attest), bytes(signature.marshal()), bytes(key.tss.public.marshal())


__all__ = ["TpmAgentAttestor", "TpmAgentConfigError", "TpmAgentError"]
