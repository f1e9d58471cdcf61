"""Origin and request-target rules: the one place that decides what an origin
and a request path look like, for every sender and every verifier.

A WPT's ``aud`` and a signature's ``wimse-aud`` are compared as exact strings
with "a configured origin + the request path".  That only works when the
sender and the receiver spell both halves the same way, so both go through the
functions here, one function per rule:

===============================  ==============================================
rule                             function
===============================  ==============================================
scheme                           :func:`normalize_scheme` (RFC 3986 §3.1, §6.2.2.1)
host (case, IDNA, IPv6, dot)     :func:`normalize_host` (RFC 3986 §3.2.2, RFC 5891,
                                 RFC 5952)
port                             :func:`normalize_port` (RFC 3986 §6.2.3,
                                 RFC 9110 §4.2)
origin from parts                :func:`origin_of`
origin from a configured string  :func:`normalize_origin` (RFC 6454 §4; userinfo
                                 refused per RFC 9110 §4.2.4)
target URI a proof binds         :func:`target_uri` (wpt-02 §3, httpsig ``wimse-aud``)
origin-form request target       :func:`split_target` (RFC 9112 §3.2.1)
path                             :func:`check_path` / :func:`request_path`
                                 (RFC 3986 §2.1, §3.3, §5.2.4)
query                            :func:`check_query` (RFC 3986 §3.4)
decoded routing path             :func:`routing_path` (what a policy judges)
===============================  ==============================================

The path rules refuse rather than normalise: a component between the sender
and the application (a proxy, the framework's router) may decode ``%2F`` or
resolve ``..`` and then route a request to a different path than the one the
proof names.  Refusing every such target keeps "the path that was signed" and
"the path that is served" the same string.

Errors: :class:`InvalidOriginError` for an origin (also a ``ValueError``, since
origins come from configuration) and :class:`UnsafeTargetError` for a request
target (code ``unsafe_request_target``, HTTP 400).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Protocol

import idna

from custos.wimse.errors import MalformedRequestError

#: The longest path (and origin + path) a proof may name; longer is refused unparsed.
MAX_PATH_LENGTH = 2048
#: RFC 1034 §3.1: 255 octets on the wire, 253 characters as text.
MAX_HOST_LENGTH = 253
DEFAULT_PORTS: dict[str, int] = {"https": 443, "http": 80}


class InvalidOriginError(MalformedRequestError, ValueError):
    """An origin (scheme, host, port) that is not usable as an audience."""

    code = "invalid_origin"


class UnsafeTargetError(MalformedRequestError):
    """A request target that could be read as a different path than the one signed."""

    code = "unsafe_request_target"


class HasOrigin(Protocol):
    """:class:`custos.wimse.http.message.Endpoint` fits."""

    def origin(self) -> str: ...


# -- origins --------------------------------------------------------------------------


def normalize_scheme(scheme: str) -> str:
    """``http`` or ``https``, lower-cased (RFC 3986 §3.1: schemes are
    case-insensitive, the canonical form is lower case)."""
    lowered = scheme.lower() if isinstance(scheme, str) else ""
    if lowered not in DEFAULT_PORTS:
        raise InvalidOriginError(f"scheme {str(scheme)[:20]!r} must be http or https")
    return lowered


# A reg-name label after IDNA: letters, digits, hyphen, and "_" (service names
# such as "_grpc" are in use on internal networks).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# WHATWG URL "ends in a number": such a host is parsed as IPv4 by browsers and
# by many resolvers, whatever its other labels say.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def normalize_host(host: str) -> str:
    """The host as it appears in a normalised origin.

    - upper case folded (RFC 3986 §6.2.2.1: the host is case-insensitive);
    - internationalised names become A-labels (RFC 5891, UTS #46 mapping), the
      form that goes on the wire in ``Host`` and in TLS SNI;
    - an IPv6 literal, with or without brackets, becomes its RFC 5952 text in
      brackets (``[2001:db8::1]``); zone identifiers are refused (RFC 9110
      URIs have none);
    - an IPv4 literal must be dotted-quad decimal; the shorthand and hex forms
      some resolvers accept (``127.1``, ``0x7f.0.0.1``) are refused rather than
      guessed at;
    - a trailing dot is refused: ``example.com.`` reaches the same DNS name but
      is a different origin for browsers and for TLS name checks, so accepting
      it would make two spellings of one audience;
    - percent-encoding, userinfo, ports and anything outside LDH labels are refused.
    """
    if not isinstance(host, str) or not host:
        raise InvalidOriginError("the host is empty")
    if len(host) > MAX_HOST_LENGTH + 2:
        raise InvalidOriginError("the host is too long")
    return _normalize_host(host)


@functools.lru_cache(maxsize=256)
def _normalize_host(host: str) -> str:
    if host.startswith("[") or ":" in host:
        return _ipv6_literal(host)
    if host.endswith("."):
        raise InvalidOriginError(f"host {host[:64]!r} ends with a dot")
    if host.isascii():
        lowered = host.lower()
        if "xn--" in lowered:
            lowered = _idna(lowered)  # check the A-labels are valid punycode
    else:
        lowered = _idna(host)
    if _NUMERIC_LABEL.fullmatch(lowered.rsplit(".", 1)[-1]):
        try:
            return str(ipaddress.IPv4Address(lowered))
        except ValueError:
            raise InvalidOriginError(
                f"host {host[:64]!r} is not a dotted-quad IPv4 address"
            ) from None
    if len(lowered) > MAX_HOST_LENGTH or not all(
        _LABEL.fullmatch(label) for label in lowered.split(".")
    ):
        raise InvalidOriginError(f"host {host[:64]!r} is not a usable host name")
    return lowered


def _idna(host: str) -> str:
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError) as e:
        raise InvalidOriginError(f"host {host[:64]!r} is not a valid IDNA name") from e


def _ipv6_literal(host: str) -> str:
    inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "[" in inner or "]" in inner or "%" in inner:
        raise InvalidOriginError(f"host {host[:64]!r} is not a usable IPv6 literal")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        raise InvalidOriginError(f"host {host[:64]!r} is not an IPv6 address") from None
    return f"[{address.compressed}]"


def normalize_port(scheme: str, port: int | str | None) -> int | None:
    """The port to show, or None for the scheme's default (RFC 3986 §6.2.3:
    a default port is omitted; an empty port is the default)."""
    if port is None or port == "":
        return None
    if isinstance(port, str):
        if not (port.isascii() and port.isdigit()) or len(port) > 5:
            raise InvalidOriginError(f"port {port[:8]!r} is not a number")
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise InvalidOriginError(f"port {port!r} is not in 1-65535")
    return None if port == DEFAULT_PORTS[normalize_scheme(scheme)] else port


def origin_of(scheme: str, host: str, port: int | str | None = None) -> str:
    """``scheme://host[:port]`` in normalised form (RFC 6454 §6.1 serialisation)."""
    scheme = normalize_scheme(scheme)
    shown = normalize_port(scheme, port)
    return f"{scheme}://{normalize_host(host)}" + ("" if shown is None else f":{shown}")


_AUTHORITY = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[^:]*))?")


@functools.lru_cache(maxsize=64)
def _parse_origin(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise InvalidOriginError(f"origin {text[:64]!r} must be scheme://host[:port]")
    scheme = normalize_scheme(scheme)
    if "@" in rest:
        # RFC 9110 §4.2.4: userinfo is deprecated in http(s) URIs and must not be sent.
        raise InvalidOriginError(f"origin {text[:64]!r} must not contain userinfo")
    if any(c in rest for c in "/?#\\") or not rest.isprintable():
        raise InvalidOriginError(f"origin {text[:64]!r} must be scheme://host[:port] only")
    match = _AUTHORITY.fullmatch(rest)
    if match is None:
        raise InvalidOriginError(f"origin {text[:64]!r} has an unusable authority")
    return origin_of(scheme, match["host"], match["port"])


def normalize_origin(value: HasOrigin | str) -> str:
    """A configured origin, checked and in the form senders produce
    (lower-case scheme and host, A-labels, bracketed RFC 5952 IPv6, no default
    port, no path).  Raises :class:`InvalidOriginError` (a ``ValueError``)."""
    origin = None if isinstance(value, str) else getattr(value, "origin", None)
    text = origin() if callable(origin) else value
    if not isinstance(text, str):
        raise InvalidOriginError("an origin must be a string or an Endpoint")
    if len(text) > MAX_PATH_LENGTH:
        raise InvalidOriginError("the origin is too long")
    return _parse_origin(text)


def target_uri(scheme: str, host: str, port: int | str | None, target: str) -> str:
    """The target URI a proof binds (WPT ``aud``, HTTP-signature ``wimse-aud``):
    the normalised origin and the request path, without query or fragment
    (wpt-02 §3).  ``target`` is the request target as it goes on the wire
    (path and query; a client never sends a fragment, so a "#" is refused
    like every other unsafe target).  An empty target is "/" (RFC 9110
    §4.2.3), what a client puts on the request line.  An unsafe target is
    refused here, before signing, since every verifier would refuse it."""
    if not isinstance(target, str):
        raise UnsafeTargetError("the request target is not a string")
    origin = origin_of(scheme, host, port)
    return origin + request_path(target or "/")


# -- request targets ------------------------------------------------------------------

# Characters no path may hold: a fragment, a backslash (some servers read it as
# "/"), controls, space, DEL and anything beyond ASCII.
_UNSAFE_PATH_CHAR = re.compile(r"[#?\\\x00-\x20\x7f-\U0010ffff]")
# A "%" not followed by two hex digits (RFC 3986 §2.1): decoders disagree on it.
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Percent-encodings that decode to ".", "/", "\", "%" (double encoding) or NUL:
# a component that decodes them would see a different path than the one signed.
_UNSAFE_ESCAPES = ("%2e", "%2f", "%5c", "%25", "%00")
_UNSAFE_QUERY_CHAR = re.compile(r"[#\x00-\x20\x7f-\U0010ffff]")


def split_target(target: object) -> tuple[str, str | None]:
    """``(path, query)`` of an origin-form request target (RFC 9112 §3.2.1:
    ``absolute-path [ "?" query ]``); ``query`` is None when there is no "?".

    The first "?" ends the path; a "#" is never part of a request target.
    Absolute-form, authority-form and ``*`` targets are refused: a proof is
    made for origin + path.
    """
    if not isinstance(target, str) or not target.startswith("/"):
        raise UnsafeTargetError("request target must be in origin form (/path)")
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


def check_path(path: str) -> str:
    """``path`` if every component would read it the same way, else
    :class:`UnsafeTargetError`.

    Refused: a path not starting with "/"; longer than :data:`MAX_PATH_LENGTH`;
    "#", "?", backslash, controls, space, non-ASCII; a malformed
    percent-encoding; encoded ".", "/", "\\", "%" or NUL; dot segments (also
    "..;x", read as ".." by some servers); empty segments except a trailing
    one (``//`` is merged by some routers).  Other percent-encodings (``%20``,
    ``%41``) are kept exactly as sent: the proof names the bytes on the wire.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise UnsafeTargetError("request path must start with /")
    if len(path) > MAX_PATH_LENGTH:
        raise UnsafeTargetError("request path too long")
    if _UNSAFE_PATH_CHAR.search(path):
        raise UnsafeTargetError(
            "request path has a fragment, backslash, space or non-ASCII character"
        )
    if "%" in path:
        if _BAD_PERCENT.search(path):
            raise UnsafeTargetError("request path has a malformed percent-encoding")
        lowered = path.lower()
        if any(esc in lowered for esc in _UNSAFE_ESCAPES):
            raise UnsafeTargetError(
                "request path has percent-encoded dots, slashes, backslashes or percent signs"
            )
    segments = path.split("/")
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if i == 0:
            continue
        if segment.split(";", 1)[0] in (".", ".."):
            raise UnsafeTargetError("request path has dot segments")
        if segment == "" and i != last:
            raise UnsafeTargetError("request path has empty segments")
    return path


@functools.lru_cache(maxsize=1024)
def _checked_path(path: str) -> str:
    # Refusals raise through lru_cache and are not cached.
    return check_path(path)


def request_path(target: object) -> str:
    """The checked path of an origin-form request target: :func:`split_target`,
    then :func:`check_path` on the path and :func:`check_query` on the query.

    The path's verdict is remembered per path: a service has a handful of
    paths, and the cache is bounded in entry size (:data:`MAX_PATH_LENGTH`)
    and number (LRU).  The query is checked every time (one regex scan).
    """
    # Runs on every verified request: split_target / check_query inlined
    # (same rules, two calls fewer); the path verdict comes from the cache.
    if not isinstance(target, str) or target[:1] != "/":
        raise UnsafeTargetError("request target must be in origin form (/path)")
    path, _, query = target.partition("?")
    if len(path) > MAX_PATH_LENGTH:
        raise UnsafeTargetError("request path too long")
    checked = _checked_path(path)
    if query and (len(query) > MAX_PATH_LENGTH or _UNSAFE_QUERY_CHAR.search(query)):
        check_query(query)  # raises the refusal
    return checked


def check_query(query: str) -> str:
    """``query`` (without the "?") if it can be carried and signed as is:
    printable ASCII without "#" (RFC 3986 §3.4).  Its content is the
    application's business and is not normalised."""
    if not isinstance(query, str) or len(query) > MAX_PATH_LENGTH:
        raise UnsafeTargetError("request query too long")
    if _UNSAFE_QUERY_CHAR.search(query):
        raise UnsafeTargetError("request query has a space, fragment or non-ASCII character")
    return query


def signature_path_and_query(target: object) -> tuple[str, str]:
    """The RFC 9421 ``@path`` and ``@query`` values of a request target
    (§2.2.6, §2.2.7): the checked path, and "?" + query ("?" alone when the
    target has none)."""
    _, query = split_target(target)
    return request_path(target), "?" + ("" if query is None else query)


def routing_path(path: object) -> str:
    """A *decoded* path (ASGI ``scope["path"]``, WSGI ``SCRIPT_NAME + PATH_INFO``)
    that a route policy can judge, else :class:`UnsafeTargetError`.

    Dot segments are refused rather than resolved: some routers resolve them
    and some do not, and the policy must see the path the handler is chosen by.
    """
    if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
        raise UnsafeTargetError("unusable request path")
    if len(path) > MAX_PATH_LENGTH:
        raise UnsafeTargetError("request path too long")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise UnsafeTargetError("request path has dot segments")
    return path


__all__ = [
    "DEFAULT_PORTS",
    "MAX_HOST_LENGTH",
    "MAX_PATH_LENGTH",
    "HasOrigin",
    "InvalidOriginError",
    "UnsafeTargetError",
    "check_path",
    "check_query",
    "normalize_host",
    "normalize_origin",
    "normalize_port",
    "normalize_scheme",
    "origin_of",
    "request_path",
    "routing_path",
    "signature_path_and_query",
    "split_target",
    "target_uri",
]
