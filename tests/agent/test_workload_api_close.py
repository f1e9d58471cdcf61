"""Closing the Workload API: open connections are closed, not left served; streams
end and in-flight calls finish with a status (decision 0076)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from grpclib.client import Channel, UnaryStreamMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from test_workload_api import SPIFFE_MD, X509, Rig, make_rig, plugin_site  # noqa: F401

from custos._proto import wimse_v1_pb2 as wpb
from custos._proto import workload_pb2 as pb
from custos._proto.wimse_v1_grpc import WimseSigningStub

#: Longer than any of this: a call still waiting then is a hang.
HANG = 10.0


def close_in_rig(rig: Rig, grace: float) -> float:
    """Close the rig's server (on its own loop) and say how long that took."""
    start = time.monotonic()
    rig.run(lambda: rig.server.close(grace=grace))
    return time.monotonic() - start


def test_close_ends_streams_answers_in_flight_calls_and_closes_idle_connections(
    plugin_site: Path, tmp_path: Path,  # noqa: F811
) -> None:
    with make_rig(tmp_path) as rig:
        rig.publish(rig.serve("e1", "spiffe://example.org/a"))
        outcome: dict[str, object] = {}

        async def go() -> None:
            streaming, idle, busy = (Channel(path=str(rig.socket)) for _ in range(3))
            try:
                # A stream that has had its first message and waits for updates.
                method = UnaryStreamMethod(streaming, X509, pb.X509SVIDRequest,
                                           pb.X509SVIDResponse)
                async with method.open(metadata=SPIFFE_MD, timeout=HANG) as stream:
                    await stream.send_message(pb.X509SVIDRequest(), end=True)
                    assert (await stream.recv_message()) is not None
                    # An idle connection that has been used once.
                    await WimseSigningStub(idle).Ping(wpb.PingRequest(), timeout=HANG)
                    # A unary call held in attestation (the test attestor's gate).
                    _gate, entered = rig.gate()
                    call = asyncio.create_task(WimseSigningStub(busy).SignWPT(
                        wpb.SignWPTRequest(audience="https://b.example/"), timeout=HANG))
                    await asyncio.to_thread(lambda: asyncio.run_coroutine_threadsafe(
                        entered.wait(), rig._loop).result(HANG))

                    # The client waits on its stream, as a workload does.
                    async def wait_for_the_end() -> None:
                        assert (await stream.recv_message()) is None  # no more messages
                        await stream.recv_trailing_metadata()  # raises for the status

                    waiting = asyncio.create_task(wait_for_the_end())
                    outcome["close"] = await asyncio.to_thread(close_in_rig, rig, 0.5)

                    # The stream ends with a status (not a hang, not a reset).
                    with pytest.raises(GRPCError) as ended:
                        await asyncio.wait_for(waiting, HANG)
                    outcome["stream"] = ended.value.status
                # The held call got a status too (its grace ran out).
                with pytest.raises(GRPCError) as held:
                    await asyncio.wait_for(call, HANG)
                outcome["held"] = held.value.status
                # The idle connection is closed: a new call on it is not served.
                with pytest.raises((StreamTerminatedError, ConnectionError, GRPCError, OSError)):
                    await asyncio.wait_for(
                        WimseSigningStub(idle).Ping(wpb.PingRequest()), HANG)
            finally:
                for c in (streaming, idle, busy):
                    c.close()

        asyncio.run(go())
        assert outcome["stream"] is Status.UNAVAILABLE
        assert outcome["held"] is Status.UNAVAILABLE
        assert isinstance(outcome["close"], float) and outcome["close"] < 0.5 + 5
        assert not rig.socket.exists()


def test_a_call_that_finishes_within_the_grace_gets_its_answer(
    plugin_site: Path, tmp_path: Path,  # noqa: F811
) -> None:
    with make_rig(tmp_path) as rig:
        rig.publish(rig.serve("e1", "spiffe://example.org/a", custody="memory"))

        async def go() -> wpb.SignWPTResponse:
            channel = Channel(path=str(rig.socket))
            try:
                gate, entered = rig.gate()
                call = asyncio.create_task(WimseSigningStub(channel).SignWPT(
                    wpb.SignWPTRequest(audience="https://b.example/"), timeout=HANG))
                await asyncio.to_thread(lambda: asyncio.run_coroutine_threadsafe(
                    entered.wait(), rig._loop).result(HANG))
                closing = asyncio.create_task(asyncio.to_thread(close_in_rig, rig, 5.0))
                await asyncio.sleep(0.3)
                assert not closing.done()  # waiting for the call in flight
                rig.soon(gate.set)
                reply = await asyncio.wait_for(call, HANG)
                took = await asyncio.wait_for(closing, HANG)
                assert took < 5.0  # it did not wait out the whole grace
                return reply
            finally:
                channel.close()

        reply = asyncio.run(go())
        assert reply.wpt and reply.spiffe_id == "spiffe://example.org/a"


def test_a_new_call_after_close_began_is_unavailable(
    plugin_site: Path, tmp_path: Path,  # noqa: F811
) -> None:
    with make_rig(tmp_path) as rig:
        rig.publish(rig.serve("e1", "spiffe://example.org/a", custody="memory"))

        async def go() -> Status | None:
            holder, other = Channel(path=str(rig.socket)), Channel(path=str(rig.socket))
            try:
                await WimseSigningStub(other).Ping(wpb.PingRequest(), timeout=HANG)
                gate, entered = rig.gate()
                held = asyncio.create_task(WimseSigningStub(holder).SignWPT(
                    wpb.SignWPTRequest(audience="https://b.example/"), timeout=HANG))
                await asyncio.to_thread(lambda: asyncio.run_coroutine_threadsafe(
                    entered.wait(), rig._loop).result(HANG))
                closing = asyncio.create_task(asyncio.to_thread(close_in_rig, rig, 3.0))
                await asyncio.sleep(0.3)
                # While close waits for the held call, the open connection gets no service.
                try:
                    await WimseSigningStub(other).Ping(wpb.PingRequest(), timeout=HANG)
                    status: Status | None = None
                except GRPCError as e:
                    status = e.status
                rig.soon(gate.set)
                await asyncio.wait_for(held, HANG)
                await asyncio.wait_for(closing, HANG)
                return status
            finally:
                holder.close()
                other.close()

        assert asyncio.run(go()) is Status.UNAVAILABLE


def test_close_twice_is_harmless(plugin_site: Path, tmp_path: Path) -> None:  # noqa: F811
    with make_rig(tmp_path) as rig:
        close_in_rig(rig, 0.1)
        close_in_rig(rig, 0.1)
    # (make_rig closes it a third time.)
