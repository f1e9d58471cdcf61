"""The rig of the workload-attestor tests: real processes in real cgroups (the test runs
as root and makes them), attested through the agent's real catalog.

Why this module: the ``systemd`` and ``k8s`` workload attestor tests (and the cgroup
owner check's) each carried their own copy of the same setup: finding this machine's
cgroup hierarchies in ``/proc/self/mountinfo``, a child ``sleep`` moved into a cgroup
made for it (its pidfd as the agent's socket would report it), the catalog with the
``unix`` attestor and the one under test, and ``nobody`` making a cgroup named like a
pod's container inside a subtree delegated to it. Only the hierarchy, the cgroup's name
and the attestor differ; those are the arguments. The kernel refusing any step fails the
test: never a skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from common.agent_rig import cgroup
from custos.plugin import AgentCatalog, PeerCredentials, PluginCallError, PluginConfig, Selector

TD = "example.org"
#: The catalog's node attestor: never called by a workload attestation.
NODE = (PluginConfig("join_token", {"token": "unused-here"}),)
NOBODY = 65534


def cgroup_mounts(v1_option: str) -> dict[str, str]:
    """``{"v1": <the cgroup v1 hierarchy mounted with v1_option>, "v2": <the cgroup2
    mount>}`` as this machine has them (a key is missing where none is mounted)."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _source, options = post.split()[:3]
            mountpoint = pre.split()[4]
            if fstype == "cgroup" and v1_option in options.split(","):
                found.setdefault("v1", mountpoint)
            elif fstype == "cgroup2":
                found.setdefault("v2", mountpoint)
    return found


def hierarchy(which: str, v1_option: str) -> str:
    """Where ``which`` (``v1``: the one with ``v1_option``; ``v2``) is mounted; fails the
    test if it is not."""
    mounts = cgroup_mounts(v1_option)
    if which not in mounts:
        pytest.fail(f"this machine has no {which} cgroup hierarchy ({v1_option}) mounted: {mounts}")
    return mounts[which]


@contextmanager
def sleeper() -> Iterator[PeerCredentials]:
    """A child ``sleep`` (left in this process's cgroups) and its peer credentials with
    a pidfd; killed afterwards."""
    proc = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(proc.pid)
    try:
        yield PeerCredentials(pid=proc.pid, uid=os.geteuid(), gid=os.getegid(), pidfd=fd)
    finally:
        proc.kill()
        proc.wait()
        os.close(fd)


@contextmanager
def process_in_cgroup(root: str, relative: str) -> Iterator[PeerCredentials]:
    """A :func:`sleeper` moved into the cgroup ``<root>/<relative>`` (its missing
    directories made, then removed); the kernel not moving it fails the test."""
    with cgroup(root, relative) as path, sleeper() as peer:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(peer.pid))
        with open(f"/proc/{peer.pid}/cgroup") as f:
            assert f"/{relative}\n" in f.read(), "the kernel did not move the child"
        yield peer


@contextmanager
def catalog(attestor: str, settings: Mapping[str, object] | None = None) -> Iterator[AgentCatalog]:
    """The agent's catalog: the ``unix`` workload attestor first, ``attestor`` (with
    ``settings``) second."""
    with AgentCatalog.load(
        TD,
        node_attestors=NODE,
        workload_attestors=[PluginConfig("unix", {}), PluginConfig(attestor, dict(settings or {}))],
    ) as loaded:
        yield loaded


def selectors_of(cat: AgentCatalog, peer: PeerCredentials, kind: str) -> set[Selector]:
    """The selectors of type ``kind`` the catalog gives ``peer``."""
    got = asyncio.run(cat.attest_workload(peer))
    return {s for s in got if s.type == kind}


def refusal_code(cat: AgentCatalog, peer: PeerCredentials) -> object:
    """The ``code`` of the error with which the attestor under test (the catalog's
    second) refuses ``peer``; the test fails unless it refuses with a PluginCallError."""
    with pytest.raises(PluginCallError) as e:
        asyncio.run(cat.workload_attestors[1].attest(peer))
    return getattr(e.value.__cause__, "code", None)


@contextmanager
def exited_process() -> Iterator[PeerCredentials]:
    """The peer credentials (uid and gid 0) of a child that was killed and reaped: its
    pidfd names a process that is gone (its PID free for another)."""
    proc = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(proc.pid)
    try:
        proc.kill()
        proc.wait()
        yield PeerCredentials(pid=proc.pid, uid=0, gid=0, pidfd=fd)
    finally:
        os.close(fd)


@contextmanager
def delegated_impostor(root: str, pod_uid: str, cid: str) -> Iterator[int]:
    """``nobody``, given a subtree of the cgroup v2 hierarchy at ``root`` delegated to it
    (the directory and its interface files chowned, as systemd delegates
    ``user@<uid>.service``), makes ``kubepods/pod<pod_uid>/<cid>`` in it and moves
    itself in. Yields its pid."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to run a process as nobody")
    deleg = os.path.join(root, f"custos-deleg-{secrets.token_hex(4)}")
    os.mkdir(deleg)
    fake = os.path.join(deleg, "kubepods", f"pod{pod_uid}", cid)
    proc = None
    try:
        for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
            os.chown(os.path.join(deleg, name), NOBODY, NOBODY)
        script = (
            'read go; mkdir -p "$1" && echo $$ > "$1/cgroup.procs" && echo moved && exec sleep 60'
        )
        proc = subprocess.Popen(
            [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "sh", "-c", script, "sh", fake],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        with open(os.path.join(deleg, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))  # root moves it into its subtree (as systemd would)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "moved", "nobody could not move itself"
        assert os.stat(fake).st_uid == NOBODY
        yield proc.pid
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for d in (fake, os.path.dirname(fake), os.path.dirname(os.path.dirname(fake)), deleg):
            if os.path.isdir(d):
                os.rmdir(d)


__all__ = [
    "NOBODY",
    "NODE",
    "TD",
    "catalog",
    "cgroup_mounts",
    "delegated_impostor",
    "exited_process",
    "hierarchy",
    "process_in_cgroup",
    "refusal_code",
    "selectors_of",
    "sleeper",
]
