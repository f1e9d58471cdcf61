"""The ``join_token`` node attestor: a one-time secret an operator hands to a node.

The agent half (:mod:`.agent`) sends the secret; the server half (:mod:`.server`)
consumes it through the datastore and names the agent after the token's *id*
(``spiffe://TD/custos/agent/join_token/<token id>``), never after the secret.
The halves live in separate modules so a server imports only its own.
"""
