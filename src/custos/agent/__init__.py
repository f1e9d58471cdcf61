"""The custos node agent (issue 9 builds its composition root on :mod:`custos.agent.client`).

Nothing here imports server code: the agent and the server meet only at the wire
(``custos._proto``) and at the shared value packages (identity, bundle, x509, wimse).
"""
