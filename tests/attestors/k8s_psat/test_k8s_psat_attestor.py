"""The k8s_psat node attestor pair through the real catalogs and entry points, the server
half talking through the official kubernetes client to a fake API server on loopback
(custos.testing.fake_kube: HTTPS with a CA this test makes, a bearer token, TokenReview,
pods and nodes) whose projected tokens are signed by a key this test makes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.node_attestor_rig import attest_flipped, attest_in_process, no_challenge
from custos.plugin import AgentCatalog, NodeAttestationResult, PluginConfig, ServerCatalog
from custos.plugin.errors import PluginCallError
from custos.testing.fake_azure import SigningKey
from custos.testing.fake_kube import FakeKube, Node, Pod, make_tls
from custos_attestors.node.k8s_psat import wire
from custos_attestors.node.k8s_psat.server import K8sPsatConfigError, parse_settings

TD = "example.org"
CLUSTER = "prod-east"
AUDIENCE = "custos-server"


@dataclass
class Kube:
    fake: FakeKube
    node: Node
    pod: Pod
    kubeconfig: str
    tmp: Path

    def token_file(self, token: str | None = None) -> str:
        path = self.tmp / "token"
        path.write_text(token if token is not None else self.fake.token(self.pod, [AUDIENCE]))
        return str(path)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tls(tmp_path_factory.mktemp("kube-tls"))


@pytest.fixture
def kube(tls: Any, tmp_path: Path) -> Iterator[Kube]:
    fake = FakeKube(tls)
    node = fake.add_node("node-a", **{"topology.kubernetes.io/zone": "z1", "pool": "blue"})
    pod = fake.add_pod(
        "custos", "custos-agent-x7k2p", node, "custos-agent", {"app": "custos-agent"}
    )
    with fake.running():
        yield Kube(fake, node, pod, fake.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path)


def cluster_table(kube: Kube, **overrides: Any) -> dict[str, Any]:
    return {
        "service_account_allow_list": ["custos:custos-agent"],
        "kube_config_file": kube.kubeconfig,
        "allowed_node_label_keys": ["topology.kubernetes.io/zone"],
        "allowed_pod_label_keys": ["app"],
        **overrides,
    }


def server(kube: Kube, api_timeout: float = 5.0, **overrides: Any) -> ServerCatalog:
    config = {"clusters": {CLUSTER: cluster_table(kube, **overrides)}, "api_timeout": api_timeout}
    return ServerCatalog.load(TD, node_attestors=[PluginConfig("k8s_psat", config)])


def agent(token_path: str, cluster: str = CLUSTER) -> AgentCatalog:
    return AgentCatalog.load(
        TD,
        node_attestors=[PluginConfig("k8s_psat", {"cluster": cluster, "token_path": token_path})],
        workload_attestors=[PluginConfig("example")],
    )


_no_challenge = no_challenge("k8s_psat")


async def attest(srv: ServerCatalog, ag: AgentCatalog) -> NodeAttestationResult:
    return await attest_in_process(srv, "k8s_psat", ag)


def refused(
    srv: ServerCatalog,
    token: str,
    caplog: pytest.LogCaptureFixture,
    cluster: str = CLUSTER,
    payload: bytes | None = None,
) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="custos_attestors.node.k8s_psat.server"):
        with pytest.raises(PluginCallError) as info:
            asyncio.run(
                srv.attest_node("k8s_psat", payload or wire.encode(cluster, token), _no_challenge)
            )
    code: str = info.value.__cause__.code  # type: ignore[union-attr]
    assert f"k8s_psat attestation refused ({code})" in caplog.text
    assert token not in caplog.text and token not in str(info.value)
    return code


def test_an_agent_attests_with_its_projected_token(kube: Kube) -> None:
    with server(kube) as srv, agent(kube.token_file()) as ag:
        result = asyncio.run(attest(srv, ag))
        # The kubelet rotates the token: the next attestation reads the new one.
        kube.token_file(kube.fake.token(kube.pod, [AUDIENCE]))
        again = asyncio.run(attest(srv, ag))
    assert str(result.agent_id) == f"spiffe://{TD}/custos/agent/k8s_psat/{CLUSTER}/{kube.node.uid}"
    assert result.can_reattest is True
    assert again.agent_id == result.agent_id
    assert {s.type for s in result.selectors} == {"k8s_psat"}
    assert sorted(s.value for s in result.selectors) == sorted(
        [
            f"cluster:{CLUSTER}",
            "agent_ns:custos",
            "agent_sa:custos-agent",
            "agent_pod_name:custos-agent-x7k2p",
            f"agent_pod_uid:{kube.pod.uid}",
            "agent_node_name:node-a",
            f"agent_node_uid:{kube.node.uid}",
            "agent_node_ip:10.0.0.1",
            "agent_node_label:topology.kubernetes.io/zone:z1",  # "pool" is not allowed
            "agent_pod_label:app:custos-agent",
        ]
    )
    # The server asked for a review with its audience, with the bearer token over TLS.
    assert kube.fake.reviews[0]["audiences"] == [AUDIENCE]
    assert kube.fake.calls[:3] == [
        "POST /apis/authentication.k8s.io/v1/tokenreviews",
        "GET /api/v1/namespaces/custos/pods/custos-agent-x7k2p",
        "GET /api/v1/nodes/node-a",
    ]


# ---- bad input: each a clean refusal with a stable code, logged ----------------------


@pytest.fixture
def srv(kube: Kube) -> Iterator[ServerCatalog]:
    with server(kube) as catalog:
        yield catalog


def test_a_token_signed_by_another_key_is_refused(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    token = kube.fake.token(kube.pod, [AUDIENCE], key=SigningKey())
    assert refused(srv, token, caplog) == "k8s_psat_not_authenticated"


def test_an_expired_token_is_refused(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    token = kube.fake.token(kube.pod, [AUDIENCE], exp=int(time.time()) - 10)
    assert refused(srv, token, caplog) == "k8s_psat_not_authenticated"


def test_a_token_for_another_audience_is_refused(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    token = kube.fake.token(kube.pod, ["vault"])
    assert refused(srv, token, caplog) == "k8s_psat_not_authenticated"
    # An API server that authenticates without honouring spec.audiences: still refused.
    kube.fake.mode = "any_audience"
    assert refused(srv, token, caplog) == "k8s_psat_wrong_audience"


def test_a_replayed_token_of_a_deleted_pod_is_refused(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    token = kube.fake.token(kube.pod, [AUDIENCE])
    asyncio.run(srv.attest_node("k8s_psat", wire.encode(CLUSTER, token), _no_challenge))
    # The pod is deleted and a new one takes its name (a StatefulSet would): the old
    # pod's token is dead, whoever holds it.
    del kube.fake.pods[("custos", kube.pod.name)]
    kube.fake.add_pod("custos", kube.pod.name, kube.node, "custos-agent")
    assert refused(srv, token, caplog) == "k8s_psat_not_authenticated"


def test_another_service_account_or_cluster_is_refused(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    other = kube.fake.add_pod("default", "web-1", kube.node, "web")
    assert refused(srv, kube.fake.token(other, [AUDIENCE]), caplog) == (
        "k8s_psat_service_account_not_allowed"
    )
    same_name_other_ns = kube.fake.add_pod("evil", "a-1", kube.node, "custos-agent")
    assert refused(srv, kube.fake.token(same_name_other_ns, [AUDIENCE]), caplog) == (
        "k8s_psat_service_account_not_allowed"
    )
    token = kube.fake.token(kube.pod, [AUDIENCE])
    assert refused(srv, token, caplog, cluster="prod-west") == "k8s_psat_unknown_cluster"


def test_a_token_without_a_pod_binding_is_refused(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    # A legacy secret-based token names no pod; the fake reviews it as unbound.
    token = kube.fake.token(kube.pod, [AUDIENCE])
    real_review = kube.fake.review

    def unbound(token: str, audiences: list[str]) -> dict[str, Any]:
        status = real_review(token, audiences)
        status["user"]["extra"] = {}
        return status

    kube.fake.review = unbound  # type: ignore[method-assign]
    assert refused(srv, token, caplog) == "k8s_psat_not_pod_bound"

    def a_user(token: str, audiences: list[str]) -> dict[str, Any]:
        status = real_review(token, audiences)
        status["user"]["username"] = "alice@example.org"
        return status

    kube.fake.review = a_user  # type: ignore[method-assign]
    assert refused(srv, token, caplog) == "k8s_psat_not_service_account"


def test_the_pod_and_node_must_agree_with_the_token(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    token = kube.fake.token(kube.pod, [AUDIENCE])
    kube.pod.service_account = "someone-else"
    assert refused(srv, token, caplog) == "k8s_psat_pod_mismatch"
    kube.pod.service_account = "custos-agent"
    # The token was issued on node-a; the pod object now says node-b.
    node_b = kube.fake.add_node("node-b")
    kube.pod.node_name = node_b.name
    assert refused(srv, token, caplog) == "k8s_psat_pod_mismatch"
    kube.pod.node_name = "node-gone"
    assert refused(srv, kube.fake.token(kube.pod, [AUDIENCE]), caplog) == "k8s_psat_node_not_found"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff",
        b"[]",
        b'{"v": 1, "cluster": "prod-east"}',
        b'{"v": 2, "cluster": "prod-east", "token": "t"}',
        b'{"v": 1, "cluster": "../x", "token": "t"}',
        b'{"v": 1, "cluster": "prod-east", "token": "a b"}',
        b'{"v": 1, "cluster": "prod-east", "token": ""}',
        b'{"v": 1, "cluster": "prod-east", "token": "t", "more": 1}',
        b"x" * (wire.MAX_MESSAGE_BYTES + 1),
    ],
)
def test_malformed_or_oversized_evidence_is_refused(
    srv: ServerCatalog, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    assert refused(srv, "unused", caplog, payload=payload) == "k8s_psat_evidence_invalid"


def test_a_garbage_token_is_refused_by_the_review(
    srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    assert refused(srv, "garbage.token.here", caplog) == "k8s_psat_not_authenticated"


@pytest.mark.parametrize("mode", ["garbage", "status:500", "status:403"])
def test_an_api_server_that_answers_garbage_is_a_clean_refusal(
    kube: Kube, srv: ServerCatalog, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    kube.fake.mode = mode
    assert refused(srv, kube.fake.token(kube.pod, [AUDIENCE]), caplog) == "k8s_psat_api_unavailable"


def test_a_hanging_api_server_times_out(kube: Kube, caplog: pytest.LogCaptureFixture) -> None:
    kube.fake.mode = "hang"
    with server(kube, api_timeout=0.5) as srv:
        start = time.monotonic()
        code = refused(srv, kube.fake.token(kube.pod, [AUDIENCE]), caplog)
        took = time.monotonic() - start
    assert code == "k8s_psat_api_unavailable"
    assert took < 5


def test_a_wrong_bearer_or_ca_is_a_clean_refusal(
    kube: Kube, tls: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = kube.fake.write_kubeconfig(tmp_path / "bad-bearer", bearer="not-the-token")
    config = {"clusters": {CLUSTER: cluster_table(kube, kube_config_file=bad)}}
    with ServerCatalog.load(TD, node_attestors=[PluginConfig("k8s_psat", config)]) as srv:
        assert refused(srv, kube.fake.token(kube.pod, [AUDIENCE]), caplog) == (
            "k8s_psat_api_unavailable"
        )
    # A kubeconfig trusting another CA: the TLS handshake fails, nothing is sent.
    other = make_tls(tmp_path / "other-ca")
    doc = json.loads(Path(kube.kubeconfig).read_text())
    doc["clusters"][0]["cluster"]["certificate-authority"] = str(other.ca_file)
    (tmp_path / "other-ca.json").write_text(json.dumps(doc))
    config = {
        "clusters": {CLUSTER: cluster_table(kube, kube_config_file=str(tmp_path / "other-ca.json"))}
    }
    reviews = len(kube.fake.reviews)
    with ServerCatalog.load(TD, node_attestors=[PluginConfig("k8s_psat", config)]) as srv:
        assert refused(srv, kube.fake.token(kube.pod, [AUDIENCE]), caplog) == (
            "k8s_psat_api_unavailable"
        )
    assert len(kube.fake.reviews) == reviews


# ---- the agent half -------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"a b c", b"x" * (wire.MAX_TOKEN_CHARS + 5)])
def test_an_unusable_token_file_is_a_clean_agent_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)

    async def exchange(message: bytes) -> bytes | None:
        raise AssertionError

    with agent(str(path)) as ag, pytest.raises(PluginCallError) as info:
        asyncio.run(ag.node_attestor.attest(exchange))
    assert info.value.__cause__.code == "k8s_psat_token_unreadable"  # type: ignore[union-attr]


def test_a_missing_token_file_is_a_clean_agent_error(tmp_path: Path) -> None:
    async def exchange(message: bytes) -> bytes | None:
        raise AssertionError

    with agent(str(tmp_path / "absent")) as ag, pytest.raises(PluginCallError) as info:
        asyncio.run(ag.node_attestor.attest(exchange))
    assert "does not exist" in str(info.value.__cause__)


# ---- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"clusters": {}},
        {"clusters": {"c": {}}},
        {"clusters": {"c": {"service_account_allow_list": []}}},
        {"clusters": {"c": {"service_account_allow_list": ["no-namespace"]}}},
        {"clusters": {"c": {"service_account_allow_list": ["a:b:c"]}}},
        {"clusters": {"c": {"service_account_allow_list": ["a:b"], "audience": []}}},
        {"clusters": {"c": {"service_account_allow_list": ["a:b"], "kube_config_file": "rel"}}},
        {"clusters": {"c": {"service_account_allow_list": ["a:b"], "bogus": 1}}},
        {"clusters": {"../c": {"service_account_allow_list": ["a:b"]}}},
        {"clusters": {"c": {"service_account_allow_list": ["a:b"]}}, "api_timeout": 0},
        {"clusters": {"c": {"service_account_allow_list": ["a:b"]}}, "mystery": 1},
    ],
)
def test_bad_server_settings_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(K8sPsatConfigError):
        parse_settings(config)


def test_an_unreadable_kubeconfig_fails_configure(tmp_path: Path) -> None:
    (tmp_path / "kubeconfig").write_text("{not yaml: [")
    config = {
        "clusters": {
            CLUSTER: {
                "service_account_allow_list": ["a:b"],
                "kube_config_file": str(tmp_path / "kubeconfig"),
            }
        }
    }
    with pytest.raises(PluginCallError) as info:
        ServerCatalog.load(TD, node_attestors=[PluginConfig("k8s_psat", config)])
    assert isinstance(info.value.__cause__, K8sPsatConfigError)


@pytest.mark.parametrize(
    "settings",
    [{}, {"cluster": ""}, {"cluster": "c", "token_path": "relative"}, {"cluster": "c", "x": 1}],
)
def test_bad_agent_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(PluginCallError):
        AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("k8s_psat", settings)],
            workload_attestors=[PluginConfig("example")],
        )


# ---- any flipped byte: a clean refusal or the very same identity ----------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_flipped_byte_is_refused_cleanly_or_changes_nothing(
    kube: Kube, srv: ServerCatalog, data: st.DataObject
) -> None:
    payload = wire.encode(CLUSTER, kube.fake.token(kube.pod, [AUDIENCE]))
    result = attest_flipped(srv, "k8s_psat", payload, data)
    if result is not None:  # not refused (a refusal must be clean: checked by the rig)
        assert result.agent_id.path == f"/custos/agent/k8s_psat/{CLUSTER}/{kube.node.uid}"


def test_without_a_kubeconfig_outside_a_cluster_configure_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In-cluster configuration needs the service host and the pod's service-account
    # files; here there are none, which is a configuration error at start.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = {"clusters": {CLUSTER: {"service_account_allow_list": ["a:b"]}}}
    with pytest.raises(PluginCallError) as info:
        ServerCatalog.load(TD, node_attestors=[PluginConfig("k8s_psat", config)])
    assert isinstance(info.value.__cause__, K8sPsatConfigError)
    assert "cannot load its Kubernetes configuration" in str(info.value.__cause__)


def test_the_agent_tables_in_agent_toml(tmp_path: Path) -> None:
    from custos.agent.config import agent_config_from_toml

    text = f"""trust_domain = "example.org"
[server]
address = "custos.example.org:8081"
bundle_file = "/etc/custos/bundle.pem"
[node_attestor.k8s_psat]
cluster = "prod-east"
token_path = "{tmp_path}/token"
"""
    plugin = agent_config_from_toml(text).node_attestor_plugin()
    assert plugin.name == "k8s_psat"
    assert dict(plugin.config) == {"cluster": "prod-east", "token_path": f"{tmp_path}/token"}
    azure = text.split("[node_attestor")[0] + '[node_attestor.azure_msi]\nresource = "api://x"\n'
    plugin = agent_config_from_toml(azure).node_attestor_plugin()
    assert (plugin.name, dict(plugin.config)) == ("azure_msi", {"resource": "api://x"})
