"""What the middleware and client tests share: one example.org trust domain
whose issuer key is "ca" (kid "ca-1") in a memory store, WITs it mints, a
call counter for apps, and a way to drive an ASGI app by hand."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from custos.bundle import USE_WIT_SVID, BundleSet, JwtAuthority, TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.keys import MemoryKeyStore
from custos.keys.jose import joserfc_key
from custos.wimse.wit import mint_wit

TD = TrustDomain.parse("example.org")


def ca_bundles(store: MemoryKeyStore) -> BundleSet:
    """The example.org bundle: the store's "ca" key as its one WIT authority."""
    authority = JwtAuthority("ca-1", store.get("ca").public_key(), use=USE_WIT_SVID)  # type: ignore[arg-type]
    return BundleSet([TrustBundle(TD, jwt_authorities=(authority,))])


def mint_example_wit(
    store: MemoryKeyStore, subject: SpiffeId, key: str, now: float | None = None
) -> str:
    """A 10-minute WIT for ``subject``, binding the store's key ``key``, signed by "ca"."""
    return mint_wit(
        joserfc_key(store.get("ca")),
        "ES256",
        "ca-1",
        subject,
        store.public_jwk(key),
        timedelta(minutes=10),
        now=now,
    )


class Calls:
    """How many times an app's handlers ran (a refused request must not run one)."""

    def __init__(self) -> None:
        self.n = 0


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
