"""The HTTP client every remote store shares: pooled connections, retries, error mapping.

`HttpClient.request` retries 408, 429, 500, 502, 503, 504, connection failures and timeouts
with exponential backoff and full jitter, honouring `Retry-After`, until the run's deadline;
it maps 401/403 to AccessDenied, 404 to NotFound and 412 to SourceChanged, and never puts a
query string (where SAS tokens live) into a message.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from nodekit.errors import AccessDenied, NotFound, SourceError, TransientError
from nodekit.redact import display_url
from nodekit.storage import CHUNK, RunContext, Sink, SourceChanged

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


def describe_status(resp: urllib3.BaseHTTPResponse, body: bytes) -> str:
    """'403 AuthenticationFailed' style text from a failed response (no URL, no secrets)."""
    code = resp.headers.get("x-ms-error-code")
    if not code:
        m = _CODE.search(body)
        code = m.group(1).decode("utf-8", "replace") if m else (resp.reason or "")
    return f"{resp.status} {code}".strip()


class HttpClient:
    """Pooled HTTP with retries; safe to share between threads."""

    def __init__(self, ctx: RunContext, pool_size: int, *, read_timeout: float = 60.0) -> None:
        self.ctx = ctx
        self.pool = urllib3.PoolManager(
            num_pools=8,
            maxsize=pool_size,
            retries=False,
            timeout=urllib3.Timeout(connect=15.0, read=read_timeout),
        )

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
    ) -> urllib3.BaseHTTPResponse:
        """Send one request, retrying transient failures; return a 2xx/206 response.

        With `stream`, the body is left unread for the caller (who must release it).
        Raises AccessDenied, NotFound, SourceChanged, SourceError or TransientError.
        """
        attempt = 0
        while True:
            if self.ctx.stop.is_set():
                raise TransientError(f"{what}: not started, the run is stopping after another error.")
            try:
                resp = self.pool.request(method, url, headers=dict(headers), body=body, preload_content=False,
                                         redirect=False)
            except Urllib3Error as err:
                attempt += 1
                self.ctx.backoff(attempt, what, _error_name(err))
                continue
            if resp.status < 300:
                if not stream:
                    try:
                        resp.read(cache_content=True)  # then resp.data holds the body
                    except Urllib3Error as err:
                        attempt += 1
                        self.ctx.backoff(attempt, what, _error_name(err))
                        continue
                    finally:
                        resp.release_conn()
                return resp
            try:
                body = resp.read() if method != "HEAD" else b""
            except Urllib3Error:
                body = b""
            resp.release_conn()
            status = describe_status(resp, body)
            if resp.status in RETRY_STATUS:
                attempt += 1
                self.ctx.backoff(attempt, what, status, retry_after_seconds(resp.headers.get("Retry-After")))
                continue
            raise _permanent(resp, body, status, what, url, credential_kind)


def _error_name(err: Exception) -> str:
    """A short, secret-free description of a urllib3 exception (its text may contain the URL)."""
    reason = getattr(err, "reason", None)
    inner = type(reason).__name__ if isinstance(reason, Exception) else ""
    return f"{type(err).__name__}{f' ({inner})' if inner else ''}"


def _permanent(resp: urllib3.BaseHTTPResponse, body: bytes, status: str, what: str, url: str,
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
            for piece in resp.stream(CHUNK, decode_content=False):
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
        except Urllib3Error as err:
            attempt += 1
            client.ctx.backoff(attempt, what, f"{_error_name(err)} after {pos - start} bytes")
            continue
        finally:
            if pos >= end:
                resp.drain_conn()  # reads what is left (nothing, for a range)
                resp.release_conn()
            else:
                resp.close()  # a broken or stalled connection is not reused
                resp.release_conn()
        if pos < end:
            attempt += 1
            client.ctx.backoff(attempt, what, f"response ended early after {pos - start} of {length} bytes")
