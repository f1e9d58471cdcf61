"""What the server's and the agent's configuration files share: the size cap, the one-line
error formatter, and the field checks both files use (trust domain, paths, ``host:port``,
DNS names), so that ``server.toml`` and ``agent.toml`` read and fail alike (decisions 0030,
0047). Pydantic types and validators only: no server or agent module is imported here.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from custos.identity import InvalidIdentifierError, TrustDomain, coerce_trust_domain

#: A config file is a few KiB; a larger one is a mistake (or /dev/zero).
MAX_CONFIG_BYTES = 256 * 1024
#: sun_path is 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH_BYTES = 107

_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _trust_domain(value: object) -> TrustDomain:
    if not isinstance(value, TrustDomain | str):
        raise PydanticCustomError("trust_domain", 'must be a string such as "example.org"')
    try:
        return coerce_trust_domain(value)
    except InvalidIdentifierError as e:
        raise PydanticCustomError("trust_domain", e.message) from None


TrustDomainField = Annotated[
    TrustDomain, PlainValidator(_trust_domain), PlainSerializer(str, return_type=str)
]


def _path_without_nul(value: object) -> object:
    if isinstance(value, str | Path) and "\0" in str(value):
        raise PydanticCustomError("nul_in_path", "a path must not contain a NUL character")
    return value


def absolute_path(value: Path) -> Path:
    """``value`` if it is absolute (a config's paths do not depend on the working directory)."""
    if not value.is_absolute():
        raise PydanticCustomError("relative_path", "must be an absolute path")
    return value


ConfigPath = Annotated[Path, BeforeValidator(_path_without_nul)]


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` (IPv4, ``[IPv6]`` or a DNS name; port 1-65535) as (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise PydanticCustomError("address", "must be host:port, e.g. 127.0.0.1:8081")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PydanticCustomError("address", "the port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port_text)
        except ValueError:
            raise PydanticCustomError("address", "the IPv6 address is malformed") from None
    try:
        return str(ipaddress.IPv4Address(host)), int(port_text)
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise PydanticCustomError(
            "address", "the host must be an IPv4 address, [IPv6] address or DNS name"
        )
    return host, int(port_text)


def check_dns_name(value: str) -> str:
    """A DNS host name (letters, digits, hyphens; dot-separated labels; no wildcard),
    in lower case without a final dot: the form entry DNS names are stored in, so the
    checks that keep the server's name off workloads compare like with like."""
    if "*" in value:
        raise PydanticCustomError(
            "dns_name", "must be a DNS name, not a wildcard (it names the server itself)"
        )
    labels = value.removesuffix(".").split(".")
    if not value or len(value) > 253 or not all(_HOST_LABEL_RE.fullmatch(x) for x in labels):
        raise PydanticCustomError(
            "dns_name", "must be a DNS name such as custos-server or custos.example.org"
        )
    return value.removesuffix(".").lower()


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def one_line(e: ValidationError) -> str:
    """A validation failure as one line naming its dotted key, ``(and N more)`` for the rest."""
    errors = e.errors(include_url=False, include_input=False)
    first = errors[0]
    loc = tuple(first["loc"])
    message = _MESSAGES.get(first["type"], first["msg"])
    message = message.removeprefix("Value error, ")
    where = _dotted(loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_SOCKET_PATH_BYTES",
    "ConfigPath",
    "TrustDomainField",
    "absolute_path",
    "check_dns_name",
    "one_line",
    "parse_address",
]
