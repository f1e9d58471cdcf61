"""The ``custos.agent.v1.Svids`` service: X.509-SVIDs for batches of CSRs, WITs for
batches of public keys, a JWT-SVID for an audience.

Each call is authenticated first (:func:`custos.server.agent_api.auth.authenticate`),
then handed to :class:`custos.server.issuer.Issuer` in a worker thread (signing and the
datastore are synchronous; ``BatchNewX509SVID`` authenticates, issues and builds its
reply in one worker call). A refused item of a batch comes back as that item's
``ItemError{code, message}``; a refused call (authentication, batch too large, the
datastore down) as a gRPC status from :mod:`custos.server.agent_api.status`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc

from custos._proto import agent_v1_pb2, agent_v1_pb2_grpc, types_v1_pb2
from custos.server.agent_api.auth import authenticate, verify_call
from custos.server.agent_api.status import abort
from custos.server.issuer import CustodyEvidence, Issued, WitRequest, X509Request
from custos.x509.ca import X509Svid

if TYPE_CHECKING:
    from custos.server.context import ServerContext

SERVICE = "custos.agent.v1.Svids"


def custody_from_proto(custody: types_v1_pb2.KeyCustody) -> CustodyEvidence:
    """The wire's KeyCustody as the issuer's value (checked by the issuer, per item)."""
    return CustodyEvidence(
        tier=custody.tier,
        tpm_certify_info=custody.tpm_certify_info,
        tpm_certify_signature=custody.tpm_certify_signature,
        tpm_public=custody.tpm_public,
    )


def _item_error(issued: Issued) -> types_v1_pb2.ItemError | None:
    if issued.error is None:
        return None
    return types_v1_pb2.ItemError(code=issued.error.code, message=issued.error.message[:300])


class SvidsServicer(agent_v1_pb2_grpc.SvidsServicer):
    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx

    async def BatchNewX509SVID(
        self,
        request: agent_v1_pb2.BatchNewX509SVIDRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_v1_pb2.BatchNewX509SVIDResponse:
        metadata = context.invocation_metadata() or ()

        def issue() -> agent_v1_pb2.BatchNewX509SVIDResponse:
            # Authentication, issuance and the reply in one worker-thread call: one
            # hand-off to the thread and back per batch, not two. The proof's replay
            # row is checked now and written in the issuance's unit of work: one
            # commit per batch (decision 0128).
            with self._ctx.datastore.deferring_writes() as deferred:
                agent = verify_call(self._ctx, metadata, SERVICE, "BatchNewX509SVID")
            requests = [
                X509Request(p.entry_id, p.csr, custody_from_proto(p.custody))
                for p in request.params
            ]
            results = []
            for item in self._ctx.issuer.x509_svids(agent, requests, then=deferred.run):
                svid = item.credential
                results.append(
                    agent_v1_pb2.X509SVIDResult(
                        entry_id=item.entry_id,
                        x509_svid=svid.to_der_chain() if isinstance(svid, X509Svid) else b"",
                        expires_at=int(item.not_after),
                        error=_item_error(item),
                    )
                )
            return agent_v1_pb2.BatchNewX509SVIDResponse(results=results)

        try:
            return await asyncio.to_thread(issue)
        except Exception as e:  # noqa: BLE001 - every refusal and fault leaves through abort()
            await abort(context, e)

    async def BatchNewWIT(
        self,
        request: agent_v1_pb2.BatchNewWITRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_v1_pb2.BatchNewWITResponse:
        agent = await authenticate(context, self._ctx, SERVICE, "BatchNewWIT")
        # The JWK stays JSON text here: the issuer parses it per item, so a malformed
        # key is that item's refusal (counted and audited), not the batch's.
        requests = [
            WitRequest(p.entry_id, p.public_jwk, custody_from_proto(p.custody))
            for p in request.params
        ]
        try:
            issued = await asyncio.to_thread(self._ctx.issuer.wits, agent, requests)
        except Exception as e:  # noqa: BLE001 - every refusal and fault leaves through abort()
            await abort(context, e)
        return agent_v1_pb2.BatchNewWITResponse(
            results=[
                agent_v1_pb2.WITResult(
                    entry_id=item.entry_id,
                    wit=item.credential if isinstance(item.credential, str) else "",
                    expires_at=int(item.not_after),
                    error=_item_error(item),
                )
                for item in issued
            ]
        )

    async def NewJWTSVID(
        self,
        request: agent_v1_pb2.NewJWTSVIDRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_v1_pb2.NewJWTSVIDResponse:
        agent = await authenticate(context, self._ctx, SERVICE, "NewJWTSVID")
        try:
            issued = await asyncio.to_thread(
                self._ctx.issuer.jwt_svid, agent, request.entry_id, list(request.audience)
            )
        except Exception as e:  # noqa: BLE001 - every refusal and fault leaves through abort()
            await abort(context, e)
        if issued.error is not None:
            await abort(context, issued.error)
        assert isinstance(issued.credential, str)
        return agent_v1_pb2.NewJWTSVIDResponse(
            token=issued.credential, expires_at=int(issued.not_after)
        )


def register(server: grpc.aio.Server, ctx: ServerContext) -> None:
    """Serve ``custos.agent.v1.Svids`` on ``server``."""
    agent_v1_pb2_grpc.add_SvidsServicer_to_server(SvidsServicer(ctx), server)  # type: ignore[no-untyped-call]


__all__ = ["SERVICE", "SvidsServicer", "custody_from_proto", "register"]
