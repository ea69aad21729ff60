"""azure-core's transport on libcurl: what nodekit's own azure-core pipeline (listings, properties) sends with.

azure-core takes any `HttpTransport` (its documented extension point); this one hands each request
to libcurl, the stack the downloads use (storage/fetch.py), so that proxies, trust, timeouts and the
User-Agent are set in one place (storage/net.py), and a warm re-run, which only lists, does not
import requests and urllib3 at all (about 45 ms of its 0.27 s here, measured with `-X importtime`).
The Azure SDK's own clients (release's uploads, azure-identity's token requests) keep azure-core's
RequestsTransport. Bodies are read whole (listing pages and error answers are small); a libcurl
failure is raised as `CurlError`, which storage/retry.py judges by its libcurl error code.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest import HttpRequest, HttpResponse
from azure.core.utils import CaseInsensitiveDict

from nodekit.storage.net import CONNECT_TIMEOUT, NetConfig


class CurlError(ServiceRequestError):
    """libcurl could not complete the request: `errno` is its error code, `why` its message (no query string)."""

    def __init__(self, errno: int, why: str) -> None:
        super().__init__(f"libcurl error {errno}: {why}")
        self.errno = errno
        self.why = why


class CurlTransport(HttpTransport):
    """Sends azure-core requests with libcurl, one kept-alive handle per thread. Safe from many threads."""

    def __init__(self, net: NetConfig) -> None:
        self.net = net
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()

    def __enter__(self) -> CurlTransport:
        return self

    def __exit__(self, *args: Any) -> None:
        self.close()

    def open(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            for c in self._handles:
                c.close()
            self._handles.clear()
        self._local = threading.local()

    def _handle(self, read_timeout: float) -> Any:
        c = getattr(self._local, "handle", None)
        if c is None:
            from nodekit.storage.fetch import new_handle

            c = self._local.handle = new_handle(self.net, read_timeout)
            with self._lock:
                self._handles.append(c)
        return c

    def send(self, request: HttpRequest, **kwargs: Any) -> HttpResponse:  # type: ignore[override]
        import pycurl

        read_timeout = float(kwargs.get("read_timeout") or self.net.read_timeout)
        c = self._handle(read_timeout)
        lines: list[bytes] = []
        body: list[bytes] = []
        c.setopt(pycurl.URL, request.url)
        c.setopt(pycurl.PROXY, self.net.proxy_for(request.url) or "")
        c.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in request.headers.items()])
        c.setopt(pycurl.CONNECTTIMEOUT, max(1, int(float(kwargs.get("connection_timeout") or CONNECT_TIMEOUT))))
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, round(read_timeout)))
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.HEADERFUNCTION, lines.append)
        c.setopt(pycurl.WRITEFUNCTION, body.append)
        if request.method == "HEAD":
            c.setopt(pycurl.NOBODY, 1)
        elif request.method == "GET":
            c.setopt(pycurl.HTTPGET, 1)
        else:  # nodekit's pipeline reads; the SDK's clients, which write, have their own transport
            raise ValueError(f"CurlTransport sends GET and HEAD, not {request.method}")
        try:
            c.perform()
        except pycurl.error as err:
            self._local.handle = None  # the connection may be in any state: a new handle next time
            c.close()
            raise CurlError(err.args[0], str(err.args[1]) if len(err.args) > 1 else "") from None
        from nodekit.storage.fetch import _headers, _reason, _status

        headers: MutableMapping[str, str] = CaseInsensitiveDict(_headers(lines))
        return _CurlResponse(request, _status(lines), _reason(lines), headers, b"".join(body))


class _CurlResponse(HttpResponse):
    """A whole response, as azure-core's `HttpResponse` interface reads it."""

    def __init__(self, request: HttpRequest, status: int, reason: str, headers: MutableMapping[str, str],
                 content: bytes) -> None:
        self._request, self._status, self._reason, self._headers = request, status, reason, headers
        self._content = content
        self._encoding: str | None = None

    @property
    def request(self) -> HttpRequest:
        return self._request

    @property
    def status_code(self) -> int:
        return self._status

    @property
    def headers(self) -> MutableMapping[str, str]:
        return self._headers

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def content_type(self) -> str | None:
        return self._headers.get("Content-Type")

    @property
    def is_closed(self) -> bool:
        return True

    @property
    def is_stream_consumed(self) -> bool:
        return True

    @property
    def encoding(self) -> str | None:
        return self._encoding or "utf-8"

    @encoding.setter
    def encoding(self, value: str | None) -> None:
        self._encoding = value

    @property
    def url(self) -> str:
        return self._request.url

    @property
    def content(self) -> bytes:
        return self._content

    def text(self, encoding: str | None = None) -> str:
        return self._content.decode(encoding or self.encoding or "utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self._content)

    def raise_for_status(self) -> None:
        if self._status >= 400:
            from azure.core.exceptions import HttpResponseError

            raise HttpResponseError(response=self)  # type: ignore[arg-type]

    def __enter__(self) -> _CurlResponse:
        return self

    def __exit__(self, *args: Any) -> None:
        return None

    def close(self) -> None:
        return None

    def read(self) -> bytes:
        return self._content

    def iter_raw(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._content

    def iter_bytes(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._content
