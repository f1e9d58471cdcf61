"""The custody tiers this node offers: one key store per ``[custody.<tier>]`` table.

A registration entry names the tier its workload key lives in (``tpm``, ``pkcs11``,
``memory``, ``exportable``; DESIGN decision 1).  :class:`Custody` opens the store of
every configured tier once (``custos.keys.open_key_store``) and hands it out by tier:
:meth:`Custody.store_for` for the synchronous calls (a WPT signed in a worker thread),
:meth:`Custody.async_store_for` for the event loop (``custos.keys.aio.AsyncKeyStore``:
one call per device at a time, in a worker thread, so a TPM never blocks the loop).
A tier the node does not offer is a :class:`CustodyTierMissingError`, never a
fallback to another tier: an entry that asks for ``tpm`` must not quietly get a
software key.

A table's ``store`` must be its tier (``[custody.tpm]`` is a ``store = "tpm"``
store): the tier is a promise to the relying party about where the key is held.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from custos.agent.client.attest import CUSTODY_TIERS
from custos.errors import CustosError
from custos.keys import AsyncKeyStore, KeyStore, KeyStoreConfig, open_key_store

log = logging.getLogger(__name__)


class CustodyError(CustosError):
    """A custody tier could not be configured or opened."""

    code = "custody_config"


class CustodyTierMissingError(CustodyError):
    """An entry asks for a custody tier this node does not offer."""

    code = "custody_tier_missing"


class Custody:
    """The node's custody tiers and their key stores (owned: :meth:`close` closes them).

    Build it with :meth:`open` from the configuration, or from stores already open
    (tests, ``custos dev``)."""

    def __init__(self, stores: Mapping[str, KeyStore]) -> None:
        for tier, store in stores.items():
            _check_tier(tier, store.kind)
        self._stores = dict(stores)
        self._async = {tier: AsyncKeyStore(store) for tier, store in self._stores.items()}
        self._closed = False

    @classmethod
    def open(cls, configs: Mapping[str, KeyStoreConfig]) -> Custody:
        """Open the store of every ``[custody.<tier>]`` table; on any failure the
        stores already opened are closed and the error names the tier."""
        stores: dict[str, KeyStore] = {}
        try:
            for tier, config in configs.items():
                _check_tier(tier, config.store)
                try:
                    stores[tier] = open_key_store(config)
                except CustosError as e:
                    raise CustodyError(f"custody.{tier}: {e.message}", code=e.code) from e
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        return cls(stores)

    @property
    def tiers(self) -> frozenset[str]:
        return frozenset(self._stores)

    def offers(self, tier: str) -> bool:
        return tier in self._stores

    def store_for(self, tier: str) -> KeyStore:
        """The key store of ``tier``; :class:`CustodyTierMissingError` when the node
        does not offer it."""
        store = self._stores.get(tier)
        if store is None:
            raise _missing(tier, self.tiers)
        return store

    def async_store_for(self, tier: str) -> AsyncKeyStore:
        """The asyncio facade over :meth:`store_for`'s store (one per tier)."""
        facade = self._async.get(tier)
        if facade is None:
            raise _missing(tier, self.tiers)
        return facade

    async def close(self) -> None:
        """Close every store (waiting for a device call in flight). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for tier, facade in self._async.items():
            try:
                await facade.close()
            except CustosError as e:  # one device's failure must not keep the others open
                log.warning("closing the %s key store failed: %s", tier, e.message)

    def __repr__(self) -> str:
        return f"Custody(tiers={sorted(self._stores)})"


def _check_tier(tier: str, store_kind: str) -> None:
    if tier not in CUSTODY_TIERS:
        raise CustodyError(
            f"custody.{tier[:40]}: unknown custody tier (one of {', '.join(CUSTODY_TIERS)})"
        )
    if store_kind != tier:
        raise CustodyError(
            f"custody.{tier}: the store must be {tier!r} (a tier is where the key is held), "
            f"not {store_kind!r}"
        )


def _missing(tier: str, offered: frozenset[str]) -> CustodyTierMissingError:
    return CustodyTierMissingError(
        f"this node offers no {tier[:40]!r} custody tier "
        f"(it offers: {', '.join(sorted(offered)) or 'none'})"
    )


__all__ = ["Custody", "CustodyError", "CustodyTierMissingError"]
