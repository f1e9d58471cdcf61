"""The ``aws_iid`` node attestor: the EC2 instance identity document and its signature.

The agent half (:mod:`.agent`) reads the document and its RSA-SHA256 ``signature``
through IMDSv2; the server half (:mod:`.server`) verifies the signature against the
configured AWS certificates, checks the account allowlist, optionally describes the
instance through boto3 (tags, security groups) and names the agent
``spiffe://TD/custos/agent/aws_iid/<account>/<region>/<instance>``.  The document is
not fresh, so the server half cannot re-attest: trust on first use per instance
(see README.md).
"""
