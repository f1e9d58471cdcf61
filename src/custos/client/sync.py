""":class:`SyncWorkloadClient`: the agent's socket from blocking code, and
:class:`AgentProofSigner`, the agent as the signer of ``WimseAuth``.

Blocking calls use grpcio's own blocking channel (decision 0052): it is
thread-safe, so one client serves every thread of a process (httpx runs an
async client's auth in worker threads), and no private event loop is needed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

import grpc

from custos.client import _ops as ops
from custos.client._base import CHANNEL_OPTIONS, DEFAULT_TIMEOUT, ClientBase, Id, T, Timeout, method
from custos.client._ops import (
    FetchedWit,
    JwtSvidToken,
    Op,
    SignedWpt,
    ValidatedJwtSvid,
    X509Chain,
    X509Svid,
)
from custos.client.errors import WorkloadApiError
from custos.integrations.errors import ResponseSigningError
from custos.wimse.http.message import HttpMessage
from custos.wimse.signer import WorkloadProof
from custos.wimse.wpt import Wire
from custos.wimse.wpt import wpt_ttl as check_wpt_ttl


class SyncWorkloadClient(ClientBase):
    """The custos agent's Workload API and WIMSE signing API, blocking.

    ``with SyncWorkloadClient() as client: wit, wpt = client.sign_wpt(url)``; the
    same calls as :class:`~custos.client.WorkloadClient`. Safe to share between threads.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float | timedelta = DEFAULT_TIMEOUT, wait_for_ready: bool = True) -> None:
        super().__init__(socket, timeout=timeout, wait_for_ready=wait_for_ready)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None

    def _channel_now(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self.endpoint.grpc_target,
                                                      options=CHANNEL_OPTIONS)
            return self._channel

    def _invoke(self, op: Op[Any], deadline: float) -> Any:
        channel = self._channel_now()
        call = method(channel, op)(op.request, **self._options(op, deadline))
        if not op.stream:
            return call
        try:
            return next(call, None)
        finally:
            call.cancel()  # the stream's later updates are not wanted

    def call(self, op: Op[T], timeout: Timeout = None) -> T:
        """Run one call (see :mod:`custos.client._ops`)."""
        deadline = self._deadline(timeout)
        for attempt in (0, 1):
            try:
                reply = self._invoke(op, deadline)
                break
            except grpc.RpcError as e:
                if not self._again(e, attempt, deadline):
                    raise self._error(e) from e
                time.sleep(0.05)
        return op.parse(ops.first(reply))

    def ping(self, *, timeout: Timeout = None) -> None:
        """The bare round trip (not attested): is the agent there?"""
        self.call(ops.ping(), timeout)

    def fetch_wit(self, spiffe_id: Id = None, *, timeout: Timeout = None) -> FetchedWit:
        """The current WIT of ``spiffe_id`` (default: this process's default identity)."""
        return self.call(ops.fetch_wit(spiffe_id), timeout)

    def sign_wpt(
        self, audience: str, *, ttl: int | timedelta | None = None, txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None, spiffe_id: Id = None,
        wire: Wire = "wpt-02", timeout: Timeout = None,
    ) -> SignedWpt:
        """``(wit, wpt)`` for one request to ``audience``, from one call (decision 0008)."""
        op = ops.sign_wpt(audience, ttl=ttl, txn_token=txn_token, other_tokens=other_tokens,
                          spiffe_id=spiffe_id, wire=wire)
        return self.call(op, timeout)

    def sign_http_request(
        self, request: HttpMessage, audience: str, *, sign_response: bool = False,
        ttl: int | timedelta | None = None, txn_token: str | None = None, spiffe_id: Id = None,
        form: str = "draft-08", timeout: Timeout = None,
    ) -> HttpMessage:
        """``request`` signed per draft-ietf-wimse-http-signature (fields added)."""
        op = ops.sign_http_request(request, audience, sign_response=sign_response, ttl=ttl,
                                   txn_token=txn_token, spiffe_id=spiffe_id, form=form)
        return self.call(op, timeout)

    def sign_http_response(
        self, response: HttpMessage, request: HttpMessage, *, request_nonce: str | None = None,
        ttl: int | timedelta | None = None, spiffe_id: Id = None, timeout: Timeout = None,
    ) -> HttpMessage:
        """``response`` signed for the signed ``request`` it answers."""
        op = ops.sign_http_response(response, request, request_nonce=request_nonce, ttl=ttl,
                                    spiffe_id=spiffe_id)
        return self.call(op, timeout)

    def fetch_x509_chain(self, spiffe_id: Id = None, *, timeout: Timeout = None) -> X509Chain:
        """The X.509-SVID chain and bundle (no key: any custody tier)."""
        return self.call(ops.fetch_x509_chain(spiffe_id), timeout)

    def fetch_jwt_svids(self, audience: str | Sequence[str], *, spiffe_id: Id = None,
                        timeout: Timeout = None) -> list[JwtSvidToken]:
        """A JWT-SVID per identity (or the one named), the default first."""
        return self.call(ops.fetch_jwt_svids(audience, spiffe_id), timeout)

    def fetch_jwt_svid(self, audience: str | Sequence[str], *, spiffe_id: Id = None,
                       timeout: Timeout = None) -> JwtSvidToken:
        """The JWT-SVID of the default identity (or the one named)."""
        return self.fetch_jwt_svids(audience, spiffe_id=spiffe_id, timeout=timeout)[0]

    def validate_jwt_svid(self, token: str, audience: str, *,
                          timeout: Timeout = None) -> ValidatedJwtSvid:
        """The agent's check of a JWT-SVID against its trust bundle."""
        return self.call(ops.validate_jwt_svid(token, audience), timeout)

    def fetch_x509_svids(self, *, timeout: Timeout = None) -> list[X509Svid]:
        """X.509-SVIDs with their private keys: ``exportable`` identities only
        (else :class:`~custos.client.NotExportableError`)."""
        return self.call(ops.fetch_x509_svids(), timeout)

    def signer(self, *, spiffe_id: Id = None, wpt_ttl: int | timedelta | None = None,
               signature_ttl: int | timedelta | None = None,
               sign_response: bool = False) -> AgentProofSigner:
        """This client as the :class:`~custos.wimse.signer.ProofSigner` of ``WimseAuth``."""
        return AgentProofSigner(self, spiffe_id=spiffe_id, wpt_ttl=wpt_ttl,
                                signature_ttl=signature_ttl, sign_response=sign_response)

    def close(self) -> None:
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> SyncWorkloadClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AgentProofSigner:
    """A :class:`~custos.wimse.signer.ProofSigner` whose key stays behind the agent:
    ``httpx.Client(auth=WimseAuth(AgentProofSigner()))`` gets a WIT and a WPT
    (or an HTTP signature) made by the agent on every request.

    ``client``: a :class:`SyncWorkloadClient` (default: one on
    ``SPIFFE_ENDPOINT_SOCKET``); ``spiffe_id``: which of this process's
    identities signs (default: its default identity); the TTLs: 0/None leave the
    agent's defaults; ``sign_response`` asks the server to sign its responses.
    """

    def __init__(self, client: SyncWorkloadClient | None = None, *, spiffe_id: Id = None,
                 wpt_ttl: int | timedelta | None = None,
                 signature_ttl: int | timedelta | None = None,
                 sign_response: bool = False) -> None:
        self.client = client if client is not None else SyncWorkloadClient()
        self._id = spiffe_id
        self._wpt_ttl = wpt_ttl
        self._signature_ttl = signature_ttl
        self._sign_response = bool(sign_response)
        # Checked now, so a bad TTL fails at construction, not at the first request.
        if wpt_ttl is not None:
            check_wpt_ttl(wpt_ttl)
        ops.ttl_seconds(signature_ttl, "signature_ttl")
        ops.spiffe_id_field(spiffe_id)

    def wpt(self, audience: str, *, txn_token: str | None = None,
            other_tokens: Mapping[str, str] | None = None) -> WorkloadProof:
        wit, wpt = self.client.sign_wpt(audience, ttl=self._wpt_ttl, txn_token=txn_token,
                                        other_tokens=other_tokens, spiffe_id=self._id)
        return WorkloadProof(wit, wpt)

    def sign_http(self, request: HttpMessage, audience: str) -> HttpMessage:
        return self.client.sign_http_request(request, audience,
                                             sign_response=self._sign_response,
                                             ttl=self._signature_ttl, spiffe_id=self._id)

    def sign(self, response: HttpMessage, *, request: HttpMessage,
             request_nonce: str) -> HttpMessage:
        """A relying party's response, signed by the agent for the request it
        answers (:class:`custos.wimse.httpsig.SignsResponses`: the middlewares'
        ``response_signer``). An agent that cannot sign is a ResponseSigningError,
        which the middlewares turn into a 500 with no unsigned answer sent."""
        try:
            return self.client.sign_http_response(response, request,
                                                  request_nonce=request_nonce,
                                                  ttl=self._signature_ttl, spiffe_id=self._id)
        except WorkloadApiError as e:
            raise ResponseSigningError(f"the agent did not sign the response: {e.code}") from e


__all__ = ["AgentProofSigner", "SyncWorkloadClient"]
