"""The HTTP client every remote store shares: kept-alive connections, retries, error mapping.

Each thread keeps its own `http.client` connection per host (no pool lock, no per-request
pool bookkeeping: measured leaner than urllib3 here, and a lighter import for warm re-runs).

`HttpClient.request` retries 408, 429, 500, 502, 503, 504, connection failures and timeouts
with exponential backoff and full jitter, honouring `Retry-After`, until the run's deadline;
it maps 401/403 to AccessDenied, 404 to NotFound and 412 to SourceChanged, and never puts a
query string (where SAS tokens live) into a message.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from nodekit.errors import AccessDenied, NotFound, SourceError, TransientError
from nodekit.redact import display_url
from nodekit.storage import CHUNK, RunContext, Sink, SourceChanged

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_DETAIL = re.compile(rb"<AuthenticationErrorDetail>([^<]{1,300})</AuthenticationErrorDetail>")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# What a broken connection, a timeout or a garbled response raises: all worth a retry.
NetworkError = (OSError, http.client.HTTPException)


class Response:
    """A response whose body is read on demand; `release_conn` hands the connection back."""

    def __init__(self, client: HttpClient, key: tuple[str, str, int], conn: http.client.HTTPConnection,
                 raw: http.client.HTTPResponse) -> None:
        self._client, self._key, self._conn, self._raw = client, key, conn, raw
        self.status = raw.status
        self.reason = raw.reason
        self.headers = raw.headers
        self.data = b""

    def read_all(self) -> bytes:
        self.data = self._raw.read()
        return self.data

    def stream(self, amount: int) -> Iterator[bytes]:
        while True:
            piece = self._raw.read1(amount) if hasattr(self._raw, "read1") else self._raw.read(amount)
            if not piece:
                return
            yield piece

    def release_conn(self) -> None:
        """Keep the connection for the next request if the body was read to its end, else close it."""
        if self._conn is None:
            return
        raw = self._raw
        done = raw.isclosed() or (not raw.chunked and raw.length == 0)  # read1 leaves it open at the end
        if done and not raw.will_close:
            raw.close()  # finished: the connection may send the next request
            self._client._keep(self._key, self._conn)
        else:
            self._conn.close()
        self._conn = None  # type: ignore[assignment]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]


def describe_status(resp: Response, body: bytes) -> str:
    """'403 AuthenticationFailed' style text from a failed response (no URL, no secrets)."""
    code = resp.headers.get("x-ms-error-code")
    if not code:
        m = _CODE.search(body)
        code = m.group(1).decode("utf-8", "replace") if m else (resp.reason or "")
    return f"{resp.status} {code}".strip()


class HttpClient:
    """HTTP with retries; safe to share between threads (each thread has its own connections)."""

    def __init__(self, ctx: RunContext, *, read_timeout: float = 60.0) -> None:
        self.ctx = ctx
        self.read_timeout = read_timeout
        self._local = threading.local()
        self._ssl: Any = None  # an ssl.SSLContext, made (and ssl imported) on the first https request

    def _keep(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        self._local.__dict__.setdefault("conns", {})[key] = conn

    def _connection(self, key: tuple[str, str, int]) -> http.client.HTTPConnection:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.pop(key, None)
        if conn is not None:
            return conn
        scheme, host, port = key
        if scheme == "https":
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            return http.client.HTTPSConnection(host, port, timeout=self.read_timeout, context=self._ssl)
        return http.client.HTTPConnection(host, port, timeout=self.read_timeout)

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> Response:
        parts = urlsplit(url)
        scheme = parts.scheme
        key = (scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80))
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = self._connection(key)
        try:
            conn.request(method, target, body=body, headers=dict(headers))
            raw = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if method == "HEAD":
            raw.read()
        log.debug("%s %s -> %s", method, display_url(url), raw.status)
        return Response(self, key, conn, raw)

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        what: str,
        stream: bool = False,
        credential_kind: str = "",
        body: bytes | None = None,
    ) -> Response:
        """Send one request, retrying transient failures; return a 2xx/206 response.

        With `stream`, the body is left unread for the caller (who must call `release_conn`).
        Raises AccessDenied, NotFound, SourceChanged, SourceError or TransientError.
        """
        attempt = 0
        while True:
            if self.ctx.stop.is_set():
                raise TransientError(f"{what}: not started, the run is stopping after another error.")
            try:
                resp = self._send(method, url, headers, body)
            except NetworkError as err:
                attempt += 1
                self.ctx.backoff(attempt, what, _error_name(err))
                continue
            if resp.status < 300:
                if not stream:
                    try:
                        resp.read_all()
                    except NetworkError as err:
                        resp.close()
                        attempt += 1
                        self.ctx.backoff(attempt, what, _error_name(err))
                        continue
                    resp.release_conn()
                return resp
            try:
                body_text = resp.read_all() if method != "HEAD" else b""
            except NetworkError:
                body_text = b""
            resp.release_conn()
            status = describe_status(resp, body_text)
            if resp.status in RETRY_STATUS:
                attempt += 1
                self.ctx.backoff(attempt, what, status, retry_after_seconds(resp.headers.get("Retry-After")))
                continue
            raise _permanent(resp, body_text, status, what, url, credential_kind)


def _error_name(err: BaseException) -> str:
    """A short, secret-free description of a network exception (never its text: it may hold a URL)."""
    return type(err).__name__


def _permanent(resp: Response, body: bytes, status: str, what: str, url: str,
               credential_kind: str) -> Exception:
    shown = display_url(url)
    if resp.status in (401, 403):
        detail = _DETAIL.search(body)
        text = detail.group(1).decode("utf-8", "replace") if detail else ""
        expired = "expir" in text.lower() or "time frame" in text.lower()
        how = f" using {credential_kind}" if credential_kind else ""
        if expired:
            return AccessDenied(f"{what}: access denied ({status}){how}: the SAS has expired or is not yet valid; "
                                "make a new one.")
        return AccessDenied(f"{what}: access denied ({status}){how}: check the key, SAS or role assignment "
                            f"for {shown}.")
    if resp.status == 404:
        return NotFound(f"{what}: not found ({status}) at {shown}: check the account, container and path.")
    if resp.status == 412:
        return SourceChanged(f"{what}: changed at the source while being read ({status}); run again.")
    return SourceError(f"{what}: storage refused the request ({status}) at {shown}.")


def stream_body(
    client: HttpClient,
    url: str,
    headers: Mapping[str, str],
    start: int,
    length: int,
    sink: Sink,
    *,
    what: str,
    credential_kind: str,
    ranges: bool = True,
) -> None:
    """GET bytes [start, start+length) of `url` into `sink`, resuming after broken transfers.

    Without `ranges` (a server that ignores Range), the whole body is fetched and the bytes
    before `start` dropped. Raises what `HttpClient.request` raises.
    """
    if length == 0:
        return
    pos = start
    end = start + length
    attempt = 0
    while pos < end:
        h = dict(headers)
        if ranges:
            h["Range"] = f"bytes={pos}-{end - 1}"
        resp = client.request("GET", url, h, what=what, stream=True, credential_kind=credential_kind)
        skip = pos if resp.status == 200 else 0
        try:
            for piece in resp.stream(CHUNK):
                if skip:
                    if len(piece) <= skip:
                        skip -= len(piece)
                        continue
                    piece = piece[skip:]
                    skip = 0
                if len(piece) > end - pos:
                    piece = piece[: end - pos]
                if piece:
                    sink(piece)
                    pos += len(piece)
                if pos >= end:
                    break
        except NetworkError as err:
            resp.close()
            attempt += 1
            client.ctx.backoff(attempt, what, f"{_error_name(err)} after {pos - start} bytes")
            continue
        except BaseException:
            resp.close()
            raise
        if pos >= end:
            resp.release_conn()  # keeps the connection only if the body was read to its end
        else:
            resp.close()
        if pos < end:
            attempt += 1
            client.ctx.backoff(attempt, what, f"response ended early after {pos - start} of {length} bytes")
