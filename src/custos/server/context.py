"""What every server part is given: one :class:`ServerContext`, built by the
composition root (:mod:`custos.server.app`) and nowhere else.

Parts declare what they use by reading attributes of this object; nothing here
opens, starts or closes anything (the app does, in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from custos.bundle import TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.server.config import ServerConfig
from custos.server.datastore.store import Datastore
from custos.server.metrics import ServerMetrics
from custos.server.signing_keys import SigningKeys, trust_bundle

if TYPE_CHECKING:  # the parts below import this module; break the cycle for mypy only
    from custos.plugin.catalog import ServerCatalog
    from custos.server.audit import Auditor
    from custos.server.events import ChangeEvents
    from custos.server.issuer import Issuer


def server_id(trust_domain: TrustDomain) -> SpiffeId:
    """The servers' own SPIFFE ID (``spiffe://<td>/custos/server``), the same on every server."""
    return SpiffeId(trust_domain, "/custos/server")


def api_audience(trust_domain: TrustDomain, service: str, method: str) -> str:
    """The exact WPT audience of one Agent API call (issue 8), the same on every server:
    ``spiffe://<td>/custos/server/<service>/<method>``, e.g.
    ``.../custos/server/custos.agent.v1.Svids/BatchNewX509SVID``."""
    return f"{server_id(trust_domain)}/{service}/{method}"


@dataclass(frozen=True, eq=False)
class ServerContext:
    config: ServerConfig
    datastore: Datastore
    ca_keys: SigningKeys  # purpose "x509-ca"
    jwt_keys: SigningKeys  # purpose "jwt-svid"
    wit_keys: SigningKeys  # purpose "wit"
    catalog: ServerCatalog
    metrics: ServerMetrics
    auditor: Auditor
    issuer: Issuer
    events: ChangeEvents

    @property
    def trust_domain(self) -> TrustDomain:
        return self.config.trust_domain

    @property
    def server_id(self) -> SpiffeId:
        return server_id(self.config.trust_domain)

    def bundle(self) -> TrustBundle:
        """The trust domain's bundle now: every published CA, JWT-SVID and WIT key."""
        return trust_bundle(self.trust_domain, self.ca_keys, self.jwt_keys, self.wit_keys)
