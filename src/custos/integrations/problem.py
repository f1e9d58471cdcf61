"""RFC 9457 problem details for WIMSE failures, and the one table of HTTP
statuses: the errors themselves carry a stable ``code`` and no status (a
gRPC server or the CLI answers them too); only here does a failure become
an HTTP status.

The body names the stable error code and nothing else a caller could use to
probe the verifier: no token contents, no key ids, no reason text beyond a
fixed title per status.

Statuses (:func:`http_status`, looked up along the error's class hierarchy):

- WPT failures: 401 with ``WWW-Authenticate: WPT`` (draft-ietf-wimse-wpt-02);
- WIT, HTTP-signature and other request failures: 400
  (draft-ietf-wimse-workload-creds advises against 401 there, since no other
  credential would help; httpsig answers 400, also for a signed response that
  cannot be made: see :class:`~custos.wimse.httpsig.SignedResponseUnavailableError`);
- an authentic caller the policy refuses: 403;
- a request body over the limit: 413;
- a replay cache that cannot answer: 503 (fail closed, retry later);
- our own mistakes (minting, configuration, a response that cannot be
  signed or is too large to sign): 500;
- any other custos error: 400 (the CLI reports a token it cannot use so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from custos.errors import CustosError
from custos.integrations.errors import (
    BodyTooLargeError,
    ClientAuthError,
    ResponseSigningError,
    ResponseTooLargeError,
)
from custos.wimse.errors import PolicyError, WimseError, WptError
from custos.wimse.replay import ReplayCacheUnavailableError
from custos.wimse.wit import WitMintError
from custos.wimse.wpt import WptConfigError, WptMintError

PROBLEM_TYPE_BASE = "urn:custos:problem:"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
#: error class -> HTTP status; the most derived class listed decides.
STATUS: dict[type[CustosError], int] = {
    WimseError: 400,
    WptError: 401,
    PolicyError: 403,
    BodyTooLargeError: 413,
    ReplayCacheUnavailableError: 503,
    ResponseTooLargeError: 500,
    ResponseSigningError: 500,
    ClientAuthError: 500,
    WitMintError: 500,
    WptMintError: 500,
    WptConfigError: 500,
}
#: error class -> WWW-Authenticate challenge to send with it.
CHALLENGE: dict[type[CustosError], str] = {WptError: "WPT"}
DEFAULT_STATUS = 400


def http_status(err: CustosError) -> int:
    """The HTTP status a relying party answers ``err`` with."""
    for cls in type(err).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return DEFAULT_STATUS


def challenge_for(err: CustosError) -> str | None:
    """The ``WWW-Authenticate`` value to send with ``err``, if any."""
    for cls in type(err).__mro__:
        challenge = CHALLENGE.get(cls)
        if challenge is not None:
            return challenge
    return None


@dataclass(frozen=True)
class Problem:
    status: int
    code: str
    challenge: str | None = None

    @classmethod
    def from_error(cls, err: CustosError) -> Problem:
        return cls(http_status(err), err.code, challenge_for(err))

    def body(self) -> bytes:
        doc = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "code": self.code,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    def headers(self) -> list[tuple[str, str]]:
        out = [("content-type", "application/problem+json"), ("cache-control", "no-store")]
        if self.challenge:
            out.append(("www-authenticate", self.challenge))
        return out
