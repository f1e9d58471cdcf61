"""Issue 9, faults: a TPM that disappears under a running agent, behind a resource
manager as in production.

swtpm alone has no resource manager (three object slots, global transient
handles), so these tests run it behind tpm2-abrmd on a private D-Bus
(:mod:`custos.testing.abrmd`), the way production runs behind ``/dev/tpmrm0``.
The agent here is its Workload API server (the rig of test_workload_api.py) serving
an identity whose key is in a :class:`custos.keys.tpm.TpmKeyStore` on the tabrmd
TCTI; workloads call it over the Unix socket with grpclib.

Not repeated from tests/keys/test_tpm.py (the store on a bare swtpm: device loss and
recovery, threads signing while it dies, an unseen restart never flushing another
client's objects): here it is what a *workload* sees over the socket, with tpm2-abrmd
between the agent and the TPM, and two processes sharing the TPM at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from test_workload_api import ME, Rig, make_rig, plugin_site, signing  # noqa: F401
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

from custos._proto import types_v1_pb2
from custos._proto import wimse_v1_pb2 as wpb
from custos._proto.wimse_v1_grpc import WimseSigningStub
from custos.agent.app import Agent
from custos.agent.config import agent_config_from_toml
from custos.agent.identities import WorkloadIdentity
from custos.agent.workload_api import WorkloadApiLimits
from custos.dev import (
    TRUST_DOMAIN,
    _agent_toml,
    _DeviceSetup,
    _quote,
    _server_sections,
    wait_for_identities,
)
from custos.keys.tpm import TpmKeyStore
from custos.server.admin.client import AdminClient
from custos.testing import abrmd
from custos.testing.server import ServerRig, running_server
from custos.testing.swtpm import copy_state, lockout_counter, shared_template
from custos.wimse.http.message import HttpMessage
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.wit import WitVerifier
from custos.wimse.wpt import WptVerifier, wpt_headers

# No skip when the packages are missing: make test installs them, and a skip would
# hide a failure in CI (as for swtpm and SoftHSM).
assert abrmd.available(), f"the tpm2-abrmd rig needs {abrmd.DEBIAN_PACKAGES} (make deps)"

SID = "spiffe://example.org/tpm-workload"
#: How long a call to a vanished TPM may take before it counts as a hang.
PROMPT = 5.0


# -- the rig: dbus-daemon + tpm2-abrmd + swtpm, one per module ------------------------------


def _shared_dir(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def rm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[abrmd.AbrmdRig]:
    """swtpm behind tpm2-abrmd on a private session bus; DBUS_SESSION_BUS_ADDRESS is
    set in this process while the module runs (the tabrmd TCTI string cannot carry
    the bus address: its only keys are bus_name and bus_type)."""
    template = shared_template(_shared_dir(tmp_path_factory))
    state = copy_state(template, tmp_path_factory.mktemp("abrmd") / "state")
    rig = abrmd.start_rig(state.root)
    try:
        with rig.bus.activate():
            yield rig
    finally:
        rig.close()


@pytest.fixture
def device_up(rm: abrmd.AbrmdRig) -> Iterator[abrmd.AbrmdRig]:
    """The rig with its swtpm running, before and after the test (tests kill it).

    custos' keys are noDA (custos.tpm.templates.CREATE_ATTRIBUTES), so these device
    losses never count towards a lockout; test_three_device_losses_in_a_row_do_not_
    lock_the_keys_out shows it, so nothing here resets the counter.
    """
    rm.tpm.start()
    if not rm.abrmd.running or rm.abrmd.wedged():
        rm.abrmd.restart()  # a test's device loss wedged it (decision 0075)
    yield rm
    rm.tpm.start()
    assert rm.abrmd.running, f"tpm2-abrmd exited ({rm.abrmd.returncode}) with the device"


@pytest.fixture
def store(device_up: abrmd.AbrmdRig, tmp_path: Path) -> Iterator[TpmKeyStore]:
    s = TpmKeyStore(tcti=device_up.tcti, key_dir=tmp_path / "tpm-keys", loaded_key_cache=2)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def served(plugin_site: Path, tmp_path: Path,  # noqa: F811
           store: TpmKeyStore) -> Iterator[tuple[Rig, WorkloadIdentity]]:
    # Rate limits out of the way: eight workloads retrying on UNAVAILABLE would hit
    # the per-uid default (test_workload_api.py tests the limits themselves).
    with make_rig(tmp_path, WorkloadApiLimits(requests_per_second=100_000, burst=100_000)) as rig:
        identity = rig.authority.identity(store, "e1", SID, "tpm", [ME])
        rig.publish(identity)
        yield rig, identity


def transient_handles(tcti: str) -> list[int]:
    with ESAPI(tcti) as ectx:
        _more, cap = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        return [int(h) for h in cap.data.handles]


def sign_wpt(rig: Rig, audience: str) -> wpb.SignWPTResponse:
    return signing(rig, lambda s: s.SignWPT(wpb.SignWPTRequest(audience=audience),
                                            timeout=30))


def verifier(rig: Rig) -> WptVerifier:
    return WptVerifier(rig.authority.bundle, audiences=["https://b.example"],
                       replay=MemoryReplayCache())


def check(v: WptVerifier, reply: wpb.SignWPTResponse, path: str) -> None:
    caller = v.verify(HttpMessage.request("GET", path, wpt_headers(reply.wit, reply.wpt)))
    assert str(caller.subject) == SID


def settle() -> None:
    """Let tpm2-abrmd swap the last caller's objects out before the TPM is killed.

    It does so *after* answering (``TPM2_ContextSave``), and a TPM lost while it
    waits for that answer wedges tpm2-abrmd 3.0.0 for good (decision 0075,
    :meth:`custos.testing.abrmd.Abrmd.wedged`). The sequential tests kill the
    TPM between calls, not inside the daemon's own bookkeeping; the concurrent
    test below kills it at a random moment and copes with a wedged daemon.
    """
    time.sleep(0.2)


def timed_status(rig: Rig, audience: str) -> tuple[Status, str | None, float]:
    start = time.monotonic()
    with pytest.raises(GRPCError) as e:
        sign_wpt(rig, audience)
    return e.value.status, e.value.message, time.monotonic() - start


# -- a device that disappears ---------------------------------------------------------------


def test_a_vanished_tpm_is_unavailable_at_once_and_the_agent_signs_again_when_it_returns(
    served: tuple[Rig, WorkloadIdentity], rm: abrmd.AbrmdRig,
) -> None:
    rig, identity = served
    v = verifier(rig)
    check(v, sign_wpt(rig, "https://b.example/before"), "/before")

    settle()
    rm.tpm.kill()  # SIGKILL: the TPM is gone, tpm2-abrmd is still there
    for n in range(3):  # the failure, then the reconnect attempts: each prompt
        status, message, took = timed_status(rig, f"https://b.example/gone{n}")
        assert status is Status.UNAVAILABLE
        assert message == "signing key unavailable"  # generic: the log has the TPM error
        assert took < PROMPT
    # The agent keeps running: what needs no device is still served.
    wit = signing(rig, lambda s: s.FetchWIT(wpb.FetchWITRequest()))
    assert wit.wit == identity.wit
    chain = signing(rig, lambda s: s.FetchX509Chain(wpb.FetchX509ChainRequest()))
    assert chain.spiffe_id == SID
    assert rm.abrmd.running

    # Same state directory: same owner seed, same primary, so the key file (a
    # TSS2 PRIVATE KEY under that primary) loads again; same key, same WIT.
    rm.tpm.start()
    for n in range(3):
        reply = sign_wpt(rig, f"https://b.example/after{n}")
        assert reply.wit == identity.wit
        check(v, reply, f"/after{n}")


def test_a_tpm_restarted_between_two_calls_is_met_with_a_signature(
    served: tuple[Rig, WorkloadIdentity], rm: abrmd.AbrmdRig, store: TpmKeyStore,
) -> None:
    """A restart no call saw fail: the primary and key tpm2-abrmd had saved for the
    agent belong to a TPM reset that is over; the agent re-creates them and signs."""
    rig, _ = served
    v = verifier(rig)
    check(v, sign_wpt(rig, "https://b.example/one"), "/one")
    settle()
    rm.tpm.restart()  # graceful stop and start: TPM2_Startup(CLEAR) again
    reply = sign_wpt(rig, "https://b.example/two")
    check(v, reply, "/two")
    assert [k.name for k in store.list()] == ["wl-e1-1"]  # no key lost or doubled


def test_eight_workloads_signing_while_the_tpm_dies_and_returns(
    served: tuple[Rig, WorkloadIdentity], rm: abrmd.AbrmdRig,
) -> None:
    """Every call either returns a WPT that verifies or UNAVAILABLE, promptly; none
    hangs, none gets another status; after the TPM is back, every workload signs."""
    rig, _ = served
    v = verifier(rig)
    phase = {"killed": False, "back": False}
    outcomes: dict[str, int] = {"ok_before": 0, "unavailable": 0, "ok_after": 0}
    bad: list[str] = []
    wedged: list[bool] = []

    async def workload(i: int, channel: Channel) -> None:
        stub = WimseSigningStub(channel)
        n = after = 0
        while after < 10:
            n += 1
            back = phase["back"]
            start = time.monotonic()
            try:
                reply = await stub.SignWPT(
                    wpb.SignWPTRequest(audience=f"https://b.example/w{i}/{n}"), timeout=30)
            except GRPCError as e:
                took = time.monotonic() - start
                if e.status is not Status.UNAVAILABLE or not phase["killed"] or took > PROMPT:
                    bad.append(f"w{i}/{n}: {e.status.name} {e.message} after {took:.1f}s")
                    return
                outcomes["unavailable"] += 1
                await asyncio.sleep(0.01)
                continue
            check(v, reply, f"/w{i}/{n}")
            if back:
                after += 1
                outcomes["ok_after"] += 1
            elif not phase["killed"]:
                outcomes["ok_before"] += 1

    # The rig's processes are started on this (the main) thread, not in
    # asyncio.to_thread: their parent-death signal is tied to the creating
    # *thread*, and an executor thread that ends would take them with it.
    async def run() -> None:
        channels = [Channel(path=str(rig.socket)) for _ in range(8)]
        try:
            tasks = [asyncio.create_task(workload(i, c)) for i, c in enumerate(channels)]
            await asyncio.sleep(0.5)
            phase["killed"] = True
            rm.tpm.kill()
            await asyncio.sleep(0.5)
            rm.tpm.start()  # on this thread: see below
            phase["back"] = True
            # A TPM lost while tpm2-abrmd waited on its own ContextSave wedges the
            # daemon (decision 0075): the agent answers UNAVAILABLE throughout, and
            # restarting the daemon (an operator's remedy: it does not exit) brings it back.
            for _ in range(30):
                if outcomes["ok_after"] or rm.abrmd.wedged():
                    break
                await asyncio.sleep(0.1)
            if not outcomes["ok_after"] and rm.abrmd.wedged():
                wedged.append(True)
                rm.abrmd.restart()
            done, pending = await asyncio.wait(tasks, timeout=120)
            assert not pending, "a workload hung after the TPM came back"
            for t in done:
                t.result()
        finally:
            for c in channels:
                c.close()

    asyncio.run(run())
    assert bad == []
    assert outcomes["ok_before"] > 0 and outcomes["unavailable"] > 0
    assert outcomes["ok_after"] >= 8 * 10
    if wedged:
        print("tpm2-abrmd wedged by the device loss and was restarted (decision 0075)")


def test_the_resource_manager_itself_restarting_is_survived_too(
    served: tuple[Rig, WorkloadIdentity], rm: abrmd.AbrmdRig,
) -> None:
    """tpm2-abrmd (as the kernel's tpmrm would never, but a daemon may) goes away:
    UNAVAILABLE promptly, and signatures again once it is back on the bus."""
    rig, _ = served
    v = verifier(rig)
    check(v, sign_wpt(rig, "https://b.example/a"), "/a")
    rm.abrmd.stop()
    try:
        status, _, took = timed_status(rig, "https://b.example/b")
        assert status is Status.UNAVAILABLE and took < PROMPT
    finally:
        rm.abrmd.start()
    reply = None
    for n in range(3):  # the TCTI reconnects on the next call
        try:
            reply = sign_wpt(rig, f"https://b.example/c{n}")
            check(v, reply, f"/c{n}")
            break
        except GRPCError as e:
            assert e.status is Status.UNAVAILABLE
            time.sleep(0.2)
    assert reply is not None


def test_three_device_losses_in_a_row_do_not_lock_the_keys_out(
    served: tuple[Rig, WorkloadIdentity], rm: abrmd.AbrmdRig,
) -> None:
    rig, _ = served
    v = verifier(rig)
    for n in range(3):
        check(v, sign_wpt(rig, f"https://b.example/loss{n}"), f"/loss{n}")
        settle()
        rm.tpm.kill()
        rm.tpm.start()
    counter = lockout_counter(rm.tpm.tcti)
    try:
        reply = sign_wpt(rig, "https://b.example/after")
    except GRPCError as e:
        # What the workload sees of it: generic UNAVAILABLE (the log has TPM_RC_LOCKOUT).
        if e.status is not Status.UNAVAILABLE or counter < 3 or rm.abrmd.wedged():
            raise RuntimeError(f"not the lockout: {e.status} counter {counter}") from None
        raise AssertionError(f"locked out after {counter} device losses") from None
    check(v, reply, "/after")


# -- the whole agent: its own key in the TPM too -------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: not under pytest's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="custos-df-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_running_agent_rides_out_a_device_loss_with_its_own_key_in_the_tpm(
    device_up: abrmd.AbrmdRig, short_dir: Path,
) -> None:
    """The real agent (server, tpm node attestation, agent key and workload keys in the
    TPM, all behind tpm2-abrmd): the TPM goes away, workloads get UNAVAILABLE at once
    and their WITs still; it comes back, the same key signs again, and the agent's own
    key works again too (a new entry needs a call to the server signed with it)."""
    rm = device_up
    first_id, second_id = f"spiffe://{TRUST_DOMAIN}/df/a", f"spiffe://{TRUST_DOMAIN}/df/b"
    me = [f"unix:uid:{os.getuid()}"]
    socket_path = short_dir / "agent.sock"

    async def sign(spiffe_id: str, n: int) -> wpb.SignWPTResponse:
        channel = Channel(path=str(socket_path))
        try:
            return await WimseSigningStub(channel).SignWPT(
                wpb.SignWPTRequest(spiffe_id=spiffe_id, audience=f"https://b.example/{n}"),
                timeout=30)
        finally:
            channel.close()

    async def main() -> None:
        setup = _DeviceSetup(custody_table=f"tcti = {_quote(rm.tcti)}\n",
                             detail="swtpm behind tpm2-abrmd", tcti=rm.tcti,
                             ek_ca_bundle=tuple(rm.tpm.ek_ca_certs))
        rig = ServerRig(short_dir / "server", trust_domain=TRUST_DOMAIN,
                        sections=_server_sections(setup))
        async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
            bundle_file = short_dir / "bundle.json"
            bundle = await asyncio.to_thread(srv.ctx.bundle)
            await asyncio.to_thread(bundle.save, bundle_file)
            config = agent_config_from_toml(_agent_toml(
                socket=socket_path, data_dir=short_dir / "agent",
                address=srv.agent_api_address, bundle_file=bundle_file, token=None,
                device="tpm", setup=setup))
            async with Agent(config) as agent:
                assert config.node_attestor_plugin().name == "tpm"
                parent = str(agent.node.identity.spiffe_id)
                await admin.create_entry(types_v1_pb2.Entry(
                    spiffe_id=first_id, parent_id=parent, selectors=me, key_custody="tpm"))
                await wait_for_identities(agent, {first_id})
                before = await sign(first_id, 0)

                await asyncio.sleep(0.2)  # settle(): see above
                rm.tpm.kill()
                for n in range(1, 4):
                    start = time.monotonic()
                    with pytest.raises(GRPCError) as lost:
                        await sign(first_id, n)
                    assert lost.value.status is Status.UNAVAILABLE
                    assert time.monotonic() - start < PROMPT
                channel = Channel(path=str(socket_path))
                try:
                    wit = await WimseSigningStub(channel).FetchWIT(
                        wpb.FetchWITRequest(spiffe_id=first_id), timeout=30)
                finally:
                    channel.close()
                assert wit.wit == before.wit

                rm.tpm.start()  # on this (the main) thread: see the eight-workload test
                after = await sign(first_id, 10)
                assert after.wit == before.wit  # the same key, the same credential

                # The agent's own key signs its calls to the server again.
                await admin.create_entry(types_v1_pb2.Entry(
                    spiffe_id=second_id, parent_id=parent, selectors=me, key_custody="tpm"))
                await wait_for_identities(agent, {first_id, second_id})
                verify = WptVerifier(
                    wit_verifier=WitVerifier(agent.identities.bundle(), profile="spiffe"),
                    audiences=["https://b.example"], replay=MemoryReplayCache())
                for spiffe_id, reply, n in ((first_id, after, 10),
                                            (second_id, await sign(second_id, 11), 11)):
                    caller = verify.verify(HttpMessage.request(
                        "GET", f"/{n}", wpt_headers(reply.wit, reply.wpt)))
                    assert str(caller.subject) == spiffe_id

    asyncio.run(main())


# -- two processes on one TPM through the resource manager ----------------------------------

_OTHER_PROCESS = textwrap.dedent(
    """
    import sys, time
    from custos.keys.tpm import TpmKeyStore

    tcti, key_dir, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = TpmKeyStore(tcti=tcti, key_dir=key_dir, loaded_key_cache=3)
    try:
        names = [f"other-{i}" for i in range(3)]
        for name in names:
            store.create(name, "ES256")
        count, end = 0, time.monotonic() + seconds
        while time.monotonic() < end or count < 30:
            name = names[count % 3]
            msg = f"{name}-{count}".encode()
            sig = store.sign(name, msg)
            assert len(sig) == 64, sig
            count += 1
        print(count)
    finally:
        store.close()
    """
)


def test_two_processes_sign_on_one_tpm_at_once_through_the_resource_manager(
    served: tuple[Rig, WorkloadIdentity], rm: abrmd.AbrmdRig, tmp_path: Path,
) -> None:
    """The agent keeps a primary and up to two keys loaded; another process keeps a
    primary and three — eight objects, where swtpm alone holds three. Through
    tpm2-abrmd each connection has its own slots: both sign throughout, and the TPM
    holds no transient object of either once they are done."""
    rig, _ = served
    v = verifier(rig)
    script = tmp_path / "other.py"
    script.write_text(_OTHER_PROCESS)
    other = subprocess.Popen(
        [sys.executable, str(script), rm.tcti, str(tmp_path / "other-keys"), "2.0"],
        env=rm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    signed = 0
    try:
        deadline = time.monotonic() + 60
        while other.poll() is None and time.monotonic() < deadline:
            check(v, sign_wpt(rig, f"https://b.example/n{signed}"), f"/n{signed}")
            signed += 1
        out, err = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert other.returncode == 0, err[-2000:]
    assert int(out.split()[-1]) >= 30
    assert signed >= 10
    # Behind the resource manager, an idle client holds nothing in the TPM itself:
    # tpm2-abrmd context-saves every object between commands (just after it answers,
    # so the last one may take a moment).
    deadline = time.monotonic() + 5
    while (left := transient_handles(rm.tpm.tcti)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []
