"""The ``docker`` workload attestor against a real Docker engine and real containers
(the local ``custos-swtpm`` image, see src/custos/testing/docker.py), and a small fake
Engine API on a Unix socket only for the garbage an engine could answer.

Needs an engine: ``make test`` starts one (``make docker-up`` for direct pytest runs);
without it the fixtures fail with that instruction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

import custos
from common import agent_rig
from common.agent_rig import add_entry, agent_config
from custos.agent.app import Agent
from custos.identity import TrustDomain
from custos.plugin.protocols import CoreConfig, PeerCredentials
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerRig, running_server
from custos_attestors.workload.cgroups import CgroupError
from custos_attestors.workload.docker import (
    DockerAttestorConfigError,
    DockerWorkloadAttestor,
    selectors_from_inspect,
)

pytestmark = pytest.mark.xdist_group("docker")
rig, base = agent_rig.rig, agent_rig.base  # the shared fixtures (the end-to-end test)

BOUND = 60.0
CORE = CoreConfig(TrustDomain("example.org"))


def docker(*args: str, timeout: float = BOUND) -> str:
    out = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


class Container:
    def __init__(self, cid: str) -> None:
        self.id = cid
        self.pid = int(docker("inspect", "-f", "{{.State.Pid}}", cid))

    def peer(self) -> PeerCredentials:
        return PeerCredentials(self.pid, 0, 0, os.pidfd_open(self.pid))


@pytest.fixture
def run_container(docker_image: str) -> Iterator[Callable[..., Container]]:
    started: list[str] = []

    def run(*options: str, command: tuple[str, ...] = ("sleep", "300")) -> Container:
        cid = docker("run", "-d", "--rm", *options, docker_image, *command)
        started.append(cid)
        return Container(cid)

    yield run
    for cid in started:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=BOUND)


def attestor(**config: object) -> DockerWorkloadAttestor:
    a = DockerWorkloadAttestor()
    a.configure(config, CORE)
    return a


def own_peer() -> PeerCredentials:
    return PeerCredentials(os.getpid(), os.getuid(), os.getgid(), os.pidfd_open(os.getpid()))


# ---- real containers ------------------------------------------------------------------------


def test_a_real_container_gets_its_labels_image_and_allowlisted_env(
    run_container: Callable[..., Container], docker_image: str
) -> None:
    c = run_container(
        "--label",
        "app=web",
        "--label",
        "tier=front",
        "-e",
        "REGION=eu-1",
        "-e",
        "DB_PASSWORD=hunter2",
    )
    image_id = docker("inspect", "-f", "{{.Image}}", c.id)
    a = attestor(env_allowlist=["REGION"])
    values = asyncio.run(a.attest(c.peer()))
    assert set(values) == {
        "label:app:web",
        "label:tier:front",
        f"image_id:{docker_image}",
        f"image_id:{image_id}",
        "env:REGION=eu-1",
    }
    # names not in env_allowlist never become selectors (secrets stay out of the server)
    assert not any("DB_PASSWORD" in v or "PATH=" in v for v in values)
    assert not any(v.startswith("env:") for v in asyncio.run(attestor().attest(c.peer())))


def test_a_process_outside_any_container_gets_no_docker_selectors() -> None:
    assert asyncio.run(attestor().attest(own_peer())) == []


def test_the_lookup_is_cached_per_container_for_cache_ttl(
    run_container: Callable[..., Container],
) -> None:
    c = run_container("--label", "app=cached")
    a = attestor(cache_ttl=2.0)

    async def main() -> None:
        first = await a.attest(c.peer())
        assert a.cache.misses == 1 and a.cache.hits == 0
        assert await a.attest(c.peer()) == first
        assert a.cache.hits == 1 and len(a.cache) == 1
        await asyncio.sleep(2.1)
        assert await a.attest(c.peer()) == first
        assert a.cache.misses == 2  # expired: asked the engine again

    asyncio.run(main())
    uncached = attestor(cache_ttl=0)
    for _ in range(2):
        asyncio.run(uncached.attest(c.peer()))
    assert len(uncached.cache) == 0


def test_a_caller_that_exited_is_refused_not_attested(
    run_container: Callable[..., Container],
) -> None:
    """The pidfd rule: a container process that is gone (its PID free for anyone)
    gets no container's identity."""
    c = run_container("--label", "app=gone")
    peer = c.peer()
    docker("kill", c.id)
    deadline = time.monotonic() + BOUND
    while os.path.exists(f"/proc/{c.pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(CgroupError) as e:
        asyncio.run(attestor().attest(peer))
    assert e.value.code == "workload_caller_gone"


def _cgroup_procs(cid: str) -> list[int]:
    with open(f"/sys/fs/cgroup/pids/docker/{cid}/cgroup.procs") as f:
        return [int(x) for x in f.read().split()]


def test_a_docker_exec_process_is_attested_as_its_container(
    run_container: Callable[..., Container],
) -> None:
    c = run_container("--label", "app=exec")
    docker("exec", "-d", c.id, "sleep", "301")
    deadline = time.monotonic() + BOUND
    while len(_cgroup_procs(c.id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    (other,) = [p for p in _cgroup_procs(c.id) if p != c.pid]
    peer = PeerCredentials(other, 0, 0, os.pidfd_open(other))
    assert "label:app:exec" in asyncio.run(attestor().attest(peer))


def test_a_host_process_in_a_container_cgroup_does_not_get_its_selectors(
    run_container: Callable[..., Container], caplog: pytest.LogCaptureFixture
) -> None:
    """Root (or a delegated subtree) can put a process in a cgroup named like a
    container: the cgroup file then names the container, but the process is not in
    the container's mount namespace, so it gets no docker selectors."""
    c = run_container("--label", "app=victim")
    intruder = subprocess.Popen(["sleep", "300"])
    try:
        with open(f"/sys/fs/cgroup/pids/docker/{c.id}/cgroup.procs", "w") as f:
            f.write(str(intruder.pid))
        with open(f"/proc/{intruder.pid}/cgroup") as f:
            assert c.id in f.read()  # the cgroup file does name the container
        peer = PeerCredentials(intruder.pid, 0, 0, os.pidfd_open(intruder.pid))
        a = attestor()
        assert asyncio.run(a.attest(c.peer()))  # the container's own process: selectors
        assert asyncio.run(a.attest(peer)) == []  # cached entry, same refusal
        assert any("not in its mount namespace" in r.getMessage() for r in caplog.records)
        assert asyncio.run(attestor().attest(peer)) == []  # and on a fresh lookup
        # what the check stops: without it the intruder is the container
        unchecked = attestor(check_mount_namespace=False)
        assert "label:app:victim" in asyncio.run(unchecked.attest(peer))
    finally:
        intruder.kill()
        intruder.wait()


def test_a_restarted_container_is_looked_up_again(
    run_container: Callable[..., Container],
) -> None:
    """Its process and mount namespace are new: the cached namespace is stale, so the
    attestor asks the engine once more instead of refusing until the TTL ends."""
    c = run_container("--label", "app=restarted")
    a = attestor(cache_ttl=3600)
    assert "label:app:restarted" in asyncio.run(a.attest(c.peer()))
    docker("restart", "-t", "0", c.id)
    again = Container(c.id)
    assert again.pid != c.pid
    assert "label:app:restarted" in asyncio.run(a.attest(again.peer()))
    assert a.cache.misses == 1 and a.cache.hits == 1 and len(a.cache) == 1


# ---- a fake Engine API that answers garbage (for that case only) --------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeEngine:
    """``GET /containers/<id>/json`` answered by ``self.answer(container_id)`` ->
    (status, headers, body); ``self.hang`` blocks the answer until released."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answer: Callable[[str], tuple[int, dict[str, str], bytes]] = lambda cid: (
            404,
            {},
            b"{}",
        )
        self.hang = threading.Event()
        self.release = threading.Event()
        self.requests: list[str] = []
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

            def do_GET(self) -> None:
                engine.requests.append(self.path)
                if engine.hang.is_set():
                    engine.release.wait(30)
                    return
                cid = self.path.split("/")[2] if self.path.startswith("/containers/") else ""
                status, headers, body = engine.answer(cid)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up on an oversized answer

        self.server = _UnixHTTPServer(path, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    d = tempfile.mkdtemp(prefix="custos-fde-")
    engine = FakeEngine(f"{d}/docker.sock")
    yield engine
    engine.close()
    Path(engine.path).unlink(missing_ok=True)
    os.rmdir(d)


@pytest.fixture
def real_container(run_container: Callable[..., Container]) -> Container:
    """A real container process: its cgroup names a container ID (the fake engine
    is then asked about it)."""
    return run_container("--label", "app=real")


def _doc(cid: str, pid: int = 0, **config: object) -> bytes:
    base: dict[str, object] = {"Labels": {"app": "fake"}, "Env": [], "Image": "img"}
    base.update(config)
    return json.dumps(
        {"Id": cid, "Image": "sha256:" + "ab" * 32, "Config": base, "State": {"Pid": pid}}
    ).encode()


GARBAGE: dict[str, Callable[[str], tuple[int, dict[str, str], bytes]]] = {
    "not JSON": lambda cid: (200, {}, b"<html>oops</html>"),
    "not UTF-8 JSON": lambda cid: (200, {}, b"\xff\xfe{"),
    "a JSON array": lambda cid: (200, {}, b"[1, 2]"),
    "another container": lambda cid: (200, {}, _doc("f" * 64)),
    "no Config": lambda cid: (200, {}, json.dumps({"Id": cid}).encode()),
    "labels not strings": lambda cid: (200, {}, _doc(cid, Labels={"a": 1})),
    "env not a list": lambda cid: (200, {}, _doc(cid, Env="A=1")),
    "image not a string": lambda cid: (200, {}, _doc(cid, Image=["x"])),
    "too many labels": lambda cid: (200, {}, _doc(cid, Labels={f"l{i}": "v" for i in range(300)})),
    "oversized, declared": lambda cid: (200, {}, b"{" + b" " * (2 << 20) + b"}"),
    "oversized, chunked": lambda cid: (
        200,
        {"Transfer-Encoding": "chunked"},
        b"".join(b"%x\r\n%s\r\n" % (65536, b" " * 65536) for _ in range(40)) + b"0\r\n\r\n",
    ),
    "HTTP 500": lambda cid: (500, {}, b'{"message": "boom"}'),
    "no running process": lambda cid: (200, {}, _doc(cid, 0)),
    "State.Pid not a number": lambda cid: (200, {}, _doc(cid, "1")),  # type: ignore[arg-type]
    "unknown container": lambda cid: (404, {}, b'{"message": "No such container"}'),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_from_the_engine_is_no_selectors_and_a_log_line(
    kind: str,
    fake_engine: FakeEngine,
    real_container: Container,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_engine.answer = GARBAGE[kind]
    a = attestor(docker_socket_path=f"unix://{fake_engine.path}")
    caplog.set_level(logging.INFO, logger="custos_attestors.workload.docker")
    assert asyncio.run(a.attest(real_container.peer())) == []
    assert fake_engine.requests == [f"/containers/{real_container.id}/json"]
    lines = [r for r in caplog.records if r.name.startswith("custos_attestors.workload.docker")]
    assert len(lines) == 1 and "no docker selectors" in lines[0].getMessage()
    assert real_container.id[:12] in lines[0].getMessage() or "knows no" in lines[0].getMessage()
    if kind.startswith("oversized"):
        assert "over 1048576" in lines[0].getMessage()  # refused by size, not by parsing
    assert len(a.cache) == 0  # a failure is not cached: the next call asks again


def test_the_fake_engine_speaks_the_real_shape(
    fake_engine: FakeEngine, real_container: Container
) -> None:
    """Control: the fake's well-formed answer is read like the real engine's."""
    fake_engine.answer = lambda cid: (200, {}, _doc(cid, real_container.pid))
    a = attestor(docker_socket_path=f"unix://{fake_engine.path}")
    assert asyncio.run(a.attest(real_container.peer())) == [
        "label:app:fake",
        "image_id:img",
        "image_id:sha256:" + "ab" * 32,
    ]


def test_callers_of_one_new_container_share_one_engine_call(
    fake_engine: FakeEngine, real_container: Container
) -> None:
    def slow(cid: str) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.2)
        return 200, {}, _doc(cid, real_container.pid)

    fake_engine.answer = slow
    a = attestor(docker_socket_path=fake_engine.path)

    async def main() -> list[list[str]]:
        return list(await asyncio.gather(*(a.attest(real_container.peer()) for _ in range(20))))

    results = asyncio.run(main())
    assert all(r == results[0] and "label:app:fake" in r for r in results)
    assert len(fake_engine.requests) == 1


def test_an_engine_that_hangs_is_given_up_on_within_api_timeout(
    fake_engine: FakeEngine, real_container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    fake_engine.hang.set()
    a = attestor(docker_socket_path=fake_engine.path, api_timeout=0.3)
    t0 = time.monotonic()
    assert asyncio.run(a.attest(real_container.peer())) == []
    assert time.monotonic() - t0 < 10.0  # the fake holds the answer for 30 s
    assert any("did not answer within 0.3 s" in r.getMessage() for r in caplog.records)


def test_no_engine_at_the_socket_is_no_selectors_and_a_log_line(
    real_container: Container, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = attestor(docker_socket_path=str(tmp_path / "nothing.sock"))
    assert asyncio.run(a.attest(real_container.peer())) == []
    assert any("could not be asked" in r.getMessage() for r in caplog.records)


# ---- documents and settings ------------------------------------------------------------------


def test_values_custos_cannot_compare_are_left_out_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cid = "c" * 64
    doc = json.loads(_doc(cid, Labels={"ok": "1", "bad": "a\nb", "long": "x" * 2000}))
    assert selectors_from_inspect(doc, cid, frozenset()) == [
        "label:ok:1",
        "image_id:img",
        "image_id:sha256:" + "ab" * 32,
    ]
    assert len([r for r in caplog.records if "left out" in r.getMessage()]) == 2


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"nope": 1}, "unknown docker attestor setting"),
        ({"docker_socket_path": "tcp://127.0.0.1:2375"}, "docker_socket_path"),
        ({"docker_socket_path": "relative.sock"}, "docker_socket_path"),
        ({"env_allowlist": "REGION"}, "env_allowlist must be a list"),
        ({"env_allowlist": ["A=B"]}, "not a variable name"),
        ({"cache_ttl": -1}, "cache_ttl must be from"),
        ({"cache_ttl": True}, "cache_ttl must be a number"),
        ({"api_timeout": 0}, "api_timeout must be from"),
        ({"max_response_bytes": 0}, "max_response_bytes must be from"),
        ({"cache_entries": "10"}, "cache_entries must be an integer"),
        ({"check_mount_namespace": "yes"}, "check_mount_namespace must be true or false"),
    ],
)
def test_bad_settings_are_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(DockerAttestorConfigError, match=message) as e:
        attestor(**config)
    assert e.value.code == "docker_attestor_config"


# ---- end to end: a container fetches its SVID through the agent's socket --------------------


def _mounts() -> list[str]:
    """The interpreter, the venv and the checkout, read-only at the same paths, so the
    container runs this very `custos` CLI (the image has python3 of the same Debian)."""
    checkout = Path(custos.__file__).resolve().parents[2]
    paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), checkout}
    out: list[str] = []
    for p in sorted(paths):
        out += ["-v", f"{p}:{p}:ro"]
    return out


def test_a_container_fetches_its_svid_by_docker_label_through_the_mounted_socket(
    docker_image: str, rig: ServerRig, base: Path
) -> None:
    label = uuid.uuid4().hex[:12]
    web = "spiffe://example.org/docker/web"
    cli = f"{sys.prefix}/bin/custos"

    def fetch(value: str, out: Path) -> subprocess.CompletedProcess[str]:
        out.mkdir()
        return subprocess.run(
            [
                "docker", "run", "--rm", "--label", f"custos.test={value}",
                "-v", f"{base}:/run/custos", "-v", f"{out}:/out", *_mounts(),
                docker_image, cli, "x509", "fetch", "--out", "/out",
                "--socket", "unix:///run/custos/agent.sock", "--timeout", "20",
            ],
            capture_output=True, text=True, timeout=BOUND,
        )  # fmt: skip

    async def main() -> None:
        async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
            attestors = '[workload_attestors.docker]\nenv_allowlist = ["REGION"]\n'
            config = await agent_config(srv, base, attestors=attestors)
            async with Agent(config) as agent:
                await add_entry(admin, agent, web, [f"docker:label:custos.test:{label}"])
                ok = await asyncio.to_thread(fetch, label, base / "out-ok")
                assert ok.returncode == 0, ok.stderr
                other = await asyncio.to_thread(fetch, "another", base / "out-other")
                # another label: the same image, uid and socket, but no identity
                assert other.returncode == 1
                assert "workload_api_permission_denied" in other.stderr, other.stderr
                assert not (base / "out-other" / "svid.pem").exists()

    asyncio.run(main())
    cert = x509.load_pem_x509_certificate((base / "out-ok" / "svid.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [web]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    config=st.dictionaries(st.sampled_from(["Labels", "Env", "Image", "Other"]), _json, max_size=4),
    image=_json,
    same_id=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_any_document_is_selectors_or_a_lookup_error(
    config: dict[str, object], image: object, same_id: bool
) -> None:
    """Whatever JSON the engine sends: valid selector values or ContainerLookupError,
    never another exception (the attestor turns the error into no selectors)."""
    from custos.identity.selector import check_selector_value
    from custos_attestors.workload.docker import ContainerLookupError

    cid = "d" * 64
    doc = {"Id": cid if same_id else "e" * 64, "Config": config, "Image": image}
    try:
        values = selectors_from_inspect(doc, cid, frozenset({"A"}))
    except ContainerLookupError:
        return
    assert all(check_selector_value(v) == v for v in values)
