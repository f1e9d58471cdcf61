"""SIGTERM / SIGINT as an :class:`asyncio.Event`, for the foreground commands
(``custos server run``, ``custos agent run``, ``custos dev``): one copy of the
handler set-up and its removal."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@asynccontextmanager
async def stop_requested() -> AsyncIterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT while the block runs; the handlers are
    removed when it ends, however it ends."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    try:
        yield stopping
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
