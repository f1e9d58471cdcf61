"""PCR selections, the server half's settings, and the PCR policy that gates issuance.

A *PCR selection* is written as tpm2-tools writes it: ``sha256:0,1,2,3,7``, several
banks joined by ``+`` (``sha1:0+sha256:0,7``).  Its canonical form (what the server
sends and the quote must carry) keeps the banks in the order written and the indices
ascending, without repeats: that is the order in which the TPM hashes the PCR values
into the quote's digest.

The *PCR policy* is a list of groups.  A group names the nodes it applies to with
``match`` (``tpm:`` selectors, all of which a node must have; an empty ``match`` is
every node) and what those nodes must show: allowed values per PCR (``pcrs``) and
measured-boot events that must be in the node's event log (``events``, by PCR, event
type and digest).  A node must satisfy every group it matches; a node no group
matches is not constrained.  See docs/attestors.md, "tpm", and decision 0069.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custos.errors import CustosError

#: The PCR banks custos quotes, with their digest sizes.
DIGEST_SIZES: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
#: PCRs 0-23 (the PC Client platform's 24).
PCR_COUNT = 24

#: TCG PC Client event types a policy may name (an integer works for any other).
EVENT_TYPES: dict[str, int] = {
    "EV_PREBOOT_CERT": 0x0,
    "EV_POST_CODE": 0x1,
    "EV_NO_ACTION": 0x3,
    "EV_SEPARATOR": 0x4,
    "EV_ACTION": 0x5,
    "EV_EVENT_TAG": 0x6,
    "EV_S_CRTM_CONTENTS": 0x7,
    "EV_S_CRTM_VERSION": 0x8,
    "EV_CPU_MICROCODE": 0x9,
    "EV_PLATFORM_CONFIG_FLAGS": 0xA,
    "EV_TABLE_OF_DEVICES": 0xB,
    "EV_COMPACT_HASH": 0xC,
    "EV_IPL": 0xD,
    "EV_IPL_PARTITION_DATA": 0xE,
    "EV_NONHOST_CODE": 0xF,
    "EV_NONHOST_CONFIG": 0x10,
    "EV_NONHOST_INFO": 0x11,
    "EV_OMIT_BOOT_DEVICE_EVENTS": 0x12,
    "EV_EFI_VARIABLE_DRIVER_CONFIG": 0x80000001,
    "EV_EFI_VARIABLE_BOOT": 0x80000002,
    "EV_EFI_BOOT_SERVICES_APPLICATION": 0x80000003,
    "EV_EFI_BOOT_SERVICES_DRIVER": 0x80000004,
    "EV_EFI_RUNTIME_SERVICES_DRIVER": 0x80000005,
    "EV_EFI_GPT_EVENT": 0x80000006,
    "EV_EFI_ACTION": 0x80000007,
    "EV_EFI_PLATFORM_FIRMWARE_BLOB": 0x80000008,
    "EV_EFI_HANDOFF_TABLES": 0x80000009,
    "EV_EFI_PLATFORM_FIRMWARE_BLOB2": 0x8000000A,
    "EV_EFI_HANDOFF_TABLES2": 0x8000000B,
    "EV_EFI_VARIABLE_BOOT2": 0x8000000C,
    "EV_EFI_HCRTM_EVENT": 0x80000010,
    "EV_EFI_VARIABLE_AUTHORITY": 0x800000E0,
    "EV_EFI_SPDM_FIRMWARE_BLOB": 0x800000E1,
    "EV_EFI_SPDM_FIRMWARE_CONFIG": 0x800000E2,
}

#: Bounds on what a configuration may hold (far above any real policy).
MAX_GROUPS = 256
MAX_VALUES_PER_PCR = 1024
MAX_EVENTS_PER_GROUP = 1024
MAX_MATCH_SELECTORS = 64
MAX_ALLOWLIST = 100_000
MAX_FILE_BYTES = 8 * 1024 * 1024
#: The challenge's lifetime: at least a second, at most an hour.
MAX_CHALLENGE_TTL = 3600.0

_HASH = re.compile(r"[0-9a-f]{64}")
_INDEX = re.compile(r"0|[1-9][0-9]?")


class PolicyConfigError(CustosError, ValueError):
    """The ``tpm`` attestor's settings (or a PCR selection) are invalid."""

    code = "tpm_attestor_config"


# ---- PCR selections ----------------------------------------------------------


@dataclass(frozen=True)
class PcrSelection:
    """Banks in the order given, each with its PCR indices ascending."""

    banks: tuple[tuple[str, tuple[int, ...]], ...]

    def __str__(self) -> str:
        return "+".join(f"{bank}:{','.join(map(str, idx))}" for bank, idx in self.banks)

    def keys(self) -> list[tuple[str, int]]:
        """Every (bank, index) in the order the TPM hashes them into a quote."""
        return [(bank, i) for bank, idx in self.banks for i in idx]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


def _index(text: str) -> int:
    if not _INDEX.fullmatch(text) or int(text) >= PCR_COUNT:
        raise PolicyConfigError(f"a PCR index is 0 to {PCR_COUNT - 1}")
    return int(text)


def _bank(text: str) -> str:
    if text not in DIGEST_SIZES:
        raise PolicyConfigError(f"a PCR bank is one of {', '.join(DIGEST_SIZES)}")
    return text


def parse_pcr_selection(text: object) -> PcrSelection:
    """``"sha256:0,1,7"`` (or ``"sha1:0+sha256:0,7"``) -> :class:`PcrSelection`."""
    if not isinstance(text, str) or not 0 < len(text) <= 512:
        raise PolicyConfigError("a PCR selection is a string such as 'sha256:0,1,2,3,7'")
    banks: list[tuple[str, tuple[int, ...]]] = []
    for part in text.split("+"):
        bank, sep, indices = part.partition(":")
        if not sep or not indices:
            raise PolicyConfigError("a PCR selection is '<bank>:<index>,<index>...' per bank")
        bank = _bank(bank)
        if any(bank == b for b, _ in banks):
            raise PolicyConfigError("a PCR selection names a bank twice")
        banks.append((bank, tuple(sorted({_index(i) for i in indices.split(",")}))))
    return PcrSelection(tuple(banks))


def parse_pcr_key(text: object) -> tuple[str, int]:
    """``"sha256:7"`` -> ``("sha256", 7)``."""
    if not isinstance(text, str) or len(text) > 16:
        raise PolicyConfigError("a PCR is named '<bank>:<index>', e.g. 'sha256:7'")
    bank, sep, index = text.partition(":")
    if not sep:
        raise PolicyConfigError("a PCR is named '<bank>:<index>', e.g. 'sha256:7'")
    return _bank(bank), _index(index)


def _digest(value: object, bank: str, what: str) -> bytes:
    size = DIGEST_SIZES[bank]
    if not isinstance(value, str):
        raise PolicyConfigError(f"{what} must be a hex string")
    text = value.strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    if len(text) != 2 * size or not re.fullmatch(r"[0-9a-f]*", text):
        raise PolicyConfigError(f"{what} must be {size} bytes ({bank}) in hex")
    return bytes.fromhex(text)


# ---- the policy --------------------------------------------------------------


@dataclass(frozen=True)
class EventRule:
    """An event the node's (replayed, PCR-verified) event log must hold."""

    pcr: int
    event_type: int
    bank: str
    digest: bytes

    def __str__(self) -> str:
        return f"pcr {self.pcr} type {self.event_type:#x} {self.bank}:{self.digest.hex()}"


@dataclass(frozen=True)
class PolicyGroup:
    name: str
    #: ``tpm:`` selector values (without the type) a node must all have.
    match: frozenset[str]
    #: (bank, index) -> the values allowed.
    pcrs: Mapping[tuple[str, int], frozenset[bytes]]
    events: tuple[EventRule, ...]

    def applies_to(self, selectors: Iterable[str]) -> bool:
        return self.match <= set(selectors)


def violations(
    groups: Sequence[PolicyGroup],
    selectors: Iterable[str],
    pcr_values: Mapping[tuple[str, int], bytes],
    events: Sequence[Any] | None,
) -> list[str]:
    """Why this node is outside the policy (empty: inside).

    ``selectors`` are the node's ``tpm`` selector values; ``events`` the event log's
    events (objects with ``pcr``, ``event_type`` and ``digests``), already replayed
    against the quoted PCRs, or None when the node sent no log.
    """
    node = set(selectors)
    out: list[str] = []
    for group in groups:
        if not group.applies_to(node):
            continue
        for (bank, index), allowed in group.pcrs.items():
            value = pcr_values.get((bank, index))
            if value is None:
                out.append(f"group {group.name}: PCR {bank}:{index} was not quoted")
            elif value not in allowed:
                out.append(f"group {group.name}: PCR {bank}:{index} = {value.hex()} is not allowed")
        for rule in group.events:
            if events is None:
                out.append(f"group {group.name}: needs event ({rule}) but the node sent no log")
            elif not any(
                e.pcr == rule.pcr
                and e.event_type == rule.event_type
                and e.digests.get(rule.bank) == rule.digest
                for e in events
            ):
                out.append(f"group {group.name}: the event log lacks the event ({rule})")
    return out


# ---- settings ----------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    """The server half's settings, checked (the datastore is handled by the plugin)."""

    ek_ca_bundle: tuple[Any, ...]  # x509.Certificate
    ek_allowlist: frozenset[str]
    pcrs: PcrSelection
    challenge_ttl: float
    pcr_policy: tuple[PolicyGroup, ...]
    require_event_log: bool


SERVER_KEYS = frozenset(
    {
        "ek_ca_bundle",
        "ek_allowlist",
        "ek_allowlist_file",
        "pcrs",
        "challenge_ttl",
        "pcr_policy",
        "require_event_log",
    }
)
DEFAULT_PCRS = "sha256:0,1,2,3,7"
DEFAULT_CHALLENGE_TTL = "60s"


def _read(path: object, what: str) -> bytes:
    if not isinstance(path, str) or not path or "\0" in path or not os.path.isabs(path):
        raise PolicyConfigError(f"{what} must be an absolute file path")
    from custos._files import UnreadableFileError, read_small_file

    # A regular file only: a FIFO would block the server's start in open(), a device
    # would be read up to the cap.
    try:
        return read_small_file(path, max_bytes=MAX_FILE_BYTES, what=what)
    except UnreadableFileError as e:
        raise PolicyConfigError(f"{what}: {e.message}") from None


def load_ca_bundle(paths: object) -> tuple[Any, ...]:
    """Certificates from PEM files (any number each) or DER files (one each)."""
    from cryptography import x509

    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise PolicyConfigError("ek_ca_bundle must be a list of file paths")
    certs: list[Any] = []
    for path in paths:
        data = _read(path, "ek_ca_bundle")
        try:
            found = (
                x509.load_pem_x509_certificates(data)
                if b"-----BEGIN" in data
                else [x509.load_der_x509_certificate(data)]
            )
        except ValueError:
            raise PolicyConfigError(
                f"ek_ca_bundle: {Path(path).name} holds no PEM or DER certificate"
            ) from None
        certs.extend(found)
    return tuple(certs)


def _ek_hash(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HASH.fullmatch(value.strip().lower()):
        raise PolicyConfigError(f"{what}: an EK hash is 64 hex digits (SHA-256)")
    return value.strip().lower()


def load_allowlist(values: object, file: object) -> frozenset[str]:
    """EK hashes from ``ek_allowlist`` and ``ek_allowlist_file`` (one per line; blank
    lines and ``#`` comments ignored)."""
    out: set[str] = set()
    if values is not None:
        if not isinstance(values, list):
            raise PolicyConfigError("ek_allowlist must be a list of EK hashes")
        out.update(_ek_hash(v, "ek_allowlist") for v in values)
    if file is not None:
        text = _read(file, "ek_allowlist_file").decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                out.add(_ek_hash(line, f"ek_allowlist_file line {number}"))
    if len(out) > MAX_ALLOWLIST:
        raise PolicyConfigError(f"the EK allowlist has more than {MAX_ALLOWLIST} entries")
    return frozenset(out)


def _event_type(value: object, what: str) -> int:
    if isinstance(value, str):
        if value in EVENT_TYPES:
            return EVENT_TYPES[value]
        try:
            value = int(value, 0)
        except ValueError:
            raise PolicyConfigError(f"{what}: an event type is an EV_ name or an integer") from None
    if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
        raise PolicyConfigError(f"{what}: an event type is an EV_ name or a 32-bit integer")
    return value


def _group(number: int, table: object, pcrs: PcrSelection) -> PolicyGroup:
    where = f"pcr_policy[{number}]"
    if not isinstance(table, Mapping):
        raise PolicyConfigError(f"{where} must be a table")
    unknown = set(table) - {"name", "match", "pcrs", "events"}
    if unknown:
        raise PolicyConfigError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    name = table.get("name", str(number))
    if not isinstance(name, str) or not 0 < len(name) <= 128 or not name.isprintable():
        raise PolicyConfigError(f"{where}.name must be a short printable string")
    match = table.get("match", [])
    if not isinstance(match, list) or len(match) > MAX_MATCH_SELECTORS:
        raise PolicyConfigError(f"{where}.match must be a list of 'tpm:...' selectors")
    values: set[str] = set()
    for selector in match:
        if not isinstance(selector, str) or not selector.startswith("tpm:") or len(selector) < 5:
            raise PolicyConfigError(f"{where}.match: each selector is 'tpm:<value>'")
        if not selector.isprintable():
            raise PolicyConfigError(f"{where}.match: a selector holds control characters")
        values.add(selector[4:])
    raw_pcrs = table.get("pcrs", {})
    if not isinstance(raw_pcrs, Mapping):
        raise PolicyConfigError(f'{where}.pcrs must be a table {{"sha256:7" = ["<hex>", ...]}}')
    allowed: dict[tuple[str, int], frozenset[bytes]] = {}
    for key, hexes in raw_pcrs.items():
        bank, index = parse_pcr_key(key)
        if (bank, index) not in pcrs:
            raise PolicyConfigError(f"{where}.pcrs names {bank}:{index}, which pcrs does not quote")
        if not isinstance(hexes, list) or not 0 < len(hexes) <= MAX_VALUES_PER_PCR:
            raise PolicyConfigError(f"{where}.pcrs.{bank}:{index} must be a list of hex values")
        allowed[(bank, index)] = frozenset(
            _digest(h, bank, f"{where}.pcrs.{bank}:{index}") for h in hexes
        )
    raw_events = table.get("events", [])
    if not isinstance(raw_events, list) or len(raw_events) > MAX_EVENTS_PER_GROUP:
        raise PolicyConfigError(f"{where}.events must be a list of {{pcr, type, digest}} tables")
    events: list[EventRule] = []
    for i, event in enumerate(raw_events):
        at = f"{where}.events[{i}]"
        if not isinstance(event, Mapping) or not {"pcr", "type", "digest"} <= set(event):
            raise PolicyConfigError(f"{at} must be a table with pcr, type and digest")
        if set(event) - {"pcr", "type", "digest", "bank"}:
            raise PolicyConfigError(f"{at}: only pcr, type, digest and bank")
        bank = event.get("bank", "sha256")
        if not isinstance(bank, str):
            raise PolicyConfigError(f"{at}.bank must be a bank name")
        bank = _bank(bank)
        pcr = event["pcr"]
        if type(pcr) is not int or not 0 <= pcr < PCR_COUNT:
            raise PolicyConfigError(f"{at}.pcr must be 0 to {PCR_COUNT - 1}")
        if (bank, pcr) not in pcrs:
            # Only a quoted PCR verifies the log's events for it.
            raise PolicyConfigError(f"{at} names {bank}:{pcr}, which pcrs does not quote")
        events.append(
            EventRule(pcr, _event_type(event["type"], at), bank, _digest(event["digest"], bank, at))
        )
    if not allowed and not events:
        raise PolicyConfigError(f"{where} gates nothing: give it pcrs or events")
    return PolicyGroup(name, frozenset(values), allowed, tuple(events))


def parse_server_settings(config: Mapping[str, object]) -> ServerSettings:
    """Check the server half's table (without ``datastore``); raise
    :class:`PolicyConfigError` on the first mistake."""
    from custos.server.config import parse_duration

    unknown = set(config) - SERVER_KEYS
    if unknown:
        raise PolicyConfigError(f"unknown tpm settings: {', '.join(sorted(map(str, unknown)))}")
    bundle = load_ca_bundle(config.get("ek_ca_bundle", []))
    allowlist = load_allowlist(config.get("ek_allowlist"), config.get("ek_allowlist_file"))
    if not bundle and not allowlist:
        raise PolicyConfigError(
            "tpm trusts no EK: give ek_ca_bundle (manufacturer CA certificates) "
            "and/or ek_allowlist / ek_allowlist_file (EK hashes)"
        )
    pcrs = parse_pcr_selection(config.get("pcrs", DEFAULT_PCRS))
    try:
        ttl = parse_duration(
            config.get("challenge_ttl", DEFAULT_CHALLENGE_TTL),
            name="challenge_ttl",
            maximum=MAX_CHALLENGE_TTL,
        ).total_seconds()
    except CustosError as e:
        raise PolicyConfigError(f"challenge_ttl: {e.message}") from None
    raw_policy = config.get("pcr_policy", [])
    if not isinstance(raw_policy, list) or len(raw_policy) > MAX_GROUPS:
        raise PolicyConfigError(f"pcr_policy must be a list of at most {MAX_GROUPS} tables")
    groups = tuple(_group(i, g, pcrs) for i, g in enumerate(raw_policy))
    if len({g.name for g in groups}) != len(groups):
        raise PolicyConfigError("two pcr_policy groups have the same name")
    require_log = config.get("require_event_log", False)
    if not isinstance(require_log, bool):
        raise PolicyConfigError("require_event_log must be true or false")
    return ServerSettings(bundle, allowlist, pcrs, ttl, groups, require_log)


__all__ = [
    "DEFAULT_PCRS",
    "DIGEST_SIZES",
    "EVENT_TYPES",
    "EventRule",
    "PcrSelection",
    "PolicyConfigError",
    "PolicyGroup",
    "ServerSettings",
    "load_allowlist",
    "load_ca_bundle",
    "parse_pcr_key",
    "parse_pcr_selection",
    "parse_server_settings",
    "violations",
]
