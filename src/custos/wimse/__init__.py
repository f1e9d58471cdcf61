"""IETF WIMSE: Workload Identity Tokens, Workload Proof Tokens, HTTP message signatures.

The relying-party API (and the client auth) in one place::

    from custos.wimse import CallerPolicy, WimseASGIMiddleware, verifier_from_bundle_file

    verifier = verifier_from_bundle_file("bundle.json", "example.org", "https://api.example.org")
    app = WimseASGIMiddleware(app, verifier, policy={"/pay": ["spiffe://example.org/ns/shop/*"]})

Names are imported on first use (module ``__getattr__``): ``import custos.wimse``
stays cheap, there is no import cycle with the modules below (they import
``custos.wimse.errors``), and the optional extras stay optional -- ``WimseAuth``
needs httpx and ``WimseRequestsAuth`` requests only when they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from custos.integrations.asgi import WimseASGIMiddleware, caller_of
    from custos.integrations.auth import WimseAuth, WimseRequestsAuth
    from custos.integrations.errors import ClientAuthError
    from custos.integrations.problem import Problem
    from custos.integrations.wsgi import WimseWSGIMiddleware
    from custos.wimse.errors import PolicyError, WimseError
    from custos.wimse.http.message import Endpoint, HttpMessage
    from custos.wimse.httpsig import HttpSignatureVerifier, ResponseSigner
    from custos.wimse.policy import CallerPolicy, PolicyConfigError
    from custos.wimse.replay import (
        MemoryReplayCache,
        RedisReplayCache,
        ReplayCache,
        ReplayCacheUnavailableError,
    )
    from custos.wimse.signer import LocalProofSigner, ProofSigner
    from custos.wimse.verifier import (
        Caller,
        RequestVerifier,
        build_request_verifier,
        verifier_from_bundle_file,
    )
    from custos.wimse.wit import WitVerifier, mint_wit
    from custos.wimse.wpt import WptVerifier

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # verifying requests
    "build_request_verifier": "custos.wimse.verifier",
    "verifier_from_bundle_file": "custos.wimse.verifier",
    "RequestVerifier": "custos.wimse.verifier",
    "Caller": "custos.wimse.verifier",
    "HttpMessage": "custos.wimse.http.message",
    "Endpoint": "custos.wimse.http.message",
    "WitVerifier": "custos.wimse.wit",
    "WptVerifier": "custos.wimse.wpt",
    "HttpSignatureVerifier": "custos.wimse.httpsig",
    # who may call what
    "CallerPolicy": "custos.wimse.policy",
    "PolicyConfigError": "custos.wimse.policy",
    # replay caches
    "ReplayCache": "custos.wimse.replay",
    "MemoryReplayCache": "custos.wimse.replay",
    "RedisReplayCache": "custos.wimse.replay",
    "ReplayCacheUnavailableError": "custos.wimse.replay",
    # frameworks
    "WimseASGIMiddleware": "custos.integrations.asgi",
    "WimseWSGIMiddleware": "custos.integrations.wsgi",
    "caller_of": "custos.integrations.asgi",
    "Problem": "custos.integrations.problem",
    # signing: responses (relying party) and requests (client)
    "ResponseSigner": "custos.wimse.httpsig",
    "LocalProofSigner": "custos.wimse.signer",
    "ProofSigner": "custos.wimse.signer",
    "WimseAuth": "custos.integrations.auth",
    "WimseRequestsAuth": "custos.integrations.auth",
    "ClientAuthError": "custos.integrations.errors",
    "mint_wit": "custos.wimse.wit",
    # errors
    "WimseError": "custos.wimse.errors",
    "PolicyError": "custos.wimse.errors",
}

__all__ = [
    "Caller",
    "CallerPolicy",
    "ClientAuthError",
    "Endpoint",
    "HttpMessage",
    "HttpSignatureVerifier",
    "LocalProofSigner",
    "MemoryReplayCache",
    "PolicyConfigError",
    "PolicyError",
    "Problem",
    "ProofSigner",
    "RedisReplayCache",
    "ReplayCache",
    "ReplayCacheUnavailableError",
    "RequestVerifier",
    "ResponseSigner",
    "WimseASGIMiddleware",
    "WimseAuth",
    "WimseError",
    "WimseRequestsAuth",
    "WimseWSGIMiddleware",
    "WitVerifier",
    "WptVerifier",
    "build_request_verifier",
    "caller_of",
    "mint_wit",
    "verifier_from_bundle_file",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'custos.wimse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
