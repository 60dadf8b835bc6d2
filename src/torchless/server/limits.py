"""How long a client may take: the HTTP settings `torchless serve` runs uvicorn with.

uvicorn's h11 protocol has a keep-alive timeout and nothing else: a client that sends its request
head one byte a second, opens a connection and says nothing, sends a body slowly, or stops reading
a stream holds its connection (and, for a stream, its place in the batch) for ever. `LimitedH11`
adds a deadline to each of these:

  head     the request line and headers must arrive within `header_timeout` seconds of the
           connection opening or of the first byte of the next request on it (408, then closed)
  body     the whole body within `body_timeout` seconds of the head (closed: the handler sees a
           disconnect)
  reading  a client that leaves our writes unread for `write_timeout` seconds is dropped (its
           request is cancelled like any disconnect)

h11 stays the parser, and a request that gives both Content-Length and Transfer-Encoding is
refused (400) rather than read one way when a proxy in front may read it the other. `Housekeeping` wraps the
app: a client that leaves before its body is read is not an error, and the heap freed after
hostile requests goes back to the system once the server is idle.
"""

from __future__ import annotations

import asyncio
import ctypes
import json

import h11
import uvicorn
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import TorchlessError

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
WRITE_TIMEOUT = 60.0
KEEP_ALIVE_TIMEOUT = 5  # idle between requests (uvicorn's own timer)
GRACEFUL_SHUTDOWN = 3  # in-flight streams get this long after SIGTERM


def _timeout_response() -> bytes:
    body = json.dumps({"error": {"message": "the request head did not arrive in time",
                                 "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))


class _StrictConnection(h11.Connection):
    """h11, refusing a request that gives both Content-Length and Transfer-Encoding: h11 would
    read it as chunked, and a proxy in front of us might read it the other way (smuggling)."""

    def next_event(self):
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding")
        return event


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with deadlines for the request head, the body and unread writes."""

    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    write_timeout = WRITE_TIMEOUT

    @classmethod
    def with_timeouts(cls, header: float = HEADER_TIMEOUT, body: float = BODY_TIMEOUT,
                      write: float = WRITE_TIMEOUT) -> type["LimitedH11"]:
        return type(cls.__name__, (cls,), dict(header_timeout=header, body_timeout=body, write_timeout=write))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn.__class__ = _StrictConnection  # made by uvicorn's __init__, with its size limit
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "head" or "body": what the deadline is for
        self._write_timer: asyncio.TimerHandle | None = None

    def _arm(self, what: str, seconds: float) -> None:
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None

    def _expired(self) -> None:
        what, self._deadline = self._waiting_for, None
        if self.transport.is_closing():
            return
        if what == "head":
            self.transport.write(_timeout_response())  # no response has started: h11 is bypassed
            self.transport.close()
        else:
            self.transport.abort()  # the handler is reading the body: it sees a disconnect

    def _track(self) -> None:
        """Keep the deadline in step with where the client is in its request."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._waiting_for != "head":
                self._arm("head", self.header_timeout)
        elif state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._arm("body", self.body_timeout)
        else:
            self._disarm()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm("head", self.header_timeout)  # a connection that says nothing is closed too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.transport.is_closing():
            self._track()

    def on_response_complete(self) -> None:
        # Between requests uvicorn's keep-alive timer runs; the next request's first byte
        # (data_received) arms the head deadline again.
        self._disarm()
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)


def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or not Linux)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class Housekeeping:
    """ASGI wrapper: a client gone before its body was read ends its request quietly, and once no
    request has been in flight for `idle_delay` seconds, freed heap goes back to the system.

    glibc keeps what it frees: tokenizing a 1 MB prompt that is then refused left the server
    ~110 MB larger for good (benchmarks/bench_hostile_server.py). malloc_trim hands it back
    (about 10 ms, outside the GIL, while nothing is being served)."""

    def __init__(self, app, idle_delay: float = 1.0):
        self.app, self.idle_delay = app, idle_delay
        self.in_flight, self.served_since_trim = 0, False
        self.trim = _malloc_trim()
        self.trims = 0  # how many times memory was handed back (for tests)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.in_flight += 1
        self.served_since_trim = True
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            pass  # nobody is left to answer, and nothing went wrong here
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self.trim is not None:
                asyncio.get_running_loop().call_later(self.idle_delay, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        if self.in_flight == 0 and self.served_since_trim:
            self.served_since_trim = False
            self.trims += 1
            asyncio.get_running_loop().run_in_executor(None, self.trim, 0)


def server_config(app, host: str, port: int, *, header_timeout: float = HEADER_TIMEOUT,
                  body_timeout: float = BODY_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                  log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration `torchless serve` runs."""
    protocol = LimitedH11.with_timeouts(header_timeout, body_timeout, write_timeout)
    return uvicorn.Config(Housekeeping(app), host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN)


def run(app, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT (uvicorn re-raises it once it has shut down)."""
    server = uvicorn.Server(server_config(app, host, port))
    server.run()
    if not server.started:  # uvicorn has logged why (e.g. the address is in use)
        raise TorchlessError(f"could not serve on {host}:{port}")
