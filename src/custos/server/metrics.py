"""The server's Prometheus metrics (served at ``/metrics``; docs/operations.md).

Each :class:`ServerMetrics` has its own ``CollectorRegistry``: tests run several
servers in one process, and a process-global registry would refuse the second.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ServerMetrics:
    """Every metric the server exports, created once per server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: Credentials issued, by kind: x509-svid | wit | jwt-svid | agent-x509-svid | agent-wit.
        self.issued = Counter(
            "custos_server_issued", "Credentials issued", ["kind"], registry=self.registry
        )
        #: Issuance requests refused, by kind and custos error code.
        self.refused = Counter(
            "custos_server_refused",
            "Issuance requests refused",
            ["kind", "code"],
            registry=self.registry,
        )
        #: Node attestations, by attestor and outcome: ok | refused | error.
        self.attestations = Counter(
            "custos_server_attestations",
            "Node attestation outcomes",
            ["attestor", "outcome"],
            registry=self.registry,
        )
        #: Agent API and admin API call latency, by gRPC method path and status code.
        self.call_seconds = Histogram(
            "custos_server_call_seconds",
            "Agent API and admin API call latency",
            ["method", "code"],
            registry=self.registry,
        )
        #: Datastore operations that failed (database unreachable, timeouts).
        self.datastore_errors = Counter(
            "custos_server_datastore_errors",
            "Datastore operations that failed",
            ["operation"],
            registry=self.registry,
        )
        #: Entry-set updates sent to connected agents.
        self.entry_updates = Counter(
            "custos_server_entry_updates", "Entry-set updates sent to agents", registry=self.registry
        )
