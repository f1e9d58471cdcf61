"""A local stand-in for the kubelet's authenticated ``/pods`` endpoint (no pytest
import), for the ``k8s`` workload attestor.

:class:`FakeKubelet` is ``http.server`` in a thread on a free loopback port, over TLS
with a certificate from a CA the test makes (``ca_path`` is the PEM bundle to give the
attestor as ``kubelet_ca_path``).  ``GET /pods`` needs ``Authorization: Bearer
<token>`` (401 ``Unauthorized`` otherwise, as the kubelet answers) and returns a
``v1.PodList`` of :attr:`FakeKubelet.pods` (build them with :func:`pod`).

Knobs for a bad kubelet: ``raw_body`` (answer these bytes instead of the list),
``status`` (another HTTP status), ``hang`` (never answer until closed).
``requests`` counts the ``/pods`` requests served.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
import ssl
import tempfile
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca_and_server_cert(directory: str) -> tuple[str, str, str]:
    """(CA PEM path, server certificate chain path, server key path) in ``directory``:
    a CA ``fake-kubelet-ca`` and a serving certificate for 127.0.0.1 / localhost."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fake-kubelet-ca", ca_key, None, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("fake-kubelet", key, ("fake-kubelet-ca", ca_key), ca=False)
    paths = [os.path.join(directory, n) for n in ("ca.pem", "kubelet.pem", "kubelet-key.pem")]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths[0], paths[1], paths[2]


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
        self.ca_path, cert_path, key_path = make_ca_and_server_cert(self.directory)
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
        self.closing = threading.Event()
        owner = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, format: str, *args: Any) -> None:
                pass

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
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert_path, key_path)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

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
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()


__all__ = ["FakeKubelet", "make_ca_and_server_cert", "pod", "pod_list"]
