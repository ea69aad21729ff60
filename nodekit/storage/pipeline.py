"""Many GETs over a few kept-alive connections, HTTP/1.1-pipelined: the fast path for small files.

Measured against Azurite on a 2-core node (README, performance): a server spends less work
on requests that arrive several at a time on one connection (fewer reads, fewer wake-ups),
and the client spends less on a few connections than on a thread per request. Sending up to
`depth` requests before reading the first response cut the emulator's CPU per small blob by
about 30% and nodekit's wall time with it. HTTP/1.1 requires a server to answer pipelined
requests in order (RFC 9112, section 9.3.2); each request also carries an
`x-ms-client-request-id`, which Azure storage echoes, and a 200 whose echo names another
request ends pipelining for the run (`depth` 1 from then on) instead of being trusted.

This is a fast path only. `fetch_pipelined` streams a response body to the caller's
`Receiver` when it is a `200` of exactly the listed size; anything else (another status, a
reset, a timeout, a body of another length) goes to `on_fallback`, and the caller fetches
that file again through `HttpClient`, with its retries, backoff and error mapping. Requests
that were sent behind a failed one are sent again on a new connection (GETs are idempotent).
Nothing here retries a failed request itself or decides what an error means. Secrets:
targets (which hold a SAS) are never logged or put into a Failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any, Protocol

from nodekit.storage.wire import ERROR_BODY_MAX, Broken, Connection, Endpoint, KeptConnections

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 8  # requests in flight on one connection (--pipeline)


@dataclass(frozen=True)
class Get:
    """One request: `target` is the path and query (it may hold a SAS: never log it)."""

    item: Any  # the caller's object, handed back to the receiver and to on_fallback
    target: str
    headers: Mapping[str, str]
    size: int
    auth: Callable[[], Mapping[str, str]] | None = None  # headers made when the request is sent (a token)


@dataclass(frozen=True)
class Failure:
    """Why a request left the fast path: a short, secret-free reason, the status if one came back,
    and the server's Retry-After value if it sent one."""

    why: str
    status: int | None = None
    retry_after: str | None = None


class Body(Protocol):
    """Where one response body goes, in order; `finish` or `discard` ends it."""

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...

    def discard(self) -> None: ...


class Receiver(Protocol):
    def open(self, get: Get) -> Body: ...


def _ignore(_: memoryview) -> None:
    return None


class _Run:
    """One call of fetch_pipelined: the shared queue and the workers' settings."""

    def __init__(self, endpoint: Endpoint, gets: list[Get], depth: int, read_timeout: float,
                 receiver: Receiver, on_fallback: Callable[[Get, Failure], float], stop: threading.Event) -> None:
        self.endpoint = endpoint
        self.queue: deque[Get] = deque(gets)
        self.depth = depth
        self.read_timeout = read_timeout
        self.receiver = receiver
        self.on_fallback = on_fallback
        self.stop = stop
        self.lock = threading.Lock()  # around on_fallback and the depth change
        self.ids = count()
        self.host = endpoint.host_header
        self.token = f"nodekit-{time.time_ns():x}"
        self.errors: list[Exception] = []

    def fallback(self, get: Get, failure: Failure) -> float:
        with self.lock:
            return self.on_fallback(get, failure)

    def request(self, get: Get) -> tuple[bytes, str]:
        rid = f"{self.token}-{next(self.ids)}"
        head = [f"GET {get.target} HTTP/1.1", f"Host: {self.host}", f"x-ms-client-request-id: {rid}"]
        headers = {**get.headers, **get.auth()} if get.auth is not None else get.headers
        head += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), rid

    def worker(self) -> None:
        try:
            self._work()
        except Exception as err:  # a bug (a Body raised): stop the run and let the caller report it
            log.exception("unexpected error in a download connection")
            self.errors.append(err)
            self.stop.set()

    def _work(self) -> None:
        conn: Connection | None = None
        inflight: deque[tuple[Get, str]] = deque()
        resume = 0.0  # no new request before this monotonic time (a backoff after a failure)
        try:
            while not self.stop.is_set():
                if conn is None:
                    if not self.queue:
                        return
                    try:
                        conn = Connection(self.endpoint, self.read_timeout)
                    except OSError as err:
                        get = self._pop()
                        if get is None:
                            return
                        self.stop.wait(self.fallback(get, Failure(f"connect: {type(err).__name__}")))
                        continue
                if time.monotonic() >= resume:
                    self._send_more(conn, inflight)
                if not inflight:
                    if not self.queue:
                        return
                    self.stop.wait(max(0.0, resume - time.monotonic()))
                    continue
                try:
                    pause, close = self._receive(conn, *inflight[0])
                except Broken as err:
                    conn.close()
                    get, _ = inflight.popleft()
                    if err.started or conn.answered == 0:
                        resume = time.monotonic() + self.fallback(get, Failure(err.why))
                    else:
                        self.queue.appendleft(get)  # closed between responses (idle or a server's limit)
                    conn = None
                    self._requeue(inflight)
                    continue
                inflight.popleft()
                conn.answered += 1
                if pause:
                    resume = time.monotonic() + pause
                if close:  # the server said it closes the connection after this response
                    conn.close()
                    conn = None
                    if inflight:  # those requests were sent in vain; a server that closes early gets one at a time
                        with self.lock:
                            self.depth = 1
                        self._requeue(inflight)
        finally:
            if conn is not None:
                conn.close()

    def _pop(self) -> Get | None:
        try:
            return self.queue.popleft()
        except IndexError:
            return None

    def _requeue(self, inflight: deque[tuple[Get, str]]) -> None:
        """Put requests that were sent but not answered back at the front of the queue, in order."""
        while inflight:
            self.queue.appendleft(inflight.pop()[0])

    def _send_more(self, conn: Connection, inflight: deque[tuple[Get, str]]) -> None:
        batch = []
        while len(inflight) < self.depth:
            get = self._pop()
            if get is None:
                break
            data, rid = self.request(get)
            batch.append(data)
            inflight.append((get, rid))
        if batch:
            try:
                conn.sock.sendall(b"".join(batch))
            except OSError:
                pass  # the connection is gone: the next read says so, and the requests are sent again

    def _receive(self, conn: Connection, get: Get, rid: str) -> tuple[float, bool]:
        """Read one response: (seconds to wait before sending more, whether the server closes now)."""
        status, _, fields = conn.head()
        if status != 200:
            for _ in conn.pieces("GET", status, fields, ERROR_BODY_MAX):  # read past it, keeping the connection
                pass
            if status in (429, 503):  # throttled: send fewer requests ahead from now on (halved each time)
                with self.lock:
                    self.depth = max(1, self.depth // 2)
            failure = Failure(f"status {status}", status, fields.get("retry-after"))
            return self.fallback(get, failure), not conn.reusable
        closing = not conn.reusable
        echoed = fields.get("x-ms-client-request-id")
        if echoed is not None and echoed != rid:
            with self.lock:
                if self.depth > 1:
                    log.warning("the storage endpoint answered pipelined requests out of order: "
                                "pipelining is off for the rest of this run")
                self.depth = 1
            raise Broken("response for another request", True)
        length = fields.get("content-length", "")
        if "transfer-encoding" in fields or not length.isdigit():
            raise Broken("body without a length", True)
        if int(length) != get.size:
            if int(length) > ERROR_BODY_MAX:
                raise Broken("unexpected length", True)
            conn.body(int(length), _ignore)
            return self.fallback(get, Failure("unexpected length", status)), closing
        body = self.receiver.open(get)
        try:
            conn.body(get.size, body.write)
        except BaseException:
            body.discard()
            raise
        body.finish()
        return 0.0, closing


def fetch_pipelined(endpoint: Endpoint, gets: list[Get], *, connections: int, depth: int, read_timeout: float,
                    receiver: Receiver, on_fallback: Callable[[Get, Failure], float], stop: threading.Event) -> None:
    """GET every request of `gets` over up to `connections` connections, `depth` requests in flight on each.

    Each body that comes back whole as a 200 of the listed size goes to `receiver.open(get)`,
    chunk by chunk; `Body.write` must not raise (it records its own errors and drops what
    follows). Every other outcome calls `on_fallback(get, failure)`, which returns how long the
    connection waits before it sends more (a backoff). Both are called from worker threads,
    `on_fallback` one call at a time. When `stop` is set, requests not yet answered are dropped
    (neither is called for them). Returns when every request was delivered, handed to
    `on_fallback`, or dropped.
    """
    if not gets:
        return
    run = _Run(endpoint, gets, max(1, depth), read_timeout, receiver, on_fallback, stop)
    n = max(1, min(connections, (len(gets) + depth - 1) // max(1, depth)))
    threads = [threading.Thread(target=run.worker, name=f"nodekit-get-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if run.errors:
        raise run.errors[0]


class RangeReader:
    """Ranged GETs of large files over kept-alive connections, one per thread and endpoint.

    The bytes go from the socket into one reused buffer and on to `out`: no allocation per
    piece. Like `fetch_pipelined` this is a fast path: `read` returns how many bytes it
    delivered and why it stopped early, and the caller fetches the rest with retries.
    """

    def __init__(self, read_timeout: float) -> None:
        self._conns = KeptConnections(read_timeout)

    def read(self, endpoint: Endpoint, target: str, headers: Mapping[str, str], start: int, length: int,
             out: Callable[[memoryview], None]) -> tuple[int, Failure | None]:
        """Stream bytes [start, start+length) of `target` to `out`: (bytes delivered, None or why it stopped)."""
        delivered = 0

        def counted(data: memoryview) -> None:
            nonlocal delivered
            out(data)
            delivered += len(data)

        try:
            conn, status, _, fields = self._conns.exchange(
                endpoint, "GET", target, {**headers, "Range": f"bytes={start}-{start + length - 1}"})
        except Broken as err:
            return 0, Failure(err.why)
        except OSError as err:
            return 0, Failure(f"connect: {type(err).__name__}")
        if status != 206:
            conn.close()
            return 0, Failure(f"status {status}", status, fields.get("retry-after"))
        if fields.get("content-length", "") != str(length) or "transfer-encoding" in fields:
            conn.close()
            return 0, Failure("unexpected length")
        try:
            conn.body(length, counted)
        except Broken as err:
            conn.close()
            return delivered, Failure(err.why)
        except BaseException:
            conn.close()
            raise
        self._conns.keep(conn)
        return delivered, None
