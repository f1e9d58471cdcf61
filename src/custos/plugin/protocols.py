"""What an attestor plugin implements, and the values it is given and returns.

An entry point names a *factory* (usually the class) that custos calls with no
arguments; custos then calls ``configure`` once, the attest calls any number of
times, and ``close`` once.  Plugins never see or choose their selector type nor
the agent ID prefix: the catalog adds both (see :mod:`custos.plugin.catalog`).

The two node attestor halves exchange bytes through custos, shaped like httpx's
``Auth.auth_flow``: generators that do no transport I/O themselves.

- agent half: ``attestation_flow()`` first yields the payload; each challenge
  the server sends is passed in with ``asend`` and the next value yielded is
  the answer.
- server half: ``attest(payload)`` yields :class:`Challenge` values and receives
  each answer by ``asend``; its last yield is :class:`AttestedNode`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from custos.identity.ids import TrustDomain
from custos.plugin.errors import PluginError

_MAX_ID = (1 << 32) - 1  # uid_t, gid_t, pid_t are 32-bit on Linux


class InvalidPeerCredentialsError(PluginError):
    code = "invalid_peer_credentials"


def _check_id(name: str, value: object, low: int) -> None:
    # bool is an int subclass: True as a uid is a bug, not uid 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidPeerCredentialsError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= _MAX_ID:
        raise InvalidPeerCredentialsError(f"{name} {value} is out of range")


@dataclass(frozen=True)
class PeerCredentials:
    """The caller on the agent's Unix socket, as the kernel reports it.

    ``pid``, ``uid`` and ``gid`` come from ``SO_PEERCRED``; ``pidfd`` refers to
    that very process (``SO_PEERPIDFD``, else ``pidfd_open`` at accept time).
    A PID alone can be recycled; an attestor that reads ``/proc/<pid>`` must
    check afterwards that ``pidfd`` is still alive (``signal.pidfd_send_signal(
    pidfd, 0)``) before it trusts what it read.  The agent owns ``pidfd``:
    plugins must not close it.
    """

    pid: int
    uid: int
    gid: int
    pidfd: int

    def __post_init__(self) -> None:
        _check_id("pid", self.pid, 1)
        _check_id("uid", self.uid, 0)
        _check_id("gid", self.gid, 0)
        _check_id("pidfd", self.pidfd, 0)


@dataclass(frozen=True)
class CoreConfig:
    """What custos tells every plugin at configure time."""

    trust_domain: TrustDomain


@dataclass(frozen=True)
class Challenge:
    """A challenge the server half sends to the agent half."""

    data: bytes


@dataclass(frozen=True)
class AttestedNode:
    """The server half's verdict: the agent ID's path segments below
    ``/custos/agent/<plugin name>/`` and the selector values (without type).

    ``attestation_key``: the TPM2B_PUBLIC (marshalled) of an attestation key the
    attestor proved to live in the node's TPM (credential activation); the server
    then checks the agent key's TPM2_Certify statement against it and keeps it to
    check workload keys' residency. ``b""`` (the default) when the attestor has none.
    """

    agent_path: Sequence[str]
    selectors: Sequence[str] = field(default=())
    attestation_key: bytes = b""


@runtime_checkable
class Plugin(Protocol):
    """Lifecycle shared by every attestor."""

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        """Check and apply this plugin's configuration table; raise on any mistake."""

    def close(self) -> None:
        """Release what the plugin holds; called once, also after a failed configure."""


@runtime_checkable
class WorkloadAttestor(Plugin, Protocol):
    """Agent side: a caller on the socket -> selector values (e.g. ``uid:1000``)."""

    async def attest(self, peer: PeerCredentials) -> Sequence[str]:
        """Selector values for ``peer``; an empty sequence when nothing applies."""
        ...


@runtime_checkable
class AgentNodeAttestor(Plugin, Protocol):
    """Agent half of a node attestor: makes the evidence, answers challenges."""

    def attestation_flow(self) -> AsyncGenerator[bytes, bytes]:
        """Yield the payload, then one answer per challenge sent in."""
        ...


@runtime_checkable
class ServerNodeAttestor(Plugin, Protocol):
    """Server half of a node attestor: verifies evidence, may challenge."""

    @property
    def supports_reattestation(self) -> bool:
        """True when an attested agent may attest again with fresh evidence
        (a TPM can; a join token, used once, cannot)."""
        ...

    def attest(self, payload: bytes) -> AsyncGenerator[Challenge | AttestedNode, bytes]:
        """Yield challenges (receiving each answer), then one :class:`AttestedNode`."""
        ...


@runtime_checkable
class KeyCertifier(Protocol):
    """Optional, on the agent half of a node attestor that holds an attestation
    key (the ``tpm`` plugin): proves that a key in the agent's TPM store is
    resident in the same TPM.

    The agent calls it only after the plugin's ``attestation_flow`` yielded its
    payload (the AK exists from then on) and only for keys in the ``tpm`` custody
    tier.  It returns ``(attest, signature, tpm_public)``: TPMS_ATTEST of a
    TPM2_Certify of the key by the AK (marshalled), the TPMT_SIGNATURE
    (marshalled) and the key's TPM2B_PUBLIC (marshalled); ``None`` when this
    plugin cannot certify that key (no AK yet, not its TPM).
    """

    def certify_key(self, key_name: str, key_path: str) -> tuple[bytes, bytes, bytes] | None:
        """Certify the store key ``key_name`` whose blob is at ``key_path``."""
        ...


__all__ = [
    "AgentNodeAttestor",
    "AttestedNode",
    "Challenge",
    "CoreConfig",
    "InvalidPeerCredentialsError",
    "KeyCertifier",
    "PeerCredentials",
    "Plugin",
    "ServerNodeAttestor",
    "WorkloadAttestor",
]
