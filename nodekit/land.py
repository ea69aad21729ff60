"""The landing of a file: never a half-written file under a final name.

A file arrives under a temporary name in its own folder (`.NAME.nodekit-partial`, or a short
hashed name when that would pass the file system's 255-byte limit), hashed as it is written when
an MD5 is wanted; `check` compares its size and MD5 with the source's; `place` gives it the
source's modification time and renames it into place with `os.replace` (atomic). The caller
records it in the job's state only then. Any failure removes the temporary file (`discard`);
a run killed in between leaves only temporary files, which the next run sweeps (plan.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nodekit.errors import IntegrityError, InTheWay
from nodekit.names import PARTIAL_SUFFIX, too_long
from nodekit.storage import RemoteFile

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
_UTIME_FD = os.utime in os.supports_fd
HOLD = 256 * 1024  # bytes gathered before a write: a small file goes to disk in one system call


def partial_name(name: str) -> str:
    """The temporary name of a file called `name`: a dot, the name, the suffix; short when that is too long."""
    candidate = f".{name}{PARTIAL_SUFFIX}"
    if not too_long(candidate):
        return candidate
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:24]}{PARTIAL_SUFFIX}"


@functools.lru_cache(maxsize=4096)
def mtime_ns(last_modified: str) -> int | None:
    """The source's modification time in ns, from RFC 1123 or ISO 8601 text."""
    if not last_modified:
        return None
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(last_modified)
    except (TypeError, ValueError):
        try:
            when = datetime.fromisoformat(last_modified)
        except ValueError:
            return None
    return int(when.timestamp() * 1_000_000_000)


def check(name: str, remote: RemoteFile, size: int, hasher: Any) -> tuple[str | None, bool]:
    """(MD5 in base64, or None if not hashed; verified) for what arrived, or IntegrityError."""
    if size != remote.size:
        raise IntegrityError(f"{name}: got {size} bytes, the source lists {remote.size}.")
    if hasher is None:
        return None, False
    md5 = base64.b64encode(hasher.digest()).decode()
    if remote.content_md5:
        if md5 != remote.content_md5:
            raise IntegrityError(f"{name}: MD5 {md5} does not match the source's Content-MD5 {remote.content_md5}.")
        return md5, True
    return md5, False


class Landing:
    """One file arriving in one stream: `begin`, `write` pieces in order (`rewind` starts over), then
    `finish` (check, mtime, rename) or `discard`. `tmp` and `final` are paths as strings."""

    __slots__ = ("buffered", "fd", "final", "hash_wanted", "hasher", "held", "mode", "name", "on_bytes", "remote",
                 "size", "tmp")

    def __init__(self, name: str, remote: RemoteFile, final: str, *, hash_wanted: bool, mode: int = 0o644,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.remote = remote
        self.final = final
        folder, _, base = final.rpartition(os.sep)
        self.tmp = f"{folder}{os.sep}{partial_name(base)}"
        self.hash_wanted = hash_wanted
        self.mode = mode
        self.on_bytes = on_bytes
        self.fd = -1
        self.size = 0
        self.hasher: Any = None
        self.held: list[bytes] = []  # pieces not yet written: small files go to disk in one write
        self.buffered = 0

    def begin(self) -> None:
        self.fd = os.open(self.tmp, _FLAGS, self.mode)
        self.hasher = hashlib.md5() if self.hash_wanted else None
        self.size = 0

    def write(self, data: bytes) -> None:
        """Take the next piece (hashed now, written once HOLD bytes have gathered, or by `finish`)."""
        if self.hasher is not None:
            self.hasher.update(data)
        n = len(data)
        self.size += n
        self.held.append(data)
        self.buffered += n
        if self.buffered >= HOLD:
            self._flush()
        if self.on_bytes is not None:
            self.on_bytes(n)

    def _flush(self) -> None:
        data = memoryview(self.held[0] if len(self.held) == 1 else b"".join(self.held))
        self.held.clear()
        self.buffered = 0
        while data:
            data = data[os.write(self.fd, data):]

    def rewind(self) -> None:
        self.held.clear()
        self.buffered = 0
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.hasher = hashlib.md5() if self.hash_wanted else None
        self.size = 0

    def finish(self) -> tuple[str | None, bool, os.stat_result]:
        """Check what arrived, give it the source's mtime and rename it into place: (md5, verified, stat).

        IntegrityError leaves the temporary file open for a `rewind`; OSError is the caller's to map."""
        md5, verified = check(self.name, self.remote, self.size, self.hasher)
        if self.held:
            self._flush()
        mtime = mtime_ns(self.remote.last_modified)
        if mtime is not None and _UTIME_FD:
            os.utime(self.fd, ns=(mtime, mtime))
        st = os.fstat(self.fd)
        os.close(self.fd)
        self.fd = -1
        if mtime is not None and not _UTIME_FD:  # pragma: no cover - Windows
            os.utime(self.tmp, ns=(mtime, mtime))
            st = os.stat(self.tmp)
        try:
            os.replace(self.tmp, self.final)
        except IsADirectoryError:
            raise InTheWay(f"{self.final} is a folder where the source has a file; remove it and run again.") \
                from None
        return md5, verified, st

    def discard(self) -> None:
        """Close and remove the temporary file (safe to call more than once)."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
