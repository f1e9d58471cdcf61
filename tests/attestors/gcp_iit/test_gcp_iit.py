"""The gcp_iit node attestor pair, loaded by name through the real catalogs, against a
local GCE metadata server and a local HTTPS JWKS endpoint (custos.testing.fake_gcp)
signing with keys the test makes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custos.errors import CustosError
from custos.plugin import AgentCatalog, NodeAttestationResult, PluginConfig, ServerCatalog
from custos.plugin.errors import PluginCallError
from custos.testing.fake_gcp import (
    EMAIL,
    INSTANCE_ID,
    PROJECT,
    FakeGceMetadata,
    FakeJwksServer,
    GcpSigner,
    TlsFiles,
    local_tls,
)
from custos_attestors.node.gcp_iit import wire

TD = "example.org"


@pytest.fixture(scope="module")
def google() -> GcpSigner:
    return GcpSigner()


@pytest.fixture
def jwks_file(google: GcpSigner, tmp_path: Path) -> str:
    path = tmp_path / "google-certs.json"
    path.write_text(json.dumps(google.jwks()))
    return str(path)


@pytest.fixture
def metadata(google: GcpSigner) -> Iterator[FakeGceMetadata]:
    with FakeGceMetadata(google) as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return local_tls(tmp_path)


def server_config(jwks_file: str, **extra: object) -> dict[str, object]:
    return {"jwks_file": jwks_file, "project_allowlist": [PROJECT], **extra}


def agent_config(endpoint: str, **extra: object) -> dict[str, object]:
    return {"endpoint": endpoint, "timeout_seconds": 2, **extra}


async def run_pair(
    server: ServerCatalog, agent_settings: Mapping[str, object]
) -> NodeAttestationResult:
    """The agent half (its catalog) talking to the server half (its catalog)."""
    results: list[NodeAttestationResult] = []
    with AgentCatalog.load(
        TD,
        node_attestors=[PluginConfig("gcp_iit", dict(agent_settings))],
        workload_attestors=[PluginConfig("example")],
    ) as agent:
        pending: asyncio.Queue[bytes] = asyncio.Queue()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def challenge(data: bytes) -> bytes:
            await pending.put(data)
            return await answers.get()

        async def exchange(message: bytes) -> bytes | None:
            if not results and pending.empty() and not hasattr(exchange, "task"):
                exchange.task = asyncio.create_task(  # type: ignore[attr-defined]
                    server.attest_node("gcp_iit", message, challenge)
                )
            else:
                await answers.put(message)
            task: asyncio.Task[NodeAttestationResult] = exchange.task  # type: ignore[attr-defined]
            getter = asyncio.create_task(pending.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            getter.cancel()
            results.append(task.result())
            return None

        await agent.node_attestor.attest(exchange)
    [result] = results
    return result


def attest(
    server_settings: Mapping[str, object], agent_settings: Mapping[str, object]
) -> NodeAttestationResult:
    async def main() -> NodeAttestationResult:
        with ServerCatalog.load(
            TD, node_attestors=[PluginConfig("gcp_iit", dict(server_settings))]
        ) as server:
            return await run_pair(server, agent_settings)

    return asyncio.run(main())


def refused(server_settings: Mapping[str, object], agent_settings: Mapping[str, object]) -> str:
    with pytest.raises(PluginCallError) as info:
        attest(server_settings, agent_settings)
    assert isinstance(info.value.__cause__, CustosError), info.value
    return info.value.__cause__.code


async def _answer_with(answer: bytes) -> Callable[[bytes], Awaitable[bytes]]:
    async def challenge(data: bytes) -> bytes:
        return answer

    return challenge


def server_answer(server_settings: Mapping[str, object], answer: bytes) -> str:
    """The code refusing ``answer`` sent to the server half's challenge."""

    async def main() -> NodeAttestationResult:
        with ServerCatalog.load(
            TD, node_attestors=[PluginConfig("gcp_iit", dict(server_settings))]
        ) as server:
            return await server.attest_node(
                "gcp_iit", wire.encode_hello(), await _answer_with(answer)
            )

    with pytest.raises(PluginCallError) as info:
        asyncio.run(main())
    assert isinstance(info.value.__cause__, CustosError), info.value
    return info.value.__cause__.code


# -- the happy path -----------------------------------------------------------------


def test_an_identity_token_attests_the_instance(metadata: FakeGceMetadata, jwks_file: str) -> None:
    result = attest(server_config(jwks_file), agent_config(metadata.url))
    assert str(result.agent_id) == f"spiffe://{TD}/custos/agent/gcp_iit/{PROJECT}/{INSTANCE_ID}"
    assert sorted(str(s) for s in result.selectors) == [
        "gcp_iit:instance-name:web-1",
        f"gcp_iit:project-id:{PROJECT}",
        f"gcp_iit:sa:{EMAIL}",
        "gcp_iit:zone:us-central1-a",
    ]
    assert result.can_reattest is True
    [(method, path, headers)] = metadata.requests
    assert method == "GET" and headers["Metadata-Flavor"] == "Google"
    assert path.startswith(
        "/computeMetadata/v1/instance/service-accounts/default/identity?audience=custos%2F"
    )
    assert path.endswith("&format=full")


def test_every_attestation_asks_for_a_fresh_audience(
    metadata: FakeGceMetadata, jwks_file: str
) -> None:
    for _ in range(3):
        attest(server_config(jwks_file), agent_config(metadata.url))
    assert len(set(metadata.audiences)) == 3
    assert all(a.startswith("custos/") for a in metadata.audiences)


def test_a_jwks_url_over_https_is_fetched_once_and_cached(
    google: GcpSigner, metadata: FakeGceMetadata, tls: TlsFiles
) -> None:
    with FakeJwksServer(google.jwks(), tls) as jwks:
        config = {
            "jwks_url": jwks.certs_url,
            "jwks_ca_bundle": str(tls.ca_file),
            "project_allowlist": [PROJECT],
        }

        async def main() -> None:
            with ServerCatalog.load(TD, node_attestors=[PluginConfig("gcp_iit", config)]) as s:
                for _ in range(3):
                    await run_pair(s, agent_config(metadata.url))

        asyncio.run(main())
        assert len(jwks.requests) == 1


def test_a_rotated_google_key_is_fetched_when_its_kid_appears(tls: TlsFiles) -> None:
    old, new = GcpSigner(), GcpSigner()
    with FakeJwksServer(old.jwks(), tls) as jwks, FakeGceMetadata(old) as metadata:
        config = {
            "jwks_url": jwks.certs_url,
            "jwks_ca_bundle": str(tls.ca_file),
            "project_allowlist": [PROJECT],
            "jwks_refetch_seconds": 0,
        }

        async def main() -> None:
            with ServerCatalog.load(TD, node_attestors=[PluginConfig("gcp_iit", config)]) as s:
                await run_pair(s, agent_config(metadata.url))
                jwks.jwks = new.jwks(old)  # Google publishes the new key
                metadata.signer = new
                await run_pair(s, agent_config(metadata.url))

        asyncio.run(main())
        assert len(jwks.requests) == 2


# -- bad input ----------------------------------------------------------------------


def test_a_token_signed_by_another_key_is_refused(jwks_file: str) -> None:
    # Same kid as Google's key (an attacker copies it), another key.
    with FakeGceMetadata(GcpSigner(kid=json.load(open(jwks_file))["keys"][0]["kid"])) as md:
        assert refused(server_config(jwks_file), agent_config(md.url)) == (
            "gcp_iit_signature_invalid"
        )
    with FakeGceMetadata(GcpSigner()) as md:  # a kid Google never published
        assert refused(server_config(jwks_file), agent_config(md.url)) == (
            "gcp_iit_signature_invalid"
        )


def test_another_project_is_refused(google: GcpSigner, jwks_file: str) -> None:
    def other(claims: dict[str, Any]) -> dict[str, Any]:
        claims["google"]["compute_engine"]["project_id"] = "someone-else"
        return claims

    with FakeGceMetadata(google, claims=other) as md:
        assert refused(server_config(jwks_file), agent_config(md.url)) == (
            "gcp_iit_project_not_allowed"
        )


def test_an_expired_token_is_refused(google: GcpSigner, jwks_file: str) -> None:
    def expired(claims: dict[str, Any]) -> dict[str, Any]:
        claims["iat"] -= 7200
        claims["exp"] -= 7200
        return claims

    with FakeGceMetadata(google, claims=expired) as md:
        assert refused(server_config(jwks_file), agent_config(md.url)) == "gcp_iit_token_expired"


def test_a_token_for_another_audience_is_refused(google: GcpSigner, jwks_file: str) -> None:
    with FakeGceMetadata(google, audience_override="https://other.example") as md:
        assert refused(server_config(jwks_file), agent_config(md.url)) == (
            "gcp_iit_audience_mismatch"
        )


def test_a_replayed_token_is_refused(
    google: GcpSigner, metadata: FakeGceMetadata, jwks_file: str
) -> None:
    # A token minted for an earlier attestation (its nonce) does not fit a new one.
    attest(server_config(jwks_file), agent_config(metadata.url))
    seen = google.token(google.claims(metadata.audiences[0]))
    assert server_answer(server_config(jwks_file), wire.encode_token(seen)) == (
        "gcp_iit_audience_mismatch"
    )


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: {k: v for k, v in c.items() if k != "google"},  # not format=full
        lambda c: {**c, "iss": "https://evil.example"},
        lambda c: {**c, "iss": "accounts.google.com"},
        lambda c: {k: v for k, v in c.items() if k != "exp"},
        lambda c: {**c, "iat": c["iat"] + 3600},  # issued in the future
        lambda c: {
            **c,
            "google": {"compute_engine": {**c["google"]["compute_engine"], "zone": "../x"}},
        },
        lambda c: {
            **c,
            "google": {"compute_engine": {**c["google"]["compute_engine"], "instance_id": "i/1"}},
        },
        lambda c: {**c, "google": "x"},
    ],
)
def test_tokens_with_wrong_claims_are_refused(
    google: GcpSigner, jwks_file: str, edit: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    with FakeGceMetadata(google, claims=edit) as md:
        assert refused(server_config(jwks_file), agent_config(md.url)) in {
            "gcp_iit_token_invalid",
            "gcp_iit_token_expired",
        }


def test_an_unsigned_or_hmac_token_is_refused(google: GcpSigner, jwks_file: str) -> None:
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import OctKey

    claims = google.claims("custos/x")
    hmac = jose_jwt.encode({"alg": "HS256", "kid": google.kid}, claims, OctKey.generate_key(256))
    assert server_answer(server_config(jwks_file), wire.encode_token(hmac)) == (
        "gcp_iit_token_invalid"
    )
    header, body, _ = google.token(claims).split(".")
    assert server_answer(server_config(jwks_file), wire.encode_token(f"{header}.{body}.AAAA")) == (
        "gcp_iit_signature_invalid"
    )


def test_oversized_and_malformed_answers_are_refused(jwks_file: str) -> None:
    for answer in (
        b"x" * 20000,
        json.dumps({"v": 1, "token": "a." * 5000 + "b"}).encode(),
        b'{"v": 1}',
        b'{"v": 2, "token": "a.b.c"}',
        json.dumps({"v": 1, "token": "a.b.c"}).encode(),
        b"\xff",
    ):
        assert server_answer(server_config(jwks_file), answer) in {
            "gcp_iit_evidence_invalid",
            "gcp_iit_token_invalid",
        }, answer


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    answer=st.one_of(
        st.binary(min_size=1, max_size=1024),
        st.builds(
            lambda t: json.dumps({"v": 1, "token": t}).encode(),
            st.from_regex(
                r"[A-Za-z0-9_-]{1,80}\.[A-Za-z0-9_-]{1,200}\.[A-Za-z0-9_-]{0,80}", fullmatch=True
            ),
        ),
    )
)
def test_fuzzed_answers_are_clean_refusals(jwks_file: str, answer: bytes) -> None:
    assert server_answer(server_config(jwks_file), answer).startswith("gcp_iit_")


def test_a_hanging_jwks_url_is_a_bounded_refusal_with_a_log_line(
    google: GcpSigner, tls: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    from custos_attestors.node.gcp_iit import server as gcp_server

    with FakeJwksServer(google.jwks(), tls) as jwks, FakeGceMetadata(google) as md:
        jwks.hang = True
        config = {
            "jwks_url": jwks.certs_url,
            "jwks_ca_bundle": str(tls.ca_file),
            "project_allowlist": [PROJECT],
        }
        start = time.monotonic()
        assert refused(config, agent_config(md.url)) == "gcp_iit_jwks_unavailable"
        assert time.monotonic() - start < gcp_server.JWKS_TIMEOUT + 5
    assert "JWKS URL did not answer" in caplog.text


def test_a_jwks_server_with_an_untrusted_certificate_is_refused(
    google: GcpSigner, tls: TlsFiles, tmp_path: Path
) -> None:
    other = local_tls(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    with FakeJwksServer(google.jwks(), tls) as jwks, FakeGceMetadata(google) as md:
        config = {
            "jwks_url": jwks.certs_url,
            "jwks_ca_bundle": str(other.ca_file),
            "project_allowlist": [PROJECT],
        }
        assert refused(config, agent_config(md.url)) == "gcp_iit_jwks_unavailable"


# -- the agent half -----------------------------------------------------------------


def _agent_error(jwks_file: str, endpoint: str, **settings_: object) -> CustosError:
    with pytest.raises(PluginCallError) as info:
        attest(server_config(jwks_file), agent_config(endpoint, **settings_))
    cause = info.value.__cause__
    assert isinstance(cause, CustosError), info.value
    return cause


def test_a_hanging_metadata_server_times_out_and_retries(google: GcpSigner, jwks_file: str) -> None:
    with FakeGceMetadata(google, hang=True) as md:
        start = time.monotonic()
        error = _agent_error(jwks_file, md.url, timeout_seconds=0.2, attempts=2)
        assert time.monotonic() - start < 3
        assert len(md.requests) == 2
    assert error.code == "gcp_iit_metadata_unavailable"


def test_a_flaky_metadata_server_is_retried(google: GcpSigner, jwks_file: str) -> None:
    with FakeGceMetadata(google, fail_first=2) as md:
        attest(server_config(jwks_file), agent_config(md.url, attempts=3))


def test_garbage_from_the_metadata_server_is_a_clean_error(
    google: GcpSigner, jwks_file: str
) -> None:
    for body in (b"<html>oops</html>", b"x" * 20000, b"\xff\xfe"):
        with FakeGceMetadata(google, body=body) as md:
            assert _agent_error(jwks_file, md.url).code == "gcp_iit_metadata_unavailable"


def _challenge_error(endpoint: str, challenge: bytes, what: str) -> CustosError:
    """The agent half's error when its hello is answered with ``challenge`` (``what``, in
    the failure message if the agent answers it instead of refusing)."""

    async def main() -> None:
        with AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("gcp_iit", agent_config(endpoint))],
            workload_attestors=[PluginConfig("example")],
        ) as agent:

            async def exchange(message: bytes) -> bytes | None:
                if message == wire.encode_hello():
                    return challenge
                raise AssertionError(f"the agent answered {what}")

            await agent.node_attestor.attest(exchange)

    with pytest.raises(PluginCallError) as info:
        asyncio.run(main())
    assert isinstance(info.value.__cause__, CustosError)
    return info.value.__cause__


def test_the_agent_mints_no_token_for_a_foreign_audience(metadata: FakeGceMetadata) -> None:
    foreign = wire.encode_challenge("https://bank.example/" + "n" * 22)
    error = _challenge_error(metadata.url, foreign, "a foreign audience")
    assert error.code == "gcp_iit_evidence_invalid"
    assert metadata.requests == []


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"project_allowlist": None},
        {"project_allowlist": []},
        {"project_allowlist": ["Bad_Project"]},
        {"jwks_file": None},
        {"jwks_url": "https://www.googleapis.com/oauth2/v3/certs"},  # both
        {"jwks_file": "relative.json"},
        {"jwks_file": "/nonexistent/certs.json"},
        {"jwks_cache_seconds": 0.5},
        {"audience": "a b"},
        {"x": 1},
    ],
)
def test_server_configuration_mistakes_are_refused(
    jwks_file: str, config: dict[str, object]
) -> None:
    full = {k: v for k, v in {**server_config(jwks_file), **config}.items() if v is not None}
    with pytest.raises(PluginCallError):
        ServerCatalog.load(TD, node_attestors=[PluginConfig("gcp_iit", full)])


def test_a_jwks_url_must_be_https() -> None:
    for url in ("http://www.googleapis.com/oauth2/v3/certs", "file:///etc/passwd", "x"):
        with pytest.raises(PluginCallError, match="https"):
            ServerCatalog.load(
                TD,
                node_attestors=[
                    PluginConfig("gcp_iit", {"jwks_url": url, "project_allowlist": [PROJECT]})
                ],
            )


def test_a_malformed_jwks_file_is_refused(tmp_path: Path) -> None:
    for content in ("not json", "{}", '{"keys": []}', '{"keys": [{"kty": "EC", "kid": "a"}]}'):
        path = tmp_path / "jwks.json"
        path.write_text(content)
        with pytest.raises(PluginCallError):
            ServerCatalog.load(
                TD, node_attestors=[PluginConfig("gcp_iit", server_config(str(path)))]
            )


def test_forged_kids_do_not_turn_into_a_flood_of_jwks_fetches(
    google: GcpSigner, metadata: FakeGceMetadata, tls: TlsFiles
) -> None:
    with FakeJwksServer(google.jwks(), tls) as jwks:
        config = {
            "jwks_url": jwks.certs_url,
            "jwks_ca_bundle": str(tls.ca_file),
            "project_allowlist": [PROJECT],
        }
        forger = GcpSigner()

        async def main() -> list[str]:
            codes = []
            with ServerCatalog.load(TD, node_attestors=[PluginConfig("gcp_iit", config)]) as s:
                await run_pair(s, agent_config(metadata.url))  # the first fetch
                for _ in range(5):
                    token = forger.token(forger.claims("custos/x"))
                    with pytest.raises(PluginCallError) as info:
                        await s.attest_node(
                            "gcp_iit",
                            wire.encode_hello(),
                            await _answer_with(wire.encode_token(token)),
                        )
                    assert isinstance(info.value.__cause__, CustosError)
                    codes.append(info.value.__cause__.code)
            return codes

        assert asyncio.run(main()) == ["gcp_iit_signature_invalid"] * 5
        assert len(jwks.requests) == 1


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    challenge=st.one_of(
        st.binary(min_size=1, max_size=512),
        st.builds(
            lambda a: json.dumps({"v": 1, "audience": a}).encode(),
            st.one_of(
                st.text(max_size=300),
                st.from_regex(r"custos/[A-Za-z0-9_-]{0,21}", fullmatch=True),
                st.from_regex(r"custos/[A-Za-z0-9_-]{22,40}[/?&#%]", fullmatch=True),
                st.integers(),
            ),
        ),
    )
)
def test_the_agent_refuses_garbage_challenges_without_calling_the_metadata_server(
    metadata: FakeGceMetadata, challenge: bytes
) -> None:
    before = len(metadata.requests)
    error = _challenge_error(metadata.url, challenge, "a garbage challenge")
    assert error.code == "gcp_iit_evidence_invalid"
    assert len(metadata.requests) == before


def test_a_stale_jwks_whose_url_fails_is_not_used_and_a_recovered_url_is(
    google: GcpSigner, metadata: FakeGceMetadata, tls: TlsFiles
) -> None:
    with FakeJwksServer(google.jwks(), tls) as jwks:
        config = {
            "jwks_url": jwks.certs_url,
            "jwks_ca_bundle": str(tls.ca_file),
            "project_allowlist": [PROJECT],
            "jwks_cache_seconds": 1,
            "jwks_refetch_seconds": 0,
        }

        async def main() -> list[str]:
            outcomes = []
            with ServerCatalog.load(TD, node_attestors=[PluginConfig("gcp_iit", config)]) as s:
                await run_pair(s, agent_config(metadata.url))  # fetched, cached
                jwks.status = 503
                await asyncio.sleep(1.1)  # the cached set is stale now
                for _ in range(2):  # refused, not served from the stale set
                    try:
                        await run_pair(s, agent_config(metadata.url))
                        outcomes.append("ok")
                    except PluginCallError as e:
                        assert isinstance(e.__cause__, CustosError)
                        outcomes.append(e.__cause__.code)
                jwks.status = 200
                await run_pair(s, agent_config(metadata.url))
                outcomes.append("ok")
            return outcomes

        assert asyncio.run(main()) == ["gcp_iit_jwks_unavailable"] * 2 + ["ok"]


def test_a_jwks_file_with_a_weak_or_foreign_key_only_is_refused(tmp_path: Path) -> None:
    # The shared JWKS rules (custos_attestors.node._jwks, decision 0088): RS256 signing
    # keys of 2048 to 8192 bits; a key for encryption is no signing key.
    from custos.testing.fake_azure import SigningKey

    signer = GcpSigner()
    for keys in (
        [SigningKey(bits=1024).jwk()],
        [{**signer.jwks()["keys"][0], "use": "enc"}],
        [{**signer.jwks()["keys"][0], "alg": "RS512"}],
    ):
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps({"keys": keys}))
        with pytest.raises(PluginCallError):
            ServerCatalog.load(
                TD, node_attestors=[PluginConfig("gcp_iit", server_config(str(path)))]
            )
