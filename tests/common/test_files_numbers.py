"""The shared guards for user-named files and user-given numbers."""

from __future__ import annotations

import math
import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from custos._files import UnreadableFileError, read_small_file, read_small_text
from custos._numbers import InvalidNumberError, finite_number, seconds


def test_regular_file_is_read(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert read_small_file(p) == b"abc"
    assert read_small_text(p) == "abc"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[UnreadableFileError] = []

    def attempt() -> None:
        try:
            read_small_file(fifo, what="key file")
        except UnreadableFileError as e:
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert result, "no error raised"
    assert result[0].reason == "not_regular"
    assert "key file" in str(result[0])


def test_dev_zero_is_refused() -> None:
    with pytest.raises(UnreadableFileError) as e:
        read_small_file("/dev/zero")
    assert e.value.reason == "not_regular"


def test_directory_and_missing_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError) as e:
        read_small_file(tmp_path)
    assert e.value.reason in {"not_regular", "os_error"}
    with pytest.raises(UnreadableFileError) as e:
        read_small_file(tmp_path / "nope")
    assert e.value.reason == "missing"


def test_too_large_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "big"
    p.write_bytes(b"x" * 11)
    assert read_small_file(p, max_bytes=11) == b"x" * 11
    with pytest.raises(UnreadableFileError) as e:
        read_small_file(p, max_bytes=10)
    assert e.value.reason == "too_large"


def test_non_utf8_text_is_refused_without_quoting_it(tmp_path: Path) -> None:
    p = tmp_path / "pin"
    p.write_bytes(b"\xff\xfesecret")
    with pytest.raises(UnreadableFileError) as e:
        read_small_text(p, what="pin-source")
    assert e.value.reason == "not_utf8"
    assert "secret" not in str(e.value) and e.value.__cause__ is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1", None, True, 10**400])
def test_non_finite_and_non_numbers_are_refused(bad: object) -> None:
    with pytest.raises(InvalidNumberError):
        finite_number(bad, name="leeway")


def test_ranges_and_timedeltas() -> None:
    assert finite_number(3, name="x") == 3.0
    assert seconds(timedelta(minutes=1), name="ttl") == 60.0
    with pytest.raises(InvalidNumberError, match="at least"):
        seconds(-1, name="leeway")
    with pytest.raises(InvalidNumberError, match="at most"):
        finite_number(5, name="x", maximum=4)
    with pytest.raises(InvalidNumberError):
        seconds(timedelta.max * 0 + timedelta(days=1), name="ttl", maximum=60)


def test_nul_byte_in_path_is_a_clear_error() -> None:
    # os.open raises ValueError (not OSError) for an embedded NUL: it must not escape raw.
    with pytest.raises(UnreadableFileError) as e:
        read_small_file("a\0b", what="bundle file")
    assert e.value.reason == "os_error"
    assert "NUL" in str(e.value) and "bundle file" in str(e.value)
    with pytest.raises(UnreadableFileError):
        read_small_text(Path("a\0b"))


def test_nul_byte_in_bundle_path_is_a_clear_error() -> None:
    from custos.bundle.bundle import TrustBundle
    from custos.errors import CustosError

    with pytest.raises(CustosError) as e:
        TrustBundle.load("example.org", "a\0b")
    assert e.value.code == "bundle_unreadable"
    assert isinstance(e.value.__cause__, UnreadableFileError)
