"""The ``azure_msi`` node attestor: a managed-identity token from Azure's IMDS.

The agent half (:mod:`.agent`) asks the Instance Metadata Service for an access token
for a configured resource and sends it; the server half (:mod:`.server`) verifies the
RS256 signature against the tenant's JWKS, checks issuer and tenant, audience (the
resource) and lifetime, and derives the VM from the ``xms_mirid`` claim. The agent ID
is ``spiffe://<td>/custos/agent/azure_msi/<tenant id>/<principal id>`` (SPIRE's shape).
The halves live in separate modules so a server imports only its own.
"""
