"""The plugin catalog: loads, configures, checks and wraps attestor plugins.

Shaped after SPIRE's ``pkg/common/catalog``: each configured plugin is loaded
through its entry point, checked against its protocol and configured; the
counts are checked against the process's constraints (an agent runs exactly one
node attestor and at least one workload attestor, a server one or more node
attestors); on any failure everything loaded so far is closed.

Every plugin is used through a wrapper that

- stamps the plugin's name as the selector type (plugins return *values*; a
  plugin cannot choose a type, so it cannot forge another plugin's selectors);
- builds the agent ID as ``spiffe://<td>/custos/agent/<plugin name>/<segments>``;
- bounds what crosses it (selector counts, message sizes, challenge rounds);
- wraps every exception a plugin raises in :class:`PluginCallError` naming the
  plugin, chained, never swallowed.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import AsyncGeneratorType, MappingProxyType, TracebackType
from typing import Any, Generic, TypeGuard, TypeVar

from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import SpiffeId, TrustDomain
from custos.identity.selector import Selector, check_selector_type
from custos.plugin.discovery import PluginInfo, PluginKind, kind_label, load_plugin
from custos.plugin.errors import (
    PluginCallError,
    PluginConfigError,
    PluginError,
    PluginLoadError,
    PluginMisbehavedError,
)
from custos.plugin.protocols import (
    AgentNodeAttestor,
    AttestedNode,
    Challenge,
    CoreConfig,
    InvalidPeerCredentialsError,
    PeerCredentials,
    Plugin,
    ServerNodeAttestor,
    WorkloadAttestor,
)

#: Selectors one plugin may return from one call (real attestors return a handful).
MAX_SELECTORS_PER_CALL = 256
#: One attestation message (payload, challenge, answer): EK certificates, quotes,
#: instance documents and tokens are a few KiB.
MAX_ATTESTATION_MESSAGE_BYTES = 64 * 1024
#: Challenge rounds in one node attestation (a TPM needs one).
MAX_CHALLENGES = 8
#: Segments a plugin may put below ``/custos/agent/<plugin name>/``.
MAX_AGENT_PATH_SEGMENTS = 8
#: Longest ``AttestedNode.attestation_key`` (a TPM2B_PUBLIC: a P-256 AK is ~90 bytes).
MAX_ATTESTATION_KEY_BYTES = 2048
AGENT_ID_PREFIX = "/custos/agent/"


class AttestationExchangeError(PluginError):
    """The other side of a node attestation broke the exchange's bounds (an empty or
    oversized payload or answer, too many challenges)."""

    code = "attestation_exchange"


@dataclass(frozen=True)
class PluginConfig:
    """One configured plugin: its name (the entry point's) and its settings table."""

    name: str
    # repr=False: settings may hold secrets (a join token, a datastore handle).
    config: Mapping[str, object] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Constraints:
    """How many plugins of one kind a process runs (SPIRE's catalog constraints)."""

    min: int
    max: int | None = None

    def check(self, kind: PluginKind, count: int) -> None:
        label = kind_label(kind)
        if self.max is not None and self.min == self.max and count != self.min:
            raise PluginConfigError(f"expected exactly {self.min} {label}, got {count}")
        if count < self.min:
            raise PluginConfigError(f"expected at least {self.min} {label}, got {count}")
        if self.max is not None and count > self.max:
            raise PluginConfigError(f"expected at most {self.max} {label}, got {count}")


EXACTLY_ONE = Constraints(1, 1)
AT_LEAST_ONE = Constraints(1)

_P = TypeVar("_P", bound=Plugin)


@dataclass(frozen=True)
class NodeAttestationResult:
    """A verified node: its agent ID, stamped selectors, whether it may re-attest, and
    the attestation key its TPM activated (b"" when the attestor has none)."""

    plugin: str
    agent_id: SpiffeId
    selectors: tuple[Selector, ...]
    can_reattest: bool
    attestation_key: bytes = b""


class _Loaded(Generic[_P]):
    """A configured plugin behind the checks every call goes through."""

    def __init__(self, info: PluginInfo, plugin: _P, core: CoreConfig) -> None:
        self.info = info
        self.plugin = plugin
        self.core = core

    @property
    def name(self) -> str:
        return self.info.name

    def _label(self) -> str:
        return f"{kind_label(self.info.kind)} {self.name!r}"

    def failed(self, during: str, error: Exception) -> PluginCallError:
        """The wrapper of an exception the plugin raised (the caller chains it)."""
        return PluginCallError(
            f"{self._label()} failed in {during}: {type(error).__name__}: {error}",
            plugin=self.name,
            kind=self.info.kind,
        )

    def misbehaved(self, message: str) -> PluginMisbehavedError:
        return PluginMisbehavedError(
            f"{self._label()}: {message}", plugin=self.name, kind=self.info.kind
        )

    def check(self) -> None:
        """Checks of what the plugin declares, before it is configured."""

    def configure(self, config: Mapping[str, object]) -> None:
        try:
            self.plugin.configure(config, self.core)
        except Exception as e:
            raise self.failed("configure", e) from e

    def close(self) -> None:
        try:
            self.plugin.close()
        except Exception as e:
            raise self.failed("close", e) from e

    def selectors(self, values: object) -> tuple[Selector, ...]:
        """Stamp this plugin's name on the selector values it returned."""
        if not _is_sequence(values):
            raise self.misbehaved(
                f"selectors must be a sequence of strings, not {type(values).__name__}"
            )
        if len(values) > MAX_SELECTORS_PER_CALL:
            raise self.misbehaved(
                f"returned {len(values)} selectors; at most {MAX_SELECTORS_PER_CALL}"
            )
        out: list[Selector] = []
        for value in values:
            if not isinstance(value, str):
                # A Selector object lands here too: the type is ours to set (decision 0024).
                raise self.misbehaved(
                    f"returned a {type(value).__name__} as a selector; plugins return "
                    "selector values (str) and custos sets the type to the plugin's name"
                )
            try:
                out.append(Selector(self.name, value))
            except InvalidIdentifierError as e:
                raise self.misbehaved(f"invalid selector value: {e.message}") from e
        return tuple(out)

    def message(self, data: object, what: str) -> bytes:
        """A payload, challenge or answer the plugin produced, checked."""
        if not isinstance(data, bytes):
            raise self.misbehaved(f"{what} must be bytes, not {type(data).__name__}")
        if len(data) > MAX_ATTESTATION_MESSAGE_BYTES:
            raise self.misbehaved(
                f"{what} is {len(data)} bytes; at most {MAX_ATTESTATION_MESSAGE_BYTES}"
            )
        return data

    def start_flow(self, start: Callable[[], object]) -> AsyncGenerator[Any, bytes]:
        try:
            flow = start()
        except Exception as e:
            raise self.failed("attest", e) from e
        if type(flow) is not AsyncGeneratorType and not isinstance(flow, AsyncGenerator):
            raise self.misbehaved(f"attest must return an async generator, not {type(flow)}")
        return flow

    async def step(self, flow: AsyncGenerator[Any, bytes], sent: bytes | None) -> object:
        """Advance the plugin's generator by one yield."""
        try:
            return await (anext(flow) if sent is None else flow.asend(sent))
        except StopAsyncIteration:
            raise self.misbehaved("the attestation flow ended before it was done") from None
        except Exception as e:
            raise self.failed("attest", e) from e

    async def end_flow(self, flow: AsyncGenerator[Any, bytes]) -> None:
        try:
            await flow.aclose()
        except Exception as e:
            raise self.failed("attest (closing the flow)", e) from e


def _is_sequence(value: object) -> TypeGuard[Sequence[Any]]:
    """A sequence that is not a string. A list or a tuple (what plugins return) is
    answered without the ``Sequence`` ABC check, which costs more than the rest of a
    selector's stamping (issue 11, "Speed"); the verdict is the same."""
    return type(value) in (list, tuple) or (
        not isinstance(value, (str, bytes)) and isinstance(value, Sequence)
    )


def _incoming(data: object, what: str) -> bytes:
    """A message from the other side of an attestation (hostile until verified)."""
    if not isinstance(data, bytes):
        raise AttestationExchangeError(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > MAX_ATTESTATION_MESSAGE_BYTES:
        raise AttestationExchangeError(
            f"{what} is {len(data)} bytes; at most {MAX_ATTESTATION_MESSAGE_BYTES}"
        )
    return data


class LoadedWorkloadAttestor(_Loaded[WorkloadAttestor]):
    async def attest(self, peer: PeerCredentials) -> tuple[Selector, ...]:
        if not isinstance(peer, PeerCredentials):
            raise InvalidPeerCredentialsError(
                f"peer must be PeerCredentials, not {type(peer).__name__}"
            )
        try:
            values = await self.plugin.attest(peer)
        except Exception as e:
            raise self.failed("attest", e) from e
        return self.selectors(values)


class LoadedAgentNodeAttestor(_Loaded[AgentNodeAttestor]):
    async def attest(self, exchange: Callable[[bytes], Awaitable[bytes | None]]) -> None:
        """Run the agent half: ``exchange(message)`` sends the payload (then each
        answer) to the server and returns its next challenge, or ``None`` once the
        server has decided.  Errors of ``exchange`` propagate unwrapped."""
        flow = self.start_flow(self.plugin.attestation_flow)
        try:
            message = self.message(await self.step(flow, None), "payload")
            if not message:
                raise self.misbehaved("payload is empty")
            for _ in range(MAX_CHALLENGES + 1):
                challenge = await exchange(message)
                if challenge is None:
                    return
                challenge = _incoming(challenge, "challenge")
                message = self.message(await self.step(flow, challenge), "answer")
            raise AttestationExchangeError(f"the server sent more than {MAX_CHALLENGES} challenges")
        finally:
            await self.end_flow(flow)


class LoadedServerNodeAttestor(_Loaded[ServerNodeAttestor]):
    supports_reattestation = False

    def check(self) -> None:
        try:
            reattest = self.plugin.supports_reattestation
        except Exception as e:
            raise self.failed("supports_reattestation", e) from e
        if not isinstance(reattest, bool):
            raise self.misbehaved(
                f"supports_reattestation must be a bool, not {type(reattest).__name__}"
            )
        self.supports_reattestation = reattest

    async def attest(
        self, payload: bytes, challenge: Callable[[bytes], Awaitable[bytes]]
    ) -> NodeAttestationResult:
        """Verify an agent's ``payload``; ``challenge(data)`` sends a challenge to the
        agent and returns its answer (its errors propagate unwrapped)."""
        if not _incoming(payload, "payload"):
            raise AttestationExchangeError("payload is empty")
        flow = self.start_flow(lambda: self.plugin.attest(payload))
        try:
            answer: bytes | None = None
            for _ in range(MAX_CHALLENGES + 1):
                out = await self.step(flow, answer)
                if isinstance(out, AttestedNode):
                    return self._result(out)
                if not isinstance(out, Challenge):
                    raise self.misbehaved(
                        f"yielded {type(out).__name__}; expected Challenge or AttestedNode"
                    )
                data = self.message(out.data, "challenge")
                answer = _incoming(await challenge(data), "answer")
            raise self.misbehaved(f"sent more than {MAX_CHALLENGES} challenges")
        finally:
            await self.end_flow(flow)

    def _result(self, node: AttestedNode) -> NodeAttestationResult:
        return NodeAttestationResult(
            plugin=self.name,
            agent_id=self._agent_id(node.agent_path),
            selectors=self.selectors(node.selectors),
            can_reattest=self.supports_reattestation,
            attestation_key=self._attestation_key(node),
        )

    def _attestation_key(self, node: AttestedNode) -> bytes:
        key = node.attestation_key
        if not isinstance(key, bytes) or len(key) > MAX_ATTESTATION_KEY_BYTES:
            raise self.misbehaved(
                f"attestation_key must be bytes of at most {MAX_ATTESTATION_KEY_BYTES}"
            )
        return key

    def _agent_id(self, path: object) -> SpiffeId:
        if not _is_sequence(path):
            raise self.misbehaved(f"agent_path must be a sequence of segments, not {type(path)}")
        if not 1 <= len(path) <= MAX_AGENT_PATH_SEGMENTS:
            raise self.misbehaved(
                f"agent_path has {len(path)} segments; 1 to {MAX_AGENT_PATH_SEGMENTS} allowed"
            )
        for segment in path:
            # "/" inside a segment would let a plugin write more levels than it declared.
            if not isinstance(segment, str) or not segment or "/" in segment:
                raise self.misbehaved(f"invalid agent path segment {segment!r:.60}")
        try:
            return SpiffeId(
                self.core.trust_domain, AGENT_ID_PREFIX + self.name + "/" + "/".join(path)
            )
        except InvalidIdentifierError as e:
            raise self.misbehaved(f"invalid agent path: {e.message}") from e


_LoadedAny = LoadedWorkloadAttestor | LoadedAgentNodeAttestor | LoadedServerNodeAttestor
# Any: mypy refuses protocol classes as values of a type[...] (type-abstract).
_PROTOCOLS: dict[PluginKind, Any] = {
    "agent_node_attestor": AgentNodeAttestor,
    "server_node_attestor": ServerNodeAttestor,
    "workload_attestor": WorkloadAttestor,
}


def _construct(kind: PluginKind, cfg: PluginConfig, core: CoreConfig) -> _LoadedAny:
    """Import, instantiate and check one plugin (not yet configured)."""
    info, factory = load_plugin(kind, cfg.name)
    if not callable(factory):
        raise PluginLoadError(f"{kind_label(kind)} {cfg.name!r} ({info.value}) is not callable")
    try:
        plugin = factory()
    except Exception as e:
        raise PluginLoadError(
            f"{kind_label(kind)} {cfg.name!r} ({info.value}) failed to start: {e}"
        ) from e
    protocol = _PROTOCOLS[kind]
    try:
        # isinstance on a runtime protocol reads every member, properties included.
        implements = isinstance(plugin, protocol)
    except Exception as e:
        raise PluginLoadError(
            f"{kind_label(kind)} {cfg.name!r} ({info.value}) cannot be inspected: {e}"
        ) from e
    if not implements:
        raise PluginLoadError(
            f"{kind_label(kind)} {cfg.name!r} ({info.value}) does not implement "
            f"custos.plugin.{protocol.__name__}"
        )
    if isinstance(plugin, ServerNodeAttestor) and kind == "server_node_attestor":
        return LoadedServerNodeAttestor(info, plugin, core)
    if isinstance(plugin, AgentNodeAttestor) and kind == "agent_node_attestor":
        return LoadedAgentNodeAttestor(info, plugin, core)
    assert isinstance(plugin, WorkloadAttestor)
    return LoadedWorkloadAttestor(info, plugin, core)


def _check_plan(plan: Mapping[PluginKind, tuple[Constraints, Sequence[PluginConfig]]]) -> None:
    for kind, (constraints, configs) in plan.items():
        if isinstance(configs, (str, PluginConfig)) or not isinstance(configs, Sequence):
            raise PluginConfigError(f"{kind_label(kind)}s must be a sequence of PluginConfig")
        names: set[str] = set()
        for cfg in configs:
            if not isinstance(cfg, PluginConfig):
                raise PluginConfigError(f"expected PluginConfig, not {type(cfg).__name__}")
            try:
                check_selector_type(cfg.name)
            except InvalidIdentifierError as e:
                raise PluginConfigError(f"invalid plugin name: {e.message}") from e
            if not isinstance(cfg.config, Mapping):
                raise PluginConfigError(f"the config of {cfg.name!r} must be a table")
            if cfg.name in names:
                raise PluginConfigError(f"{kind_label(kind)} {cfg.name!r} is configured twice")
            names.add(cfg.name)
        constraints.check(kind, len(configs))


def _close_all(loaded: Sequence[_LoadedAny]) -> list[PluginCallError]:
    """Close in reverse load order; return (never drop) the errors."""
    errors: list[PluginCallError] = []
    for plugin in reversed(loaded):
        try:
            plugin.close()
        except PluginCallError as e:
            errors.append(e)
    return errors


class _Catalog:
    def __init__(self, loaded: Sequence[_LoadedAny]) -> None:
        self._loaded = tuple(loaded)
        self._closed = False

    @staticmethod
    def _load_plan(
        trust_domain: TrustDomain | str,
        plan: Mapping[PluginKind, tuple[Constraints, Sequence[PluginConfig]]],
    ) -> list[_LoadedAny]:
        _check_plan(plan)
        if not isinstance(trust_domain, TrustDomain):
            trust_domain = TrustDomain.parse(trust_domain)
        core = CoreConfig(trust_domain)
        loaded: list[_LoadedAny] = []
        try:
            for kind, (_, configs) in plan.items():
                for cfg in configs:
                    plugin = _construct(kind, cfg, core)
                    loaded.append(plugin)  # closed on failure from here on, configured or not
                    plugin.check()
                    plugin.configure(MappingProxyType(dict(cfg.config)))
        except BaseException as e:
            for close_error in _close_all(loaded):
                e.add_note(f"while cleaning up: {close_error.message}")
            raise
        return loaded

    def plugins(self) -> tuple[PluginInfo, ...]:
        """Name, kind, entry point and distribution of each loaded plugin, in load order."""
        return tuple(p.info for p in self._loaded)

    def close(self) -> None:
        """Close every plugin (reverse order); the first close error is raised, the
        others are attached to it as notes."""
        if self._closed:
            return
        self._closed = True
        errors = _close_all(self._loaded)
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"also: {other.message}")
            raise errors[0]

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_C = TypeVar("_C", bound=_Catalog)


class AgentCatalog(_Catalog):
    """An agent's plugins: exactly one node attestor (agent half), at least one
    workload attestor."""

    @classmethod
    def load(
        cls,
        trust_domain: TrustDomain | str,
        *,
        node_attestors: Sequence[PluginConfig],
        workload_attestors: Sequence[PluginConfig],
    ) -> AgentCatalog:
        return cls(
            cls._load_plan(
                trust_domain,
                {
                    "agent_node_attestor": (EXACTLY_ONE, node_attestors),
                    "workload_attestor": (AT_LEAST_ONE, workload_attestors),
                },
            )
        )

    @property
    def node_attestor(self) -> LoadedAgentNodeAttestor:
        return next(p for p in self._loaded if isinstance(p, LoadedAgentNodeAttestor))

    @property
    def workload_attestors(self) -> tuple[LoadedWorkloadAttestor, ...]:
        return tuple(p for p in self._loaded if isinstance(p, LoadedWorkloadAttestor))

    async def attest_workload(self, peer: PeerCredentials) -> tuple[Selector, ...]:
        """Every workload attestor's selectors for ``peer``, sorted, without repeats.

        Fails closed: one attestor's error fails the whole attestation (a caller
        with fewer selectors than it should have could match a broader entry).
        """
        found: set[Selector] = set()
        for attestor in self.workload_attestors:
            found.update(await attestor.attest(peer))
        return tuple(sorted(found))


class ServerCatalog(_Catalog):
    """A server's plugins: one or more node attestors (server halves)."""

    @classmethod
    def load(
        cls, trust_domain: TrustDomain | str, *, node_attestors: Sequence[PluginConfig]
    ) -> ServerCatalog:
        return cls(
            cls._load_plan(trust_domain, {"server_node_attestor": (AT_LEAST_ONE, node_attestors)})
        )

    def __init__(self, loaded: Sequence[_LoadedAny]) -> None:
        super().__init__(loaded)
        # Built once: attest_node looks its attestor up on every attestation.
        self._node_attestors: Mapping[str, LoadedServerNodeAttestor] = MappingProxyType(
            {p.name: p for p in self._loaded if isinstance(p, LoadedServerNodeAttestor)}
        )

    @property
    def node_attestors(self) -> Mapping[str, LoadedServerNodeAttestor]:
        return self._node_attestors

    async def attest_node(
        self, name: str, payload: bytes, challenge: Callable[[bytes], Awaitable[bytes]]
    ) -> NodeAttestationResult:
        """Attest an agent with the node attestor it named (``name`` comes from the
        agent, so an unknown one is a clear refusal)."""
        attestor = self._node_attestors.get(name) if isinstance(name, str) else None
        if attestor is None:
            raise AttestationExchangeError(
                f"no server node attestor named {name!r:.80} is configured"
            )
        return await attestor.attest(payload, challenge)


__all__ = [
    "AGENT_ID_PREFIX",
    "AT_LEAST_ONE",
    "EXACTLY_ONE",
    "MAX_AGENT_PATH_SEGMENTS",
    "MAX_ATTESTATION_MESSAGE_BYTES",
    "MAX_CHALLENGES",
    "MAX_SELECTORS_PER_CALL",
    "AgentCatalog",
    "AttestationExchangeError",
    "Constraints",
    "LoadedAgentNodeAttestor",
    "LoadedServerNodeAttestor",
    "LoadedWorkloadAttestor",
    "NodeAttestationResult",
    "PluginConfig",
    "ServerCatalog",
]
