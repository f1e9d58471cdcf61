"""custos.tpm.eventlog: hand-built TCG2 crypto-agile logs, parsed and replayed."""

from __future__ import annotations

import hashlib
import struct

import pytest

from custos.tpm.eventlog import (
    EV_NO_ACTION,
    MAX_EVENTS,
    MAX_LOG_BYTES,
    Event,
    encode_event_log,
    parse_event_log,
    replay,
)
from custos.tpm.verify import AttestationEvidenceError

EV_POST_CODE = 0x00000001
EV_SEPARATOR = 0x00000004
BANKS = ["sha1", "sha256"]


def _event(pcr: int, data: bytes, event_type: int = EV_POST_CODE) -> Event:
    return Event(
        pcr=pcr,
        event_type=event_type,
        digests={"sha1": hashlib.sha1(data).digest(), "sha256": hashlib.sha256(data).digest()},
        data=data,
    )


def _extend(values: list[bytes], h: type = hashlib.sha256) -> bytes:  # type: ignore[type-arg]
    pcr = bytes(h().digest_size)
    for v in values:
        pcr = h(pcr + h(v).digest()).digest()
    return pcr


EVENTS = [_event(0, b"bios"), _event(0, b"option rom"), _event(7, b"secure boot on"),
          _event(0, b"\0\0\0\0", EV_SEPARATOR), _event(7, b"\0\0\0\0", EV_SEPARATOR)]  # fmt: skip
LOG = encode_event_log(EVENTS, BANKS)


def _bad(data: bytes) -> None:
    with pytest.raises(AttestationEvidenceError) as info:
        parse_event_log(data)
    assert info.value.code == "bad_event_log"


# ---- negative -------------------------------------------------------------------


def test_empty_and_truncated_logs_are_refused() -> None:
    _bad(b"")
    for cut in (1, 4, 20, len(LOG) // 2, len(LOG) - 1):
        _bad(LOG[:-cut])


def test_trailing_bytes_are_refused() -> None:
    _bad(LOG + b"\0")


def test_first_event_must_be_the_spec_id_event() -> None:
    _bad(encode_event_log([], BANKS)[:-1])
    _bad(LOG.replace(b"Spec ID Event03", b"Spec ID Event02"))  # the old SHA-1-only format
    not_no_action = struct.pack("<I", 0) + struct.pack("<I", 1) + LOG[8:]
    _bad(not_no_action)


def test_spec_id_event_with_wrong_digest_size_is_refused() -> None:
    log = bytearray(LOG)
    at = log.index(struct.pack("<HH", 0x000B, 32))
    log[at + 2 : at + 4] = struct.pack("<H", 31)
    _bad(bytes(log))


def test_event_with_another_digest_count_is_refused() -> None:
    one_bank = Event(pcr=0, event_type=1, digests={"sha256": bytes(32)}, data=b"")
    _bad(encode_event_log([one_bank], BANKS))


def test_event_with_undeclared_algorithm_is_refused() -> None:
    ev = Event(pcr=0, event_type=1, digests={"sha1": bytes(20), "sha384": bytes(48)}, data=b"")
    _bad(encode_event_log([ev], BANKS))


def test_event_with_duplicate_bank_is_refused() -> None:
    log = bytearray(encode_event_log([EVENTS[0]], BANKS))
    # Rewrite the event's sha256 digest header into a second sha1 one of the same size
    # is impossible (sizes differ), so declare sha256 twice in the Spec ID event instead.
    at = log.index(struct.pack("<HH", 0x0004, 20))
    log[at : at + 4] = struct.pack("<HH", 0x000B, 32)
    _bad(bytes(log))


def test_pcr_index_out_of_range_is_refused() -> None:
    _bad(encode_event_log([_event(24, b"x")], BANKS))


def test_oversized_event_size_is_refused_without_allocation() -> None:
    log = encode_event_log([_event(0, b"x")], BANKS)
    _bad(log[:-5] + struct.pack("<I", 0xFFFFFFFF) + b"x")


def test_too_large_and_too_many() -> None:
    _bad(b"\0" * (MAX_LOG_BYTES + 1))
    many = encode_event_log([_event(1, b"")] * (MAX_EVENTS + 1), BANKS)
    _bad(many)


def test_replay_of_a_missing_bank_is_refused() -> None:
    only256 = Event(pcr=0, event_type=1, digests={"sha256": bytes(32)}, data=b"")
    events = parse_event_log(encode_event_log([only256], ["sha256"]))
    with pytest.raises(AttestationEvidenceError):
        replay(events, "sha1")
    with pytest.raises(ValueError):
        replay(events, "md5")


# ---- positive -------------------------------------------------------------------


def test_parse_and_replay() -> None:
    events = parse_event_log(LOG)
    assert events[0].event_type == EV_NO_ACTION and events[0].data.startswith(b"Spec ID Event03")
    assert events[1:] == EVENTS
    for bank, h in (("sha256", hashlib.sha256), ("sha1", hashlib.sha1)):
        pcrs = replay(events, bank)
        assert set(pcrs) == {0, 7}
        assert pcrs[0] == _extend([b"bios", b"option rom", b"\0\0\0\0"], h)
        assert pcrs[7] == _extend([b"secure boot on", b"\0\0\0\0"], h)


def test_startup_locality_sets_pcr0_initial_value() -> None:
    locality = Event(pcr=0, event_type=EV_NO_ACTION,
                     digests={"sha1": bytes(20), "sha256": bytes(32)},
                     data=b"StartupLocality\0\x03")  # fmt: skip
    events = parse_event_log(encode_event_log([locality, _event(0, b"bios")], BANKS))
    start = bytes(31) + b"\x03"
    assert (
        replay(events, "sha256")[0]
        == hashlib.sha256(start + hashlib.sha256(b"bios").digest()).digest()
    )


def test_vendor_info_and_unknown_event_types_pass() -> None:
    events = parse_event_log(encode_event_log([_event(5, b"x", 0x800000E0)], BANKS, b"vendor"))
    assert events[1].event_type == 0x800000E0
    assert replay(events, "sha256")[5] == _extend([b"x"])
