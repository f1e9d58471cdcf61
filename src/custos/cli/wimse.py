"""``custos wimse verify|sign-wpt`` and ``custos jwt validate``: local testing and debugging."""

from __future__ import annotations

import base64
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from custos.errors import CustosError


def _peek_subject(token: str) -> str:
    """The ``sub`` of a JWT WITHOUT verifying it — only to pick a trust domain."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims["sub"])
    except (IndexError, ValueError, KeyError, TypeError) as e:
        raise click.UsageError("cannot read the token's sub; pass --trust-domain") from e


def _load_bundle(path: Path, trust_domain: str) -> Any:
    from custos.bundle import BundleSet, TrustBundle
    from custos.identity import TrustDomain

    td = TrustDomain.parse(trust_domain)
    data = path.read_text()
    doc = json.loads(data)
    is_spiffe = "spiffe_sequence" in doc or "spiffe_refresh_hint" in doc or any(
        k.get("use") == "x509-svid" for k in doc.get("keys", []) if isinstance(k, dict)
    )
    bundle = TrustBundle.from_spiffe_json(td, data) if is_spiffe else TrustBundle.from_jwks(td, data)
    bundles = BundleSet()
    bundles.add(bundle)
    return bundles


def _trust_domain_of(subject: str) -> str:
    from custos.identity import parse_workload_id

    return str(parse_workload_id(subject).trust_domain)


def _problem_exit(err: CustosError) -> None:
    from custos.wimse.errors import WimseError
    from custos.wimse.problem import Problem

    if isinstance(err, WimseError):
        body = json.loads(Problem.from_error(err).body())
    else:
        body = {"type": f"urn:custos:problem:{err.code}", "title": "Bad Request",
                "status": 400, "code": err.code}
    click.echo(json.dumps(body, sort_keys=True))
    sys.exit(1)


@click.group()
def wimse() -> None:
    """WIMSE tokens and proofs: verify a request, sign a WPT."""


@wimse.command()
@click.option("--bundle", "bundle_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="JWKS or SPIFFE bundle file with the WIT signing keys")
@click.option("--trust-domain", default=None,
              help="trust domain the bundle belongs to. Without it the bundle is trusted for "
              "whatever trust domain the token's sub names: a DEBUGGING CONVENIENCE only, "
              "never how a relying party should run.")
@click.option("--now", type=float, default=None, help="pin the clock (epoch seconds)")
@click.option("--audience", default=None,
              help="origin this relying party serves, e.g. https://api.example.com "
              "[default: the origin of --url]")
@click.option("--method", required=True)
@click.option("--url", required=True, help="the request URL as the client sent it")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value', repeatable")
@click.option("--body-file", type=click.File("rb"), default=None)
@click.option("--no-wpt01", is_flag=True, help="refuse the wpt-01 wire form")
def verify(
    bundle_path: Path, trust_domain: str | None, now: float | None, audience: str | None,
    method: str, url: str, headers: tuple[str, ...], body_file: Any, no_wpt01: bool,
) -> None:
    """Verify a request carrying a WIT + WPT (either form) or a WIMSE HTTP signature.

    Prints {"sub", "trust_domain", "variant"} and exits 0 when authentic; prints
    the problem JSON and exits 1 otherwise.
    """
    from custos.wimse.http import HttpMessage
    from custos.wimse.verifier import build_request_verifier

    parsed: list[tuple[str, str]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise click.UsageError(f"header {h[:40]!r} is not 'Name: value'")
        parsed.append((name.strip(), value.strip()))
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise click.UsageError("--url must be absolute")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    origin = audience or f"{parts.scheme}://{parts.netloc}"
    request = HttpMessage.request(method, target, parsed, body_file.read() if body_file else None)
    try:
        wit = request.get("workload-identity-token")
        td = trust_domain or (_trust_domain_of(_peek_subject(wit)) if wit else None)
        if td is None:
            from custos.wimse.errors import WitError

            raise WitError("no Workload-Identity-Token header", code="wit_missing")
        bundles = _load_bundle(bundle_path, td)
        verifier = build_request_verifier(
            bundles, [origin], accept_wpt01=not no_wpt01, now=now if now is not None else None
        )
        caller = verifier.verify(request)
    except CustosError as err:
        _problem_exit(err)
        return
    click.echo(json.dumps(
        {"sub": caller.subject, "trust_domain": caller.trust_domain, "variant": caller.variant},
        sort_keys=True,
    ))


@wimse.command("sign-wpt")
@click.option("--store", "store_kind", required=True,
              type=click.Choice(["tpm", "pkcs11", "memory", "exportable"]))
@click.option("--name", required=True, help="the workload key (the WIT's cnf key)")
@click.option("--tcti", default=None)
@click.option("--key-dir", default=None, type=click.Path(path_type=Path))
@click.option("--pkcs11-module", default=None)
@click.option("--pkcs11-uri", default=None)
@click.option("--wit", "wit_file", required=True, type=click.File("r"), help="file with the WIT ('-': stdin)")
@click.option("--audience", required=True, help="target URI (query and fragment are dropped)")
@click.option("--ttl", default=60, show_default=True, type=int)
@click.option("--wire", default="wpt-02", type=click.Choice(["wpt-02", "wpt-01"]), show_default=True)
@click.option("--txn-token", default=None)
@click.option("--headers", "as_headers", is_flag=True, help="print the HTTP header lines instead")
def sign_wpt(
    store_kind: str, name: str, tcti: str | None, key_dir: Path | None,
    pkcs11_module: str | None, pkcs11_uri: str | None, wit_file: Any, audience: str,
    ttl: int, wire: str, txn_token: str | None, as_headers: bool,
) -> None:
    """Sign a WPT through a key store key; print it (or the headers to send)."""
    from custos.keys import KeyStoreConfig, open_key_store
    from custos.keys.jose import joserfc_key
    from custos.wimse.wpt import create_wpt, wpt_headers

    wit = wit_file.read().strip()
    config = KeyStoreConfig.from_env(store_kind, tcti=tcti, key_dir=key_dir,
                                     pkcs11_module=pkcs11_module, pkcs11_uri=pkcs11_uri)
    with open_key_store(config) as store:
        wpt = create_wpt(joserfc_key(store.get(name)), wit, audience, ttl_seconds=ttl,
                         txn_token=txn_token, wire=wire)  # type: ignore[arg-type]
    if as_headers:
        for k, v in wpt_headers(wit, wpt, wire=wire):  # type: ignore[arg-type]
            click.echo(f"{k}: {v}")
    else:
        click.echo(wpt)


@click.group()
def jwt() -> None:
    """JWT-SVIDs."""


@jwt.command()
@click.option("--bundle", "bundle_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--trust-domain", default=None,
              help="trust domain of the bundle [default: the token's, a debugging convenience]")
@click.option("--audience", required=True)
@click.option("--now", type=float, default=None)
@click.argument("token")
def validate(bundle_path: Path, trust_domain: str | None, audience: str, now: float | None,
             token: str) -> None:
    """Validate a JWT-SVID; print its claims as JSON (exit 1 with the error otherwise)."""
    from custos.jwtsvid import validate_jwt_svid

    try:
        td = trust_domain or _trust_domain_of(_peek_subject(token))
        bundles = _load_bundle(bundle_path, td)
        when = datetime.fromtimestamp(now, tz=UTC) if now is not None else None
        svid = validate_jwt_svid(token, audience, bundles, now=when)
    except CustosError as err:
        _problem_exit(err)
        return
    click.echo(json.dumps({"sub": str(svid.spiffe_id), "claims": dict(svid.claims),
                           "checked_at": now or time.time()}, sort_keys=True, default=str))
