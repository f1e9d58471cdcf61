"""A transport-neutral view of an HTTP request or response.

Verifiers and signers take this instead of a framework's request object so the
same code serves ASGI, WSGI, httpx, requests and the CLI.  Header names are
case-insensitive and a field may repeat: :meth:`get_all` keeps every value,
which is what "exactly one Authorization field" checks need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_NO_VALUES: tuple[str, ...] = ()
_new = object.__new__


def index_headers(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Folded field name -> every value, in order (what :meth:`HttpMessage.get_all` reads)."""
    index: dict[str, list[str]] = {}
    for name, value in headers:
        folded = name.lower()
        values = index.get(folded)
        if values is None:
            index[folded] = [value]
        else:
            values.append(value)
    return index


@dataclass(frozen=True)
class HttpMessage:
    """A request (``method`` + ``target``) or a response (``status``).

    ``method`` is kept exactly as received: HTTP methods are case-sensitive
    (RFC 9110 §9.1), so "get" is not "GET" and a signature over ``@method``
    GET must not verify a "get" request. A sender that wants the canonical
    form passes it in that form.
    """

    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    method: str | None = None
    #: the request target exactly as received: path + optional query, e.g. "/pay?x=1"
    target: str | None = None
    status: int | None = None

    @classmethod
    def request(
        cls,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> HttpMessage:
        return cls(tuple((k, v) for k, v in headers), body, method, target, None)

    @classmethod
    def response(
        cls, status: int, headers: Iterable[tuple[str, str]] = (), body: bytes | None = None
    ) -> HttpMessage:
        return cls(tuple((k, v) for k, v in headers), body, None, None, status)

    @classmethod
    def _received(
        cls,
        headers: tuple[tuple[str, str], ...],
        index: dict[str, list[str]],
        body: bytes | None,
        method: str,
        target: str,
    ) -> HttpMessage:
        """A request built by a transport adapter that has already decoded the
        headers and folded them into ``index`` (lowercase name -> values, in
        order), as :attr:`_index` would build it.

        For the ASGI hot path: the frozen dataclass ``__init__`` pays one
        ``object.__setattr__`` per field, and the index would be a second pass
        over the headers.  The instance is the same as ``cls(headers, body,
        method, target, None)`` (same fields, equality, hash and repr) and just
        as immutable: the frozen ``__setattr__`` still refuses every change.
        """
        message: HttpMessage = _new(cls)
        message.__dict__.update(
            headers=headers,
            body=body,
            method=method,
            target=target,
            status=None,
            _header_index=index,
        )
        return message

    @property
    def _index(self) -> dict[str, list[str]]:
        # Built once per message: a verifier asks for eight or so fields per
        # request.  Kept in the instance __dict__ by hand rather than with
        # functools.cached_property, which on Python 3.11 takes a lock on the
        # first access (a measurable share of a request's verification).
        index: dict[str, list[str]] | None = self.__dict__.get("_header_index")
        if index is None:
            index = index_headers(self.headers)
            self.__dict__["_header_index"] = index
        return index

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

    def values_of(self, lowercase_name: str) -> Sequence[str]:
        """Every value of a field, like :meth:`get_all` but without a copy.

        For the verifiers' hot path: ``lowercase_name`` must already be
        lowercase (it is not folded here), and the result is the message's own
        record, to read and never to change.
        """
        return self._index.get(lowercase_name, _NO_VALUES)

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def with_headers(self, extra: Sequence[tuple[str, str]]) -> HttpMessage:
        return HttpMessage(
            self.headers + tuple(extra), self.body, self.method, self.target, self.status
        )

    @property
    def path(self) -> str:
        assert self.target is not None
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class Endpoint:
    """The authority a relying party serves on, from configuration — never from
    the request's Host or X-Forwarded-Host."""

    scheme: str
    host: str
    port: int | None = None

    def origin(self) -> str:
        default = {"https": 443, "http": 80}.get(self.scheme)
        port = "" if self.port is None or self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}"
