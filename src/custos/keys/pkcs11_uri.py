"""RFC 7512 ``pkcs11:`` URIs: the token a PKCS#11 store uses, and the URIs of its keys.

::

    pkcs11:token=custos;serial=4d6ab6c9d7555995?pin-source=file:/etc/custos/pin

Path attributes (``;``-separated) identify the token, slot, library or object;
query attributes (``&``-separated) say how to get in: ``pin-value``,
``pin-source``, ``module-name``, ``module-path``.  Values are percent-decoded
strictly (a ``%`` not followed by two hex digits is an error, not a literal);
``id`` is raw bytes.  Attributes this module does not know (vendor ``x-...``
and any future standard ones) are kept in :attr:`Pkcs11Uri.vendor_path` /
:attr:`Pkcs11Uri.vendor_query`, as RFC 7512 section 2.3 expects consumers to
carry them.

The PIN, in order of precedence:

1. ``pin-value=...`` in the query (convenient for tests; it puts the PIN in
   the configuration, so prefer the next two in production);
2. ``pin-source=file:/path`` or ``pin-source=/path``: the first line of that
   file (a trailing newline is dropped).  The ``|command`` form some tools
   accept is refused: custos does not run programs named in a URI;
3. the environment variable ``CUSTOS_PKCS11_PIN``, used only when the URI has
   neither ``pin-value`` nor ``pin-source``.

The parsed URI never shows the PIN: ``repr()`` hides the field and ``str()``
re-serializes the URI without ``pin-value``; :func:`redact` does the same for a
URI still held as text (``KeyStoreConfig`` uses it).

A PKCS#11 store's URI names a token; ``object``, ``id`` and ``type`` are parsed
here (for key URIs, :meth:`custos.keys.pkcs11.Pkcs11KeyStore.key_uri`) but the
store refuses them in its own URI: keys are selected by name.

Hand-written rather than ``urllib.parse``: urllib has no notion of RFC 7512's
two attribute lists and accepts malformed percent escapes silently.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from custos._files import UnreadableFileError, read_small_text
from custos.keys.errors import StoreConfigError

log = logging.getLogger(__name__)

PIN_ENV_VAR = "CUSTOS_PKCS11_PIN"

PATH_ATTRIBUTES = frozenset(
    {
        "token", "manufacturer", "serial", "model",
        "library-manufacturer", "library-description", "library-version",
        "object", "type", "id",
        "slot-description", "slot-manufacturer", "slot-id",
    }
)  # fmt: skip
QUERY_ATTRIBUTES = frozenset({"pin-source", "pin-value", "module-name", "module-path"})
OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})

# RFC 7512 section 2.3: unreserved / pct-encoded / the few sub-delims each part allows.
# In the path "&" may appear literally; in the query ";" "/" "?" "|" may.
_UNRESERVED = r"A-Za-z0-9\-._~"
_PCT = r"%[0-9A-Fa-f]{2}"
_PATH_VALUE_RE = re.compile(rf"(?:[{_UNRESERVED}:\[\]@!$'()*+,=&]|{_PCT})*")
_QUERY_VALUE_RE = re.compile(rf"(?:[{_UNRESERVED}:\[\]@!$'()*+,=/?|;]|{_PCT})*")
_NAME_RE = re.compile(r"[a-z][a-z0-9-]*")
# ASCII digits only: re's \d, str.isdigit() and int() all take other scripts' digits
# ("١٢"), and int() also takes " 1", "1_0", "+1".  Bounded: a CK_ULONG has 20 digits,
# and int() refuses (ValueError) strings past 4300 digits.
_NUMBER_RE = re.compile(r"[0-9]{1,20}")
_LIBRARY_VERSION_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3})?")  # CK_VERSION: two bytes
_MAX_SLOT_ID = 2**64 - 1
# A PIN file holds one short line; anything larger is not a PIN file.
_MAX_PIN_FILE_BYTES = 4096

# Characters left unescaped when serializing (a subset of what the parser accepts).
_PATH_SAFE = ":[]@!$'()*+,=&-._~"
_QUERY_SAFE = ":[]@!$'()*+,=/?|;-._~"


class Pkcs11UriError(StoreConfigError):
    """A ``pkcs11:`` URI that does not follow RFC 7512 (or a PIN source that cannot be read)."""

    code = "pkcs11_uri_invalid"


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI. Build it with :meth:`parse`."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    pin_value: str | None = field(default=None, repr=False)
    pin_source: str | None = None
    module_name: str | None = None
    module_path: str | None = None
    # repr=False: unknown attributes are rendered by __str__, which redacts any
    # that look like they carry a PIN (vendor extensions such as "x-pin-value").
    vendor_path: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    vendor_query: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    # ---- parsing ------------------------------------------------------------

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not isinstance(uri, str):
            raise Pkcs11UriError("a pkcs11 URI must be a string")
        scheme, sep, rest = uri.partition(":")
        if not sep or scheme.lower() != "pkcs11":
            raise Pkcs11UriError("a PKCS#11 URI starts with 'pkcs11:' (RFC 7512)")
        if "#" in rest:
            raise Pkcs11UriError("a PKCS#11 URI has no fragment ('#')")
        path, _, query = rest.partition("?")
        for item in path.split(";"):
            # RFC 7512 puts pin-value/pin-source in the query part. Kept as an unknown
            # path attribute, a PIN would be echoed in str()/repr() and errors.
            if item.partition("=")[0].lower() in ("pin-value", "pin-source"):
                raise Pkcs11UriError(
                    "pin-value and pin-source belong in the query part "
                    "(pkcs11:token=...?pin-source=...)"
                )
        values: dict[str, object] = {}
        vendor_path = _parse_part(path, ";", _PATH_VALUE_RE, "path", PATH_ATTRIBUTES, values)
        vendor_query = _parse_part(query, "&", _QUERY_VALUE_RE, "query", QUERY_ATTRIBUTES, values)
        if "pin-value" in values and "pin-source" in values:
            raise Pkcs11UriError("give either pin-value or pin-source, not both")
        kwargs: dict[str, object] = {}
        for name, raw in values.items():
            assert isinstance(raw, bytes)
            key = name.replace("-", "_")
            if name == "id":
                kwargs[key] = raw
            elif name == "slot-id":
                text = _text(name, raw)
                if not _NUMBER_RE.fullmatch(text) or int(text) > _MAX_SLOT_ID:
                    raise Pkcs11UriError(
                        "slot-id must be a decimal number of ASCII digits (RFC 7512), "
                        "at most 2^64-1"
                    )
                kwargs[key] = int(text)
            else:
                text = _text(name, raw)
                if name == "type" and text not in OBJECT_TYPES:
                    raise Pkcs11UriError("type must be one of " + ", ".join(sorted(OBJECT_TYPES)))
                if name in ("pin-source", "module-path", "module-name") and not text.isprintable():
                    # A path with a NUL or a newline names no file (and os calls would raise
                    # ValueError on the NUL); not echoed, it may be near a PIN.
                    raise Pkcs11UriError(f"{name} must not contain control characters")
                if name == "library-version" and not _LIBRARY_VERSION_RE.fullmatch(text):
                    raise Pkcs11UriError(
                        "library-version must look like 'M' or 'M.m' (ASCII digits, each at most 3)"
                    )
                kwargs[key] = text
        return cls(vendor_path=vendor_path, vendor_query=vendor_query, **kwargs)  # type: ignore[arg-type]

    # ---- the PIN --------------------------------------------------------------

    def resolve_pin(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The user PIN from pin-value, pin-source, or ``CUSTOS_PKCS11_PIN``; None if none."""
        if self.pin_value is not None:
            return self.pin_value
        if self.pin_source is not None:
            return _read_pin_source(self.pin_source)
        env = os.environ if environ is None else environ
        return env.get(PIN_ENV_VAR) or None

    # ---- rendering (never with the PIN) ------------------------------------------

    def __str__(self) -> str:
        path: list[tuple[str, str]] = []
        query: list[tuple[str, str]] = []
        for name in sorted(PATH_ATTRIBUTES):
            value = getattr(self, name.replace("-", "_"))
            if value is None:
                continue
            if name == "id":
                assert isinstance(value, bytes)
                path.append((name, "".join(f"%{b:02X}" for b in value)))
            else:
                path.append((name, quote(str(value), safe=_PATH_SAFE)))
        path.extend((n, _redacted(n, v, _PATH_SAFE)) for n, v in self.vendor_path)
        for name in ("module-name", "module-path", "pin-source"):  # never pin-value
            value = getattr(self, name.replace("-", "_"))
            if value is not None:
                query.append((name, quote(value, safe=_QUERY_SAFE)))
        query.extend((n, _redacted(n, v, _QUERY_SAFE)) for n, v in self.vendor_query)
        text = "pkcs11:" + ";".join(f"{n}={v}" for n, v in path)
        if query:
            text += "?" + "&".join(f"{n}={v}" for n, v in query)
        return text


def redact(uri: str) -> str:
    """``uri`` fit to print: any PIN replaced by ``REDACTED``; unparseable ones hidden whole."""
    try:
        parsed = Pkcs11Uri.parse(uri)
    except Pkcs11UriError:
        return "pkcs11:<malformed URI hidden>"
    text = str(parsed)
    if parsed.pin_value is not None:
        text += ("&" if "?" in text else "?") + "pin-value=REDACTED"
    return text


def _redacted(name: str, value: str, safe: str) -> str:
    if "pin" in name.lower() or "pass" in name.lower() or "secret" in name.lower():
        return "REDACTED"
    return quote(value, safe=safe)


def _parse_part(
    part: str,
    separator: str,
    value_re: re.Pattern[str],
    where: str,
    known: frozenset[str],
    out: dict[str, object],
) -> tuple[tuple[str, str], ...]:
    vendor: list[tuple[str, str]] = []
    if part == "":
        return ()
    seen: set[str] = set()
    for item in part.split(separator):
        name, eq, raw = item.partition("=")
        if not eq:
            raise Pkcs11UriError(f"malformed {where} attribute (expected name=value)")
        if not _NAME_RE.fullmatch(name):
            raise Pkcs11UriError(f"malformed attribute name in the {where} part")
        if name in seen:
            raise Pkcs11UriError(f"attribute {name!r} appears more than once (RFC 7512)")
        seen.add(name)
        if not value_re.fullmatch(raw):
            # Do not echo the value: it may be the PIN.
            raise Pkcs11UriError(
                f"attribute {name!r} has characters RFC 7512 requires to be percent-encoded, "
                "or a malformed %XX escape"
            )
        decoded = unquote_to_bytes(raw)
        if name in known:
            out[name] = decoded
        else:
            vendor.append((name, _text(name, decoded)))
    return tuple(vendor)


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # "from None": the decode error would quote a byte of the value (maybe the PIN).
        raise Pkcs11UriError(
            f"attribute {name!r} is not valid UTF-8 after percent-decoding"
        ) from None


def _read_pin_source(source: str) -> str:
    if source.startswith("|"):
        raise Pkcs11UriError("pin-source commands ('|program') are not supported; use a file")
    if source.startswith("file://"):
        rest = source[len("file://") :]
        if not rest.startswith("/"):  # file://host/path: a remote host makes no sense here
            raise Pkcs11UriError("pin-source file URIs must be file:/path or file:///path")
        path = Path(rest)
    elif source.startswith("file:"):
        path = Path(source[len("file:") :])
    else:
        path = Path(source)
    try:
        # A regular file, bounded: a FIFO or /dev/zero named here must not hang startup.
        text = read_small_text(path, max_bytes=_MAX_PIN_FILE_BYTES, what="pin-source")
        mode = path.stat().st_mode
    except UnreadableFileError as e:
        # The path is configuration, not a secret: naming it helps the operator.  The
        # message carries no content of the file (read_small_text quotes none).
        raise Pkcs11UriError(f"cannot read the PIN: {e.message}") from e
    except OSError as e:
        raise Pkcs11UriError(
            f"cannot read the PIN from pin-source {str(path)!r}: {e.strerror or type(e).__name__}"
        ) from e
    if mode & 0o077:
        log.warning("PIN file %s is readable by group or others; chmod 600 it", path)
    pin = text.splitlines()[0] if text else ""
    if not pin:
        raise Pkcs11UriError(f"pin-source {str(path)!r} is empty")
    return pin
