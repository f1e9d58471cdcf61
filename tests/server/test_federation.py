"""The SPIFFE federation bundle endpoint (https_web): the trust domain's bundle as
SPIFFE bundle JSON over TLS with the operator's web-PKI certificate."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from custos.bundle import TrustBundle
from custos.server.app import ServerStartError
from custos.server.config import ServerConfig
from custos.testing.local_tls import local_tls
from custos.testing.server import free_port, running_server

ConfigFactory = Callable[..., ServerConfig]


async def https_get(address: str, ca_file: Path, raw: bytes) -> bytes:
    """*raw* sent over TLS verified against *ca_file* for "localhost"; the whole answer."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca_file))
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=context, server_hostname="localhost"
    )
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def web_pki_federation(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """(web CA file, a [federation] table on a free port with a certificate it signed)."""
    tls = local_tls(tmp_path / "web-pki", ca_name="test web CA", server_name="localhost")
    return tls.ca_file, {
        "address": f"127.0.0.1:{free_port()}",
        "cert_file": str(tls.cert_file),
        "key_file": str(tls.key_file),
        "refresh_hint": "2m",
    }


def test_federation_endpoint_serves_the_bundle_over_web_pki_tls(
    server_config_factory: ConfigFactory, tmp_path: Path
) -> None:
    ca_file, section = web_pki_federation(tmp_path)
    config = server_config_factory(sections={"federation": section})

    async def run() -> None:
        async with running_server(config) as srv:
            address = srv.federation_address
            assert address is not None and address == section["address"]
            raw = await https_get(address, ca_file, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, body = _split(raw)
            assert status == 200
            assert headers["content-type"] == "application/json"
            document = json.loads(body)
            expected = srv.ctx.bundle()
            # Read by a SPIFFE bundle parser, it is the trust domain's bundle.
            parsed = TrustBundle.from_spiffe_json("example.org", body)
            assert parsed.x509_authorities == expected.x509_authorities
            assert {a.kid for a in parsed.jwt_authorities} == {
                a.kid for a in expected.jwt_authorities
            }
            # And by hand, against the SPIFFE Trust Domain and Bundle spec (section 4).
            assert document["spiffe_refresh_hint"] == 120
            x509_keys = [k for k in document["keys"] if k["use"] == "x509-svid"]
            assert [base64.b64decode(k["x5c"][0]) for k in x509_keys] == [
                c.public_bytes(serialization.Encoding.DER) for c in expected.x509_authorities
            ]
            assert {k["use"] for k in document["keys"]} == {"x509-svid", "jwt-svid", "wit-svid"}

            # After a rotation, the next fetch has the new key (read at each request).
            await asyncio.to_thread(srv.ctx.jwt_keys.prepare)
            raw = await https_get(address, ca_file, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            again = TrustBundle.from_spiffe_json("example.org", _split(raw)[2])
            assert len(again.jwt_authorities) == len(expected.jwt_authorities) + 1

    asyncio.run(run())


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /other HTTP/1.1\r\n\r\n", 404),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_federation_endpoint_refuses_other_requests_cleanly(
    server_config_factory: ConfigFactory, tmp_path: Path, raw: bytes, status: int
) -> None:
    ca_file, section = web_pki_federation(tmp_path)
    config = server_config_factory(sections={"federation": section})

    async def run() -> None:
        async with running_server(config) as srv:
            assert srv.federation_address is not None
            answer = await https_get(srv.federation_address, ca_file, raw)
            assert _split(answer)[0] == status
            # and it still serves the bundle afterwards
            ok = await https_get(srv.federation_address, ca_file, b"GET / HTTP/1.1\r\n\r\n")
            assert _split(ok)[0] == 200

    asyncio.run(run())


def test_an_unreadable_federation_certificate_is_one_line(
    server_config_factory: ConfigFactory, tmp_path: Path
) -> None:
    _, section = web_pki_federation(tmp_path)
    Path(str(section["cert_file"])).write_text("not a certificate")
    config = server_config_factory(sections={"federation": section})

    async def run() -> None:
        with pytest.raises(ServerStartError) as info:
            async with running_server(config):
                pass
        assert "federation: cannot load cert_file/key_file" in info.value.message
        assert "\n" not in info.value.message

    asyncio.run(run())
