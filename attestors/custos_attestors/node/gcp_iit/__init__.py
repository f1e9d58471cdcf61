"""The ``gcp_iit`` node attestor: a GCE instance identity token (RS256 JWT by Google).

The server half (:mod:`.server`) challenges with a fresh audience
(``<audience>/<nonce>``); the agent half (:mod:`.agent`) fetches the instance's
identity token for that audience (``format=full``) from the metadata server; the
server verifies it against Google's JWKS (a file or an https URL), checks issuer,
audience, times, the project allowlist and the ``google.compute_engine`` claims,
and names the agent ``spiffe://TD/custos/agent/gcp_iit/<project>/<instance id>``.
See README.md.
"""
