"""A transport-neutral view of an HTTP request or response.

Verifiers and signers take this instead of a framework's request object so the
same code serves ASGI, WSGI, httpx, requests and the CLI.  Header names are
case-insensitive and a field may repeat: :meth:`get_all` keeps every value,
which is what "exactly one Authorization field" checks need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class HttpMessage:
    """A request (``method`` + ``target``) or a response (``status``)."""

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
        return cls(tuple((k, v) for k, v in headers), body, method.upper(), target, None)

    @classmethod
    def response(
        cls, status: int, headers: Iterable[tuple[str, str]] = (), body: bytes | None = None
    ) -> HttpMessage:
        return cls(tuple((k, v) for k, v in headers), body, None, None, status)

    @cached_property
    def _index(self) -> dict[str, list[str]]:
        # Built once per message: a verifier asks for eight or so fields per request.
        index: dict[str, list[str]] = {}
        for k, v in self.headers:
            index.setdefault(k.lower(), []).append(v)
        return index

    def get_all(self, name: str) -> list[str]:
        return list(self._index.get(name.lower(), ()))

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
