"""Key files are data from the disk (issue 7 items 9 and 10).

Item 9: only small regular files are read, and a key file is validated completely
before any of it reaches the TPM.  Item 10: a key file is checked against the TPM
(the name the TPM computes on load against the file's public area) the first time
it is looked up, and again when the file changes; a key file whose public area
was swapped for another key's is never reported, exported or used as ours.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tpm2_pytss.tsskey import TSSPrivKey

from custos.keys import KeyNotFoundError
from custos.keys.tpm import BadKeyBlobError, TpmKeyStore
from custos.testing.swtpm import SwtpmInstance

pytestmark = pytest.mark.timeout(120)  # a FIFO or /dev/zero must not hang the suite


@pytest.fixture
def store(swtpm: SwtpmInstance, tmp_path: Path) -> Iterator[TpmKeyStore]:
    s = TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys")
    yield s
    s.close()


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN TSS2 PRIVATE KEY-----\n" + body + b"-----END TSS2 PRIVATE KEY-----\n"


def _all_lookups_refuse(store: TpmKeyStore, name: str, match: str | None = None) -> None:
    """info, public_key, get, sign: each a bad_key_file error naming the key."""
    calls: list[Callable[[], object]] = [
        lambda: store.info(name),
        lambda: store.public_key(name),
        lambda: store.get(name),
        lambda: store.sign(name, b"data"),
    ]
    for call in calls:
        with pytest.raises(BadKeyBlobError, match=match) as info:
            call()
        assert info.value.code == "bad_key_file"
        assert name in str(info.value)


# ---- item 9: what is read, and what is validated before the TPM sees it ----------


def test_fifo_is_refused_without_blocking(store: TpmKeyStore) -> None:
    os.mkfifo(store.key_dir / "fifo.tss")
    _all_lookups_refuse(store, "fifo", "not a regular file")


def test_symlink_to_dev_zero_is_refused(store: TpmKeyStore) -> None:
    (store.key_dir / "zero.tss").symlink_to("/dev/zero")
    _all_lookups_refuse(store, "zero", "not a regular file")


def test_huge_file_is_refused_unread(store: TpmKeyStore) -> None:
    with open(store.key_dir / "huge.tss", "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB without writing it
    _all_lookups_refuse(store, "huge", "larger than")


def test_directory_in_place_of_a_key_is_refused(store: TpmKeyStore) -> None:
    (store.key_dir / "dir.tss").mkdir()
    _all_lookups_refuse(store, "dir")


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda pem: pem[: len(pem) // 2], id="truncated-pem"),
        pytest.param(lambda pem: b"", id="empty"),
        pytest.param(lambda pem: os.urandom(700), id="random-bytes"),
        pytest.param(lambda pem: b"\xff\xfe" + pem, id="not-ascii"),
        pytest.param(lambda pem: pem.replace(b"TSS2 PRIVATE KEY", b"EC PRIVATE KEY"), id="armour"),
        pytest.param(lambda pem: b"junk before\n" + pem, id="text-before-armour"),
        pytest.param(lambda pem: pem + pem, id="two-blocks"),
        pytest.param(lambda pem: pem.replace(b"\n", b"\n!", 1), id="bad-base64"),
        pytest.param(lambda pem: _pem(base64.b64decode(b"".join(pem.splitlines()[1:-1]))[:-9]),
                     id="truncated-der"),
        pytest.param(lambda pem: _pem(base64.b64decode(b"".join(pem.splitlines()[1:-1])) + b"\0\0"),
                     id="trailing-der"),
    ],
)  # fmt: skip
def test_malformed_blobs_are_bad_key_files(
    store: TpmKeyStore, mangle: Callable[[bytes], bytes]
) -> None:
    store.create("k", "ES256")
    path = store.key_path("k")
    path.write_bytes(mangle(path.read_bytes()))
    _all_lookups_refuse(store, "k")


def _rewrite(path: Path, edit: Callable[[TSSPrivKey], TSSPrivKey]) -> None:
    path.write_bytes(edit(TSSPrivKey.from_pem(path.read_bytes())).to_pem())


def test_wrong_parent_and_auth_are_refused(store: TpmKeyStore) -> None:
    store.create("p", "ES256")
    _rewrite(store.key_path("p"), lambda t: TSSPrivKey(t.private, t.public, True, 0x81000001))
    _all_lookups_refuse(store, "p", "parent")
    store.create("a", "ES256")
    _rewrite(store.key_path("a"), lambda t: TSSPrivKey(t.private, t.public, False, t.parent))
    _all_lookups_refuse(store, "a", "auth")


def test_implausible_private_part_is_refused_before_the_tpm(store: TpmKeyStore) -> None:
    store.create("s", "ES256")

    def shrink(t: TSSPrivKey) -> TSSPrivKey:
        t.private.buffer = b"\x00\x01"
        return t

    _rewrite(store.key_path("s"), shrink)
    _all_lookups_refuse(store, "s", "private part")


def test_restricted_attestation_key_is_refused_by_the_workload_store(
    swtpm: SwtpmInstance, store: TpmKeyStore
) -> None:
    from custos.tpm.ak import create_ak
    from custos.tpm.context import shared_context

    with shared_context(swtpm.tcti) as ctx:
        ak = create_ak(ctx)
    path = store.key_dir / "ak.tss"
    path.write_bytes(ak.to_pem())
    _all_lookups_refuse(store, "ak", "restricted key is an attestation key")
    # ... and listing skips it instead of failing the whole listing.
    store.create("ok", "ES256")
    assert [k.name for k in store.list()] == ["ok"]


# ---- item 10: the TPM vouches for each key file, once per file version ------------


def test_swapped_public_area_is_never_reported_as_ours(store: TpmKeyStore) -> None:
    store.create("victim", "ES256")
    store.create("other", "ES256")
    mine = TSSPrivKey.from_pem(store.key_path("victim").read_bytes())
    theirs = TSSPrivKey.from_pem(store.key_path("other").read_bytes())
    # The private part of "victim" with the public area of "other": every field is
    # well-formed, so only the TPM can tell.
    swapped = TSSPrivKey(mine.private, theirs.public, True, mine.parent)
    path = store.key_dir / "swapped.tss"
    path.write_bytes(swapped.to_pem())
    _all_lookups_refuse(store, "swapped", "swapped|tampered|does not match")


def test_a_good_key_replaced_by_a_swapped_one_is_checked_again(store: TpmKeyStore) -> None:
    store.create("k", "ES256")
    store.create("donor", "ES384")
    good = store.public_key("k")  # checked once and cached
    assert store.sign("k", b"x")
    mine = TSSPrivKey.from_pem(store.key_path("k").read_bytes())
    donor = TSSPrivKey.from_pem(store.key_path("donor").read_bytes())
    tmp = store.key_dir / "k.new"
    tmp.write_bytes(TSSPrivKey(mine.private, donor.public, True, mine.parent).to_pem())
    os.replace(tmp, store.key_path("k"))  # another file: another stamp
    _all_lookups_refuse(store, "k")
    assert good is not None


def test_key_of_another_tpm_is_refused_at_lookup(
    swtpm: SwtpmInstance, swtpm_factory: Callable[..., SwtpmInstance], tmp_path: Path
) -> None:
    other = swtpm_factory(new_identity=True)  # another owner seed: another primary
    with TpmKeyStore(tcti=other.tcti, key_dir=tmp_path / "theirs") as theirs:
        theirs.create("k", "ES256")
        pem = theirs.key_path("k").read_bytes()
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "ours") as ours:
        (ours.key_dir / "k.tss").write_bytes(pem)
        _all_lookups_refuse(ours, "k", "refused to load")


def test_deleted_key_is_not_found_not_bad(store: TpmKeyStore) -> None:
    store.create("gone", "ES256")
    store.info("gone")
    store.key_path("gone").unlink()
    with pytest.raises(KeyNotFoundError):
        store.info("gone")
