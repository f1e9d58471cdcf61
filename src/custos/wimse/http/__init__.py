"""HTTP messages and the origin / request-target rules that WIMSE proofs bind to.

The message types are importable from here (``from custos.wimse.http import
HttpMessage``) and from :mod:`custos.wimse`; they are defined in
:mod:`custos.wimse.http.message`.
"""

from custos.wimse.http.message import Endpoint, HttpMessage

__all__ = ["Endpoint", "HttpMessage"]
