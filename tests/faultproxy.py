"""A fault-injecting HTTP/1.1 proxy for tests and benches: nodekit → proxy → Azurite, on loopback.

Per request (matched by a regex on "METHOD /path"), with a probability and an optional cap on how
many times, it can: answer 503 with Retry-After, 500 or 404, reset the connection after half (or N
bytes) of the response body, stall before the body past the client's read timeout, or slow the
body to a bandwidth, drop a request header before forwarding (`strip`), or answer 403 with the
request's target (query string and all) in its status line, error code and body (`echo`, as some
proxies and servers echo what they were asked). A global limit admits at most `rps` requests per
second across all clients and answers the rest 503 ServerBusy, as a throttled storage account
does. It counts what it did, the body bytes it sent per path, and every request's Range header.
Runs its own event loop in a thread; `stop()` ends it. Traffic goes only to the given loopback upstream.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

ERROR_BODY = b'<?xml version="1.0" encoding="utf-8"?><Error><Code>%s</Code><Message>injected</Message></Error>'


@dataclass
class Rule:
    kind: str  # "503", "500", "404", "reset", "stall", "slow", "strip", "echo", "flip" (the body's first byte)
    rate: float = 1.0
    pattern: str = ""
    max_count: int | None = None
    retry_after: int = 1
    reset_at: float = 0.5  # fraction of the body sent before a reset (or bytes, if > 1)
    stall_s: float = 5.0
    bytes_per_s: float = 1e6
    header: str = ""  # the request header a "strip" rule removes
    hits: int = 0
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        self.regex = re.compile(self.pattern)


class FaultProxy:
    def __init__(self, upstream_port: int, rules: list[Rule] | None = None, rps: float | None = None,
                 seed: int = 7, tls: tuple[str, str] | None = None) -> None:
        """`tls`: (certificate, key) to speak HTTPS, to the client and to an HTTPS upstream alike."""
        self.upstream_port = upstream_port
        self.tls = tls
        self.rules = rules or []
        self.rps = rps
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.bytes_by_path: Counter[str] = Counter()
        self.ranges: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.seen: list[tuple[str, str, str, str]] = []  # (method, path, User-Agent, x-ms-client-request-id)
        self._tokens = float(rps or 0)
        self._last = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="faultproxy")
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = fut.result(10)
        return self

    async def _start(self) -> int:
        ctx = None
        if self.tls:
            import ssl

            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*self.tls)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=2**20, ssl=ctx)
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            # connections a client kept alive: end their handlers before the loop stops
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def set_rules(self, rules: list[Rule], rps: float | None = None) -> None:
        self._loop.call_soon_threadsafe(self._set_rules, rules, rps)

    def _set_rules(self, rules: list[Rule], rps: float | None) -> None:
        self.rules, self.rps = rules, rps

    # -- decisions (event-loop thread only) ----------------------------------------------------------
    def _admit(self) -> bool:
        if not self.rps:
            return True
        now = time.monotonic()
        self._tokens = min(self.rps, self._tokens + (now - self._last) * self.rps)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def _fault(self, what: str) -> Rule | None:
        for rule in self.rules:
            if rule.regex.search(what) and (rule.max_count is None or rule.hits < rule.max_count):
                if self.random.random() < rule.rate:
                    rule.hits += 1
                    return rule
        return None

    # -- one client connection ----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                path = target.split("?", 1)[0]
                self.counts["requests"] += 1
                self.ranges.append((method, path, headers.get("range", "")))
                self.seen.append((method, path, headers.get("user-agent", ""),
                                  headers.get("x-ms-client-request-id", "")))
                if not self._admit():
                    self.counts["throttled"] += 1
                    await self._error(writer, 503, "ServerBusy", retry_after=1)
                    continue
                rule = self._fault(f"{method} {path}")
                if rule is not None and rule.kind in ("503", "500", "404"):
                    self.counts[rule.kind] += 1
                    code = {"503": "ServerBusy", "500": "InternalError", "404": "BlobNotFound"}[rule.kind]
                    await self._error(writer, int(rule.kind), code, retry_after=rule.retry_after)
                    continue
                if rule is not None and rule.kind == "echo":
                    self.counts["echo"] += 1
                    await self._echo(writer, target)
                    continue
                if rule is not None and rule.kind == "strip":
                    name = rule.header.lower().encode("latin-1") + b":"
                    kept = [line for line in head.split(b"\r\n") if not line.lower().startswith(name)]
                    if len(kept) < len(head.split(b"\r\n")):
                        self.counts["strip"] += 1
                    head = b"\r\n".join(kept)
                if not await self._forward(method, target, path, head, body, writer, rule):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _error(self, writer: asyncio.StreamWriter, status: int, code: str, retry_after: int) -> None:
        body = ERROR_BODY % code.encode()
        writer.write(f"HTTP/1.1 {status} {code}\r\nContent-Length: {len(body)}\r\nContent-Type: application/xml\r\n"
                     f"x-ms-error-code: {code}\r\nRetry-After: {retry_after}\r\n\r\n".encode() + body)
        await writer.drain()

    async def _echo(self, writer: asyncio.StreamWriter, target: str) -> None:
        code = f"Denied {target}"
        body = (ERROR_BODY % code.encode("latin-1")).replace(b"injected", target.encode("latin-1"))
        writer.write(f"HTTP/1.1 403 {code}\r\nContent-Length: {len(body)}\r\nContent-Type: application/xml\r\n"
                     f"x-ms-error-code: {code}\r\n\r\n".encode("latin-1") + body)
        await writer.drain()

    async def _forward(self, method: str, target: str, path: str, head: bytes, body: bytes,
                       writer: asyncio.StreamWriter, rule: Rule | None) -> bool:
        """Relay one request to the upstream and its response back; False if the client connection is gone."""
        up_ssl = None
        if self.tls:
            import ssl

            up_ssl = ssl.create_default_context()
            up_ssl.check_hostname = False
            up_ssl.verify_mode = ssl.CERT_NONE  # loopback Azurite with the same test certificate
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=2**20,
                                                             ssl=up_ssl)
        try:
            head_lines = [line for line in head.decode("latin-1").split("\r\n")[:-2]
                          if not line.lower().startswith("connection:")]
            up_writer.write(("\r\n".join(head_lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1") + body)
            await up_writer.drain()
            resp_head = await up_reader.readuntil(b"\r\n\r\n")
            length = None
            kept = []
            for line in resp_head.decode("latin-1").split("\r\n")[:-2]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
                if not line.lower().startswith(("connection:", "keep-alive:")):  # hop-by-hop: ours, not upstream's
                    kept.append(line)
            resp_head = ("\r\n".join(kept) + "\r\n\r\n").encode("latin-1")
            writer.write(resp_head)
            if method == "HEAD" or length == 0:
                await writer.drain()
                return True
            if rule is not None and rule.kind == "stall":
                self.counts["stall"] += 1
                await asyncio.sleep(rule.stall_s)  # past the client's read timeout: it gives up
                return False
            cut = None
            if rule is not None and rule.kind == "reset" and length:
                cut = int(rule.reset_at if rule.reset_at > 1 else length * rule.reset_at)
            sent = 0
            while length is None or sent < length:
                want = 65536 if length is None else min(65536, length - sent)
                if cut is not None:
                    want = min(want, cut - sent)
                chunk = await up_reader.read(want)
                if not chunk:
                    break
                if rule is not None and rule.kind == "flip" and sent == 0:
                    self.counts["flip"] += 1
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]  # damaged in transit, same length
                writer.write(chunk)
                sent += len(chunk)
                self.bytes_by_path[path] += len(chunk)
                if rule is not None and rule.kind == "slow":
                    await writer.drain()
                    await asyncio.sleep(len(chunk) / rule.bytes_per_s)
                if cut is not None and sent >= cut:
                    await writer.drain()
                    self.counts["reset"] += 1
                    writer.transport.abort()  # a connection reset in the middle of the body
                    return False
            await writer.drain()
            return True
        finally:
            up_writer.close()
