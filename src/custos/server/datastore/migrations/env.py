"""Alembic's entry point: runs on the connection :class:`Datastore` hands over
(``config.attributes["connection"]``); never reads an alembic.ini."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
