"""One place for the relying-party API: ``custos.wimse`` re-exports it (lazily),
the middlewares take a policy mapping, and the README's relying-party block runs
as written against a real Starlette app and a real httpx client."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from wimse_rig import TD, ca_bundles, mint_example_wit

import custos.wimse
from custos.identity import SpiffeId
from custos.keys.software import MemoryKeyStore
from custos.wimse.policy import CallerPolicy, PolicyConfigError

README = Path(__file__).resolve().parents[2] / "README.md"
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
OPS = SpiffeId.parse("spiffe://example.org/ns/ops/sa/cron")


def test_every_export_resolves_to_its_defining_object() -> None:
    assert sorted(custos.wimse.__all__) == sorted(custos.wimse._EXPORTS)
    for name, module in custos.wimse._EXPORTS.items():
        value = getattr(custos.wimse, name)
        assert value is getattr(__import__(module, fromlist=[name]), name), name
    assert set(custos.wimse.__all__) <= set(dir(custos.wimse))
    with pytest.raises(AttributeError):
        custos.wimse.NoSuchThing  # noqa: B018


def test_importing_custos_wimse_pulls_in_no_framework_or_client() -> None:
    """Lazy: a relying party without httpx / requests / Redis installed can
    still ``import custos.wimse``; none of them is loaded until asked for."""
    code = (
        "import sys, custos.wimse\n"
        "heavy = {'httpx', 'requests', 'redis', 'starlette', 'flask', 'custos.integrations.auth'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
        "custos.wimse.CallerPolicy\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[]"]


def test_middleware_policy_may_be_a_mapping() -> None:
    mw = custos.wimse.WimseASGIMiddleware(
        lambda *a: None,  # type: ignore[arg-type,return-value]
        custos.wimse.build_request_verifier(ca_bundles(_store()), "https://api.example.org"),
        policy={"/": ["spiffe://example.org"], "/admin": [str(OPS)]},
    )
    assert isinstance(mw.policy, CallerPolicy)
    assert [r.route for r in mw.policy.rules] == ["/admin", "/"]
    with pytest.raises(PolicyConfigError):
        custos.wimse.WimseWSGIMiddleware(
            lambda *a: [],  # type: ignore[arg-type,return-value]
            custos.wimse.build_request_verifier(ca_bundles(_store()), "https://api.example.org"),
            policy=["/pay"],  # type: ignore[arg-type]
        )


def _store() -> MemoryKeyStore:
    store = MemoryKeyStore()
    store.create("ca", "ES256")
    store.create("web", "ES256")
    return store


def readme_rp_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if "from custos.wimse import" in b]
    assert len(found) == 1
    return str(found[0])


def test_readme_relying_party_block_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block leaves ``app``, ``store`` and ``wit`` to the reader: a
    Starlette app, a key store and a WIT; the rest runs unchanged, and the
    client it builds gets through the middleware it builds."""
    store = _store()
    bundle = ca_bundles(store).get(TD)
    assert bundle is not None
    (tmp_path / "bundle.json").write_text(bundle.to_spiffe_json())
    monkeypatch.chdir(tmp_path)

    async def pay(request: Request) -> JSONResponse:
        return JSONResponse({"sub": request.state.wimse_caller.subject})

    names: dict[str, Any] = {
        "app": Starlette(routes=[Route("/pay", pay), Route("/admin", pay)]),
        "store": store,
        "wit": mint_example_wit(store, WEB, "web"),
    }
    exec(compile(readme_rp_block(), "README.md", "exec"), names)

    async def call(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=names["app"])
        async with httpx.AsyncClient(
            transport=transport, base_url="https://api.example.org", auth=names["auth"]
        ) as client:
            return await client.get(path)

    ok = asyncio.run(call("/pay"))
    assert ok.status_code == 200 and ok.json() == {"sub": str(WEB)}
    refused = asyncio.run(call("/admin"))  # no rule covers /admin: fail closed
    assert refused.status_code == 403 and refused.json()["code"] == "caller_not_allowed"


# -- audit of issue 7: the -06 switch and the message types at the API's top ------------


def test_build_request_verifier_takes_accept_draft_06() -> None:
    from custos.wimse.http.message import HttpMessage
    from custos.wimse.httpsig import sign_request

    store = MemoryKeyStore()
    store.create("ca", "ES256")
    store.create("client", "ES256")
    request = HttpMessage.request("GET", "/pay?x=1", [("Host", "api.example.org")])
    signed = sign_request(
        request,
        signer=store.get("client"),
        wit=mint_example_wit(store, WEB, "client"),
        audience="https://api.example.org/pay",  # the -06 form names origin + path
        form="draft-06",
    )
    assert '"@request-target"' in dict(signed.headers)["Signature-Input"]
    origin = ["https://api.example.org"]
    off = custos.wimse.build_request_verifier(ca_bundles(store), origin)
    with pytest.raises(custos.wimse.WimseError) as info:
        off.verify(signed)
    assert info.value.code == "draft06_form_refused"
    on = custos.wimse.build_request_verifier(ca_bundles(store), origin, accept_draft_06=True)
    assert on.verify(signed).subject == str(WEB)


def test_http_message_types_come_from_the_package_tops() -> None:
    import custos.wimse.http
    from custos.wimse.http.message import Endpoint, HttpMessage

    assert custos.wimse.http.HttpMessage is HttpMessage
    assert custos.wimse.http.Endpoint is Endpoint
    assert custos.wimse.HttpMessage is HttpMessage
    assert custos.wimse.Endpoint is Endpoint
    assert {"HttpMessage", "Endpoint"} <= set(custos.wimse.__all__)
    assert {"HttpMessage", "Endpoint"} <= set(custos.wimse.http.__all__)


def test_a_single_trust_bundle_or_nothing_else_in_build_request_verifier() -> None:
    from custos.wimse.wit import BundlesTypeError

    with pytest.raises(BundlesTypeError):
        custos.wimse.build_request_verifier({"example.org": "x"}, ["https://api.example.org"])  # type: ignore[arg-type]
