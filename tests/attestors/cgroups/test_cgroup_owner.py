"""Who made the cgroup that names a container: ``check_runtime_owned``.  Fixtures for
the mount table mapping; then, for real, a cgroup subtree delegated to ``nobody`` (as
systemd delegates ``user@<uid>.service``) inside which ``nobody`` makes a cgroup named
like a pod's container and moves itself in: without the check the name alone would
pass, with it the caller is refused.  The kernel refusing any step fails the test."""

from __future__ import annotations

import os
import secrets
import uuid

import pytest

from common.workload_rig import NOBODY, delegated_impostor, process_in_cgroup
from custos_attestors.workload.cgroups import (
    CgroupLine,
    CgroupOwnerError,
    cgroup_directory,
    check_runtime_owned,
    parse,
    parse_mountinfo,
    pod_and_container,
)

CID = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"

MOUNTINFO = (
    "30 25 0:26 / /sys/fs/cgroup rw shared:6 - tmpfs tmpfs rw,mode=755\n"
    "31 30 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    "32 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    "33 30 0:29 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
    "34 30 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
    "35 30 0:31 /kubepods /mnt/kube\\040pods rw - cgroup cgroup rw,memory\n"
)


def test_parse_mountinfo() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mountpoint for m in mounts] == [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
        "/mnt/kube pods",
    ]
    assert mounts[3].version == 2 and mounts[4].root == "/kubepods"


@pytest.mark.parametrize(
    ("line", "path", "where"),
    [
        (CgroupLine(8, ("pids",), ""), "/a/b", "/sys/fs/cgroup/pids/a/b"),
        (CgroupLine(2, ("cpu", "cpuacct"), ""), "/a", "/sys/fs/cgroup/cpu,cpuacct/a"),
        (CgroupLine(1, ("name=systemd",), ""), "/x.service", "/sys/fs/cgroup/systemd/x.service"),
        (CgroupLine(0, (), ""), "/k/p", "/sys/fs/cgroup/unified/k/p"),
        (CgroupLine(4, ("memory",), ""), "/kubepods/pod/c", "/mnt/kube pods/pod/c"),
        (CgroupLine(4, ("memory",), ""), "/other/c", None),  # outside the mounted root
        (CgroupLine(0, (), ""), "/../../kubepods/c", None),  # outside this cgroup namespace
        (CgroupLine(9, ("hugetlb",), ""), "/a", None),  # not mounted
    ],
)
def test_cgroup_directory(line: CgroupLine, path: str, where: str | None) -> None:
    assert cgroup_directory(line, path, parse_mountinfo(MOUNTINFO)) == where


def test_this_machines_own_cgroups_map_to_directories() -> None:
    with open("/proc/self/mountinfo") as f:
        mounts = parse_mountinfo(f.read())
    with open("/proc/self/cgroup") as f:
        lines = parse(f.read())
    for line in lines:
        d = cgroup_directory(line, line.path, mounts)
        assert d is not None and os.path.isdir(d), (line, d)


def test_no_container_nothing_to_check(tmp_path: os.PathLike[str]) -> None:
    check_runtime_owned("0::/user.slice\n", mountinfo=os.path.join(tmp_path, "missing"))


def test_unmounted_hierarchy_is_refused(tmp_path: os.PathLike[str]) -> None:
    info = os.path.join(tmp_path, "mountinfo")
    with open(info, "w") as f:
        f.write(MOUNTINFO)
    with pytest.raises(CgroupOwnerError, match="not mounted here"):
        check_runtime_owned(f"9:hugetlb:/docker/{CID}\n", mountinfo=info)
    with pytest.raises(CgroupOwnerError, match="cannot check"):
        check_runtime_owned(f"0::/docker/{CID}\n", mountinfo=os.path.join(tmp_path, "nope"))


# --- real cgroups ---


def unified() -> str:
    with open("/proc/self/mountinfo") as f:
        for m in parse_mountinfo(f.read()):
            if m.version == 2 and m.root == "/":
                return m.mountpoint
    pytest.fail("no cgroup2 hierarchy is mounted here")


def test_a_runtime_made_cgroup_passes() -> None:
    pod_uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    relative = f"custos-{secrets.token_hex(4)}/kubepods/pod{pod_uid}/{cid}"
    with process_in_cgroup(unified(), relative) as peer:
        with open(f"/proc/{peer.pid}/cgroup") as f:
            text = f.read()
        assert pod_and_container(text) == (pod_uid, cid)
        check_runtime_owned(text)


def test_a_delegated_user_naming_a_cgroup_like_a_pod_is_refused() -> None:
    pod_uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    # nobody makes the cgroup named like a pod's container, in a subtree delegated to it.
    with delegated_impostor(unified(), pod_uid, cid) as pid:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
        # The name alone passes: that is the threat (decision 0095) ...
        assert pod_and_container(text) == (pod_uid, cid)
        # ... the owner does not.
        with pytest.raises(CgroupOwnerError, match=f"owned by uid {NOBODY}") as e:
            check_runtime_owned(text)
        assert e.value.code == "workload_cgroup_not_runtime"
