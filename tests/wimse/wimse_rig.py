"""Drive an ASGI app by hand (no server, no test client): for the middleware
tests that need exact control over the messages an app receives and sends."""

from __future__ import annotations

import asyncio
from typing import Any


def run_asgi(
    app: Any, scope: dict[str, Any], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Call ``app`` with ``messages`` as what the client sends; returns what it sent."""
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # a real server would wait for the client
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent
