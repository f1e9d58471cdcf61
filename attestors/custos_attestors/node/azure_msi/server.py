"""Server half of ``azure_msi``: verifies a managed-identity access token.

One attestation, in order (each refusal a :class:`AzureMsiRefusedError` with its own
code, logged at WARNING without the token):

1. the payload (:func:`.wire.decode`): one compact JWT;
2. the RS256 signature against the trusted JWKS (:mod:`.jwt`; the tenant's own
   ``jwks_file``/``jwks_url`` when it has one, else the table's);
3. ``tid`` names a configured tenant, and ``iss`` is that tenant's issuer (v1
   ``https://sts.windows.net/<tid>/`` or v2 ``https://login.microsoftonline.com/<tid>/v2.0``);
4. ``aud`` is the tenant's ``resource``; ``exp`` (required), ``nbf`` and ``iat`` hold,
   within ``clock_skew``;
5. ``xms_mirid`` names a virtual machine (``/subscriptions/<s>/resourceGroups/<rg>/
   providers/Microsoft.Compute/virtualMachines/<vm>``), so the identity is the VM's own
   system-assigned one; its subscription is in the tenant's ``subscriptions`` when set;
6. :class:`AttestedNode` ``[<tid>, <principal>]`` (``oid``, which equals ``sub`` on a
   managed-identity token) with ``subscription-id``, ``resource-group`` and ``vm-name``.

The token is a bearer token valid for hours and any process on the VM can ask IMDS
for one, so the attestor cannot re-attest (``supports_reattestation`` false): the
server refuses a second attestation of the same agent ID until it is evicted (trust on
first use, as SPIRE).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

from custos._numbers import InvalidNumberError, seconds
from custos.errors import CustosError
from custos.plugin.protocols import AttestedNode, Challenge, CoreConfig
from custos_attestors.node._jwks import JwksError, JwksSource, check_url
from custos_attestors.node.azure_msi import wire
from custos_attestors.node.azure_msi.jwt import (
    MAX_JWKS_BYTES,
    MIN_REFETCH,
    AzureTokenError,
    Keys,
    decode,
    parse_jwks,
    verify_rs256,
)

#: A key set: a file, or a URL cached ``jwks_refresh``, refetched for an unknown kid at
#: most every :data:`MIN_REFETCH` s, kept through an endpoint outage (:mod:`.._jwks`).
KeySource = JwksSource[Keys]

NAME = "azure_msi"
DEFAULT_RESOURCE = "https://management.azure.com/"
DEFAULT_CLOCK_SKEW = 60.0
DEFAULT_JWKS_REFRESH = 3600.0
DEFAULT_JWKS_TIMEOUT = 5.0
MAX_TENANTS = 256
MAX_SUBSCRIPTIONS = 1024
log = logging.getLogger(__name__)

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VM_ID = re.compile(
    r"/subscriptions/([^/]+)/resourcegroups/([^/]+)/providers/"
    r"microsoft\.compute/virtualmachines/([^/]+)",
    re.IGNORECASE,
)
_NAME_OK = re.compile(r"[A-Za-z0-9_.()\-]{1,90}")


class AzureMsiConfigError(CustosError, ValueError):
    code = "azure_msi_config"


class AzureMsiRefusedError(CustosError):
    """The token was refused; ``code`` says why (``azure_msi_tenant_not_allowed``,
    ``azure_msi_wrong_audience``, ``azure_msi_token_expired``, ...)."""

    code = "azure_msi_refused"


def _refuse(code: str, message: str) -> AzureMsiRefusedError:
    return AzureMsiRefusedError(message, code=code)


@dataclass(frozen=True)
class Tenant:
    id: str
    resource: str
    subscriptions: frozenset[str] | None
    keys: KeySource | None  # None: the table's


def _guid(value: object, what: str) -> str:
    if not isinstance(value, str) or not _GUID.fullmatch(value.lower()):
        raise AzureMsiConfigError(f"{what} must be a GUID")
    return value.lower()


def _key_source(
    table: Mapping[str, object], refresh: float, timeout: float, what: str
) -> KeySource | None:
    file, url = table.get("jwks_file"), table.get("jwks_url")
    if file is not None and url is not None:
        raise AzureMsiConfigError(f"{what}: give jwks_file or jwks_url, not both")
    name = f"{what} JWKS"
    code = "azure_msi_jwks_unavailable"
    try:
        if file is not None:
            if not isinstance(file, str) or not file.startswith("/") or "\0" in file:
                raise AzureMsiConfigError(f"{what}: jwks_file must be an absolute file path")
            return JwksSource(
                parse=parse_jwks, code=code, max_bytes=MAX_JWKS_BYTES, file=file, name=name
            )
        if url is not None:
            try:
                checked = check_url(url, schemes=frozenset({"http", "https"}))
            except ValueError:
                raise AzureMsiConfigError(f"{what}: jwks_url must be an http(s) URL") from None
            return JwksSource(
                parse=parse_jwks,
                code=code,
                max_bytes=MAX_JWKS_BYTES,
                url=checked,
                cache_seconds=refresh,
                refetch_seconds=MIN_REFETCH,
                serve_stale_seconds=math.inf,
                timeout=timeout,
                name=name,
            )
    except JwksError as e:
        raise AzureMsiConfigError(f"{what}: {e.message}") from None
    return None


def parse_settings(
    config: Mapping[str, object],
) -> tuple[dict[str, Tenant], KeySource | None, float]:
    allowed = {"tenants", "jwks_file", "jwks_url", "jwks_refresh", "jwks_timeout", "clock_skew"}
    unknown = set(config) - allowed
    if unknown:
        raise AzureMsiConfigError(f"unknown azure_msi settings: {', '.join(sorted(unknown))}")
    try:
        from custos.server.config import parse_duration

        refresh = parse_duration(
            config.get("jwks_refresh", DEFAULT_JWKS_REFRESH), name="jwks_refresh", maximum=86400
        ).total_seconds()
        timeout = seconds(
            config.get("jwks_timeout", DEFAULT_JWKS_TIMEOUT),
            name="jwks_timeout",
            minimum=0.01,
            maximum=60,
        )
        skew = seconds(config.get("clock_skew", DEFAULT_CLOCK_SKEW), name="clock_skew", maximum=600)
    except (InvalidNumberError, CustosError) as e:
        raise AzureMsiConfigError(e.message) from None
    default_keys = _key_source(config, refresh, timeout, "azure_msi")
    raw = config.get("tenants")
    if not isinstance(raw, Mapping) or not raw:
        raise AzureMsiConfigError(
            'azure_msi needs a "tenants" table: one sub-table per tenant ID allowed to attest'
        )
    if len(raw) > MAX_TENANTS:
        raise AzureMsiConfigError(f"at most {MAX_TENANTS} tenants")
    tenants: dict[str, Tenant] = {}
    for tid, table in raw.items():
        tenant_id = _guid(tid, "a tenant ID")
        if tenant_id in tenants:
            raise AzureMsiConfigError(f"tenant {tenant_id} is configured twice")
        if not isinstance(table, Mapping):
            raise AzureMsiConfigError(f"tenant {tenant_id}: must be a table")
        extra = set(table) - {"resource", "subscriptions", "jwks_file", "jwks_url"}
        if extra:
            raise AzureMsiConfigError(
                f"tenant {tenant_id}: unknown settings: {', '.join(sorted(extra))}"
            )
        resource = table.get("resource", DEFAULT_RESOURCE)
        if (
            not isinstance(resource, str)
            or not 0 < len(resource) <= 1024
            or not resource.isprintable()
        ):
            raise AzureMsiConfigError(f"tenant {tenant_id}: resource must be a non-empty string")
        subs = table.get("subscriptions")
        subscriptions = None
        if subs is not None:
            if not isinstance(subs, list) or not subs or len(subs) > MAX_SUBSCRIPTIONS:
                raise AzureMsiConfigError(
                    f"tenant {tenant_id}: subscriptions must be a list of 1 to "
                    f"{MAX_SUBSCRIPTIONS} subscription IDs"
                )
            subscriptions = frozenset(
                _guid(s, f"tenant {tenant_id}: a subscription ID") for s in subs
            )
        keys = _key_source(table, refresh, timeout, f"tenant {tenant_id}")
        if keys is None and default_keys is None:
            raise AzureMsiConfigError(
                f"tenant {tenant_id}: no JWKS: set jwks_file or jwks_url "
                "(for the table or the tenant)"
            )
        tenants[tenant_id] = Tenant(tenant_id, resource, subscriptions, keys)
    return tenants, default_keys, skew


def _number(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse("azure_msi_token_invalid", f"the token's {name} claim is not a number")
    return float(value)


class AzureMsiServerAttestor:
    """The ``azure_msi`` node attestor, server half (see the module docstring)."""

    def __init__(self) -> None:
        self._tenants: dict[str, Tenant] = {}
        self._keys: KeySource | None = None
        self._skew = DEFAULT_CLOCK_SKEW
        self._configured = False
        #: Refusals since start (each is also logged at WARNING).
        self.refusals = 0

    @property
    def supports_reattestation(self) -> bool:
        # A bearer token any process on the VM can get: trust on first use.
        return False

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        self._tenants, self._keys, self._skew = parse_settings(
            {k: v for k, v in config.items() if k != "datastore"}
        )
        self._configured = True

    def close(self) -> None:
        self._tenants = {}
        self._keys = None
        self._configured = False

    def _source(self, tid: str | None) -> KeySource:
        tenant = self._tenants.get(tid) if tid else None
        if tenant is not None and tenant.keys is not None:
            return tenant.keys
        if self._keys is not None:
            return self._keys
        # A token naming no configured tenant, and no table-wide JWKS: it cannot verify.
        raise _refuse(
            "azure_msi_tenant_not_allowed", f"tenant {tid!s:.40} is not allowed to attest"
        )

    async def attest(self, payload: bytes) -> AsyncGenerator[Challenge | AttestedNode, bytes]:
        if not self._configured:
            raise RuntimeError("azure_msi is not configured")
        try:
            node = await self._verify(payload)
        except (AzureMsiRefusedError, AzureTokenError, wire.AzureMsiEvidenceError) as e:
            self.refusals += 1
            log.warning("azure_msi attestation refused (%s): %s", e.code, e.message)
            raise
        yield node

    async def _verify(self, payload: bytes) -> AttestedNode:
        # alg, key-choosing headers and kid are checked before any key is looked up.
        jws, kid = decode(wire.decode(payload))
        # The tenant is read before the signature only to pick the key set; it is
        # trusted only after the signature verifies.
        raw_tid = jws.claims.get("tid")
        tid = raw_tid.lower() if isinstance(raw_tid, str) else None
        source = self._source(tid)
        keys = source.current()
        if keys is None or kid not in keys:
            try:
                keys = await source.get(unknown_kid=True)
            except JwksError as e:
                raise AzureMsiRefusedError(e.message, code=e.code) from None
        claims = verify_rs256(jws, kid, keys)

        # -- tenant and issuer --
        if tid is None or not _GUID.fullmatch(tid):
            raise _refuse("azure_msi_token_invalid", "the token has no tenant (tid) claim")
        tenant = self._tenants.get(tid)
        if tenant is None:
            raise _refuse("azure_msi_tenant_not_allowed", f"tenant {tid} is not allowed to attest")
        iss = claims.get("iss")
        issuers = {
            f"https://sts.windows.net/{tid}/",
            f"https://login.microsoftonline.com/{tid}/v2.0",
        }
        if not isinstance(iss, str) or iss.lower() not in issuers:
            raise _refuse("azure_msi_bad_issuer", f"the token's issuer is not tenant {tid}'s")

        # -- audience and lifetime --
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if tenant.resource not in audiences:
            raise _refuse(
                "azure_msi_wrong_audience",
                f"the token is not for the resource {tenant.resource!r}",
            )
        now = time.time()
        exp = _number(claims, "exp")
        if exp is None:
            raise _refuse("azure_msi_token_invalid", "the token has no exp claim")
        if now > exp + self._skew:
            raise _refuse("azure_msi_token_expired", "the token has expired")
        for name in ("nbf", "iat"):
            when = _number(claims, name)
            if when is not None and when > now + self._skew:
                raise _refuse(
                    "azure_msi_token_not_yet_valid", f"the token's {name} is in the future"
                )

        # -- principal and VM --
        oid, sub = claims.get("oid"), claims.get("sub")
        principal = oid if oid is not None else sub
        if not isinstance(principal, str) or not _GUID.fullmatch(principal.lower()):
            raise _refuse("azure_msi_token_invalid", "the token's oid/sub is not a GUID")
        principal = principal.lower()
        if isinstance(sub, str) and oid is not None and sub.lower() != principal:
            raise _refuse(
                "azure_msi_not_managed_identity",
                "the token's sub differs from its oid: not a managed-identity token",
            )
        mirid = claims.get("xms_mirid")
        match = _VM_ID.fullmatch(mirid) if isinstance(mirid, str) and len(mirid) <= 1024 else None
        if match is None:
            raise _refuse(
                "azure_msi_not_a_vm",
                "the token's xms_mirid does not name a virtual machine's own identity "
                "(user-assigned and scale-set identities are shared and refused)",
            )
        subscription, group, vm = match.groups()
        if not _GUID.fullmatch(subscription.lower()):
            raise _refuse("azure_msi_not_a_vm", "the xms_mirid subscription is not a GUID")
        subscription = subscription.lower()
        if not _NAME_OK.fullmatch(group) or not _NAME_OK.fullmatch(vm):
            raise _refuse(
                "azure_msi_not_a_vm", "the xms_mirid resource group or VM name is malformed"
            )
        if tenant.subscriptions is not None and subscription not in tenant.subscriptions:
            raise _refuse(
                "azure_msi_subscription_not_allowed",
                f"subscription {subscription} is not allowed for tenant {tid}",
            )
        return AttestedNode(
            agent_path=[tid, principal],
            selectors=[
                f"subscription-id:{subscription}",
                f"resource-group:{group}",
                f"vm-name:{group}:{vm}",
            ],
        )


__all__ = [
    "AzureMsiConfigError",
    "AzureMsiRefusedError",
    "AzureMsiServerAttestor",
    "parse_settings",
]
