"""``custos wimse verify|sign-wpt`` and ``custos jwt validate``: local testing and debugging."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import SplitResult, urlsplit

import click

from custos._files import DEFAULT_MAX_BYTES, UnreadableFileError, read_small_file
from custos._jose import loads_strict
from custos._numbers import InvalidNumberError, finite_number
from custos.cli.keys import store_options
from custos.errors import CustosError
from custos.keys import KeyStore

if TYPE_CHECKING:
    from custos.bundle import BundleSet

_F = TypeVar("_F", bound=Callable[..., Any])

_DEBUG_TRUST_NOTE = (
    "Without it the bundle is trusted for whatever trust domain the token's sub "
    "names: a DEBUGGING CONVENIENCE only, never how a relying party should run."
)


def _peek_trust_domain(token: str, *, jwt_svid: bool = False) -> str:
    """The trust domain of a JWT's ``sub`` WITHOUT verifying it: only to pick a trust domain
    when --trust-domain is not given. ``jwt_svid``: the token is a JWT-SVID,
    so a failure carries a JWT-SVID code (``jwt_malformed``,
    ``jwt_bad_subject``), not a WIT one."""
    from custos.wimse.wit import b64url_decode_strict, json_object_strict

    malformed, bad_sub = _peek_errors(jwt_svid)
    try:
        claims = json_object_strict(b64url_decode_strict(token.strip().split(".")[1]))
    except (IndexError, TypeError, ValueError, RecursionError, CustosError) as e:
        raise malformed("cannot read the token's claims") from e
    sub = claims.get("sub")
    if sub is None:
        raise malformed("the token has no sub")
    if not isinstance(sub, str):
        raise bad_sub("the token's sub is not a string")
    try:
        return _trust_domain_of(sub)
    except CustosError as e:
        raise bad_sub("the token's sub is not a workload identifier") from e


def _peek_errors(
    jwt_svid: bool,
) -> tuple[Callable[[str], CustosError], Callable[[str], CustosError]]:
    """The (malformed, bad subject) error makers of the token kind."""
    if jwt_svid:
        from custos.jwtsvid.errors import JwtBadSubjectError, JwtMalformedError

        return JwtMalformedError, JwtBadSubjectError
    from custos.wimse.errors import WitError

    return (
        lambda m: WitError(m, code="wit_malformed"),
        lambda m: WitError(m, code="wit_bad_sub"),
    )


def _trust_domain_of(subject: str) -> str:
    from custos.identity import parse_workload_id

    return str(parse_workload_id(subject).trust_domain)


def _load_bundle(path: Path, trust_domain: str) -> BundleSet:
    """A BundleSet holding the file's keys for ``trust_domain``. A file that
    looks like a SPIFFE bundle (sequence, refresh hint or SPIFFE ``use``
    values) is read as one; anything else as a plain JWKS."""
    from custos.bundle import BundleError, BundleSet, TrustBundle
    from custos.identity import InvalidIdentifierError, TrustDomain

    try:
        td = TrustDomain.parse(trust_domain)
    except InvalidIdentifierError as e:
        raise _InputError(f"--trust-domain: {e.message}", code="trust_domain_invalid") from e
    try:
        data = read_small_file(path, what="bundle")
    except UnreadableFileError as e:
        raise _InputError(e.message, code="bundle_unreadable") from e
    try:
        # The library's one strict reader (duplicate members, NaN, deep nesting
        # refused), so the CLI parses as TrustBundle does (its file cap is 1 MiB, not 4).
        doc = loads_strict(data)
    except ValueError as e:  # UnicodeDecodeError is one
        raise _InputError(
            f"unusable bundle {path}: not one strict JSON object ({e})", code="bundle_invalid"
        ) from e
    try:
        entries = doc.get("keys")
        uses = (
            {e.get("use") for e in entries if isinstance(e, dict) and isinstance(e.get("use"), str)}
            if isinstance(entries, list)
            else set()
        )
        is_spiffe = (
            "spiffe_sequence" in doc
            or "spiffe_refresh_hint" in doc
            or bool(uses & {"x509-svid", "jwt-svid", "wit-svid"})
        )
        # The parsed document itself: read once, by the reader above.
        if is_spiffe:
            bundle = TrustBundle.from_spiffe_json(td, doc)
        else:
            bundle = TrustBundle.from_jwks(td, doc)
    except BundleError as e:
        raise _InputError(f"unusable bundle {path}: {e.message}", code="bundle_invalid") from e
    return BundleSet([bundle])


def _bundles_for(
    path: Path, trust_domain: str | None, token: str | None, *, jwt_svid: bool = False
) -> BundleSet:
    """The bundle file's keys for ``--trust-domain``, or (debugging only) for
    the trust domain the unverified ``token``'s sub names."""
    if trust_domain:
        return _load_bundle(path, trust_domain)
    if token is None:
        from custos.wimse.errors import WitError

        raise WitError("no Workload-Identity-Token header", code="wit_missing")
    return _load_bundle(path, _peek_trust_domain(token, jwt_svid=jwt_svid))


class _InputError(CustosError):
    """The operator's own input (bundle file, --trust-domain) is unusable.

    Reported like a refused request (problem JSON on stdout, exit 1) so that a
    script reading stdout always gets JSON; the detail, which concerns only
    the operator's files, goes to stderr.
    """


def _problem_exit(err: CustosError) -> NoReturn:
    """Print the RFC 9457 problem JSON for ``err`` (the code, nothing more) and exit 1."""
    from custos.integrations.problem import Problem

    if isinstance(err, _InputError):
        click.echo(f"error: {err.message}", err=True)

    body = json.loads(Problem.from_error(err).body())
    click.echo(json.dumps(body, sort_keys=True))
    sys.exit(1)


def _finite_now(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """``--now``: a finite epoch time (NaN would turn every time check off)."""
    if value is None:
        return None
    try:
        return finite_number(value, name="--now", minimum=0)
    except InvalidNumberError as e:
        raise click.BadParameter(e.message) from e


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _absolute_uri(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--audience``: an absolute URI (RFC 3986 §4.3): a scheme, ":", no
    spaces or controls, and for http(s) a host. A relative path or a bare
    host would make a WPT no relying party accepts."""
    scheme, sep, rest = value.partition(":")
    usable = (
        bool(sep)
        and bool(rest)
        and _SCHEME.fullmatch(scheme) is not None
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )
    if usable and scheme.lower() in ("http", "https"):
        try:
            _http_origin(value)
        except ValueError:
            usable = False
    if not usable:
        raise click.BadParameter(
            f"{value[:80]!r} is not an absolute URI (e.g. https://api.example.com/pay)"
        )
    return value


def _http_origin(url: str) -> tuple[SplitResult, str]:
    """The parts of an http(s) URL and its origin, through the one origin module
    (:func:`custos.wimse.http.origin.normalize_origin`): a ValueError for what
    urlsplit cannot parse (``https://[::1/pay``), an unusable host or port, or
    userinfo (RFC 9110 §4.2.4) -- a proof never names those."""
    from custos.wimse.http.origin import normalize_origin

    parts = urlsplit(url)  # ValueError("Invalid IPv6 URL") and the like
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError("not an absolute http(s) URL")
    return parts, normalize_origin(f"{parts.scheme}://{parts.netloc}")


def _other_token_names(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for name in value:
        if not _HEADER_NAME.fullmatch(name):
            raise click.BadParameter(f"{name[:40]!r} is not a header field name")
    return value


def _other_token_pairs(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in value:
        name, sep, token = item.partition("=")
        if not sep or not _HEADER_NAME.fullmatch(name) or not token:
            raise click.BadParameter(f"{item[:40]!r} is not NAME=VALUE")
        pairs[name] = token
    return pairs


def _read_input(path: str, what: str, *, text: bool) -> bytes | str:
    """A file the operator named ('-': stdin), bounded; a FIFO, a device, a
    directory or (``text``) a file that is not UTF-8 is a clear error."""
    if path == "-":
        data = sys.stdin.buffer.read(DEFAULT_MAX_BYTES + 1)
        if len(data) > DEFAULT_MAX_BYTES:
            raise click.BadParameter(f"stdin holds more than {DEFAULT_MAX_BYTES} bytes")
    else:
        try:
            data = read_small_file(path, what=what)
        except UnreadableFileError as e:
            raise click.BadParameter(e.message) from e
    if not text:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{what} {path!r} is not UTF-8 text") from None


def _bundle_options(bundle_help: str) -> Callable[[_F], _F]:
    """``--bundle``, ``--trust-domain`` and ``--now``: what every verifying command takes."""

    def apply(command: _F) -> _F:
        for option in reversed(
            (
                click.option(
                    "--bundle",
                    "bundle_path",
                    required=True,
                    type=click.Path(exists=True, dir_okay=False, path_type=Path),
                    help=bundle_help,
                ),
                click.option(
                    "--trust-domain",
                    default=None,
                    help=f"trust domain the bundle belongs to. {_DEBUG_TRUST_NOTE}",
                ),
                click.option(
                    "--now",
                    type=float,
                    default=None,
                    callback=_finite_now,
                    help="pin the clock (epoch seconds)",
                ),
            )
        ):
            command = option(command)
        return command

    return apply


@click.group()
def wimse() -> None:
    """WIMSE tokens and proofs: verify a request, sign a WPT."""


@wimse.command()
@_bundle_options(
    "JWKS or SPIFFE bundle file with the WIT signing keys (each with no 'use' or "
    "'use': 'wit-svid'; a key marked 'sig' or for another credential is refused)"
)
@click.option(
    "--audience",
    default=None,
    help="origin this relying party serves, e.g. https://api.example.com "
    "[default: the origin of --url]",
)
@click.option("--method", required=True, help="request method, e.g. POST")
@click.option("--url", required=True, help="the request URL as the client sent it")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value', repeatable")
@click.option(
    "--body-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="the request body ('-': stdin; a regular file of at most 1 MiB)",
)
@click.option("--no-wpt01", is_flag=True, help="refuse the wpt-01 wire form")
@click.option(
    "--accept-draft-06",
    is_flag=True,
    help="also accept HTTP signatures in the draft -06 form (@request-target instead of "
    "@path and @query); off by default, such a signature is refused (draft06_form_refused)",
)
@click.option(
    "--max-ttl",
    type=click.IntRange(min=1),
    default=None,
    help="how far ahead (seconds) a WPT's exp may lie [default: 300]; the drafts' "
    "example WPT lives ~17 minutes",
)
@click.option(
    "--other-token",
    "other_tokens",
    multiple=True,
    callback=_other_token_names,
    help="header name of another token (WPT 'oth') this relying party understands; "
    "repeatable. A WPT binding a token not named here is refused (wpt-02)",
)
def verify(
    bundle_path: Path,
    trust_domain: str | None,
    now: float | None,
    audience: str | None,
    method: str,
    url: str,
    headers: tuple[str, ...],
    body_file: str | None,
    no_wpt01: bool,
    accept_draft_06: bool,
    max_ttl: int | None,
    other_tokens: tuple[str, ...],
) -> None:
    """Verify a request carrying a WIT + WPT (either form) or a WIMSE HTTP signature.

    Prints {"sub", "trust_domain", "variant"} and exits 0 when authentic;
    prints the problem JSON and exits 1 otherwise.
    """
    from custos.wimse.http.message import HttpMessage
    from custos.wimse.verifier import build_request_verifier

    parsed: list[tuple[str, str]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise click.UsageError(f"header {h[:40]!r}... is not 'Name: value'")
        parsed.append((name, value.strip(" \t")))
    try:
        parts, url_origin = _http_origin(url)
    except ValueError as e:  # InvalidOriginError is one
        raise click.BadParameter(
            f"{url[:80]!r} is not a usable absolute http(s) URL: {e}", param_hint="--url"
        ) from e
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    origin = audience or url_origin
    body = _read_input(body_file, "--body-file", text=False) if body_file else None
    assert not isinstance(body, str)
    request = HttpMessage.request(method, target, parsed, body or None)
    try:
        bundles = _bundles_for(bundle_path, trust_domain, request.get("workload-identity-token"))
        try:
            verifier = build_request_verifier(
                bundles,
                [origin],
                accept_wpt01=not no_wpt01,
                now=now,
                wpt_max_ttl=max_ttl,
                known_other_tokens=other_tokens,
                accept_draft_06=accept_draft_06,
            )
        except ValueError as e:
            raise click.UsageError(f"--audience: {e}") from e
        caller = verifier.verify(request)
    except CustosError as err:
        _problem_exit(err)
    click.echo(
        json.dumps(
            {"sub": caller.subject, "trust_domain": caller.trust_domain, "variant": caller.variant},
            sort_keys=True,
        )
    )


@wimse.command("sign-wpt")
@store_options
@click.option("--name", required=True, help="the workload key (the WIT's cnf key)")
@click.option(
    "--wit",
    "wit_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="file with the WIT ('-': stdin)",
)
@click.option(
    "--audience",
    required=True,
    callback=_absolute_uri,
    help="absolute target URI, e.g. https://api.example.com/pay (query and fragment are "
    "dropped), or an exact non-HTTP audience such as spiffe://example.org/custos/server/x",
)
@click.option(
    "--ttl",
    default=60,
    show_default=True,
    type=click.IntRange(1, 3600),
    help="seconds the WPT lives",
)
@click.option(
    "--wire",
    default="wpt-02",
    type=click.Choice(["wpt-02", "wpt-01"]),
    show_default=True,
    help="wpt-02: Authorization: WPT; wpt-01: Workload-Proof-Token",
)
@click.option("--txn-token", default=None, help="bind this Txn-Token (tth)")
@click.option("--access-token", default=None, help="wpt-01 only: bind this bearer token (ath)")
@click.option(
    "--other-token",
    "other_tokens",
    multiple=True,
    callback=_other_token_pairs,
    help="bind another token (WPT 'oth'), NAME=VALUE with NAME its header field; repeatable",
)
@click.option(
    "--now",
    type=float,
    default=None,
    callback=_finite_now,
    help="pin the issue time (epoch seconds)",
)
@click.option(
    "--headers",
    "as_headers",
    is_flag=True,
    help="print the header lines to send instead of the bare WPT",
)
@click.option(
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help='json: {"wpt": ..., "headers": [[name, value], ...]}',
)
def sign_wpt(
    store: KeyStore,
    name: str,
    wit_file: str,
    audience: str,
    ttl: int,
    wire: str,
    txn_token: str | None,
    access_token: str | None,
    other_tokens: dict[str, str],
    now: float | None,
    as_headers: bool,
    output: str,
) -> None:
    """Sign a WPT through a key store key; print it (or the headers to send)."""
    from custos.keys.jose import joserfc_key
    from custos.wimse.wpt import create_wpt, wpt_headers

    wire_form: Any = wire  # click.Choice checked it is one of the Wire literals
    wit_text = _read_input(wit_file, "--wit", text=True)
    assert isinstance(wit_text, str)
    wit = wit_text.strip()
    wpt = create_wpt(
        joserfc_key(store.get(name)),
        wit,
        audience,
        ttl_seconds=ttl,
        txn_token=txn_token,
        wire=wire_form,
        access_token=access_token,
        now=now,
        other_tokens=other_tokens or None,
    )
    lines = wpt_headers(wit, wpt, wire=wire_form)
    if txn_token is not None:
        lines.append(("Txn-Token", txn_token))
    lines.extend(other_tokens.items())
    if access_token is not None:
        lines.append(("Authorization", f"Bearer {access_token}"))
    if output == "json":
        click.echo(json.dumps({"wpt": wpt, "headers": [list(h) for h in lines]}))
    elif as_headers:
        for k, v in lines:
            click.echo(f"{k}: {v}")
    else:
        click.echo(wpt)


@click.group()
def jwt() -> None:
    """JWT-SVIDs."""


@jwt.command()
@_bundle_options("JWKS or SPIFFE bundle file with the JWT-SVID signing keys")
@click.option("--audience", required=True, help="the audience this validator is")
@click.argument("token")
def validate(
    bundle_path: Path, trust_domain: str | None, audience: str, now: float | None, token: str
) -> None:
    """Validate a JWT-SVID; print its claims as JSON (exit 1 with the problem JSON otherwise)."""
    from custos.jwtsvid import validate_jwt_svid

    try:
        when = datetime.fromtimestamp(now, tz=UTC) if now is not None else None
    except (OverflowError, ValueError, OSError) as e:
        raise click.BadParameter("not a usable epoch time", param_hint="--now") from e
    try:
        bundles = _bundles_for(bundle_path, trust_domain, token, jwt_svid=True)
        svid = validate_jwt_svid(token, audience, bundles, now=when)
    except CustosError as err:
        _problem_exit(err)
    click.echo(
        json.dumps(
            {
                "sub": str(svid.spiffe_id),
                "aud": list(svid.audience),
                "exp": int(svid.expiry.timestamp()),
                "claims": dict(svid.claims),
            },
            sort_keys=True,
            default=str,
        )
    )
