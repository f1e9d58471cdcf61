"""The DNS names of the servers that share this database (decision 0055).

The Agent API's TLS certificate carries ``agent_api.dns_name``, and agents check
it, so no workload may hold a certificate with any server's name. Servers on one
database may be configured with different names: each records its own at start
(:meth:`ServerNameRepository.record`), and every check reads them all. A name
stays recorded when its server goes away (a retired name refused is harmless; a
forgotten one could be handed to a workload).
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from custos.server.datastore.database import transaction
from custos.server.datastore.schema import server_names


def normal_dns_name(name: str) -> str:
    """A DNS name as names are compared: lower case, no final dot."""
    return name.lower().removesuffix(".")


class ServerNameRepository:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(self, dns_name: str) -> None:
        """Record a server's DNS name (idempotent; safe when servers race)."""
        name = normal_dns_name(dns_name)
        if name in self.names():
            return
        try:
            with transaction(self._engine) as conn:
                conn.execute(insert(server_names).values(dns_name=name, recorded_at=time.time()))
        except IntegrityError:
            pass  # another server recorded it between the read and the insert

    def names(self) -> frozenset[str]:
        """Every recorded server DNS name (normalised)."""
        with transaction(self._engine, read_only=True) as conn:
            return frozenset(conn.execute(select(server_names.c.dns_name)).scalars())


__all__ = ["ServerNameRepository", "normal_dns_name"]
