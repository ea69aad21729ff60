"""The download hot path: many GETs in flight from one thread, on libcurl's multi interface (pycurl).

Why libcurl (measured, README performance section): on a node the time of a small file is the
server's time per request, so many requests must be in flight; what decides then is the client's
CPU per request. For 64 KiB blobs over TLS, one request cost about 120 µs of CPU in libcurl
against about 410 µs in urllib3 (requests' engine) and far more in the Azure SDK's pipeline, and
one thread driving libcurl needs no locks where 64 threads driving urllib3 fought over the GIL.
TLS, HTTP parsing and connection reuse happen in C; Python sees each body piece once.

`CurlEngine.run` takes `Get`s (a URL, headers, a byte range and a `Body` that receives the bytes
in order) and keeps up to `concurrency` of them in flight, each on its own kept-alive connection
(HTTP/1.1, one request at a time per connection). Each request gets a fresh
`x-ms-client-request-id` and, with a token, the Authorization header of its moment. A failure is
judged by storage/retry.py: a permanent one ends that Get; a transient one is retried after a
backoff (Retry-After believed) and resumes from the byte reached, within the run's deadline. At
the deadline, or when the run stops, every Get still open ends with an error. `done(get, error)`
is called once per Get, in the engine's thread. Proxies and trust come from NetConfig. Nothing
here logs a URL's query string (the SAS).
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodekit.errors import NodekitError, TransientError
from nodekit.storage import RunContext
from nodekit.storage.net import CONNECT_TIMEOUT, NetConfig, curl_ca_options, user_agent
from nodekit.storage.retry import Credential, Failure, for_curl, for_status, request_ids

log = logging.getLogger(__name__)

CURL_BUFFER = 512 * 1024  # bytes libcurl hands over at most per call: fewer Python calls for large bodies
MAX_REDIRECTS = 5


class Body(Protocol):
    """Where a Get's bytes go, in order. `rewind` means: forget what you got, it comes again from the start.

    A Body with a `file` attribute (a binary file positioned where the bytes go) has libcurl write into
    that file directly, with no Python call of nodekit's per piece (large ranges: 64K pieces a GiB);
    `settle()` then flushes it and returns the position reached (the Get's `pos`).
    """

    def begin(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def rewind(self) -> None: ...


class Stopped(NodekitError):
    """The Get was not finished because the run is stopping (another error, or the deadline)."""


@dataclass
class Get:
    """One object (or a range of one) to fetch. `url` may hold a SAS: never log it."""

    url: str
    start: int  # first byte wanted
    end: int  # one past the last byte wanted
    body: Body
    what: str  # for messages: "reading in/a.bin"
    where: str  # for messages: the object's URL without its query
    headers: list[str] = field(default_factory=list)
    token: Any = None  # a TokenSource: `header()` gives the Authorization header of the moment
    credential: Credential | None = None
    ranged: bool = True  # False: a plain GET of the whole object (no Range header unless resuming)
    follow: bool = False  # follow redirects (plain URL sources); credentials never go to another host
    proxy: str | None = None  # the proxy for `url` ("" for none); None: looked up when sent
    item: Any = None  # the caller's
    pos: int = field(init=False)
    attempt: int = 0
    status: int | None = None
    client_id: str = ""
    began: bool = False
    error: NodekitError | None = None  # raised by the Body: ends the Get with it
    refused: int | None = None  # a file-mode Get's status that its header check stopped (no body was written)
    last_failure: str = ""

    def __post_init__(self) -> None:
        self.pos = self.start


Done = Callable[[Get, "NodekitError | None"], None]


class CurlEngine:
    """Runs Gets on libcurl's multi interface in the calling thread (see the module docstring)."""

    def __init__(self, net: NetConfig, ctx: RunContext, concurrency: int, read_timeout: float = 60.0) -> None:
        import pycurl

        self.pycurl = pycurl
        self.net = net
        self.ctx = ctx
        self.concurrency = max(1, concurrency)
        self.read_timeout = read_timeout
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_MAXCONNECTS, self.concurrency + 8)
        self._free: list[Any] = []
        self._pending: deque[Get] = deque()
        self._timers: list[tuple[float, int, Get]] = []
        self._active: dict[Any, tuple[Get, list[bytes]]] = {}
        self._seq = 0
        self._holds = 0
        self._inbox: deque[Get] = deque()

    # -- handles ---------------------------------------------------------------------------------
    def _handle(self) -> Any:
        return self._free.pop() if self._free else new_handle(self.net, self.read_timeout)

    def _start(self, get: Get) -> None:
        pc = self.pycurl
        get.client_id = str(uuid.uuid4())
        get.status = None
        headers = [*get.headers, f"x-ms-client-request-id: {get.client_id}"]
        if get.token is not None:
            headers.append(get.token.header())  # may raise NodekitError: handled by the caller
        if get.ranged or get.pos > get.start:
            headers.append(f"Range: bytes={get.pos}-{get.end - 1}")
        if not get.began:
            get.body.begin()  # may raise OSError: handled by the caller
            get.began = True
        c = self._handle()
        c.setopt(pc.URL, get.url)
        c.setopt(pc.HTTPHEADER, headers)
        c.setopt(pc.PROXY, get.proxy if get.proxy is not None else (self.net.proxy_for(get.url) or ""))
        c.setopt(pc.FOLLOWLOCATION, 1 if get.follow else 0)
        lines: list[bytes] = []
        requested = get.pos

        def write(data: bytes) -> int | None:
            try:
                if get.status is None:
                    get.status = _status(lines)
                    if get.status == 200 and requested > get.start:  # the server ignored Range: from the start
                        get.body.rewind()
                        get.pos = get.start
                if get.status >= 300:
                    return None  # an error's body: its code is in x-ms-error-code
                n = len(data)
                if get.pos + n > get.end:
                    get.error = TransientError(f"{get.what}: the server sent more bytes than the object has; "
                                               "run again.")
                    return 0
                get.body.write(data)
                get.pos += n
                return None
            except NodekitError as err:
                get.error = err
            except OSError as err:
                from nodekit.plan import disk_error

                get.error = disk_error(err, _where(get.body))
            except Exception as err:  # a bug: end this Get with it, never print from a callback
                get.error = NodekitError(f"unexpected {type(err).__name__} while writing: {err}")
            return 0  # tells libcurl to stop this transfer

        file = getattr(get.body, "file", None)
        if file is not None:
            self._file_mode(c, get, lines, file)
        else:
            c.setopt(pc.MAXFILESIZE_LARGE, 0)
            c.setopt(pc.WRITEFUNCTION, write)
            c.setopt(pc.HEADERFUNCTION, lines.append)
        self.multi.add_handle(c)
        self._active[c] = (get, lines)

    def _file_mode(self, c: Any, get: Get, lines: list[bytes], file: Any) -> None:
        """libcurl writes the body into `file`; the head is checked first, so that only the body that was
        asked for (206 from `pos`, or 200 for a whole object) ever reaches it, and never more than asked."""
        pc = self.pycurl
        want = 206 if (get.ranged or get.pos > get.start) else 200
        get.refused = None

        def header(line: bytes) -> int | None:
            lines.append(line)
            if line.startswith(b"HTTP/"):
                get.status = _status([line])
            elif line in (b"\r\n", b"\n"):  # the end of a head
                if get.follow and get.status is not None and 300 <= get.status < 400:
                    return None  # a redirect that libcurl follows
                if get.status != want:
                    get.refused = get.status or 0
                    return 0  # stops the transfer before any byte of this body is written
            elif want == 206 and line[:14].lower() == b"content-range:":
                first = line.split(b" ", 2)[-1].split(b"-", 1)[0].strip()
                if first != str(get.pos).encode():
                    get.refused = get.status or 0
                    get.error = TransientError(f"{get.what}: the server answered another range; run again.")
                    return 0
            return None

        c.setopt(pc.MAXFILESIZE_LARGE, get.end - get.pos)
        c.setopt(pc.HEADERFUNCTION, header)
        c.setopt(pc.WRITEDATA, file)

    # -- the loop --------------------------------------------------------------------------------
    def add(self, get: Get, delay: float = 0.0) -> None:
        """Queue a Get (from the engine's thread, or from another thread: picked up within 50 ms)."""
        if delay > 0:
            self._seq += 1
            heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, get))
        else:
            self._inbox.append(get)

    def hold(self) -> None:
        """Keep `run` going (another thread may still add Gets) until the matching `release`."""
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1

    def run(self, gets: Iterable[Get], done: Done) -> None:
        """Fetch every Get; `done` is called once for each (error None on success). Returns when all are done."""
        pc = self.pycurl
        self._pending.extend(gets)
        try:
            while self._pending or self._active or self._timers or self._inbox or self._holds > 0:
                while self._inbox:
                    self._pending.append(self._inbox.popleft())
                if self.ctx.stop.is_set() or self.ctx.remaining() <= 0:
                    self._end_all(done)
                    if self._holds > 0:  # the hashing thread still holds the run: wait for it without spinning
                        time.sleep(0.05)
                    continue
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    self._pending.appendleft(heapq.heappop(self._timers)[2])
                while self._pending and len(self._active) < self.concurrency:
                    get = self._pending.popleft()
                    try:
                        self._start(get)
                    except NodekitError as err:  # a token that cannot be had
                        done(get, err)
                    except OSError as err:  # the body's file cannot be created
                        from nodekit.plan import disk_error

                        done(get, disk_error(err, _where(get.body)))
                while self.multi.perform()[0] == pc.E_CALL_MULTI_PERFORM:
                    pass
                while True:
                    queued, ok, failed = self.multi.info_read()
                    for c in ok:
                        self._finished(c, 0, "", done)
                    for c, errno, message in failed:
                        self._finished(c, errno, message, done)
                    if not queued:
                        break
                wait = 0.05 if (self._holds or self._inbox) else 1.0
                if self._timers:
                    wait = min(wait, max(0.0, self._timers[0][0] - time.monotonic()))
                wait = min(wait, max(0.0, self.ctx.remaining()))
                if self._active:
                    due = self.multi.timeout()  # libcurl's own timers (name resolution, handshakes, retries)
                    if due >= 0:
                        wait = min(wait, due / 1000)
                    self.multi.select(wait)
                elif wait > 0 and not self._pending and not self._inbox and (self._timers or self._holds):
                    self.ctx.stop.wait(wait)  # nothing in flight: a retry is due later, or another thread adds work
        finally:
            for c in list(self._active):
                self.multi.remove_handle(c)
            self._active.clear()
            for c in self._free:
                c.close()
            self._free.clear()
            self.multi.close()

    def _end_all(self, done: Done) -> None:
        """The deadline passed or the run is stopping: end every open Get with an error."""
        timed_out = not self.ctx.stop.is_set()
        gets = [g for g, _ in self._active.values()] + list(self._pending) + [g for *_, g in self._timers]
        for c in list(self._active):
            self.multi.remove_handle(c)
            self._free.append(c)
        self._active.clear()
        self._pending.clear()
        self._timers.clear()
        for get in gets:
            if timed_out:
                last = f" (last error: {get.last_failure})" if get.last_failure else ""
                done(get, TransientError(f"{get.what}: not finished within the {self.ctx.timeout:g} s timeout{last}; "
                                         "a later run goes on from what is in place."))
            else:
                done(get, Stopped(f"{get.what}: not finished, the run is stopping."))

    def _finished(self, c: Any, errno: int, message: str, done: Done) -> None:
        get, lines = self._active.pop(c)
        self.multi.remove_handle(c)
        self._free.append(c)
        if getattr(get.body, "file", None) is not None:
            try:
                get.pos = get.body.settle()  # type: ignore[attr-defined]
            except OSError as err:
                from nodekit.plan import disk_error

                get.error = get.error or disk_error(err, _where(get.body))
            if get.refused is not None:
                errno, message = 0, ""  # stopped by the head check: judged by the status it saw
        if get.error is not None:  # the body refused the bytes (a full disk, too many bytes)
            done(get, get.error)
            return
        status = get.status if get.status is not None else _status(lines)
        if log.isEnabledFor(logging.DEBUG):
            from nodekit.redact import display_url

            log.debug("GET %s -> %s", display_url(get.url), status or f"curl error {errno}")
        if not errno and status < 300 and get.pos == get.end:
            done(get, None)
            return
        verdict = judge(errno, message, lines, what=get.what, where=get.where, credential=get.credential,
                        trust_hint=self.net.trust_hint(), client_id=get.client_id)
        if errno and get.pos > get.start:
            verdict = Failure(f"{verdict.reason} after {get.pos - get.start} bytes", verdict.error)
        elif get.refused is not None and get.refused < 300:
            verdict = Failure(f"answered {get.refused} instead of the range asked for")
        elif not errno and status < 300:
            verdict = Failure(f"response ended early after {get.pos - get.start} of {get.end - get.start} bytes")
        if verdict.error is not None:
            done(get, verdict.error)
            return
        get.last_failure = verdict.reason
        get.attempt += 1
        delay = self.ctx.retry_delay(get.attempt, verdict.retry_after)
        if delay >= self.ctx.remaining():
            done(get, TransientError(
                f"{get.what}: gave up after {get.attempt} retries within the {self.ctx.timeout:g} s timeout (last "
                f"error: {verdict.reason}); a later run may succeed."))
            return
        log.debug("%s: %s; retrying in %.1f s", get.what, verdict.reason, delay)
        self.add(get, delay)


def _status(lines: list[bytes]) -> int:
    """The status of the last response whose head is in `lines` (after redirects, the final one)."""
    for line in reversed(lines):
        if line.startswith(b"HTTP/"):
            try:
                return int(line.split(None, 2)[1])
            except (IndexError, ValueError):
                return 0
    return 0


def _reason(lines: list[bytes]) -> str:
    for line in reversed(lines):
        if line.startswith(b"HTTP/"):
            parts = line.decode("latin-1").split(None, 2)
            return parts[2].strip() if len(parts) > 2 else ""
    return ""


def _headers(lines: list[bytes]) -> dict[str, str]:
    """The final response's header fields, by lower-case name."""
    out: dict[str, str] = {}
    for line in lines:
        if line.startswith(b"HTTP/"):
            out = {}
            continue
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _host(where: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(where).netloc or where


def _where(body: Body) -> Any:
    from pathlib import Path

    return Path(getattr(body, "tmp", "") or ".")


def new_handle(net: NetConfig, read_timeout: float) -> Any:
    """A libcurl easy handle with nodekit's settings: trust, User-Agent, HTTP/1.1, timeouts, redirects' limits."""
    import pycurl as pc

    c = pc.Curl()
    option, path = curl_ca_options(net.verify())
    c.setopt(pc.NOSIGNAL, 1)
    c.setopt(getattr(pc, option), path)
    c.setopt(pc.USERAGENT, user_agent(full=True))
    c.setopt(pc.HTTP_VERSION, pc.CURL_HTTP_VERSION_1_1)
    c.setopt(pc.BUFFERSIZE, CURL_BUFFER)
    c.setopt(pc.CONNECTTIMEOUT, int(CONNECT_TIMEOUT))
    c.setopt(pc.LOW_SPEED_LIMIT, 1)  # a connection silent for read_timeout seconds is cut (and retried)
    c.setopt(pc.LOW_SPEED_TIME, max(1, round(read_timeout)))
    c.setopt(pc.TCP_KEEPALIVE, 1)
    c.setopt(pc.MAXREDIRS, MAX_REDIRECTS)
    c.setopt(pc.PROTOCOLS, pc.PROTO_HTTP | pc.PROTO_HTTPS)
    c.setopt(pc.REDIR_PROTOCOLS, pc.PROTO_HTTPS | pc.PROTO_HTTP)
    return c


def judge(errno: int, message: str, lines: list[bytes], *, what: str, where: str, credential: Credential | None,
          trust_hint: str, client_id: str) -> Failure:
    """The verdict on a finished request: a libcurl error, else its status (a 2xx passes, `error` None)."""
    headers = _headers(lines)
    ids = request_ids(client_id, headers.get("x-ms-request-id"))
    if errno:
        return for_curl(errno, message, what=what, host=_host(where), trust_hint=trust_hint, ids=ids)
    status = _status(lines)
    if status >= 300:
        return for_status(status, headers.get("x-ms-error-code") or _reason(lines), what=what, where=where,
                          credential=credential, retry_after=headers.get("retry-after"), ids=ids)
    return Failure(f"{status}")


def head(net: NetConfig, ctx: RunContext, url: str, *, what: str, where: str, follow: bool,
         read_timeout: float = 60.0) -> tuple[dict[str, str], str]:
    """HEAD `url` with retries (redirects followed when `follow`): (header fields, the final URL)."""
    import pycurl

    attempt = 0
    while True:
        c = new_handle(net, read_timeout)
        lines: list[bytes] = []
        client_id = str(uuid.uuid4())
        errno, message = 0, ""
        try:
            c.setopt(pycurl.URL, url)
            c.setopt(pycurl.NOBODY, 1)
            c.setopt(pycurl.HTTPHEADER, [f"x-ms-client-request-id: {client_id}"])
            c.setopt(pycurl.PROXY, net.proxy_for(url) or "")
            c.setopt(pycurl.FOLLOWLOCATION, 1 if follow else 0)
            c.setopt(pycurl.TIMEOUT, max(1, int(min(read_timeout + CONNECT_TIMEOUT, max(1.0, ctx.remaining())))))
            c.setopt(pycurl.HEADERFUNCTION, lines.append)
            try:
                c.perform()
            except pycurl.error as err:
                errno, message = err.args[0], str(err.args[1]) if len(err.args) > 1 else ""
            final = c.getinfo(pycurl.EFFECTIVE_URL)
        finally:
            c.close()
        verdict = judge(errno, message, lines, what=what, where=where, credential=None, trust_hint=net.trust_hint(),
                        client_id=client_id)
        if not errno and _status(lines) < 300:
            return _headers(lines), final
        if verdict.error is not None:
            raise verdict.error
        attempt += 1
        ctx.backoff(attempt, what, verdict.reason, verdict.retry_after)
