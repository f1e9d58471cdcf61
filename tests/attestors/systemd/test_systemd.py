"""The ``systemd`` workload attestor against real cgroups: the test (root) makes a
cgroup named like a unit in this machine's systemd hierarchy (cgroup v1
``name=systemd``) and in the unified (v2) one, moves a child into it and attests the
child through the real catalog.  Where the kernel refuses, the test fails: it never
skips."""

from __future__ import annotations

import secrets
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from common import workload_rig
from common.workload_rig import TD, exited_process, process_in_cgroup, refusal_code
from custos.plugin import AgentCatalog, PeerCredentials, Selector, discover
from custos_attestors.workload.systemd import (
    DEFAULT_UNIT_DIRECTORIES,
    SystemdWorkloadAttestor,
    fragment_path,
)


def hierarchy(which: str) -> str:
    """The ``v1`` (``name=systemd``) or ``v2`` hierarchy's mount; fails if none."""
    return workload_rig.hierarchy(which, "name=systemd")


def catalog(settings: dict[str, object] | None = None) -> AbstractContextManager[AgentCatalog]:
    return workload_rig.catalog("systemd", settings)


def systemd_selectors(cat: AgentCatalog, peer: PeerCredentials) -> set[Selector]:
    return workload_rig.selectors_of(cat, peer, "systemd")


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
    with exited_process() as peer, catalog() as cat:
        assert refusal_code(cat, peer) == "workload_caller_gone"


def test_a_recycled_pid_cannot_borrow_a_unit() -> None:
    """The pidfd names a process that is gone; the PID now belongs to a live process in
    a unit's cgroup: no unit is handed out."""
    with (
        exited_process() as gone,
        process_in_cgroup(hierarchy("v1"), unit_name()) as live,
        catalog() as cat,
    ):
        peer = PeerCredentials(pid=live.pid, uid=live.uid, gid=live.gid, pidfd=gone.pidfd)
        assert refusal_code(cat, peer) == "workload_caller_gone"


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
