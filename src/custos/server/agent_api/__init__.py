"""The Agent API (issue 8): the grpcio services a node agent calls over TLS.

One module per service, each with ``register(server, ctx)``: :mod:`.attestation`
(``custos.agent.v1.Attestation``), :mod:`.svids` (``custos.agent.v1.Svids``),
:mod:`.entries` and :mod:`.bundles`. Every call but ``AttestAgent`` is authenticated
by :func:`.auth.authenticate` (the agent's WIT + a WPT for that call); every refusal
leaves through :func:`.status.abort`, the one mapping of errors to gRPC statuses.
"""
