"""Answers the client cannot use end in WorkloadApiResponseError, never a
traceback: a real grpclib server on a tmp socket (not the agent) that answers the
custos signing calls with broken messages."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.server import Server, Stream

from custos._proto import wimse_v1_pb2 as pb
from custos._proto.wimse_v1_grpc import WimseSigningBase
from custos.client import SyncWorkloadClient, WorkloadApiError, WorkloadApiResponseError


class Broken(WimseSigningBase):
    """Every answer is wrong in one way."""

    async def FetchWIT(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(pb.FetchWITResponse(spiffe_id="spiffe://example.org/a",
                                                      wit="not-a-jws"))

    async def SignWPT(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(pb.SignWPTResponse(spiffe_id="not an id", wit="a.b.c",
                                                     wpt=""))

    async def SignHttpRequest(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(pb.SignedHttpMessage())

    async def SignHttpResponse(self, stream: Stream[Any, Any]) -> None:
        raise NotImplementedError

    async def FetchX509Chain(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(pb.FetchX509ChainResponse(
            spiffe_id="spiffe://example.org/a", x509_svid=b"\x30\x82\xff\xffjunk", bundle=b""))

    async def Ping(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(pb.PingResponse())


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "broken.sock"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Server:
        server = Server([Broken()])  # made in its loop: grpclib binds the running one
        await server.start(path=str(path))
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"unix://{path}"

    async def close() -> None:
        server.close()
        await server.wait_closed()

    asyncio.run_coroutine_threadsafe(close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_unusable_answers_are_one_error(broken: str) -> None:
    with SyncWorkloadClient(broken, timeout=10) as client:
        client.ping()
        for call in (client.fetch_wit, lambda: client.sign_wpt("https://b.example/"),
                     client.fetch_x509_chain):
            with pytest.raises(WorkloadApiResponseError) as e:
                call()
            assert e.value.code == "workload_api_bad_response"
        # A handler that fails on the other side: a status, still one error.
        from custos.wimse.http.message import HttpMessage

        request = HttpMessage.request("GET", "/")
        with pytest.raises(WorkloadApiError) as e2:
            client.sign_http_response(HttpMessage.response(200), request)
        assert e2.value.code.startswith("workload_api_")
