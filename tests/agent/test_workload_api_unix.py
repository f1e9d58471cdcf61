"""Two workloads under two uids, attested by the built-in ``unix`` attestor (not a
test plugin): each gets its own identity and cannot have the agent sign for the
other's. The second workload is a forked child that drops to uid 1001 (the
interpreter lives where uid 1001 cannot run it, so no fresh process)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from test_workload_api import Rig, make_rig, plugin_site  # noqa: F401

from custos._proto import wimse_v1_pb2 as wpb
from custos._proto.wimse_v1_grpc import WimseSigningStub
from custos.plugin.catalog import PluginConfig

OTHER_UID = 1001

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


@pytest.fixture
def unix_rig(plugin_site: Path) -> Iterator[Rig]:  # noqa: F811
    # Under /tmp with 0755 on the way: pytest's own tmp dirs are 0700 (root only).
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        with make_rig(Path(tmp), attestors=[PluginConfig("unix", {})]) as rig:
            rig.publish(
                rig.serve("e1", "spiffe://example.org/root-svc", custody="memory",
                          selectors=[f"unix:uid:{os.getuid()}"]),
                rig.serve("e2", "spiffe://example.org/other-svc", custody="memory",
                          selectors=[f"unix:uid:{OTHER_UID}"]),
            )
            yield rig


async def _sign(socket: Path, spiffe_id: str) -> dict[str, str]:
    channel = Channel(path=str(socket))
    try:
        reply = await WimseSigningStub(channel).SignWPT(
            wpb.SignWPTRequest(spiffe_id=spiffe_id, audience="https://b.example/"), timeout=10
        )
        return {"spiffe_id": reply.spiffe_id}
    except GRPCError as e:
        return {"status": e.status.name, "message": e.message or ""}
    finally:
        channel.close()


def _as_other_uid(socket: Path, spiffe_id: str) -> dict[str, str]:
    """SignWPT from a forked child running as OTHER_UID."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            out = asyncio.run(_sign(socket, spiffe_id))
            os.write(write, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    # A child forked from a threaded process could in principle hang on a lock
    # some other thread held at the fork: bounded here, never a hung suite.
    ready, _, _ = select.select([read], [], [], 30)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read, "rb") as f:
        data = f.read() if ready else b""
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, str] = json.loads(data)
    return result


def test_each_uid_signs_only_as_its_own_identity(unix_rig: Rig) -> None:
    sock = unix_rig.socket
    assert _as_other_uid(sock, "") == {"spiffe_id": "spiffe://example.org/other-svc"}
    assert _as_other_uid(sock, "spiffe://example.org/root-svc") == {
        "status": "PERMISSION_DENIED", "message": "no identity issued"
    }
    assert asyncio.run(_sign(sock, "")) == {"spiffe_id": "spiffe://example.org/root-svc"}
    assert asyncio.run(_sign(sock, "spiffe://example.org/other-svc")) == {
        "status": "PERMISSION_DENIED", "message": "no identity issued"
    }
