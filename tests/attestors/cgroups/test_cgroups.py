"""The shared /proc/<pid>/cgroup parser: layouts as string fixtures (v1, hybrid, v2,
docker, containerd, CRI-O, nested), the real file of live processes through the pidfd
rule, and a fuzz of arbitrary text (never a crash other than the module's errors)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custos.plugin.errors import PluginError
from custos.plugin.protocols import PeerCredentials
from custos_attestors.workload import cgroups
from custos_attestors.workload.cgroups import (
    CgroupCallerGoneError,
    CgroupConflictError,
    CgroupError,
    CgroupFormatError,
    CgroupReadError,
    container_id,
    pod_and_container,
    pod_uid,
    read_cgroup,
    systemd_unit,
)

CID = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
CID2 = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
POD = "a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80"
POD_US = POD.replace("-", "_")

# Debian docker, cgroup v1 (cgroupfs driver)
DOCKER_V1 = "\n".join(
    f"{i}:{c}:/docker/{CID}"
    for i, c in enumerate(["cpu,cpuacct", "memory", "devices", "freezer", "blkio", "pids"], start=2)
) + (f"\n1:name=systemd:/docker/{CID}\n")
# docker with the systemd driver, hybrid (v1 + 0::)
DOCKER_SYSTEMD_HYBRID = (
    f"5:memory:/system.slice/docker-{CID}.scope\n"
    f"1:name=systemd:/system.slice/docker-{CID}.scope\n"
    f"0::/system.slice/docker-{CID}.scope\n"
)
# docker, cgroup v2 with a private cgroup namespace seen from the host
DOCKER_V2 = f"0::/system.slice/docker-{CID}.scope\n"
# containerd + systemd driver, cgroup v2 (kubelet >= 1.25 default)
CONTAINERD_V2 = (
    "0::/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{POD_US}.slice/cri-containerd-{CID}.scope\n"
)
# containerd + cgroupfs driver, cgroup v1
CONTAINERD_V1 = (
    "\n".join(
        f"{i}:{c}:/kubepods/burstable/pod{POD}/{CID}"
        for i, c in enumerate(["cpu,cpuacct", "memory", "pids", "name=systemd"], start=1)
    )
    + "\n"
)
# CRI-O + systemd driver, cgroup v1 hybrid
CRIO_HYBRID = (
    f"11:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/crio-{CID}.scope\n"
    f"1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/crio-{CID}.scope\n"
    "0::/\n"
)
# CRI-O with cgroupfs: pod and container in one segment, colon-separated
CRIO_COLON = f"0::/kubepods/pod{POD}:crio:{CID}\n"
# kind on a Docker host: the pod line must win over the host container's line
KIND = (
    f"1:cpuset:/docker/{CID2}/kubepods/besteffort/pod{POD}/{CID}\n"
    f"0::/docker/{CID2}/system.slice/containerd.service\n"
)
# this machine's shape: a nested v1 path under a prefix, ID not at the root
NESTED = (
    "9:name=systemd:/\n8:pids:/\n"
    f"4:memory:/process_api/4880fa7d4dff1a6517a2bf6a739f88ca/docker/{CID}\n"
    "1:cpu:/\n0::/\n"
)
HOST = "9:name=systemd:/\n4:memory:/process_api/4880fa7d4dff1a6517a2bf6a739f88ca\n0::/\n"


@pytest.mark.parametrize(
    ("text", "pod", "cid"),
    [
        (DOCKER_V1, None, CID),
        (DOCKER_SYSTEMD_HYBRID, None, CID),
        (DOCKER_V2, None, CID),
        (CONTAINERD_V2, POD, CID),
        (CONTAINERD_V1, POD, CID),
        (CRIO_HYBRID, POD, CID),
        (CRIO_COLON, POD, CID),
        (KIND, POD, CID),
        (NESTED, None, CID),
        (HOST, None, None),
        ("0::/\n", None, None),
        (f"0::/kubepods/pod{POD}\n", None, None),  # pod without a container: no pod
        (f"0::/x/{CID.upper()}\n", None, CID),  # lower-cased
        (f"0::/x/{CID}/sub/group\n", None, CID),  # ID not in the last segment
    ],
)
def test_layouts(text: str, pod: str | None, cid: str | None) -> None:
    assert pod_and_container(text) == (pod, cid)
    assert pod_uid(text) == pod
    assert container_id(text) == cid


def test_hex_runs_that_are_not_ids() -> None:
    # 63 and 65 hex digits, and an ID glued to letters: none is a container ID.
    for path in (f"/x/{CID[:63]}", f"/x/{CID}0", f"/x/a{CID}", f"/x/{CID}_z"):
        assert container_id(f"0::{path}\n") is None


def test_pod_uid_after_the_container_is_ignored() -> None:
    assert pod_uid(f"0::/x/{CID}/pod{POD}\n") is None


def test_conflicting_containers_refused() -> None:
    with pytest.raises(CgroupConflictError):
        container_id(f"4:memory:/docker/{CID}\n1:name=systemd:/docker/{CID2}\n")


def test_conflicting_pods_refused() -> None:
    other = "b2830d0d-b0f0-4ff0-81b5-0ee4e299cf80"
    with pytest.raises(CgroupConflictError) as e:
        pod_uid(f"1:cpu:/kubepods/pod{POD}/{CID}\n2:memory:/kubepods/pod{other}/{CID}\n")
    assert e.value.code == "workload_cgroup_conflict"


def test_pod_line_conflicting_container_refused() -> None:
    with pytest.raises(CgroupConflictError):
        pod_and_container(f"1:cpu:/kubepods/pod{POD}/{CID}\n2:memory:/kubepods/pod{POD}/{CID2}\n")


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        (
            "1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service\n",
            "nginx.service",
        ),
        ("0::/system.slice/nginx.service\n", "nginx.service"),
        ("0::/init.scope\n", "init.scope"),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n",
            "user@1000.service",
        ),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        (f"0::/system.slice/docker-{CID}.scope\n", f"docker-{CID}.scope"),
        ("1:name=systemd:/system.slice/foo.service/delegated/sub\n", "foo.service"),
        ("1:name=systemd:/process_api/x/system.slice/getty@tty1.service\n", "getty@tty1.service"),
        ("1:name=systemd:/\n0::/\n", None),
        ("0::/system.slice\n", None),
        ("4:memory:/system.slice/nginx.service\n", None),  # not the systemd hierarchy
        ("0::/system.slice/bad name.service\n", None),
        ("1:name=systemd:/system.slice/a.service\n0::/\n", "a.service"),
    ],
)
def test_systemd_unit(text: str, unit: str | None) -> None:
    assert systemd_unit(text) == unit


def test_systemd_unit_conflict() -> None:
    with pytest.raises(CgroupConflictError):
        systemd_unit("1:name=systemd:/system.slice/a.service\n0::/system.slice/b.service\n")


@pytest.mark.parametrize(
    "text", ["", "\n\n", "garbage\n", "0:/x\n", "x::/\n", "0::/\n junk\n", "\u0663::/\n"]
)
def test_not_a_cgroup_file(text: str) -> None:
    for fn in (container_id, pod_uid, systemd_unit):
        with pytest.raises(CgroupFormatError) as e:
            fn(text)
        assert e.value.code == "workload_cgroup_malformed"


def test_only_newline_ends_a_line() -> None:
    # A cgroup name may hold \r, \x85, \u2028: part of the path, not line breaks.
    for odd in ("\r", "\x85", "\u2028", "\x1c"):
        assert container_id(f"0::/odd{odd}name/docker/{CID}\n") == CID


def test_errors_are_plugin_errors() -> None:
    for cls in (CgroupCallerGoneError, CgroupConflictError, CgroupFormatError, CgroupReadError):
        assert issubclass(cls, CgroupError)
        assert issubclass(cls, PluginError)


_alphabet = st.sampled_from(
    [
        *"0123456789abcdefABCDEF-_:/.,=@ \nxpodkubeslicescope",
        *(CID, f"pod{POD}", f"pod{POD_US}", "\r", "\x00", "é"),
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_alphabet, max_size=60).map("".join))
def test_fuzz_never_crashes(text: str) -> None:
    for fn in (container_id, pod_uid, systemd_unit):
        try:
            out = fn(text)
        except CgroupError:
            continue
        assert out is None or isinstance(out, str)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.from_regex(r"[a-z0-9._@-]{1,12}", fullmatch=True), max_size=5),
    st.lists(st.from_regex(r"[a-z0-9._@-]{1,12}", fullmatch=True), max_size=3),
)
def test_fuzz_prefix_and_suffix_keep_the_ids(prefix: list[str], suffix: list[str]) -> None:
    # Never anchored at the root: any prefix before, any sub-groups after.
    path = "/".join(["", *prefix, "kubepods", f"pod{POD}", CID, *suffix])
    try:
        got = pod_and_container(f"3:memory:{path}\n0::/\n")
    except CgroupError:
        return  # a generated segment cannot be a 64-hex ID (max 12 chars), so never here
    assert got == (POD, CID)


# --- the real file, through the pidfd rule ---


def _peer(pid: int) -> tuple[PeerCredentials, int]:
    fd = os.pidfd_open(pid)
    return PeerCredentials(pid=pid, uid=os.getuid(), gid=os.getgid(), pidfd=fd), fd


def test_read_cgroup_of_a_live_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        peer, fd = _peer(child.pid)
        try:
            text = read_cgroup(peer)
        finally:
            os.close(fd)
        with open(f"/proc/{child.pid}/cgroup") as f:
            assert text == f.read()
        cgroups.parse(text)  # this machine's own layout parses
        container_id(text)
        systemd_unit(text)
    finally:
        child.kill()
        child.wait()


def test_read_cgroup_of_an_exited_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    peer, fd = _peer(child.pid)
    try:
        child.wait()  # reaped: /proc/<pid> is gone
        with pytest.raises(CgroupCallerGoneError) as e:
            read_cgroup(peer)
        assert e.value.code == "workload_caller_gone"
    finally:
        os.close(fd)


def test_read_cgroup_recycled_pid_refused(tmp_path: os.PathLike[str]) -> None:
    # The file is readable (a fake /proc whose <pid> is still there, as a recycled PID
    # would be) but the pidfd's process has exited: the text is not trusted.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    peer, fd = _peer(child.pid)
    try:
        child.wait()
        d = os.path.join(tmp_path, str(child.pid))
        os.mkdir(d)
        with open(os.path.join(d, "cgroup"), "w") as f:
            f.write(f"0::/docker/{CID}\n")
        with pytest.raises(CgroupCallerGoneError):
            read_cgroup(peer, proc=os.fspath(tmp_path))
    finally:
        os.close(fd)


def test_read_cgroup_oversized_refused(tmp_path: os.PathLike[str]) -> None:
    peer, fd = _peer(os.getpid())
    try:
        d = os.path.join(tmp_path, str(os.getpid()))
        os.mkdir(d)
        with open(os.path.join(d, "cgroup"), "w") as f:
            f.write("0::/" + "a" * cgroups.MAX_CGROUP_BYTES + "\n")
        with pytest.raises(CgroupReadError):
            read_cgroup(peer, proc=os.fspath(tmp_path))
    finally:
        os.close(fd)


def test_read_cgroup_not_a_pidfd(tmp_path: os.PathLike[str]) -> None:
    r, w = os.pipe()
    try:
        peer = PeerCredentials(pid=os.getpid(), uid=0, gid=0, pidfd=r)
        with pytest.raises(CgroupReadError):
            read_cgroup(peer)
    finally:
        os.close(r)
        os.close(w)
