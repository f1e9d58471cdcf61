"""The Agent API client: node attestation (:mod:`.attest`, :mod:`.channel`), the
authenticated calls (:mod:`.calls`), the entry and bundle streams (:mod:`.streams`)
and one error type for every refusal the server sends (:mod:`.errors`).

Modules are imported on use (``from custos.agent.client.calls import AgentApiClient``):
grpclib (the client's gRPC stack, decision 0126) is an extra's dependency, and importing
this package must not need it. Nothing here imports grpcio.
"""
