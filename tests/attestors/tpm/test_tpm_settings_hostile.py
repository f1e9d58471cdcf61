"""The tpm server half's settings under hostile values: every key given every kind of
wrong value (types, bounds, paths, bad hex in the policy) is a PolicyConfigError
(``tpm_attestor_config``), never another exception."""

from __future__ import annotations

import math
from typing import Any

import pytest

from custos_attestors.node.tpm.policy import PolicyConfigError, parse_server_settings

HASH = "ab" * 32
D = "00" * 32
KEYS = ["ek_ca_bundle", "ek_allowlist", "ek_allowlist_file", "pcrs", "challenge_ttl",
        "pcr_policy", "require_event_log", "bogus"]  # fmt: skip
VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    math.nan,
    math.inf,
    10**400,
    "",
    "x",
    "/",
    "/etc",
    "/dev/null",
    "/nonexistent",
    "relative",
    "\0",
    "1s",
    "0s",
    "-1s",
    "9999999999s",
    "1e3s",
    "sha256:0",
    "sha256:all",
    "sha256:24",
    HASH,
    "nan",
    [],
    [1],
    ["/etc"],
    ["/dev/null"],
    [["/etc"]],
    ["AB" * 32],
    [" " + HASH],
    ["zz" * 32],
    [HASH + "00"],
    {},
    {"a": 1},
    [[]],
    [{}],
    [{"pcrs": {}}],
    [{"pcrs": {"sha256:7": ["zz" * 32]}}],
    [{"pcrs": {"sha256:7": ["0x" + "g" * 64]}}],
    [{"pcrs": {"sha256:7": [D + "\n"]}}],
    [{"pcrs": {"sha256:7": [D[:-1]]}}],
    [{"pcrs": {"sha256:7": D}}],
    [{"pcrs": {"sha256:7": [5]}}],
    [{"pcrs": {5: [D]}}],
    [{"pcrs": {"sha256:07": [D]}}],
    [{"pcrs": {"sha256:7": [D] * 2000}}],
    [{"events": [{"pcr": True, "type": 1, "digest": D}]}],
    [{"events": [{"pcr": 7, "type": "0x" + "f" * 5000, "digest": D}]}],
    [{"events": [{"pcr": 7, "type": -1, "digest": D}]}],
    [{"events": [{"pcr": 7, "type": 2**32, "digest": D}]}],
    [{"events": [{"pcr": 7, "type": 1.0, "digest": D}]}],
    [{"events": [{"pcr": 7, "type": 1, "digest": "zz" * 32}]}],
    [{"events": [{"pcr": 7, "type": 1, "digest": D, "bank": 5}]}],
    [{"events": [{"pcr": 7, "type": 1, "digest": D, "bank": "md5"}]}],
    [{"events": [{"pcr": 7, "type": 1, "digest": D, "extra": 1}]}],
    [{"events": "x"}],
    [{"name": 5, "pcrs": {"sha256:7": [D]}}],
    [{"name": "a\nb", "pcrs": {"sha256:7": [D]}}],
    [{"name": "n" * 200, "pcrs": {"sha256:7": [D]}}],
    [{"match": "tpm:x", "pcrs": {"sha256:7": [D]}}],
    [{"match": [5], "pcrs": {"sha256:7": [D]}}],
    [{"match": ["tpm:"], "pcrs": {"sha256:7": [D]}}],
    [{"match": ["tpm:\u202e"], "pcrs": {"sha256:7": [D]}}],
    [{"pcrs": {"sha256:7": [D]}, "colour": "blue"}],
    [{"pcrs": {"sha256:7": [D]}}] * 300,
]


#: What each setting legitimately takes among VALUES (None: the setting absent).
ACCEPTED: dict[str, list[Any]] = {
    "ek_ca_bundle": [[]],
    "ek_allowlist": [["AB" * 32], [" " + HASH]],  # case and spaces are normalised
    "ek_allowlist_file": [None],  # /dev/null is no regular file
    "pcrs": ["sha256:0"],
    "challenge_ttl": [1.5, "1s"],
    "pcr_policy": [[], [{"pcrs": {"sha256:7": [D + "\n"]}}]],  # digests are stripped
    "require_event_log": [True],
    "bogus": [],
}


@pytest.mark.parametrize("key", KEYS)
def test_every_setting_refuses_hostile_values_cleanly(key: str) -> None:
    accepted = []
    for value in VALUES:
        try:
            parse_server_settings({"ek_allowlist": [HASH], key: value})
        except PolicyConfigError as e:
            assert e.code == "tpm_attestor_config"
        else:
            accepted.append(value)
    assert accepted == ACCEPTED[key]


AGENT_VALUES: list[Any] = [
    None,
    True,
    5,
    1.5,
    "",
    "\0",
    "relative",
    "/",
    [],
    [5],
    [""],
    ["relative"],
    ["/nonexistent"],
    ["/etc/hostname"],
    {},
    "x" * 5000,
]


@pytest.mark.parametrize("key", ["tcti", "ek_profile", "ak_file", "ek_intermediates",
                                 "event_log_file", "bogus"])  # fmt: skip
def test_every_agent_setting_refuses_hostile_values_cleanly(rig: Any, key: str) -> None:
    from custos.errors import CustosError
    from custos.plugin.errors import PluginCallError

    accepted = []
    for value in AGENT_VALUES:
        try:
            rig.agent(**{key: value}).close()
        except PluginCallError as e:
            assert isinstance(e.__cause__, CustosError), (key, value, repr(e.__cause__))
        else:
            accepted.append(value)
    # tcti None: the default. "/" is an absolute path: a directory as ak_file or
    # event_log_file is found unusable at attestation time (ak_file: a custos error,
    # test_tpm_hostile.py; the event log: left out with a warning).
    expected = {"tcti": [None], "ak_file": ["/"], "event_log_file": ["/"],
                "ek_intermediates": [[]]}  # fmt: skip
    assert accepted == expected.get(key, []), (key, accepted)


@pytest.mark.parametrize("key", ["ek_ca_bundle", "ek_allowlist_file"])
def test_a_fifo_or_device_as_a_settings_file_is_refused_without_blocking(
    key: str, tmp_path: Any
) -> None:
    """A FIFO would block the server's start forever in open(); /dev/zero would be read
    up to the size cap: both are refused as not regular files."""
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        value: Any = [path] if key == "ek_ca_bundle" else path
        outcome: list[BaseException | None] = []

        def load(v: Any = value, out: list[BaseException | None] = outcome) -> None:
            try:
                parse_server_settings({"ek_allowlist": [HASH], key: v})
            except BaseException as e:  # noqa: BLE001 - reported below
                out.append(e)
            else:
                out.append(None)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(5)
        if worker.is_alive():  # unblock the open() so the thread ends
            with open(fifo, "wb"):
                pass
            worker.join(5)
            pytest.fail(f"{key} = {path} blocked the settings load")
        assert isinstance(outcome[0], PolicyConfigError), outcome
        assert "regular file" in outcome[0].message or "not a file" in outcome[0].message, outcome
