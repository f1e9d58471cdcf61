"""Server benchmark (issue 8, "Speed"): X.509-SVID issuance through the Agent API.

The measured case is one ``BatchNewX509SVID`` call of 100 CSRs made by a real agent
client (WIT + a fresh WPT per call, TLS to a real ``custos server run`` process, the
issuer's entitlement check, audit rows, the datastore) — what an agent pays when it
renews 100 workload identities at once.

The limit is what no server can avoid: for the same 100 CSRs, ``cryptography`` alone
loads each CSR, checks its signature (proof of possession) and builds and signs a
certificate with the same profile, with a CA key of the same type (EC P-256, what
``custos server init`` configures). The two are measured in alternating rounds, as the
key-store rows are, so load hits both alike. The ratio printed is p50(server) /
p50(limit); the issue's aim "≥ 50% of the limit" is a ratio ≤ 2.0x.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: CSRs per call, as the issue asks.
BATCH = 100


def make_csrs(n: int = BATCH) -> list[bytes]:
    """``n`` DER CSRs, each for a fresh P-256 key (what an agent's ``memory`` tier makes).

    The subject is a throwaway: only the public key is used (decision 0003).
    """
    out = []
    for _ in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
            .sign(key, hashes.SHA256())
        )
        out.append(csr.public_bytes(Encoding.DER))
    return out


def _ca(trust_domain: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


_SVID_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def limit_batch(csrs: Sequence[bytes], trust_domain: str = "bench.example") -> Callable[[], None]:
    """One call = the in-process limit for one batch: every CSR loaded, its
    signature checked, and an X.509-SVID with custos' profile (one URI SAN,
    cA=FALSE, keyUsage, EKU, SKI, AKI, 128-bit serial) built and signed by an
    EC P-256 CA key. Nothing else: no policy, no datastore, no audit, no wire."""
    key, ca_cert = _ca(trust_domain)
    issuer = ca_cert.subject
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    )
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "custos")])
    ids = [f"spiffe://{trust_domain}/workload/{i}" for i in range(len(csrs))]

    def run() -> None:
        now = datetime.now(UTC)
        for der, spiffe_id in zip(csrs, ids, strict=True):
            csr = x509.load_der_x509_csr(der)
            if not csr.is_signature_valid:
                raise AssertionError("bench CSR does not verify")
            public = csr.public_key()
            (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(issuer)
                .public_key(public)
                .serial_number(secrets.randbits(128) or 1)
                .not_valid_before(now - timedelta(seconds=10))
                .not_valid_after(now + timedelta(hours=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_SVID_KEY_USAGE, critical=True)
                .add_extension(_EKU, critical=False)
                .add_extension(
                    x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                    critical=False,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .add_extension(aki, critical=False)
                .sign(key, hashes.SHA256())
            )

    return run


def _issuance_rounds(rounds: int) -> tuple[list[float], list[float], float]:
    """Alternating rounds: one ``BatchNewX509SVID`` of 100 CSRs through a real server,
    then the in-process limit for the same CSRs. Returns (server, limit) seconds and
    the server's own mean seconds per call (its ``call_seconds`` histogram)."""
    import asyncio
    import time

    from server_common import attested_agent, call_seconds, entry, server_processes

    from custos.agent.client.calls import X509Params
    from custos.server.admin.client import AdminClient
    from custos.testing.server import ServerRig

    csrs = make_csrs()
    limit = limit_batch(csrs)

    async def drive(rig: ServerRig) -> tuple[list[float], list[float], float]:
        async with AdminClient(rig.admin_socket) as admin:
            token = await admin.generate_token()
            ids = [
                (
                    await admin.create_entry(
                        entry(
                            f"spiffe://{rig.trust_domain}/workload/{i}",
                            token.agent_id,
                            f"unix:uid:{1000 + i}",
                        )
                    )
                ).id
                for i in range(BATCH)
            ]
        # The agent holds each key it asked for, so it checks the replies against those
        # keys (X509Params.public_key): read them once here, as the agent has them.
        requests = [
            X509Params(i, c, "memory", public_key=x509.load_der_x509_csr(c).public_key())
            for i, c in zip(ids, csrs, strict=True)
        ]
        server_out: list[float] = []
        limit_out: list[float] = []
        async with attested_agent(rig, token.token) as client:
            clock = time.perf_counter
            for i in range(rounds + 3):  # 3 warm-up rounds (TLS session, caches)
                t0 = clock()
                issued = await client.new_x509_svids(requests)
                t1 = clock()
                limit()
                t2 = clock()
                failed = [r.error for r in issued if r.error is not None]
                assert not failed and len(issued) == BATCH, f"bench issuance failed: {failed[:1]}"
                if i == 2:
                    before = await asyncio.to_thread(call_seconds, rig, "/BatchNewX509SVID")
                if i >= 3:
                    server_out.append(t1 - t0)
                    limit_out.append(t2 - t1)
        after = await asyncio.to_thread(call_seconds, rig, "/BatchNewX509SVID")
        assert after[1] - before[1] == rounds, (before, after)
        return server_out, limit_out, (after[0] - before[0]) / rounds

    # The rig's start waits with asyncio.run: start the server outside the loop.
    with server_processes(with_http=True) as [(rig, _)]:
        return asyncio.run(drive(rig))


def _issuer_rounds(rounds: int) -> tuple[list[float], list[float]]:
    """Alternating rounds in this process: ``Issuer.x509_svids`` for 100 CSRs (the
    server's SQLite datastore with 100 entries, ``exportable`` signing keys, audit
    rows, no logging configured), then the limit for the same CSRs. No wire, no
    authentication, no other process: the issuer's own cost, less moved by load than
    the end-to-end row."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from custos.identity import SpiffeId
    from custos.keys import KeyStoreConfig, open_key_store
    from custos.server.audit import Auditor
    from custos.server.context import server_id
    from custos.server.datastore import Datastore
    from custos.server.entitlement import Entitlement
    from custos.server.issuer import CustodyEvidence, Issuer, X509Request
    from custos.server.metrics import ServerMetrics
    from custos.server.signing_keys import SigningKeys
    from custos.testing.server import ServerRig

    base = Path(tempfile.mkdtemp(prefix="custos-bench-issuer-"))
    url = f"sqlite:///{base / 'datastore.db'}"
    config = ServerRig(base / "rig", datastore_url=url).config()
    td = config.trust_domain
    with (
        Datastore.open(url, trust_domain=td) as store,
        open_key_store(KeyStoreConfig(store="exportable", key_dir=base / "keys")) as keys,
    ):
        managers = [
            SigningKeys(store, keys, purpose, key_name=f"bench-{purpose}", propagation_delay=0)
            for purpose in ("x509-ca", "jwt-svid", "wit")
        ]
        for manager in managers:
            manager.ensure_active()
        own = server_id(td)
        issuer = Issuer(
            config=config,
            datastore=store,
            ca_keys=managers[0],
            jwt_keys=managers[1],
            wit_keys=managers[2],
            auditor=Auditor(store),
            metrics=ServerMetrics(),
            entitlement=Entitlement(store, own),
        )
        agent_id = SpiffeId.parse(f"spiffe://{td.name}/custos/agent/join_token/bench")
        agent = store.agents.attested(
            agent_id,
            attestor="join_token",
            selectors=["join_token:bench"],
            serial="01",
            expires_at=time.time() + 86400,
        )
        ids = [
            store.entries.create(
                f"spiffe://{td.name}/workload/{i}",
                parent_id=agent_id,
                selectors=[f"unix:uid:{1000 + i}"],
                key_custody="memory",
                x509_svid_ttl=3600,
                jwt_svid_ttl=300,
                wit_ttl=300,
            ).id
            for i in range(BATCH)
        ]
        csrs = make_csrs()
        limit = limit_batch(csrs, td.name)
        requests = [
            X509Request(i, c, CustodyEvidence("memory")) for i, c in zip(ids, csrs, strict=True)
        ]
        issuer_out: list[float] = []
        limit_out: list[float] = []
        clock = time.perf_counter
        for i in range(rounds + 3):  # 3 warm-up rounds
            t0 = clock()
            issued = issuer.x509_svids(agent, requests)
            t1 = clock()
            limit()
            t2 = clock()
            assert all(r.error is None for r in issued), "bench issuance failed"
            if i >= 3:
                issuer_out.append(t1 - t0)
                limit_out.append(t2 - t1)
    shutil.rmtree(base, ignore_errors=True)
    return issuer_out, limit_out


def bench_issuance_rows(section: Callable[[str], None]) -> None:
    """``make bench`` rows: the limit, then the server with its ratio."""
    from server_common import env_int
    from timing import Result, row

    rounds = env_int("BENCH_SERVER_BATCHES", 30)
    server, limit, inside = _issuance_rounds(rounds)
    section(
        f"Server: X.509-SVID issuance, batches of {BATCH} CSRs "
        "(ratio = p50 / in-process limit; aim >= 50% of it, i.e. <= 2.0x)"
    )
    lim = Result(f"in-process limit: {BATCH} CSRs load+verify+sign", limit)
    srv = Result(f"Agent API BatchNewX509SVID, {BATCH} CSRs (SQLite)", server)
    print(row(lim, note=f"{BATCH / lim.p50:,.0f} SVIDs/s"))
    print(
        row(
            srv,
            lim,
            note=f"{BATCH / srv.p50:,.0f} SVIDs/s = {100 * lim.p50 / srv.p50:.0f}% of the limit",
        )
    )
    # Where the time is: the server's own handler time (its /metrics histogram, a mean)
    # against the whole call as the agent sees it.
    print(
        f"{'  of which inside the server (mean, its /metrics)':<52} {'':>10} "
        f"{inside * 1e6:>9.1f} {'':>9} {'':>8}  mean {inside * 1e3:.1f} ms of the call's "
        f"{srv.mean * 1e3:.1f} ms"
    )
    # The issuer alone, in this process, against the limit in alternating rounds.
    issuer, limit_in = _issuer_rounds(rounds)
    lim_in = Result(f"in-process limit: {BATCH} CSRs (interleaved with the next row)", limit_in)
    iss = Result(f"in-process Issuer.x509_svids, {BATCH} CSRs (SQLite)", issuer)
    print(row(lim_in))
    print(row(iss, lim_in, note="the issuer alone: no wire, no authentication"))
