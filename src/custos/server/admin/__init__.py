"""The admin API (``custos.admin.v1``) on the server's Unix socket, and its client.

``serve_admin(ctx)`` starts it; ``AdminClient`` (custos.server.admin.client) is
what the ``custos entry|token|agent|bundle`` commands use.
"""

from custos.server.admin.server import AdminServer, AdminSocketError, PeerCredentials, serve_admin

__all__ = ["AdminServer", "AdminSocketError", "PeerCredentials", "serve_admin"]
