"""Server half of ``aws_iid``: verifies the instance identity document.

1. the payload (:func:`.wire.decode`): the document bytes and the raw signature;
2. the signature: RSA PKCS#1 v1.5 with SHA-256 over the document bytes, by the key
   of one of the configured AWS certificates (``certificates``: PEM files) —
   ``aws_iid_signature_invalid`` otherwise;
3. the document's fields (:func:`.wire.parse_document`), the account on
   ``account_allowlist`` (``aws_iid_account_not_allowed``);
4. with ``describe_instances = true``: ``ec2:DescribeInstances`` through boto3 for
   the instance (``aws_iid_instance_unknown`` when EC2 does not know it,
   ``aws_iid_describe_failed`` when the call fails) and its tags and security groups
   as selectors;
5. :class:`AttestedNode` named ``<account>/<region>/<instance>``.

The document is signed once, at launch: it proves the instance existed in that
account, not that the caller is that instance now.  So this half cannot re-attest
(``supports_reattestation`` is false): the core refuses a second attestation of the
same agent ID until an operator evicts it — trust on first use, as SPIRE does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from custos.errors import CustosError
from custos.plugin.protocols import AttestedNode, Challenge, CoreConfig
from custos_attestors.node.aws_iid import wire

NAME = "aws_iid"
log = logging.getLogger(__name__)

_SETTINGS = {
    "datastore",  # the server hands every node attestor its Datastore; unused here
    "certificates",
    "account_allowlist",
    "describe_instances",
    "ec2_endpoint_url",
    "access_key_id",
    "secret_access_key",
    "describe_timeout_seconds",
}
_EC2_SETTINGS = {
    "ec2_endpoint_url",
    "access_key_id",
    "secret_access_key",
    "describe_timeout_seconds",
}
_ACCOUNT = re.compile(r"[0-9]{12}")
#: Selector values the catalog accepts: at most 1024 printable characters, 256 per node.
_MAX_VALUE = 1024
_MAX_DESCRIBED = 200
_MAX_PEM_BYTES = 1 << 20
#: AWS's published `signature` certificates (the file names its source), trusted when
#: the `certificates` setting is absent.
DEFAULT_CERTIFICATES = Path(__file__).with_name("aws-signature-certificates.pem")


class AwsIidRefusedError(CustosError):
    """The instance identity evidence was refused; ``code`` says why."""

    code = "aws_iid_refused"


def _refuse(code: str, message: str) -> AwsIidRefusedError:
    return AwsIidRefusedError(message, code=code)


def _string_list(config: Mapping[str, object], key: str) -> list[str]:
    value = config.get(key)
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"aws_iid needs {key!r}: a non-empty list")
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must list strings")
    return list(value)


def load_certificate_keys(paths: Sequence[str]) -> list[rsa.RSAPublicKey]:
    """The RSA public keys of every certificate in the PEM files ``paths``."""
    keys: list[rsa.RSAPublicKey] = []
    for name in paths:
        path = Path(name)
        if not path.is_absolute():
            raise ValueError(f"certificates: {name!r} is not an absolute path")
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise ValueError(f"certificates: {name} is not a regular file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"certificates: cannot read {name}: {e.strerror}") from None
        if len(data) > _MAX_PEM_BYTES:
            raise ValueError(f"certificates: {name} is larger than {_MAX_PEM_BYTES} bytes")
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ValueError(f"certificates: {name} holds no PEM certificate") from None
        for certificate in certificates:
            key = certificate.public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                raise ValueError(f"certificates: {name} holds a non-RSA certificate")
            keys.append(key)
    return keys


def verify_signature(
    keys: Sequence[rsa.RSAPublicKey], document: bytes, signature: bytes
) -> rsa.RSAPublicKey | None:
    """The key among ``keys`` that signed ``document`` (RSA PKCS#1 v1.5, SHA-256)."""
    for key in keys:
        try:
            key.verify(signature, document, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return key
    return None


def _value_ok(value: str) -> bool:
    return 0 < len(value) <= _MAX_VALUE and value.isprintable()


def described_selectors(instance: Mapping[str, Any]) -> list[str]:
    """``tag:<k>:<v>``, ``sg:id:<id>``, ``sg:name:<name>`` of a DescribeInstances
    instance; values the catalog would refuse (unprintable, too long) are skipped
    with a warning: fewer selectors can only match fewer entries."""
    values: list[str] = []
    for group in instance.get("SecurityGroups") or []:
        if isinstance(group, Mapping):
            if isinstance(group.get("GroupId"), str):
                values.append(f"sg:id:{group['GroupId']}")
            if isinstance(group.get("GroupName"), str):
                values.append(f"sg:name:{group['GroupName']}")
    for tag in instance.get("Tags") or []:
        if isinstance(tag, Mapping) and isinstance(tag.get("Key"), str):
            value = tag.get("Value")
            values.append(f"tag:{tag['Key']}:{value if isinstance(value, str) else ''}")
    kept = [v for v in values if _value_ok(v)]
    if len(kept) != len(values):
        skipped = len(values) - len(kept)
        log.warning("aws_iid: skipped %d unprintable or long tag/group selectors", skipped)
    if len(kept) > _MAX_DESCRIBED:
        log.warning("aws_iid: kept %d of %d tag/group selectors", _MAX_DESCRIBED, len(kept))
        kept = kept[:_MAX_DESCRIBED]
    return kept


class _Describer:
    """``ec2:DescribeInstances`` through boto3, one client per region (thread-safe)."""

    def __init__(self, config: Mapping[str, object]) -> None:
        try:
            import boto3  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]
        except ImportError:
            raise ValueError(
                "describe_instances needs boto3: install custos[aws] (pip install boto3)"
            ) from None
        endpoint = config.get("ec2_endpoint_url")
        if endpoint is not None and (
            not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://"))
        ):
            raise ValueError("ec2_endpoint_url must be an http(s) URL")
        key_id, secret = config.get("access_key_id"), config.get("secret_access_key")
        if (key_id is None) != (secret is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        if key_id is not None and not (isinstance(key_id, str) and isinstance(secret, str)):
            raise ValueError("access_key_id and secret_access_key must be strings")
        timeout = config.get("describe_timeout_seconds", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError("describe_timeout_seconds must be a number from 0 to 120")
        if not 0 < timeout <= 120:
            raise ValueError("describe_timeout_seconds must be a number from 0 to 120")
        self._boto3 = boto3
        self._endpoint = endpoint
        self._credentials = (
            {"aws_access_key_id": key_id, "aws_secret_access_key": secret} if key_id else {}
        )
        self._config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _client(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._boto3.session.Session().client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self._endpoint,
                    config=self._config,
                    **self._credentials,
                )
                self._clients[region] = client
            return client

    def describe(self, region: str, instance_id: str) -> Mapping[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            answer = self._client(region).describe_instances(InstanceIds=[instance_id])
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code.startswith("InvalidInstanceID"):
                raise _refuse(
                    "aws_iid_instance_unknown", f"EC2 does not know instance {instance_id}"
                ) from None
            raise _refuse("aws_iid_describe_failed", f"DescribeInstances failed: {code}") from e
        except BotoCoreError as e:
            raise _refuse(
                "aws_iid_describe_failed", f"DescribeInstances failed: {type(e).__name__}"
            ) from e
        for reservation in answer.get("Reservations") or []:
            for instance in reservation.get("Instances") or []:
                if isinstance(instance, Mapping) and instance.get("InstanceId") == instance_id:
                    return instance
        raise _refuse("aws_iid_instance_unknown", f"EC2 does not know instance {instance_id}")


class AwsIidServerAttestor:
    """The ``aws_iid`` node attestor, server half (see the module docstring)."""

    def __init__(self) -> None:
        self._keys: list[rsa.RSAPublicKey] = []
        self._accounts: frozenset[str] = frozenset()
        self._describer: _Describer | None = None
        self._configured = False

    @property
    def supports_reattestation(self) -> bool:
        # The document is not fresh: trust on first use per instance (SPIRE's rule).
        return False

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown aws_iid settings: {', '.join(sorted(unknown))}")
        self._keys = load_certificate_keys(
            _string_list(config, "certificates")
            if "certificates" in config
            else [str(DEFAULT_CERTIFICATES)]
        )
        accounts = _string_list(config, "account_allowlist")
        for account in accounts:
            if not _ACCOUNT.fullmatch(account):
                raise ValueError(f"account_allowlist: {account!r} is not a 12-digit account ID")
        self._accounts = frozenset(accounts)
        describe = config.get("describe_instances", False)
        if not isinstance(describe, bool):
            raise ValueError("describe_instances must be true or false")
        if not describe and set(config) & _EC2_SETTINGS:
            raise ValueError("the EC2 settings need describe_instances = true")
        self._describer = _Describer(config) if describe else None
        self._configured = True

    def verify(self, payload: bytes) -> tuple[wire.IdentityDocument, list[str]]:
        """Steps 1-3: the checked document and its selectors (no I/O)."""
        evidence = wire.decode(payload)
        key = verify_signature(self._keys, evidence.document, evidence.signature)
        if key is None:
            raise _refuse(
                "aws_iid_signature_invalid",
                "the instance identity document is not signed by a configured AWS certificate",
            )
        if key is not self._keys[0]:
            # The signature names no key: try the last one that verified first, so a
            # fleet in one region costs one RSA verify per attestation, not one per
            # configured certificate.
            self._keys = [key, *(k for k in self._keys if k is not key)]
        doc = wire.parse_document(evidence.document)
        if doc.account_id not in self._accounts:
            raise _refuse(
                "aws_iid_account_not_allowed",
                f"account {doc.account_id} is not on the account allowlist",
            )
        selectors = [
            f"az:{doc.availability_zone}",
            f"image:id:{doc.image_id}",
            f"instance:id:{doc.instance_id}",
            f"region:{doc.region}",
        ]
        return doc, selectors

    async def attest(self, payload: bytes) -> AsyncGenerator[Challenge | AttestedNode, bytes]:
        if not self._configured:
            raise RuntimeError("aws_iid is not configured")
        doc, selectors = self.verify(payload)
        if self._describer is not None:
            instance = await asyncio.to_thread(
                self._describer.describe, doc.region, doc.instance_id
            )
            selectors += described_selectors(instance)
        yield AttestedNode(
            agent_path=[doc.account_id, doc.region, doc.instance_id], selectors=selectors
        )

    def close(self) -> None:
        self._keys = []
        self._describer = None
        self._configured = False
