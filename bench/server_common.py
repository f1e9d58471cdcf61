"""What the server benchmarks share: a ``custos server run`` process (the rig of
:mod:`custos.testing.server`), its admin client, and an agent attested to it with a
join token through the real client library (``custos.agent.client``).

The server is a subprocess so that it and the benchmark's client each have a core
(decision 0043); nothing here reaches into the server's process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

from custos._proto import types_v1_pb2
from custos.agent.client.calls import AgentApiClient
from custos.agent.client.streams import bundle_from_proto
from custos.identity import TrustDomain
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerProcess, ServerRig, join_token_agent

TRUST_DOMAIN = "bench.example"


def shared_keys(key_dir: Path) -> dict[str, Mapping[str, object]]:
    """Config sections that put every signing key in one ``exportable`` directory:
    servers sharing a database must share the key material its metadata names."""
    store = {"store": "exportable", "key_dir": str(key_dir)}
    return {f"{purpose}.key_store": store for purpose in ("ca", "jwt_svid", "wit")}


@contextlib.contextmanager
def server_processes(
    count: int = 1,
    *,
    datastore_url: str | None = None,
    prepare: Callable[[str], None] | None = None,
    with_http: bool = False,
) -> Iterator[list[tuple[ServerRig, ServerProcess]]]:
    """``count`` running servers; with several, give a shared (PostgreSQL) ``datastore_url``.

    ``prepare(url)`` runs on the (first) datastore before any server starts. Servers
    start one after the other (the first makes the signing keys) and are stopped with
    SIGTERM at the end, their directories removed.
    """
    keys = Path(tempfile.mkdtemp(prefix="custos-bench-keys-"))
    rigs = [
        ServerRig.create(
            trust_domain=TRUST_DOMAIN,
            datastore_url=datastore_url,
            sections=shared_keys(keys),
            with_http=with_http,
        )
        for _ in range(count)
    ]
    started = [(rig, ServerProcess(rig)) for rig in rigs]
    try:
        if prepare is not None:
            prepare(rigs[0].url)
        for _, process in started:
            process.start()
        yield started
    finally:
        for _, process in started:
            # Also one whose start failed half-way: it may be running.
            if process.process is not None and process.process.poll() is None:
                with contextlib.suppress(Exception):
                    process.terminate()
        for rig in rigs:
            rig.destroy()
        with contextlib.suppress(OSError):
            for f in keys.iterdir():
                f.unlink()
            keys.rmdir()


def entry(spiffe_id: str, parent_id: str, selector: str) -> types_v1_pb2.Entry:
    """A registration entry for the admin API with the default TTLs."""
    return types_v1_pb2.Entry(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=[selector],
        key_custody="memory",
        x509_svid_ttl=3600,
        jwt_svid_ttl=300,
        wit_ttl=300,
    )


@contextlib.asynccontextmanager
async def attested_agent(rig: ServerRig, secret: str) -> AsyncIterator[AgentApiClient]:
    """An agent attested to ``rig``'s server with the join token ``secret`` (the rig's
    :func:`~custos.testing.server.join_token_agent`: the real client library, a
    ``memory``-tier key): a client whose every call carries its WIT and a fresh WPT."""
    td = TrustDomain.parse(rig.trust_domain)
    async with AdminClient(rig.admin_socket) as admin:
        bundle = bundle_from_proto(await admin.get_bundle(), td)
    agent = await join_token_agent(
        rig.agent_api_address,
        bundle,
        secret,
        server_name=rig.config().agent_api.dns_name,
        trust_domain=td.name,
    )
    async with agent:
        yield agent.client


def call_seconds(rig: ServerRig, method: str) -> tuple[float, int]:
    """(total seconds, calls) the server's own ``custos_server_call_seconds`` histogram
    holds for ``method`` answered OK: the server side of a call, without the wire
    and the client (``/metrics``, so the rig needs ``with_http``)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{rig.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total, count = 0.0, 0
    for family in text_string_to_metric_families(text):
        if family.name != "custos_server_call_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if not labels.get("method", "").endswith(method) or labels.get("code") != "OK":
                continue
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += int(sample.value)
    return total, count


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))
