"""Agent half of ``aws_iid``: the identity document and signature through IMDSv2.

IMDSv2: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``
gives a session token; ``GET /latest/dynamic/instance-identity/document`` and
``.../signature`` with ``X-aws-ec2-metadata-token`` give the document and its
base64 RSA-SHA256 signature.  Settings: ``endpoint`` (default
``http://169.254.169.254``), ``timeout_seconds`` (per request, total, default 2),
``attempts`` (default 3), ``token_ttl_seconds`` (default 60).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncGenerator, Mapping

from custos.plugin.protocols import CoreConfig
from custos_attestors.node._metadata import (
    MetadataClient,
    MetadataUnavailableError,
    check_endpoint,
    check_int,
    check_number,
    new_client,
)
from custos_attestors.node.aws_iid import wire

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"  # noqa: S105 (a URL path)
DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"
SIGNATURE_PATH = "/latest/dynamic/instance-identity/signature"
MAX_TOKEN_BYTES = 512
CODE = "aws_iid_metadata_unavailable"
_SETTINGS = {"endpoint", "timeout_seconds", "attempts", "token_ttl_seconds"}


class AwsIidAgentAttestor:
    def __init__(self) -> None:
        self._endpoint = DEFAULT_ENDPOINT
        self._ttl = 60
        self._client: MetadataClient | None = None

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown aws_iid settings: {', '.join(sorted(unknown))}")
        self._endpoint = check_endpoint(config.get("endpoint", DEFAULT_ENDPOINT))
        # IMDS accepts a token TTL of 1 s to 6 h; the token is used at once.
        self._ttl = check_int(config, "token_ttl_seconds", 60, 1, 21600)
        self._client = MetadataClient(
            timeout=check_number(config, "timeout_seconds", 2.0, 0.01, 60.0),
            attempts=check_int(config, "attempts", 3, 1, 10),
            code=CODE,
        )

    async def read_evidence(self) -> tuple[bytes, bytes]:
        """(document, raw signature) from IMDSv2."""
        if self._client is None:
            raise RuntimeError("aws_iid is not configured")
        meta, base = self._client, self._endpoint
        async with new_client() as http:
            token = await meta.request(
                http,
                "PUT",
                base + TOKEN_PATH,
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self._ttl)},
                max_bytes=MAX_TOKEN_BYTES,
                what="IMDSv2 session token",
            )
            try:
                token_text = token.decode("ascii").strip()
            except UnicodeDecodeError:
                token_text = ""
            if not token_text or not token_text.isprintable():
                raise MetadataUnavailableError("IMDS sent an unusable session token", code=CODE)
            headers = {"X-aws-ec2-metadata-token": token_text}
            document = await meta.request(
                http,
                "GET",
                base + DOCUMENT_PATH,
                headers=headers,
                max_bytes=wire.MAX_DOCUMENT_BYTES,
                what="instance identity document",
            )
            signature_b64 = await meta.request(
                http,
                "GET",
                base + SIGNATURE_PATH,
                headers=headers,
                max_bytes=wire.MAX_SIGNATURE_BYTES * 2,
                what="instance identity signature",
            )
        try:
            # IMDS wraps the base64 text in lines.
            signature = base64.b64decode(b"".join(signature_b64.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MetadataUnavailableError(
                "IMDS sent a signature that is not base64", code=CODE
            ) from None
        if not document or not signature:
            raise MetadataUnavailableError("IMDS sent an empty document or signature", code=CODE)
        return document, signature

    async def attestation_flow(self) -> AsyncGenerator[bytes, bytes]:
        document, signature = await self.read_evidence()
        # No challenge: the document is AWS-signed at launch; the server trusts it once.
        yield wire.encode(document, signature)

    def close(self) -> None:
        self._client = None
