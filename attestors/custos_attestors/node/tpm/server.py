"""Server half of ``tpm``: EK trust, credential activation, quote, clock, PCR policy.

One attestation is one run of :meth:`TpmServerAttestor.attest`:

1. the payload (:func:`.wire.decode_payload`): the EK's public area, its certificate
   and intermediates, the AK's public area;
2. the EK is trusted (:class:`custos.tpm.ekcert.EkTrust`: its certificate chains to
   ``ek_ca_bundle`` and holds the EK's key, or its hash is on the allowlist); the
   EK hash names the agent: ``spiffe://<td>/custos/agent/tpm/<ek hash>``;
3. the AK is a restricted ECC P-256 signing key (:func:`custos.tpm.verify.ak_public_checked`);
4. one challenge: a fresh 32-byte nonce from :mod:`secrets`, the PCRs to quote, and a
   credential (TPM2_MakeCredential to the EK for the AK's name) unless the datastore
   already holds this AK as activated for this EK (re-attestation: quote only);
5. the answer, refused after ``challenge_ttl`` (``challenge_expired``): the activated
   secret must equal the one made (``activation_failed``), the quote must verify
   (signature by the AK, nonce, selection, PCR digest over the reported values);
6. the quote's clock, resetCount and restartCount are recorded for the EK, refused
   when they went back since the last quote by the same AK (``tpm_clock_regressed``:
   one transaction, several servers; a new AK starts a new baseline, as the TPM
   obfuscates the counters per AK);
7. the event log, when sent (or required), is replayed against the quoted PCRs
   (``event_log_mismatch`` / ``event_log_missing``);
8. the PCR policy of every group the node is in (``pcr_policy``: logged at WARNING);
9. :class:`AttestedNode` with the ``tpm`` selectors and the AK as ``attestation_key``.

The nonce exists only inside this generator and is compared with the one answer it
receives: single use by construction, and never the same twice (256 random bits).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from custos.errors import CustosError
from custos.identity.ids import SpiffeId
from custos.plugin.protocols import AttestedNode, Challenge, CoreConfig
from custos.server.datastore import Datastore
from custos.server.datastore.errors import NotFoundError
from custos_attestors.node.tpm import wire
from custos_attestors.node.tpm.policy import (
    PolicyConfigError,
    ServerSettings,
    parse_server_settings,
    violations,
)

NAME = "tpm"
log = logging.getLogger(__name__)


class TpmAttestationRefusedError(CustosError):
    """The node's TPM evidence was refused; ``code`` says why (``challenge_expired``,
    ``activation_failed``, ``pcr_policy``, ``event_log_mismatch``, ...)."""

    code = "tpm_attestation_refused"


class TpmAgentBannedError(CustosError):
    code = "agent_banned"


def _refuse(code: str, message: str) -> TpmAttestationRefusedError:
    return TpmAttestationRefusedError(message, code=code)


def pcr_selectors(values: Mapping[tuple[str, int], bytes]) -> list[str]:
    return [f"pcr:{bank}:{index}:{value.hex()}" for (bank, index), value in values.items()]


class TpmServerAttestor:
    """The ``tpm`` node attestor, server half (see the module docstring)."""

    def __init__(self) -> None:
        self._store: Datastore | None = None
        self._core: CoreConfig | None = None
        self._settings: ServerSettings | None = None
        self._trust: Any = None  # custos.tpm.ekcert.EkTrust
        #: Attestations refused by the PCR policy since start (also logged at WARNING;
        #: the server counts every refusal in custos_server_attestations).
        self.policy_refusals = 0

    @property
    def supports_reattestation(self) -> bool:
        # A TPM proves itself again with a fresh quote at every renewal.
        return True

    @property
    def settings(self) -> ServerSettings:
        if self._settings is None:
            raise RuntimeError("tpm is not configured")
        return self._settings

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        from custos.tpm.ekcert import EkTrust

        store = config.get("datastore")
        if not isinstance(store, Datastore):
            raise PolicyConfigError("tpm needs the server's Datastore as 'datastore'")
        if store.trust_domain != core.trust_domain:
            raise PolicyConfigError("the datastore serves another trust domain")
        settings = parse_server_settings({k: v for k, v in config.items() if k != "datastore"})
        self._trust = EkTrust(list(settings.ek_ca_bundle), settings.ek_allowlist)
        self._settings = settings
        self._store = store
        self._core = core

    def close(self) -> None:
        self._store = None
        self._core = None
        self._trust = None

    async def attest(self, payload: bytes) -> AsyncGenerator[Challenge | AttestedNode, bytes]:
        from custos.tpm import activation, verify
        from custos.tpm.ekcert import load_ek_certificate

        if self._store is None or self._core is None or self._settings is None:
            raise RuntimeError("tpm is not configured")
        store, core, settings, trust = self._store, self._core, self._settings, self._trust

        # -- 1-3: the payload, the EK, the AK --
        evidence = wire.decode_payload(payload)
        ek_public = verify.parse_public(evidence.ek_public, what="EK public area")
        ek_key = verify.public_key(ek_public, what="EK public area")
        ek_cert = load_ek_certificate(evidence.ek_cert) if evidence.ek_cert else None
        chain = [
            load_ek_certificate(c, what="an intermediate EK CA certificate")
            for c in evidence.ek_intermediates
        ]

        def lookup() -> tuple[Any, Any, SpiffeId, Any]:
            # One worker-thread call: the EK's trust (a chain check), the EK and AK
            # areas, then what the datastore holds for the node the EK names (its
            # agent, its activated AK).
            verdict = trust.check(ek_key, ek_cert, chain)
            # The certificate vouches for the key; the rest of the area is the agent's word.
            activation.check_ek_template(ek_public, evidence.ek_profile)
            ak_public = verify.ak_public_checked(evidence.ak_public)
            agent_id = SpiffeId(core.trust_domain, f"/custos/agent/{NAME}/{verdict.ek_hash}")
            try:
                agent = store.agents.get(agent_id)
            except NotFoundError:
                agent = None
            if agent is not None and agent.banned:
                raise TpmAgentBannedError(f"agent {agent_id} is banned")
            return verdict, ak_public, agent_id, store.tpm_nodes.get(verdict.ek_hash)

        verdict, ak_public, agent_id, known = await asyncio.to_thread(lookup)
        ek_hash = verdict.ek_hash

        # -- 4: the challenge --
        reattest = known is not None and hmac.compare_digest(known.ak_public, evidence.ak_public)
        nonce = secrets.token_bytes(wire.NONCE_BYTES)
        secret = blob = encrypted = None
        if not reattest:
            secret, blob, encrypted = activation.make_credential(ek_public, verify.name(ak_public))
        challenge = wire.ChallengeMessage(nonce, settings.pcrs, blob, encrypted).encode()
        sent = time.monotonic()
        raw_answer = yield Challenge(challenge)

        # -- 5: the answer --
        if time.monotonic() - sent > settings.challenge_ttl:
            raise _refuse(
                "challenge_expired",
                f"the answer came after the challenge expired ({settings.challenge_ttl:g} s)",
            )
        answer = wire.decode_answer(raw_answer)
        if secret is None:
            if answer.activated_secret is not None:
                raise _refuse("activation_failed", "an activated secret answers no credential")
        elif answer.activated_secret is None or not hmac.compare_digest(
            answer.activated_secret, secret
        ):
            raise _refuse(
                "activation_failed",
                "the activated secret is wrong: the AK is not in the TPM of this EK",
            )

        def verified() -> verify.QuoteFacts:
            # One worker-thread call: the quote's signature and digest, then the clock.
            facts = verify.verify_quote(
                ak_public,
                answer.quote_attest,
                answer.quote_signature,
                nonce,
                dict(answer.pcr_values),
                str(settings.pcrs),
            )
            # -- 6: the clock (checked here for a clear error, and again atomically) --
            # Only against quotes by the same AK: the TPM obfuscates resetCount and
            # restartCount per AK (outside the endorsement and platform hierarchies), so
            # a newly activated AK starts a new baseline (decision 0068).
            if known is not None and reattest:
                verify.check_monotonic((known.clock, known.reset_count, known.restart_count), facts)
            store.tpm_nodes.record(
                ek_hash, evidence.ak_public, facts.clock, facts.reset_count, facts.restart_count
            )
            return facts

        facts = await asyncio.to_thread(verified)

        # -- 7: the event log --
        events = None
        if answer.event_log is not None:
            events = self._replay(answer.event_log, facts.pcr_values)
        elif settings.require_event_log:
            raise _refuse("event_log_missing", "this server requires the measured-boot event log")

        # -- 8: selectors and policy --
        selectors = [f"ek_pubhash:{ek_hash}"]
        if verdict.issuer_cn:
            selectors.append(f"ek_issuer:{verdict.issuer_cn}")
        if verdict.manufacturer:
            selectors.append(f"manufacturer:{verdict.manufacturer}")
        selectors += pcr_selectors(facts.pcr_values)
        failed = violations(settings.pcr_policy, selectors, facts.pcr_values, events)
        if failed:
            self.policy_refusals += 1
            log.warning("tpm: refused %s: outside the PCR policy: %s", agent_id, "; ".join(failed))
            raise _refuse("pcr_policy", f"the node is outside the PCR policy: {failed[0]}")

        # -- 9 --
        yield AttestedNode(
            agent_path=(ek_hash,), selectors=selectors, attestation_key=evidence.ak_public
        )

    @staticmethod
    def _replay(data: bytes, quoted: Mapping[tuple[str, int], bytes]) -> list[Any]:
        """The log's measured events, after checking that replaying them gives the quoted
        value of every quoted PCR they extend (in every quoted bank the log carries).

        EV_NO_ACTION events are dropped: they extend nothing, so no PCR vouches for
        them, and a policy must not match them.
        """
        from custos.tpm.eventlog import EV_NO_ACTION, parse_event_log, replay

        events = parse_event_log(data)
        measured = [e for e in events if e.event_type != EV_NO_ACTION]
        for bank in dict.fromkeys(bank for bank, _ in quoted):
            if not any(bank in e.digests for e in measured):
                continue  # a log without this bank (e.g. SHA-256 only) proves nothing there
            for index, value in replay(events, bank).items():
                expected = quoted.get((bank, index))
                if expected is not None and not hmac.compare_digest(value, expected):
                    raise _refuse(
                        "event_log_mismatch",
                        f"replaying the event log does not give the quoted PCR {bank}:{index}",
                    )
        return measured


__all__ = ["TpmAgentBannedError", "TpmAttestationRefusedError", "TpmServerAttestor"]
