"""TPM-specific behaviour of TpmKeyStore, against a real swtpm.

The generic key-store contract (create/sign/list/delete, names, CLI...) runs for
the TPM in test_contract.py; here: key attributes and duplication, the blob
format, handle hygiene under errors, device loss, and tpm_info.
"""

from __future__ import annotations

import gc
import random
import selectors
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_ECC,
    TPM2_HT,
    TPM2_RC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_OBJECT,
)
from tpm2_pytss.tsskey import TSSPrivKey, _parent_ecc_template
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_SCHEME_HASH,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMT_TK_HASHCHECK,
    TPMU_ASYM_SCHEME,
    TPMU_SIG_SCHEME,
)

from cli_runner import run_custos
from custos.keys import (
    Algorithm,
    DeviceUnavailableError,
    KeyNotFoundError,
    KeyStoreError,
    StoreConfigError,
)
from custos.keys.signatures import raw_to_der
from custos.keys.tpm import (
    KEY_ATTRIBUTES,
    PARENT_TEMPLATE,
    BadKeyBlobError,
    TpmError,
    TpmKeyStore,
    TpmSlotsExhaustedError,
    key_template,
)
from custos.testing.swtpm import SwtpmInstance, free_port_pair
from custos.tpm.info import tpm_info
from custos.tpm.templates import CREATE_ATTRIBUTES

SIGN_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)


def verify_es(store: TpmKeyStore, name: str, data: bytes, sig: bytes) -> None:
    alg = store.info(name).alg
    pub = store.public_key(name)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(
        raw_to_der(sig, alg.spec.coordinate_size), data, ec.ECDSA(alg.spec.hash_algorithm())
    )


@contextmanager
def esapi_with_primary(tcti: str) -> Iterator[tuple[Any, Any]]:
    """A fresh ESAPI context and the store's parent, created from the same template."""
    with ESAPI(tcti) as ectx:
        primary, *_ = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=PARENT_TEMPLATE), ESYS_TR.OWNER
        )
        try:
            yield ectx, primary
        finally:
            ectx.flush_context(primary)


def transient_handles(tcti: str) -> list[int]:
    with ESAPI(tcti) as ectx:
        _more, cap = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        return [int(h) for h in cap.data.handles]


def transient_names(tcti: str) -> dict[int, bytes]:
    """Every transient object in the TPM, by handle, with its name (read, not flushed)."""
    out = {}
    with ESAPI(tcti) as ectx:
        _more, cap = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        for handle in cap.data.handles:
            tr = ectx.tr_from_tpmpublic(handle)
            out[int(handle)] = bytes(ectx.tr_get_name(tr))
            ectx.tr_close(tr)
    return out


def key_name(store: TpmKeyStore, name: str) -> bytes:
    """The TPM name of a key (nameAlg || hash of its public area), from its blob."""
    return bytes(TSSPrivKey.from_pem(store.key_path(name).read_bytes()).public.get_name())


class FlakyLink:
    """A TCP relay in front of swtpm that can drop commands: a transport fault, swtpm stays up.

    swtpm's TCTI opens one connection per command on port P (and uses P+1 for
    control), so the relay forwards both; ``drop(n)`` makes the next ``n`` command
    connections close after reading the command and before forwarding it - the
    client sees TCTI_RC_IO_ERROR, and the TPM never sees the command.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self._drop = 0
        self._pass = 0
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(20000, 32000, 2)
            try:
                pair = [self._listen(port), self._listen(port + 1)]
            except OSError:
                for s in self._listeners:
                    s.close()
                self._listeners = []
                continue
            self.port = port
            for offset, listener in enumerate(pair):
                threading.Thread(target=self._serve, args=(listener, offset), daemon=True).start()
            return
        raise RuntimeError("no free port pair for the relay")

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        self._listeners.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(32)
        return s

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def drop(self, n: int = 1, *, after: int = 0) -> None:
        """Drop the next ``n`` commands, after letting ``after`` more through first."""
        with self._lock:
            self._drop += n
            self._pass = after

    def close(self) -> None:
        for s in self._listeners:
            s.close()

    def _serve(self, listener: socket.socket, offset: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                drop = offset == 0 and self._drop > 0
                if drop and self._pass > 0:
                    self._pass -= 1
                    drop = False
                elif drop:
                    self._drop -= 1
            if drop:
                client.recv(65536)
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream + offset))
            except OSError:
                client.close()  # swtpm is down: so is the link
                continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            a.close()
            b.close()


def run_cli_sign(
    tcti: str, key_dir: Path, name: str, data: Path
) -> subprocess.CompletedProcess[str]:
    return run_custos(
        "keys", "sign", "--store", "tpm", "--name", name, "--input", str(data),
        extra_env={"CUSTOS_TCTI": tcti, "CUSTOS_KEY_DIR": str(key_dir)},
    )  # fmt: skip


def tpm2_tools_transients(tcti: str) -> list[str]:
    out = subprocess.run(
        ["tpm2_getcap", "-T", tcti, "handles-transient"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return [line.strip("- ").strip() for line in out.stdout.splitlines() if line.strip()]


def make_blob(tcti: str, template: Any) -> Any:
    """A key made outside the store (as another tool would), under the same parent.

    TSSPrivKey.create makes and flushes its own primary: with the store's cached
    primary that is two of swtpm's three object slots, and TPM2_Create needs the third.
    """
    with ESAPI(tcti) as ectx:
        return TSSPrivKey.create(ectx, template)


def write_blob(store: TpmKeyStore, name: str, tss: Any) -> None:
    path = store.key_dir / f"{name}.tss"
    path.write_bytes(tss.to_pem())
    path.chmod(0o600)


@pytest.fixture
def tpm_store(swtpm: SwtpmInstance, tmp_path: Path) -> Iterator[TpmKeyStore]:
    store = TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys")
    yield store
    store.close()


# ---- attributes, duplication, files -------------------------------------------


def test_key_dir_is_private_and_blob_is_0600(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    key_dir = tmp_path / "new" / "keys"
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=key_dir) as store:
        store.create("k", "ES256")
        assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((key_dir / "k.tss").stat().st_mode) == 0o600
        assert sorted(p.name for p in key_dir.iterdir()) == ["k.tss"]  # no temp files left


def test_keys_are_fixed_tpm_non_duplicable_signing_keys(
    swtpm: SwtpmInstance, tpm_store: TpmKeyStore
) -> None:
    for alg in sorted(TpmKeyStore.supported_algorithms):
        tpm_store.create(f"attr-{alg.value}", alg)
        attrs = tpm_store.key_attributes(f"attr-{alg.value}")
        assert attrs == KEY_ATTRIBUTES | CREATE_ATTRIBUTES, str(attrs)  # noDA: decision 0075
        assert not attrs & (TPMA_OBJECT.DECRYPT | TPMA_OBJECT.RESTRICTED)
    tpm_store.close()  # give the object slots back: swtpm has three, no resource manager

    # The attack the attributes stop: with a duplication policy, a key WITHOUT
    # fixedTPM/fixedParent is exported from the TPM (to a NULL parent, no inner
    # wrapper: the private part comes out in the clear) ...
    with esapi_with_primary(swtpm.tcti) as (ectx, primary):
        dup_policy = _duplicate_policy_digest(ectx)
        leaky = key_template(Algorithm.ES256)
        leaky.objectAttributes = KEY_ATTRIBUTES & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
        leaky.authPolicy = dup_policy
        assert len(_duplicate(ectx, primary, leaky)) > 0

        # ... while the same key with our attributes is refused by the TPM ...
        ours_with_policy = key_template(Algorithm.ES256)
        ours_with_policy.authPolicy = dup_policy
        with pytest.raises(TSS2_Exception) as refused:
            _duplicate(ectx, primary, ours_with_policy)
        assert refused.value.error == TPM2_RC.ATTRIBUTES

        # ... and so is the key the store actually made, loaded from its blob.
        tss = TSSPrivKey.from_pem((tpm_store.key_dir / "attr-ES256.tss").read_bytes())
        # Its authPolicy is empty, so no policy session can ever satisfy the
        # ADMIN-role Duplicate; and a password session is refused for that role.
        assert bytes(tss.public.publicArea.authPolicy) == b""
        handle = ectx.load(primary, tss.private, tss.public)
        try:
            with pytest.raises(TSS2_Exception) as by_password:
                ectx.duplicate(
                    handle, ESYS_TR.RH_NULL, TPM2B_DATA(),
                    TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), session1=ESYS_TR.PASSWORD,
                )
            assert by_password.value.error == TPM2_RC.AUTH_TYPE  # needs a policy session
        finally:
            ectx.flush_context(handle)
    assert transient_handles(swtpm.tcti) == []


def _duplicate_policy_digest(ectx: Any) -> Any:
    trial = ectx.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256,
    )
    try:
        ectx.policy_command_code(trial, TPM2_CC.Duplicate)
        return ectx.policy_get_digest(trial)
    finally:
        ectx.flush_context(trial)


def _duplicate(ectx: Any, primary: Any, template: Any) -> bytes:
    """Create a key from ``template``, then duplicate it under PolicyCommandCode(Duplicate)."""
    private, public, *_ = ectx.create(
        primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template)
    )
    handle = ectx.load(primary, private, public)
    session = ectx.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256,
    )
    try:
        ectx.policy_command_code(session, TPM2_CC.Duplicate)
        _key, duplicate, _seed = ectx.duplicate(
            handle, ESYS_TR.RH_NULL, TPM2B_DATA(),
            TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), session1=session,
        )
        return bytes(duplicate)
    finally:
        ectx.flush_context(handle)
        ectx.flush_context(session)


def test_store_refuses_a_planted_duplicable_key(
    swtpm: SwtpmInstance, tpm_store: TpmKeyStore
) -> None:
    """A blob whose key the TPM could export is not custody: the store will not use it."""
    template = key_template(Algorithm.ES256)
    template.objectAttributes = KEY_ATTRIBUTES & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
    planted = make_blob(swtpm.tcti, template)
    write_blob(tpm_store, "planted", planted)
    with pytest.raises(BadKeyBlobError, match="fixedtpm"):
        tpm_store.sign("planted", b"x")
    assert "planted" not in [k.name for k in tpm_store.list()]
    # control: the same creation path with our attributes is accepted
    fine = make_blob(swtpm.tcti, key_template(Algorithm.ES256))
    write_blob(tpm_store, "fine", fine)
    verify_es(tpm_store, "fine", b"x", tpm_store.sign("fine", b"x"))


def test_blob_is_a_tss2_private_key_other_tools_read(
    swtpm: SwtpmInstance, tpm_store: TpmKeyStore, tmp_path: Path
) -> None:
    tpm_store.create("interop", "ES256")
    path = tpm_store.key_path("interop")
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
    assert pem.rstrip().endswith(b"-----END TSS2 PRIVATE KEY-----")
    tss = TSSPrivKey.from_pem(pem)
    assert tss.parent == TPM2_RH.OWNER and tss.empty_auth
    # Our parent is tpm2-openssl's / TSSPrivKey's ECC parent, byte for byte: that is
    # what lets them load a blob whose parent is TPM2_RH_OWNER.
    assert PARENT_TEMPLATE.marshal() == _parent_ecc_template.marshal()

    # tpm2-tools parses the blob (tpm2-tools 5.4 cannot load a TSS2 PEM by itself;
    # tpm2-openssl could, but it is not installed here).
    printed = subprocess.run(
        ["tpm2_print", "-t", "TSSPRIVKEY_OBJ", str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign" in printed
    assert "NIST p256" in printed and "ecdsa" in printed

    # A fresh ESAPI context loads it the way tpm2-openssl does (TSSPrivKey.load makes
    # its own parent from the template) and signs; the store's public key verifies.
    tpm_store.close()
    data = b"signed outside the store"
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    with ESAPI(swtpm.tcti) as ectx:
        handle = tss.load(ectx)
        try:
            sig = ectx.sign(
                handle, TPM2B_DIGEST(digest.finalize()),
                TPMT_SIG_SCHEME(
                    scheme=TPM2_ALG.ECDSA,
                    details=TPMU_SIG_SCHEME(any=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
                ),
                SIGN_TICKET,
            )
        finally:
            ectx.flush_context(handle)
    r = bytes(sig.signature.ecdsa.signatureR).rjust(32, b"\0")
    s = bytes(sig.signature.ecdsa.signatureS).rjust(32, b"\0")
    reopened = TpmKeyStore(tcti=swtpm.tcti, key_dir=tpm_store.key_dir)
    try:
        verify_es(reopened, "interop", data, r + s)
    finally:
        reopened.close()
    assert transient_handles(swtpm.tcti) == []


# ---- handle hygiene -----------------------------------------------------------


@pytest.mark.slow
def test_no_transient_leak_after_10000_signatures_with_injected_errors(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    tpm = swtpm_factory()  # a private TPM: the transient count below is ours alone
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    store.create("good", "ES256")
    store.create("corrupt", "ES256")
    # Damage the private part inside a well-formed PEM: the TPM's integrity check
    # fails during TPM2_Load.
    tss = TSSPrivKey.from_pem(store.key_path("corrupt").read_bytes())
    blob = bytearray(bytes(tss.private))
    blob[-1] ^= 0x01
    tss.private.buffer = bytes(blob)
    store.key_path("corrupt").write_bytes(tss.to_pem())
    # A key that loads but whose fixed scheme (ECDSA-SHA384 on P-256) the TPM will
    # not use for our ES256 request: TPM2_Sign fails *after* the load.
    template = key_template(Algorithm.ES256)
    template.parameters.eccDetail.scheme.details = TPMU_ASYM_SCHEME(
        ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA384)
    )
    mismatched = make_blob(tpm.tcti, template)
    write_blob(store, "mismatch", mismatched)

    signed: list[tuple[bytes, bytes]] = []
    failures = {"corrupt": 0, "mismatch": 0, "missing": 0}
    try:
        for i in range(10_000):
            if i % 10 == 9:
                kind = ("corrupt", "mismatch", "missing")[(i // 10) % 3]
                # A blob the TPM refuses to load is a bad key file (checked before use);
                # a key that loads but cannot sign is a TPM error.
                expected: type[Exception] = {
                    "missing": KeyNotFoundError, "corrupt": BadKeyBlobError, "mismatch": TpmError
                }[kind]
                with pytest.raises(expected):
                    store.sign(kind, b"never signed")
                failures[kind] += 1
            else:
                msg = i.to_bytes(4, "big")
                signed.append((msg, store.sign("good", msg)))
        # The last iteration failed (and made room for its key first); one more good
        # signature. While open, the store holds its cached primary and at most
        # loaded_key_cache (default 1) loaded keys: "good" - no handle of a failed key.
        signed.append((b"last", store.sign("good", b"last")))
        assert len(transient_handles(tpm.tcti)) == 1 + store.loaded_key_cache == 2
    finally:
        store.close()
    assert failures == {"corrupt": 334, "mismatch": 333, "missing": 333}
    assert transient_handles(tpm.tcti) == []
    assert tpm2_tools_transients(tpm.tcti) == []
    verifier = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    try:
        for msg, sig in signed:
            verify_es(verifier, "good", msg, sig)
    finally:
        verifier.close()
    assert len(signed) == 9_001


def test_loaded_key_cache_is_an_lru_flushed_on_close(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys", loaded_key_cache=2)
    try:
        store.create("a", "ES256")
        store.create("b", "ES384")
        for name in ("a", "b", "a"):
            verify_es(store, name, b"m", store.sign(name, b"m"))
        assert len(transient_handles(tpm.tcti)) == 3  # primary + a + b: every slot
        # TPM2_Create needs a free object slot: the store flushes its loaded keys.
        store.create("c", "ES256")
        assert len(transient_handles(tpm.tcti)) == 1
        for name in ("c", "a", "b", "a", "c"):  # b is the least recently used at the end
            verify_es(store, name, name.encode(), store.sign(name, name.encode()))
        assert len(transient_handles(tpm.tcti)) == 3
    finally:
        store.close()
    assert transient_handles(tpm.tcti) == []

    # 0: load and flush around every signature, as before the cache existed.
    uncached = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys", loaded_key_cache=0)
    try:
        verify_es(uncached, "a", b"m", uncached.sign("a", b"m"))
        assert len(transient_handles(tpm.tcti)) == 1
    finally:
        uncached.close()
    assert transient_handles(tpm.tcti) == []


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1"])
def test_loaded_key_cache_must_be_a_count(
    swtpm: SwtpmInstance, tmp_path: Path, bad: Any
) -> None:
    with pytest.raises(StoreConfigError, match="loaded_key_cache"):
        TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys", loaded_key_cache=bad)


def test_a_loaded_key_never_outlives_its_blob(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """The attack: swap or delete a key's file while its handle stays loaded."""
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    try:
        store.create("a", "ES256")
        store.create("b", "ES256")
        old_a = store.public_key("a")
        store.sign("a", b"load a")  # a is loaded now
        assert len(transient_handles(tpm.tcti)) == 2

        # Replace a's blob with another key's: "a" must now sign with the new key,
        # not with the handle still loaded from the old blob.
        store.key_path("a").unlink()
        store.key_path("a").write_bytes(store.key_path("b").read_bytes())
        sig = store.sign("a", b"after swap")
        verify_es(store, "a", b"after swap", sig)  # the new blob's public key
        assert isinstance(old_a, ec.EllipticCurvePublicKey)
        with pytest.raises(InvalidSignature):
            old_a.verify(raw_to_der(sig, 32), b"after swap", ec.ECDSA(hashes.SHA256()))
        assert len(transient_handles(tpm.tcti)) == 2  # the old handle was flushed

        # Deleted by another process: the next call flushes the loaded key at once.
        store.key_path("a").unlink()
        with pytest.raises(KeyNotFoundError):
            store.sign("a", b"gone")
        assert len(transient_handles(tpm.tcti)) == 1

        # Deleted through the store: flushed too.
        store.sign("b", b"load b")
        assert len(transient_handles(tpm.tcti)) == 2
        store.delete("b")
        assert len(transient_handles(tpm.tcti)) == 1
        with pytest.raises(KeyNotFoundError):
            store.sign("b", b"gone")
    finally:
        store.close()
    assert transient_handles(tpm.tcti) == []


def test_object_slots_taken_by_another_client(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """swtpm has three object slots and no resource manager: share them sensibly."""
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys", loaded_key_cache=2)

    def their_object(ectx: Any) -> Any:
        handle, *_ = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=PARENT_TEMPLATE), ESYS_TR.OWNER
        )
        return handle

    try:
        store.create("a", "ES256")
        store.create("b", "ES256")
        store.sign("a", b"load a")  # ours: primary + a
        with ESAPI(tpm.tcti) as other:
            theirs = [their_object(other)]  # the third slot
            try:
                # Loading b fails with TPM_RC_OBJECT_MEMORY: the store flushes its
                # own loaded key (a) and retries once.
                verify_es(store, "b", b"b", store.sign("b", b"b"))
                assert len(transient_handles(tpm.tcti)) == 3  # ours: primary + b
                # TPM2_Create needs a slot too: same retry.
                store.create("c", "ES256")
                assert len(transient_handles(tpm.tcti)) == 2  # ours: the primary
                # With nothing of ours left to flush, the error says what happened.
                theirs.append(their_object(other))
                with pytest.raises(TpmSlotsExhaustedError, match="slots are exhausted") as full:
                    store.sign("a", b"a")
                assert isinstance(full.value, TpmError) and full.value.code == "tpm_error"
                assert "only one process" in full.value.message
                assert len(transient_handles(tpm.tcti)) == 3  # nothing leaked
            finally:
                for handle in theirs:
                    other.flush_context(handle)
        verify_es(store, "c", b"c", store.sign("c", b"c"))  # slots free again
    finally:
        store.close()
    assert transient_handles(tpm.tcti) == []


def test_handles_flushed_without_close_at_gc_and_at_exit(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    store.create("k", "ES256")
    store.sign("k", b"load k")
    assert len(transient_handles(tpm.tcti)) == 2
    del store
    gc.collect()
    assert transient_handles(tpm.tcti) == []

    # A process that never calls close(): the finalizer runs at interpreter exit.
    code = (
        "import sys; from custos.keys.tpm import TpmKeyStore; "
        "s = TpmKeyStore(tcti=sys.argv[1], key_dir=sys.argv[2]); s.sign('k', b'x')"
    )
    subprocess.run(
        [sys.executable, "-c", code, tpm.tcti, str(tmp_path / "keys")],
        check=True, timeout=60, capture_output=True,
    )
    assert transient_handles(tpm.tcti) == []


def test_load_error_message_names_the_key(swtpm: SwtpmInstance, tpm_store: TpmKeyStore) -> None:
    tpm_store.create("broken", "ES256")
    path = tpm_store.key_path("broken")
    path.write_bytes(path.read_bytes().replace(b"TSS2 PRIVATE KEY", b"EC PRIVATE KEY"))
    with pytest.raises(BadKeyBlobError, match="broken"):
        tpm_store.sign("broken", b"x")


@pytest.mark.parametrize("then", ["sign", "close"])
def test_one_transport_error_with_the_tpm_still_up_leaks_no_handle(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path, then: str
) -> None:
    """An I/O error is taken as device loss, but swtpm may still hold our objects.

    Without a resource manager they would hold two of its three slots for good:
    every later signature failed with "no free object slot", and close() left them.
    """
    tpm = swtpm_factory()
    link = FlakyLink(tpm.port)
    store = TpmKeyStore(tcti=link.tcti, key_dir=tmp_path / "keys")
    try:
        store.create("k", "ES256")
        for i in range(10):
            store.sign("k", i.to_bytes(2, "big"))
        assert len(transient_handles(tpm.tcti)) == 2  # primary + k
        link.drop(1)
        with pytest.raises(DeviceUnavailableError, match="lost the TPM"):
            store.sign("k", b"dropped")
        assert len(transient_handles(tpm.tcti)) == 2  # still there: swtpm never went away
        if then == "sign":
            for i in range(100):
                msg = b"after %d" % i
                verify_es(store, "k", msg, store.sign("k", msg))
            assert len(transient_handles(tpm.tcti)) == 2  # the new primary + k, nothing doubled
    finally:
        store.close()
        link.close()
    assert transient_handles(tpm.tcti) == []
    assert tpm2_tools_transients(tpm.tcti) == []


def test_key_loaded_for_one_signature_is_not_leaked_by_a_transport_error(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """No loaded-key cache: each signature loads the key, signs and flushes it.

    The sign and the flush both fail on the wire (swtpm stays up): the freshly
    loaded key was never in the cache, so the device-loss path must remember
    it from the failed flush, and the reconnect flush it.
    """
    tpm = swtpm_factory()
    link = FlakyLink(tpm.port)
    store = TpmKeyStore(tcti=link.tcti, key_dir=tmp_path / "keys", loaded_key_cache=0)
    try:
        store.create("k", "ES256")
        store.sign("k", b"warm")  # primary loaded, k loaded and flushed
        assert len(transient_handles(tpm.tcti)) == 1
        link.drop(2, after=1)  # the Load goes through; TPM2_Sign and FlushContext are lost
        with pytest.raises(DeviceUnavailableError):
            store.sign("k", b"dropped")
        assert len(transient_handles(tpm.tcti)) == 2  # the primary and the loaded k
        for i in range(20):
            msg = b"after %d" % i
            verify_es(store, "k", msg, store.sign("k", msg))
        assert len(transient_handles(tpm.tcti)) == 1  # only the new primary
    finally:
        store.close()
        link.close()
    assert transient_handles(tpm.tcti) == []


def test_failed_primary_recreation_does_not_wedge_the_store(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """The primary is lost (unseen restart) and cannot be made again for a while.

    Here the owner hierarchy gets a password meanwhile; the store must keep
    answering with custos errors (was: a raw TypeError from ESAPI on every call,
    for good) and recover once the primary can be created again.
    """
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    try:
        store.create("k", "ES256")
        store.sign("k", b"load k")
        tpm.restart()  # unseen: swtpm's TCTI connects per command
        with ESAPI(tpm.tcti) as other:
            other.hierarchy_change_auth(ESYS_TR.OWNER, TPM2B_AUTH(b"owner-secret"))
        for _ in range(3):
            with pytest.raises(TpmError, match="storage primary"):
                store.sign("k", b"no primary")
        with pytest.raises(KeyStoreError):
            store.create("k2", "ES256")
        with ESAPI(tpm.tcti) as other:
            other.tr_set_auth(ESYS_TR.OWNER, TPM2B_AUTH(b"owner-secret"))
            other.hierarchy_change_auth(ESYS_TR.OWNER, TPM2B_AUTH(b""))
        verify_es(store, "k", b"recovered", store.sign("k", b"recovered"))
        store.create("k2", "ES256")
        verify_es(store, "k2", b"k2", store.sign("k2", b"k2"))
        assert len(transient_handles(tpm.tcti)) == 2
    finally:
        store.close()
    assert transient_handles(tpm.tcti) == []


def test_delete_while_other_threads_sign_leaves_no_loaded_key(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """A signature racing delete() must not reload the key and keep it loaded after."""
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    try:
        for rnd in range(8):
            name = f"doomed-{rnd}"
            store.create(name, "ES256")
            doomed = key_name(store, name)
            store.sign(name, b"load it")
            deleted = threading.Event()
            errors: list[BaseException] = []
            signed = [0]

            def signer(
                name: str, deleted: threading.Event, errors: list[BaseException], signed: list[int]
            ) -> None:
                while not deleted.is_set():
                    try:
                        store.sign(name, b"racing")
                        signed[0] += 1
                    except KeyNotFoundError:
                        return
                    except BaseException as e:  # noqa: BLE001 - asserted below
                        errors.append(e)
                        return

            threads = [
                threading.Thread(target=signer, args=(name, deleted, errors, signed))
                for _ in range(4)
            ]
            for th in threads:
                th.start()
            while signed[0] < 8:
                threading.Event().wait(0.001)
            store.delete(name)
            deleted.set()
            for th in threads:
                th.join()
            assert not errors, errors[:3]
            # Checked before anything names the key again (a failing call would flush it).
            assert doomed not in transient_names(tpm.tcti).values(), f"round {rnd}"
            with pytest.raises(KeyNotFoundError):
                store.sign(name, b"after delete")
            assert len(transient_handles(tpm.tcti)) == 1  # the primary alone
    finally:
        store.close()
    assert transient_handles(tpm.tcti) == []


def test_two_stores_in_one_process_share_the_tpm(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """`custos dev`: server and agent in one process on one swtpm (no resource manager)."""
    tpm = swtpm_factory()
    a = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "a")
    b = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "b")
    try:
        a.create("k", "ES256")  # the same name in both stores: two different keys
        b.create("k", "ES384")
        for i in range(50):
            for store in (a, b):
                msg = f"{store.key_dir.name}:{i}".encode()
                verify_es(store, "k", msg, store.sign("k", msg))
        assert len(transient_handles(tpm.tcti)) <= 2  # one primary, one loaded key
        a.close()
        with pytest.raises(KeyStoreError, match="closed"):
            a.sign("k", b"x")
        verify_es(b, "k", b"b alone", b.sign("k", b"b alone"))
        assert len(transient_handles(tpm.tcti)) == 2
    finally:
        a.close()
        b.close()
    assert transient_handles(tpm.tcti) == []


def test_a_second_process_without_resource_manager_is_told_why(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """swtpm has three object slots for every client: one process at a time (decision 0010)."""
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    data = tmp_path / "msg"
    data.write_bytes(b"from another process")
    try:
        store.create("k", "ES256")
        store.sign("k", b"load k")  # ours: primary + k, two of the three slots
        out = run_cli_sign(tpm.tcti, store.key_dir, "k", data)
        assert out.returncode == 1
        assert "object slots are exhausted" in out.stderr
        assert "only one process" in out.stderr and "/dev/tpmrm0" in out.stderr
        assert len(transient_handles(tpm.tcti)) == 2  # the other process left nothing behind
    finally:
        store.close()
    out = run_cli_sign(tpm.tcti, tmp_path / "keys", "k", data)
    assert out.returncode == 0, out.stderr
    assert transient_handles(tpm.tcti) == []


# ---- device loss ----------------------------------------------------------------


def test_unreadable_key_file_is_a_file_error_not_a_tpm_error(
    tpm_store: TpmKeyStore,
) -> None:
    # The blob's path turned into a directory (root ignores file modes, so a
    # chmod would not do): an OSError from the key directory, not the TPM.
    tpm_store.create("unreadable", "ES256")
    blob = tpm_store.key_dir / "unreadable.tss"
    blob.unlink()
    blob.mkdir()
    try:
        with pytest.raises(KeyStoreError) as info:
            tpm_store.sign("unreadable", b"x")
        assert info.value.code == "bad_key_file"
        assert "TPM" not in str(info.value)
    finally:
        blob.rmdir()


def test_device_loss_then_recovery_without_losing_keys(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    try:
        store.create("survivor", "ES256")
        verify_es(store, "survivor", b"before", store.sign("survivor", b"before"))

        tpm.kill()  # SIGKILL: the TPM vanishes
        with pytest.raises(DeviceUnavailableError, match=r"lost the TPM at .*port=") as lost:
            store.sign("survivor", b"during")
        assert lost.value.code == "device_unavailable"
        assert isinstance(lost.value.__cause__, TSS2_Exception)
        # Still gone: the reconnect attempt says so too, and nothing hangs.
        with pytest.raises(DeviceUnavailableError, match="cannot reach the TPM"):
            store.sign("survivor", b"during")
        # Metadata needs no device.
        assert [k.name for k in store.list()] == ["survivor"]
        assert store.public_key("survivor") is not None

        tpm.start()  # same state directory: same owner seed, same primary
        verify_es(store, "survivor", b"after", store.sign("survivor", b"after"))
        # One new primary and the one cached key: nothing doubled.
        assert len(transient_handles(tpm.tcti)) == 2

        # A restart the store never saw fail (swtpm's TCTI connects per command):
        # the cached primary handle is stale and must be re-created, not trusted.
        tpm.restart()
        verify_es(store, "survivor", b"after restart", store.sign("survivor", b"after restart"))
        assert len(transient_handles(tpm.tcti)) == 2
    finally:
        store.close()
    assert transient_handles(tpm.tcti) == []


def test_device_killed_while_threads_sign(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """swtpm dies *during* a concurrent run: every call either returns a
    signature that verifies or raises device_unavailable (never another error,
    never a hang), and once the TPM is back every thread signs again."""
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    store.create("busy", "ES256")
    killed = threading.Event()
    back = threading.Event()
    errors: list[BaseException] = []
    lost_seen = [0]
    signed_after = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        n = 0
        try:
            while not back.is_set() or n < 20:
                msg = f"t{i}-{n}".encode()
                try:
                    verify_es(store, "busy", msg, store.sign("busy", msg))
                    if back.is_set():
                        with lock:
                            signed_after[0] += 1
                        n += 1
                except DeviceUnavailableError:
                    with lock:
                        lost_seen[0] += 1
                    if not killed.is_set():
                        raise  # lost before the kill: a real failure
                    time.sleep(0.01)
        except BaseException as e:  # noqa: BLE001 - collected, asserted in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)  # let them sign for a while
        killed.set()
        tpm.kill()
        time.sleep(0.3)  # they keep calling a dead TPM
        tpm.start()
        back.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a signer hung after device loss"
        assert errors == [], errors
        assert lost_seen[0] > 0  # the loss was seen mid-run, as device_unavailable
        assert signed_after[0] >= 4 * 20  # and everyone signs again afterwards
        assert [k.name for k in store.list()] == ["busy"]  # no key lost
    finally:
        back.set()
        store.close()
    assert transient_handles(tpm.tcti) == []


def test_unseen_restart_never_flushes_another_clients_objects(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    """After a TPM restart our old handle numbers may be someone else's: close, never flush."""
    tpm = swtpm_factory()
    store = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    try:
        store.create("k", "ES256")
        store.sign("k", b"load k")  # ours: 0x80000000 (primary) and 0x80000001 (k)
        tpm.restart()  # unseen: swtpm's TCTI connects per command
        with ESAPI(tpm.tcti) as other:
            theirs = [
                other.create_primary(
                    TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=PARENT_TEMPLATE),
                    ESYS_TR.OWNER,
                )[0]
                for _ in range(2)
            ]
            their_handles = sorted(int(other.tr_get_tpm_handle(h)) for h in theirs)
            assert their_handles == sorted(transient_handles(tpm.tcti))  # our old numbers
            try:
                # Our primary takes the last slot; k finds none: a clear error ...
                with pytest.raises(TpmSlotsExhaustedError):
                    store.sign("k", b"k")
                # ... and their objects are all still there (not flushed, nothing of
                # ours loaded in their place).
                their_name = bytes(other.tr_get_name(theirs[0]))
                names = transient_names(tpm.tcti)
                assert [names.get(h) for h in their_handles] == [their_name, their_name]
            finally:
                for h in theirs:
                    other.flush_context(h)
        verify_es(store, "k", b"k", store.sign("k", b"k"))
        assert len(transient_handles(tpm.tcti)) == 2
    finally:
        store.close()
    assert transient_handles(tpm.tcti) == []


def test_missing_device_is_device_unavailable(tmp_path: Path) -> None:
    port = free_port_pair()  # nothing listens there
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    with pytest.raises(DeviceUnavailableError, match=f"port={port}"):
        TpmKeyStore(tcti=tcti, key_dir=tmp_path / "keys")
    with pytest.raises(DeviceUnavailableError):
        TpmKeyStore(tcti="device:/dev/custos-no-such-tpm", key_dir=tmp_path / "keys")
    with pytest.raises(DeviceUnavailableError):
        tpm_info(tcti)
    with pytest.raises(StoreConfigError, match="TCTI"):
        TpmKeyStore(tcti="no-such-tcti-module:x", key_dir=tmp_path / "keys")


def test_closed_store_refuses_work(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    store = TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys")
    store.create("k", "ES256")
    store.close()
    store.close()  # idempotent
    with pytest.raises(KeyStoreError, match="closed"):
        store.sign("k", b"x")


# ---- concurrency ------------------------------------------------------------------


@pytest.mark.slow
def test_8_threads_x_500_mixed_algorithms(swtpm: SwtpmInstance, tpm_store: TpmKeyStore) -> None:
    """Threads sign with a P-256 and a P-384 key at once; one ESAPI context serves all."""
    tpm_store.create("c256", "ES256")
    tpm_store.create("c384", "ES384")
    results: list[tuple[str, bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        local = []
        try:
            for i in range(500):
                name = "c384" if i % 10 == t % 10 else "c256"  # P-384 is slower on swtpm
                msg = f"{t}:{i}".encode()
                local.append((name, msg, tpm_store.sign(name, msg)))
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(results) == 4000
    for name, msg, sig in results:
        verify_es(tpm_store, name, msg, sig)
    assert len(transient_handles(swtpm.tcti)) == 1 + tpm_store.loaded_key_cache


# ---- tpm_info -----------------------------------------------------------------


def test_tpm_info_reports_manufacturer_banks_and_ek_certificate(swtpm: SwtpmInstance) -> None:
    info = tpm_info(swtpm.tcti)
    assert info["manufacturer"] == "IBM"  # swtpm (libtpms) reports IBM's vendor id
    assert info["spec"]["family"] == "2.0"
    assert info["pcr_banks"] == ["sha1", "sha256"]  # what provisioning activated
    assert set(info["ek_certificates"]) == {"rsa2048", "ecc-p384"}
    assert info["platform_certificate_present"] is True

    # The reported subject/issuer are those of the EK certificate provisioning wrote,
    # and that certificate really was issued by the EK CA the fixture exposes.
    ek = x509.load_der_x509_certificate(
        (swtpm.state.ek_dir / "ek-rsa2048.crt").read_bytes()
    )
    issuer = x509.load_pem_x509_certificate(swtpm.ek_ca_certs[0].read_bytes())
    root = x509.load_pem_x509_certificate(swtpm.ek_ca_certs[1].read_bytes())
    assert info["ek_certificate_subject"] == ek.subject.rfc4514_string()
    assert info["ek_certificate_issuer"] == ek.issuer.rfc4514_string()
    assert info["ek_certificate_issuer"] == issuer.subject.rfc4514_string()
    ek.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(root)


def test_p384_ek_is_what_swtpm_makes(swtpm: SwtpmInstance) -> None:
    """DESIGN.md: swtpm's ECC EK is P-384 at 0x01c00016 and there is no P-256 EK."""
    ek = x509.load_der_x509_certificate(
        (swtpm.state.ek_dir / "ek-secp384r1.crt").read_bytes()
    )
    pub = ek.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp384r1"
    assert "ecc-p256" not in tpm_info(swtpm.tcti)["ek_certificates"]
    assert int(TPM2_ECC.NIST_P384) == 4  # the curve id the store's ES384 template uses


# ---- module structure (issue 7 item 7 / Structure) ---------------------------------


def test_tpm_store_does_not_import_the_config_module() -> None:
    """keys/config imports the backends (lazily), never the reverse: no import cycle."""
    import ast

    import custos.keys.tpm as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "custos.keys.config" not in imported
    # Each import order works in a fresh interpreter.
    for first in ("custos.tpm.context", "custos.keys.tpm", "custos.keys.config", "custos.tpm.ak"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {first}; import custos.keys.tpm, custos.tpm.info"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, (first, result.stderr)


def test_default_key_dir_is_the_config_default() -> None:
    from custos.keys.config import DEFAULT_KEY_DIR
    from custos.keys.tpm import DEFAULT_KEY_DIR as STORE_DEFAULT

    assert STORE_DEFAULT == DEFAULT_KEY_DIR


def test_store_resolves_its_tcti_from_the_environment(
    swtpm: SwtpmInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUSTOS_TCTI", raising=False)
    monkeypatch.setenv("TPM2TOOLS_TCTI", swtpm.tcti)
    with TpmKeyStore(key_dir=tmp_path / "keys") as store:
        assert store.tcti == swtpm.tcti
    monkeypatch.setenv("CUSTOS_TCTI", "cmd:true")
    with pytest.raises(StoreConfigError, match="CUSTOS_TCTI"):
        TpmKeyStore(key_dir=tmp_path / "keys")


def test_listing_keys_never_checked_says_the_tpm_is_lost(
    swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    # Final review of issue 7: list() checks each key against the TPM the first time;
    # with the TPM gone, every key was "skipped" as if its file were bad and the
    # listing came back empty, with no error.
    tpm = swtpm_factory()
    lister = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
    try:
        maker = TpmKeyStore(tcti=tpm.tcti, key_dir=tmp_path / "keys")
        try:
            maker.create("unseen", "ES256")  # made by another store: never checked by lister
        finally:
            maker.close()
        tpm.kill()
        with pytest.raises(DeviceUnavailableError):
            lister.list()
    finally:
        lister.close()
