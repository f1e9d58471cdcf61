"""wpt-02: implementations must not log raw WPTs (nor, here, WITs or signature values).

Every log record at DEBUG, from every logger (custos, httpx, httpcore, urllib3,
werkzeug, asyncio ...), is captured while accepted and refused requests go
through both middlewares (ASGI, WSGI) from both clients (httpx sync and async,
requests over real HTTP), in both variants (WPT, HTTP signature), with signed
responses accepted and refused. Each record is rendered three ways -- the
stdlib message, the record's whole ``__dict__`` (structured fields included)
and structlog's ``ProcessorFormatter`` (how structlog users see custos logs)
-- and none may contain a WIT, a WPT, a JWS signature segment or an HTTP
signature value that went over the wire.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import structlog
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from werkzeug.serving import make_server
from wimse_rig import ca_bundles
from wimse_rig import mint_example_wit as mint

from custos.bundle import BundleSet
from custos.identity import SpiffeId
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.auth import WimseAuth, WimseRequestsAuth
from custos.integrations.wsgi import WimseWSGIMiddleware
from custos.keys.software import MemoryKeyStore
from custos.wimse.errors import WimseError
from custos.wimse.httpsig import ResponseSigner
from custos.wimse.verifier import build_request_verifier

WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/shop/sa/api")
ORIGIN = "https://api.example.org"
VARIANTS = ["wpt", "http-signature"]
#: Header fields whose values are credentials or signatures.
SECRET_FIELDS = ("workload-identity-token", "authorization", "signature", "workload-proof-token")


class Everything(logging.Handler):
    """Keeps every record and three renderings of it."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self._structlog = structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(default=repr),
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.ExtraAdder(),
            ],
        )

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(logging.Formatter().format(record))
        self.texts.append(repr(record.__dict__))
        self.texts.append(self._structlog.format(record))


@pytest.fixture
def captured() -> Iterator[Everything]:
    handler = Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # Loggers configured elsewhere with a level of their own still reach DEBUG here.
    touched = []
    for name in ("custos", "httpx", "httpcore", "urllib3", "werkzeug", "asyncio", "starlette"):
        logger = logging.getLogger(name)
        touched.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.DEBUG)
        logger.propagate = True
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for logger, level, propagate in touched:
            logger.setLevel(level)
            logger.propagate = propagate


class Wire:
    """Every secret value that went over the wire, in either direction."""

    def __init__(self) -> None:
        self.values: set[str] = set()

    def note(self, headers: Any) -> None:
        for name, value in headers.items():
            if name.lower() in SECRET_FIELDS:
                self.add(value)

    def add(self, value: str) -> None:
        value = value.strip()
        if len(value) >= 16:
            self.values.add(value)
        # the pieces a logger might print on their own: a token after its
        # scheme, each JWS segment, each ":base64:" signature value
        for part in re.split(r"[ ,;=]+", value):
            for segment in part.split("."):
                if len(segment) >= 24:
                    self.values.add(segment)
        for sig in re.findall(r":([A-Za-z0-9+/=_-]{24,}):", value):
            self.values.add(sig)


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    for name in ("ca", "web", "api"):
        s.create(name, "ES256")
    return s


@pytest.fixture(scope="module")
def bundles(store: MemoryKeyStore) -> BundleSet:
    return ca_bundles(store)


def apps(bundles: BundleSet, signer: ResponseSigner, origin: str) -> tuple[Any, Any]:
    async def pay(request: Request) -> JSONResponse:
        return JSONResponse({"sub": request.state.wimse_caller.subject})

    asgi = WimseASGIMiddleware(
        Starlette(routes=[Route("/pay", pay, methods=["GET", "POST"])]),
        build_request_verifier(bundles, origin),
        policy={"/pay": [str(WEB)]},
        response_signer=signer,
    )
    flask = Flask("no-token-logging")

    @flask.route("/pay", methods=["GET", "POST"])
    def flask_pay() -> dict[str, str]:
        return {"sub": flask_request.environ["custos.caller"].subject}

    wsgi = WimseWSGIMiddleware(
        flask.wsgi_app,
        build_request_verifier(bundles, origin),
        policy={"/pay": [str(WEB)]},
        response_signer=signer,
    )
    return asgi, wsgi


def test_no_token_or_signature_in_any_log_record(
    captured: Everything, store: MemoryKeyStore, bundles: BundleSet
) -> None:
    wire = Wire()
    web_wit, api_wit = mint(store, WEB, "web"), mint(store, API, "api")
    stranger_wit = mint(store, SpiffeId.parse("spiffe://example.org/ns/x/sa/stranger"), "web")
    for token in (web_wit, api_wit, stranger_wit):
        wire.add(token)
    signer = ResponseSigner(store.get("api"), api_wit)

    def record(response: httpx.Response) -> None:
        wire.note(response.request.headers)
        wire.note(response.headers)

    hooks = {"response": [record]}
    outcomes: list[str] = []

    def attempt(call: Any, *args: Any, **kwargs: Any) -> None:
        try:
            got = call(*args, **kwargs)
            outcomes.append(str(getattr(got, "status_code", got)))
        except WimseError as e:
            outcomes.append(e.code)

    # -- httpx, sync, through the WSGI middleware; async through the ASGI one --
    asgi, wsgi = apps(bundles, signer, ORIGIN)
    for variant in VARIANTS:
        kw: dict[str, Any] = {"variant": variant}
        if variant == "http-signature":
            kw.update(bundles=bundles, require_signed_response=True, expected_responder=str(API))
        good = WimseAuth.from_key(store.get("web"), web_wit, **kw)
        stranger = WimseAuth.from_key(store.get("web"), stranger_wit, variant=variant)
        wrong_responder = (
            WimseAuth.from_key(store.get("web"), web_wit, **dict(kw, expected_responder=str(WEB)))
            if variant == "http-signature"
            else stranger
        )
        transport = httpx.WSGITransport(app=wsgi)
        with httpx.Client(transport=transport, base_url=ORIGIN, event_hooks=hooks) as c:
            attempt(c.post, "/pay", json={"n": 1}, auth=good)  # accepted
            attempt(c.post, "/pay", json={"n": 1}, auth=stranger)  # policy: 403
            attempt(c.get, "/pay", auth=wrong_responder)  # refused response
            sent = c.get(
                "/pay", auth=WimseAuth.from_key(store.get("web"), web_wit, variant=variant)
            )
            replay = {k: v for k, v in sent.request.headers.items() if k != "host"}
            attempt(c.get, "/pay", headers=replay)  # replayed: refused
            forged = dict(replay)
            if "authorization" in forged:
                forged["authorization"] = forged["authorization"][:-6] + "AAAAAA"
            else:
                forged["signature"] = forged["signature"].replace(":", ":A", 1)
            attempt(c.get, "/pay", headers=forged)  # forged: refused

        async def run_async(auth: WimseAuth) -> httpx.Response:
            transport = httpx.ASGITransport(app=asgi)
            async with httpx.AsyncClient(
                transport=transport, base_url=ORIGIN, event_hooks={"response": [arecord]}
            ) as c:
                return await c.post("/pay", content=b"x", auth=auth)

        async def arecord(response: httpx.Response) -> None:
            record(response)

        for auth in (good, stranger, wrong_responder):
            attempt(lambda a: asyncio.run(run_async(a)), auth)

    # -- requests over real HTTP to the WSGI middleware --
    holder: dict[str, Any] = {}
    server = make_server("127.0.0.1", 0, lambda e, s: holder["app"](e, s), threaded=True)
    origin = f"http://127.0.0.1:{server.server_port}"
    holder["app"] = apps(bundles, signer, origin)[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with requests.Session() as session:

            def note(r: requests.Response, *args: Any, **kwargs: Any) -> None:
                # (a hook that returns something replaces the response)
                wire.note(r.request.headers)
                wire.note(r.headers)

            session.hooks["response"].append(note)
            for variant in VARIANTS:
                kw = {"variant": variant}
                if variant == "http-signature":
                    kw.update(
                        bundles=bundles, require_signed_response=True, expected_responder=str(API)
                    )
                good_r = WimseRequestsAuth.from_key(store.get("web"), web_wit, **kw)
                stranger_r = WimseRequestsAuth.from_key(
                    store.get("web"), stranger_wit, variant=variant
                )
                attempt(session.post, f"{origin}/pay", data=b"x", auth=good_r, timeout=10)
                attempt(session.get, f"{origin}/pay", auth=stranger_r, timeout=10)
                attempt(session.get, f"{origin}/pay", timeout=10)  # no proof at all
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()

    # The run did what it claims: accepted and refused requests and responses.
    assert "200" in outcomes and "403" in outcomes
    assert "unexpected_responder" in outcomes
    assert any(o in ("401", "400") for o in outcomes)
    assert len(wire.values) > 20
    # Something was logged (the refusals at least), or the check below is empty.
    assert any(getattr(r, "event", None) == "wimse_request_refused" for r in captured.records)
    assert any(r.levelno == logging.DEBUG for r in captured.records)

    leaks = sorted(
        {value[:24] + "..." for value in wire.values for text in captured.texts if value in text}
    )
    assert leaks == []
