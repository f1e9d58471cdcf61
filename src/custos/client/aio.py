""":class:`WorkloadClient`: the agent's socket from asyncio (grpcio's ``grpc.aio``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

import grpc

from custos.client import _ops as ops
from custos.client._base import CHANNEL_OPTIONS, ClientBase, Id, T, Timeout, method
from custos.client._ops import (
    FetchedWit,
    JwtSvidToken,
    Op,
    SignedWpt,
    ValidatedJwtSvid,
    X509Chain,
    X509Svid,
)
from custos.wimse.http.message import HttpMessage
from custos.wimse.wpt import Wire


class WorkloadClient(ClientBase):
    """The custos agent's Workload API and WIMSE signing API, for asyncio code.

    ``async with WorkloadClient() as client: wit, wpt = await client.sign_wpt(url)``.
    The channel is opened on the first call, in the running event loop; see
    :class:`~custos.client._base.ClientBase` for ``socket``, ``timeout`` and
    ``wait_for_ready``. Every failure is a :class:`~custos.client.WorkloadApiError`.
    """

    _channel: grpc.aio.Channel | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def _channel_now(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            # A grpc.aio channel belongs to the loop it was made in.
            self._channel = grpc.aio.insecure_channel(self.endpoint.grpc_target,
                                                      options=CHANNEL_OPTIONS)
            self._loop = loop
        return self._channel

    async def _invoke(self, op: Op[Any], deadline: float) -> Any:
        channel = self._channel_now()
        call = method(channel, op)(op.request, **self._options(op, deadline))
        if not op.stream:
            return await call
        try:
            reply = await call.read()
        finally:
            call.cancel()  # the stream's later updates are not wanted
        return None if reply is grpc.aio.EOF else reply

    async def call(self, op: Op[T], timeout: Timeout = None) -> T:
        """Run one call (see :mod:`custos.client._ops`)."""
        deadline = self._deadline(timeout)
        for attempt in (0, 1):
            try:
                reply = await self._invoke(op, deadline)
                break
            except grpc.aio.AioRpcError as e:
                if not self._again(e, attempt, deadline):
                    raise self._error(e) from e
                await asyncio.sleep(0.05)
        return op.parse(ops.first(reply))

    async def ping(self, *, timeout: Timeout = None) -> None:
        """The bare round trip (not attested): is the agent there?"""
        await self.call(ops.ping(), timeout)

    async def fetch_wit(self, spiffe_id: Id = None, *, timeout: Timeout = None) -> FetchedWit:
        """The current WIT of ``spiffe_id`` (default: this process's default identity)."""
        return await self.call(ops.fetch_wit(spiffe_id), timeout)

    async def sign_wpt(
        self, audience: str, *, ttl: int | timedelta | None = None, txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None, spiffe_id: Id = None,
        wire: Wire = "wpt-02", timeout: Timeout = None,
    ) -> SignedWpt:
        """``(wit, wpt)`` for one request to ``audience``, from one call (decision 0008)."""
        return await self.call(ops.sign_wpt(
            audience, ttl=ttl, txn_token=txn_token, other_tokens=other_tokens,
            spiffe_id=spiffe_id, wire=wire), timeout)

    async def sign_http_request(
        self, request: HttpMessage, audience: str, *, sign_response: bool = False,
        ttl: int | timedelta | None = None, txn_token: str | None = None, spiffe_id: Id = None,
        form: str = "draft-08", timeout: Timeout = None,
    ) -> HttpMessage:
        """``request`` signed per draft-ietf-wimse-http-signature (fields added)."""
        return await self.call(ops.sign_http_request(
            request, audience, sign_response=sign_response, ttl=ttl, txn_token=txn_token,
            spiffe_id=spiffe_id, form=form), timeout)

    async def sign_http_response(
        self, response: HttpMessage, request: HttpMessage, *, request_nonce: str | None = None,
        ttl: int | timedelta | None = None, spiffe_id: Id = None, timeout: Timeout = None,
    ) -> HttpMessage:
        """``response`` signed for the signed ``request`` it answers."""
        return await self.call(ops.sign_http_response(
            response, request, request_nonce=request_nonce, ttl=ttl, spiffe_id=spiffe_id),
            timeout)

    async def fetch_x509_chain(self, spiffe_id: Id = None, *,
                               timeout: Timeout = None) -> X509Chain:
        """The X.509-SVID chain and bundle (no key: any custody tier)."""
        return await self.call(ops.fetch_x509_chain(spiffe_id), timeout)

    async def fetch_jwt_svids(self, audience: str | Sequence[str], *, spiffe_id: Id = None,
                              timeout: Timeout = None) -> list[JwtSvidToken]:
        """A JWT-SVID per identity (or the one named), the default first."""
        return await self.call(ops.fetch_jwt_svids(audience, spiffe_id), timeout)

    async def fetch_jwt_svid(self, audience: str | Sequence[str], *, spiffe_id: Id = None,
                             timeout: Timeout = None) -> JwtSvidToken:
        """The JWT-SVID of the default identity (or the one named)."""
        return (await self.fetch_jwt_svids(audience, spiffe_id=spiffe_id, timeout=timeout))[0]

    async def validate_jwt_svid(self, token: str, audience: str, *,
                                timeout: Timeout = None) -> ValidatedJwtSvid:
        """The agent's check of a JWT-SVID against its trust bundle."""
        return await self.call(ops.validate_jwt_svid(token, audience), timeout)

    async def fetch_x509_svids(self, *, timeout: Timeout = None) -> list[X509Svid]:
        """X.509-SVIDs with their private keys: ``exportable`` identities only
        (else :class:`~custos.client.NotExportableError`)."""
        return await self.call(ops.fetch_x509_svids(), timeout)

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> WorkloadClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


__all__ = ["WorkloadClient"]
