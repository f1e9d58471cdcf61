"""The ``unix`` workload attestor, loaded by name through the real catalog and entry
point, against real processes: this one, and children started under other uids and
groups (fork + setuid, as root)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from custos.plugin import (
    AgentCatalog,
    PeerCredentials,
    PluginCallError,
    PluginConfig,
    Selector,
    discover,
)
from custos_attestors.workload.unix import UnixWorkloadAttestor

TD = "example.org"
NODE = (PluginConfig("join_token", {"token": "unused-here"}),)
NOBODY = 65534
# Ids no passwd / group file on this machine names (checked in the tests that use them).
NAMELESS_UID = 54321
NAMELESS_GID = 54322

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting a child as another uid")


def unix(values: list[str]) -> set[Selector]:
    return {Selector("unix", v) for v in values}


@contextmanager
def catalog(settings: Mapping[str, object] | None = None) -> Iterator[AgentCatalog]:
    with AgentCatalog.load(
        TD, node_attestors=NODE, workload_attestors=[PluginConfig("unix", dict(settings or {}))]
    ) as loaded:
        yield loaded


def attestor_of(cat: AgentCatalog) -> UnixWorkloadAttestor:
    plugin = cat.workload_attestors[0].plugin
    assert isinstance(plugin, UnixWorkloadAttestor)
    return plugin


@contextmanager
def child(
    argv: list[str], *, uid: int | None = None, gid: int | None = None, groups: Sequence[int] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], PeerCredentials]]:
    """A running child and the peer credentials the agent's socket would report.

    Other ids are taken by ``setpriv`` after the exec, not by ``Popen(user=...)``: that
    makes Python fork() instead of vfork(), and a fork in a test process that has used
    gRPC runs gRPC's fork handlers in the child (see custos.testing.postgres).
    """
    if uid is not None or gid is not None or groups:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is not installed")
        ids = [
            f"--reuid={os.geteuid() if uid is None else uid}",
            f"--regid={os.getegid() if gid is None else gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
        ]
        proc = subprocess.Popen([setpriv, *ids, *argv])
        _wait_for_exec(proc, argv[0])
    else:
        proc = subprocess.Popen(argv)
    fd = os.pidfd_open(proc.pid)
    try:
        peer = PeerCredentials(
            pid=proc.pid,
            uid=os.geteuid() if uid is None else uid,
            gid=os.getegid() if gid is None else gid,
            pidfd=fd,
        )
        yield proc, peer
    finally:
        proc.kill()
        proc.wait()
        os.close(fd)


def _wait_for_exec(proc: subprocess.Popen[bytes], program: str) -> None:
    """Until setpriv has exec'd ``program`` (same pid); not a timing assertion."""
    target = os.path.realpath(program)
    for _ in range(2000):
        try:
            if os.readlink(f"/proc/{proc.pid}/exe") == target:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    raise AssertionError(f"{program} did not start under setpriv")


def attest(cat: AgentCatalog, peer: PeerCredentials) -> set[Selector]:
    return set(asyncio.run(cat.attest_workload(peer)))


def denied(cat: AgentCatalog, peer: PeerCredentials) -> str:
    """The code of the attestor's error for a denied caller."""
    with pytest.raises(PluginCallError, match="'unix' failed in attest") as exc:
        asyncio.run(cat.attest_workload(peer))
    cause = exc.value.__cause__
    assert cause is not None
    return str(getattr(cause, "code", type(cause).__name__))


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def sleep_copy() -> Iterator[Path]:
    """A private copy of sleep(1), runnable by any uid (pytest's tmp_path sits in a
    directory only its owner may enter)."""
    with tempfile.TemporaryDirectory(prefix="custos-unix-") as top:
        os.chmod(top, 0o755)
        path = Path(top) / "sleeper"
        shutil.copy(shutil.which("sleep") or "/bin/sleep", path)
        path.chmod(0o755)
        yield path


def test_unix_is_registered_as_a_builtin_workload_attestor() -> None:
    info = next(p for p in discover("workload_attestor") if p.name == "unix")
    assert info.distribution == "custos"
    assert info.value == "custos_attestors.workload.unix:UnixWorkloadAttestor"


def test_this_process() -> None:
    fd = os.pidfd_open(os.getpid())
    try:
        peer = PeerCredentials(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid(), pidfd=fd)
        with catalog({"discover_workload_path": True}) as cat:
            got = attest(cat, peer)
    finally:
        os.close(fd)
    import grp
    import pwd

    exe = os.readlink("/proc/self/exe")
    expected = {
        f"uid:{os.geteuid()}",
        f"gid:{os.getegid()}",
        f"user:{pwd.getpwuid(os.geteuid()).pw_name}",
        f"group:{grp.getgrgid(os.getegid()).gr_name}",
        f"path:{exe}",
        f"sha256:{sha256_file(exe)}",
    }
    for gid in os.getgroups():
        expected.add(f"supplementary_gid:{gid}")
        expected.add(f"supplementary_group:{grp.getgrgid(gid).gr_name}")
    assert got == unix(sorted(expected))
    assert Path(exe).resolve() == Path(sys.executable).resolve()


def test_path_and_sha256_only_when_discover_workload_path(sleep_copy: Path) -> None:
    with child([str(sleep_copy), "60"]) as (_, peer), catalog() as cat:
        got = attest(cat, peer)
    assert not [s for s in got if s.value.startswith(("path:", "sha256:"))]
    assert Selector("unix", f"uid:{os.geteuid()}") in got


@needs_root
def test_a_child_running_as_nobody_with_supplementary_groups(sleep_copy: Path) -> None:
    import grp

    named = grp.getgrnam("users").gr_gid if _has_group("users") else None
    groups = [NAMELESS_GID] + ([named] if named is not None else [])
    assert not _has_gid(NAMELESS_GID)
    with (
        child([str(sleep_copy), "60"], uid=NOBODY, gid=NOBODY, groups=groups) as (_, peer),
        catalog({"discover_workload_path": True}) as cat,
    ):
        got = attest(cat, peer)
    expected = [
        f"uid:{NOBODY}",
        f"gid:{NOBODY}",
        "user:nobody",
        f"group:{grp.getgrgid(NOBODY).gr_name}",
        f"supplementary_gid:{NAMELESS_GID}",  # no name: no supplementary_group selector
        f"path:{sleep_copy}",
        f"sha256:{sha256_file(sleep_copy)}",
    ]
    if named is not None:
        expected += [f"supplementary_gid:{named}", "supplementary_group:users"]
    assert got == unix(expected)


@needs_root
def test_a_uid_without_a_passwd_entry_has_no_user_selector(sleep_copy: Path) -> None:
    import pwd

    with pytest.raises(KeyError):
        pwd.getpwuid(NAMELESS_UID)
    with (
        child([str(sleep_copy), "60"], uid=NAMELESS_UID, gid=NAMELESS_GID) as (_, peer),
        catalog() as cat,
    ):
        got = attest(cat, peer)
    assert got == unix([f"uid:{NAMELESS_UID}", f"gid:{NAMELESS_GID}"])


def test_the_hash_is_cached_per_file_version(sleep_copy: Path) -> None:
    with catalog({"discover_workload_path": True}) as cat:
        cache = attestor_of(cat).hash_cache
        assert cache is not None
        with child([str(sleep_copy), "60"]) as (_, peer):
            first = attest(cat, peer)
        with child([str(sleep_copy), "61"]) as (_, peer):  # same inode, new process
            second = attest(cat, peer)
        assert (cache.hits, cache.misses) == (1, 1)
        assert first == second

        # Replaced at its path (a new inode), as a package upgrade does.
        replacement = sleep_copy.with_name("sleeper.new")
        shutil.copy(sleep_copy, replacement)
        with replacement.open("ab") as f:
            f.write(b"\0custos-test-trailer")
        replacement.chmod(0o755)
        os.replace(replacement, sleep_copy)
        with child([str(sleep_copy), "62"]) as (_, peer):
            third = attest(cat, peer)
        assert (cache.hits, cache.misses) == (1, 2)
        assert Selector("unix", f"sha256:{sha256_file(sleep_copy)}") in third
        assert first - third == {s for s in first if s.value.startswith("sha256:")}

        # Rewritten in place (same inode, new contents): a miss too.
        with sleep_copy.open("ab") as f:
            f.write(b"more")
        with child([str(sleep_copy), "63"]) as (_, peer):
            fourth = attest(cat, peer)
        assert (cache.hits, cache.misses) == (1, 3)
        assert Selector("unix", f"sha256:{sha256_file(sleep_copy)}") in fourth

        # The same size and inode, other bytes: the times tell the versions apart.
        with sleep_copy.open("r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"MORE")
        with child([str(sleep_copy), "64"]) as (_, peer):
            fifth = attest(cat, peer)
        assert (cache.hits, cache.misses) == (1, 4)
        assert Selector("unix", f"sha256:{sha256_file(sleep_copy)}") in fifth


def test_concurrent_callers_with_one_binary_hash_it_once(sleep_copy: Path) -> None:
    with ExitStack() as stack:
        peers = [stack.enter_context(child([str(sleep_copy), "60"]))[1] for _ in range(4)]
        cat = stack.enter_context(catalog({"discover_workload_path": True}))

        async def all_at_once() -> list[tuple[Selector, ...]]:
            return await asyncio.gather(*(cat.attest_workload(p) for p in peers))

        results = asyncio.run(all_at_once())
        cache = attestor_of(cat).hash_cache
        assert cache is not None
        assert (cache.hits, cache.misses) == (3, 1)
    digests = {s for r in results for s in r if s.value.startswith("sha256:")}
    assert digests == {Selector("unix", f"sha256:{sha256_file(sleep_copy)}")}


def test_the_hash_cache_is_bounded_in_entries(tmp_path: Path, sleep_copy: Path) -> None:
    copies = []
    for i in range(3):
        copy = tmp_path / f"sleeper{i}"
        shutil.copy(sleep_copy, copy)
        copy.chmod(0o755)
        copies.append(copy)
    with catalog({"discover_workload_path": True, "hash_cache_entries": 2}) as cat:
        cache = attestor_of(cat).hash_cache
        assert cache is not None
        for copy in [*copies, copies[0]]:  # the first was dropped by the third
            with child([str(copy), "60"]) as (_, peer):
                attest(cat, peer)
        assert len(cache) == 2
        assert (cache.hits, cache.misses) == (0, 4)


def test_a_binary_over_the_size_cap_gets_no_sha256_and_a_log_line(
    sleep_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = sleep_copy.stat().st_size
    settings = {"discover_workload_path": True, "max_binary_bytes": size - 1}
    with caplog.at_level(logging.WARNING), catalog(settings) as cat:
        with child([str(sleep_copy), "60"]) as (_, peer):
            got = attest(cat, peer)
        with child([str(sleep_copy), "60"]) as (_, peer):
            again = attest(cat, peer)
    assert got == again
    assert Selector("unix", f"path:{sleep_copy}") in got
    assert not [s for s in got if s.value.startswith("sha256:")]
    lines = [r.getMessage() for r in caplog.records if "max_binary_bytes" in r.getMessage()]
    assert len(lines) == 1  # once per file version, not once per call
    assert f"is {size} bytes, over max_binary_bytes {size - 1}" in lines[0]

    with catalog({"discover_workload_path": True, "max_binary_bytes": size}) as cat:
        with child([str(sleep_copy), "60"]) as (_, peer):
            assert Selector("unix", f"sha256:{sha256_file(sleep_copy)}") in attest(cat, peer)


def test_a_caller_that_exited_and_was_reaped_is_denied(sleep_copy: Path) -> None:
    with child([str(sleep_copy), "60"]) as (proc, peer), catalog() as cat:
        proc.kill()
        proc.wait()
        assert denied(cat, peer) == "workload_caller_gone"


def test_a_zombie_caller_is_denied(sleep_copy: Path) -> None:
    with child([str(sleep_copy), "60"]) as (proc, peer), catalog() as cat:
        proc.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        assert denied(cat, peer) == "workload_caller_gone"


def test_the_pidfd_must_still_be_alive_after_the_reads(sleep_copy: Path) -> None:
    """PID reuse, as the attestor sees it: ``/proc/<pid>`` shows a live process,
    but the pidfd taken at accept time refers to one that is gone."""
    gone = subprocess.Popen([str(sleep_copy), "60"])
    dead_fd = os.pidfd_open(gone.pid)
    gone.kill()
    gone.wait()
    try:
        with child([str(sleep_copy), "60"]) as (_, live), catalog() as cat:
            peer = PeerCredentials(pid=live.pid, uid=live.uid, gid=live.gid, pidfd=dead_fd)
            assert denied(cat, peer) == "workload_caller_gone"
            assert attest(cat, live)  # the same process with its own pidfd is fine
    finally:
        os.close(dead_fd)


def test_a_caller_whose_ids_changed_since_it_connected_is_denied(sleep_copy: Path) -> None:
    # The socket said uid 1000; the process now runs as someone else (a set-uid
    # program run after connecting): another holder of the socket must not get its ids.
    with child([str(sleep_copy), "60"]) as (_, live), catalog() as cat:
        peer = PeerCredentials(pid=live.pid, uid=live.uid + 1, gid=live.gid, pidfd=live.pidfd)
        assert denied(cat, peer) == "workload_credentials_changed"
        peer = PeerCredentials(pid=live.pid, uid=live.uid, gid=live.gid + 1, pidfd=live.pidfd)
        assert denied(cat, peer) == "workload_credentials_changed"


def test_an_executable_path_with_a_control_character_is_refused(tmp_path: Path) -> None:
    odd = tmp_path / "sleep\nunix:uid:0"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    odd.chmod(0o755)
    with child([str(odd), "60"]) as (_, peer), catalog({"discover_workload_path": True}) as cat:
        assert denied(cat, peer) == "workload_proc_unreadable"


@needs_root
def test_more_groups_than_one_attestation_carries_is_a_clear_refusal(sleep_copy: Path) -> None:
    groups = list(range(70000, 70300))
    with (
        child([str(sleep_copy), "60"], uid=NOBODY, gid=NOBODY, groups=groups) as (_, peer),
        catalog() as cat,
    ):
        with pytest.raises(PluginCallError, match="300 supplementary groups"):
            asyncio.run(cat.attest_workload(peer))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"discover_path": True}, "unknown unix attestor setting(s): discover_path"),
        ({"discover_workload_path": "yes"}, "discover_workload_path must be true or false"),
        ({"max_binary_bytes": True}, "max_binary_bytes must be an integer"),
        ({"max_binary_bytes": 1.5}, "max_binary_bytes must be an integer"),
        ({"max_binary_bytes": 0}, "max_binary_bytes must be from 1 to"),
        ({"hash_cache_entries": -1}, "hash_cache_entries must be from 1 to"),
    ],
)
def test_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(PluginCallError, match="'unix' failed in configure") as exc:
        with catalog(settings):
            pass
    assert message in str(exc.value)
    assert getattr(exc.value.__cause__, "code", None) == "unix_attestor_config"


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _has_gid(gid: int) -> bool:
    import grp

    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+; Python 3.11 lacks the name
CONNECT_THEN = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
if sys.argv[2] == "drop":
    os.setgid(65534)
    os.setuid(65534)
s.sendall(b"ready")
time.sleep(60)
"""


@contextmanager
def connected_caller(tmp_path: Path, then: str) -> Iterator[PeerCredentials]:
    """A child that connects to a real Unix socket (then maybe drops to nobody), and
    the peer credentials the kernel reports for it: SO_PEERCRED and SO_PEERPIDFD."""
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        proc = subprocess.Popen([sys.executable, "-c", CONNECT_THEN, str(path), then])
        try:
            conn, _ = server.accept()
            with conn:
                assert conn.recv(5) == b"ready"
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
                pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
                try:
                    yield PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=pidfd)
                finally:
                    os.close(pidfd)
        finally:
            proc.kill()
            proc.wait()


def test_a_caller_on_a_real_socket(tmp_path: Path) -> None:
    with connected_caller(tmp_path, "stay") as peer, catalog() as cat:
        got = attest(cat, peer)
    assert Selector("unix", f"uid:{os.geteuid()}") in got
    assert Selector("unix", f"gid:{os.getegid()}") in got


@needs_root
def test_a_caller_that_dropped_to_nobody_after_connecting_is_denied(tmp_path: Path) -> None:
    # The kernel recorded uid 0 at connect; the process now runs as nobody. Neither
    # identity is safe to hand out: the socket could be held by another process.
    with connected_caller(tmp_path, "drop") as peer, catalog() as cat:
        assert peer.uid == 0
        assert denied(cat, peer) == "workload_credentials_changed"
