"""One file by plain http(s) URL as a store (a release archive, a model on a web server).

Redirects are followed (at most 5, http and https only): libcurl sends no credential header to
another host, and a query string (a SAS) is never carried over, since the new URL is the
server's. The final URL is shown in the report (without its query string).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from nodekit.redact import display_url
from nodekit.storage import RemoteFile, RunContext, hand_over
from nodekit.storage.fetch import head
from nodekit.storage.net import NetConfig


class UrlStore:
    """The single file at `url`; its identity is its ETag, Last-Modified and Content-Length."""

    credential_kind = "none (plain URL)"
    follow_redirects = True
    access = None

    def __init__(self, url: str, net: NetConfig, ctx: RunContext) -> None:
        self.url = url
        self.net = net
        self.ctx = ctx
        self.display = display_url(url)
        self.final_display = self.display
        self._ranges = False
        if "sig=" in (urlsplit(url).query or ""):
            self.credential_kind = "SAS token in the URL"

    def list_files(self, on_batch: Callable[[list[RemoteFile]], None] | None = None) -> list[RemoteFile]:
        return hand_over(self._list(), on_batch)

    def _list(self) -> list[RemoteFile]:
        h, final = head(self.net, self.ctx, self.url, what=f"checking {self.display}", where=self.display,
                        follow=True, read_timeout=self.net.read_timeout)
        self.final_display = display_url(final) if final else self.display
        name = unquote(urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1])
        self._ranges = h.get("accept-ranges", "").lower() == "bytes"
        etag = (h.get("etag") or "").removeprefix("W/").strip('"')
        md5 = h.get("content-md5") or h.get("x-ms-blob-content-md5") or None
        try:
            size = int(h.get("content-length") or 0)
        except ValueError:
            from nodekit.errors import SourceError

            raise SourceError(f"{self.display}: the server gives a size that is not a number.") from None
        return [RemoteFile(name, size, etag, h.get("last-modified") or "", md5)]

    def supports_ranges(self, file: RemoteFile) -> bool:
        return self._ranges

    def get_request(self, file: RemoteFile) -> tuple[str, list[str]]:
        headers = [f'If-Match: "{file.etag}"'] if file.etag and self._ranges else []
        return self.url, headers

    def where(self, file: RemoteFile) -> str:
        return self.final_display
