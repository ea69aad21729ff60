"""The wire layer and the pipelined GET engine against small scripted HTTP servers on loopback.

Each server is a real socket server of this file's own that reads requests as they come
(several at once when the client pipelines) and answers each as its test scripts it: in order
and well formed, with the wrong request id, closing after every response, 503 with a chunked
body and Retry-After, a body of another length. The engine must deliver every good body once,
hand every other request to the fallback exactly once, and never mix bodies up.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from nodekit.errors import SourceError
from nodekit.storage import RunContext
from nodekit.storage.azure import parse_listing
from nodekit.storage.http import HttpClient
from nodekit.storage.pipeline import Failure, Get, RangeReader, fetch_pipelined
from nodekit.storage.wire import Endpoint


def _body(path: str) -> bytes:
    """What the servers answer for a path: distinct bytes per path, some KiB long."""
    return (path.encode() * (4096 // len(path) + 1))[:1000 + len(path) * 37]


@dataclass
class Server:
    """Answers requests with `answer(index, path, headers) -> bytes`, pipelined requests included."""

    answer: Callable[[int, str, dict[str, str]], bytes]
    sock: socket.socket = field(default_factory=socket.socket)
    requests: list[str] = field(default_factory=list)
    connections: int = 0
    waiting: list[int] = field(default_factory=list)  # per connection: the most requests unanswered at once
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def most_waiting(self) -> int:
        return max(self.waiting, default=0)

    def start(self) -> Server:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("http", "127.0.0.1", self.sock.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.waiting.append(0)
                index = len(self.waiting) - 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, which: int) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                with self.lock:
                    self.waiting[which] = max(self.waiting[which], buf.count(b"\r\n\r\n"))
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                path = lines[0].split(" ")[1].split("?")[0]
                with self.lock:
                    index = len(self.requests)
                    self.requests.append(path)
                reply = self.answer(index, path, headers)
                try:
                    conn.sendall(reply)
                except OSError:
                    return
                if b"Connection: close" in reply.split(b"\r\n\r\n", 1)[0]:
                    return

    def stop(self) -> None:
        self.sock.close()


def ok(path: str, headers: dict[str, str], *, extra: str = "", rid: str | None = None) -> bytes:
    body = _body(path)
    echo = headers.get("x-ms-client-request-id", "") if rid is None else rid
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nx-ms-client-request-id: {echo}\r\n{extra}\r\n"
            .encode() + body)


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[int, str, dict[str, str]], bytes]], Server]]:
    servers: list[Server] = []

    def make(answer: Callable[[int, str, dict[str, str]], bytes]) -> Server:
        servers.append(Server(answer).start())
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


class Collect:
    """A Receiver that keeps each delivered body, and a fallback that records what it got."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.fallbacks: list[tuple[str, Failure]] = []
        self.lock = threading.Lock()

    def open(self, get: Get) -> Collect._Body:
        return Collect._Body(self, get.item)

    def fallback(self, get: Get, failure: Failure) -> float:
        self.fallbacks.append((get.item, failure))
        return 0.0

    class _Body:
        def __init__(self, owner: Collect, name: str) -> None:
            self.owner, self.name, self.parts = owner, name, bytearray()

        def write(self, data: memoryview) -> None:
            self.parts += data

        def finish(self) -> None:
            with self.owner.lock:
                assert self.name not in self.owner.bodies, f"{self.name} delivered twice"
                self.owner.bodies[self.name] = bytes(self.parts)

        def discard(self) -> None:
            pass


def _gets(n: int) -> list[Get]:
    return [Get(f"/c/f{i:03}", f"/c/f{i:03}?sig=SECRET", {"x-ms-version": "2021-08-06"}, len(_body(f"/c/f{i:03}")))
            for i in range(n)]


def _fetch(server: Server, gets: list[Get], collect: Collect, *, connections: int = 2, depth: int = 8) -> None:
    fetch_pipelined(server.endpoint, gets, connections=connections, depth=depth, read_timeout=5,
                    receiver=collect, on_fallback=collect.fallback, stop=threading.Event())


def test_pipelined_gets_arrive_together_and_each_body_lands_once(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(lambda i, path, h: ok(path, h))
    collect = Collect()
    _fetch(server, _gets(200), collect, connections=2, depth=8)
    assert collect.fallbacks == []
    assert collect.bodies == {g.item: _body(g.item) for g in _gets(200)}
    assert server.connections == 2 and len(server.requests) == 200
    assert server.most_waiting > 1  # requests really were sent before the answers to earlier ones


def test_without_pipelining_one_request_at_a_time(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(lambda i, path, h: ok(path, h))
    collect = Collect()
    _fetch(server, _gets(30), collect, connections=1, depth=1)
    assert len(collect.bodies) == 30 and server.most_waiting == 1


def test_an_answer_for_another_request_turns_pipelining_off(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(lambda i, path, h: ok(path, h, rid="someone-else") if i == 3 else ok(path, h))
    collect = Collect()
    _fetch(server, _gets(40), collect, connections=1, depth=8)
    assert [name for name, _ in collect.fallbacks] == [server.requests[3].split("?")[0]]
    assert collect.fallbacks[0][1].why == "response for another request"
    assert len(collect.bodies) == 39 and all(collect.bodies[k] == _body(k) for k in collect.bodies)
    assert server.waiting[0] > 1  # pipelined at first...
    assert server.connections > 1 and server.waiting[1:] == [1] * (server.connections - 1)  # ...then not


def test_a_server_that_closes_after_each_answer_gets_everything_asked_again(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(lambda i, path, h: ok(path, h, extra="Connection: close\r\n"))
    collect = Collect()
    _fetch(server, _gets(25), collect, connections=2, depth=8)
    assert collect.fallbacks == []
    assert collect.bodies == {g.item: _body(g.item) for g in _gets(25)}


def test_503_with_a_chunked_body_goes_to_the_fallback_and_the_connection_is_kept(serve) -> None:  # type: ignore[no-untyped-def]
    busy = (b"HTTP/1.1 503 Server Busy\r\nRetry-After: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n<Erro\r\n10\r\nr>busy</Error>\r\n\r\n0\r\n\r\n")
    server = serve(lambda i, path, h: busy if i % 5 == 2 else ok(path, h))
    collect = Collect()
    _fetch(server, _gets(20), collect, connections=1, depth=4)
    assert len(collect.fallbacks) == 4
    assert all(f.status == 503 and f.retry_after == "3" for _, f in collect.fallbacks)
    assert len(collect.bodies) == 16 and server.connections == 1  # read past each error, kept going


def test_a_body_of_another_length_is_not_delivered(serve) -> None:  # type: ignore[no-untyped-def]
    def answer(i: int, path: str, h: dict[str, str]) -> bytes:
        if i == 1:
            rid = h["x-ms-client-request-id"]
            return f"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-ms-client-request-id: {rid}\r\n\r\nabc".encode()
        return ok(path, h)
    server = serve(answer)
    collect = Collect()
    _fetch(server, _gets(10), collect, connections=1, depth=4)
    assert [f.why for _, f in collect.fallbacks] == ["unexpected length"]
    assert len(collect.bodies) == 9


def test_a_server_that_hangs_up_mid_body_costs_that_file_one_fallback(serve) -> None:  # type: ignore[no-untyped-def]
    def answer(i: int, path: str, h: dict[str, str]) -> bytes:
        if i == 5:
            body = _body(path)
            return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                    f"x-ms-client-request-id: {h['x-ms-client-request-id']}\r\n\r\n").encode() + body[:100]
        return ok(path, h)
    server = serve(answer)
    collect = Collect()
    # one at a time: a server that closes with pipelined requests unread resets the connection, and
    # the reset may take answers already sent with it (those are asked again: the close test above)
    _fetch(server, _gets(30), collect, connections=1, depth=1)
    assert [(name, f.why) for name, f in collect.fallbacks] == [("/c/f005", "connection closed")]
    assert len(collect.bodies) == 29 and "/c/f005" not in collect.bodies


def test_a_set_stop_flag_drops_what_is_left(serve) -> None:  # type: ignore[no-untyped-def]
    stop = threading.Event()
    server = serve(lambda i, path, h: ok(path, h))
    collect = Collect()

    class Stopper(Collect):
        def open(self, get: Get) -> Collect._Body:
            stop.set()
            return collect.open(get)

    fetch_pipelined(server.endpoint, _gets(50), connections=1, depth=2, read_timeout=5, receiver=Stopper(),
                    on_fallback=collect.fallback, stop=stop)
    assert len(collect.bodies) == 1 and collect.fallbacks == []


def test_range_reader_reads_ranges_and_says_why_it_stopped(serve) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 400

    def answer(i: int, path: str, h: dict[str, str]) -> bytes:
        if path.endswith("gone"):
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        start, end = (int(x) for x in h["range"].removeprefix("bytes=").split("-"))
        part = data[start:end + 1]
        return f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(part)}\r\n\r\n".encode() + part
    server = serve(answer)
    reader = RangeReader(read_timeout=5)
    got = bytearray()
    assert reader.read(server.endpoint, "/c/big", {}, 1000, 50000, got.extend) == (50000, None)
    assert reader.read(server.endpoint, "/c/big", {}, 51000, 10, got.extend) == (10, None)
    assert bytes(got) == data[1000:51000] + data[51000:51010]
    assert server.connections == 1  # kept alive between ranges
    delivered, failure = reader.read(server.endpoint, "/c/gone", {}, 0, 10, got.extend)
    assert delivered == 0 and failure is not None and failure.status == 404


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_http_client_reads_every_kind_of_body(serve, framing: str) -> None:  # type: ignore[no-untyped-def]
    body = b"x" * 70000 + b"end"

    def answer(i: int, path: str, h: dict[str, str]) -> bytes:
        if framing == "length":
            return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        if framing == "chunked":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body
                    + b"\r\n0\r\nX-Trailer: 1\r\n\r\n")
        return b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n" + body
    server = serve(answer)
    client = HttpClient(RunContext(timeout=10), read_timeout=5)
    url = f"http://127.0.0.1:{server.endpoint.port}/c/x?sig=SECRET"
    for _ in range(3):
        assert client.request("GET", url, {}, what="reading x").data == body
    assert server.connections == (3 if framing == "close" else 1)


def test_listing_parser_reads_entities_encoded_names_prefixes_and_the_marker() -> None:
    page = (b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="x" ContainerName="c">'
            b"<Prefix>in/</Prefix><Blobs>"
            b"<BlobPrefix><Name>in/a/</Name></BlobPrefix>"
            b'<Blob><Name>in/x &amp; y &lt;1&gt; caf&#233; &#x20AC;.txt</Name><Properties>'
            b"<Creation-Time>Mon</Creation-Time><Last-Modified>Tue, 24 Nov 2026 10:00:00 GMT</Last-Modified>"
            b"<Etag>0x8DC</Etag><Content-Length>12</Content-Length><Content-MD5>bWQ1</Content-MD5>"
            b"</Properties></Blob>"
            b'<Blob><Name Encoded="true">in/%EF%BF%BF</Name><Properties><Etag>"0x1"</Etag>'
            b"<Content-Length>0</Content-Length><Content-MD5 /></Properties></Blob>"
            b"<BlobPrefix><Name>in/z/</Name></BlobPrefix>"
            b"</Blobs><NextMarker>2!96!MDAw&amp;</NextMarker></EnumerationResults>")
    blobs, prefixes, marker = parse_listing(page, "listing", strip=3)
    assert [(full, f.name, f.size, f.etag, f.content_md5) for full, f in blobs] == [
        ("in/x & y <1> café €.txt", "x & y <1> café €.txt", 12, "0x8DC", "bWQ1"),
        ("in/\uffff", "\uffff", 0, "0x1", None),
    ]
    assert blobs[0][1].last_modified == "Tue, 24 Nov 2026 10:00:00 GMT"
    assert prefixes == ["in/a/", "in/z/"] and marker == "2!96!MDAw&"
    with pytest.raises(SourceError, match="not a blob listing"):
        parse_listing(b"<html>a login page</html>", "listing")


def test_each_pipelined_request_takes_the_authentication_headers_of_its_moment(serve) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []

    def answer(i: int, path: str, h: dict[str, str]) -> bytes:
        seen.append(h.get("authorization", ""))
        return ok(path, h)
    server = serve(answer)
    tokens = iter(f"Bearer t{i}" for i in range(1000))
    gets = [Get(g.item, g.target, {**g.headers, "Authorization": "Bearer stale"}, g.size,
                lambda: {"Authorization": next(tokens)}) for g in _gets(20)]
    collect = Collect()
    _fetch(server, gets, collect, connections=1, depth=4)
    assert len(collect.bodies) == 20
    assert "Bearer stale" not in seen and len(set(seen)) == 20  # a fresh value for each request sent
