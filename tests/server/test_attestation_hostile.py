"""Hostile ``AttestAgent`` streams (hypothesis): random and garbled requests, messages in
the wrong order, oversized fields within gRPC's limits, bytes that are not protobuf at
all.  Every stream ends with a clean status (never UNKNOWN or INTERNAL, never a
traceback in the server's log), nothing is written, and the server keeps serving.

One server runs for the whole module in a background thread (starting one per
example would dominate the run); each example opens its own channel with the client
library, and every client call of the module runs on one event loop (``runner``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpclib.const import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.grpcio_channel import grpcio_channel, status_of
from custos._proto import agent_v1_pb2, types_v1_pb2
from custos.agent.client.attest import make_csr
from custos.agent.client.errors import AgentApiError
from custos.keys import KeyStoreConfig, open_key_store
from custos.server.app import Server
from custos.testing.server import ServerRig, running_server

from .test_attestation import ACME_SECTIONS, install_acme, raw_attest

LIMIT = 64 * 1024
CLEAN = {
    Status.OK,
    Status.INVALID_ARGUMENT,
    Status.PERMISSION_DENIED,
}


class BackgroundServer:
    """A rig server on its own event loop in a thread."""

    def __init__(self, rig: ServerRig) -> None:
        self.rig = rig
        self.srv: Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        try:
            async with running_server(self.rig) as srv:
                self.srv = srv
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._ready.set()
                await self._stop.wait()
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            self._error = e
            self._ready.set()

    def __enter__(self) -> Server:
        self._thread.start()
        self._ready.wait(60)
        if self.srv is None:
            raise RuntimeError(f"the server did not start: {self._error!r}")
        return self.srv

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    site = tmp_path_factory.mktemp("site")
    install_acme(site)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.syspath_prepend(str(site))
    rig = ServerRig.create(sections=ACME_SECTIONS)
    try:
        with BackgroundServer(rig) as srv:
            yield srv
    finally:
        monkeypatch.undo()
        rig.destroy()


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    """One client event loop for the whole module.  ``asyncio.run`` per example made a
    new loop each time while grpc.aio's poller stays bound to the process: it then
    called into loops already closed and logged ``RuntimeError: Event loop is closed``
    (a traceback the checks below rightly count as a failure)."""
    with asyncio.Runner() as loop:
        yield loop


@pytest.fixture(scope="module")
def csr() -> bytes:
    keys = open_key_store(KeyStoreConfig(store="memory"))
    keys.create("hostile")
    return make_csr(keys.get("hostile"))


def channel_for(srv: Server) -> grpc.aio.Channel:
    return grpcio_channel(
        srv.agent_api_address,
        bundle=srv.ctx.bundle(),
        server_name=srv.ctx.config.agent_api.dns_name,
    )


def big(n: int) -> bytes:
    return b"\x30" * n


sizes = st.one_of(st.binary(max_size=256), st.integers(LIMIT - 1, LIMIT + 2048).map(big))
names = st.one_of(
    st.sampled_from(["join_token", "acme_challenge", "acme_once", "", "tpm"]),
    st.text(max_size=300),
)


@st.composite
def starts(draw: st.DrawFn, valid_csr: bytes) -> agent_v1_pb2.AttestAgentRequest:
    attestor = draw(names)
    payload = draw(
        st.one_of(sizes, st.sampled_from([b"node1", b'{"v":1,"token":"x"}', b"n\xffode"]))
    )
    csr = draw(st.one_of(st.just(valid_csr), sizes))
    custody = types_v1_pb2.KeyCustody(
        tier=draw(
            st.one_of(st.sampled_from(["tpm", "memory", "exportable"]), st.text(max_size=40))
        ),
        tpm_certify_info=draw(st.one_of(st.just(b""), sizes)),
        tpm_certify_signature=draw(st.one_of(st.just(b""), sizes)),
    )
    return agent_v1_pb2.AttestAgentRequest(
        start=agent_v1_pb2.AttestationStart(
            attestor=attestor,
            payload=payload,
            key=agent_v1_pb2.AgentKeyRequest(csr=csr, custody=custody),
        )
    )


def streams(valid_csr: bytes) -> st.SearchStrategy[list[agent_v1_pb2.AttestAgentRequest]]:
    message = st.one_of(
        starts(valid_csr),
        st.builds(lambda b: agent_v1_pb2.AttestAgentRequest(challenge_response=b), sizes),
        st.just(agent_v1_pb2.AttestAgentRequest()),
    )
    return st.lists(message, max_size=4)


class _ServerLog(logging.Handler):
    """What the server said about each call: every record with a traceback (a crash)
    and the status of every refusal (``agent_api_refused status=... code=...``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.tracebacks: list[logging.LogRecord] = []
        self.statuses: set[str] = set()
        #: (status, code) of every refusal, in order.
        self.refusals: list[tuple[str, str]] = []
        self._last: logging.LogRecord | None = None

    def handle(self, record: logging.LogRecord) -> bool:
        # Attached to a logger and to the root it propagates to: each record once.
        if record is self._last:
            return False
        self._last = record
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.levelno >= logging.ERROR:
            self.tracebacks.append(record)
        message = record.getMessage()
        if message.startswith("agent_api_refused status="):
            words = message.split()
            self.statuses.add(words[1].removeprefix("status="))
            self.refusals.append((words[1].removeprefix("status="), words[2].removeprefix("code=")))


@pytest.fixture
def server_log() -> Iterator[_ServerLog]:
    handler = _ServerLog()
    loggers = [logging.getLogger(), logging.getLogger("custos.server.agent_api")]
    level = loggers[1].level
    loggers[1].setLevel(logging.INFO)
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)
    loggers[1].setLevel(level)


def clean(error: AgentApiError | None) -> bool:
    """A status the server may end a hostile stream with (grpcio's local INTERNAL for
    a write that raced the server's refusal is retried by ``raw_attest``)."""
    return error is None or error.status in CLEAN


def outcome(runner: asyncio.Runner, srv: Server, requests: list[Any]) -> AgentApiError | None:
    async def send() -> AgentApiError | None:
        async with channel_for(srv) as channel:
            try:
                await raw_attest(channel, requests)
            except AgentApiError as e:
                return e
            return None

    return runner.run(send())


def test_random_attestation_streams_end_with_a_clean_status(
    server: Server, csr: bytes, server_log: _ServerLog, runner: asyncio.Runner
) -> None:
    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests=streams(csr))
    def check(requests: list[agent_v1_pb2.AttestAgentRequest]) -> None:
        error = outcome(runner, server, requests)
        assert clean(error), error

    check()
    assert server_log.tracebacks == []
    assert server_log.statuses  # the server did refuse (and said so)
    assert server_log.statuses <= {s.name for s in CLEAN}, server_log.statuses
    # Nothing a random stream sent could attest an agent.
    assert server.ctx.datastore.agents.list() == []


def test_bytes_that_are_not_an_attest_request_end_cleanly(
    server: Server, server_log: _ServerLog, runner: asyncio.Runner
) -> None:
    async def send(frames: list[bytes]) -> AgentApiError | None:
        async with channel_for(server) as channel:
            call = channel.stream_stream("/custos.agent.v1.Attestation/AttestAgent")(timeout=10)
            try:
                for frame in frames:
                    await call.write(frame)
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
            except Exception:  # noqa: BLE001 - grpc raises several types once a call has ended
                pass
            code = await call.code()
            if code is grpc.StatusCode.OK:
                return None
            return AgentApiError.from_status(status_of(code), await call.details() or "")

    # grpc does not answer undecodable bytes by itself: grpcio deserializes inside
    # context.read(), in our handler, which turns DecodeError into attestation_protocol.
    # So every call below is answered by our handler, with exactly this status and code.
    for frames, code in (
        ([b"\xff\xff\xff"], "attestation_protocol"),
        ([b"\x0a\x05\x0a\x03abc", b"\x12"], "attestor_unknown"),  # a start naming "abc"
        ([b"\x0a" * 1000], "attestation_protocol"),
    ):
        seen = len(server_log.refusals)
        error = runner.run(send(frames))
        # The server's own answer, from its log (it logs before it ends the call).
        assert server_log.refusals[seen:] == [("INVALID_ARGUMENT", code)], frames
        assert error is not None, frames
        if error.status is Status.INTERNAL and len(frames) > 1:
            # The one client-side exception (see clean()): the server ended the call
            # while the client was still writing its second frame, and grpcio reported
            # the failed write locally; the server's answer was checked just above.
            assert error.code == "agent_api_internal", error
        else:
            assert (error.status, error.code) == (Status.INVALID_ARGUMENT, code)
    assert server_log.tracebacks == []


def test_the_server_still_attests_after_the_hostile_streams(
    server: Server, csr: bytes, runner: asyncio.Runner
) -> None:
    async def attest() -> list[agent_v1_pb2.AttestAgentResponse]:
        _, secret = await asyncio.to_thread(server.ctx.datastore.join_tokens.create, 600)
        payload = b'{"v":1,"token":"' + secret.encode() + b'"}'
        request = agent_v1_pb2.AttestAgentRequest(
            start=agent_v1_pb2.AttestationStart(
                attestor="join_token",
                payload=payload,
                key=agent_v1_pb2.AgentKeyRequest(
                    csr=csr, custody=types_v1_pb2.KeyCustody(tier="memory")
                ),
            )
        )
        async with channel_for(server) as channel:
            return await raw_attest(channel, [request])

    [response] = runner.run(attest())
    assert response.WhichOneof("step") == "result"
