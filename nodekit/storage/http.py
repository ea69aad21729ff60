"""The HTTP client every remote store shares: kept-alive connections, retries, error mapping.

Each thread keeps its own connection per endpoint (wire.py: one socket and one reused buffer;
no pool lock and no http.client, whose import alone cost a warm re-run about 15 ms).

`HttpClient.request` retries 408, 429, 500, 502, 503, 504, connection failures and timeouts
with exponential backoff and full jitter, honouring `Retry-After`, until the run's deadline;
it maps 401/403 to AccessDenied, 404 to NotFound and 412 to SourceChanged, and never puts a
query string (where SAS tokens live) into a message.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping

from nodekit.errors import AccessDenied, NotFound, SourceError, TransientError
from nodekit.redact import display_url
from nodekit.storage import CHUNK, RunContext, Sink, SourceChanged
from nodekit.storage.wire import ERROR_BODY_MAX, Broken, Connection, Fields, KeptConnections, split_url

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
    import email.utils  # rare: not paid for by every run

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# What a broken connection, a timeout or a garbled response raises: all worth a retry
# (wire.Broken is a ConnectionError).
NetworkError = OSError


class Response:
    """A response whose body is read on demand; `release_conn` hands the connection back."""

    def __init__(self, client: HttpClient, conn: Connection, method: str, status: int, reason: str,
                 fields: Fields) -> None:
        self._client, self._conn, self._method = client, conn, method
        self.status = status
        self.reason = reason
        self.headers = fields
        self.data = b""
        self._done = method == "HEAD" or status in (204, 304)

    def read_all(self, limit: int | None = None) -> bytes:
        self.data = self._conn.read_body(self._method, self.status, self.headers, limit)
        self._done = True
        return self.data

    def stream(self, amount: int) -> Iterator[bytes]:
        """The body in pieces of at most `amount` bytes."""
        for piece in self._conn.pieces(self._method, self.status, self.headers):
            for i in range(0, len(piece), amount):
                yield bytes(piece[i:i + amount])
        self._done = True

    def release_conn(self) -> None:
        """Keep the connection for the next request if the body was read to its end, else close it."""
        conn = self._conn
        if conn is None:
            return
        if self._done:
            self._client._conns.keep(conn)
        else:
            conn.close()
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
        self._conns = KeptConnections(read_timeout)

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> Response:
        try:
            endpoint, target = split_url(url)
        except ValueError:
            raise SourceError(f"{display_url(url)} is not an http(s) URL.") from None
        conn, status, reason, fields = self._conns.exchange(endpoint, method, target, headers, body)
        log.debug("%s %s -> %s", method, display_url(url), status)
        return Response(self, conn, method, status, reason, fields)

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
                body_text = resp.read_all(ERROR_BODY_MAX)
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
    return err.why if isinstance(err, Broken) else type(err).__name__


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
