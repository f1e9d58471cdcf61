"""The aws_iid node attestor pair, loaded by name through the real catalogs, against a
local IMDSv2 and a local EC2 endpoint (custos.testing.fake_aws) signing with a key the
test makes; trust on first use through the real server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custos.errors import CustosError
from custos.plugin import AgentCatalog, NodeAttestationResult, PluginConfig, ServerCatalog
from custos.plugin.errors import PluginCallError
from custos.testing.fake_aws import AwsSigner, Ec2Instance, FakeEc2, FakeImds, identity_document
from custos_attestors.node.aws_iid import wire

TD = "example.org"
ACCOUNT = "123456789012"
INSTANCE = "i-1234567890abcdef0"


@pytest.fixture(scope="module")
def aws() -> AwsSigner:
    return AwsSigner()


@pytest.fixture
def cert_file(aws: AwsSigner, tmp_path: Path) -> str:
    path = tmp_path / "aws-us-west-2.pem"
    path.write_bytes(aws.certificate_pem)
    return str(path)


@pytest.fixture
def imds(aws: AwsSigner) -> Iterator[FakeImds]:
    with FakeImds(*aws.signed()) as fake:
        yield fake  # type: ignore[misc]


def server_config(cert_file: str, **extra: object) -> dict[str, object]:
    return {"certificates": [cert_file], "account_allowlist": [ACCOUNT], **extra}


def described_config(cert_file: str, ec2: FakeEc2, **extra: object) -> dict[str, object]:
    """:func:`server_config` with DescribeInstances on, against ``ec2``."""
    return server_config(
        cert_file,
        describe_instances=True,
        ec2_endpoint_url=ec2.url,
        access_key_id="AKIDEXAMPLE",
        secret_access_key="secret",
        **extra,
    )


async def _no_challenge(data: bytes) -> bytes:
    raise AssertionError("aws_iid must not challenge")


async def agent_payload(endpoint: str, **settings_: object) -> bytes:
    """What the agent half (loaded by its catalog) sends, read from ``endpoint``."""
    sent: list[bytes] = []

    async def exchange(message: bytes) -> bytes | None:
        sent.append(message)
        return None

    config = {"endpoint": endpoint, "timeout_seconds": 2, **settings_}
    with AgentCatalog.load(
        TD,
        node_attestors=[PluginConfig("aws_iid", config)],
        workload_attestors=[PluginConfig("example")],
    ) as agent:
        await agent.node_attestor.attest(exchange)
    [payload] = sent
    return payload


def verify(config: Mapping[str, object], payload: bytes) -> NodeAttestationResult:
    async def run() -> NodeAttestationResult:
        with ServerCatalog.load(TD, node_attestors=[PluginConfig("aws_iid", dict(config))]) as s:
            return await s.attest_node("aws_iid", payload, _no_challenge)

    return asyncio.run(run())


def refused(config: Mapping[str, object], payload: bytes) -> str:
    """The refusal's stable code."""
    with pytest.raises(PluginCallError) as info:
        verify(config, payload)
    assert isinstance(info.value.__cause__, CustosError), info.value
    return info.value.__cause__.code


# -- the happy path -----------------------------------------------------------------


def test_imdsv2_evidence_attests_the_instance(imds: FakeImds, cert_file: str) -> None:
    payload = asyncio.run(agent_payload(imds.url))
    result = verify(server_config(cert_file), payload)
    assert str(result.agent_id) == (
        f"spiffe://{TD}/custos/agent/aws_iid/{ACCOUNT}/us-west-2/{INSTANCE}"
    )
    assert sorted(str(s) for s in result.selectors) == [
        "aws_iid:az:us-west-2b",
        "aws_iid:image:id:ami-5fb8c835",
        f"aws_iid:instance:id:{INSTANCE}",
        "aws_iid:region:us-west-2",
    ]
    assert result.can_reattest is False
    # IMDSv2: the token first (with its TTL header), then both reads with that token.
    methods = [(m, p) for m, p, _ in imds.requests]
    assert methods == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/dynamic/instance-identity/document"),
        ("GET", "/latest/dynamic/instance-identity/signature"),
    ]
    assert imds.requests[0][2]["X-aws-ec2-metadata-token-ttl-seconds"] == "60"
    assert all(h["X-aws-ec2-metadata-token"] in imds.tokens for _, _, h in imds.requests[1:])


def test_describe_instances_adds_tags_and_security_groups(imds: FakeImds, cert_file: str) -> None:
    instance = Ec2Instance(
        INSTANCE, tags=[("Name", "blog"), ("env", "prod")], groups=[("sg-01234567", "web")]
    )
    with FakeEc2([instance]) as ec2:
        result = verify(described_config(cert_file, ec2), asyncio.run(agent_payload(imds.url)))
        assert ec2.requests and ec2.requests[0][2]["Authorization"].startswith("AWS4-HMAC-SHA256")
    described = {str(s) for s in result.selectors} - {
        "aws_iid:az:us-west-2b",
        "aws_iid:image:id:ami-5fb8c835",
        f"aws_iid:instance:id:{INSTANCE}",
        "aws_iid:region:us-west-2",
    }
    assert described == {
        "aws_iid:tag:Name:blog",
        "aws_iid:tag:env:prod",
        "aws_iid:sg:id:sg-01234567",
        "aws_iid:sg:name:web",
    }


def test_an_instance_ec2_does_not_know_is_refused(imds: FakeImds, cert_file: str) -> None:
    with FakeEc2([Ec2Instance("i-0000000000000000f")]) as ec2:
        code = refused(described_config(cert_file, ec2), asyncio.run(agent_payload(imds.url)))
    assert code == "aws_iid_instance_unknown"


def test_an_ec2_endpoint_that_hangs_is_a_bounded_refusal(imds: FakeImds, cert_file: str) -> None:
    with FakeEc2([Ec2Instance(INSTANCE)]) as ec2:
        ec2.hang = True
        config = described_config(cert_file, ec2, describe_timeout_seconds=0.3)
        payload = asyncio.run(agent_payload(imds.url))
        start = time.monotonic()
        assert refused(config, payload) == "aws_iid_describe_failed"
        assert time.monotonic() - start < 10


# -- bad input ----------------------------------------------------------------------


def test_a_document_signed_by_another_key_is_refused(imds: FakeImds, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(AwsSigner().certificate_pem)
    payload = asyncio.run(agent_payload(imds.url))
    assert refused(server_config(str(other)), payload) == "aws_iid_signature_invalid"


def test_a_tampered_document_is_refused(aws: AwsSigner, cert_file: str) -> None:
    document, signature = aws.signed()
    forged = identity_document(accountId="999999999999")
    for doc in (forged, document + b" ", document.replace(b"t2.micro", b"t2.nano")):
        assert refused(server_config(cert_file), wire.encode(doc, signature)) == (
            "aws_iid_signature_invalid"
        )


def test_another_account_is_refused(
    aws: AwsSigner, cert_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload = wire.encode(*aws.signed(accountId="210987654321"))
    assert refused(server_config(cert_file), payload) == "aws_iid_account_not_allowed"


def test_a_signed_document_of_the_wrong_shape_is_refused(aws: AwsSigner, cert_file: str) -> None:
    for fields in (
        {"instanceId": "i-../../x"},
        {"accountId": 123456789012},
        {"region": "us-west-2/x"},
        {"availabilityZone": "eu-west-1a"},  # not in the region
        {"imageId": None},
    ):
        payload = wire.encode(*aws.signed(**fields))
        assert refused(server_config(cert_file), payload) == "aws_iid_evidence_invalid", fields
    not_json = b"\xff not json"
    payload = wire.encode(not_json, aws.sign(not_json))
    assert refused(server_config(cert_file), payload) == "aws_iid_evidence_invalid"


def test_oversized_evidence_is_refused(aws: AwsSigner, cert_file: str) -> None:
    payload = json.dumps({"v": 1, "document": "A" * 20000, "signature": "AA=="}).encode()
    assert refused(server_config(cert_file), payload) == "aws_iid_evidence_invalid"
    big = identity_document(padding="x" * 5000)
    encoded = json.dumps(
        {"v": 1, "document": wire.base64.b64encode(big).decode(), "signature": "AAAA"}
    ).encode()
    assert refused(server_config(cert_file), encoded) == "aws_iid_evidence_invalid"


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        st.binary(min_size=1, max_size=2048),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=40),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=10), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda v, d, s: json.dumps({"v": v, "document": d, "signature": s}).encode(),
            st.one_of(st.integers(), st.text(max_size=3)),
            st.one_of(st.none(), st.text(max_size=100)),
            st.one_of(st.none(), st.text(max_size=100)),
        ),
    )
)
def test_malformed_evidence_is_a_clean_refusal(cert_file: str, payload: bytes) -> None:
    code = refused(server_config(cert_file), payload)
    assert code in {"aws_iid_evidence_invalid", "aws_iid_signature_invalid"}


# -- the agent half against bad metadata services -----------------------------------


def _agent_error(endpoint: str, **settings_: object) -> CustosError:
    with pytest.raises(PluginCallError) as info:
        asyncio.run(agent_payload(endpoint, **settings_))
    assert isinstance(info.value.__cause__, CustosError), info.value
    return info.value.__cause__


def test_a_hanging_imds_times_out_and_retries_without_hanging(
    aws: AwsSigner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with FakeImds(*aws.signed(), hang=True) as imds:
        start = time.monotonic()
        error = _agent_error(imds.url, timeout_seconds=0.2, attempts=3)
        elapsed = time.monotonic() - start
        assert len(imds.requests) == 3  # tried three times
    assert error.code == "aws_iid_metadata_unavailable"
    assert "no answer within 0.2 s" in error.message
    assert elapsed < 3
    assert caplog.text.count("IMDSv2 session token") >= 3


def test_a_flaky_imds_is_retried(aws: AwsSigner, cert_file: str) -> None:
    with FakeImds(*aws.signed(), fail_first=2) as imds:
        payload = asyncio.run(agent_payload(imds.url, attempts=3))
    assert verify(server_config(cert_file), payload).agent_id.path.endswith(INSTANCE)


def test_an_imds_that_refuses_fails_at_once(aws: AwsSigner) -> None:
    with FakeImds(*aws.signed(), fail_first=10) as imds:
        error = _agent_error(imds.url, attempts=2)
    assert error.code == "aws_iid_metadata_unavailable" and "HTTP 503" in error.message


def test_an_oversized_document_from_imds_is_refused_by_the_agent(aws: AwsSigner) -> None:
    with FakeImds(*aws.signed(), oversize=True) as imds:
        error = _agent_error(imds.url)
    assert error.code == "aws_iid_metadata_unavailable"
    assert "more than" in error.message


def test_no_metadata_service_at_all_is_a_clean_error() -> None:
    from custos.testing.server import free_port

    error = _agent_error(f"http://127.0.0.1:{free_port()}", attempts=2, timeout_seconds=0.5)
    assert error.code == "aws_iid_metadata_unavailable"


# -- configuration ------------------------------------------------------------------


def test_without_certificates_the_aws_published_ones_are_trusted_and_nothing_else(
    aws: AwsSigner, imds: FakeImds
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding

    from custos_attestors.node.aws_iid.server import DEFAULT_CERTIFICATES, load_certificate_keys

    # The shipped file is intact: eight self-signed AWS certificates, each signature good.
    shipped = x509.load_pem_x509_certificates(DEFAULT_CERTIFICATES.read_bytes())
    assert len(shipped) == len(load_certificate_keys([str(DEFAULT_CERTIFICATES)])) == 8
    for cert in shipped:
        assert cert.issuer == cert.subject
        cert.public_key().verify(  # type: ignore[union-attr,call-arg]
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
    # With no `certificates` setting, a document signed by any other key is refused.
    payload = asyncio.run(agent_payload(imds.url))
    assert refused({"account_allowlist": [ACCOUNT]}, payload) == "aws_iid_signature_invalid"


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"certificates": [], "account_allowlist": [ACCOUNT]},
        {"certificates": ["relative.pem"], "account_allowlist": [ACCOUNT]},
        {"certificates": ["/nonexistent/aws.pem"], "account_allowlist": [ACCOUNT]},
        {"certificates": "/etc/aws.pem"},
        {"certificates": ["/dev/zero"]},
        {"account_allowlist": None},
        {"account_allowlist": ["12345"]},
        {"account_allowlist": []},
        {"ec2_endpoint_url": "http://127.0.0.1:1"},
        {"describe_instances": "yes"},
        {"describe_instances": True, "access_key_id": "AKID"},
        {"unknown": 1},
    ],
)
def test_server_configuration_mistakes_are_refused(
    cert_file: str, config: dict[str, object]
) -> None:
    full = {"certificates": [cert_file], "account_allowlist": [ACCOUNT], **config}
    full = {k: v for k, v in full.items() if v is not None} if config else {}
    with pytest.raises(PluginCallError):
        ServerCatalog.load(TD, node_attestors=[PluginConfig("aws_iid", full)])


@pytest.mark.parametrize(
    "config",
    [
        {"endpoint": "ftp://x"},
        {"endpoint": "http://169.254.169.254/latest"},
        {"timeout_seconds": 0},
        {"timeout_seconds": 1000},
        {"attempts": 0},
        {"token_ttl_seconds": 0},
        {"token_ttl_seconds": 21601},
        {"x": 1},
    ],
)
def test_agent_configuration_mistakes_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(PluginCallError):
        AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("aws_iid", config)],
            workload_attestors=[PluginConfig("example")],
        )


def test_garbage_from_imds_is_a_clean_agent_error(aws: AwsSigner) -> None:
    for body in (b"not base64 !!", b"", b"\xff\xfe", b"A" * 3000):
        with FakeImds(*aws.signed(), signature_body=body) as imds:
            error = _agent_error(imds.url)
        assert error.code in {"aws_iid_metadata_unavailable", "aws_iid_evidence_invalid"}, body


def test_an_old_document_still_attests_the_document_does_not_expire(
    aws: AwsSigner, cert_file: str
) -> None:
    # AWS signs the document once, at launch: age is no refusal (trust on first use is).
    payload = wire.encode(*aws.signed(pendingTime="2016-11-19T16:32:11Z"))
    assert verify(server_config(cert_file), payload).agent_id.path.endswith(INSTANCE)
