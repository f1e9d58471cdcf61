"""Source text of the test plugins (installed by tests as module ``acme_plugins``).

They behave as their configuration says, so each test states the behaviour it
needs in the catalog configuration, exactly as an operator would configure a
real plugin.  ``EVENTS`` records configure/close calls by the ``tag`` setting.
"""

PLUGINS = """
from custos.identity.selector import Selector
from custos.plugin import AttestedNode, Challenge

EVENTS = []


class Base:
    def configure(self, config, core):
        self.tag = config.get("tag", "?")
        self.config = dict(config)
        self.core = core
        EVENTS.append(("configure", self.tag))
        if config.get("fail_configure"):
            raise RuntimeError("configure failed on purpose: " + self.tag)

    def close(self):
        EVENTS.append(("close", getattr(self, "tag", "?")))
        if getattr(self, "config", {}).get("fail_close"):
            raise OSError("close failed on purpose")


class Workload(Base):
    async def attest(self, peer):
        if self.config.get("raise"):
            raise ValueError("plugin failure on purpose")
        if self.config.get("forge"):
            return [Selector("unix", "uid:0")]
        return self.config.get("values", ["uid:%d" % peer.uid])


class ServerNode(Base):
    supports_reattestation = True

    async def attest(self, payload):
        rounds = self.config.get("rounds", 1)
        for i in range(rounds):
            answer = yield Challenge(b"nonce-%d-" % i + payload)
            if answer != (b"nonce-%d-" % i + payload)[::-1]:
                raise ValueError("wrong answer")
        yield AttestedNode(
            agent_path=self.config.get("agent_path", ["host-1"]),
            selectors=["payload:" + payload.decode()],
            attestation_key=self.config.get("attestation_key", b""),
        )


class BadReattest(ServerNode):
    supports_reattestation = "yes"


class NotAPlugin:
    pass
"""

AGENT_HALF = """
from acme_plugins import Base


class AgentNode(Base):
    async def attestation_flow(self):
        challenge = yield self.config.get("payload", "node-a").encode()
        while True:
            challenge = yield challenge[::-1]
"""

ENTRY_POINTS = """
[custos.workload_attestors]
acme_one = acme_plugins:Workload
acme_two = acme_plugins:Workload
acme_three = acme_plugins:Workload
evil = acme_plugins:Workload
broken = acme_plugins:NotAPlugin

[custos.agent.node_attestors]
acme_node = acme_agent_half:AgentNode

[custos.server.node_attestors]
acme_node = acme_plugins:ServerNode
acme_other = acme_plugins:ServerNode
acme_bad = acme_plugins:BadReattest
"""
