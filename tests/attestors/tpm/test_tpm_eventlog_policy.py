"""Measured-boot event logs in tpm attestation: replayed against the quoted PCRs, and
named by the PCR policy (by PCR, event type and digest).  swtpm has no event log, so the
logs are built by hand and their events extended into a TPM of the test's own."""

from __future__ import annotations

import hashlib
import struct

from tpm_attestor_rig import Rig, extend

# A TCG2 crypto-agile event log, built by hand (a swtpm has none).
_EV_NO_ACTION, _EV_SEPARATOR, _EV_IPL = 0x3, 0x4, 0xD
_ALGS = {"sha1": (0x0004, 20), "sha256": (0x000B, 32)}


def _spec_id_event() -> bytes:
    body = b"Spec ID Event03\0" + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
    body += struct.pack("<I", len(_ALGS))
    for alg, size in _ALGS.values():
        body += struct.pack("<HH", alg, size)
    body += b"\0"  # vendorInfoSize
    # TCG_PCClientPCREvent (SHA1 format): pcr, type, 20-byte digest, size, data.
    return struct.pack("<II", 0, _EV_NO_ACTION) + b"\0" * 20 + struct.pack("<I", len(body)) + body


def _event(pcr: int, event_type: int, data: bytes) -> bytes:
    out = struct.pack("<III", pcr, event_type, len(_ALGS))
    for name, (alg, _) in _ALGS.items():
        out += struct.pack("<H", alg) + hashlib.new(name, data).digest()
    return out + struct.pack("<I", len(data)) + data


def build_log(events: list[tuple[int, int, bytes]]) -> bytes:
    return _spec_id_event() + b"".join(_event(*e) for e in events)


def test_an_event_log_is_replayed_against_the_quote_and_gates_by_event(own_rig: Rig) -> None:
    rig = own_rig
    measured = [(7, _EV_IPL, b"shim 15.8"), (7, _EV_SEPARATOR, b"\0\0\0\0")]
    for pcr, _, data in measured:
        extend(rig.tpm, pcr, data)
    log_file = rig.tmp / "binary_bios_measurements"
    log_file.write_bytes(build_log(measured))
    rig.agent_settings["event_log_file"] = str(log_file)
    rig.server_settings.update(
        require_event_log=True,
        pcr_policy=[
            {
                "name": "shim",
                "events": [
                    {"pcr": 7, "type": "EV_IPL", "digest": hashlib.sha256(b"shim 15.8").hexdigest()}
                ],
            }
        ],
    )
    assert rig.attest().agent_id
    # A log that does not replay to the quoted PCR 7 is refused.
    log_file.write_bytes(build_log(measured[:1]))
    assert rig.refused().code == "event_log_mismatch"
    # A log that replays but lacks the event the policy names: outside the policy.
    other = [(7, _EV_IPL, b"grub 2.12"), (7, _EV_SEPARATOR, b"\0\0\0\0")]
    log_file.write_bytes(build_log(measured + other))
    for pcr, _, data in other:
        extend(rig.tpm, pcr, data)
    assert rig.attest().agent_id  # shim is still in the log
    rig.server_settings["pcr_policy"][0]["events"][0]["digest"] = hashlib.sha256(  # type: ignore[index]
        b"shim 16.0"
    ).hexdigest()
    assert rig.refused().code == "pcr_policy"
    # No log at all while one is required.
    rig.agent_settings.pop("event_log_file")
    assert rig.refused().code == "event_log_missing"


def test_a_firmware_sized_event_log_fits_compressed(own_rig: Rig) -> None:
    """Real logs are 10-100 KiB, above the 64 KiB message bound raw: compressed they fit,
    and the server still replays every event against the quote."""
    from custos_attestors.node.tpm import wire

    rig = own_rig
    measured = [
        (7, 0x80000001, b"SecureBoot db dbx KEK PK variable data " * 20 + bytes([i % 256]))
        for i in range(120)
    ]
    for pcr, _, data in measured:
        extend(rig.tpm, pcr, data)
    log = build_log(measured)
    assert len(log) > 96 * 1024
    log_file = rig.tmp / "binary_bios_measurements"
    log_file.write_bytes(log)
    rig.agent_settings["event_log_file"] = str(log_file)
    rig.server_settings["require_event_log"] = True
    assert rig.attest().agent_id
    assert len(rig.answers[-1]) < 64 * 1024
    assert wire.decode_answer(rig.answers[-1]).event_log == log
    # One event short: the replay no longer gives the quoted PCR 7.
    log_file.write_bytes(build_log(measured[:-1]))
    assert rig.refused().code == "event_log_mismatch"
