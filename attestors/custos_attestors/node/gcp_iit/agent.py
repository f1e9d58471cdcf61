"""Agent half of ``gcp_iit``: the instance identity token from the metadata server.

``GET /computeMetadata/v1/instance/service-accounts/<account>/identity
?audience=<audience>&format=full`` with ``Metadata-Flavor: Google``.  The audience
comes from the server's challenge and must be ``<audience setting>/<nonce>``.
Settings: ``endpoint`` (default ``http://metadata.google.internal``),
``service_account`` (default ``default``), ``audience`` (default ``custos``),
``timeout_seconds`` (per request, total, default 2), ``attempts`` (default 3).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Mapping
from urllib.parse import quote, urlencode

from custos.plugin.protocols import CoreConfig
from custos_attestors.node._metadata import (
    MetadataClient,
    MetadataUnavailableError,
    check_endpoint,
    check_int,
    check_number,
    new_client,
)
from custos_attestors.node.gcp_iit import wire

DEFAULT_ENDPOINT = "http://metadata.google.internal"
DEFAULT_AUDIENCE = "custos"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/{account}/identity"
CODE = "gcp_iit_metadata_unavailable"
_SETTINGS = {"endpoint", "service_account", "audience", "timeout_seconds", "attempts"}
_ACCOUNT = re.compile(r"default|[A-Za-z0-9._@-]{1,128}")


class GcpIitAgentAttestor:
    def __init__(self) -> None:
        self._endpoint = DEFAULT_ENDPOINT
        self._account = "default"
        self._audience = DEFAULT_AUDIENCE
        self._client: MetadataClient | None = None

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown gcp_iit settings: {', '.join(sorted(unknown))}")
        self._endpoint = check_endpoint(config.get("endpoint", DEFAULT_ENDPOINT))
        account = config.get("service_account", "default")
        if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
            raise ValueError("service_account must be 'default' or a service account email")
        self._account = account
        self._audience = wire.check_audience_prefix(config.get("audience", DEFAULT_AUDIENCE))
        self._client = MetadataClient(
            timeout=check_number(config, "timeout_seconds", 2.0, 0.01, 60.0),
            attempts=check_int(config, "attempts", 3, 1, 10),
            code=CODE,
        )

    async def fetch_token(self, audience: str) -> str:
        """The identity token for ``audience`` (``format=full``)."""
        if self._client is None:
            raise RuntimeError("gcp_iit is not configured")
        url = (
            self._endpoint
            + IDENTITY_PATH.format(account=quote(self._account, safe="@"))
            + "?"
            + urlencode({"audience": audience, "format": "full"})
        )
        async with new_client() as http:
            body = await self._client.request(
                http,
                "GET",
                url,
                headers={"Metadata-Flavor": "Google"},
                max_bytes=wire.MAX_TOKEN_CHARS,
                what="instance identity token",
            )
        try:
            return wire.check_token(body.decode("ascii").strip())
        except (UnicodeDecodeError, wire.GcpIitEvidenceError):
            raise MetadataUnavailableError(
                "the metadata server sent something that is not a JWT", code=CODE
            ) from None

    async def attestation_flow(self) -> AsyncGenerator[bytes, bytes]:
        challenge = yield wire.encode_hello()
        audience = wire.decode_challenge(challenge, self._audience)
        yield wire.encode_token(await self.fetch_token(audience))

    def close(self) -> None:
        self._client = None
