"""Slow and hostile clients against the server's HTTP settings (server/limits.py), with raw
sockets: a request head sent a byte at a time, a silent connection, a dribbled body, a client
that never reads its stream, and an ambiguous body length. The app is a plain Starlette one:
the deadlines belong to the protocol, whatever the app."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402
from starlette.responses import PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from torchless.server import limits  # noqa: E402

from test_server import _free_port  # noqa: E402

HEADER, BODY, WRITE = 1.0, 1.5, 1.0
events: dict[str, list] = {"body": [], "chunks": []}


async def echo(request):
    try:
        body = await request.body()
    except ClientDisconnect:
        events["body"].append("disconnect")
        raise
    events["body"].append(len(body))
    return PlainTextResponse(f"got {len(body)}")


async def stream(request):
    async def chunks():
        while True:  # as the server's streams do, waiting on the engine between chunks
            events["chunks"].append(time.monotonic())
            yield b"x" * 65536
            await asyncio.sleep(0)
    return StreamingResponse(chunks())


housekeeping: list = []


@pytest.fixture(scope="module")
def base():
    app = Starlette(routes=[Route("/echo", echo, methods=["POST", "GET"]), Route("/stream", stream)])
    port = _free_port()
    config = limits.server_config(app, "127.0.0.1", port, header_timeout=HEADER, body_timeout=BODY,
                                  write_timeout=WRITE, log_level="error")
    assert isinstance(config.app, limits.Housekeeping)
    housekeeping[:] = [config.app]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def _connect(port) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic()
        data += chunk


def _response(sock: socket.socket) -> bytes:
    """One response with a content-length, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _dribble(sock, data: bytes, every: float) -> float | None:
    """Send data a byte at a time; return when the server closed the connection, or None."""
    for i in range(len(data)):
        try:
            sock.sendall(data[i:i + 1])
        except OSError:  # closed by the server (or by the test, once it has its answer)
            return time.monotonic()
        time.sleep(every)
    return None


REQUEST = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def test_a_normal_request_and_a_second_on_the_same_connection(base):
    with _connect(base) as s:
        for _ in range(2):
            s.sendall(REQUEST)
            reply = _response(s)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"got 5"), reply
            time.sleep(HEADER * 1.5)  # idle between requests is uvicorn's keep-alive (5 s), not the head's


def test_a_head_sent_a_byte_at_a_time_is_cut_off(base):
    with _connect(base) as s:
        start = time.monotonic()
        threading.Thread(target=_dribble, args=(s, REQUEST * 10, 0.1), daemon=True).start()
        data, closed = _read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data, data
    assert HEADER - 0.1 < closed - start < HEADER + 2


def test_a_silent_connection_is_closed(base):
    with _connect(base) as s:
        start = time.monotonic()
        data, closed = _read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408")
    assert closed - start < HEADER + 2


def test_a_slow_second_request_is_cut_off_too(base):
    with _connect(base) as s:
        s.sendall(REQUEST)
        assert _response(s).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        threading.Thread(target=_dribble, args=(s, REQUEST * 10, 0.1), daemon=True).start()
        data, closed = _read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert closed - start < HEADER + 2


def test_a_dribbled_body_is_cut_off(base):
    events["body"].clear()
    with _connect(base) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        start = time.monotonic()
        threading.Thread(target=_dribble, args=(s, b"y" * 1000, 0.05), daemon=True).start()
        data, closed = _read_until_closed(s)
    assert data == b""  # dropped: the handler saw a disconnect
    assert BODY - 0.1 < closed - start < BODY + 2
    deadline = time.monotonic() + 5
    while not events["body"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert events["body"] == ["disconnect"]


def test_a_client_that_never_reads_its_stream_is_dropped(base):
    events["chunks"].clear()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", base))
    try:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        start = time.monotonic()
        # the socket buffers fill first, then the write deadline runs; then the stream stops
        while time.monotonic() < start + WRITE + 10:
            time.sleep(0.5)
            if events["chunks"] and time.monotonic() - events["chunks"][-1] > 1:
                break
        assert events["chunks"] and time.monotonic() - events["chunks"][-1] > 1, \
            "the stream went on for a client that reads nothing"
        s.settimeout(10)
        try:  # the server has dropped the connection: what is left in the buffers, then the end
            while s.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
    finally:
        s.close()


def test_an_ambiguous_body_length_is_refused(base):
    with _connect(base) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        data, _ = _read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 400"), data


def test_a_client_gone_before_its_body_is_read_is_no_server_error(base):
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    events["body"].clear()
    try:
        with _connect(base) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while not events["body"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        logger.removeHandler(handler)
    assert events["body"] == ["disconnect"]
    assert errors == [], [r.getMessage() for r in errors]  # was "Exception in ASGI application" and a traceback


@pytest.mark.skipif(limits._malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_memory_is_handed_back_once_idle(base):
    keeper = housekeeping[0]
    time.sleep(keeper.idle_delay + 0.5)
    before = keeper.trims
    with _connect(base) as s:
        s.sendall(REQUEST)
        assert _response(s).startswith(b"HTTP/1.1 200")
    time.sleep(keeper.idle_delay + 0.5)
    assert keeper.trims == before + 1
    time.sleep(keeper.idle_delay + 0.5)
    assert keeper.trims == before + 1  # nothing served since: nothing to hand back
