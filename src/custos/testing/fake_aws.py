"""Local stand-ins for the AWS services the ``aws_iid`` attestor talks to (no pytest
import): IMDSv2 and EC2's ``DescribeInstances``, speaking the real wire shapes.

- :class:`AwsSigner` is "AWS" for a test: an RSA-2048 key and a self-signed
  certificate (PEM, for the server half's ``certificates``) that signs instance
  identity documents the way AWS signs the ``signature`` variant (RSA PKCS#1 v1.5,
  SHA-256 over the document bytes, served base64 in 64-column lines).
- :class:`FakeImds` serves ``PUT /latest/api/token`` (needs the TTL header, returns
  a session token) and ``GET /latest/dynamic/instance-identity/{document,signature}``
  (need that token: 401 otherwise).  Knobs for bad services: ``hang`` (never
  answers until closed), ``fail_first`` (that many 503s), ``oversize``,
  ``signature_body`` (served instead of the signature).
- :class:`FakeEc2` answers the EC2 Query API's ``DescribeInstances`` (form POST, XML
  answer; ``InvalidInstanceID.NotFound`` for an unknown instance), for boto3 pointed
  at it with ``endpoint_url``.

Both are :class:`custos.testing.local_http.LocalHttpServer` (``http.server`` in a
thread on a free loopback port; ``hang`` and ``fail_first`` come from there); use as
context managers.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from xml.sax.saxutils import escape

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from custos.testing.local_http import LocalHttpServer, Response


def self_signed(common_name: str, key: rsa.RSAPrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )


class AwsSigner:
    """A test's "AWS": signs instance identity documents."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.certificate = self_signed("Amazon Web Services LLC (test)", self.key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, document: bytes) -> bytes:
        return self.key.sign(document, padding.PKCS1v15(), hashes.SHA256())

    def signed(self, **fields: object) -> tuple[bytes, bytes]:
        """(document, raw signature) for a document with ``fields`` over the defaults."""
        document = identity_document(**fields)
        return document, self.sign(document)


def identity_document(**fields: object) -> bytes:
    """An instance identity document shaped like AWS's (pretty-printed JSON)."""
    doc: dict[str, object] = {
        "accountId": "123456789012",
        "architecture": "x86_64",
        "availabilityZone": "us-west-2b",
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": "ami-5fb8c835",
        "instanceId": "i-1234567890abcdef0",
        "instanceType": "t2.micro",
        "kernelId": None,
        "pendingTime": "2026-11-19T16:32:11Z",
        "privateIp": "10.158.112.84",
        "ramdiskId": None,
        "region": "us-west-2",
        "version": "2017-09-30",
    }
    doc.update(fields)
    return json.dumps(doc, indent=2).encode()


def b64_lines(data: bytes) -> bytes:
    """Base64 in 64-column lines, as IMDS serves the signature."""
    text = base64.b64encode(data)
    return b"\n".join(text[i : i + 64] for i in range(0, len(text), 64))


class FakeImds(LocalHttpServer):
    """IMDSv2 serving one document and signature (see the module docstring)."""

    def __init__(
        self,
        document: bytes,
        signature: bytes,
        *,
        hang: bool = False,
        fail_first: int = 0,
        oversize: bool = False,
        signature_body: bytes | None = None,
    ) -> None:
        self.document = document
        self.signature_body = signature_body
        self.signature = signature
        self.hang = hang
        self.fail_first = fail_first
        self.oversize = oversize
        self.tokens: set[str] = set()
        super().__init__()

    def handle(self, request: BaseHTTPRequestHandler, method: str, body: bytes) -> Response | None:
        path = request.path
        if path == "/latest/api/token":
            if method != "PUT":
                return Response(405)
            ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return Response(400, b"Bad Request")
            token = base64.urlsafe_b64encode(secrets.token_bytes(42)).decode()
            self.tokens.add(token)
            return Response(200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
        if method != "GET":
            return Response(405)
        if request.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            return Response(401, b"Unauthorized")
        if path == "/latest/dynamic/instance-identity/document":
            body = self.document + (b" " * 100_000 if self.oversize else b"")
            return Response(200, body, {"Content-Type": "text/plain"})
        if path == "/latest/dynamic/instance-identity/signature":
            served = self.signature_body
            if served is None:
                served = b64_lines(self.signature)
            return Response(200, served, {"Content-Type": "text/plain"})
        return Response(404, b"Not Found")


@dataclass
class Ec2Instance:
    instance_id: str
    tags: Sequence[tuple[str, str]] = ()
    groups: Sequence[tuple[str, str]] = ()  # (id, name)


_EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


class FakeEc2(LocalHttpServer):
    """EC2's Query API, ``DescribeInstances`` only, for the instances given."""

    def __init__(self, instances: Sequence[Ec2Instance], *, owner: str = "123456789012") -> None:
        self.instances = {i.instance_id: i for i in instances}
        self.owner = owner
        super().__init__()

    @staticmethod
    def _error(status: int, code: str, message: str) -> Response:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
            f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"</Error></Errors><RequestID>{secrets.token_hex(8)}</RequestID></Response>"
        )
        return Response(status, body.encode(), {"Content-Type": "text/xml;charset=UTF-8"})

    def _instance_xml(self, instance: Ec2Instance) -> str:
        groups = "".join(
            f"<item><groupId>{escape(gid)}</groupId><groupName>{escape(name)}</groupName></item>"
            for gid, name in instance.groups
        )
        tags = "".join(
            f"<item><key>{escape(k)}</key><value>{escape(v)}</value></item>"
            for k, v in instance.tags
        )
        return (
            f"<item><instanceId>{escape(instance.instance_id)}</instanceId>"
            "<instanceState><code>16</code><name>running</name></instanceState>"
            f"<groupSet>{groups}</groupSet><tagSet>{tags}</tagSet></item>"
        )

    def handle(self, request: BaseHTTPRequestHandler, method: str, body: bytes) -> Response | None:
        if method != "POST" or not request.headers.get("Authorization", "").startswith("AWS4-"):
            return self._error(401, "AuthFailure", "AWS was not able to validate the credentials")
        form = urllib.parse.parse_qs(body.decode())
        if form.get("Action") != ["DescribeInstances"]:
            return self._error(400, "InvalidAction", "only DescribeInstances here")
        wanted = [v[0] for k, v in form.items() if k.startswith("InstanceId.")]
        unknown = [i for i in wanted if i not in self.instances]
        if unknown:
            return self._error(
                400, "InvalidInstanceID.NotFound", f"The instance ID '{unknown[0]}' does not exist"
            )
        items = "".join(self._instance_xml(self.instances[i]) for i in wanted)
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeInstancesResponse xmlns="{_EC2_NS}">'
            f"<requestId>{secrets.token_hex(8)}</requestId><reservationSet><item>"
            f"<reservationId>r-0123456789abcdef0</reservationId><ownerId>{self.owner}</ownerId>"
            f"<groupSet/><instancesSet>{items}</instancesSet></item></reservationSet>"
            "</DescribeInstancesResponse>"
        )
        return Response(200, xml.encode(), {"Content-Type": "text/xml;charset=UTF-8"})


__all__ = [
    "AwsSigner",
    "Ec2Instance",
    "FakeEc2",
    "FakeImds",
    "LocalHttpServer",
    "Response",
    "b64_lines",
    "identity_document",
    "self_signed",
]
