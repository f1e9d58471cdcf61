"""The test rigs do what the README and docs/testing.md say, and the README's
Python runs as written.

- ``softhsm`` is a fresh, empty token for every test; ``softhsm_session`` is one
  token for the whole session;
- the README's Python blocks run unchanged: the library one against a real swtpm
  (with the environment the tour exports), the relying-party one serving a real call
  through Starlette, the fixture one as a test file of a project that merely has custos
  installed; the tour's shell block runs too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from custos.keys.pkcs11 import Pkcs11KeyStore
from custos.testing.softhsm import SoftHSMToken
from custos.testing.swtpm import SwtpmInstance

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("round_", [1, 2])
def test_softhsm_token_is_fresh_for_every_test(softhsm: SoftHSMToken, round_: int) -> None:
    # Both rounds see an empty token: the first one's key did not survive into the second.
    store = Pkcs11KeyStore(softhsm.module, softhsm.uri)
    try:
        assert store.list() == []
        store.create("left-behind", "ES256")
        assert [k.name for k in store.list()] == ["left-behind"]
    finally:
        store.close()


def test_softhsm_session_is_one_token_beside_the_fresh_ones(
    softhsm: SoftHSMToken, softhsm_session: SoftHSMToken
) -> None:
    assert softhsm.token_label != softhsm_session.token_label
    # Same private config: one SOFTHSM2_CONF per process sees both.
    assert softhsm.conf == softhsm_session.conf
    assert os.environ["SOFTHSM2_CONF"] == str(softhsm.conf)
    assert softhsm_session.env == {"SOFTHSM2_CONF": str(softhsm.conf)}


def readme_block(marker: str) -> str:
    found = [block for block in python_blocks() if marker in block]
    assert len(found) == 1, f"one README python block with {marker!r}; update this test with it"
    return found[0]


def test_every_readme_python_block_is_valid_python() -> None:
    blocks = python_blocks()
    assert blocks
    for block in blocks:
        compile(block, "README.md", "exec")


def test_readme_library_snippet_runs_against_swtpm(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    # The tour's shell exported CUSTOS_TCTI and CUSTOS_KEY_DIR; the block runs unchanged.
    env = dict(os.environ, CUSTOS_TCTI=swtpm.tcti, CUSTOS_KEY_DIR=str(tmp_path / "keys"))
    done = subprocess.run(
        [sys.executable, "-c", readme_block("open_key_store")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    token, refusal = done.stdout.strip().splitlines()[-2:]
    assert token.count(".") == 2
    assert refusal == "refused: export_refused"


def test_readme_fixture_snippet_runs_as_a_users_test(tmp_path: Path) -> None:
    # A project with custos installed gets the fixtures from the pytest11 entry point.
    test_file = tmp_path / "test_readme_fixture.py"
    test_file.write_text(readme_block("def test_my_service(swtpm, softhsm)"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
         "--rootdir", str(tmp_path), str(test_file)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    # The tour's shell block, with its own directories and a free port instead of 2321
    # (the suite must not take a port a developer's swtpm may hold); `make venv` is what
    # got us here, so that line is left out.
    from custos.testing.swtpm import free_port_pair

    text = README.read_text()
    tour = text[text.index("## A 5-minute tour"):]
    block = re.search(r"```sh\n(.*?)```", tour, flags=re.DOTALL)
    assert block is not None
    lines = [ln for ln in block.group(1).splitlines() if not ln.startswith("make venv")]
    port = free_port_pair()
    script = "\n".join(lines)
    for old, new in (("2321", str(port)), ("/tmp/tpm-keys", str(tmp_path / "keys")),
                     ("/tmp/tpm", str(tmp_path / "tpm"))):
        assert old in script
        script = script.replace(old, new)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    (tmp_path / "swtpm").symlink_to(root / "swtpm")  # run from a "checkout" that is tmp_path
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
            env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        subprocess.run(["bash", str(root / "swtpm" / "stop.sh"), str(tmp_path / "tpm")],
                       capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "deleted web" in done.stdout


def test_readme_relying_party_snippet_serves_a_real_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The block runs unchanged with what the text around it supplies: an ASGI `app`, the
    # tour's `store` holding "web", a `wit` for it, and a bundle.json of the caller's domain.
    import json

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from custos.bundle import USE_WIT_SVID
    from custos.keys import MemoryKeyStore
    from custos.wimse.wit import mint_wit

    keys = MemoryKeyStore()
    keys.create("wit-ca", "ES256")
    keys.create("web", "ES256")
    (tmp_path / "bundle.json").write_text(
        json.dumps({"keys": [{**keys.public_jwk("wit-ca"), "use": USE_WIT_SVID}]})
    )
    subject = "spiffe://example.org/ns/shop/sa/web"
    wit = mint_wit(keys.get("wit-ca"), subject=subject, workload_public_jwk=keys.get("web"),
                   ttl=600)

    async def handler(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(request.state.wimse_caller.subject))

    app = Starlette(routes=[Route("/pay", handler, methods=["POST"]),
                            Route("/admin", handler, methods=["POST"])])
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"app": app, "store": keys, "wit": wit}
    exec(readme_block("WimseASGIMiddleware"), namespace)

    with TestClient(namespace["app"], base_url="https://api.example.org") as client:  # type: ignore[arg-type]
        paid = client.post("/pay", content=b"{}", auth=namespace["auth"])  # type: ignore[arg-type]
        assert (paid.status_code, paid.text) == (200, subject)
        unlisted = client.post("/admin", content=b"{}", auth=namespace["auth"])  # type: ignore[arg-type]
        assert unlisted.status_code == 403
        anonymous = client.post("/pay", content=b"{}")
        assert anonymous.status_code in (400, 401)


def test_readme_relying_party_snippet_says_where_its_free_names_come_from() -> None:
    # Audit of issue 7: read after the tour, the block used `app`, `store` and `wit`
    # that nothing defined (the tour's store is closed, its key deleted). Every name
    # the block uses without defining it is explained in one of its comments.
    import ast
    import builtins

    block = readme_block("WimseASGIMiddleware")
    tree = ast.parse(block)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
    free = set()
    # Statements in order: a name read before the block assigns it is free (`app`).
    for statement in tree.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id not in defined:
                    free.add(node.id)
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
    assert free == {"app", "store", "wit"}, free
    comments = "\n".join(ln for ln in block.splitlines() if ln.lstrip().startswith("#"))
    for name in free:
        assert re.search(rf"^#\s+{name}\s", comments, flags=re.MULTILINE), name
    # Building an identifier from a string is shown the one supported way.
    assert 'SpiffeId.parse("spiffe://' in README.read_text()
