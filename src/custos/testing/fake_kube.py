"""A fake Kubernetes API server (TokenReview, pods, nodes), for tests and benches.

No cluster can run here, so :class:`FakeKube` is a small HTTPS server on loopback (a
thread) that speaks the real wire shapes of the three calls the ``k8s_psat`` server half
makes through the official ``kubernetes`` client:

- ``POST /apis/authentication.k8s.io/v1/tokenreviews``: the token is a projected
  service-account token this object signed (RS256, the claims the kube-apiserver puts
  in one: ``iss``, ``aud``, ``exp``, ``sub`` ``system:serviceaccount:<ns>:<sa>`` and the
  ``kubernetes.io`` pod/serviceaccount/node binding). As the kube-apiserver does, it
  answers ``authenticated: false`` for a bad signature, an expired token, no audience in
  common with ``spec.audiences``, or a bound pod that no longer exists (or exists with
  another UID); otherwise ``user.username``, ``user.extra`` with
  ``authentication.kubernetes.io/pod-name``/``pod-uid``/``node-name``/``node-uid``, and
  ``status.audiences``;
- ``GET /api/v1/namespaces/<ns>/pods/<name>`` and ``GET /api/v1/nodes/<name>``: the
  objects in :attr:`FakeKube.pods` / :attr:`FakeKube.nodes`, a ``Status`` 404 otherwise.

Every call needs ``Authorization: Bearer <bearer>`` (401 otherwise). TLS uses a CA and a
server certificate (``127.0.0.1``, ``localhost``) made by :func:`make_tls`
(:mod:`custos.testing.local_tls`), the server is a
:class:`custos.testing.local_http.StartableFake` (``start``/``stop``/``running``);
:meth:`FakeKube.write_kubeconfig` writes the kubeconfig a server half reads. ``mode``
makes TokenReview misbehave: ``"garbage"``, ``"hang"``, ``"status:<n>"``,
``"any_audience"`` (an API server that authenticates without checking audiences).
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from custos.testing.fake_azure import SigningKey
from custos.testing.local_http import QuietHandler, StartableFake
from custos.testing.local_tls import LocalTls, local_tls

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
ISSUER = "https://kubernetes.default.svc.cluster.local"
MAX_BODY = 1 << 20


#: The TLS files a :class:`FakeKube` serves with (this module's name for them).
Tls = LocalTls


def make_tls(directory: Path) -> LocalTls:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (P-256)."""
    return local_tls(directory, ca_name="fake kube CA", server_name="kube-apiserver")


@dataclass
class Node:
    name: str
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "uid": self.uid, "labels": self.labels},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
        }


@dataclass
class Pod:
    namespace: str
    name: str
    node_name: str
    service_account: str
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    labels: dict[str, str] = field(default_factory=dict)
    host_ip: str = "10.0.0.1"

    def to_json(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "labels": self.labels,
            },
            "spec": {
                "nodeName": self.node_name,
                "serviceAccountName": self.service_account,
                "containers": [{"name": "agent", "image": "custos-agent:test"}],
            },
            "status": {"phase": "Running", "hostIP": self.host_ip},
        }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKube(StartableFake):
    """One cluster's API server: its pods and nodes, and the key that signs its tokens."""

    thread_name = "fake-kube"

    def __init__(self, tls: LocalTls, *, api_audience: str = ISSUER) -> None:
        self.tls = tls
        self.key = SigningKey()
        self.api_audience = api_audience
        self.bearer = secrets.token_urlsafe(24)
        self.pods: dict[tuple[str, str], Pod] = {}
        self.nodes: dict[str, Node] = {}
        self.mode = "ok"
        self.reviews: list[dict[str, Any]] = []
        self.calls: list[str] = []
        super().__init__()

    # -- objects and tokens --
    def add_node(self, name: str, **labels: str) -> Node:
        node = Node(name, labels=dict(labels))
        self.nodes[name] = node
        return node

    def add_pod(
        self,
        namespace: str,
        name: str,
        node: Node,
        service_account: str,
        labels: dict[str, str] | None = None,
    ) -> Pod:
        pod = Pod(namespace, name, node.name, service_account, labels=dict(labels or {}))
        self.pods[(namespace, name)] = pod
        return pod

    def token(
        self,
        pod: Pod,
        audiences: list[str],
        *,
        lifetime: int = 3600,
        key: SigningKey | None = None,
        **overrides: Any,
    ) -> str:
        """A projected service-account token bound to ``pod`` (as the kubelet mounts it)."""
        now = int(time.time())
        node = self.nodes.get(pod.node_name)
        claims: dict[str, Any] = {
            "aud": audiences,
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "sub": f"system:serviceaccount:{pod.namespace}:{pod.service_account}",
            "kubernetes.io": {
                "namespace": pod.namespace,
                "pod": {"name": pod.name, "uid": pod.uid},
                "serviceaccount": {"name": pod.service_account, "uid": str(uuid.uuid4())},
                **({"node": {"name": node.name, "uid": node.uid}} if node else {}),
            },
            **overrides,
        }
        signer = key or self.key
        return signer.sign({"alg": "RS256", "kid": signer.kid}, claims)

    def review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The TokenReview status the kube-apiserver would give."""
        import base64

        def b64(part: str) -> bytes:
            return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

        def no(error: str) -> dict[str, Any]:
            return {"authenticated": False, "user": {}, "error": error}

        try:
            head, body, sig = token.split(".")
            self.key.private.public_key().verify(
                b64(sig), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            claims = json.loads(b64(body))
        except (ValueError, InvalidSignature):
            return no("[invalid bearer token, square/go-jose: error in cryptographic primitive]")
        if claims.get("iss") != ISSUER or not isinstance(claims.get("exp"), int):
            return no("invalid bearer token")
        if claims["exp"] < time.time():
            return no("[invalid bearer token, service account token has expired]")
        token_aud = claims.get("aud") or []
        wanted = audiences or [self.api_audience]
        common = [a for a in wanted if a in token_aud]
        if not common and self.mode != "any_audience":
            return no("[invalid bearer token, token audiences don't match]")
        binding = claims.get("kubernetes.io", {})
        pod_ref = binding.get("pod") or {}
        pod = self.pods.get((str(binding.get("namespace")), str(pod_ref.get("name"))))
        if pod is None or pod.uid != pod_ref.get("uid"):
            return no("[invalid bearer token, pod does not exist or its UID changed]")
        ns = claims["sub"].split(":")[2]
        extra = {
            "authentication.kubernetes.io/pod-name": [pod_ref["name"]],
            "authentication.kubernetes.io/pod-uid": [pod_ref["uid"]],
            "authentication.kubernetes.io/credential-id": [f"JTI={claims.get('jti')}"],
        }
        node_ref = binding.get("node")
        if node_ref:
            extra["authentication.kubernetes.io/node-name"] = [node_ref["name"]]
            extra["authentication.kubernetes.io/node-uid"] = [node_ref["uid"]]
        return {
            "authenticated": True,
            "user": {
                "username": claims["sub"],
                "uid": binding.get("serviceaccount", {}).get("uid", ""),
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{ns}",
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": common or token_aud,
        }

    # -- the HTTPS server --
    @property
    def url(self) -> str:
        return self.base_url

    def write_kubeconfig(self, path: Path, *, bearer: str | None = None) -> str:
        """A kubeconfig naming this server, its CA and the bearer token (JSON is YAML)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority": str(self.tls.ca_file),
                    },
                }
            ],
            "users": [{"name": "custos-server", "user": {"token": bearer or self.bearer}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "custos-server"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config), encoding="utf-8")
        return str(path)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(QuietHandler):
            disable_nagle_algorithm = True  # as Go's net/http (the kube-apiserver)

            def _send(self, status: int, body: bytes) -> None:
                self.send(status, body, {"Content-Type": "application/json"})

            def _json(self, status: int, value: Any) -> None:
                self._send(status, json.dumps(value).encode())

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {fake.bearer}":
                    return True
                self._json(401, _status(401, "Unauthorized", "Unauthorized"))
                return False

            def do_GET(self) -> None:
                fake.calls.append(f"GET {self.path}")
                if not self._authorized():
                    return
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if (
                    len(parts) == 6
                    and parts[:3] == ["api", "v1", "namespaces"]
                    and parts[4] == "pods"
                ):
                    pod = fake.pods.get((parts[3], parts[5]))
                    if pod is None:
                        self._json(404, _status(404, "NotFound", f'pods "{parts[5]}" not found'))
                    else:
                        self._json(200, pod.to_json())
                    return
                if len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
                    node = fake.nodes.get(parts[3])
                    if node is None:
                        self._json(404, _status(404, "NotFound", f'nodes "{parts[3]}" not found'))
                    else:
                        self._json(200, node.to_json())
                    return
                self._json(404, _status(404, "NotFound", "the server could not find the resource"))

            def do_POST(self) -> None:
                fake.calls.append(f"POST {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, MAX_BODY))
                if not self._authorized():
                    return
                if self.path.split("?", 1)[0] != TOKENREVIEW_PATH:
                    self._json(404, _status(404, "NotFound", "not found"))
                    return
                mode = fake.mode
                if mode == "hang":
                    fake.stopping.wait(60)
                    return
                if mode == "garbage":
                    self._send(201, b"\x00<html>definitely not a TokenReview")
                    return
                if mode.startswith("status:"):
                    code = int(mode.split(":", 1)[1])
                    self._json(code, _status(code, "InternalError", "test"))
                    return
                request = json.loads(body)
                spec = request.get("spec", {})
                fake.reviews.append(spec)
                status = fake.review(spec.get("token", ""), spec.get("audiences") or [])
                self._json(
                    201,
                    {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "metadata": {"creationTimestamp": None},
                        "spec": spec,
                        "status": status,
                    },
                )

        return Handler

    def server_tls(self) -> ssl.SSLContext:
        return self.tls.server_context()


__all__ = ["ISSUER", "TOKENREVIEW_PATH", "FakeKube", "Node", "Pod", "Tls", "make_tls"]
