"""Server half of ``k8s_psat``: a TokenReview, then the pod and its node.

One attestation, in order (each refusal a :class:`K8sPsatRefusedError` with its own
code, logged at WARNING without the token):

1. the payload (:func:`.wire.decode`): the cluster's name and the token; the cluster
   must be in the ``clusters`` table (``k8s_psat_unknown_cluster``);
2. a TokenReview by that cluster's API server with ``spec.audiences`` = the cluster's
   ``audience`` (the kube-apiserver checks signature, expiry, audience and that the
   bound pod still exists with its UID): ``authenticated`` must be true
   (``k8s_psat_not_authenticated``) and ``status.audiences`` must name one of ours
   (``k8s_psat_wrong_audience``: an API server that ignored the audience);
3. the user is a service account ``system:serviceaccount:<ns>:<sa>`` on the
   ``service_account_allow_list`` and the token is bound to a pod (``extra`` pod-name
   and pod-uid, which only projected tokens carry);
4. the pod is read (its UID must be the token's, its service account the token's,
   its node set) and then its node (UID required; when the token names its node too,
   they must agree);
5. :class:`AttestedNode` ``[<cluster>, <node uid>]`` with SPIRE's selectors.

API calls go through the official ``kubernetes`` client (synchronous, so each runs in a
worker thread), with ``api_timeout`` per call and no retries; anything the API server
answers that the client cannot make sense of is ``k8s_psat_api_unavailable``.
A projected token is short-lived and bound to its pod, so the attestor re-attests
(``supports_reattestation``: the agent sends its current token at every renewal).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from custos._numbers import InvalidNumberError, seconds
from custos.errors import CustosError
from custos.plugin.protocols import AttestedNode, Challenge, CoreConfig
from custos_attestors.node.k8s_psat import wire

NAME = "k8s_psat"
DEFAULT_AUDIENCE = ("custos-server",)
DEFAULT_API_TIMEOUT = 5.0
MAX_CLUSTERS = 64
MAX_LIST = 1024
_SA_PREFIX = "system:serviceaccount:"
_EXTRA = "authentication.kubernetes.io/"
log = logging.getLogger(__name__)


class K8sPsatConfigError(CustosError, ValueError):
    code = "k8s_psat_config"


class K8sPsatRefusedError(CustosError):
    """The token was refused; ``code`` says why."""

    code = "k8s_psat_refused"


def _refuse(code: str, message: str) -> K8sPsatRefusedError:
    return K8sPsatRefusedError(message, code=code)


def _strings(value: object, what: str, *, allow_empty: bool = True) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_LIST
        or not all(isinstance(v, str) and 0 < len(v) <= 512 and v.isprintable() for v in value)
        or (not value and not allow_empty)
    ):
        raise K8sPsatConfigError(f"{what} must be a list of non-empty strings")
    return tuple(value)


@dataclass
class Cluster:
    name: str
    service_accounts: frozenset[str]
    audience: tuple[str, ...]
    kube_config_file: str | None
    node_label_keys: frozenset[str]
    pod_label_keys: frozenset[str]
    api: Any = None  # kubernetes.client.ApiClient, made at configure time


def parse_settings(config: Mapping[str, object]) -> tuple[dict[str, Cluster], float]:
    unknown = set(config) - {"clusters", "api_timeout"}
    if unknown:
        raise K8sPsatConfigError(f"unknown k8s_psat settings: {', '.join(sorted(unknown))}")
    try:
        timeout = seconds(
            config.get("api_timeout", DEFAULT_API_TIMEOUT),
            name="api_timeout",
            minimum=0.01,
            maximum=120,
        )
    except InvalidNumberError as e:
        raise K8sPsatConfigError(e.message) from None
    raw = config.get("clusters")
    if not isinstance(raw, Mapping) or not raw or len(raw) > MAX_CLUSTERS:
        raise K8sPsatConfigError(
            f'k8s_psat needs a "clusters" table: 1 to {MAX_CLUSTERS} sub-tables, one per '
            "cluster name the agents send"
        )
    clusters: dict[str, Cluster] = {}
    for name, table in raw.items():
        try:
            wire.check_cluster(name)
        except wire.K8sPsatEvidenceError as e:
            raise K8sPsatConfigError(f"cluster {name!r:.80}: {e.message}") from None
        if not isinstance(table, Mapping):
            raise K8sPsatConfigError(f"cluster {name}: must be a table")
        extra = set(table) - {
            "service_account_allow_list",
            "audience",
            "kube_config_file",
            "allowed_node_label_keys",
            "allowed_pod_label_keys",
        }
        if extra:
            raise K8sPsatConfigError(
                f"cluster {name}: unknown settings: {', '.join(sorted(extra))}"
            )
        accounts = _strings(
            table.get("service_account_allow_list"),
            f"cluster {name}: service_account_allow_list",
            allow_empty=False,
        )
        for account in accounts:
            ns, _, sa = account.partition(":")
            if not ns or not sa or ":" in sa:
                raise K8sPsatConfigError(
                    f"cluster {name}: service account {account!r:.80} must be <namespace>:<name>"
                )
        audience = _strings(
            table.get("audience", list(DEFAULT_AUDIENCE)),
            f"cluster {name}: audience",
            allow_empty=False,
        )
        kube_config = table.get("kube_config_file")
        if kube_config is not None and (
            not isinstance(kube_config, str)
            or not os.path.isabs(kube_config)
            or "\0" in kube_config
        ):
            raise K8sPsatConfigError(f"cluster {name}: kube_config_file must be an absolute path")
        clusters[name] = Cluster(
            name=name,
            service_accounts=frozenset(accounts),
            audience=audience,
            kube_config_file=kube_config,
            node_label_keys=frozenset(
                _strings(table.get("allowed_node_label_keys", []), "allowed_node_label_keys")
            ),
            pod_label_keys=frozenset(
                _strings(table.get("allowed_pod_label_keys", []), "allowed_pod_label_keys")
            ),
        )
    return clusters, timeout


def _api_client(cluster: Cluster) -> Any:
    from kubernetes import client, config  # type: ignore[import-untyped]

    configuration = client.Configuration()
    try:
        if cluster.kube_config_file is not None:
            config.load_kube_config(
                config_file=cluster.kube_config_file, client_configuration=configuration
            )
        else:
            config.load_incluster_config(client_configuration=configuration)
    except Exception as e:  # noqa: BLE001 -- the client raises ConfigException, OSError, YAML errors...
        raise K8sPsatConfigError(
            f"cluster {cluster.name}: cannot load its Kubernetes configuration: {e}"
        ) from None
    # One attempt per call: the attestation has its own deadline, and a retry loop
    # inside urllib3 would hide a hanging API server from it.
    configuration.retries = 0
    return client.ApiClient(configuration)


def _one(extra: Mapping[str, Any], key: str) -> str | None:
    values = extra.get(_EXTRA + key)
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return None


class K8sPsatServerAttestor:
    """The ``k8s_psat`` node attestor, server half (see the module docstring)."""

    def __init__(self) -> None:
        self._clusters: dict[str, Cluster] = {}
        self._timeout = DEFAULT_API_TIMEOUT
        #: Refusals since start (each is also logged at WARNING).
        self.refusals = 0

    @property
    def supports_reattestation(self) -> bool:
        return True

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        clusters, timeout = parse_settings({k: v for k, v in config.items() if k != "datastore"})
        try:
            for cluster in clusters.values():
                cluster.api = _api_client(cluster)
        except BaseException:
            for cluster in clusters.values():
                if cluster.api is not None:
                    cluster.api.close()
            raise
        self._clusters, self._timeout = clusters, timeout

    def close(self) -> None:
        for cluster in self._clusters.values():
            if cluster.api is not None:
                cluster.api.close()
        self._clusters = {}

    async def attest(self, payload: bytes) -> AsyncGenerator[Challenge | AttestedNode, bytes]:
        if not self._clusters:
            raise RuntimeError("k8s_psat is not configured")
        try:
            node = await self._verify(payload)
        except (K8sPsatRefusedError, wire.K8sPsatEvidenceError) as e:
            self.refusals += 1
            log.warning("k8s_psat attestation refused (%s): %s", e.code, e.message)
            raise
        yield node

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """One API call in a worker thread; a 404 is ``None``, anything else that is
        not an answer is ``k8s_psat_api_unavailable``."""
        from kubernetes.client.exceptions import ApiException  # type: ignore[import-untyped]

        def run() -> Any:
            return fn(*args, _request_timeout=self._timeout)

        try:
            return await asyncio.to_thread(run)
        except ApiException as e:
            if e.status == 404:
                return None
            raise _refuse(
                "k8s_psat_api_unavailable", f"the API server refused the {what}: HTTP {e.status}"
            ) from None
        except Exception as e:
            raise _refuse(
                "k8s_psat_api_unavailable",
                f"the API server gave no usable answer to the {what}: {type(e).__name__}",
            ) from e

    async def _verify(self, payload: bytes) -> AttestedNode:
        from kubernetes import client

        cluster_name, token = wire.decode(payload)
        cluster = self._clusters.get(cluster_name)
        if cluster is None:
            raise _refuse("k8s_psat_unknown_cluster", f"cluster {cluster_name!r} is not configured")
        api = cluster.api

        # -- 2: the review --
        review = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=list(cluster.audience))
        )
        answer = await self._call(
            "TokenReview", client.AuthenticationV1Api(api).create_token_review, review
        )
        status = getattr(answer, "status", None)
        if answer is None or not isinstance(status, client.V1TokenReviewStatus):
            raise _refuse("k8s_psat_api_unavailable", "the API server answered no TokenReview")
        if status.authenticated is not True:
            reason = str(status.error or "no reason given")[:200]
            raise _refuse(
                "k8s_psat_not_authenticated",
                f"cluster {cluster_name} did not authenticate the token: {reason}",
            )
        if not set(status.audiences or ()) & set(cluster.audience):
            raise _refuse(
                "k8s_psat_wrong_audience",
                f"the token is not for the audience {list(cluster.audience)}",
            )

        # -- 3: the service account and the pod binding --
        user = status.user
        username = getattr(user, "username", None)
        if not isinstance(username, str) or not username.startswith(_SA_PREFIX):
            raise _refuse("k8s_psat_not_service_account", "the token is not a service account's")
        namespace, _, account = username[len(_SA_PREFIX) :].partition(":")
        if not namespace or not account or ":" in account:
            raise _refuse("k8s_psat_not_service_account", "malformed service account user name")
        if f"{namespace}:{account}" not in cluster.service_accounts:
            raise _refuse(
                "k8s_psat_service_account_not_allowed",
                f"service account {namespace}:{account} may not attest in cluster {cluster_name}",
            )
        extra = getattr(user, "extra", None) or {}
        pod_name, pod_uid = _one(extra, "pod-name"), _one(extra, "pod-uid")
        if pod_name is None or pod_uid is None:
            raise _refuse(
                "k8s_psat_not_pod_bound",
                "the token is not bound to a pod (a legacy or non-projected token)",
            )

        # -- 4: the pod and its node --
        core = client.CoreV1Api(api)
        pod = await self._call("pod read", core.read_namespaced_pod, pod_name, namespace)
        if pod is None:
            raise _refuse("k8s_psat_pod_not_found", f"pod {namespace}/{pod_name} does not exist")
        try:
            if pod.metadata.uid != pod_uid:
                raise _refuse("k8s_psat_pod_mismatch", "the pod's UID is not the token's")
            if pod.spec.service_account_name != account:
                raise _refuse("k8s_psat_pod_mismatch", "the pod runs another service account")
            node_name = pod.spec.node_name
            host_ip = pod.status.host_ip if pod.status is not None else None
            pod_labels = pod.metadata.labels or {}
        except AttributeError:
            raise _refuse("k8s_psat_api_unavailable", "the pod object is incomplete") from None
        if not isinstance(node_name, str) or not node_name:
            raise _refuse("k8s_psat_pod_mismatch", "the pod is not scheduled on a node")
        token_node, token_node_uid = _one(extra, "node-name"), _one(extra, "node-uid")
        if token_node is not None and token_node != node_name:
            raise _refuse("k8s_psat_pod_mismatch", "the token and the pod name different nodes")
        node = await self._call("node read", core.read_node, node_name)
        if node is None:
            raise _refuse("k8s_psat_node_not_found", f"node {node_name} does not exist")
        node_uid = getattr(node.metadata, "uid", None)
        if not isinstance(node_uid, str) or not wire.CLUSTER_RE.fullmatch(node_uid):
            raise _refuse("k8s_psat_api_unavailable", "the node has no usable UID")
        if token_node_uid is not None and token_node_uid != node_uid:
            raise _refuse("k8s_psat_pod_mismatch", "the token was issued on another node")
        node_labels = node.metadata.labels or {}

        selectors: list[str] = [
            f"cluster:{cluster_name}",
            f"agent_ns:{namespace}",
            f"agent_sa:{account}",
            f"agent_pod_name:{pod_name}",
            f"agent_pod_uid:{pod_uid}",
            f"agent_node_name:{node_name}",
            f"agent_node_uid:{node_uid}",
        ]
        if isinstance(host_ip, str) and host_ip:
            selectors.append(f"agent_node_ip:{host_ip}")
        selectors += _labels("agent_node_label", node_labels, cluster.node_label_keys)
        selectors += _labels("agent_pod_label", pod_labels, cluster.pod_label_keys)
        return AttestedNode(agent_path=[cluster_name, node_uid], selectors=selectors)


def _labels(kind: str, labels: Mapping[str, Any], allowed: frozenset[str]) -> Sequence[str]:
    return [
        f"{kind}:{key}:{value}"
        for key, value in sorted(labels.items())
        if key in allowed and isinstance(value, str)
    ]


__all__ = ["K8sPsatConfigError", "K8sPsatRefusedError", "K8sPsatServerAttestor", "parse_settings"]
