"""``custos agent run``: the agent in the foreground until SIGTERM or SIGINT.

Logs go to stderr, one line per record (``time LEVEL logger: message``).  When the
Workload API listens, one line on stdout says so with the socket and the agent's
SPIFFE ID, for scripts and supervisors to wait on.  An agent that loses its own
identity for good (banned; evicted with a spent join token) stops with that error.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from custos._signals import stop_requested
from custos.agent.app import Agent
from custos.agent.config import AgentConfig

#: The first words of the line printed when the agent is ready.
READY_LINE = "custos agent ready"

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


def configure_logging(level: str = "info") -> None:
    """stderr, one text line per record, at *level* (debug | info | warning | error)."""
    logging.basicConfig(level=level.upper(), format=_LOG_FORMAT, stream=sys.stderr, force=True)


def ready_line(agent: Agent) -> str:
    return (
        f"{READY_LINE}: socket=unix://{agent.socket_path} spiffe_id={agent.node.identity.spiffe_id}"
    )


async def run_agent(
    config: AgentConfig, *, on_ready: Callable[[Agent], None] | None = None
) -> None:
    """Start, report ready, serve until SIGTERM/SIGINT (or until the agent loses its
    identity for good: that error is raised after a clean stop)."""
    async with stop_requested() as stopping, Agent(config) as agent:
        if on_ready is not None:
            on_ready(agent)
        stop = asyncio.ensure_future(stopping.wait())
        failed = asyncio.ensure_future(agent.wait_failed())
        try:
            await asyncio.wait((stop, failed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed.cancel()
        if failed.done() and not failed.cancelled():
            raise failed.result()
        log.info("stopping (signal received)")


__all__ = ["READY_LINE", "configure_logging", "ready_line", "run_agent"]
