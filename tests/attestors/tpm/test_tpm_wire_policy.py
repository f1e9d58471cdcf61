"""The tpm attestor's wire format and settings: strict, bounded, never echoing input.

No TPM here: these are the pure parts (the flow against swtpm is in test_tpm_attestor.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custos_attestors.node.tpm import wire
from custos_attestors.node.tpm.policy import (
    EventRule,
    PolicyConfigError,
    PolicyGroup,
    parse_pcr_selection,
    parse_server_settings,
    violations,
)

HASH = "ab" * 32


def payload(**over: object) -> wire.Payload:
    fields: dict[str, object] = {
        "ek_profile": "rsa2048",
        "ek_public": b"\x01" * 300,
        "ak_public": b"\x02" * 90,
        "ek_cert": b"\x30" * 900,
        "ek_intermediates": (b"\x30" * 10,),
    }
    fields.update(over)
    return wire.Payload(**fields)  # type: ignore[arg-type]


def test_every_message_round_trips() -> None:
    p = payload()
    assert wire.decode_payload(p.encode()) == p
    assert wire.decode_payload(payload(ek_cert=None, ek_intermediates=()).encode()).ek_cert is None
    sel = parse_pcr_selection("sha256:7,0,1")
    c = wire.ChallengeMessage(b"n" * 32, sel, b"b" * 70, b"s" * 258)
    assert wire.decode_challenge(c.encode()) == c
    assert wire.decode_challenge(wire.ChallengeMessage(b"n" * 32, sel).encode()).activation is False
    a = wire.Answer(b"a" * 150, b"s" * 72, {("sha256", 0): b"\0" * 32}, b"k" * 32, b"log")
    assert wire.decode_answer(a.encode()) == a


def _mutate(data: bytes, **changes: object) -> bytes:
    message = json.loads(data)
    for key, value in changes.items():
        if value is ...:
            del message[key]
        else:
            message[key] = value
    return json.dumps(message).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"v": True},
        {"v": "1"},
        {"extra": 1},
        {"ak_public": ...},
        {"ek_profile": "rsa1024"},
        {"ek_public": "AAA="},  # padded
        {"ek_public": "AA+/"},  # not the url alphabet
        {"ek_public": "A"},  # impossible length
        {"ek_public": "AB"},  # non-canonical trailing bits
        {"ek_public": ""},  # empty
        {"ek_public": "A" * 2000},  # over MAX_PUBLIC_BYTES
        {"ek_intermediates": ["AAAA"] * 5},
        {"ek_intermediates": "AAAA"},
        {"ek_cert": None},
    ],
)
def test_a_malformed_payload_is_refused_without_echoing_it(changes: dict[str, object]) -> None:
    data = _mutate(payload().encode(), **changes)
    with pytest.raises(wire.TpmEvidenceError) as info:
        wire.decode_payload(data)
    assert info.value.code == "tpm_evidence_invalid"
    for value in changes.values():
        if isinstance(value, str) and len(value) > 3:
            assert value not in str(info.value)


def test_duplicate_keys_non_json_and_oversized_messages_are_refused() -> None:
    good = payload().encode()
    dup = good[:-1] + b',"ek_profile":"ecc-p256"}'
    for bad in (dup, b"\xff", b"[]", b"{" * 100_000, b" " * (wire.MAX_MESSAGE_BYTES + 1), "str"):
        with pytest.raises(wire.TpmEvidenceError):
            wire.decode_payload(bad)


@pytest.mark.parametrize(
    "changes",
    [
        {"nonce": wire.b64url(b"n" * 31)},
        {"nonce": wire.b64url(b"n" * 33)},
        {"pcrs": "sha256:24"},
        {"pcrs": "md5:0"},
        {"pcrs": 7},
        {"credential_blob": wire.b64url(b"b" * 70)},  # without secret
    ],
)
def test_a_malformed_challenge_is_refused(changes: dict[str, object]) -> None:
    data = _mutate(
        wire.ChallengeMessage(b"n" * 32, parse_pcr_selection("sha256:0")).encode(), **changes
    )
    with pytest.raises(wire.TpmEvidenceError):
        wire.decode_challenge(data)


@pytest.mark.parametrize(
    "values",
    [
        {"sha256:0": "00" * 31},
        {"sha256:0": "AB" * 32},  # upper case
        {"sha1:0": "00" * 32},  # sha1 is 20 bytes
        {"sha256:24": "00" * 32},
        {"sha256:00": "00" * 32},
        {"sha256": "00" * 32},
        {"sha256:0": 0},
        [],
    ],
)
def test_malformed_pcr_values_are_refused(values: object) -> None:
    data = _mutate(wire.Answer(b"a", b"s").encode(), pcr_values=values)
    with pytest.raises(wire.TpmEvidenceError):
        wire.decode_answer(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzzed_bytes_are_refused_cleanly(data: bytes) -> None:
    for decode in (wire.decode_payload, wire.decode_challenge, wire.decode_answer):
        with pytest.raises(wire.TpmEvidenceError):
            decode(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "ek_profile",
                "ek_public",
                "ak_public",
                "ek_cert",
                "ek_intermediates",
                "nonce",
                "pcrs",
                "quote_attest",
                "quote_signature",
                "pcr_values",
                "event_log",
                "x",
            ]
        ),
        json_values,
    )
)
def test_fuzzed_json_objects_never_crash_a_decoder(message: dict[str, object]) -> None:
    data = json.dumps(message).encode()
    for decode in (wire.decode_payload, wire.decode_challenge, wire.decode_answer):
        try:
            decode(data)
        except wire.TpmEvidenceError:
            pass


# ---- PCR selections and settings -----------------------------------------------


def test_pcr_selections_are_canonical() -> None:
    assert str(parse_pcr_selection("sha256:7,0,1,1")) == "sha256:0,1,7"
    assert str(parse_pcr_selection("sha1:3+sha256:7,0")) == "sha1:3+sha256:0,7"
    assert parse_pcr_selection("sha256:0,7").keys() == [("sha256", 0), ("sha256", 7)]
    for bad in ("", "sha256", "sha256:", "sha256:0+sha256:1", "sha256:-1", "sha256:1,,2", "x:1"):
        with pytest.raises(PolicyConfigError):
            parse_pcr_selection(bad)


def test_settings_need_a_way_to_trust_an_ek(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match="trusts no EK"):
        parse_server_settings({})
    s = parse_server_settings({"ek_allowlist": [HASH.upper()]})
    assert s.ek_allowlist == {HASH}
    assert str(s.pcrs) == "sha256:0,1,2,3,7"
    assert s.challenge_ttl == 60.0
    assert s.require_event_log is False
    listed = tmp_path / "allow"
    listed.write_text(f"# EKs of rack 4\n{'cd' * 32}  # node-1\n\n")
    s = parse_server_settings({"ek_allowlist": [HASH], "ek_allowlist_file": str(listed)})
    assert s.ek_allowlist == {HASH, "cd" * 32}


@pytest.mark.parametrize(
    "config",
    [
        {"ek_allowlist": ["nothex"]},
        {"ek_allowlist": HASH},
        {"ek_allowlist_file": "/nonexistent/allow"},
        {"ek_ca_bundle": ["/nonexistent/ca.pem"]},
        {"ek_ca_bundle": ["relative/ca.pem"]},
        {"ek_allowlist_file": "allow.txt"},
        {"ek_allowlist": [HASH], "unknown": 1},
        {"ek_allowlist": [HASH], "challenge_ttl": "0s"},
        {"ek_allowlist": [HASH], "challenge_ttl": "2h"},
        {"ek_allowlist": [HASH], "require_event_log": "yes"},
        {"ek_allowlist": [HASH], "pcr_policy": [{"match": ["unix:uid:0"], "pcrs": {}}]},
        {"ek_allowlist": [HASH], "pcr_policy": [{"pcrs": {"sha256:8": ["00" * 32]}}]},
        {"ek_allowlist": [HASH], "pcr_policy": [{"pcrs": {"sha256:7": ["00" * 20]}}]},
        {"ek_allowlist": [HASH], "pcr_policy": [{"pcrs": {"sha256:7": []}}]},
        {"ek_allowlist": [HASH], "pcr_policy": [{}]},
        {
            "ek_allowlist": [HASH],
            "pcr_policy": [{"events": [{"pcr": 9, "type": 4, "digest": HASH}]}],
        },
        {
            "ek_allowlist": [HASH],
            "pcr_policy": [{"events": [{"pcr": 7, "type": "EV_NOPE", "digest": HASH}]}],
        },
        {"ek_allowlist": [HASH], "pcr_policy": [{"events": [{"pcr": 7, "type": 4}]}]},
        {"ek_allowlist": [HASH], "pcr_policy": [{"name": "a", "pcrs": {"sha256:7": [HASH]}}] * 2},
    ],
)
def test_invalid_settings_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(PolicyConfigError) as info:
        parse_server_settings(config)
    assert info.value.code == "tpm_attestor_config"


def test_a_policy_applies_to_the_groups_a_node_matches() -> None:
    s = parse_server_settings(
        {
            "ek_allowlist": [HASH],
            "pcr_policy": [
                {"name": "all", "pcrs": {"sha256:0": ["00" * 32]}},
                {
                    "name": "rack4",
                    "match": [f"tpm:ek_pubhash:{HASH}"],
                    "pcrs": {"sha256:7": ["11" * 32, "0x" + "22" * 32]},
                    "events": [{"pcr": 7, "type": "EV_SEPARATOR", "digest": "33" * 32}],
                },
            ],
        }
    )
    _all, rack4 = s.pcr_policy
    assert isinstance(rack4, PolicyGroup) and rack4.match == {f"ek_pubhash:{HASH}"}
    assert rack4.events == (EventRule(7, 4, "sha256", b"\x33" * 32),)
    values = {("sha256", 0): b"\0" * 32, ("sha256", 7): b"\x22" * 32}

    class Ev:
        def __init__(self, pcr: int, event_type: int, digest: bytes) -> None:
            self.pcr, self.event_type, self.digests = pcr, event_type, {"sha256": digest}

    # Another node: only the "all" group applies.
    assert violations(s.pcr_policy, ["ek_pubhash:" + "cd" * 32], values, None) == []
    assert violations(s.pcr_policy, ["x"], {("sha256", 0): b"\1" * 32}, None)
    mine = [f"ek_pubhash:{HASH}"]
    assert violations(s.pcr_policy, mine, values, [Ev(7, 4, b"\x33" * 32)]) == []
    [why] = violations(s.pcr_policy, mine, values, None)
    assert "no log" in why
    [why] = violations(s.pcr_policy, mine, values, [Ev(7, 5, b"\x33" * 32)])
    assert "lacks" in why
    [why] = violations(
        s.pcr_policy, mine, {**values, ("sha256", 7): b"\x44" * 32}, [Ev(7, 4, b"\x33" * 32)]
    )
    assert "sha256:7" in why and "not allowed" in why


def test_the_event_log_travels_compressed_and_inflates_within_bounds() -> None:
    import zlib

    log = b"EV_EFI_VARIABLE_BOOT BootOrder " * 4000  # 124 KiB raw, a few hundred compressed
    answer = wire.Answer(b"a", b"s", event_log=log)
    data = answer.encode()
    assert len(data) < 4096
    assert wire.decode_answer(data).event_log == log

    def with_log(raw: bytes) -> bytes:
        return _mutate(wire.Answer(b"a", b"s").encode(), event_log=wire.b64url(raw))

    bomb = zlib.compress(b"\0" * (wire.MAX_EVENT_LOG_BYTES + 1), 9)
    stream = zlib.compress(b"a log", 9)
    for bad in (
        bomb,  # inflates past the bound
        b"not zlib at all",
        stream[:-3],  # truncated
        stream + b"trailing",
        zlib.compress(b"", 9),  # an empty log
    ):
        with pytest.raises(wire.TpmEvidenceError):
            wire.decode_answer(with_log(bad))
