"""The node-level cache: verified inputs kept across jobs on a shared pool, handed out as hard links.

Lives in SHARED/.nodekit-cache (a dot cannot occur in a Batch job id, so no job folder is ever
this folder). An object is keyed by its content when the source has a Content-MD5 (identical
content from two places is stored once), else by its location and ETag.

- `objects/<kk>/<key>` is the data: a read-only hard link of a verified file that prep placed.
- `index.jsonl` says which objects count, one JSON line each, appended whole with O_APPEND:
  `{"k": key, "size", "mtime_ns", "ino", "md5", "verified", "t"}` once the object is linked
  (written last: from that line on it counts), `{"k": key, "drop": true}` when it goes, and
  `{"k": key, "t": time}` when a job takes it (least-recently-used order). The last line about a
  key wins. One file instead of a record file per object: filling the cache cost a cold prep of
  2,000 files a tenth of its time with a file each (measured), and a lookup now costs one lstat.

An object counts only if its line says so and its stat still matches the line, so a kill at any
point, or a task that wrote into an input file, leads to a dropped object and a fresh download —
never to a wrong or partial file. A torn last line (a power cut) is ignored. Least-recently-used
objects that no job folder links (link count 1) are evicted to stay within the budget; a new
object that does not fit is simply not cached. Safe from several preps at once: adds, evictions,
repairs and compactions hold the cache's lock; lookups read the index as it was when the cache
was opened (an object added since is a miss, never a wrong file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodekit.errors import UsageError
from nodekit.spec import parse_budget  # noqa: F401  (re-exported)
from nodekit.state import JobLock
from nodekit.storage import RemoteFile

log = logging.getLogger(__name__)

CACHE_DIR = ".nodekit-cache"
INDEX = "index.jsonl"
_WRITE_EVERY = 64  # index lines buffered before one write


def cache_key(source_id: str, remote: RemoteFile) -> str:
    """Content identity when the source has an MD5, else location + ETag + size."""
    basis = (f"md5:{remote.content_md5}:{remote.size}" if remote.content_md5
             else f"at:{source_id}|{remote.name}|{remote.etag}|{remote.size}|{remote.last_modified}")
    return hashlib.sha256(basis.encode()).hexdigest()


@dataclass(frozen=True)
class Hit:
    """A valid cached object: where it is and what was recorded when it was verified."""

    path: Path
    md5: str | None
    verified: bool


class NodeCache:
    """The cache of one node (see the module docstring). Methods raise only OSError subclasses."""

    def __init__(self, shared: Path, max_bytes: int | None = None, max_share: float | None = 0.5) -> None:
        self.root = shared / CACHE_DIR
        self.objects = self.root / "objects"
        self.max_bytes = max_bytes
        self.max_share = max_share
        self.added = 0
        self.evicted = 0
        self.not_cached = 0
        self._folders: set[str] = set()
        self._index: dict[str, dict[str, Any]] | None = None  # live records by key, as loaded
        self._lines = 0  # lines in the index file when it was loaded
        self._pending: list[str] = []  # lines not yet written

    # -- paths and the index ------------------------------------------------------------------------
    def _object(self, key: str) -> str:
        return f"{self.objects}{os.sep}{key[:2]}{os.sep}{key}"

    def lock(self, timeout: float = 600.0) -> JobLock:
        return JobLock(self.root, timeout, name="cache.lock")

    def _load(self) -> dict[str, dict[str, Any]]:
        """The live records (read once; `open` and `fill` read again under the lock)."""
        if self._index is None:
            index: dict[str, dict[str, Any]] = {}
            lines = 0
            try:
                with open(self.root / INDEX, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                data = b""
            for raw in data.splitlines():
                lines += 1
                try:
                    line = json.loads(raw)
                    key = line["k"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line: what it would have said does not count
                if line.get("drop"):
                    index.pop(key, None)
                elif "size" in line:
                    index[key] = line
                elif key in index and "t" in line:
                    index[key]["t"] = line["t"]
            self._index, self._lines = index, lines
        return self._index

    def _note(self, line: dict[str, Any]) -> None:
        self._pending.append(json.dumps(line, separators=(",", ":")) + "\n")
        if len(self._pending) >= _WRITE_EVERY:
            self.flush()

    def flush(self) -> None:
        """Append the buffered index lines in one write (whole lines: never half a record)."""
        if not self._pending:
            return
        data = "".join(self._pending).encode()
        self._pending = []
        fd = os.open(self.root / INDEX, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    # -- opening and repair -------------------------------------------------------------------------
    def open(self) -> None:
        """Create the cache's folders and repair what an interrupted run left. Safe to call at any time."""
        if os.path.islink(self.root):
            raise UsageError(f"{self.root} is a symbolic link: remove it (nodekit never follows it).")
        self.objects.mkdir(parents=True, exist_ok=True)
        with self.lock():
            self.repair()

    def repair(self) -> int:
        """Under the lock: remove objects the index does not count, leftover temporary files, and
        index lines about objects that are gone; compact the index when it is mostly history."""
        self._index = None
        index = self._load()
        removed = 0
        present: set[str] = set()
        for name in os.listdir(self.root):
            if name.endswith(".tmp"):  # a compaction cut short
                _unlink(self.root / name)
                removed += 1
        for folder in self.objects.iterdir() if self.objects.is_dir() else ():
            if not folder.is_dir() or folder.is_symlink():
                continue
            for name in os.listdir(folder):
                if name in index:
                    present.add(name)
                else:  # linked but never recorded (killed in between), or an old-format file
                    _unlink(folder / name)
                    removed += 1
        for key in [k for k in index if k not in present]:
            del index[key]  # recorded, but its object is gone
            removed += 1
        if removed:
            log.info("cache: repaired %d leftover(s) of an interrupted run", removed)
        if removed or self._lines > 2 * len(index) + 1000:
            self._compact()
        return removed

    def _compact(self) -> None:
        """Rewrite the index as just its live records (temporary file, then rename)."""
        assert self._index is not None
        tmp = self.root / f"{INDEX}.{os.getpid()}.tmp"
        tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self._index.values()),
                       encoding="utf-8")
        os.replace(tmp, self.root / INDEX)
        self._lines = len(self._index)

    # -- reading --------------------------------------------------------------------------------
    def lookup(self, key: str) -> Hit | None:
        """The object for `key` if it is there and unchanged since it was recorded; a changed one is dropped."""
        meta = self._load().get(key)
        if meta is None:
            return None
        obj = self._object(key)
        try:
            st = os.lstat(obj)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or [st.st_size, st.st_mtime_ns, st.st_ino] != [
                meta.get("size"), meta.get("mtime_ns"), meta.get("ino")]:
            log.warning("cache: %s changed since it was cached (a task wrote into an input file?): dropped", key[:12])
            self._drop(key)
            return None
        meta["t"] = time.time()
        self._note({"k": key, "t": meta["t"]})  # last use, for least-recently-used eviction
        md5 = meta.get("md5")
        return Hit(Path(obj), md5 if isinstance(md5, str) else None, bool(meta.get("verified")))

    # -- writing --------------------------------------------------------------------------------
    def fill(self, files: Iterable[tuple[str, Path | str, str | None, bool]]) -> None:
        """Make verified files of a job folder cached objects too: (key, path, md5, verified) each.

        One look at the cache for the whole fill (sizes, link counts, last use): objects that no
        job folder links are evicted, least recently used first, to make room; a file that still
        does not fit stays uncached (it is in its job folder either way). Call it under `lock()`.
        """
        self.flush()
        self._index = None  # what other preps added since this one opened the cache counts too
        entries = self._entries()
        total = sum(size for _, size, _, _ in entries)
        budget = self._budget(total)
        evictable = sorted(e for e in entries if e[2] == 1)  # oldest use first; in use (links > 1): never
        known = {key for *_, key in entries}
        try:
            for key, path, md5, verified in files:
                if key in known:
                    continue  # another job put the same content there already
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                while total + st.st_size > budget and evictable:
                    _, esize, _, ekey = evictable.pop(0)
                    self._drop(ekey)
                    self.evicted += 1
                    total -= esize
                if total + st.st_size > budget:
                    self.not_cached += 1
                    continue
                if self._link_in(key, path, st, md5, verified):
                    total += st.st_size
                    known.add(key)
            while total > budget and evictable:  # a budget lowered since the last run
                _, esize, _, ekey = evictable.pop(0)
                self._drop(ekey)
                self.evicted += 1
                total -= esize
        finally:
            self.flush()

    def _link_in(self, key: str, final: Path | str, st: os.stat_result, md5: str | None, verified: bool) -> bool:
        """Hard-link `final` in as object `key` (made read-only), then note its record: last."""
        folder = f"{self.objects}{os.sep}{key[:2]}"
        obj = f"{folder}{os.sep}{key}"
        if st.st_mode & 0o222:
            os.chmod(final, stat.S_IMODE(st.st_mode) & 0o444)  # read-only: the job's file and the object are one
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        try:
            os.link(final, obj)  # a new name appears whole: no temporary name needed
        except FileExistsError:
            _unlink(obj)  # an orphan without a record (the repair runs first, so: a race with another fill)
            try:
                os.link(final, obj)
            except OSError:
                return False
        except OSError:
            return False  # another file system, or links not allowed: the job keeps its file, uncached
        record = {"k": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "md5": md5,
                  "verified": verified, "t": time.time()}  # chmod changed none of the stat fields
        self._load()[key] = record
        self._note(record)  # from here on the object counts
        self.added += 1
        return True

    def _drop(self, key: str) -> None:
        self._note({"k": key, "drop": True})  # first the line: an unlisted object is only an orphan
        self.flush()
        self._load().pop(key, None)
        _unlink(self._object(key))

    # -- the budget -----------------------------------------------------------------------------
    def _entries(self) -> list[tuple[float, int, int, str]]:
        """(last use, size, link count, key) of every recorded object that is there."""
        out = []
        for key, meta in self._load().items():
            try:
                st = os.lstat(self._object(key))
            except OSError:
                continue
            out.append((float(meta.get("t") or 0), st.st_size, st.st_nlink, key))
        return out

    def usage(self) -> int:
        return sum(size for _, size, _, _ in self._entries())

    def _budget(self, usage: int) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        free = shutil.disk_usage(self.root).free
        return int((free + usage) * (self.max_share or 0.5))

    def purge(self) -> bool:
        """Delete the whole cache (never following links); True if there was one."""
        if os.path.islink(self.root):
            os.unlink(self.root)
            return True
        if not self.root.exists():
            return False
        shutil.rmtree(self.root)
        return True


def _unlink(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def describe(cache: NodeCache) -> dict[str, Any]:
    return {"dir": str(cache.root), "added": cache.added, "evicted": cache.evicted, "not_cached": cache.not_cached}
