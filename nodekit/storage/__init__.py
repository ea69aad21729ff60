"""Storage behind one small interface: what prep reads from and release writes to.

Contract of every `Store` (the same test suite runs against each implementation):

- `list_files(on_batch=None)` returns every file under the source's root, names relative to
  it and '/'-separated, in one pass. If `on_batch` is given it is also called with the files
  in batches as they are found (perhaps from other threads, never at once), all of them
  before `list_files` returns: a caller can work on a large listing while it is still coming.
  A root that does not exist raises NotFound; a refused credential raises AccessDenied;
  storage that keeps failing raises TransientError once the run's deadline is reached. An
  existing but empty root returns [].
- `fetch(file, start, length, sink)` calls `sink` with the bytes [start, start+length) of
  `file`, in order, each byte exactly once, in pieces of at most 1 MiB. Transient failures are
  retried and resumed from the last byte delivered. If the file changed since it was listed,
  it raises SourceChanged (a TransientError); if it is gone, NotFound.
- `supports_ranges(file)` says whether a read from the middle costs no more than the range.

Stores that speak HTTP (Azure, a plain URL) do not `fetch` themselves: they give the request of
each file (`get_request(file) -> (url, headers)`, `where(file)`, and `access` for the credential)
and the download engine (storage/fetch.py) runs many of them at once.

A `WritableStore` (a container or a local folder given to release) also:

- `head(name)` returns the object's RemoteFile (size, content_md5) or None if it is absent;
- `read_small(name)` returns a small object's bytes, or None if it is absent;
- `put(name, chunks)` writes the chunks as one object, replacing an object of that name,
  never visible half-written; it stores the MD5 of the whole (Content-MD5) and returns it.
  `content_type` is the object's Content-Type (a folder keeps none). With `create_only` it
  never replaces anything: when an object of that name exists (also one that another writer
  created while this one was uploading) nothing is written and it raises ObjectExists, which
  carries the size and MD5 of what was to be written. Two writers of one name never mix their
  bytes: each one's blocks are its own.
Stores are safe to use from many threads at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from nodekit.errors import TransientError

CHUNK = 1024 * 1024  # bytes handed to a sink at a time


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source, as listed. `identity` decides whether a local copy is current."""

    name: str
    size: int
    etag: str
    last_modified: str  # as the source reports it (RFC 1123 for HTTP, ISO 8601 for local)
    content_md5: str | None = None  # base64, when the source has one
    tier: str | None = None  # the blob's access tier ("Archive", "Rehydrating", "Hot", ...): not part of identity

    @property
    def identity(self) -> dict[str, object]:
        return {"etag": self.etag, "size": self.size, "last_modified": self.last_modified,
                "content_md5": self.content_md5}


class SourceChanged(TransientError):
    """The file changed at the source while it was being read."""


class ObjectExists(Exception):
    """`put(..., create_only=True)` found an object of that name: nothing was written.

    `written` is what would have been written (its size and Content-MD5), to compare with what
    storage holds. Not a NodekitError: the caller decides (same content, or a conflict).
    """

    def __init__(self, name: str, written: RemoteFile) -> None:
        super().__init__(f"{name} exists")
        self.name = name
        self.written = written


@dataclass
class RunContext:
    """What every transfer of one run shares: the deadline, a retry counter and a stop flag."""

    timeout: float
    started: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    _retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def retries(self) -> int:
        return self._retries

    def retry_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Count a retry and return the seconds to wait before it (see `backoff`)."""
        import random  # only a run that retries needs it

        with self._lock:
            self._retries += 1
        if retry_after is not None:
            # The server said when to come back: believe it, spread over up to twice that, so that
            # many clients throttled at once do not return in lockstep (and none waits far longer).
            wait = min(max(retry_after, 0.1), 60.0)
            return random.uniform(wait, 2 * wait)
        return random.uniform(0, min(30.0, 0.2 * (2 ** min(attempt, 10))))  # exponential, full jitter

    def backoff(self, attempt: int, what: str, last_error: str, retry_after: float | None = None) -> None:
        """Count a retry and sleep before it: Retry-After (jittered up to twice) when the server gave one,
        else exponential backoff with full jitter.

        Raises TransientError instead when the sleep would pass the deadline or the run is stopping.
        """
        delay = self.retry_delay(attempt, retry_after)
        if self.stop.is_set() or delay >= self.remaining():
            raise TransientError(
                f"{what}: gave up after {attempt} retries within the {self.timeout:g} s timeout "
                f"(last error: {last_error}); a later run may succeed."
            )
        if self.stop.wait(delay):
            raise TransientError(f"{what}: stopped while waiting to retry (last error: {last_error}).")


Sink = Callable[[bytes], None]


def hand_over(files: list[RemoteFile], on_batch: Callable[[list[RemoteFile]], None] | None) -> list[RemoteFile]:
    """For a store that lists in one piece: `list_files`'s `on_batch` gets it all, then the caller."""
    if on_batch is not None:
        on_batch(files)
    return files


class Store(Protocol):
    """A source of files (see the module docstring for the contract)."""

    display: str  # safe to print: no secrets
    credential_kind: str  # how it authenticates, e.g. "SAS token in the URL" (never the value)

    def list_files(self, on_batch: Callable[[list[RemoteFile]], None] | None = None) -> list[RemoteFile]: ...

    def fetch(self, file: RemoteFile, start: int, length: int, sink: Sink) -> None: ...

    def supports_ranges(self, file: RemoteFile) -> bool: ...


class WritableStore(Protocol):
    """A destination for release (see the module docstring for the contract)."""

    display: str
    credential_kind: str

    def head(self, name: str) -> RemoteFile | None: ...

    def read_small(self, name: str) -> bytes | None: ...

    def put(self, name: str, chunks: Iterable[bytes], *, metadata: dict[str, str] | None = None,
            content_type: str | None = None, create_only: bool = False) -> RemoteFile: ...
