"""The errors the framework adapters add to the WIMSE ones: a body or a
response too large, a response that cannot be signed, a client request that
cannot be signed. Their HTTP statuses, like every other, are in
:mod:`custos.integrations.problem`."""

from __future__ import annotations

from custos.wimse.errors import WimseError


class BodyTooLargeError(WimseError):
    """A request body over the middleware's ``max_body``."""

    code = "body_too_large"


class ResponseTooLargeError(WimseError):
    """A response that must be signed is larger than ``max_response``."""

    code = "response_too_large"


class ResponseSigningError(WimseError):
    """A response that must be signed cannot be (incomplete, trailers, a
    Content-Digest that does not match, the signer refused)."""

    code = "response_signing_failed"


class ClientAuthError(WimseError):
    """The request cannot be signed as it stands (a caller mistake)."""

    code = "client_auth_error"


__all__ = ["BodyTooLargeError", "ClientAuthError", "ResponseSigningError", "ResponseTooLargeError"]
