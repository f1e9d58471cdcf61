"""The azure_msi node attestor pair through the real catalogs and entry points, against
a fake IMDS and JWKS endpoint on loopback (custos.testing.fake_azure) whose tokens are
signed by a key this test makes; the server half trusts that key through its JWKS."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.node_attestor_rig import attest_flipped, attest_in_process, no_challenge
from custos.plugin import AgentCatalog, NodeAttestationResult, PluginConfig, ServerCatalog
from custos.plugin.errors import PluginCallError
from custos.testing.fake_azure import FakeAzure, SigningKey
from custos_attestors.node.azure_msi import wire
from custos_attestors.node.azure_msi.server import AzureMsiConfigError, parse_settings

TD = "example.org"
RESOURCE = "https://custos.example.org/attest"


@pytest.fixture
def azure() -> Iterator[FakeAzure]:
    with FakeAzure().running() as fake:
        yield fake


def server_config(azure: FakeAzure, tmp_path: Path, **tenant: Any) -> dict[str, Any]:
    return {
        "jwks_file": azure.write_jwks(tmp_path / "jwks.json"),
        "tenants": {azure.tenant: {"resource": RESOURCE, **tenant}},
    }


def server(config: dict[str, Any]) -> ServerCatalog:
    return ServerCatalog.load(TD, node_attestors=[PluginConfig("azure_msi", config)])


def agent(azure: FakeAzure, **settings: Any) -> AgentCatalog:
    return AgentCatalog.load(
        TD,
        node_attestors=[
            PluginConfig(
                "azure_msi", {"endpoint": azure.endpoint, "resource": RESOURCE, **settings}
            )
        ],
        workload_attestors=[PluginConfig("example")],
    )


_no_challenge = no_challenge("azure_msi")


async def attest(srv: ServerCatalog, agent_catalog: AgentCatalog) -> NodeAttestationResult:
    return await attest_in_process(srv, "azure_msi", agent_catalog)


def attest_token(srv: ServerCatalog, token: str) -> NodeAttestationResult:
    return asyncio.run(srv.attest_node("azure_msi", wire.encode(token), _no_challenge))


def refused(
    srv: ServerCatalog, token_or_payload: str | bytes, caplog: pytest.LogCaptureFixture
) -> str:
    payload = (
        token_or_payload if isinstance(token_or_payload, bytes) else wire.encode(token_or_payload)
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="custos_attestors.node.azure_msi.server"):
        with pytest.raises(PluginCallError) as info:
            asyncio.run(srv.attest_node("azure_msi", payload, _no_challenge))
    cause = info.value.__cause__
    assert cause is not None
    code: str = cause.code  # type: ignore[attr-defined]
    # The refusal is logged with its code, never with the token.
    assert f"({code})" in caplog.text
    if isinstance(token_or_payload, str):
        assert token_or_payload not in caplog.text and token_or_payload not in str(info.value)
    return code


def test_an_agent_attests_with_a_token_from_imds(azure: FakeAzure, tmp_path: Path) -> None:
    with server(server_config(azure, tmp_path)) as srv, agent(azure) as ag:
        result = asyncio.run(attest(srv, ag))
    assert (
        str(result.agent_id)
        == f"spiffe://{TD}/custos/agent/azure_msi/{azure.tenant}/{azure.principal}"
    )
    assert {s.type for s in result.selectors} == {"azure_msi"}
    assert sorted(s.value for s in result.selectors) == sorted(
        [
            f"subscription-id:{azure.subscription}",
            f"resource-group:{azure.resource_group}",
            f"vm-name:{azure.resource_group}:{azure.vm_name}",
        ]
    )
    assert result.can_reattest is False
    # The agent asked IMDS as Azure documents it.
    [(path, headers)] = azure.requests
    assert path.startswith("/metadata/identity/oauth2/token?")
    assert (
        "api-version=2018-02-01" in path
        and "resource=https%3A%2F%2Fcustos.example.org%2Fattest" in path
    )
    assert headers["metadata"] == "true"


def test_the_jwks_from_a_url_is_fetched_once_and_again_for_a_rolled_key(
    azure: FakeAzure,
) -> None:
    config = {"jwks_url": azure.jwks_url, "tenants": {azure.tenant: {"resource": RESOURCE}}}
    with server(config) as srv:
        attest_token(srv, azure.mint(RESOURCE))
        attest_token(srv, azure.mint(RESOURCE))
        assert azure.jwks_requests == 1
        # Azure rolls its keys: a token under a newly published key triggers a fetch,
        # but a fetch only every 30 s, so the cached set answers right after.
        rolled = SigningKey()
        azure.published.append(rolled)
        source = srv.node_attestors["azure_msi"].plugin._keys  # type: ignore[attr-defined]
        source._fetched -= 31  # as if the last fetch were 31 s ago
        result = attest_token(srv, azure.mint(RESOURCE, key=rolled))
        assert azure.jwks_requests == 2
        assert result.agent_id.path.endswith(azure.principal)


def test_a_tenant_may_name_its_own_jwks(azure: FakeAzure, tmp_path: Path) -> None:
    other = SigningKey()
    (tmp_path / "other.json").write_text(json.dumps({"keys": [other.jwk()]}))
    config = {
        "jwks_file": str(tmp_path / "other.json"),
        "tenants": {
            azure.tenant: {"resource": RESOURCE, "jwks_file": azure.write_jwks(tmp_path / "t.json")}
        },
    }
    with server(config) as srv:
        attest_token(srv, azure.mint(RESOURCE))


# ---- bad input: each a clean refusal with a stable code, logged ----------------------


@pytest.fixture
def srv(azure: FakeAzure, tmp_path: Path) -> Iterator[ServerCatalog]:
    with server(server_config(azure, tmp_path)) as catalog:
        yield catalog


def test_a_token_signed_by_another_key_is_refused(
    azure: FakeAzure, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = SigningKey()
    assert refused(srv, azure.mint(RESOURCE, key=stranger), caplog) == "azure_msi_unknown_key"
    # Another key claiming the trusted key's kid: the signature does not verify.
    forged = SigningKey(kid=azure.key.kid)
    assert refused(srv, azure.mint(RESOURCE, key=forged), caplog) == "azure_msi_bad_signature"


def test_a_token_whose_claims_were_changed_is_refused(
    azure: FakeAzure, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    head, _, sig = azure.mint(RESOURCE).split(".")
    _, other_body, _ = azure.mint(RESOURCE, oid=str(uuid.uuid4())).split(".")
    assert refused(srv, f"{head}.{other_body}.{sig}", caplog) == "azure_msi_bad_signature"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ({"alg": "none"}, "azure_msi_bad_algorithm"),
        ({"alg": "HS256"}, "azure_msi_bad_algorithm"),
        ({"alg": "RS512"}, "azure_msi_bad_algorithm"),
        ({"jku": "https://evil.example/keys"}, "azure_msi_bad_algorithm"),
        ({"crit": ["exp"]}, "azure_msi_bad_algorithm"),
        ({"kid": None}, "azure_msi_token_invalid"),
    ],
)
def test_a_header_cannot_choose_the_algorithm_or_the_key(
    azure: FakeAzure,
    srv: ServerCatalog,
    caplog: pytest.LogCaptureFixture,
    header: dict[str, Any],
    code: str,
) -> None:
    assert refused(srv, azure.mint(RESOURCE, header=header), caplog) == code


def test_a_token_for_another_tenant_is_refused(
    azure: FakeAzure, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    other = str(uuid.uuid4())
    # Signed by the trusted key (Azure signs every tenant's tokens with the same keys).
    token = azure.mint(RESOURCE, tid=other, iss=f"https://sts.windows.net/{other}/")
    assert refused(srv, token, caplog) == "azure_msi_tenant_not_allowed"
    # The right tenant claimed under another tenant's issuer.
    assert (
        refused(srv, azure.mint(RESOURCE, iss=f"https://sts.windows.net/{other}/"), caplog)
        == "azure_msi_bad_issuer"
    )
    assert (
        refused(srv, azure.mint(RESOURCE, iss="https://evil.example/"), caplog)
        == "azure_msi_bad_issuer"
    )


def test_a_token_for_another_subscription_is_refused(
    azure: FakeAzure, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with server(server_config(azure, tmp_path, subscriptions=[str(uuid.uuid4())])) as srv:
        assert refused(srv, azure.mint(RESOURCE), caplog) == "azure_msi_subscription_not_allowed"
    with server(server_config(azure, tmp_path, subscriptions=[azure.subscription.upper()])) as srv:
        attest_token(srv, azure.mint(RESOURCE))


def test_a_token_for_another_resource_is_refused(
    azure: FakeAzure, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    assert (
        refused(srv, azure.mint("https://management.azure.com/"), caplog)
        == "azure_msi_wrong_audience"
    )
    assert refused(srv, azure.mint(RESOURCE, drop=("aud",)), caplog) == "azure_msi_wrong_audience"


def test_an_expired_or_future_token_is_refused(
    azure: FakeAzure, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    now = int(time.time())
    assert refused(srv, azure.mint(RESOURCE, exp=now - 120), caplog) == "azure_msi_token_expired"
    assert refused(srv, azure.mint(RESOURCE, drop=("exp",)), caplog) == "azure_msi_token_invalid"
    assert refused(srv, azure.mint(RESOURCE, exp="tomorrow"), caplog) == "azure_msi_token_invalid"
    assert (
        refused(srv, azure.mint(RESOURCE, nbf=now + 3600), caplog)
        == "azure_msi_token_not_yet_valid"
    )
    # Within the clock skew (60 s): accepted.
    attest_token(srv, azure.mint(RESOURCE, exp=now - 30))


def test_identities_that_are_not_a_vms_own_are_refused(
    azure: FakeAzure, srv: ServerCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    sub = azure.subscription
    for mirid in [
        f"/subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/shared",
        f"/subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss",
        f"/subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm/extra",
        "/subscriptions/not-a-guid/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
        f"/subscriptions/{sub}/resourcegroups/r:g/providers/Microsoft.Compute/virtualMachines/vm",
    ]:
        assert refused(srv, azure.mint(RESOURCE, xms_mirid=mirid), caplog) == "azure_msi_not_a_vm"
    assert refused(srv, azure.mint(RESOURCE, drop=("xms_mirid",)), caplog) == "azure_msi_not_a_vm"
    # A user's token (sub is pairwise, not the oid) is no managed identity.
    token = azure.mint(RESOURCE, sub=str(uuid.uuid4()))
    assert refused(srv, token, caplog) == "azure_msi_not_managed_identity"
    assert refused(srv, azure.mint(RESOURCE, oid="../../etc"), caplog) == "azure_msi_token_invalid"


def test_upper_case_guids_name_the_same_agent(azure: FakeAzure, srv: ServerCatalog) -> None:
    result = attest_token(
        srv,
        azure.mint(
            RESOURCE,
            tid=azure.tenant.upper(),
            oid=azure.principal.upper(),
            sub=azure.principal.upper(),
            iss=f"https://sts.windows.net/{azure.tenant.upper()}/",
        ),
    )
    assert result.agent_id.path == f"/custos/agent/azure_msi/{azure.tenant}/{azure.principal}"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"v": 1}',
        b'{"v": 2, "token": "a.b.c"}',
        b'{"v": 1, "token": "a.b.c", "x": 1}',
        b'{"v": 1, "token": "a.b"}',
        b'{"v": 1, "token": "a.b.c"}',
        b'{"v": 1, "token": "e30.e30.AAAA"}',
        b'{"v": 1, "token": "W10.e30.AAAA"}',
        b'{"v": 1, "token": "' + b"a" * (wire.MAX_TOKEN_CHARS + 1) + b'.b.c"}',
        b"x" * (wire.MAX_MESSAGE_BYTES + 1),
    ],
)
def test_malformed_or_oversized_evidence_is_refused(
    srv: ServerCatalog, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    code = refused(srv, payload, caplog)
    assert code in {
        "azure_msi_evidence_invalid",
        "azure_msi_token_invalid",
        "azure_msi_bad_algorithm",
    }


# ---- the agent half against a misbehaving IMDS ------------------------------------


def _agent_error(azure: FakeAzure, **settings: Any) -> tuple[PluginCallError, float]:
    async def exchange(message: bytes) -> bytes | None:
        raise AssertionError("no payload expected")

    with agent(azure, **settings) as ag:
        start = time.monotonic()
        with pytest.raises(PluginCallError) as info:
            asyncio.run(ag.node_attestor.attest(exchange))
        return info.value, time.monotonic() - start


def test_a_hanging_imds_times_out_and_is_retried(azure: FakeAzure) -> None:
    azure.mode = "hang"
    error, took = _agent_error(azure, timeout=0.3, retries=2)
    assert error.__cause__.code == "azure_msi_imds_unavailable"  # type: ignore[union-attr]
    assert "3 attempts" in str(error.__cause__) and "did not answer" in str(error.__cause__)
    assert len(azure.requests) == 3
    assert 0.9 <= took < 5


def test_a_transient_imds_error_is_retried(azure: FakeAzure, tmp_path: Path) -> None:
    azure.fail_first = 2
    with server(server_config(azure, tmp_path)) as srv, agent(azure, retries=2) as ag:
        result = asyncio.run(attest(srv, ag))
    assert result.agent_id.path.endswith(azure.principal)
    assert len(azure.requests) == 3


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("garbage", "not HTTP"),
        ("oversized", "more than"),
        ("status:400", "HTTP 400"),
        ("status:500", "HTTP 500"),
    ],
)
def test_imds_garbage_is_a_clean_error(azure: FakeAzure, mode: str, says: str) -> None:
    azure.mode = mode
    error, took = _agent_error(azure, timeout=2, retries=1)
    assert error.__cause__.code == "azure_msi_imds_unavailable"  # type: ignore[union-attr]
    assert says in str(error.__cause__)
    assert took < 5


def test_no_imds_listening_is_a_clean_error() -> None:
    azure = FakeAzure().start()
    endpoint = azure.endpoint
    azure.stop()
    with AgentCatalog.load(
        TD,
        node_attestors=[
            PluginConfig("azure_msi", {"endpoint": endpoint, "timeout": 0.5, "retries": 1})
        ],
        workload_attestors=[PluginConfig("example")],
    ) as ag:

        async def exchange(message: bytes) -> bytes | None:
            raise AssertionError

        with pytest.raises(PluginCallError) as info:
            asyncio.run(ag.node_attestor.attest(exchange))
    assert "cannot reach IMDS" in str(info.value.__cause__)


# ---- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"tenants": {}},
        {"tenants": {"not-a-guid": {}}, "jwks_url": "https://x/"},
        {"tenants": {str(uuid.uuid4()): {}}},  # no JWKS anywhere
        {"tenants": {str(uuid.uuid4()): {"bogus": 1}}, "jwks_url": "https://x/"},
        {"tenants": {str(uuid.uuid4()): {"subscriptions": []}}, "jwks_url": "https://x/"},
        {"tenants": {str(uuid.uuid4()): {}}, "jwks_url": "ftp://x/"},
        {"tenants": {str(uuid.uuid4()): {}}, "jwks_file": "relative.json"},
        {"tenants": {str(uuid.uuid4()): {}}, "jwks_file": "/nonexistent/jwks.json"},
        {"tenants": {str(uuid.uuid4()): {}}, "jwks_url": "https://x/", "jwks_file": "/x"},
        {"tenants": {str(uuid.uuid4()): {}}, "jwks_url": "https://x/", "surprise": 1},
        {"tenants": {str(uuid.uuid4()): {}}, "jwks_url": "https://x/", "clock_skew": -1},
    ],
)
def test_bad_server_settings_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(AzureMsiConfigError):
        parse_settings(config)


def test_a_jwks_file_without_usable_keys_is_refused(tmp_path: Path) -> None:
    for doc in [{"keys": []}, {"keys": [{"kty": "EC", "kid": "x"}]}, {"nope": 1}, [1]]:
        (tmp_path / "j.json").write_text(json.dumps(doc))
        with pytest.raises(AzureMsiConfigError):
            parse_settings(
                {"tenants": {str(uuid.uuid4()): {}}, "jwks_file": str(tmp_path / "j.json")}
            )
    small = SigningKey(bits=1024)
    (tmp_path / "j.json").write_text(json.dumps({"keys": [small.jwk()]}))
    with pytest.raises(AzureMsiConfigError, match="2048"):
        parse_settings({"tenants": {str(uuid.uuid4()): {}}, "jwks_file": str(tmp_path / "j.json")})


@pytest.mark.parametrize(
    "settings",
    [
        {"endpoint": "https://169.254.169.254/x"},
        {"endpoint": "http://169.254.169.254/x?resource=y"},
        {"endpoint": 5},
        {"timeout": 0},
        {"retries": 1.5},
        {"retries": True},
        {"resource": ""},
        {"mystery": 1},
    ],
)
def test_bad_agent_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(Exception, match=r"azure_msi|endpoint|timeout|retries|resource"):
        AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("azure_msi", settings)],
            workload_attestors=[PluginConfig("example")],
        )


# ---- any flipped byte: a clean refusal or the very same identity ----------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_flipped_byte_is_refused_cleanly_or_changes_nothing(
    azure: FakeAzure, srv: ServerCatalog, data: st.DataObject
) -> None:
    result = attest_flipped(srv, "azure_msi", wire.encode(azure.mint(RESOURCE)), data)
    if result is not None:  # not refused (a refusal must be clean: checked by the rig)
        assert result.agent_id.path == f"/custos/agent/azure_msi/{azure.tenant}/{azure.principal}"


def test_an_unreachable_jwks_url_is_a_clean_refusal(
    azure: FakeAzure, caplog: pytest.LogCaptureFixture
) -> None:
    url = azure.jwks_url
    config = {
        "jwks_url": url,
        "jwks_timeout": 0.5,
        "tenants": {azure.tenant: {"resource": RESOURCE}},
    }
    token = azure.mint(RESOURCE)
    with server(config) as srv:
        azure.stop()  # the key endpoint is down before the first fetch
        assert refused(srv, token, caplog) == "azure_msi_jwks_unavailable"


def test_a_server_never_imports_an_agent_half(tmp_path: Path) -> None:
    import subprocess
    import sys

    azure = FakeAzure()
    script = f"""
import sys
from custos.plugin import PluginConfig, ServerCatalog
config = {{"jwks_file": {azure.write_jwks(tmp_path / "jwks.json")!r},
          "tenants": {{{azure.tenant!r}: {{}}}}}}
with ServerCatalog.load("example.org", node_attestors=[PluginConfig("azure_msi", config)]):
    pass
loaded = [m for m in sys.modules if m.endswith(".agent") and "custos_attestors" in m]
print(loaded, "kubernetes" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[] False"
