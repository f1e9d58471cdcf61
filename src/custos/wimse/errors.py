"""WIMSE errors. Each carries a stable ``code`` and the HTTP status a relying
party answers with; the response body (RFC 9457 problem+json) says no more
than the code.

- WPT failures: 401 with ``WWW-Authenticate: WPT`` (draft-ietf-wimse-wpt-02).
- WIT and other failures: 400 (draft-ietf-wimse-workload-creds-02 advises
  against 401 there, since no other credential would help).
"""

from __future__ import annotations

from typing import ClassVar

from custos.errors import CustosError


class WimseError(CustosError):
    code = "wimse_error"
    status: ClassVar[int] = 400
    #: value of WWW-Authenticate to send, if any
    challenge: ClassVar[str | None] = None


class MalformedRequestError(WimseError):
    code = "malformed_request"


class WitError(WimseError):
    code = "invalid_wit"


class WptError(WimseError):
    code = "invalid_wpt"
    status = 401
    challenge = "WPT"


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
    status = 403
