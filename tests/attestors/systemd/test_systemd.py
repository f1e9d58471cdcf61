"""The ``systemd`` workload attestor against real cgroups: the test (root) makes a
cgroup named like a unit in this machine's systemd hierarchy (cgroup v1
``name=systemd``) and in the unified (v2) one, moves a child into it and attests the
child through the real catalog.  Where the kernel refuses, the test fails: it never
skips."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
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
from custos_attestors.workload.systemd import (
    DEFAULT_UNIT_DIRECTORIES,
    SystemdWorkloadAttestor,
    fragment_path,
)

TD = "example.org"
NODE = (PluginConfig("join_token", {"token": "unused-here"}),)


def cgroup_mounts() -> dict[str, str]:
    """{"v1": <name=systemd mount>, "v2": <cgroup2 mount>} as this machine has them."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _source, options = post.split()[:3]
            mountpoint = pre.split()[4]
            if fstype == "cgroup" and "name=systemd" in options.split(","):
                found.setdefault("v1", mountpoint)
            elif fstype == "cgroup2":
                found.setdefault("v2", mountpoint)
    return found


def hierarchy(which: str) -> str:
    mounts = cgroup_mounts()
    if which not in mounts:
        pytest.fail(f"this machine has no {which} systemd cgroup hierarchy mounted: {mounts}")
    return mounts[which]


@contextmanager
def process_in_cgroup(root: str, relative: str) -> Iterator[PeerCredentials]:
    """A child `sleep` moved into the cgroup ``<root>/<relative>`` (made, then removed)."""
    path = os.path.join(root, relative)
    made: list[str] = []
    parts = relative.split("/")
    for i in range(len(parts)):
        d = os.path.join(root, *parts[: i + 1])
        if not os.path.isdir(d):
            os.mkdir(d)  # the kernel refusing is a failure, never a skip
            made.append(d)
    proc = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(proc.pid)
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))
        with open(f"/proc/{proc.pid}/cgroup") as f:
            assert f"/{relative}\n" in f.read(), "the kernel did not move the child"
        yield PeerCredentials(pid=proc.pid, uid=os.geteuid(), gid=os.getegid(), pidfd=fd)
    finally:
        proc.kill()
        proc.wait()
        os.close(fd)
        for d in reversed(made):
            os.rmdir(d)


@contextmanager
def catalog(settings: dict[str, object] | None = None) -> Iterator[AgentCatalog]:
    with AgentCatalog.load(
        TD,
        node_attestors=NODE,
        workload_attestors=[PluginConfig("unix", {}), PluginConfig("systemd", settings or {})],
    ) as loaded:
        yield loaded


def systemd_selectors(cat: AgentCatalog, peer: PeerCredentials) -> set[Selector]:
    got = asyncio.run(cat.attest_workload(peer))
    return {s for s in got if s.type == "systemd"}


def private_slice() -> str:
    """A slice of this test's own: parallel workers share no parent cgroup."""
    return f"custos-test-{secrets.token_hex(4)}.slice"


def unit_name(kind: str = "service") -> str:
    return f"custos-test-{secrets.token_hex(4)}.{kind}"


def test_registered_as_a_builtin() -> None:
    found = {p.name: p for p in discover("workload_attestor")}
    assert "systemd" in found


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_a_process_in_a_unit_cgroup(which: str, tmp_path: Path) -> None:
    unit = unit_name()
    (tmp_path / unit).write_text("[Service]\nExecStart=/bin/sleep 60\n")
    with (
        process_in_cgroup(hierarchy(which), f"{private_slice()}/{unit}") as peer,
        catalog({"unit_directories": [str(tmp_path)]}) as cat,
    ):
        assert systemd_selectors(cat, peer) == {
            Selector("systemd", f"id:{unit}"),
            Selector("systemd", f"fragment_path:{tmp_path / unit}"),
        }


def test_a_sub_cgroup_of_a_unit_is_still_the_unit() -> None:
    unit = unit_name()
    with (
        process_in_cgroup(hierarchy("v1"), f"{private_slice()}/{unit}/delegated/worker") as peer,
        catalog({"unit_directories": []}) as cat,
    ):
        assert systemd_selectors(cat, peer) == {Selector("systemd", f"id:{unit}")}


def test_a_scope_without_a_unit_file_has_only_an_id() -> None:
    unit = unit_name("scope")
    with process_in_cgroup(hierarchy("v2"), unit) as peer, catalog() as cat:
        assert systemd_selectors(cat, peer) == {Selector("systemd", f"id:{unit}")}


def test_a_template_instance_finds_its_template(tmp_path: Path) -> None:
    stem = f"custos-test-{secrets.token_hex(4)}"
    (tmp_path / f"{stem}@.service").write_text("[Service]\n")
    with (
        process_in_cgroup(hierarchy("v1"), f"{private_slice()}/{stem}@blue.service") as peer,
        catalog({"unit_directories": [str(tmp_path)]}) as cat,
    ):
        assert systemd_selectors(cat, peer) == {
            Selector("systemd", f"id:{stem}@blue.service"),
            Selector("systemd", f"fragment_path:{tmp_path / f'{stem}@.service'}"),
        }


def test_the_default_unit_directories_find_a_unit_in_run() -> None:
    # /run/systemd/system is one of systemd's standard unit directories.
    unit = unit_name()
    run_dir = Path("/run/systemd/system")
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    unit_file = run_dir / unit
    unit_file.write_text("[Service]\n")
    try:
        with process_in_cgroup(hierarchy("v1"), unit) as peer, catalog() as cat:
            got = systemd_selectors(cat, peer)
        assert Selector("systemd", f"fragment_path:{unit_file}") in got
    finally:
        unit_file.unlink()
        if made:
            run_dir.rmdir()


def test_first_directory_wins_and_masked_units_have_no_file(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    (a / "x.service").write_text("")
    (b / "x.service").write_text("")
    assert fragment_path("x.service", [str(a), str(b)]) == str(a / "x.service")
    (c / "m.service").symlink_to("/dev/null")
    assert fragment_path("m.service", [str(c), str(b)]) is None
    assert fragment_path("none.service", [str(a)]) is None
    assert "/etc/systemd/system" in DEFAULT_UNIT_DIRECTORIES


def test_a_process_outside_any_unit_has_no_selectors() -> None:
    with process_in_cgroup(hierarchy("v1"), "custos-test-plain") as peer, catalog() as cat:
        assert systemd_selectors(cat, peer) == set()


def test_a_caller_that_exited_is_denied() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(proc.pid)
    try:
        proc.kill()
        proc.wait()
        peer = PeerCredentials(pid=proc.pid, uid=0, gid=0, pidfd=fd)
        with catalog() as cat, pytest.raises(PluginCallError) as e:
            asyncio.run(cat.workload_attestors[1].attest(peer))
        assert getattr(e.value.__cause__, "code", None) == "workload_caller_gone"
    finally:
        os.close(fd)


def test_a_recycled_pid_cannot_borrow_a_unit() -> None:
    """The pidfd names a process that is gone; the PID now belongs to a live process in
    a unit's cgroup: no unit is handed out."""
    gone = subprocess.Popen(["sleep", "60"])
    dead_fd = os.pidfd_open(gone.pid)
    gone.kill()
    gone.wait()
    try:
        with process_in_cgroup(hierarchy("v1"), unit_name()) as live, catalog() as cat:
            peer = PeerCredentials(pid=live.pid, uid=live.uid, gid=live.gid, pidfd=dead_fd)
            with pytest.raises(PluginCallError) as e:
                asyncio.run(cat.workload_attestors[1].attest(peer))
            assert getattr(e.value.__cause__, "code", None) == "workload_caller_gone"
    finally:
        os.close(dead_fd)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bogus": 1}, "unknown systemd attestor setting"),
        ({"unit_directories": "/etc"}, "must be a list"),
        ({"unit_directories": ["relative/dir"]}, "not an absolute path"),
        ({"unit_directories": ["/x"] * 65}, "more than 64"),
    ],
)
def test_settings_are_checked(settings: dict[str, object], message: str) -> None:
    from custos.identity.ids import TrustDomain
    from custos.plugin.protocols import CoreConfig

    with pytest.raises(Exception, match=message):
        SystemdWorkloadAttestor().configure(settings, CoreConfig(TrustDomain(TD)))
