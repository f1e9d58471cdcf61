"""Measured-boot event logs: the TCG2 crypto-agile binary format, parsed and replayed.

What firmware leaves in ``/sys/kernel/security/tpm0/binary_bios_measurements``
(TCG PC Client Platform Firmware Profile, section 10): a first event in the old
SHA-1 format (``TCG_PCClientPCREvent``) whose data is the ``Spec ID Event03``
naming the digest algorithms and their sizes, then ``TCG_PCR_EVENT2`` records,
each with one digest per algorithm.  Integers are little-endian.

The log is not signed: it means something only when :func:`replay` of it gives the
PCR values a verified quote reported (the server compares them).  So the parser is
about not being hurt by a hostile log: sizes are checked before every read, the
counts and lengths are bounded (:data:`MAX_LOG_BYTES`, :data:`MAX_EVENTS`), every
event must carry exactly the algorithms the Spec ID event declared, PCR indices
are 0-23, and nothing may follow the last event.  Every failure is
:class:`~custos.tpm.verify.AttestationEvidenceError` with code ``bad_event_log``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from custos.tpm.verify import AttestationEvidenceError

#: Real logs are 10-100 KiB; a few MiB is more than any firmware writes.
MAX_LOG_BYTES = 4 * 1024 * 1024
#: Events in one log (real logs: tens to a few hundred).
MAX_EVENTS = 20_000
#: Digest algorithms one Spec ID event may declare.
MAX_ALGORITHMS = 8
#: PCRs a PC-client TPM has.
PCR_COUNT = 24

EV_NO_ACTION = 0x00000003
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"

#: TPM_ALG_ID -> (bank name, digest size) for the banks custos replays.
ALGORITHMS: dict[int, tuple[str, int]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
    0x0012: ("sm3_256", 32),
}
_HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384,
           "sha512": hashlib.sha512}  # fmt: skip
_ALG_IDS = {name: alg for alg, (name, _) in ALGORITHMS.items()}


@dataclass(frozen=True)
class Event:
    """One event of the log (the Spec ID event included, as the first one)."""

    pcr: int
    event_type: int
    #: Bank name ("sha256") -> digest; an algorithm custos does not know is named
    #: "alg:0x....".
    digests: dict[str, bytes] = field(default_factory=dict)
    data: bytes = b""


def _bad(message: str) -> AttestationEvidenceError:
    return AttestationEvidenceError(f"event log: {message}", code="bad_event_log")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _bad(f"truncated in {what} at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _bank(alg: int) -> str:
    known = ALGORITHMS.get(alg)
    return known[0] if known else f"alg:{alg:#06x}"


def _spec_id(data: bytes) -> list[tuple[int, int]]:
    """(algorithm id, digest size) as declared by the Spec ID event's data."""
    r = _Reader(data)
    if r.take(16, "Spec ID signature") != SPEC_ID_SIGNATURE:
        raise _bad("the first event is not the Spec ID Event03 (not a crypto-agile log)")
    r.u32("platformClass")
    r.u8("specVersionMinor")
    if r.u8("specVersionMajor") != 2:
        raise _bad("the Spec ID event is not of a TPM 2.0 log")
    r.u8("specErrata")
    r.u8("uintnSize")
    count = r.u32("numberOfAlgorithms")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise _bad(f"the Spec ID event declares {count} algorithms (1 to {MAX_ALGORITHMS})")
    algs: list[tuple[int, int]] = []
    for _ in range(count):
        alg, size = r.u16("algorithmId"), r.u16("digestSize")
        known = ALGORITHMS.get(alg)
        if known and known[1] != size:
            raise _bad(f"the Spec ID event gives {known[0]} digests {size} bytes")
        if not 1 <= size <= 64:
            raise _bad(f"the Spec ID event gives algorithm {alg:#06x} {size}-byte digests")
        if any(a == alg for a, _ in algs):
            raise _bad(f"the Spec ID event declares algorithm {alg:#06x} twice")
        algs.append((alg, size))
    r.take(r.u8("vendorInfoSize"), "vendorInfo")
    if r.left:
        raise _bad("bytes after the Spec ID event's vendor info")
    return algs


def parse_event_log(data: bytes) -> list[Event]:
    """Every event of a TCG2 crypto-agile log, the Spec ID event first."""
    if not isinstance(data, (bytes, bytearray)):
        raise _bad("expected bytes")
    if len(data) > MAX_LOG_BYTES:
        raise _bad(f"{len(data)} bytes (at most {MAX_LOG_BYTES})")
    r = _Reader(bytes(data))
    pcr, event_type = r.u32("pcrIndex"), r.u32("eventType")
    digest = r.take(20, "SHA-1 digest")
    first = r.take(r.u32("eventSize"), "Spec ID event data")
    if pcr != 0 or event_type != EV_NO_ACTION or digest != bytes(20):
        raise _bad("the first event is not an EV_NO_ACTION at PCR 0 with a zero digest")
    algs = _spec_id(first)
    events = [Event(pcr=0, event_type=EV_NO_ACTION, digests={"sha1": digest}, data=first)]
    sizes = dict(algs)
    while r.left:
        if len(events) > MAX_EVENTS:
            raise _bad(f"more than {MAX_EVENTS} events")
        pcr, event_type = r.u32("pcrIndex"), r.u32("eventType")
        if pcr >= PCR_COUNT:
            raise _bad(f"event {len(events)} is for PCR {pcr}")
        count = r.u32("digest count")
        if count != len(algs):
            raise _bad(
                f"event {len(events)} has {count} digests; the Spec ID event declares {len(algs)}"
            )
        digests: dict[str, bytes] = {}
        for _ in range(count):
            alg = r.u16("hashAlg")
            if alg not in sizes:
                raise _bad(f"event {len(events)} has a digest of undeclared algorithm {alg:#06x}")
            name = _bank(alg)
            if name in digests:
                raise _bad(f"event {len(events)} has two {name} digests")
            digests[name] = r.take(sizes[alg], "digest")
        body = r.take(r.u32("eventSize"), "event data")
        events.append(Event(pcr=pcr, event_type=event_type, digests=digests, data=body))
    return events


def replay(events: Iterable[Event], bank: str) -> dict[int, bytes]:
    """The PCR values of ``bank`` the log's events extend to, for every PCR they touch.

    PCRs start at zero, but PCR 0 at ``0...0 || locality`` when an EV_NO_ACTION
    StartupLocality event says the firmware started from locality 3 or 4.
    EV_NO_ACTION events are not extended.  An event without a ``bank`` digest is
    ``bad_event_log`` (the parser already requires every declared bank).
    """
    if bank not in _HASHES:
        raise ValueError(f"cannot replay PCR bank {bank!r}; one of {', '.join(_HASHES)}")
    h = _HASHES[bank]
    size = h().digest_size
    pcrs: dict[int, bytes] = {}
    for event in events:
        if event.event_type == EV_NO_ACTION:
            if (
                event.pcr == 0
                and event.data.startswith(STARTUP_LOCALITY_SIGNATURE)
                and len(event.data) == len(STARTUP_LOCALITY_SIGNATURE) + 1
                and 0 not in pcrs
            ):
                pcrs[0] = bytes(size - 1) + event.data[-1:]
            continue
        digest = event.digests.get(bank)
        if digest is None or len(digest) != size:
            raise _bad(f"an event for PCR {event.pcr} has no {bank} digest")
        pcrs[event.pcr] = h(pcrs.get(event.pcr, bytes(size)) + digest).digest()
    return pcrs


def encode_event_log(events: Iterable[Event], banks: list[str], vendor_info: bytes = b"") -> bytes:
    """A crypto-agile log of ``events`` (TCG_PCR_EVENT2s) with a Spec ID event for ``banks``.

    The inverse of :func:`parse_event_log` for tests and tools: the Spec ID event
    is generated, so ``events`` do not include it.
    """
    algs = [(_ALG_IDS[b], ALGORITHMS[_ALG_IDS[b]][1]) for b in banks]
    spec = (
        SPEC_ID_SIGNATURE
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
        + b"".join(struct.pack("<HH", a, s) for a, s in algs)
        + bytes([len(vendor_info)])
        + vendor_info
    )
    out = [struct.pack("<II", 0, EV_NO_ACTION), bytes(20), struct.pack("<I", len(spec)), spec]
    for e in events:
        out.append(struct.pack("<III", e.pcr, e.event_type, len(e.digests)))
        for name, digest in e.digests.items():
            out.append(struct.pack("<H", _ALG_IDS[name]) + digest)
        out.append(struct.pack("<I", len(e.data)) + e.data)
    return b"".join(out)


__all__ = [
    "ALGORITHMS",
    "EV_NO_ACTION",
    "MAX_EVENTS",
    "MAX_LOG_BYTES",
    "PCR_COUNT",
    "Event",
    "encode_event_log",
    "parse_event_log",
    "replay",
]
