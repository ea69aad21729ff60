"""HTTP/1.1 on a socket: the small part of it that nodekit speaks, shared by every remote store.

One `Connection` is a blocking socket (TLS for https) and one reused receive buffer; responses
are parsed out of the buffer in place and bodies handed on in pieces, without an allocation
per piece. It knows request lines, response heads, Content-Length and chunked bodies, bodies
that end with the connection, and keep-alive. It does not retry, follow redirects or decode
content: `HttpClient` (http.py) and the pipelined path (pipeline.py) decide what a failure
means. Measured: importing http.client (and the email and ssl packages it pulls in) cost a
warm re-run about 15 ms, a tenth of rclone's whole warm re-run of 2,000 files.

Nothing here logs; a `Broken` carries a short, secret-free reason (never a URL).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # a response head longer than this is refused
BUFFER = 1024 * 1024  # each connection's receive buffer
ERROR_BODY_MAX = 1024 * 1024  # more of an error response's body than this is not read


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return host if self.port in (80, 443) else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Endpoint, str]:
    """(endpoint, path-and-query) of an http(s) URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    endpoint = Endpoint(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    return endpoint, (parts.path or "/") + ("?" + parts.query if parts.query else "")


class Broken(ConnectionError):
    """The connection cannot carry this response (or more requests).

    `why` is short and secret-free; `started` says whether part of the current response arrived.
    """

    def __init__(self, why: str, started: bool) -> None:
        super().__init__(why)
        self.why = why
        self.started = started


class Fields(dict[str, str]):
    """Response header fields by lower-case name; `get` takes any case."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


_ssl_default: Any = None


def default_ssl_context() -> Any:
    """The default TLS context, made (and ssl imported) on first use only."""
    global _ssl_default
    if _ssl_default is None:
        import ssl

        _ssl_default = ssl.create_default_context()
    return _ssl_default


class Connection:
    """A blocking socket and a receive buffer; see the module docstring."""

    def __init__(self, endpoint: Endpoint, timeout: float, ssl_context: Any = None) -> None:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.scheme == "https":
                sock = (ssl_context or default_ssl_context()).wrap_socket(sock, server_hostname=endpoint.host)
        except BaseException:
            sock.close()
            raise
        self.endpoint = endpoint
        self.sock = sock
        self.buf = bytearray(BUFFER)
        self.view = memoryview(self.buf)
        self.lo = 0  # unread bytes are buf[lo:hi]
        self.hi = 0
        self.answered = 0  # responses read whole on this connection
        self.reusable = True  # False once a response said it closes, or a body was left unread

    def close(self) -> None:
        self.reusable = False
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes | None = None) -> None:
        """Send one request (Host and, with a body, Content-Length added)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.endpoint.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None and not any(k.lower() == "content-length" for k in headers):
            lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(data + body if body else data)

    def _fill(self, started: bool) -> None:
        """Read more bytes into the buffer (moving what is unread to its front first)."""
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi == len(self.buf):
            n = self.hi - self.lo
            self.buf[:n] = self.buf[self.lo:self.hi]
            self.lo, self.hi = 0, n
        try:
            n = self.sock.recv_into(self.view[self.hi:])
        except TimeoutError:
            raise Broken("read timeout", started) from None
        except OSError as err:
            raise Broken(type(err).__name__, started) from None
        if n == 0:
            raise Broken("connection closed", started)
        self.hi += n

    def head(self) -> tuple[int, str, Fields]:
        """The next response's status, reason and header fields (1xx responses are skipped)."""
        while True:
            started = False
            while True:
                end = self.buf.find(b"\r\n\r\n", self.lo, self.hi)
                if end >= 0:
                    break
                if self.hi - self.lo > MAX_HEAD:
                    raise Broken("response head too long", True)
                started = started or self.hi > self.lo
                self._fill(started)
            lines = bytes(self.view[self.lo:end]).decode("latin-1").split("\r\n")
            self.lo = end + 4
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise Broken("not an HTTP/1.x response", True)
            fields = Fields()
            for line in lines[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            status = int(parts[1])
            if 100 <= status < 200:
                continue
            if parts[0] == "HTTP/1.0" or "close" in fields.get("connection", "").lower():
                self.reusable = False
            return status, parts[2] if len(parts) > 2 else "", fields

    def body(self, length: int, out: Callable[[memoryview], None]) -> None:
        """Hand the next `length` bytes to `out`, in pieces (each valid only during the call)."""
        for piece in self._exactly(length):
            out(piece)

    def _exactly(self, length: int) -> Iterator[memoryview]:
        """The next `length` bytes in pieces, each valid until the next one is asked for."""
        while length:
            if self.lo == self.hi:
                self._fill(True)
            take = min(length, self.hi - self.lo)
            yield self.view[self.lo:self.lo + take]
            self.lo += take
            length -= take

    def pieces(self, method: str, status: int, fields: Fields, limit: int | None = None) -> Iterator[memoryview]:
        """The response body in pieces (each valid until the next), whatever its framing.

        Stops at `limit` bytes with Broken. A body that ends with the connection leaves it closed.
        """
        if method == "HEAD" or status in (204, 304):
            return
        if "chunked" in fields.get("transfer-encoding", "").lower():
            total = 0
            while True:
                try:
                    size = int(self._line().split(";", 1)[0].strip(), 16)
                except ValueError:
                    raise Broken("bad chunked body", True) from None
                total += size
                if limit is not None and total > limit:
                    raise Broken("body too long", True)
                if size == 0:
                    while self._line():  # trailers, up to the empty line
                        pass
                    return
                yield from self._exactly(size)
                self._line()
        length = fields.get("content-length")
        if length is not None:
            if not length.isdigit() or (limit is not None and int(length) > limit):
                raise Broken("body of a bad or too large length", True)
            yield from self._exactly(int(length))
            return
        self.reusable = False  # no framing: the body ends when the server closes
        total = 0
        while True:
            if self.lo == self.hi:
                try:
                    self._fill(True)
                except Broken as err:
                    if err.why == "connection closed":
                        return
                    raise
            take = self.hi - self.lo
            total += take
            if limit is not None and total > limit:
                raise Broken("body too long", True)
            yield self.view[self.lo:self.hi]
            self.lo = self.hi

    def read_body(self, method: str, status: int, fields: Fields, limit: int | None = None) -> bytes:
        return b"".join(bytes(p) for p in self.pieces(method, status, fields, limit))

    def _line(self) -> str:
        while True:
            end = self.buf.find(b"\r\n", self.lo, self.hi)
            if end >= 0:
                line = bytes(self.view[self.lo:end]).decode("latin-1")
                self.lo = end + 2
                return line
            if self.hi - self.lo > MAX_HEAD:
                raise Broken("bad chunked body", True)
            self._fill(True)


class KeptConnections:
    """Kept-alive connections, one per thread and endpoint, for one request at a time."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def exchange(self, endpoint: Endpoint, method: str, target: str, headers: Mapping[str, str],
                 body: bytes | None = None) -> tuple[Connection, int, str, Fields]:
        """Send one request and read its response's head: (connection, status, reason, fields).

        It goes on this thread's kept connection to `endpoint` if there is one; if the server had
        closed that while it was idle (no byte of an answer came back), once more on a new one.
        On failure the connection is closed and OSError (Broken among them) raised.
        """
        conns: dict[Endpoint, Connection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.pop(endpoint, None)
        if conn is not None:
            try:
                return (conn, *_ask(conn, method, target, headers, body))
            except Broken as err:
                if err.started:
                    raise
            except OSError:
                pass
        conn = Connection(endpoint, self.timeout)
        return (conn, *_ask(conn, method, target, headers, body))

    def keep(self, conn: Connection) -> None:
        """Hand back a connection whose response was read to its end (closed if it cannot be reused)."""
        if conn.reusable:
            conn.answered += 1
            self._local.__dict__.setdefault("conns", {})[conn.endpoint] = conn
        else:
            conn.close()


def _ask(conn: Connection, method: str, target: str, headers: Mapping[str, str],
         body: bytes | None) -> tuple[int, str, Fields]:
    try:
        conn.request(method, target, headers, body)
        return conn.head()
    except BaseException:
        conn.close()
        raise
