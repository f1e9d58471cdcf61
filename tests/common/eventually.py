"""Waiting, in a test, for a value that another task or process sets a moment later."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable


async def eventually(read: Callable[[], object], timeout: float = 5.0) -> object:
    """``read()`` once it is truthy (a server metric is counted after the reply has
    left: the agent's client, grpclib, can see the reply first). ``read`` may be a
    coroutine function: a read over HTTP from a server on this loop must not block it."""

    async def value_now() -> object:
        value = read()
        return await value if inspect.isawaitable(value) else value

    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await value_now()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return value
