"""RFC 9457 problem details for WIMSE failures.

The body names the stable error code and nothing else a caller could use to
probe the verifier: no token contents, no key ids, no reason text beyond a
fixed title per status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from custos.wimse.errors import WimseError

PROBLEM_TYPE_BASE = "urn:custos:problem:"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Problem:
    status: int
    code: str
    challenge: str | None = None

    @classmethod
    def from_error(cls, err: WimseError) -> Problem:
        return cls(err.status, err.code, err.challenge)

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
