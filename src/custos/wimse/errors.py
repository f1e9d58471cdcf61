"""WIMSE errors. Each carries a stable ``code``; the HTTP status and
``WWW-Authenticate`` challenge a relying party answers with are decided in one
table, :mod:`custos.integrations.problem` (the only place HTTP statuses live),
and the response body (RFC 9457 problem+json) says no more than the code.
"""

from __future__ import annotations

from custos.errors import CustosError


class WimseError(CustosError):
    code = "wimse_error"


class MalformedRequestError(WimseError):
    code = "malformed_request"


class WitError(WimseError):
    code = "invalid_wit"


class WptError(WimseError):
    code = "invalid_wpt"


class HttpSignatureError(WimseError):
    code = "invalid_http_signature"


class ReplayError(WimseError):
    """A proof's ``jti`` or a signature's ``nonce`` was seen before."""

    code = "replayed_proof"


class WptReplayError(WptError):
    code = "wpt_replayed"


class AudienceError(WimseError):
    code = "bad_audience"


class PolicyError(WimseError):
    """Authentic caller, but not allowed on this route."""

    code = "caller_not_allowed"
