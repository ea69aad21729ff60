"""One file by plain http(s) URL as a store (a release archive, a model on a web server)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from nodekit.redact import display_url
from nodekit.storage import RemoteFile, Sink, hand_over
from nodekit.storage.http import HttpClient, stream_body


class UrlStore:
    """The single file at `url`; its identity is its ETag, Last-Modified and Content-Length."""

    credential_kind = "none (plain URL)"

    def __init__(self, url: str, http: HttpClient) -> None:
        self.url = url
        self.http = http
        self.display = display_url(url)
        self._ranges = False
        if "sig=" in (urlsplit(url).query or ""):
            self.credential_kind = "SAS token in the URL"

    def list_files(self, on_batch: Callable[[list[RemoteFile]], None] | None = None) -> list[RemoteFile]:
        return hand_over(self._list(), on_batch)

    def _list(self) -> list[RemoteFile]:
        resp = self.http.request("HEAD", self.url, {}, what=f"checking {self.display}",
                                 credential_kind=self.credential_kind)
        h = resp.headers
        name = unquote(urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1])
        self._ranges = h.get("Accept-Ranges", "").lower() == "bytes"
        etag = (h.get("ETag") or "").removeprefix("W/").strip('"')
        md5 = h.get("Content-MD5") or h.get("x-ms-blob-content-md5") or None
        return [RemoteFile(name, int(h.get("Content-Length") or 0), etag, h.get("Last-Modified") or "", md5)]

    def supports_ranges(self, file: RemoteFile) -> bool:
        return self._ranges

    def fetch(self, file: RemoteFile, start: int, length: int, sink: Sink) -> None:
        headers = {"If-Match": f'"{file.etag}"'} if file.etag and self._ranges else {}
        stream_body(self.http, self.url, headers, start, length, sink, what=f"reading {self.display}",
                    credential_kind=self.credential_kind, ranges=self._ranges)
