"""The agent's composition root: the one place that wires its parts together.

``async with Agent(config) as agent`` starts, in dependency order,

1. the plugin catalog (the node attestor, the workload attestors);
2. the custody stores, one per ``[custody.<tier>]`` table (and the store of the
   agent's own key when its tier is not one of them: ``memory`` by default);
3. the agent's own identity (:class:`~custos.agent.node.NodeIdentity`: restored
   from ``data_dir`` or attested);
4. the workload credentials (:mod:`custos.agent.workloads`: the entry stream,
   device keys, X.509-SVIDs and WITs, rotation) behind an
   :class:`~custos.agent.identities.IdentitySource`;
5. the Workload API on the Unix socket (:mod:`custos.agent.workload_api`);

and stops them newest first, also when a later part fails to start (a failed start
leaves no socket, task or open device behind, and raises one clear custos error).
Nothing else in the agent imports more than one of these parts.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from custos.agent.config import AgentConfig
from custos.agent.custody import Custody
from custos.agent.identities import WorkloadIdentities
from custos.agent.node import NodeIdentity, NodeIdentityError, ServerConnection
from custos.agent.workload_api.limits import WorkloadApiLimits
from custos.agent.workload_api.server import WorkloadApiServer, serve_workload_api
from custos.agent.workloads import WorkloadManager
from custos.errors import CustosError
from custos.keys import KeyStore, open_key_store
from custos.plugin import AgentCatalog

log = logging.getLogger(__name__)


class AgentStartError(CustosError):
    """The agent could not start (the message names the part)."""

    code = "agent_start"


class Agent:
    """A node agent built from ``config`` (see the module docstring)."""

    def __init__(self, config: AgentConfig) -> None:
        if not isinstance(config, AgentConfig):
            raise TypeError(f"Agent needs an AgentConfig, not {type(config).__name__}")
        self.config = config
        self._stack: contextlib.AsyncExitStack | None = None
        self._catalog: AgentCatalog | None = None
        self._custody: Custody | None = None
        self._node: NodeIdentity | None = None
        self._workloads: WorkloadManager | None = None
        self._wapi: WorkloadApiServer | None = None

    # ---- the parts ---------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.config.socket

    @property
    def node(self) -> NodeIdentity:
        if self._node is None:
            raise AgentStartError("the agent is not running")
        return self._node

    @property
    def identities(self) -> WorkloadIdentities:
        """What the Workload API serves (the workload credentials in hand)."""
        return self.workloads.identities

    @property
    def workloads(self) -> WorkloadManager:
        if self._workloads is None:
            raise AgentStartError("the agent is not running")
        return self._workloads

    @property
    def catalog(self) -> AgentCatalog:
        if self._catalog is None:
            raise AgentStartError("the agent is not running")
        return self._catalog

    @property
    def custody(self) -> Custody:
        if self._custody is None:
            raise AgentStartError("the agent is not running")
        return self._custody

    async def wait_failed(self) -> CustosError:
        """Returns (with the reason) when the agent can no longer serve: it lost its own
        identity for good (banned; evicted with a spent join token)."""
        return await self.node.wait_failed()

    # ---- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        if self._stack is not None:
            raise AgentStartError("the agent is already running")
        stack = contextlib.AsyncExitStack()
        self._stack = stack
        try:
            await self._start_parts(stack)
        except BaseException as e:
            self._stack = None
            try:
                await stack.aclose()
            except Exception as close_error:  # noqa: BLE001 - reported with the start error
                e.add_note(f"while stopping after the failed start: {close_error}")
            self._clear()
            if isinstance(e, OSError):
                raise AgentStartError(f"cannot start the agent: {e}") from e
            raise
        log.info(
            "agent %s serving the Workload API on %s",
            self.node.identity.spiffe_id,
            self.config.socket,
        )

    async def _start_parts(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        catalog = AgentCatalog.load(
            config.trust_domain,
            node_attestors=[config.node_attestor_plugin()],
            workload_attestors=config.workload_attestor_plugins(),
        )
        stack.callback(catalog.close)
        self._catalog = catalog

        custody = Custody.open({str(tier): c for tier, c in config.key_stores().items()})
        stack.push_async_callback(custody.close)
        self._custody = custody

        node = NodeIdentity(
            trust_domain=config.trust_domain,
            server=ServerConnection(
                address=config.server.address,
                server_name=config.server.server_name,
                bundle_file=config.server.bundle_file,
                insecure_bootstrap=config.server.insecure_bootstrap,
            ),
            attestor=catalog.node_attestor,
            store=self._agent_key_store(stack, custody),
            custody=config.agent_key_custody,
            data_dir=config.data_dir,
            jitter=config.rotation.jitter,
        )
        await node.start()
        stack.push_async_callback(node.stop)
        self._node = node

        workloads = WorkloadManager(
            node=node,
            custody=custody,
            data_dir=config.data_dir,
            jitter=config.rotation.jitter,
            residency=node.residency,
        )
        await workloads.start()
        stack.push_async_callback(workloads.stop)
        self._workloads = workloads

        self._wapi = await serve_workload_api(
            config.socket,
            identities=workloads.identities,
            catalog=catalog,
            limits=WorkloadApiLimits(**config.workload_api.model_dump()),
        )
        stack.push_async_callback(self._wapi.close)

    def _agent_key_store(self, stack: contextlib.AsyncExitStack, custody: Custody) -> KeyStore:
        """The store of the agent's own key: its tier's custody store, or (for the
        default ``memory`` tier when no ``[custody.memory]`` is configured) its own."""
        tier = self.config.agent_key_custody
        if tier == "memory":
            log.warning(
                "the agent's own key is in memory: after a restart the agent must attest "
                "again (a join token works once); give it a [custody.tpm] or "
                '[custody.pkcs11] table, or agent_key.custody = "exportable"'
            )
        if custody.offers(tier):
            return custody.store_for(tier)
        store = open_key_store(self.config.key_store(tier))
        stack.callback(store.close)
        return store

    async def stop(self) -> None:
        """Stop every part, newest first. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        self._clear()

    def _clear(self) -> None:
        self._catalog = self._custody = self._node = self._workloads = self._wapi = None

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


__all__ = ["Agent", "AgentStartError", "NodeIdentityError"]
