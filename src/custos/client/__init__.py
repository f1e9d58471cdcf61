"""A client for the custos agent's socket, for workloads (decision 0052).

- :class:`WorkloadClient` (asyncio) and :class:`SyncWorkloadClient` (blocking):
  the SPIFFE Workload API calls a workload needs (JWT-SVIDs, validation,
  ``exportable`` X.509-SVIDs) and custos' WIMSE signing API (WIT, WPT, HTTP
  signatures, X.509 chain without key), on ``SPIFFE_ENDPOINT_SOCKET`` or a
  socket given; a deadline per call; reconnection after the agent restarts.
- :class:`AgentProofSigner`: the agent as the signer of
  :class:`custos.integrations.httpx.WimseAuth` / ``WimseRequestsAuth``, so the
  key stays in the device.
- Every failure is a :class:`WorkloadApiError` (``status``: the gRPC status,
  ``code``: stable).

Needs the ``grpc`` extra (``pip install 'custos[grpc]'``).
"""

from custos._extras import extra_needed

with extra_needed("grpc"):
    from custos.client._ops import (
        FetchedWit,
        JwtSvidToken,
        SignedWpt,
        ValidatedJwtSvid,
        X509Chain,
        X509Svid,
    )
    from custos.client.address import ENDPOINT_ENV, Endpoint, endpoint_from_env, parse_endpoint
    from custos.client.aio import WorkloadClient
    from custos.client.errors import (
        InvalidRequestError,
        NotExportableError,
        WorkloadApiDeniedError,
        WorkloadApiError,
        WorkloadApiResponseError,
        WorkloadApiUnavailableError,
        WorkloadEndpointError,
    )
    from custos.client.sync import AgentProofSigner, SyncWorkloadClient

__all__ = [
    "ENDPOINT_ENV",
    "AgentProofSigner",
    "Endpoint",
    "FetchedWit",
    "InvalidRequestError",
    "JwtSvidToken",
    "NotExportableError",
    "SignedWpt",
    "SyncWorkloadClient",
    "ValidatedJwtSvid",
    "WorkloadApiDeniedError",
    "WorkloadApiError",
    "WorkloadApiResponseError",
    "WorkloadApiUnavailableError",
    "WorkloadClient",
    "WorkloadEndpointError",
    "X509Chain",
    "X509Svid",
    "endpoint_from_env",
    "parse_endpoint",
]
