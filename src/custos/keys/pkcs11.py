"""The ``pkcs11`` key store: keys generated inside a PKCS#11 token (SoftHSM2, an HSM).

Keys
    EC P-256 (ES256), P-384 (ES384), Ed25519 (EdDSA, ``CKK_EC_EDWARDS`` /
    ``CKM_EDDSA``) and RSA-2048 (RS256, PS256).  The private key is created
    with TOKEN, PRIVATE, SENSITIVE, SIGN true and EXTRACTABLE, DERIVE,
    DECRYPT, UNWRAP false, so the token never lets its value out
    (NEVER_EXTRACTABLE).  ``CKA_ALLOWED_MECHANISMS`` pins it to the one
    signing mechanism custos uses, which also records RS256 vs PS256 on the
    token.  The public key is stored next to it.  Both carry
    ``CKA_LABEL`` = the key name and the same random 16-byte ``CKA_ID``
    (random, not derived from the name, so a deleted and re-created name
    never pairs with a stale object another tool left behind).

Finding keys
    By label: the store's URI names the token, a key is named by its
    ``CKA_LABEL``.  ``object=``, ``id=`` and ``type=`` in the store's URI are
    refused; :meth:`Pkcs11KeyStore.key_uri` gives the RFC 7512 URI of one key
    for other tools.  The algorithm is recovered from the token after a
    restart: key type + ``CKA_EC_PARAMS`` (curve OID) for EC / Ed25519, allowed
    mechanisms for RSA.  Algorithms, public keys and key handles are cached in
    memory together with the key's ``CKA_ID``.

Custody grade
    A key is used only if the token generated it and never let its value out:
    ``CKA_LOCAL``, ``CKA_NEVER_EXTRACTABLE``, ``CKA_SENSITIVE`` true and
    ``CKA_EXTRACTABLE`` false, read in one call when the key is first looked up
    and kept with its ``CKA_ID`` (so never on the signing path; a key without
    ``CKA_ID``, made by another tool, is checked at every lookup).  An imported or
    extractable key is :class:`KeyNotCustodyGradeError`, and ``list()`` leaves it
    out with a warning in the log (as the TPM store's ``list()`` does a key file
    that fails its checks).  A key re-created elsewhere under the same label and
    ``CKA_ID`` is another object (another handle): it is checked again.
    See docs/decisions/0013-pkcs11-custody-grade-and-module-selection.md.

Keys replaced behind our back
    Another process (or tool) may delete a key and create a new one under the
    same name.  ``public_key()`` / ``public_jwk()`` always search the token and
    compare ``CKA_ID`` with the cached one, rebuilding the cached metadata when
    it differs.  ``sign()`` keeps to its cached handle (no extra call); a stale
    handle (``CKR_OBJECT_HANDLE_INVALID`` / ``CKR_KEY_HANDLE_INVALID``) drops the
    cached handles and searches again, without touching the module or other
    sessions.  If the new key has another algorithm, the signature is refused
    (the caller asked for the old one); the next call sees the new algorithm.
    ``info()`` answers from the cache until then.

Sessions and threads
    SoftHSM under python-pkcs11 crashes with concurrent sessions (measured),
    and PKCS#11 login state is per process and token anyway (a second
    ``C_Login`` gets ``CKR_USER_ALREADY_LOGGED_IN``; ``C_Logout`` on one
    session logs all of them out).  So: one logged-in R/W session per token per
    process, shared by every store on that token, and every call into a
    library serialized by that library's lock.

Libraries
    The library is ``module`` and/or the URI's RFC 7512 ``module-path`` /
    ``module-name`` (:func:`resolve_module`; all given must designate one file).
    python-pkcs11 0.10.1 caches one ``pkcs11.lib`` per path string and can hold
    several different libraries at once.  Two path strings naming the same
    file (Debian's ``/usr/lib/softhsm/libsofthsm2.so`` is a symlink) would
    ``C_Initialize`` the same library twice and fail, so modules are keyed by
    ``os.path.realpath``.  SoftHSM reads ``SOFTHSM2_CONF`` and scans its
    token directory at ``C_Initialize`` only; tokens created later by another
    process are invisible until the library is finalized and initialized again.

Recovery
    A lost session or token (``CKR_SESSION_HANDLE_INVALID``,
    ``CKR_SESSION_CLOSED``, ``CKR_DEVICE_REMOVED``, ``CKR_TOKEN_NOT_PRESENT``,
    ``CKR_DEVICE_ERROR``, ``CKR_GENERAL_ERROR``...) triggers one
    ``C_Finalize``/``C_Initialize`` of the library, a new session, a new login
    and one retry.  Re-initializing, not just reopening a session:
    SoftHSM keeps failing with ``CKR_GENERAL_ERROR`` after its token directory
    disappears and returns, until it is re-initialized (measured).  If the
    token is still absent the call raises :class:`DeviceUnavailableError`; the
    next call after it is back works.  Other stores on the same library
    reconnect by themselves on their next call.

Speed
    A signature is one ``C_Sign`` on a cached key handle under the library lock;
    what the store adds is the name check, the cached-metadata lookup, hashing
    (``hashlib``, see ``custos.keys.base``) and a per-algorithm plan worked out
    at import (mechanism, DigestInfo prefix, PSS parameters, expected size).
    Measured interleaved with a raw python-pkcs11 ``sign`` on SoftHSM token keys
    (~85 µs here): ~+10 µs (1.13x), down from ~+20 µs (1.23x); the raw call on a
    store-made key (``CKA_ALLOWED_MECHANISMS`` set) costs the same as on a key
    without it.

Errors
    A missing or unloadable module is configuration (:class:`StoreConfigError`):
    a module file does not come and go like a token does.  An unknown token
    is :class:`DeviceUnavailableError` (it may be plugged in later).  A wrong
    PIN is :class:`AuthenticationError`; after one, the store stops logging in
    (a token locks its PIN after a few failures) until it is re-created.
    The PIN never appears in messages, logs or reprs.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import struct
import sysconfig
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pkcs11 import (
    MGF,
    Attribute,
    KeyType,
    Mechanism,
    MechanismFlag,
    ObjectClass,
    TokenFlag,
)
from pkcs11 import exceptions as p11e
from pkcs11.attributes import AttributeMapper
from pkcs11.util.ec import encode_named_curve_parameters

from custos._files import UnreadableFileError, read_small_text
from custos.keys.algorithms import Algorithm
from custos.keys.base import KeyInfo, KeyStore, check_key_name
from custos.keys.errors import (
    AuthenticationError,
    DeviceUnavailableError,
    KeyExistsError,
    KeyNotCustodyGradeError,
    KeyNotFoundError,
    KeyStoreError,
    StoreConfigError,
    UnsupportedAlgorithmError,
)
from custos.keys.jwk import public_jwk
from custos.keys.pkcs11_uri import Pkcs11Uri

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures that mean "the session, the login or the token went away": re-initialize, retry once.
_LOST: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.GeneralError,
    p11e.UserNotLoggedIn,
)
# A handle whose object is gone (deleted, maybe re-created, by someone else): forget the
# cached handles and search again. Not a lost session: re-initializing would drop every
# session this process has on the library.
_STALE: tuple[type[Exception], ...] = (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid)
_BAD_PIN: tuple[type[Exception], ...] = (
    p11e.PinIncorrect,
    p11e.PinInvalid,
    p11e.PinLenRange,
    p11e.PinLocked,
    p11e.PinExpired,
    p11e.UserPinNotInitialized,
)

# DER of the curve OIDs as CKA_EC_PARAMS holds them.
_P256 = encode_named_curve_parameters("secp256r1")
_P384 = encode_named_curve_parameters("secp384r1")
_ED25519_OID = encode_named_curve_parameters("1.3.101.112")
# PKCS#11 3.0 also allows the curve as a PrintableString name.
_ED25519_NAME = b"\x13\x0cedwards25519"

# CKM_RSA_PKCS signs what it is given: RS256 needs the DigestInfo around the
# SHA-256 digest (RFC 8017 section 9.2, note 1).  We build it because the
# interface hands backends a digest, which CKM_SHA256_RSA_PKCS cannot take.
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

_KEY_CLASSES = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)

_SIGN_MECHANISM: dict[Algorithm, Mechanism] = {
    Algorithm.ES256: Mechanism.ECDSA,
    Algorithm.ES384: Mechanism.ECDSA,
    Algorithm.EdDSA: Mechanism.EDDSA,
    Algorithm.RS256: Mechanism.RSA_PKCS,
    Algorithm.PS256: Mechanism.RSA_PKCS_PSS,
}


@dataclass(frozen=True)
class _DigestPlan:
    """How one algorithm signs a digest, worked out once rather than per signature."""

    mechanism: Mechanism
    prefix: bytes  # put before the digest (the DigestInfo for RS256)
    param: Any  # mechanism parameter, or None
    signature_size: int  # the JOSE size to insist on (ECDSA), or 0


_DIGEST_PLANS: dict[Algorithm, _DigestPlan] = {
    Algorithm.ES256: _DigestPlan(Mechanism.ECDSA, b"", None, 64),
    Algorithm.ES384: _DigestPlan(Mechanism.ECDSA, b"", None, 96),
    Algorithm.RS256: _DigestPlan(Mechanism.RSA_PKCS, _SHA256_DIGEST_INFO, None, 0),
    # Salt = hash length, the JOSE PS256 convention (RFC 7518 section 3.5).
    Algorithm.PS256: _DigestPlan(
        Mechanism.RSA_PKCS_PSS, b"", (Mechanism.SHA256, MGF.SHA256, 32), 0
    ),
}


def _attribute_mapper() -> AttributeMapper:
    """python-pkcs11's mapper plus CKA_ALLOWED_MECHANISMS (an array of CK_ULONG)."""
    mapper = AttributeMapper()

    def pack(values: Any) -> bytes:
        return b"".join(struct.pack("L", int(v)) for v in values)

    def unpack(raw: bytes) -> list[int]:
        return [v for (v,) in struct.iter_unpack("L", raw)]

    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, pack, unpack)
    return mapper


class _Pin:
    """Holds the PIN; shows nothing when printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def same_as(self, other: _Pin) -> bool:
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __repr__(self) -> str:
        return "<PIN hidden>"

    __str__ = __repr__


@dataclass(frozen=True)
class _KeyMeta:
    info: KeyInfo
    public_key: PublicKeyTypes
    key_id: bytes  # CKA_ID: tells a re-created key of the same name from the cached one
    # The private object's handle when checked: a key re-created elsewhere with the same
    # label *and* CKA_ID is another object (another handle) and is checked again.
    handle: int


class _TokenLink:
    """The one logged-in session this process keeps on one token, shared by its stores."""

    def __init__(self, module: _Module, uri: Pkcs11Uri, pin: _Pin, token: pkcs11.Token) -> None:
        self.module = module
        self.uri = uri
        self.pin = pin
        # What identifies the token in an RFC 7512 URI (key_uri()).
        self.label: str = token.label
        self.manufacturer: str = token.manufacturer_id
        self.model: str = token.model
        self.serial: str = token.serial.decode("ascii", "replace")
        self.session: pkcs11.Session | None = None
        self.refs = 0
        self.auth_failed = False
        self.handles: dict[str, pkcs11.PrivateKey] = {}
        self.meta: dict[str, _KeyMeta] = {}

    def forget_session(self) -> None:
        # After C_Finalize every handle is dead; closing would only raise.
        self.session = None
        self.handles.clear()

    def ensure_session(self, *, reinit_on_miss: bool) -> pkcs11.Session:
        if self.session is not None:
            return self.session
        if self.auth_failed:
            raise AuthenticationError(
                f"the PIN for PKCS#11 token {self.label!r} was refused earlier; "
                "not trying again (tokens lock PINs) - fix the PIN and reopen the store"
            )
        token = self.module.find_token(self.uri, reinit_on_miss=reinit_on_miss)
        try:
            self.session = _login(token, self.pin)
        except AuthenticationError:
            # The PIN changed under us. Retrying it on every call would lock the token.
            self.auth_failed = True
            raise
        self.handles.clear()
        return self.session


def _login(token: pkcs11.Token, pin: _Pin) -> pkcs11.Session:
    try:
        return token.open(rw=True, user_pin=pin.reveal(), attribute_mapper=_attribute_mapper())
    except p11e.UserAlreadyLoggedIn:
        # Something else in this process (outside custos) logged in on this token;
        # login state is per process, so a plain session inherits it.
        log.info("PKCS#11 token %r already logged in by this process; reusing it", token.label)
        return token.open(rw=True, attribute_mapper=_attribute_mapper())
    except _BAD_PIN as e:
        # The PKCS#11 error carries no PIN; the message names the token only.
        raise AuthenticationError(
            f"PKCS#11 token {token.label!r} refused the user PIN ({type(e).__name__})"
        ) from e


class _Module:
    """One loaded PKCS#11 library, its lock, and the token links on it."""

    def __init__(self, path: str, lib: Any) -> None:
        self.path = path
        self.lib = lib
        # Reentrant: recovery calls back into find_token while holding it.
        self.lock = threading.RLock()
        self.links: dict[tuple[str, str, str, str], _TokenLink] = {}

    def reinitialize(self) -> None:
        """C_Finalize + C_Initialize: drops every session; rescans tokens (SoftHSM)."""
        for link in self.links.values():
            link.forget_session()
        try:
            self.lib.reinitialize()
        except p11e.PKCS11Error as e:
            raise DeviceUnavailableError(
                f"re-initializing PKCS#11 module {self.path} failed ({type(e).__name__})"
            ) from e

    def check_library(self, uri: Pkcs11Uri) -> None:
        """The URI's library-* attributes against C_GetInfo (RFC 7512: all must match)."""
        lib: Any = self.lib
        major, minor = lib.library_version
        wanted = (
            ("library-manufacturer", uri.library_manufacturer, lib.manufacturer_id),
            ("library-description", uri.library_description, lib.library_description),
            ("library-version", _version(uri.library_version), f"{major}.{minor}"),
        )
        for name, want, have in wanted:
            if want is not None and want != have:
                # A module does not change while it is loaded: configuration, not absence.
                raise StoreConfigError(
                    f"PKCS#11 module {self.path} has {name} {have!r}; the URI asks for {want!r}"
                )

    def find_token(self, uri: Pkcs11Uri, *, reinit_on_miss: bool) -> pkcs11.Token:
        found = self._matching_tokens(uri)
        if not found and reinit_on_miss:
            # Maybe created or re-inserted since C_Initialize (SoftHSM only scans then).
            self.reinitialize()
            found = self._matching_tokens(uri)
        if not found:
            raise DeviceUnavailableError(
                f"no PKCS#11 token matches {uri} in module {self.path} "
                "(absent, removed, or a wrong token label)"
            )
        if len(found) > 1:
            raise StoreConfigError(
                f"{len(found)} PKCS#11 tokens match {uri}; add serial= to pick one"
            )
        return found[0]

    def _matching_tokens(self, uri: Pkcs11Uri) -> list[pkcs11.Token]:
        # The library-* attributes are checked once, by check_library().
        lib: Any = self.lib
        found = []
        for slot in lib.get_slots(token_present=True):
            if uri.slot_id is not None and slot.slot_id != uri.slot_id:
                continue
            if uri.slot_description is not None and slot.slot_description != uri.slot_description:
                continue
            if uri.slot_manufacturer is not None and slot.manufacturer_id != uri.slot_manufacturer:
                continue
            try:
                token = slot.get_token()
            except (p11e.TokenNotPresent, p11e.TokenNotRecognised):
                continue
            if not token.flags & TokenFlag.TOKEN_INITIALIZED:
                continue
            checks = (
                (uri.token, token.label),
                (uri.manufacturer, token.manufacturer_id),
                (uri.model, token.model),
                (uri.serial, token.serial.decode("ascii", "replace")),
            )
            if all(want is None or want == have for want, have in checks):
                found.append(token)
        return found

    def attach(self, uri: Pkcs11Uri, pin: _Pin) -> _TokenLink:
        """The link for the token ``uri`` names, logging in if nobody in this process has."""
        token = self.find_token(uri, reinit_on_miss=True)
        key = (token.manufacturer_id, token.model, token.serial.hex(), token.label)
        link = self.links.get(key)
        if link is not None:
            if not link.pin.same_as(pin):
                # Without this check a wrong PIN would ride on another store's login.
                raise AuthenticationError(
                    f"PKCS#11 token {token.label!r}: the PIN differs from the one this "
                    "process logged in with"
                )
            # Opening a store is a deliberate new attempt: lift a refused-PIN latch.
            link.auth_failed = False
        else:
            link = _TokenLink(self, uri, pin, token)
            link.session = _login(token, pin)
            self.links[key] = link
        link.refs += 1
        return link

    def detach(self, link: _TokenLink) -> None:
        link.refs -= 1
        if link.refs > 0:
            return
        for key, value in list(self.links.items()):
            if value is link:
                del self.links[key]
        if link.session is not None:
            try:
                link.session.close()  # C_Logout + C_CloseSession
            except p11e.PKCS11Error as e:  # already gone: nothing left to release
                log.debug("closing PKCS#11 session: %s", type(e).__name__)
            link.forget_session()


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()

# RFC 7512 module-name: "the name of the module library without path or suffix"; how a
# consumer maps it to a file is left to it.  custos does what p11-kit (and so GnuTLS,
# p11tool) does first: a registered module ``<name>.module`` whose ``module:`` line names
# the file; then ``lib<name>.so`` / ``<name>.so`` in the system's PKCS#11 directories.
_MULTIARCH = sysconfig.get_config_var("MULTIARCH") or ""
_P11KIT_CONFIG_DIRS = ("/etc/pkcs11/modules", "/usr/share/p11-kit/modules")
_P11KIT_MODULE_DIR = f"/usr/lib/{_MULTIARCH}/pkcs11" if _MULTIARCH else "/usr/lib/pkcs11"
_LIBRARY_DIRS = tuple(
    dict.fromkeys(
        d
        for d in (
            _P11KIT_MODULE_DIR,
            "/usr/lib/pkcs11",
            "/usr/local/lib/pkcs11",
            f"/usr/lib/{_MULTIARCH}" if _MULTIARCH else "",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
        )
        if d
    )
)
_MODULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def _library_file(path: str, what: str) -> str:
    """``path`` resolved, if it is an existing regular file (a library to load)."""
    if "\0" in path:
        raise StoreConfigError(f"{what} must not contain a NUL character")
    if not os.path.isabs(path):
        raise StoreConfigError(f"{what} {path!r} must be an absolute path")
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise StoreConfigError(f"{what} {path!r} does not exist or is not a regular file")
    return real


def _module_named(name: str) -> str:
    """The library file RFC 7512 ``module-name=name`` designates here."""
    if not _MODULE_NAME_RE.fullmatch(name) or ".." in name:
        raise StoreConfigError(
            "module-name is a library name without path or suffix (e.g. 'softhsm2')"
        )
    for directory in _P11KIT_CONFIG_DIRS:
        config = os.path.join(directory, f"{name}.module")
        if not os.path.lexists(config):
            continue
        try:
            text = read_small_text(config, max_bytes=64 * 1024, what="p11-kit module config")
        except UnreadableFileError as e:
            raise StoreConfigError(e.message) from e
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "module" and value.strip():
                target = value.strip()
                if not os.path.isabs(target):
                    target = os.path.join(_P11KIT_MODULE_DIR, target)
                return _library_file(target, f"module {target!r} registered in {config}")
    found = {
        os.path.realpath(candidate)
        for directory in _LIBRARY_DIRS
        for candidate in (
            os.path.join(directory, f"lib{name}.so"),
            os.path.join(directory, f"{name}.so"),
        )
        if os.path.isfile(candidate)
    }
    if len(found) != 1:
        raise StoreConfigError(
            f"module-name={name!r} "
            + ("matches several libraries: " + ", ".join(sorted(found)) if found else
               "matches no registered p11-kit module and no lib<name>.so in "
               + ", ".join(_LIBRARY_DIRS))
            + "; give module-path= (or --pkcs11-module) instead"
        )  # fmt: skip
    return found.pop()


def resolve_module(module: str | None, uri: Pkcs11Uri) -> str:
    """The PKCS#11 library to load: the explicit ``module`` and the URI's RFC 7512
    ``module-path`` / ``module-name``, which must all designate the same file."""
    candidates: list[tuple[str, str]] = []
    if module:
        candidates.append(("module", _library_file(module, "PKCS#11 module")))
    if uri.module_path is not None:
        candidates.append(("module-path", _library_file(uri.module_path, "module-path")))
    if uri.module_name is not None:
        candidates.append(("module-name", _module_named(uri.module_name)))
    if not candidates:
        raise StoreConfigError(
            "the pkcs11 store needs a PKCS#11 module: --pkcs11-module / CUSTOS_PKCS11_MODULE, "
            "or module-path= / module-name= in the token URI"
        )
    (first_what, first), *others = candidates
    for what, path in others:
        if path != first:
            raise StoreConfigError(
                f"the URI's {what} designates {path}, but the {first_what} is {first}"
            )
    return first


def _load_module(path: str) -> _Module:
    """The loaded library at ``path`` (resolved by :func:`resolve_module`)."""
    module = path
    with _MODULES_LOCK:
        loaded = _MODULES.get(path)
        if loaded is None:
            try:
                lib = pkcs11.lib(path)
            except p11e.PKCS11Error as e:
                raise StoreConfigError(f"cannot load PKCS#11 module {module!r}: {e}") from e
            loaded = _MODULES[path] = _Module(path, lib)
        return loaded


class Pkcs11KeyStore(KeyStore):
    """Keys that live and sign inside a PKCS#11 token. See the module docstring."""

    kind: ClassVar[str] = "pkcs11"
    supported_algorithms: ClassVar[frozenset[Algorithm]] = frozenset(Algorithm)
    persistent: ClassVar[bool] = True

    def __init__(self, module: str | None, uri: str) -> None:
        self._uri = Pkcs11Uri.parse(uri)
        self._module_arg = module
        key_attributes = [
            name
            for name, value in (("object", self._uri.object), ("id", self._uri.id),
                                ("type", self._uri.type))
            if value is not None
        ]  # fmt: skip
        if key_attributes:
            raise StoreConfigError(
                "the PKCS#11 store's URI names a token, not a key: keys are selected by name "
                "(--name, the CKA_LABEL); remove "
                + ", ".join(f"{name}=" for name in key_attributes)
                + " from it (Pkcs11KeyStore.key_uri(name) gives one key's URI)"
            )
        module_file = resolve_module(module, self._uri)
        pin = self._uri.resolve_pin()
        if pin is None:
            raise StoreConfigError(
                "no PIN for the PKCS#11 token: add pin-source=file:/path (or pin-value=) "
                "to the URI, or set CUSTOS_PKCS11_PIN"
            )
        self._pin = _Pin(pin)
        self._link: _TokenLink | None = None
        self._module = _load_module(module_file)
        self._module.check_library(self._uri)
        # Connect now so a wrong PIN or an absent token shows at startup, not at first use.
        with self._module.lock:
            self._attached()

    def _attached(self) -> _TokenLink:
        """The token link, attaching (again, after close()) if needed. Lock held."""
        if self._link is None:
            try:
                self._link = self._module.attach(self._uri, self._pin)
            except _LOST as e:
                raise DeviceUnavailableError(
                    f"PKCS#11 token {self._uri} is unavailable ({type(e).__name__})"
                ) from e
        return self._link

    @property
    def device_id(self) -> Hashable:
        # Every call into one library is serialized by its lock (SoftHSM crashes with
        # concurrent sessions): the library, not the token, is the device to queue on.
        return ("pkcs11", self._module.path)

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore(module={self._module_arg!r}, uri={str(self._uri)!r})"

    # ---- the one way into the library -----------------------------------------

    def _run(self, op: Callable[[_TokenLink, pkcs11.Session], T]) -> T:
        with self._module.lock:
            link = self._attached()
            reinitialized = refound = False
            while True:
                try:
                    session = link.ensure_session(reinit_on_miss=not reinitialized)
                    return op(link, session)
                except _STALE as e:
                    # An object went away under a cached handle: search again, once.
                    if refound:
                        raise KeyStoreError(
                            f"PKCS#11 token {link.label!r}: objects keep vanishing "
                            f"({type(e).__name__})"
                        ) from e
                    refound = True
                    link.handles.clear()
                except _LOST as e:
                    if reinitialized:
                        raise DeviceUnavailableError(
                            f"PKCS#11 token {link.label!r} is unavailable ({type(e).__name__})"
                        ) from e
                    log.warning(
                        "PKCS#11 token %r: %s; re-initializing the module and retrying once",
                        link.label,
                        type(e).__name__,
                    )
                    reinitialized = True
                    self._module.reinitialize()
                except p11e.PKCS11Error as e:
                    if _not_initialized(e) and not reinitialized:
                        reinitialized = True
                        self._module.reinitialize()
                        continue
                    raise KeyStoreError(
                        f"PKCS#11 call on token {link.label!r} failed ({type(e).__name__})"
                    ) from e

    # ---- KeyStore primitives ------------------------------------------------------

    def _create(self, name: str, alg: Algorithm) -> KeyInfo:
        def op(link: _TokenLink, session: pkcs11.Session) -> KeyInfo:
            existing = list(session.get_objects({Attribute.LABEL: name}))
            if any(o.object_class in _KEY_CLASSES for o in existing):
                raise KeyExistsError(f"a key named {name!r} already exists on the token")
            public, private, key_id = _generate(session, name, alg)
            info = KeyInfo(name, alg, self.kind)
            link.handles[name] = private
            link.meta[name] = _KeyMeta(info, _public_key_of(public, alg), key_id, private.handle)
            return info

        return self._run(op)

    def _info(self, name: str) -> KeyInfo:
        with self._module.lock:
            meta = self._attached().meta.get(name)
        if meta is not None:
            return meta.info
        return self._run(lambda link, session: _find(link, session, name)[1].info)

    def _list(self) -> list[KeyInfo]:
        def op(link: _TokenLink, session: pkcs11.Session) -> list[KeyInfo]:
            _probe(session)  # an absent SoftHSM token lists as empty: do not believe it
            out = []
            for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
                try:
                    label = obj[Attribute.LABEL]
                except _STALE:
                    continue  # deleted by someone else since the search
                try:
                    check_key_name(label)
                    alg = _algorithm_of(obj)
                except (KeyStoreError, p11e.PKCS11Error):
                    continue  # some other application's object
                try:
                    # As the TPM store's list: only keys info()/sign() would use.
                    _check_custody_grade(obj, label)
                except KeyNotCustodyGradeError as e:
                    log.warning("skipping PKCS#11 key %r: %s", label, e)
                    continue
                out.append(KeyInfo(label, alg, self.kind))
            return out

        return self._run(op)

    def _delete(self, name: str) -> None:
        def op(link: _TokenLink, session: pkcs11.Session) -> None:
            link.handles.pop(name, None)
            link.meta.pop(name, None)
            objects = [
                o
                for o in session.get_objects({Attribute.LABEL: name})
                if o.object_class in _KEY_CLASSES
            ]
            if not objects:
                _probe(session)
                raise KeyNotFoundError(f"no key named {name!r} on the token")
            for obj in objects:
                obj.destroy()

        self._run(op)

    def _current(self, name: str) -> _KeyMeta:
        """The key named ``name`` on the token now (not from the cache): one search."""
        return self._run(lambda link, session: _find(link, session, name)[1])

    def _public_key(self, info: KeyInfo) -> PublicKeyTypes:
        return self._current(info.name).public_key

    def public_key(self, name: str) -> PublicKeyTypes:
        """The public key of the key named ``name`` on the token now (it may have been replaced)."""
        return self._current(check_key_name(name)).public_key

    def public_jwk(self, name: str) -> dict[str, Any]:
        meta = self._current(check_key_name(name))
        return public_jwk(meta.public_key, meta.info.alg)

    def key_uri(self, name: str) -> str:
        """The RFC 7512 URI of key ``name``'s private key, for other PKCS#11 tools.

        Token attributes as the token reports them, ``object=`` the name and
        ``type=private``; no PIN, no ``id`` (the name identifies the key; its
        CKA_ID changes when it is re-created).
        """
        info = self.info(name)  # KeyNotFoundError if there is no such key
        with self._module.lock:
            link = self._attached()
            uri = Pkcs11Uri(
                token=link.label,
                manufacturer=link.manufacturer,
                model=link.model,
                serial=link.serial,
                object=info.name,
                type="private",
            )
        return str(uri)

    def _sign_digest(self, info: KeyInfo, hashed: bytes) -> bytes:
        plan = _DIGEST_PLANS.get(info.alg)
        if plan is None:
            raise UnsupportedAlgorithmError(f"{info.alg.value} does not sign digests")
        data = plan.prefix + hashed if plan.prefix else hashed
        sig = self._sign(info, plan.mechanism, data, plan.param)
        if plan.signature_size and len(sig) != plan.signature_size:
            raise KeyStoreError(f"the token returned a {len(sig)}-byte ECDSA signature")
        return sig  # CKM_ECDSA gives raw r||s: already the JOSE form

    def _sign_message(self, info: KeyInfo, data: bytes) -> bytes:
        return self._sign(info, _SIGN_MECHANISM[info.alg], data, None)

    def _sign(self, info: KeyInfo, mechanism: Mechanism, data: bytes, param: Any) -> bytes:
        name = info.name

        def op(link: _TokenLink, session: pkcs11.Session) -> bytes:
            key: Any = link.handles.get(name)
            if key is None:
                key, meta = _find(link, session, name)
                if meta.info.alg is not info.alg:
                    # Re-created under the same name with another algorithm since the
                    # caller looked: an EdDSA signature is not what an ES256 caller wants.
                    raise KeyStoreError(
                        f"key {name!r} was replaced on the token by a {meta.info.alg.value} "
                        f"key (was {info.alg.value}); call again"
                    )
            signature: bytes = key.sign(data, mechanism=mechanism, mechanism_param=param)
            return signature

        return self._run(op)

    def close(self) -> None:
        """Let go of the token (the last store on it logs out). A later call reattaches."""
        with self._module.lock:
            if self._link is not None:
                self._module.detach(self._link)
                self._link = None


# ---- helpers (called with the module lock held) ---------------------------------


def _not_initialized(e: Exception) -> bool:
    # python-pkcs11 maps CKR_CRYPTOKI_NOT_INITIALIZED to a bare PKCS11Error with this text.
    return type(e) is p11e.PKCS11Error and "not initialized" in str(e)


def _probe(session: pkcs11.Session) -> None:
    """C_GetTokenInfo: raises (GeneralError on SoftHSM) when the token is gone."""
    session.token.slot.get_token()


def _find(
    link: _TokenLink, session: pkcs11.Session, name: str
) -> tuple[pkcs11.PrivateKey, _KeyMeta]:
    query = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: name}
    found = list(session.get_objects(query))
    if not found:
        _probe(session)
        link.meta.pop(name, None)
        link.handles.pop(name, None)
        raise KeyNotFoundError(f"no key named {name!r} on the token")
    if len(found) > 1:
        raise KeyStoreError(f"{len(found)} private keys are labelled {name!r} on the token")
    private: Any = found[0]
    key_id = private[Attribute.ID]
    meta = link.meta.get(name)
    # Rebuild when the key is not the cached one (deleted and re-created elsewhere: another
    # CKA_ID, or the same CKA_ID on another object handle), and always for a key without
    # CKA_ID (made by another tool): nothing tells two apart.  The custody check runs
    # here, so once per key object, never on the signing path.
    if meta is None or meta.key_id != key_id or meta.handle != private.handle or not key_id:
        link.meta.pop(name, None)
        link.handles.pop(name, None)
        _check_custody_grade(private, name)
        alg = _algorithm_of(private)
        publics = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.LABEL: name,
                    Attribute.ID: key_id,
                }
            )
        )
        if len(publics) != 1:
            raise KeyStoreError(f"key {name!r} has no single public key object on the token")
        meta = _KeyMeta(
            KeyInfo(name, alg, Pkcs11KeyStore.kind),
            _public_key_of(publics[0], alg),
            key_id,
            private.handle,
        )
        link.meta[name] = meta
    link.handles[name] = private
    return private, meta


# What makes a key custody-grade: generated on the token (LOCAL), and a private value
# that never could leave it (NEVER_EXTRACTABLE implies it was never EXTRACTABLE since
# generation; SENSITIVE and not EXTRACTABLE say it cannot now).  Read in one call.
_CUSTODY_ATTRIBUTES: dict[Attribute, tuple[bool, str]] = {
    Attribute.LOCAL: (True, "was imported, not generated on the token (CKA_LOCAL false)"),
    Attribute.NEVER_EXTRACTABLE: (
        True,
        "was extractable at some time (CKA_NEVER_EXTRACTABLE false)",
    ),
    Attribute.SENSITIVE: (True, "has a private value the token would reveal (CKA_SENSITIVE false)"),
    Attribute.EXTRACTABLE: (False, "can be extracted from the token (CKA_EXTRACTABLE true)"),
}


def _check_custody_grade(private: Any, name: str) -> None:
    """Refuse a private key custody cannot vouch for (imported, or its value can leave)."""
    try:
        values = private.get_attributes(list(_CUSTODY_ATTRIBUTES))
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive) as e:
        # A token that cannot say is a token we cannot vouch for.
        raise KeyNotCustodyGradeError(
            f"key {name!r}: the token does not report whether the key was generated on it "
            f"and never extractable ({type(e).__name__}); not used as a custody key"
        ) from e
    problems = [
        why for attribute, (wanted, why) in _CUSTODY_ATTRIBUTES.items()
        if values.get(attribute) is not wanted
    ]  # fmt: skip
    if problems:
        raise KeyNotCustodyGradeError(
            f"key {name!r} is not a custody key: it "
            + "; it ".join(problems)
            + ". custos uses only keys generated on the token as sensitive and never "
            "extractable (create one with 'custos keys create')"
        )


def _version(text: str | None) -> str | None:
    """RFC 7512 library-version "M" or "M.m" as "M.m" ("M" means "M.0"), numbers compared."""
    if text is None:
        return None
    major, _, minor = text.partition(".")
    return f"{int(major)}.{int(minor or 0)}"


def _generate(session: pkcs11.Session, name: str, alg: Algorithm) -> tuple[Any, Any, bytes]:
    """(public, private, CKA_ID) of a new key pair."""
    key_id = os.urandom(16)
    private_template: dict[Attribute, Any] = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.DERIVE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.ALLOWED_MECHANISMS: [_SIGN_MECHANISM[alg]],
    }
    public_template: dict[Attribute, Any] = {Attribute.TOKEN: True, Attribute.PRIVATE: False}
    common: dict[str, Any] = {
        "id": key_id,
        "label": name,
        "store": True,
        "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
        "private_template": private_template,
        "public_template": public_template,
    }
    spec = alg.spec
    pair: Any
    try:
        if spec.family == "rsa":
            public_template[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
            pair = session.generate_keypair(KeyType.RSA, spec.rsa_bits, **common)
        elif spec.family == "ec":
            curve = _P256 if alg is Algorithm.ES256 else _P384
            params: Any = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: curve}, local=True
            )
            pair = params.generate_keypair(**common)
        else:
            params = session.create_domain_parameters(
                KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_OID}, local=True
            )
            pair = params.generate_keypair(mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, **common)
    except (p11e.MechanismInvalid, p11e.DomainParamsInvalid, p11e.FunctionNotSupported) as e:
        raise UnsupportedAlgorithmError(
            f"this PKCS#11 token cannot generate {alg.value} keys ({type(e).__name__})"
        ) from e
    public, private = pair
    return public, private, key_id


def _algorithm_of(private: Any) -> Algorithm:
    key_type = private[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        params = private[Attribute.EC_PARAMS]
        if params == _P256:
            return Algorithm.ES256
        if params == _P384:
            return Algorithm.ES384
        raise UnsupportedAlgorithmError("EC key on a curve custos does not use")
    if key_type == KeyType.EC_EDWARDS:
        if private[Attribute.EC_PARAMS] in (_ED25519_OID, _ED25519_NAME):
            return Algorithm.EdDSA
        raise UnsupportedAlgorithmError("Edwards key that is not Ed25519")
    if key_type == KeyType.RSA:
        try:
            allowed = private[Attribute.ALLOWED_MECHANISMS]
        except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
            allowed = []
        return Algorithm.PS256 if Mechanism.RSA_PKCS_PSS in allowed else Algorithm.RS256
    raise UnsupportedAlgorithmError(f"key type {key_type!r} is not a signing key custos uses")


def _unwrap_octet_string(data: bytes, raw_len: int) -> bytes:
    """CKA_EC_POINT: DER OCTET STRING per the spec; some tokens return the bare point.

    Hand-written (a dozen lines) rather than importing asn1crypto, which only
    comes with python-pkcs11 and ships without type information.
    """
    if len(data) == raw_len:
        return data
    if len(data) >= 2 and data[0] == 0x04:
        if data[1] < 0x80:
            body, length = data[2:], data[1]
        elif data[1] == 0x81 and len(data) >= 3:
            body, length = data[3:], data[2]
        else:
            body, length = b"", -1
        if len(body) == length == raw_len:
            return body
    raise KeyStoreError("the token returned a malformed CKA_EC_POINT")


def _public_key_of(public: Any, alg: Algorithm) -> PublicKeyTypes:
    spec = alg.spec
    if spec.family == "ec":
        size = spec.coordinate_size
        point = _unwrap_octet_string(public[Attribute.EC_POINT], 1 + 2 * size)
        return ec.EllipticCurvePublicKey.from_encoded_point(spec.curve(), point)
    if spec.family == "ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(
            _unwrap_octet_string(public[Attribute.EC_POINT], 32)
        )
    n = int.from_bytes(public[Attribute.MODULUS], "big")
    e = int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big")
    return rsa.RSAPublicNumbers(e, n).public_key()
