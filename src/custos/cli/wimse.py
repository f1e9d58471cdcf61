"""``custos wimse verify|sign-wpt`` and ``custos jwt validate``: local testing and debugging."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import click

from custos.cli.keys import store_options
from custos.errors import CustosError
from custos.keys import KeyStore

if TYPE_CHECKING:
    from custos.bundle import BundleSet

_DEBUG_TRUST_NOTE = (
    "Without it the bundle is trusted for whatever trust domain the token's sub "
    "names: a DEBUGGING CONVENIENCE only, never how a relying party should run."
)


def _peek_subject(token: str) -> str:
    """The ``sub`` of a JWT WITHOUT verifying it: only to pick a trust domain
    when --trust-domain is not given."""
    from custos.wimse.errors import WitError
    from custos.wimse.wit import b64url_decode_strict, json_object_strict

    try:
        claims = json_object_strict(b64url_decode_strict(token.strip().split(".")[1]))
        sub = claims["sub"]
    except (IndexError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise WitError("cannot read the token's sub", code="wit_malformed") from e
    if not isinstance(sub, str):
        raise WitError("the token's sub is not a string", code="wit_bad_sub")
    return sub


def _trust_domain_of(subject: str) -> str:
    from custos.identity import parse_workload_id
    from custos.wimse.errors import WitError

    try:
        return str(parse_workload_id(subject).trust_domain)
    except CustosError as e:
        raise WitError("the token's sub is not a workload identifier", code="wit_bad_sub") from e


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
        data = path.read_bytes()
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise _InputError(f"{path}: not a JSON object", code="bundle_invalid")
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
        if is_spiffe:
            bundle = TrustBundle.from_spiffe_json(td, data)
        else:
            bundle = TrustBundle.from_jwks(td, data)
    except (OSError, ValueError, RecursionError) as e:
        raise _InputError(f"cannot read bundle {path}: {e}", code="bundle_unreadable") from e
    except BundleError as e:
        raise _InputError(f"unusable bundle {path}: {e.message}", code="bundle_invalid") from e
    return BundleSet([bundle])


class _InputError(CustosError):
    """The operator's own input (bundle file, --trust-domain) is unusable.

    Reported like a refused request (problem JSON on stdout, exit 1) so that a
    script reading stdout always gets JSON; the detail, which concerns only
    the operator's files, goes to stderr.
    """


def _problem_exit(err: CustosError) -> NoReturn:
    """Print the RFC 9457 problem JSON for ``err`` (the code, nothing more) and exit 1."""
    from custos.integrations.problem import Problem
    from custos.wimse.errors import WimseError

    if isinstance(err, _InputError):
        click.echo(f"error: {err.message}", err=True)

    status = err.status if isinstance(err, WimseError) else 400
    body = json.loads(Problem(status, err.code).body())
    click.echo(json.dumps(body, sort_keys=True))
    sys.exit(1)


@click.group()
def wimse() -> None:
    """WIMSE tokens and proofs: verify a request, sign a WPT."""


@wimse.command()
@click.option(
    "--bundle",
    "bundle_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JWKS or SPIFFE bundle file with the WIT signing keys (each with no 'use' or "
    "'use': 'wit-svid'; a key marked 'sig' or for another credential is refused)",
)
@click.option(
    "--trust-domain", default=None, help=f"trust domain the bundle belongs to. {_DEBUG_TRUST_NOTE}"
)
@click.option("--now", type=float, default=None, help="pin the clock (epoch seconds)")
@click.option(
    "--audience",
    default=None,
    help="origin this relying party serves, e.g. https://api.example.com "
    "[default: the origin of --url]",
)
@click.option("--method", required=True, help="request method, e.g. POST")
@click.option("--url", required=True, help="the request URL as the client sent it")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value', repeatable")
@click.option("--body-file", type=click.File("rb"), default=None, help="the request body")
@click.option("--no-wpt01", is_flag=True, help="refuse the wpt-01 wire form")
@click.option(
    "--max-ttl",
    type=click.IntRange(min=1),
    default=None,
    help="how far ahead (seconds) a WPT's exp may lie [default: 300]; the drafts' "
    "example WPT lives ~17 minutes",
)
def verify(
    bundle_path: Path,
    trust_domain: str | None,
    now: float | None,
    audience: str | None,
    method: str,
    url: str,
    headers: tuple[str, ...],
    body_file: IO[bytes] | None,
    no_wpt01: bool,
    max_ttl: int | None,
) -> None:
    """Verify a request carrying a WIT + WPT (either form) or a WIMSE HTTP signature.

    Prints {"sub", "trust_domain", "variant"} and exits 0 when authentic;
    prints the problem JSON and exits 1 otherwise.
    """
    from custos.wimse.errors import WitError
    from custos.wimse.http.message import HttpMessage
    from custos.wimse.verifier import build_request_verifier

    parsed: list[tuple[str, str]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise click.UsageError(f"header {h[:40]!r}... is not 'Name: value'")
        parsed.append((name, value.strip(" \t")))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.UsageError("--url must be an absolute http(s) URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    origin = audience or f"{parts.scheme}://{parts.netloc}"
    request = HttpMessage.request(method, target, parsed, body_file.read() if body_file else None)
    try:
        bundles = _load_bundle(bundle_path, trust_domain) if trust_domain else None
        if bundles is None:
            wit = request.get("workload-identity-token")
            if wit is None:
                raise WitError("no Workload-Identity-Token header", code="wit_missing")
            bundles = _load_bundle(bundle_path, _trust_domain_of(_peek_subject(wit)))
        try:
            verifier = build_request_verifier(
                bundles, [origin], accept_wpt01=not no_wpt01, now=now, wpt_max_ttl=max_ttl
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
    "--wit", "wit_file", required=True, type=click.File("r"), help="file with the WIT ('-': stdin)"
)
@click.option(
    "--audience",
    required=True,
    help="target URI, e.g. https://api.example.com/pay (query and fragment are dropped)",
)
@click.option("--ttl", default=60, show_default=True, type=int, help="seconds the WPT lives")
@click.option(
    "--wire",
    default="wpt-02",
    type=click.Choice(["wpt-02", "wpt-01"]),
    show_default=True,
    help="wpt-02: Authorization: WPT; wpt-01: Workload-Proof-Token",
)
@click.option("--txn-token", default=None, help="bind this Txn-Token (tth)")
@click.option("--access-token", default=None, help="wpt-01 only: bind this bearer token (ath)")
@click.option("--now", type=float, default=None, help="pin the issue time (epoch seconds)")
@click.option(
    "--headers",
    "as_headers",
    is_flag=True,
    help="print the header lines to send instead of the bare WPT",
)
def sign_wpt(
    store: KeyStore,
    name: str,
    wit_file: IO[str],
    audience: str,
    ttl: int,
    wire: str,
    txn_token: str | None,
    access_token: str | None,
    now: float | None,
    as_headers: bool,
) -> None:
    """Sign a WPT through a key store key; print it (or the headers to send)."""
    from custos.keys.jose import joserfc_key
    from custos.wimse.wpt import create_wpt, wpt_headers

    wire_form: Any = wire  # click.Choice checked it is one of the Wire literals
    wit = wit_file.read().strip()
    wpt = create_wpt(
        joserfc_key(store.get(name)),
        wit,
        audience,
        ttl_seconds=ttl,
        txn_token=txn_token,
        wire=wire_form,
        access_token=access_token,
        now=now,
    )
    if as_headers:
        lines = wpt_headers(wit, wpt, wire=wire_form)
        if txn_token is not None:
            lines.append(("Txn-Token", txn_token))
        if access_token is not None:
            lines.append(("Authorization", f"Bearer {access_token}"))
        for k, v in lines:
            click.echo(f"{k}: {v}")
    else:
        click.echo(wpt)


@click.group()
def jwt() -> None:
    """JWT-SVIDs."""


@jwt.command()
@click.option(
    "--bundle",
    "bundle_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JWKS or SPIFFE bundle file with the JWT-SVID signing keys",
)
@click.option(
    "--trust-domain", default=None, help=f"trust domain the bundle belongs to. {_DEBUG_TRUST_NOTE}"
)
@click.option("--audience", required=True, help="the audience this validator is")
@click.option("--now", type=float, default=None, help="pin the clock (epoch seconds)")
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
        bundles = _load_bundle(bundle_path, trust_domain) if trust_domain else None
        if bundles is None:
            bundles = _load_bundle(bundle_path, _trust_domain_of(_peek_subject(token)))
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
