"""``custos dev``: a server and an attested agent in one process, for one machine.

What it builds (decision 0057 has the reasons):

- a server (:class:`custos.server.app.Server`) with SQLite and exportable signing keys
  under ``DATA_DIR/server``, its Agent API on a free loopback port, its admin socket at
  ``DATA_DIR/server/admin.sock``;
- a device for key custody: a software TPM (``swtpm``, provisioned with EK certificates
  under ``DATA_DIR/tpm``) when swtpm and the ``tpm`` extra are installed, else a SoftHSM2
  token (``DATA_DIR/softhsm``) when SoftHSM and the ``pkcs11`` extra are, else the agent's
  memory; :attr:`DevEnvironment.device` says which;
- an agent (:class:`custos.agent.app.Agent`), its own key in that device, its Workload
  API socket at ``DATA_DIR/agent.sock`` (or the ``socket`` given), attested
  - on swtpm by the ``tpm`` node attestor: the server trusts the EK certificate swtpm's
    local CA issued (``ek_ca_bundle`` = that CA's issuer and root certificates), the
    AK is activated against the EK, quoted, and certifies the agent's and the ``tpm``
    workload keys; the agent is ``spiffe://example.org/custos/agent/tpm/<EK sha256>``;
  - otherwise with a join token made on the spot;
- one entry per custody tier the agent has (the device's, ``memory``, ``exportable``) for
  the current user (``unix:uid:<uid>``): ``spiffe://example.org/dev/<tier>``.

Everything stops in reverse order when the ``async with`` block ends, the swtpm started
here included.  A data directory made here (none given) is removed; a given one keeps its
files for inspection and is started over on the next run (it carries a marker file; a
non-empty directory without it is refused rather than emptied).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from custos._signals import stop_requested
from custos.errors import CustosError

if TYPE_CHECKING:
    from custos.agent.app import Agent
    from custos.server.app import Server

log = logging.getLogger(__name__)

Device = Literal["tpm", "pkcs11", "memory"]
TRUST_DOMAIN = "example.org"
#: Written into a data directory ``custos dev`` made, so a later run may start it over.
MARKER = ".custos-dev"
#: How long the agent may take to hold a credential for every dev entry.
READY_TIMEOUT = 60.0
_MAX_SOCKET_PATH_BYTES = 107


class DevError(CustosError):
    """``custos dev`` could not set up or start its server, agent or device."""

    code = "dev_error"


@dataclass(frozen=True)
class DevEnvironment:
    """A running ``custos dev``: what a workload, an admin or a demo needs."""

    data_dir: Path
    socket_path: Path
    admin_socket: Path
    #: Where the agent's own key and the device-tier workload key live.
    device: Device
    #: One line saying what the device is (a TCTI, a token label, "agent memory").
    device_detail: str
    #: custody tier -> the SPIFFE ID of the dev entry in that tier.
    identities: dict[str, str]
    #: The node attestor that attested the agent: ``tpm`` on swtpm, else ``join_token``.
    attestor: str
    server: Server
    agent: Agent

    @property
    def env_lines(self) -> tuple[str, str]:
        """The two lines ``custos dev`` prints when ready (shell ``export`` syntax)."""
        return (
            f"SPIFFE_ENDPOINT_SOCKET=unix://{self.socket_path}",
            f"CUSTOS_ADMIN_SOCKET=unix://{self.admin_socket}",
        )


def pick_device() -> tuple[Device, str]:
    """The device ``custos dev`` keys go to: swtpm, else SoftHSM, else memory; with why."""
    tpm_tools = all(shutil.which(t) for t in ("swtpm", "swtpm_setup", "swtpm_localca"))
    if tpm_tools and importlib.util.find_spec("tpm2_pytss") is not None:
        return "tpm", "swtpm is installed"
    missing_tpm = "swtpm not installed" if not tpm_tools else "custos[tpm] not installed"
    from custos.testing import softhsm

    try:
        softhsm.find_module()
        has_hsm = shutil.which("softhsm2-util") is not None
    except CustosError:
        has_hsm = False
    if has_hsm and importlib.util.find_spec("pkcs11") is not None:
        return "pkcs11", f"{missing_tpm}; SoftHSM2 is"
    return "memory", f"{missing_tpm}; no SoftHSM2 with custos[pkcs11] either"


def _prepare_data_dir(data_dir: Path | None) -> tuple[Path, bool]:
    """The directory to build in, and whether it is ours to remove at the end."""
    if data_dir is None:
        # Short, under the system temp dir: Unix socket paths must fit in 107 bytes.
        return Path(tempfile.mkdtemp(prefix="custos-dev-")), True
    data_dir = data_dir.absolute()
    if data_dir.exists():
        if not data_dir.is_dir():
            raise DevError(f"--data-dir {data_dir}: not a directory")
        entries = list(data_dir.iterdir())
        if entries and not (data_dir / MARKER).is_file():
            raise DevError(
                f"--data-dir {data_dir}: not empty and not made by custos dev; "
                "give an empty or new directory"
            )
        # A previous run's state: custos dev always starts over (fresh server and TPM).
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    (data_dir / MARKER).write_text("made by custos dev; the next run empties this directory\n")
    return data_dir, False


def _check_socket_path(path: Path, what: str) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH_BYTES:
        raise DevError(f"{what} {path} is longer than 107 bytes: give a shorter --data-dir")


@dataclass(frozen=True)
class _DeviceSetup:
    """What a started device gives the configurations."""

    #: The ``[custody.<device>]`` TOML body ("" for memory).
    custody_table: str
    #: One line saying what the device is.
    detail: str
    #: The TCTI of a TPM device: the agent attests with the ``tpm`` attestor.
    tcti: str | None = None
    #: The EK CA certificate files the server's ``tpm`` attestor trusts.
    ek_ca_bundle: tuple[Path, ...] = ()


@contextlib.contextmanager
def _device(kind: Device, data_dir: Path) -> Iterator[_DeviceSetup]:
    """Start the device (stopped when the block ends)."""
    if kind == "tpm":
        from custos.testing import swtpm

        # tpm2-tss logs every expected NV miss at ERROR level; keep the terminal clean.
        os.environ.setdefault("TSS2_LOG", "esys+none,tcti+none")
        state = swtpm.provision(data_dir / "tpm")
        instance = swtpm.start_instance(state.root)
        try:
            yield _DeviceSetup(
                custody_table=f"tcti = {_quote(instance.tcti)}\n",
                detail=f"swtpm, TCTI {instance.tcti}",
                tcti=instance.tcti,
                ek_ca_bundle=tuple(state.ek_ca_certs),
            )
        finally:
            instance.stop()
    elif kind == "pkcs11":
        from custos.testing import softhsm

        conf = softhsm.write_config(data_dir / "softhsm")
        # SoftHSM reads its configuration at C_Initialize, from the environment only.
        os.environ["SOFTHSM2_CONF"] = str(conf)
        token = softhsm.init_token(softhsm.find_module(), conf, "custos-dev")
        body = f"pkcs11_module = {_quote(token.module)}\npkcs11_uri = {_quote(token.uri)}\n"
        yield _DeviceSetup(body, f"SoftHSM2 token {token.token_label!r}")
    else:
        yield _DeviceSetup("", "agent memory (no swtpm or SoftHSM2 here)")


def _quote(value: str) -> str:
    # A TOML basic string is a JSON string for the characters these values have.
    import json

    return json.dumps(value, ensure_ascii=True)


def _agent_toml(
    *, socket: Path, data_dir: Path, address: str, bundle_file: Path, token: str | None,
    device: Device, setup: _DeviceSetup,
) -> str:  # fmt: skip
    device_tables = f"[custody.{device}]\n{setup.custody_table}\n" if device != "memory" else ""
    if setup.tcti is not None:
        # The AK is kept with the agent's state: a restart re-attests with the same AK.
        attestor = (
            f"[node_attestor.tpm]\ntcti = {_quote(setup.tcti)}\n"
            f"ak_file = {_quote(str(data_dir / 'tpm-ak.pem'))}\n\n"
        )
    else:
        assert token is not None
        attestor = f"[node_attestor.join_token]\ntoken = {_quote(token)}\n\n"
    return (
        f"trust_domain = {_quote(TRUST_DOMAIN)}\n"
        f"socket = {_quote(str(socket))}\n"
        f"data_dir = {_quote(str(data_dir))}\n\n"
        f"[server]\naddress = {_quote(address)}\nbundle_file = {_quote(str(bundle_file))}\n\n"
        f"{attestor}"
        "[workload_attestors.unix]\n\n"
        f"{device_tables}[custody.memory]\n[custody.exportable]\n\n"
        f"[agent_key]\ncustody = {_quote(device)}\n"
    )


def _server_sections(setup: _DeviceSetup) -> dict[str, dict[str, object]]:
    """The server's ``[node_attestors.tpm]`` table on a TPM device: trust the EK
    certificates of the swtpm local CA that provisioned it (nothing else)."""
    if setup.tcti is None:
        return {}
    return {"node_attestors.tpm": {"ek_ca_bundle": [str(p) for p in setup.ek_ca_bundle]}}


def dev_tiers(device: Device) -> tuple[str, ...]:
    """The custody tiers the dev agent has, device first."""
    return (device, "memory", "exportable") if device != "memory" else ("memory", "exportable")


@contextlib.asynccontextmanager
async def dev_environment(
    data_dir: Path | None = None,
    socket: Path | None = None,
    *,
    device: Device | None = None,
) -> AsyncIterator[DevEnvironment]:
    """Run server + agent + device for the ``async with`` block (see the module doc).

    *device* forces one (``tpm`` needs swtpm, ``pkcs11`` SoftHSM2); by default
    :func:`pick_device` chooses.
    """
    from custos._proto import types_v1_pb2
    from custos.agent.app import Agent
    from custos.agent.config import agent_config_from_toml
    from custos.server.admin.client import AdminClient
    from custos.testing.server import ServerRig, running_server

    if device is None:
        device, why = pick_device()
    else:
        why = "asked for"
    base, ours = _prepare_data_dir(data_dir)
    socket_path = (socket or base / "agent.sock").absolute()
    try:
        _check_socket_path(socket_path, "the agent socket")
        with _device(device, base) as setup:
            rig = ServerRig(base / "server", trust_domain=TRUST_DOMAIN,
                            sections=_server_sections(setup))  # fmt: skip
            _check_socket_path(rig.admin_socket, "the admin socket")
            async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
                token = None
                if setup.tcti is None:
                    _, token = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
                bundle_file = base / "bundle.json"
                bundle = await asyncio.to_thread(srv.ctx.bundle)
                await asyncio.to_thread(bundle.save, bundle_file)
                config = agent_config_from_toml(
                    _agent_toml(
                        socket=socket_path, data_dir=base / "agent",
                        address=srv.agent_api_address, bundle_file=bundle_file, token=token,
                        device=device, setup=setup,
                    ),
                    source="custos dev agent config",
                )  # fmt: skip
                async with Agent(config) as agent:
                    parent = str(agent.node.identity.spiffe_id)
                    identities: dict[str, str] = {}
                    for tier in dev_tiers(device):
                        spiffe_id = f"spiffe://{TRUST_DOMAIN}/dev/{tier}"
                        await admin.create_entry(types_v1_pb2.Entry(
                            spiffe_id=spiffe_id, parent_id=parent, hint=tier,
                            selectors=[f"unix:uid:{os.getuid()}"], key_custody=tier,
                        ))  # fmt: skip
                        identities[tier] = spiffe_id
                    await wait_for_identities(agent, set(identities.values()))
                    yield DevEnvironment(
                        data_dir=base, socket_path=socket_path, admin_socket=rig.admin_socket,
                        device=device, device_detail=f"{setup.detail} ({why})",
                        identities=identities, attestor=config.node_attestor_plugin().name,
                        server=srv, agent=agent,
                    )  # fmt: skip
    finally:
        if ours:
            shutil.rmtree(base, ignore_errors=True)


async def wait_for_identities(agent: Agent, wanted: set[str]) -> None:
    """Until the agent serves a credential for every dev entry (bounded)."""
    seen = agent.identities.generation
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            while not wanted <= {str(i.spiffe_id) for i in agent.identities.all()}:
                seen = await agent.identities.wait_changed(seen)
    except TimeoutError:
        have = sorted(str(i.spiffe_id) for i in agent.identities.all())
        raise DevError(
            f"the agent did not get credentials for every dev entry within "
            f"{READY_TIMEOUT:.0f} s (has {have or 'none'}; see the log)"
        ) from None


async def run_dev(
    data_dir: Path | None = None,
    socket: Path | None = None,
    *,
    device: Device | None = None,
    on_ready: Callable[[DevEnvironment], None] | None = None,
) -> None:
    """``custos dev`` itself: start, call *on_ready(env)*, serve until SIGTERM/SIGINT
    (or until the agent loses its identity for good: that error is raised after a
    clean stop).  A signal during the start stops it there, cleaning up as well."""

    async def serve() -> None:
        async with dev_environment(data_dir, socket, device=device) as env:
            if on_ready is not None:
                on_ready(env)
            failed = await env.agent.wait_failed()
        raise failed

    async with stop_requested() as stopping:
        serving = asyncio.ensure_future(serve())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((serving, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not serving.done():
                log.info("stopping (signal received)")
                # Cancelling unwinds dev_environment: agent, server, then the device.
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
        if not serving.cancelled():
            serving.result()  # the agent's fatal error, or a failed start


__all__ = [
    "MARKER",
    "TRUST_DOMAIN",
    "DevEnvironment",
    "DevError",
    "dev_environment",
    "dev_tiers",
    "pick_device",
    "run_dev",
    "wait_for_identities",
]
