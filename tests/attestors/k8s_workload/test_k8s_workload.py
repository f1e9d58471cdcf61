"""The ``k8s`` workload attestor: real processes in real cgroups named as the kubelet
names them (cgroup v1 cgroupfs driver, cgroup v2 systemd driver), and a fake kubelet
(custos.testing.fake_kubelet) over HTTPS with a bearer token, speaking the real
``/pods`` PodList.  Bad kubelets (garbage, wrong status, wrong token, wrong CA,
oversized, hanging) give no selectors and a log line, never a crash or a hang."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from common import workload_rig
from common.workload_rig import (
    NOBODY,
    TD,
    delegated_impostor,
    exited_process,
    refusal_code,
    sleeper,
)
from custos.identity.ids import TrustDomain
from custos.plugin import AgentCatalog, PeerCredentials, Selector, discover
from custos.plugin.protocols import CoreConfig
from custos.testing.fake_kubelet import FakeKubelet, pod
from custos_attestors.workload.k8s import K8sWorkloadAttestor, parse_pod_list
from custos_attestors.workload.k8s.kubelet import KubeletError

LOGGER = "custos_attestors.workload.k8s"
OWNER_UID = "0b1e2c8a-5d9e-4c61-a8b4-3f0e9d7c6a51"


def new_ids() -> tuple[str, str]:
    return str(uuid.uuid4()), secrets.token_hex(32)


def cgroup_path(layout: str, pod_uid: str, cid: str) -> str:
    if layout == "v1":  # cgroupfs driver, containerd
        return f"kubepods/besteffort/pod{pod_uid}/{cid}"
    us = pod_uid.replace("-", "_")  # systemd driver, CRI-O
    return (
        "kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{us}.slice/crio-{cid}.scope"
    )


@contextmanager
def process_in_cgroup(layout: str, relative: str | None) -> Iterator[PeerCredentials]:
    """A child ``sleep`` moved into ``relative`` of the layout's hierarchy (the kernel
    refusing fails the test: never a skip); ``None``: left where it is."""
    if relative is None:
        with sleeper() as peer:
            yield peer
        return
    root = workload_rig.hierarchy(layout, "pids")
    # A private top directory per test (parallel workers share no parent), which also
    # nests the kubelet's layout under a prefix: never anchored at the root.
    relative = f"custos-{secrets.token_hex(4)}/{relative}"
    with workload_rig.process_in_cgroup(root, relative) as peer:
        yield peer


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[FakeKubelet]:
    with FakeKubelet(str(tmp_path)) as k:
        yield k


def catalog(settings: dict[str, object]) -> AbstractContextManager[AgentCatalog]:
    return workload_rig.catalog("k8s", settings)


def k8s_of(cat: AgentCatalog) -> K8sWorkloadAttestor:
    plugin = cat.workload_attestors[1].plugin
    assert isinstance(plugin, K8sWorkloadAttestor)
    return plugin


def k8s_selectors(cat: AgentCatalog, peer: PeerCredentials) -> set[str]:
    return {s.value for s in workload_rig.selectors_of(cat, peer, "k8s")}


def web_pod(pod_uid: str, cid: str, **kw: object) -> dict[str, object]:
    return pod(
        name="web-7d9f",
        uid=pod_uid,
        namespace="payments",
        service_account="web",
        node_name="node-7",
        labels={"app": "web", "tier": "front"},
        containers=[
            {
                "name": "nginx",
                "image": "registry.local/nginx:1.27",
                "id": cid,
                "image_id": "registry.local/nginx@sha256:" + "ab" * 32,
            },
            {"name": "sidecar", "image": "registry.local/envoy:1", "id": secrets.token_hex(32)},
        ],
        owners=[{"kind": "ReplicaSet", "name": "web-7d9f", "uid": OWNER_UID}],
        **kw,  # type: ignore[arg-type]
    )


def expected(pod_uid: str) -> set[str]:
    return {
        "ns:payments",
        "sa:web",
        "pod-name:web-7d9f",
        f"pod-uid:{pod_uid}",
        "pod-label:app:web",
        "pod-label:tier:front",
        "pod-owner:ReplicaSet:web-7d9f",
        f"pod-owner-uid:ReplicaSet:{OWNER_UID}",
        "pod-image-count:2",
        "pod-init-image-count:0",
        "pod-image:registry.local/nginx:1.27",
        "pod-image:registry.local/nginx@sha256:" + "ab" * 32,
        "pod-image:registry.local/envoy:1",
        "container-name:nginx",
        "container-image:registry.local/nginx:1.27",
        "container-image:registry.local/nginx@sha256:" + "ab" * 32,
        "node-name:node-7",
    }


def test_registered_as_a_builtin() -> None:
    assert "k8s" in {p.name for p in discover("workload_attestor")}


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_a_pod_container_in_a_real_cgroup(layout: str, kubelet: FakeKubelet) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [
        pod(name="other", uid=str(uuid.uuid4()), containers=[{"name": "x", "image": "x"}]),
        web_pod(pod_uid, cid),
    ]
    with (
        process_in_cgroup(layout, cgroup_path(layout, pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
    ):
        got = asyncio.run(cat.attest_workload(peer))
    assert {s.value for s in got if s.type == "k8s"} == expected(pod_uid)
    assert Selector("unix", f"uid:{os.geteuid()}") in got  # the unix attestor still runs


def test_an_init_container_and_a_cri_o_runtime(kubelet: FakeKubelet) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [
        pod(
            name="job",
            uid=pod_uid,
            init_containers=[{"name": "migrate", "image": "m:1", "id": cid, "runtime": "cri-o"}],
            containers=[{"name": "main", "image": "main:1"}],  # waiting for the init one
        )
    ]
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
    ):
        got = k8s_selectors(cat, peer)
    assert "container-name:migrate" in got and "container-image:m:1" in got
    assert {"pod-init-image-count:1", "pod-init-image:m:1", "pod-image-count:1"} <= got
    assert "pod-image:main:1" in got  # a waiting container's status still names its image


def test_the_pod_list_is_cached_for_the_ttl(kubelet: FakeKubelet) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings(cache_ttl_seconds=2.0)) as cat,
    ):
        for _ in range(5):
            assert k8s_selectors(cat, peer) == expected(pod_uid)
        assert kubelet.requests == 1
        time.sleep(2.1)  # a 2 s TTL: the five calls above fit in it even on a loaded machine
        assert k8s_selectors(cat, peer) == expected(pod_uid)
        assert kubelet.requests == 2


def test_a_process_outside_any_container_has_no_selectors_and_no_request(
    kubelet: FakeKubelet,
) -> None:
    with process_in_cgroup("v1", None) as peer, catalog(kubelet.settings()) as cat:
        assert k8s_selectors(cat, peer) == set()
    assert kubelet.requests == 0


def test_a_pod_the_kubelet_does_not_list(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(str(uuid.uuid4()), secrets.token_hex(32))]
    settings = kubelet.settings(max_poll_attempts=3, poll_retry_interval_seconds=0.01)
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(settings) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == set()
    assert kubelet.requests == 3  # the pod may be new: polled max_poll_attempts times
    assert f"lists no pod {pod_uid}" in caplog.text


def test_a_container_in_the_pod_but_not_this_one_is_refused(kubelet: FakeKubelet) -> None:
    # The cgroup names the pod and a container ID the pod does not have.
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, secrets.token_hex(32))]
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
    ):
        assert k8s_selectors(cat, peer) == set()
    assert kubelet.requests == 1  # the pod is listed and has no starting container: no re-poll


def test_a_starting_container_is_found_on_a_later_poll(kubelet: FakeKubelet) -> None:
    pod_uid, cid = new_ids()
    starting = pod(name="web-7d9f", uid=pod_uid, containers=[{"name": "nginx", "image": "n:1"}])
    kubelet.pods = [starting]
    settings = kubelet.settings(max_poll_attempts=20, poll_retry_interval_seconds=0.05)
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(settings) as cat,
    ):

        async def run() -> set[str]:
            task = asyncio.create_task(cat.attest_workload(peer))
            await asyncio.sleep(0.12)
            kubelet.pods = [
                pod(
                    name="web-7d9f",
                    uid=pod_uid,
                    containers=[{"name": "nginx", "image": "n:1", "id": cid}],
                )
            ]
            return {s.value for s in await task if s.type == "k8s"}

        got = asyncio.run(run())
    assert "container-name:nginx" in got
    assert kubelet.requests >= 2


GARBAGE = [
    b"",
    b"not json at all",
    b"[1, 2, 3]",
    b'{"kind": "Status", "items": []}',
    b'{"kind": "PodList", "items": {"a": 1}}',
    b'{"items": null}',
    b"\xff\xfe\x00garbage",
    b"[" * 100000,
]


@pytest.mark.parametrize("body", GARBAGE, ids=range(len(GARBAGE)))
def test_a_kubelet_answering_garbage(
    body: bytes, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    kubelet.raw_body = body
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == set()
    assert "no k8s selectors" in caplog.text


def test_malformed_pods_are_left_out_and_the_others_kept(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    bad = [
        "a string",
        {"metadata": "x"},
        {"metadata": {"uid": 7}},
        {"metadata": {"uid": "u", "labels": {"a": 1}}},
        {"metadata": {"uid": "u"}, "status": {"containerStatuses": [{"containerID": "nosep"}]}},
        {"metadata": {"uid": "u"}, "spec": {"containers": "x"}},
        {"metadata": {}},
    ]
    kubelet.pods = [*bad, web_pod(pod_uid, cid)]  # type: ignore[list-item]
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == expected(pod_uid)
    assert caplog.text.count("left out") == len(bad)


@pytest.mark.parametrize(
    ("change", "logged"),
    [
        ({"status": 500}, "HTTP 500"),
        ({"status": 403}, "HTTP 403"),
        ({"token": "wrong"}, "HTTP 401"),
    ],
)
def test_a_kubelet_refusing(
    change: dict[str, object],
    logged: str,
    kubelet: FakeKubelet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    if "status" in change:
        kubelet.status = int(change["status"])  # type: ignore[call-overload]
    if "token" in change:
        Path(kubelet.token_path).write_text("wrong-token")
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == set()
    assert logged in caplog.text


def test_the_token_is_read_at_each_fetch(kubelet: FakeKubelet) -> None:
    # A projected service-account token rotates: the new one is used, no restart.
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings(cache_ttl_seconds=0)) as cat,
    ):
        assert k8s_selectors(cat, peer) == expected(pod_uid)
        kubelet.token = "rotated-" + secrets.token_hex(8)
        assert k8s_selectors(cat, peer) == set()
        Path(kubelet.token_path).write_text(kubelet.token)
        assert k8s_selectors(cat, peer) == expected(pod_uid)


def test_an_oversized_answer(kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)] + [
        pod(name=f"p{i}", uid=str(uuid.uuid4()), labels={"pad": "x" * 60}) for i in range(40)
    ]
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings(max_response_bytes=4096)) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == set()
    assert "over 4096 bytes" in caplog.text


def test_a_kubelet_with_a_certificate_from_another_ca(
    kubelet: FakeKubelet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    other = tmp_path / "other"
    other.mkdir()
    from custos.testing.fake_kubelet import make_ca_and_server_cert

    other_ca, _, _ = make_ca_and_server_cert(str(other))
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings(kubelet_ca_path=other_ca)) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == set()
    assert kubelet.requests == 0
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text or "ConnectError" in caplog.text


def test_a_hanging_kubelet_times_out_once_for_concurrent_callers(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    kubelet.hang = True
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings(request_timeout_seconds=0.5)) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):

        async def many() -> list[set[str]]:
            results = await asyncio.gather(*(cat.attest_workload(peer) for _ in range(8)))
            return [{s.value for s in r if s.type == "k8s"} for r in results]

        got = asyncio.run(many())
        failures = k8s_of(cat).kubelet.failures
    assert got == [set()] * 8
    # One request timed out; the seven callers queued behind it shared its failure
    # instead of each waiting out a timeout of their own.
    assert kubelet.requests == 1
    assert failures == 1
    assert "did not answer in 0.5 s" in caplog.text


def test_a_caller_that_exited_is_denied(kubelet: FakeKubelet) -> None:
    with exited_process() as peer, catalog(kubelet.settings()) as cat:
        assert refusal_code(cat, peer) == "workload_caller_gone"


def test_a_recycled_pid_cannot_borrow_a_pod(kubelet: FakeKubelet) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    with (
        exited_process() as gone,
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as live,
        catalog(kubelet.settings()) as cat,
    ):
        peer = PeerCredentials(pid=live.pid, uid=live.uid, gid=live.gid, pidfd=gone.pidfd)
        assert refusal_code(cat, peer) == "workload_caller_gone"
        assert k8s_selectors(cat, live) == expected(pod_uid)  # its own pidfd: fine


def test_a_label_that_cannot_be_a_selector_is_left_out(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    p = web_pod(pod_uid, cid)
    p["metadata"]["labels"]["evil"] = "a\x07b"  # type: ignore[index]
    kubelet.pods = [p]
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == expected(pod_uid)
    assert "left out" in caplog.text


def test_parse_pod_list_rejects_non_pod_lists() -> None:
    for body in GARBAGE:
        with pytest.raises(KubeletError):
            parse_pod_list(body)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bogus": 1}, "unknown k8s attestor setting"),
        ({"kubelet_secure_port": 0}, "kubelet_secure_port"),
        ({"kubelet_secure_port": True}, "kubelet_secure_port"),
        ({"kubelet_host": "a/b"}, "kubelet_host"),
        ({"kubelet_ca_path": "relative.pem"}, "absolute"),
        ({"kubelet_ca_path": "/nonexistent/ca.pem"}, "not a readable PEM"),
        ({"token_path": "token", "skip_kubelet_verification": True}, "absolute"),
        ({"cache_ttl_seconds": -1}, "cache_ttl_seconds"),
        ({"cache_ttl_seconds": float("nan")}, "cache_ttl_seconds"),
        ({"max_poll_attempts": 0}, "max_poll_attempts"),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds"),
        ({"skip_kubelet_verification": "yes"}, "true or false"),
        ({"check_cgroup_owner": 1, "skip_kubelet_verification": True}, "true or false"),
    ],
)
def test_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(Exception, match=message):
        K8sWorkloadAttestor().configure(settings, CoreConfig(TrustDomain(TD)))


def test_skip_kubelet_verification_warns(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    settings = kubelet.settings(skip_kubelet_verification=True)
    del settings["kubelet_ca_path"]
    with (
        caplog.at_level(logging.WARNING, LOGGER),
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(settings) as cat,
    ):
        assert k8s_selectors(cat, peer) == expected(pod_uid)
    assert "skip_kubelet_verification is true" in caplog.text


@contextmanager
def impostor_in_delegated_subtree(pod_uid: str, cid: str) -> Iterator[PeerCredentials]:
    """``nobody``, given a delegated cgroup v2 subtree (as systemd delegates
    ``user@<uid>.service``), makes ``kubepods/pod<uid>/<id>`` in it and moves itself in:
    the rig's :func:`~common.workload_rig.delegated_impostor`, as a peer with a pidfd."""
    with delegated_impostor(workload_rig.hierarchy("v2", "pids"), pod_uid, cid) as pid:
        fd = os.pidfd_open(pid)
        try:
            yield PeerCredentials(pid=pid, uid=NOBODY, gid=NOBODY, pidfd=fd)
        finally:
            os.close(fd)


def test_check_cgroup_owner_refuses_a_cgroup_a_delegated_user_named_like_a_pod(
    kubelet: FakeKubelet,
) -> None:
    pod_uid, cid = new_ids()  # a real pod's IDs: anyone can read them from /proc/*/cgroup
    kubelet.pods = [web_pod(pod_uid, cid)]
    with impostor_in_delegated_subtree(pod_uid, cid) as peer:
        # Off (the default): the cgroup's name is all there is, and the impostor passes.
        with catalog(kubelet.settings()) as cat:
            assert k8s_selectors(cat, peer) == expected(pod_uid)
        # On: the cgroup naming the container is owned by nobody, not root: denied.
        with catalog(kubelet.settings(check_cgroup_owner=True)) as cat:
            assert refusal_code(cat, peer) == "workload_cgroup_not_runtime"


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_check_cgroup_owner_passes_runtime_made_cgroups(layout: str, kubelet: FakeKubelet) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    with (
        process_in_cgroup(layout, cgroup_path(layout, pod_uid, cid)) as peer,
        catalog(kubelet.settings(check_cgroup_owner=True)) as cat,
    ):
        assert k8s_selectors(cat, peer) == expected(pod_uid)


def test_a_container_id_listed_in_two_pods(
    kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    pod_uid, cid = new_ids()
    other = str(uuid.uuid4())
    kubelet.pods = [
        web_pod(pod_uid, cid),
        pod(name="copy", uid=other, containers=[{"name": "x", "image": "x:1", "id": cid}]),
    ]
    # The cgroup names the pod: that pod's container is the caller's.
    with (
        process_in_cgroup("v1", cgroup_path("v1", pod_uid, cid)) as peer,
        catalog(kubelet.settings()) as cat,
    ):
        assert k8s_selectors(cat, peer) == expected(pod_uid)
    # No pod UID in the cgroup (a runtime-only layout): the ID alone names neither pod.
    with (
        process_in_cgroup("v1", f"docker/{cid}") as peer,
        catalog(kubelet.settings()) as cat,
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        assert k8s_selectors(cat, peer) == set()
    assert "in two pods" in caplog.text


def test_a_container_found_by_id_alone_when_the_cgroup_names_no_pod(
    kubelet: FakeKubelet,
) -> None:
    pod_uid, cid = new_ids()
    kubelet.pods = [web_pod(pod_uid, cid)]
    with (
        process_in_cgroup("v2", f"system.slice/docker-{cid}.scope") as peer,
        catalog(kubelet.settings()) as cat,
    ):
        assert k8s_selectors(cat, peer) == expected(pod_uid)
