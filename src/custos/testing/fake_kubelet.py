"""A local stand-in for the kubelet's authenticated ``/pods`` endpoint (no pytest
import), for the ``k8s`` workload attestor.

:class:`FakeKubelet` is ``http.server`` in a thread on a free loopback port
(:class:`custos.testing.local_http.LoopbackServer`), over TLS with a certificate from a
CA the test makes (:mod:`custos.testing.local_tls`; ``ca_path`` is the PEM bundle to
give the attestor as ``kubelet_ca_path``).  ``GET /pods`` needs ``Authorization: Bearer
<token>`` (401 ``Unauthorized`` otherwise, as the kubelet answers) and returns a
``v1.PodList`` of :attr:`FakeKubelet.pods` (build them with :func:`pod`).

Knobs for a bad kubelet: ``raw_body`` (answer these bytes instead of the list),
``status`` (another HTTP status), ``hang`` (never answer until closed).
``requests`` counts the ``/pods`` requests served.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from custos.testing.local_http import LoopbackServer, QuietHandler
from custos.testing.local_tls import LocalTls, local_tls


def _tls(directory: str) -> LocalTls:
    return local_tls(Path(directory), ca_name="fake-kubelet-ca", server_name="fake-kubelet")


def make_ca_and_server_cert(directory: str) -> tuple[str, str, str]:
    """(CA PEM path, server certificate chain path, server key path) in ``directory``:
    a CA ``fake-kubelet-ca`` and a serving certificate for 127.0.0.1 / localhost."""
    tls = _tls(directory)
    return str(tls.ca_file), str(tls.cert_file), str(tls.key_file)


def pod(
    *,
    name: str,
    uid: str,
    namespace: str = "default",
    service_account: str = "default",
    node_name: str = "node-1",
    labels: Mapping[str, str] | None = None,
    containers: Sequence[Mapping[str, str]] = (),
    init_containers: Sequence[Mapping[str, str]] = (),
    owners: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """A ``v1.Pod`` as the kubelet lists it.  Each container mapping has ``name``,
    ``image``, and optionally ``id`` (64 hex; absent: a container still starting),
    ``runtime`` (default ``containerd``), ``image_id``.  Each owner has ``kind``,
    ``name``, ``uid`` (``metadata.ownerReferences``)."""

    def status(c: Mapping[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": c["name"],
            "image": c["image"],
            "imageID": c.get("image_id", ""),
            "ready": "id" in c,
            "restartCount": 0,
            "state": {"running": {"startedAt": "2026-12-05T08:00:00Z"}}
            if "id" in c
            else {"waiting": {"reason": "ContainerCreating"}},
        }
        if "id" in c:
            out["containerID"] = f"{c.get('runtime', 'containerd')}://{c['id']}"
        return out

    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "1",
            "creationTimestamp": "2026-12-05T08:00:00Z",
            "labels": dict(labels or {}),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": o["kind"],
                    "name": o["name"],
                    "uid": o["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
                for o in owners
            ],
        },
        "spec": {
            "serviceAccountName": service_account,
            "nodeName": node_name,
            "containers": [{"name": c["name"], "image": c["image"]} for c in containers],
            "initContainers": [{"name": c["name"], "image": c["image"]} for c in init_containers],
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [status(c) for c in containers],
            "initContainerStatuses": [status(c) for c in init_containers],
        },
    }


def pod_list(pods: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": list(pods)}


class FakeKubelet:
    """The kubelet's ``/pods`` over TLS on 127.0.0.1; a context manager."""

    def __init__(self, directory: str | None = None, *, token: str | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory() if directory is None else None
        self.directory = directory if directory is not None else self._tmp.name  # type: ignore[union-attr]
        tls = _tls(self.directory)
        self.ca_path = str(tls.ca_file)
        self.token = token if token is not None else secrets.token_urlsafe(32)
        self.token_path = os.path.join(self.directory, "token")
        with open(self.token_path, "w") as f:
            f.write(self.token + "\n")
        self.pods: list[dict[str, Any]] = []
        self.raw_body: bytes | None = None
        self.status = 200
        self.hang = False
        self.requests = 0
        self.unauthorized = 0
        owner = self

        class _Handler(QuietHandler):
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/pods":
                    return self._send(404, b"404 page not found\n", "text/plain")
                if self.headers.get("Authorization") != f"Bearer {owner.token}":
                    owner.unauthorized += 1
                    return self._send(401, b"Unauthorized", "text/plain")
                owner.requests += 1
                if owner.hang:
                    owner.closing.wait()
                    self.close_connection = True
                    return None
                if owner.raw_body is not None:
                    return self._send(owner.status, owner.raw_body, "application/json")
                body = json.dumps(pod_list(owner.pods)).encode()
                return self._send(owner.status, body, "application/json")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send(status, body, {"Content-Type": ctype})

        self._server = LoopbackServer(_Handler, tls=tls.server_context())
        self.closing = self._server.closing
        self.port = self._server.port

    def settings(self, **extra: object) -> dict[str, object]:
        """The ``k8s`` attestor's settings pointing at this kubelet."""
        return {
            "kubelet_host": "127.0.0.1",
            "kubelet_secure_port": self.port,
            "kubelet_ca_path": self.ca_path,
            "token_path": self.token_path,
            **extra,
        }

    def __enter__(self) -> FakeKubelet:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.close()
        if self._tmp is not None:
            self._tmp.cleanup()


__all__ = ["FakeKubelet", "make_ca_and_server_cert", "pod", "pod_list"]
