"""Many small GETs from one thread: asyncio connections instead of one thread per request.

Measured on a 2-core node (see the README's performance section): with a thread per request
every small file costs dozens of GIL hand-offs (futex calls), and those threads take CPU
from everything else on the node. One event loop driving kept-alive connections does the
same work with a fraction of the CPU.

This is a fast path only. `fetch_many` gives `on_body` each response that is a plain `200`
with a `Content-Length` body of the expected size; anything else (another status, a reset,
a timeout, a chunked or oversized body) goes to `on_fallback`, and the caller fetches that
file again through `HttpClient`, with its retries, backoff and error mapping. Nothing here
retries, sleeps or decides what an error means. Secrets: targets are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # a response head longer than this is not a blob download


@dataclass(frozen=True)
class Get:
    """One request of the batch: `target` is the path and query (it may hold a SAS)."""

    item: Any  # the caller's object, handed back to on_body / on_fallback
    target: str
    headers: Mapping[str, str]
    size: int


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int


@dataclass(frozen=True)
class Failure:
    """Why a request left the fast path: a short, secret-free reason, the status if one came back,
    and the server's Retry-After in seconds if it sent one."""

    why: str
    status: int | None = None
    retry_after: str | None = None


class _Failed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.why)
        self.failure = failure


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.expect = 0
        self.head_done = False
        self.keep_alive = True
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail("connection closed")

    def _fail(self, why: str | Failure) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(_Failed(why if isinstance(why, Failure) else Failure(why)))

    def send(self, request: bytes, expect: int) -> asyncio.Future[bytes]:
        assert self.transport is not None
        self.buf.clear()
        self.head_done = False
        self.expect = expect
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.keep_alive = False  # bytes nobody asked for: do not reuse this connection
            return
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._fail("response head too long")
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            del self.buf[: end + 4]
            self.head_done = True
            why = self._check_head(head)
            if why is not None:
                self.keep_alive = False
                self._fail(why)
                return
        if len(self.buf) > self.expect:
            self.keep_alive = False
            self._fail("longer body than listed")
        elif len(self.buf) == self.expect:
            self.waiter.set_result(bytes(self.buf))

    def _check_head(self, head: str) -> Failure | None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("connection", "").lower() == "close":
            self.keep_alive = False
        if len(parts) < 2 or parts[1] != "200":
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
            return Failure(f"status {status}", status, fields.get("retry-after"))
        if "transfer-encoding" in fields:
            return Failure("chunked body")
        length = fields.get("content-length", "")
        if not length.isdigit() or int(length) != self.expect:
            return Failure("unexpected length")
        return None


def fetch_many(endpoint: Endpoint, gets: list[Get], *, connections: int, read_timeout: float,
               on_body: Callable[[Get, bytes], None], on_fallback: Callable[[Get, Failure], float],
               stop: threading.Event, ssl_context: Any = None) -> None:
    """GET every request of `gets` over up to `connections` kept-alive connections to `endpoint`.

    `on_body` and `on_fallback` run in this thread, one at a time; `on_fallback` returns how long
    the failed connection's worker pauses before its next request (a backoff, as a thread that
    retried would wait). When `stop` is set, requests not yet sent are dropped (neither callback
    is called for them). Safe to call again.
    """
    if gets:
        asyncio.run(_run(endpoint, gets, connections, read_timeout, on_body, on_fallback, stop, ssl_context))


async def _run(endpoint: Endpoint, gets: list[Get], connections: int, read_timeout: float,
               on_body: Callable[[Get, bytes], None], on_fallback: Callable[[Get, Failure], float],
               stop: threading.Event, ssl_context: Any) -> None:
    pending = list(reversed(gets))
    host_header = endpoint.host if endpoint.port in (80, 443) else f"{endpoint.host}:{endpoint.port}"
    if endpoint.scheme == "https" and ssl_context is None:
        import ssl

        ssl_context = ssl.create_default_context()

    async def connect() -> _Connection:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(loop.create_connection(
            _Connection, endpoint.host, endpoint.port,
            ssl=ssl_context if endpoint.scheme == "https" else None), read_timeout)
        return proto

    async def worker() -> None:
        conn: _Connection | None = None
        while pending and not stop.is_set():
            get = pending.pop()
            request = (f"GET {get.target} HTTP/1.1\r\nHost: {host_header}\r\n"
                       + "".join(f"{k}: {v}\r\n" for k, v in get.headers.items()) + "\r\n").encode("latin-1")
            try:
                if conn is None or conn.lost or not conn.keep_alive:
                    if conn is not None and conn.transport is not None:
                        conn.transport.close()
                    conn = await connect()
                body = await asyncio.wait_for(conn.send(request, get.size), read_timeout)
            except (_Failed, OSError, asyncio.TimeoutError) as err:
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                conn = None
                pause = on_fallback(get, err.failure if isinstance(err, _Failed) else Failure(type(err).__name__))
                if pause > 0:
                    await asyncio.sleep(pause)
                continue
            on_body(get, body)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(max(1, min(connections, len(gets))))))
