"""A transport-neutral view of an HTTP request or response.

Verifiers and signers take this instead of a framework's request object so the
same code serves ASGI, WSGI, httpx, requests and the CLI.  Header names are
case-insensitive and a field may repeat: :meth:`HttpMessage.header_values`
keeps every value, which is what "exactly one Authorization field" checks need.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from custos.wimse.http.origin import origin_of

_NO_VALUES: tuple[str, ...] = ()


def index_headers(headers: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """Folded field name -> every value, in order (what :meth:`HttpMessage.header_values` reads).

    Tuples, so the index can be handed out without a copy and still not be
    changed by whoever reads it; a repeated field (rare) pays a concatenation.
    """
    index: dict[str, tuple[str, ...]] = {}
    for name, value in headers:
        folded = name.lower()
        values = index.get(folded)
        index[folded] = (value,) if values is None else (*values, value)
    return index


@dataclass(frozen=True)
class HttpMessage:
    """A request (``method`` + ``target``) or a response (``status``).

    ``method`` is kept exactly as received: HTTP methods are case-sensitive
    (RFC 9110 §9.1), so "get" is not "GET" and a signature over ``@method``
    GET must not verify a "get" request. A sender that wants the canonical
    form passes it in that form.

    Header fields are looked up with :meth:`header_values` (every value of a
    field, case-insensitive name, no copy): the verifiers and the framework
    adapters use it, so there is one index per message and one way to read it.
    """

    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    method: str | None = None
    #: the request target exactly as received: path + optional query, e.g. "/pay?x=1"
    target: str | None = None
    status: int | None = None
    #: folded field name -> values, built once from ``headers`` (derived, so
    #: not part of equality, hash or repr)
    _index: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The documented way to set a derived field on a frozen dataclass;
        # a verifier asks for eight or so fields per request, so the index is
        # built once here instead of a scan per lookup.
        object.__setattr__(self, "_index", index_headers(self.headers))

    @classmethod
    def request(
        cls,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> HttpMessage:
        return cls(tuple(headers), body, method, target, None)

    @classmethod
    def response(
        cls, status: int, headers: Iterable[tuple[str, str]] = (), body: bytes | None = None
    ) -> HttpMessage:
        return cls(tuple(headers), body, None, None, status)

    def header_values(self, name: str) -> Sequence[str]:
        """Every value of the field ``name`` (any case), in order; empty if absent.

        The message's own immutable record: no copy is made, and nothing
        a reader does can change what the next reader sees.
        """
        values = self._index.get(name)
        if values is None:
            # Most callers pass the lowercase name: fold only on a miss.
            values = self._index.get(name.lower(), _NO_VALUES)
        return values

    def has_header(self, name: str) -> bool:
        """Whether the field ``name`` (any case) is present at all."""
        return bool(self.header_values(name))

    def get_all(self, name: str) -> list[str]:
        """:meth:`header_values` as a new list."""
        return list(self.header_values(name))

    def get(self, name: str) -> str | None:
        values = self.header_values(name)
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
        """The normalised origin (:func:`custos.wimse.http.origin.origin_of`:
        lower case, IDNA A-labels, bracketed IPv6, no default port), the form
        every sender and verifier compares; InvalidOriginError if unusable."""
        return origin_of(self.scheme, self.host, self.port)
