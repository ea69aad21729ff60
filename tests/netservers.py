"""Real servers on loopback for the network tests: a forward proxy, a managed-identity token endpoint,
and a TLS server that presents a given certificate. Each runs in a thread and stops by `stop()`.

- `ForwardProxy`: what HTTPS_PROXY / HTTP_PROXY point at. It tunnels `CONNECT host:port` and forwards
  absolute-URI requests (`GET http://host:port/path`), counting both by target. Targets on
  127.0.0.2 are reached at 127.0.0.1 (where the servers listen): a client that reaches 127.0.0.2
  at all went through this proxy, since nothing listens there.
- `TokenEndpoint`: Azure App Service's managed-identity endpoint (IDENTITY_ENDPOINT and
  IDENTITY_HEADER, which azure-identity's ManagedIdentityCredential uses), issuing unsigned JWTs
  that Azurite's `--oauth basic` accepts. It can be told to fail from some point on.
- `TlsStub`: completes TLS handshakes with its certificate, then closes: enough for a client to
  judge the certificate.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def _relay(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _loopback(host: str) -> str:
    return "127.0.0.1" if host == "127.0.0.2" else host


class ForwardProxy:
    """A loopback forward proxy (CONNECT tunnels and absolute-URI requests); see the module docstring."""

    def __init__(self, routes: dict[str, int] | None = None) -> None:
        """`routes`: "host:port" -> a loopback port that stands for it (an Azure host name, say)."""
        self.routes = routes or {}
        self.tunnels: Counter[str] = Counter()  # "host:port" -> CONNECTs
        self.requests: Counter[str] = Counter()  # "METHOD host:port" -> forwarded requests
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True, name="forward-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ForwardProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline(65536).decode("latin-1")
                if not line:
                    return
                method, target, _ = line.split(" ", 2)
                head = []
                while (h := reader.readline(65536)) not in (b"\r\n", b"\n", b""):
                    head.append(h.decode("latin-1"))
                if method == "CONNECT":
                    host, _, port = target.rpartition(":")
                    self.tunnels[target] += 1
                    if target in self.routes:
                        host, port = "127.0.0.1", str(self.routes[target])
                    upstream = socket.create_connection((_loopback(host), int(port)))
                    # clients wait for this answer before they send: nothing of theirs is buffered yet
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    t = threading.Thread(target=_relay, args=(upstream, conn), daemon=True)
                    t.start()
                    _relay(conn, upstream)
                    t.join()
                    return
                parts = urlsplit(target)
                self.requests[f"{method} {parts.netloc}"] += 1
                length = 0
                fields = []
                for h in head:
                    name, _, value = h.partition(":")
                    if name.strip().lower() in ("proxy-connection", "connection"):
                        continue
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                    fields.append(h)
                body = reader.read(length) if length else b""
                host = parts.hostname or ""
                with socket.create_connection((_loopback(host), parts.port or 80)) as up:
                    path = parts.path + (f"?{parts.query}" if parts.query else "")
                    up.sendall(f"{method} {path} HTTP/1.1\r\n{''.join(fields)}Connection: close\r\n\r\n"
                               .encode("latin-1") + body)
                    response = b""
                    while data := up.recv(65536):
                        response += data
                head_end = response.find(b"\r\n\r\n")
                resp_head = response[:head_end].decode("latin-1").split("\r\n")
                resp_body = response[head_end + 4:]
                if any(h.lower().startswith("transfer-encoding: chunked") for h in resp_head):
                    resp_body = _dechunk(resp_body)
                kept = [h for h in resp_head[1:] if not h.lower().startswith(
                    ("connection:", "transfer-encoding:", "content-length:", "keep-alive:"))]
                if method != "HEAD":
                    kept.append(f"Content-Length: {len(resp_body)}")
                else:
                    kept += [h for h in resp_head[1:] if h.lower().startswith("content-length:")]
                conn.sendall(("\r\n".join([resp_head[0], *kept]) + "\r\n\r\n").encode("latin-1")
                             + (resp_body if method != "HEAD" else b""))
        except (OSError, ValueError):
            return
        finally:
            conn.close()


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def jwt(*, minutes: float = 60.0, tenant: str = "72f988bf-86f1-41af-91ab-2d7cd011db47") -> tuple[str, int]:
    """An unsigned JWT for Azure Storage as Azurite's basic OAuth check wants it, and its expiry."""
    now = int(time.time())
    exp = now + int(minutes * 60)

    def b64(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    payload = {"aud": "https://storage.azure.com", "iss": f"https://sts.windows.net/{tenant}/", "iat": now,
               "nbf": now - 60, "exp": exp, "oid": str(uuid.uuid4()), "tid": tenant, "appid": str(uuid.uuid4())}
    return f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64(payload)}.c2lnbmF0dXJl", exp


class TokenEndpoint:
    """App Service's managed-identity endpoint on loopback (see the module docstring).

    `minutes`: the lifetime of the tokens it issues. `fail_after`: from that many tokens on, answer
    500 (a failing IMDS-like endpoint). `client_ids` records the client id of each request.
    """

    def __init__(self, minutes: float = 60.0, fail_after: int | None = None) -> None:
        self.secret = uuid.uuid4().hex
        self.minutes = minutes
        self.fail_after = fail_after
        self.issued = 0
        self.failed = 0
        self.client_ids: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                outer.client_ids.append((query.get("client_id") or [None])[0])
                if self.headers.get("X-IDENTITY-HEADER") != outer.secret:
                    self._answer(401, {"error": "unauthorized"})
                    return
                if outer.fail_after is not None and outer.issued >= outer.fail_after:
                    outer.failed += 1
                    self._answer(500, {"error": "temporarily unavailable"})
                    return
                token, exp = jwt(minutes=outer.minutes)
                outer.issued += 1
                self._answer(200, {"access_token": token, "expires_on": str(exp), "resource": "https://storage.azure.com",
                                   "token_type": "Bearer", "client_id": outer.client_ids[-1]})

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="token-endpoint")

    def env(self, host: str = "127.0.0.1") -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": f"http://{host}:{self.port}/msi/token", "IDENTITY_HEADER": self.secret}

    def start(self) -> TokenEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class TlsStub:
    """Offers TLS handshakes with `cert`/`key` (counting connections), then closes each connection."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert, key)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="tls-stub")
        self.connections = 0

    def start(self) -> TlsStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            try:
                with self._ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass


Answer = tuple[int, dict[str, str], bytes]


class ScriptedServer:
    """An HTTP server on loopback whose every answer comes from `script(method, path, query)`; it counts requests."""

    def __init__(self, script: Callable[[str, str, dict[str, list[str]]], Answer]) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                outer.requests += 1
                parts = urlsplit(self.path)
                status, headers, body = script(self.command, parts.path, parse_qs(parts.query))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="scripted")

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
