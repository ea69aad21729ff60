"""A network like the one a Batch node meets, on loopback: TLS, server time per request, a rate per connection.

A reverse proxy between a client and Azurite, run as its own process (so that a bench can pin it,
with Azurite, to one core and the tool under test to the other with `taskset`):

- it speaks TLS to the client (the bench's self-signed certificate, which the client trusts);
- it waits `--delay` milliseconds before answering each request (Azure's server time per request),
  and answers one connection's requests one after another, as an HTTP/1.1 server does;
- it sends each response body at no more than `--rate` bytes/s per connection (Azure's limit per
  connection is of this kind; a whole node is limited by its NIC, which no tool here reaches);
- with `--memory` it answers a GET or HEAD it has already seen from memory (keyed by path, query
  without the SAS, and Range), so that after an untimed warm-up the emulator's own CPU per request
  (one Node.js process on a loopback) is no floor: on Azure the server is elsewhere and answers
  many requests in parallel. Writes (PUT, POST, DELETE) always go to Azurite, and forget what was
  remembered of their path and of listings.

`GET /__netsim/stats` returns its counters as JSON. Run: `python bench/netsim.py --upstream
127.0.0.1:PORT --port 0 --cert server.pem --key server.key --delay 15 --memory`; it prints
`listening PORT` on stdout. Uses uvloop when installed (the bench venv has it). Traffic goes only
to the given loopback upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

_SAS_KEYS = {"sig", "se", "st", "sp", "sv", "sr", "spr", "sip", "ss", "srt", "skoid", "sktid", "skt", "ske", "sks",
             "skv", "sdd", "saoid", "suoid", "scid", "ses", "rscc", "rscd", "rsce", "rscl", "rsct"}
PIECE = 64 * 1024


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.from_memory = 0
        self.upstream = 0
        self.connections = 0
        self.body_bytes = 0


def _key(method: str, target: str, headers: dict[str, str]) -> tuple[str, str, str, str]:
    parts = urlsplit(target)
    query = urlencode(sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                             if k not in _SAS_KEYS))
    return method, parts.path, query, headers.get("range", headers.get("x-ms-range", ""))


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return lines[0], fields


async def _read_body(reader: asyncio.StreamReader, fields: dict[str, str], no_body: bool) -> bytes:
    if no_body:
        return b""
    if fields.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    n = int(fields.get("content-length", "0") or 0)
    return await reader.readexactly(n) if n else b""


class NetSim:
    def __init__(self, upstream: tuple[str, int], upstream_tls: bool, delay: float, rate: float | None,
                 memory: bool) -> None:
        self.upstream = upstream
        self.upstream_ssl: ssl.SSLContext | None = None
        if upstream_tls:
            self.upstream_ssl = ssl.create_default_context()
            self.upstream_ssl.check_hostname = False
            self.upstream_ssl.verify_mode = ssl.CERT_NONE
        self.delay = delay
        self.rate = rate
        self.memory = memory
        self.cache: dict[tuple[str, str, str, str], tuple[bytes, bytes]] = {}
        self.stats = Stats()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                line, field_list = head
                method, target, _ = line.split(" ", 2)
                fields = {k.lower(): v for k, v in field_list}
                body = await _read_body(reader, fields, False)
                self.stats.requests += 1
                if target.startswith("/__netsim/stats"):
                    data = json.dumps(vars(self.stats)).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(data)).encode() + b"\r\n\r\n" + data)
                    await writer.drain()
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                key = _key(method, target, fields)
                hit = self.cache.get(key) if self.memory and method in ("GET", "HEAD") else None
                if hit is not None:
                    self.stats.from_memory += 1
                    resp_head, resp_body = hit
                    rid = fields.get("x-ms-client-request-id")
                    if rid:
                        resp_head = resp_head.replace(b"\r\n\r\n", f"\r\nx-ms-client-request-id: {rid}\r\n\r\n"
                                                      .encode(), 1)
                    await self._send(writer, resp_head, resp_body)
                    continue
                if up is None:
                    up = await asyncio.open_connection(*self.upstream, ssl=self.upstream_ssl)
                self.stats.upstream += 1
                out = [f"{method} {target} HTTP/1.1"]
                out += [f"{k}: {v}" for k, v in field_list if k.lower() not in ("connection", "transfer-encoding",
                                                                                 "content-length")]
                if body or method in ("PUT", "POST"):
                    out.append(f"Content-Length: {len(body)}")
                up[1].write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
                await up[1].drain()
                got = await _read_head(up[0])
                if got is None:
                    return
                status_line, resp_fields = got
                status = int(status_line.split(" ", 2)[1])
                rf = {k.lower(): v for k, v in resp_fields}
                resp_body = await _read_body(up[0], rf, method == "HEAD" or status in (204, 304))
                if rf.get("connection", "").lower() == "close":
                    up[1].close()
                    up = None
                keep = [(k, v) for k, v in resp_fields if k.lower() not in (
                    "connection", "transfer-encoding", "content-length", "keep-alive", "x-ms-client-request-id")]
                length = rf.get("content-length", str(len(resp_body))) if method == "HEAD" else str(len(resp_body))
                resp_head = ("\r\n".join([status_line] + [f"{k}: {v}" for k, v in keep]
                                        + [f"Content-Length: {length}"]) + "\r\n\r\n").encode("latin-1")
                if method in ("GET", "HEAD") and status in (200, 206) and self.memory:
                    self.cache[key] = (resp_head, resp_body)
                elif method not in ("GET", "HEAD"):
                    path = urlsplit(target).path
                    for k in [k for k in self.cache if k[1] == path or "comp=list" in k[2]]:
                        del self.cache[k]
                rid = fields.get("x-ms-client-request-id")
                if rid:
                    resp_head = resp_head.replace(b"\r\n\r\n", f"\r\nx-ms-client-request-id: {rid}\r\n\r\n"
                                                  .encode(), 1)
                await self._send(writer, resp_head, resp_body)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            return
        finally:
            writer.close()
            if up is not None:
                up[1].close()

    async def _send(self, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        self.stats.body_bytes += len(body)
        if not self.rate or len(body) <= PIECE:
            writer.write(head + body)
            await writer.drain()
            return
        writer.write(head)
        started = time.monotonic()
        view = memoryview(body)
        for i in range(0, len(body), PIECE):
            writer.write(view[i:i + PIECE])
            await writer.drain()
            ahead = (i + PIECE) / self.rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    sim = NetSim((host, int(port)), args.upstream_tls, args.delay / 1000.0, args.rate, args.memory)
    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
    server = await asyncio.start_server(sim.handle, "127.0.0.1", args.port, ssl=ctx, backlog=1024)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="HOST:PORT of Azurite (loopback)")
    p.add_argument("--upstream-tls", action="store_true", help="Azurite speaks HTTPS")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--delay", type=float, default=0.0, help="milliseconds before each answer")
    p.add_argument("--rate", type=float, default=None, help="bytes/s per connection for response bodies")
    p.add_argument("--memory", action="store_true", help="answer reads already seen from memory")
    args = p.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    if not args.upstream.startswith(("127.", "localhost:", "[::1]:")):
        sys.exit("netsim: the upstream must be on loopback")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
