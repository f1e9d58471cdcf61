"""What imports without the optional extras (issue 7, item 5 and "Packaging").

Each check runs in a fresh interpreter with a ``sys.meta_path`` finder that
makes the named top-level packages unimportable, exactly as on a machine where
they are not installed (or, for tpm2-pytss, where libtss2 is missing).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = """
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

for _name in list(sys.modules):
    if _name.partition(".")[0] in BLOCKED:
        del sys.modules[_name]
sys.meta_path.insert(0, _Blocked())
"""


def run_without(blocked: set[str], body: str) -> subprocess.CompletedProcess[str]:
    code = f"BLOCKED = {sorted(blocked)!r}\n{BLOCKER}\n{textwrap.dedent(body)}"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )


def test_the_blocker_blocks() -> None:
    # Guards the two tests below: they would pass vacuously if nothing was blocked.
    done = run_without({"pytest"}, "import pytest\n")
    assert done.returncode != 0
    assert "blocked" in done.stderr


def test_demo_and_rigs_import_without_pytest() -> None:
    done = run_without(
        {"pytest", "_pytest"},
        """
        import custos.demo
        import custos.testing.softhsm
        import custos.testing.swtpm
        from custos.testing.swtpm import provision, start_instance, copy_state
        from custos.testing.softhsm import write_config, init_token, find_module
        import sys
        assert "pytest" not in sys.modules and "_pytest" not in sys.modules
        print("ok")
        """,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_rig_command_line_runs_without_pytest(tmp_path: object) -> None:
    # swtpm/provision.sh runs `python -m custos.testing.swtpm`: no pytest needed there either.
    done = run_without(
        {"pytest", "_pytest"},
        """
        import runpy, sys
        sys.argv = ["custos.testing.swtpm", "--help"]
        try:
            runpy.run_module("custos.testing.swtpm", run_name="__main__")
        except SystemExit as e:
            assert e.code == 0, e.code
        """,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "provision" in done.stdout


def test_relying_party_verifies_wit_and_wpt_without_device_libraries() -> None:
    # A relying party installs plain `custos`: no tpm2-pytss (libtss2), no python-pkcs11.
    done = run_without(
        {"tpm2_pytss", "pkcs11"},
        """
        from datetime import timedelta

        from custos.bundle import USE_WIT_SVID, BundleSet, JwtAuthority, TrustBundle
        from custos.identity import SpiffeId, TrustDomain
        from custos.keys import MemoryKeyStore
        from custos.keys.jose import joserfc_key
        from custos.wimse.errors import WimseError
        from custos.wimse.http.message import HttpMessage
        from custos.wimse.replay import MemoryReplayCache
        from custos.wimse.wit import mint_wit
        from custos.wimse.wpt import WptVerifier, create_wpt, wpt_headers
        import custos.integrations.asgi, custos.integrations.wsgi, custos.wimse.httpsig

        keys = MemoryKeyStore()
        keys.create("ca", "ES256")
        keys.create("web", "ES256")
        wit = mint_wit(
            joserfc_key(keys.get("ca")), "ES256", "ca-1",
            SpiffeId.parse("spiffe://example.org/web"), keys.public_jwk("web"),
            timedelta(minutes=5),
        )
        wpt = create_wpt(joserfc_key(keys.get("web")), wit, "https://rp.example.org/pay")
        authority = JwtAuthority("ca-1", keys.get("ca").public_key(), use=USE_WIT_SVID)
        bundles = BundleSet([TrustBundle(TrustDomain.parse("example.org"),
                                         jwt_authorities=(authority,))])
        verifier = WptVerifier(bundles, audiences=["https://rp.example.org"],
                               replay=MemoryReplayCache())
        request = HttpMessage.request("POST", "/pay", wpt_headers(wit, wpt))
        caller = verifier.verify(request)
        assert str(caller.subject) == "spiffe://example.org/web", caller
        try:
            verifier.verify(request)
        except WimseError as e:
            assert e.code == "wpt_replayed", e.code
        else:
            raise AssertionError("replay accepted")
        import sys
        assert not {"tpm2_pytss", "pkcs11"} & set(sys.modules)
        print("ok")
        """,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_a_missing_extra_is_a_clear_custos_error() -> None:
    # The TPM or PKCS#11 store asked for without its extra: a custos error naming the extra,
    # from the library and from the command line, never an ImportError traceback.
    done = run_without(
        {"tpm2_pytss", "pkcs11"},
        """
        import io, contextlib
        from custos.errors import CustosError
        from custos.keys import KeyStoreConfig, open_key_store
        from custos.cli.main import cli

        for store, extra, config in (
            ("tpm", "tpm", KeyStoreConfig(store="tpm", tcti="swtpm:port=1",
                                          key_dir="/nonexistent")),
            ("pkcs11", "pkcs11", KeyStoreConfig(store="pkcs11", pkcs11_module="/x.so",
                                                pkcs11_uri="pkcs11:token=t")),
        ):
            try:
                open_key_store(config)
            except CustosError as e:
                assert e.code == "missing_extra", e.code
                assert f"pip install 'custos[{extra}]'" in str(e), str(e)
            else:
                raise AssertionError(f"{store} opened without its library")

        for argv in (["keys", "list", "--store", "tpm", "--tcti", "swtpm:port=1",
                      "--key-dir", "/nonexistent"],
                     ["tpm", "info", "--tcti", "swtpm:port=1"]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    cli.main(argv, prog_name="custos")
                except SystemExit as e:
                    code = e.code
            assert code == 1, (argv, code, err.getvalue())
            text = err.getvalue()
            assert "missing_extra" in text and "Traceback" not in text, text
        print("ok")
        """,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_extra_needed_names_only_the_extras_own_import_errors() -> None:
    import pytest

    from custos._extras import MissingExtraError, extra_needed

    with pytest.raises(MissingExtraError) as caught, extra_needed("httpx"):
        raise ModuleNotFoundError("No module named 'httpx'", name="httpx")
    assert caught.value.code == "missing_extra" and caught.value.extra == "httpx"
    assert "pip install 'custos[httpx]';" in str(caught.value)
    with pytest.raises(MissingExtraError, match=r"libtss2-dev"), extra_needed("tpm"):
        raise ImportError("libtss2-esys.so.0: cannot open shared object file")
    # Any other ImportError is a bug to see, not an extra to install.
    with pytest.raises(ImportError) as other, extra_needed("tpm"):
        raise ImportError("cannot import name 'X' from 'custos.tpm'", name="custos.tpm")
    assert not isinstance(other.value, MissingExtraError)


# -- audit of issue 7: each client extra works without the other ------------------

CLIENT_RIG = """
from datetime import timedelta

from custos.bundle import USE_WIT_SVID, BundleSet, JwtAuthority, TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.integrations.wsgi import WimseWSGIMiddleware
from custos.keys import MemoryKeyStore
from custos.keys.jose import joserfc_key
from custos.wimse.signer import LocalProofSigner
from custos.wimse.verifier import build_request_verifier
from custos.wimse.wit import mint_wit

keys = MemoryKeyStore()
keys.create("ca", "ES256")
keys.create("web", "ES256")
wit = mint_wit(
    joserfc_key(keys.get("ca")), "ES256", "ca-1",
    SpiffeId.parse("spiffe://example.org/web"), keys.public_jwk("web"),
    timedelta(minutes=5),
)
signer = LocalProofSigner(keys.get("web"), wit)
authority = JwtAuthority("ca-1", keys.get("ca").public_key(), use=USE_WIT_SVID)
bundles = BundleSet([TrustBundle(TrustDomain.parse("example.org"),
                                 jwt_authorities=(authority,))])


def whoami(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(environ["custos.caller"].subject).encode()]


def relying_party(origin):
    return WimseWSGIMiddleware(whoami, build_request_verifier(bundles, [origin]))
"""


def test_requests_auth_works_without_httpx() -> None:
    # A requests-only install: WimseRequestsAuth signs real HTTP requests that a
    # WSGI relying party (wsgiref, 127.0.0.1) verifies; WimseAuth is a custos error.
    done = run_without(
        {"httpx"},
        CLIENT_RIG
        + """
import sys, threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import requests

from custos.errors import CustosError
from custos.wimse import WimseRequestsAuth
from custos.integrations.auth import WimseRequestsAuth as same


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


server = make_server("127.0.0.1", 0, whoami, handler_class=Quiet)  # app set below
origin = f"http://127.0.0.1:{server.server_port}"
server.set_app(relying_party(origin))
threading.Thread(target=server.serve_forever, daemon=True).start()
try:
    for variant in ("wpt", "http-signature"):
        # Content-Type given: wsgiref reports a missing one as "text/plain",
        # a header the signature would then not cover.
        got = requests.post(f"{origin}/pay", data=b"5", timeout=30,
                            headers={"Content-Type": "text/plain"},
                            auth=WimseRequestsAuth(signer, variant=variant))
        assert got.status_code == 200, (variant, got.status_code, got.text)
        assert got.text == "spiffe://example.org/web", got.text
    bare = requests.post(f"{origin}/pay", timeout=30)  # no auth: refused
    assert bare.status_code == 400 and bare.json()["code"] == "wit_missing", bare.text
finally:
    server.shutdown()
assert same is WimseRequestsAuth
for reach in ("from custos.wimse import WimseAuth",
              "from custos.integrations.auth import WimseAuth"):
    try:
        exec(reach)
    except CustosError as e:
        assert e.code == "missing_extra", e.code
        assert "pip install 'custos[httpx]'" in str(e), str(e)
    else:
        raise AssertionError(f"{reach}: worked without httpx")
assert "httpx" not in sys.modules
print("ok")
""",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_httpx_auth_works_without_requests() -> None:
    # An httpx-only install: WimseAuth signs requests that the WSGI relying party
    # verifies (httpx's WSGI transport); WimseRequestsAuth is a custos error.
    done = run_without(
        {"requests"},
        CLIENT_RIG
        + """
import sys

import httpx

from custos.errors import CustosError
from custos.wimse import WimseAuth
from custos.integrations.auth import WimseAuth as same

origin = "https://api.example.org"
transport = httpx.WSGITransport(app=relying_party(origin))
for variant in ("wpt", "http-signature"):
    auth = WimseAuth(signer, variant=variant)
    with httpx.Client(transport=transport, base_url=origin, auth=auth) as client:
        got = client.post("/pay", content=b"5")
    assert got.status_code == 200, (variant, got.status_code, got.text)
    assert got.text == "spiffe://example.org/web", got.text
assert same is WimseAuth
for reach in ("from custos.wimse import WimseRequestsAuth",
              "from custos.integrations.auth import WimseRequestsAuth"):
    try:
        exec(reach)
    except CustosError as e:
        assert e.code == "missing_extra", e.code
        assert "pip install 'custos[requests]'" in str(e), str(e)
    else:
        raise AssertionError(f"{reach}: worked without requests")
assert "requests" not in sys.modules
print("ok")
""",
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
