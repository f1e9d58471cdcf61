"""Issuance (issue 8, "Agent API" and "Bad input"): the Issuer built from real parts —
a datastore (SQLite and PostgreSQL), signing keys in an exportable key store, the
entitlement walk, the auditor — with each refusal first, then what is issued."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

import custos.server.datastore as datastore_package
from custos.bundle import BundleSet
from custos.errors import CustosError
from custos.identity import Selector, SpiffeId
from custos.jwtsvid import validate_jwt_svid
from custos.keys import KeyStore, KeyStoreConfig, open_key_store
from custos.keys.jwk import public_jwk_members
from custos.server.audit import Auditor
from custos.server.config import ServerConfig
from custos.server.context import server_id
from custos.server.datastore import Datastore, DatastoreUnavailableError
from custos.server.datastore.records import Agent, RegistrationEntry
from custos.server.entitlement import entries_for_agent
from custos.server.issuer import (
    MAX_BATCH,
    CustodyEvidence,
    IssuanceArgumentError,
    Issued,
    Issuer,
    WitRequest,
    X509Request,
)
from custos.server.metrics import ServerMetrics
from custos.server.signing_keys import SigningKeys, trust_bundle
from custos.testing.server import ServerRig
from custos.wimse.wit import verify_wit
from custos.x509 import verify_x509_svid

from .conftest import TRUST_DOMAIN

AGENT = SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/custos/agent/test/node1")
OTHER_AGENT = SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/custos/agent/test/node2")
MEMORY = CustodyEvidence("memory")


@dataclass
class Parts:
    config: ServerConfig
    store: Datastore
    ca_keys: SigningKeys
    jwt_keys: SigningKeys
    wit_keys: SigningKeys
    metrics: ServerMetrics
    issuer: Issuer

    def agent(self, agent_id: SpiffeId = AGENT) -> Agent:
        return self.store.agents.attested(
            agent_id, attestor="test", selectors=["node:n1"], serial="01", expires_at=2e9
        )

    def entry(self, path: str, **fields: Any) -> RegistrationEntry:
        fields.setdefault("parent_id", AGENT)
        fields.setdefault("selectors", ["unix:uid:1000"])
        return self.store.entries.create(f"spiffe://{TRUST_DOMAIN}{path}", **fields)

    def bundles(self) -> BundleSet:
        td = self.config.trust_domain
        return BundleSet([trust_bundle(td, self.ca_keys, self.jwt_keys, self.wit_keys)])

    def issued(self, kind: str) -> float:
        return (
            self.metrics.registry.get_sample_value("custos_server_issued_total", {"kind": kind})
            or 0.0
        )

    def refused(self, kind: str, code: str) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "custos_server_refused_total", {"kind": kind, "code": code}
            )
            or 0.0
        )


@pytest.fixture
def key_store(tmp_path: Path) -> Iterator[KeyStore]:
    with open_key_store(KeyStoreConfig(store="exportable", key_dir=tmp_path / "keys")) as ks:
        yield ks


@pytest.fixture
def parts(store: Datastore, store_url: str, key_store: KeyStore, tmp_path: Path) -> Parts:
    rig = ServerRig(tmp_path / "rig", datastore_url=store_url)
    config = rig.config()
    managers = [
        SigningKeys(store, key_store, purpose, key_name=f"t-{purpose}", propagation_delay=0)
        for purpose in ("x509-ca", "jwt-svid", "wit")
    ]
    for manager in managers:
        manager.ensure_active()
    metrics = ServerMetrics()
    own = server_id(config.trust_domain)
    issuer = Issuer(
        config=config,
        datastore=store,
        ca_keys=managers[0],
        jwt_keys=managers[1],
        wit_keys=managers[2],
        auditor=Auditor(store),
        metrics=metrics,
        entitlement=lambda agent: entries_for_agent(store, agent, own),
    )
    return Parts(config, store, *managers, metrics, issuer)


def csr_for(key: Any, *, san: str | None = None, algorithm: Any = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asks-for-anything")])
    )
    if san is not None:  # a CSR asking for an identity of its own choosing
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = None
    elif algorithm is None:
        algorithm = hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(Encoding.DER)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk_of(key: Any, alg: str = "ES256") -> dict[str, Any]:
    return {**public_jwk_members(key.public_key()), "alg": alg}


def spki(key: Any) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[no-any-return]


def break_audit_writes(store_url: str) -> None:
    """From now on every audit insert fails as a lost database does (the write
    reaches the server, which cannot complete it), while everything else works."""
    break_writes(store_url, "INSERT", "audit")


def break_writes(store_url: str, statement: str, table: str) -> None:
    """From now on every ``statement`` (INSERT, UPDATE) on ``table`` fails as a lost
    database does, while everything else works."""
    engine = create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    name = f"no_{statement.lower()}_{table}"
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            # A trigger writing to a table that is gone: "no such table" at each write.
            conn.execute(text(f"CREATE TABLE gone_{name} (x INTEGER)"))
            conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE {statement} ON {table} "
                    f"BEGIN INSERT INTO gone_{name} VALUES (1); END"
                )
            )
            conn.execute(text(f"DROP TABLE gone_{name}"))
        else:
            conn.execute(
                text(
                    f"CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN "
                    f"RAISE EXCEPTION '{table} {statement} refused' "
                    "USING ERRCODE = 'connection_failure'; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE {statement} ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {name}()"
                )
            )
    engine.dispose()


def codes(results: list[Issued]) -> list[str | None]:
    return [None if r.error is None else r.error.code for r in results]


# -- X.509-SVIDs: refusals per item --------------------------------------------------


def test_every_bad_item_is_refused_alone_and_the_good_one_issued(parts: Parts) -> None:
    agent = parts.agent()
    parts.agent(OTHER_AGENT)
    good = parts.entry("/web", dns_names=["web.example.org"], key_custody="memory")
    others = parts.entry("/theirs", parent_id=OTHER_AGENT)
    expired = parts.entry("/old", expires_at=time.time() - 10)
    tpm_only = parts.entry("/tpm", key_custody="tpm")
    server_dns = parts.entry("/sneaky", dns_names=[parts.config.agent_api.dns_name])
    agent_like = parts.entry("/custos/agent/test/node3")
    tampered = bytearray(csr_for(ec_key()))
    tampered[-5] ^= 0x01  # the signature no longer verifies: no proof of possession
    requests = [
        X509Request(good.id, csr_for(ec_key()), MEMORY),
        X509Request(others.id, csr_for(ec_key()), MEMORY),
        X509Request("f" * 32, csr_for(ec_key()), MEMORY),
        X509Request(expired.id, csr_for(ec_key()), MEMORY),
        X509Request(tpm_only.id, csr_for(ec_key()), MEMORY),
        X509Request(server_dns.id, csr_for(ec_key()), MEMORY),
        X509Request(agent_like.id, csr_for(ec_key()), MEMORY),
        X509Request(good.id, bytes(tampered), MEMORY),
        X509Request(good.id, csr_for(rsa.generate_private_key(65537, 1024)), MEMORY),
        X509Request(good.id, csr_for(ec.generate_private_key(ec.SECP521R1())), MEMORY),
        X509Request(good.id, b"not a CSR", MEMORY),
        X509Request(good.id, csr_for(ec_key()), CustodyEvidence("vault")),
        X509Request(good.id, csr_for(ec_key()), CustodyEvidence("memory", b"x" * 5000)),
        X509Request("x" * 65, csr_for(ec_key()), MEMORY),
    ]

    results = parts.issuer.x509_svids(agent, requests)

    assert codes(results) == [
        None,
        "not_entitled",
        "not_entitled",
        "not_entitled",  # the entitlement walk leaves expired entries out
        "custody_mismatch",
        "reserved_dns_name",
        "reserved_spiffe_id",
        "invalid_csr",
        "invalid_csr",
        "invalid_csr",
        "invalid_csr",
        "invalid_custody",
        "invalid_custody",
        "invalid_entry_id",
    ]
    assert all(r.credential is None and r.spiffe_id is None for r in results[1:])
    assert parts.issued("x509-svid") == 1
    assert parts.refused("x509-svid", "invalid_csr") == 4
    assert parts.refused("x509-svid", "not_entitled") == 3
    audited = parts.store.audit.since()
    assert [a.identity for a in audited] == [str(good.spiffe_id)]


def test_a_batch_over_the_cap_is_refused_whole(parts: Parts) -> None:
    agent = parts.agent()
    entry = parts.entry("/web")
    request = X509Request(entry.id, csr_for(ec_key()), MEMORY)
    with pytest.raises(IssuanceArgumentError) as info:
        parts.issuer.x509_svids(agent, [request] * (MAX_BATCH + 1))
    assert info.value.code == "batch_too_large"
    assert parts.refused("x509-svid", "batch_too_large") == 1
    assert parts.store.audit.since() == []


def test_the_svid_takes_identity_names_and_ttl_from_the_entry_only(parts: Parts) -> None:
    agent = parts.agent()
    entry = parts.entry("/web", dns_names=["web.example.org"], x509_svid_ttl=600)
    key = ec_key()
    csr = csr_for(key, san=f"spiffe://{TRUST_DOMAIN}/custos/server")

    [issued] = parts.issuer.x509_svids(agent, [X509Request(entry.id, csr, MEMORY)])

    svid = issued.credential
    assert issued.error is None and issued.spiffe_id == entry.spiffe_id
    leaf = svid.leaf  # type: ignore[union-attr]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [str(entry.spiffe_id)]
    assert sans.get_values_for_type(x509.DNSName) == ["web.example.org"]
    assert spki(leaf.public_key()) == spki(key.public_key())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(seconds=610)
    assert verify_x509_svid(svid.cert_chain, parts.bundles()) == entry.spiffe_id  # type: ignore[union-attr]
    assert issued.not_after == leaf.not_valid_after_utc.timestamp()


def test_issuance_is_audited_with_custody_and_kept_in_the_bundle(parts: Parts) -> None:
    agent = parts.agent()
    entry = parts.entry("/tpm-web", key_custody="tpm")
    custody = CustodyEvidence("tpm", b"\x01attest", b"\x02sig")

    [issued] = parts.issuer.x509_svids(agent, [X509Request(entry.id, csr_for(ec_key()), custody)])

    [row] = parts.store.audit.since()
    leaf = issued.credential.leaf  # type: ignore[union-attr]
    assert (row.event, row.who, row.attestor, row.identity) == (
        "x509-svid",
        str(AGENT),
        "test",
        str(entry.spiffe_id),
    )
    assert row.selectors == (Selector("node", "n1"),)
    assert row.serial_or_jti == format(leaf.serial_number, "x")
    assert row.not_after == issued.not_after
    assert (row.custody, row.evidence) == ("tpm", "AWF0dGVzdA==.AnNpZw==")
    # The CA key is remembered as signing until the SVID expires (rotation keeps it).
    [record] = parts.store.signing_keys.of_purpose("x509-ca")
    assert record.last_not_after == issued.not_after


def test_a_failed_audit_write_fails_the_issuance(parts: Parts, store_url: str) -> None:
    agent = parts.agent()
    entry = parts.entry("/web")
    break_audit_writes(store_url)

    with pytest.raises(DatastoreUnavailableError):
        parts.issuer.x509_svids(agent, [X509Request(entry.id, csr_for(ec_key()), MEMORY)])
    with pytest.raises(DatastoreUnavailableError):
        parts.issuer.jwt_svid(agent, entry.id, ["rp"])

    assert parts.issued("x509-svid") == 0 and parts.issued("jwt-svid") == 0
    [record] = parts.store.signing_keys.of_purpose("x509-ca")
    assert record.last_not_after is None


def test_a_failed_signing_key_update_rolls_back_the_audit_rows(
    parts: Parts, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit rows and the signing key's note_issued are one unit of work (decision
    0105): when the second write fails, the first is rolled back, no audit line is
    written and nothing is returned or counted."""
    agent = parts.agent()
    entries = [parts.entry(f"/w{i}") for i in range(3)]
    break_writes(store_url, "UPDATE", "signing_keys")

    with (
        caplog.at_level(logging.INFO, logger="custos.audit"),
        pytest.raises(DatastoreUnavailableError),
    ):
        parts.issuer.x509_svids(
            agent, [X509Request(e.id, csr_for(ec_key()), MEMORY) for e in entries]
        )

    assert parts.store.audit.since() == []
    assert [r for r in caplog.records if r.name == "custos.audit"] == []
    assert parts.issued("x509-svid") == 0
    [record] = parts.store.signing_keys.of_purpose("x509-ca")
    assert record.last_not_after is None


def test_a_batch_is_one_audit_line_listing_its_rows(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision 0106: one log record per batch, one ``records`` item per datastore row,
    in the rows' order; a refused item is its own refusal line."""
    agent = parts.agent()
    entries = [parts.entry(f"/w{i}") for i in range(3)]
    requests = [X509Request(e.id, csr_for(ec_key()), MEMORY) for e in entries]
    requests.insert(1, X509Request("0" * 32, csr_for(ec_key()), MEMORY))

    with caplog.at_level(logging.INFO, logger="custos.audit"):
        issued = parts.issuer.x509_svids(agent, requests)

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "custos.audit"]
    [refusal] = [line for line in lines if line.get("outcome") == "refused"]
    assert refusal["code"] == "not_entitled"
    [line] = [line for line in lines if "records" in line]
    rows = parts.store.audit.since()
    assert (line["event"], line["who"], line["attestor"]) == ("x509-svid", str(AGENT), "test")
    assert line["at"] == rows[0].at and line["selectors"] == ["node:n1"]
    assert line["records"] == [
        {
            "seq": r.seq,
            "identity": r.identity,
            "serial_or_jti": r.serial_or_jti,
            "not_after": r.not_after,
            "custody": "memory",
            "residency": "",
        }
        for r in rows
    ]
    assert [r["identity"] for r in line["records"]] == [str(e.spiffe_id) for e in entries]
    assert [r["not_after"] for r in line["records"]] == [
        i.not_after for i in issued if i.error is None
    ]


# -- WITs ------------------------------------------------------------------------------


def test_wit_refusals_per_item(parts: Parts) -> None:
    agent = parts.agent()
    entry = parts.entry("/svc")
    key = ec_key()
    private = {**jwk_of(key), "d": "AAAA"}
    weak_rsa = jwk_of(rsa.generate_private_key(65537, 1024), "RS256")
    eddsa = {
        **public_jwk_members(ed25519.Ed25519PrivateKey.generate().public_key()),
        "alg": "EdDSA",
    }
    requests = [
        WitRequest(entry.id, private, MEMORY),
        WitRequest(entry.id, weak_rsa, MEMORY),
        WitRequest(entry.id, eddsa, MEMORY),
        WitRequest(entry.id, {**jwk_of(key), "alg": "ES384"}, MEMORY),
        WitRequest(entry.id, '{"kty": "EC", "kty": "EC"}', MEMORY),
        WitRequest(entry.id, "x" * 9000, MEMORY),
        WitRequest(entry.id, jwk_of(key), CustodyEvidence("pkcs11")),
        WitRequest(entry.id, json.dumps(jwk_of(key)), MEMORY),
    ]

    results = parts.issuer.wits(agent, requests)

    assert codes(results) == [
        "private_key_sent",
        "invalid_public_key",
        "invalid_public_key",
        "invalid_public_key",
        "invalid_public_key",
        "invalid_public_key",
        "custody_mismatch",
        None,
    ]
    assert parts.refused("wit", "invalid_public_key") == 5
    wit = verify_wit(results[-1].credential, parts.bundles(), profile="spiffe")  # type: ignore[arg-type]
    assert wit.subject == entry.spiffe_id
    assert dict(wit.cnf_jwk) == jwk_of(key)
    assert wit.expires_at == results[-1].not_after
    [row] = parts.store.audit.since()
    assert (row.event, row.serial_or_jti) == ("wit", wit.claims["jti"])


# -- JWT-SVIDs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "audience",
    [[], ["a"] * 17, ["x" * 257], [""]],
    ids=["none", "seventeen", "too-long", "empty"],
)
def test_jwt_svid_audience_is_bounded(parts: Parts, audience: list[str]) -> None:
    agent = parts.agent()
    entry = parts.entry("/svc")
    issued = parts.issuer.jwt_svid(agent, entry.id, audience)
    assert issued.error is not None and issued.error.code == "invalid_audience"
    assert parts.store.audit.since() == []


def test_jwt_svid_for_an_entry_of_another_agent_is_refused(parts: Parts) -> None:
    agent = parts.agent()
    parts.agent(OTHER_AGENT)
    theirs = parts.entry("/theirs", parent_id=OTHER_AGENT)
    issued = parts.issuer.jwt_svid(agent, theirs.id, ["rp"])
    assert issued.error is not None and issued.error.code == "not_entitled"
    assert parts.refused("jwt-svid", "not_entitled") == 1


def test_jwt_svid_is_issued_and_audited(parts: Parts) -> None:
    agent = parts.agent()
    entry = parts.entry("/svc", jwt_svid_ttl=120)
    issued = parts.issuer.jwt_svid(agent, entry.id, ["rp-1", "rp-2"])
    svid = validate_jwt_svid(issued.credential, "rp-2", parts.bundles())  # type: ignore[arg-type]
    assert svid.spiffe_id == entry.spiffe_id
    assert issued.not_after - time.time() <= 121
    [row] = parts.store.audit.since()
    assert row.event == "jwt-svid" and row.serial_or_jti and row.custody == ""


# -- the agent's own credentials ----------------------------------------------------


def test_agent_credentials_bind_one_key_and_expire_together(parts: Parts) -> None:
    key = ec_key()
    creds = parts.issuer.agent_credentials(
        AGENT, csr_for(key), MEMORY, attestor="join_token", selectors=[], ttl=900
    )
    leaf = creds.x509_svid.leaf
    assert verify_x509_svid(creds.x509_svid.cert_chain, parts.bundles()) == AGENT
    wit = verify_wit(creds.wit, parts.bundles(), profile="spiffe")
    assert wit.subject == AGENT and dict(wit.cnf_jwk) == jwk_of(key)
    assert abs(wit.expires_at - leaf.not_valid_after_utc.timestamp()) <= 1
    assert creds.not_after <= leaf.not_valid_after_utc.timestamp()
    assert [(r.event, r.identity, r.attestor) for r in parts.store.audit.since()] == [
        ("x509-svid", str(AGENT), "join_token"),
        ("wit", str(AGENT), "join_token"),
    ]
    assert parts.issued("agent-x509-svid") == 1 and parts.issued("agent-wit") == 1


def test_an_rsa_pss_agent_key_gets_a_ps256_wit(parts: Parts) -> None:
    from cryptography.hazmat.primitives.asymmetric import padding

    key = rsa.generate_private_key(65537, 2048)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256(), rsa_padding=pss)
        .public_bytes(Encoding.DER)
    )
    creds = parts.issuer.agent_credentials(AGENT, csr, MEMORY, attestor="t", selectors=[])
    assert verify_wit(creds.wit, parts.bundles(), profile="spiffe").cnf_alg == "PS256"


@pytest.mark.parametrize("case", ["ed25519", "foreign", "workload", "custody"])
def test_agent_credentials_refusals(parts: Parts, case: str) -> None:
    csr = csr_for(ed25519.Ed25519PrivateKey.generate() if case == "ed25519" else ec_key())
    agent_id = {
        "foreign": SpiffeId.parse("spiffe://elsewhere.test/custos/agent/x"),
        "workload": SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/web"),
    }.get(case, AGENT)
    custody = CustodyEvidence("hsm") if case == "custody" else MEMORY
    with pytest.raises(CustosError) as info:
        parts.issuer.agent_credentials(agent_id, csr, custody, attestor="t", selectors=[])
    assert (
        info.value.code
        == {
            "ed25519": "invalid_public_key",
            "foreign": "invalid_agent_id",
            "workload": "invalid_agent_id",
            "custody": "invalid_custody",
        }[case]
    )
    assert parts.store.audit.since() == []


# -- the audit trail -----------------------------------------------------------------


def test_the_audit_line_is_one_json_object(parts: Parts, caplog: pytest.LogCaptureFixture) -> None:
    agent = parts.agent()
    entry = parts.entry("/svc")
    with caplog.at_level(logging.INFO, logger="custos.audit"):
        issued = parts.issuer.jwt_svid(agent, entry.id, ["rp"])
        parts.issuer.jwt_svid(agent, "0" * 32, ["rp"])
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "custos.audit"]
    assert lines[0]["event"] == "jwt-svid"
    assert lines[0]["who"] == str(AGENT) and lines[0]["selectors"] == ["node:n1"]
    [record] = lines[0]["records"]
    assert record["identity"] == str(entry.spiffe_id) and record["not_after"] == issued.not_after
    assert {"serial_or_jti", "custody", "residency", "seq"} <= record.keys()
    assert {"attestor", "at"} <= lines[0].keys()
    assert lines[1] == {
        "event": "jwt-svid",
        "outcome": "refused",
        "code": "not_entitled",
        "who": str(AGENT),
        "identity": "0" * 32,
    }


def test_auditor_refuses_an_unknown_event(parts: Parts) -> None:
    with pytest.raises(CustosError):
        Auditor(parts.store).record(
            event="coffee", who="w", attestor="a", selectors=[], identity="i",
            serial_or_jti="s", not_after=1.0,
        )  # fmt: skip
    assert parts.store.audit.since() == []


def test_migration_0003_keeps_older_audit_rows(store_url: str) -> None:
    """A database written before migration 0003 opens with its audit rows intact."""
    engine = create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    config = Config()
    config.set_main_option(
        "script_location", str(Path(datastore_package.__file__).parent / "migrations")
    )
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
        conn.execute(
            text(
                "INSERT INTO audit (at, who, attestor, selectors, identity, serial_or_jti, "
                "not_after) VALUES (1, 'w', 'a', '[]', 'i', 's', 2)"
            )
        )
    engine.dispose()
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as store:
        [row] = store.audit.since()
        assert (row.who, row.event, row.custody, row.evidence) == ("w", "", "", "")


def _by_parent(parts: Parts, config: ServerConfig) -> Issuer:
    """An issuer over ``parts`` whose entitlement is a plain parent lookup."""
    return Issuer(
        config=config,
        datastore=parts.store,
        ca_keys=parts.ca_keys,
        jwt_keys=parts.jwt_keys,
        wit_keys=parts.wit_keys,
        auditor=Auditor(parts.store),
        metrics=parts.metrics,
        entitlement=lambda a: parts.store.entries.list(parent_id=a.id),
    )


def test_the_servers_dns_name_is_refused_whatever_case_the_config_wrote(
    parts: Parts, tmp_path: Path
) -> None:
    rig = ServerRig(tmp_path / "upper", sections={"agent_api": {"dns_name": "Custos-Server"}})
    agent = parts.agent()
    sneaky = parts.entry("/sneaky", dns_names=["custos-server"])  # written past the admin API
    issuer = _by_parent(parts, rig.config())
    results = issuer.x509_svids(agent, [X509Request(sneaky.id, csr_for(ec_key()), MEMORY)])
    assert codes(results) == ["reserved_dns_name"]


def test_an_expired_entry_is_refused_even_if_the_entitlement_offers_it(parts: Parts) -> None:
    """The issuer checks expiry itself: an entitlement that lists an expired entry
    (one read just before it expired, a plain parent lookup) does not make it issuable."""
    agent = parts.agent()
    expired = parts.entry("/old", expires_at=time.time() - 1)
    issuer = _by_parent(parts, parts.config)
    issued = issuer.jwt_svid(agent, expired.id, ["rp"])
    assert issued.error is not None and issued.error.code == "entry_expired"


def test_long_entry_ttls_end_with_the_ca(parts: Parts) -> None:
    """An entry may ask for years; no credential outlives the CA certificate."""
    agent = parts.agent()
    years = 2 * 365 * 86400.0
    entry = parts.entry("/long", x509_svid_ttl=years, jwt_svid_ttl=years, wit_ttl=years)
    ca_end = parts.ca_keys.current().certificate().not_valid_after_utc.timestamp()
    key = ec_key()

    [svid] = parts.issuer.x509_svids(agent, [X509Request(entry.id, csr_for(key), MEMORY)])
    [wit] = parts.issuer.wits(agent, [WitRequest(entry.id, jwk_of(key), MEMORY)])
    jwt = parts.issuer.jwt_svid(agent, entry.id, ["rp"])

    assert [svid.error, wit.error, jwt.error] == [None, None, None]
    assert max(svid.not_after, wit.not_after, jwt.not_after) <= ca_end


# -- hostile items (hypothesis): always a per-item refusal, never an exception --------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_jwk_members = st.dictionaries(
    st.sampled_from(["kty", "crv", "x", "y", "n", "e", "alg", "d", "use", "kid"]),
    _json | st.sampled_from(["EC", "RSA", "OKP", "P-256", "ES256", "RS256", "AQAB", ""]),
    max_size=7,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    csr=st.binary(max_size=600) | st.just(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"),
    jwk=_jwk_members | st.text(max_size=200),
    entry_id=st.text(max_size=80),
)
def test_hostile_items_are_refused_one_by_one(
    parts: Parts, csr: bytes, jwk: dict[str, Any] | str, entry_id: str
) -> None:
    agent = parts.agent()
    entry = parts.entry("/hostile") if not parts.store.entries.count() else None
    good_id = entry.id if entry is not None else parts.store.entries.list()[0].id
    x509_results = parts.issuer.x509_svids(
        agent, [X509Request(good_id, csr, MEMORY), X509Request(entry_id, csr_for(ec_key()), MEMORY)]
    )
    wit_results = parts.issuer.wits(
        agent, [WitRequest(good_id, jwk, MEMORY), WitRequest(entry_id, jwk_of(ec_key()), MEMORY)]
    )
    assert x509_results[0].error is not None and x509_results[0].error.code == "invalid_csr"
    assert wit_results[0].error is not None
    assert wit_results[0].error.code in {"invalid_public_key", "private_key_sent"}
    for item in (x509_results[1], wit_results[1]):
        assert item.error is not None
        assert item.error.code in {"not_entitled", "invalid_entry_id"}


# -- an entry's expires_at bounds what is issued from it ------------------------------


@pytest.mark.parametrize("kind", ["x509-svid", "wit", "jwt-svid"])
def test_no_credential_outlives_its_entry(parts: Parts, kind: str) -> None:
    """An entry that ends in two minutes gives credentials that end with it, not an
    hour later (its TTLs ask for an hour): after expires_at the identity is gone."""
    agent = parts.agent()
    ends = time.time() + 120
    entry = parts.entry(
        "/short", x509_svid_ttl=3600, jwt_svid_ttl=3600, wit_ttl=3600, expires_at=ends
    )
    key = ec_key()

    if kind == "x509-svid":
        [issued] = parts.issuer.x509_svids(agent, [X509Request(entry.id, csr_for(key), MEMORY)])
        assert issued.credential is not None
        leaf_end = issued.credential.leaf.not_valid_after_utc.timestamp()  # type: ignore[union-attr]
        assert leaf_end <= ends
    elif kind == "wit":
        [issued] = parts.issuer.wits(agent, [WitRequest(entry.id, jwk_of(key), MEMORY)])
        wit = verify_wit(issued.credential, parts.bundles(), profile="spiffe")  # type: ignore[arg-type]
        assert wit.expires_at <= ends
    else:
        issued = parts.issuer.jwt_svid(agent, entry.id, ["rp"])
        svid = validate_jwt_svid(issued.credential, "rp", parts.bundles())  # type: ignore[arg-type]
        assert svid.expiry.timestamp() <= ends
    assert issued.error is None
    assert 0 < issued.not_after <= ends
    [row] = parts.store.audit.since()
    assert row.not_after <= ends
