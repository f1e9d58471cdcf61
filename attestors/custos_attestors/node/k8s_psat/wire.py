"""The k8s_psat evidence: ``{"v": 1, "cluster": "<name>", "token": "<token>"}``
(SPIRE sends ``{"cluster": ..., "token": ...}``).

Bounded before parsing; no error repeats the token (a bearer token for the server's
audience, valid until it expires or its pod is deleted).
"""

from __future__ import annotations

import json
import re

from custos.errors import CustosError

VERSION = 1
#: Projected tokens are about 1 KB; 16 KiB is generous.
MAX_TOKEN_CHARS = 16 * 1024
MAX_MESSAGE_BYTES = MAX_TOKEN_CHARS + 256
#: A cluster name is an agent ID path segment and a selector value.
CLUSTER_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,62}")


class K8sPsatEvidenceError(CustosError):
    """k8s_psat evidence is oversized, not the JSON object we expect, or malformed."""

    code = "k8s_psat_evidence_invalid"


def check_cluster(name: object) -> str:
    if not isinstance(name, str) or not CLUSTER_RE.fullmatch(name) or name in {".", ".."}:
        raise K8sPsatEvidenceError(
            "a cluster name is 1 to 63 letters, digits, '_', '-' or '.' (not starting with '.')"
        )
    return name


def check_token(token: object) -> str:
    if (
        not isinstance(token, str)
        or not 0 < len(token) <= MAX_TOKEN_CHARS
        or not token.isascii()
        or not token.isprintable()
        or " " in token
    ):
        raise K8sPsatEvidenceError(
            f"a service-account token is 1 to {MAX_TOKEN_CHARS} printable ASCII characters"
        )
    return token


def encode(cluster: str, token: str) -> bytes:
    message = {"v": VERSION, "cluster": check_cluster(cluster), "token": check_token(token)}
    return json.dumps(message, separators=(",", ":")).encode()


def decode(payload: object) -> tuple[str, str]:
    """``(cluster, token)``; :class:`K8sPsatEvidenceError` otherwise."""
    if not isinstance(payload, bytes):
        raise K8sPsatEvidenceError("k8s_psat evidence must be bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise K8sPsatEvidenceError(
            f"k8s_psat evidence is {len(payload)} bytes; at most {MAX_MESSAGE_BYTES}"
        )
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise K8sPsatEvidenceError("k8s_psat evidence is not UTF-8 JSON") from None
    if not isinstance(message, dict) or set(message) != {"v", "cluster", "token"}:
        raise K8sPsatEvidenceError(
            'k8s_psat evidence must be {"v": 1, "cluster": "...", "token": "..."}'
        )
    if type(message["v"]) is not int or message["v"] != VERSION:
        raise K8sPsatEvidenceError(f"unsupported k8s_psat evidence version; this is {VERSION}")
    return check_cluster(message["cluster"]), check_token(message["token"])


__all__ = [
    "CLUSTER_RE",
    "MAX_MESSAGE_BYTES",
    "MAX_TOKEN_CHARS",
    "K8sPsatEvidenceError",
    "check_cluster",
    "check_token",
    "decode",
    "encode",
]
