"""The node-level cache: verified inputs kept across jobs on a shared pool, handed out as hard links.

Lives in SHARED/.nodekit-cache (a dot cannot occur in a Batch job id, so no job folder is ever
this folder). An object is keyed by its content when the source has a Content-MD5 (identical
content from two places is stored once), else by its location and ETag. The file system is the
index: `objects/<kk>/<key>` is the data (read-only, a hard link of a verified file that prep
placed), `<key>.json` beside it records its size, mtime, inode and MD5 and is written last.
An object counts only if both exist and the object's stat still matches the record, so a kill
at any point, or a task that wrote into an input file, leads to a dropped object and a fresh
download — never to a wrong or partial file. Least-recently-used objects that no job folder
links (link count 1) are evicted to stay within the budget; a new object that does not fit is
simply not cached. Safe from several preps at once (a lock guards adds and evictions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
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

    # -- paths ----------------------------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.objects / key[:2]
        return folder / key, folder / f"{key}.json"

    def lock(self, timeout: float = 600.0) -> JobLock:
        return JobLock(self.root, timeout, name="cache.lock")

    def open(self) -> None:
        """Create the cache's folders and repair what an interrupted run left. Safe to call at any time."""
        if os.path.islink(self.root):
            raise UsageError(f"{self.root} is a symbolic link: remove it (nodekit never follows it).")
        self.objects.mkdir(parents=True, exist_ok=True)
        with self.lock():
            self.repair()

    def repair(self) -> int:
        """Remove temporary files, objects without a record, records without an object; return how many."""
        removed = 0
        for folder in self.objects.iterdir() if self.objects.is_dir() else ():
            if not folder.is_dir() or folder.is_symlink():
                continue
            names = set(os.listdir(folder))
            for name in names:
                path = folder / name
                orphan = (".tmp" in name or (name.endswith(".json") and name[:-5] not in names)
                          or (not name.endswith(".json") and f"{name}.json" not in names))
                if orphan:
                    _unlink(path)
                    removed += 1
        if removed:
            log.info("cache: repaired %d leftover file(s) of an interrupted run", removed)
        return removed

    # -- reading --------------------------------------------------------------------------------
    def lookup(self, key: str) -> Hit | None:
        """The object for `key` if it is there and unchanged since it was recorded; a changed one is dropped."""
        obj, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            st = os.lstat(obj)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode) or [st.st_size, st.st_mtime_ns, st.st_ino] != [
                meta.get("size"), meta.get("mtime_ns"), meta.get("ino")]:
            log.warning("cache: %s changed since it was cached (a task wrote into an input file?): dropped", key[:12])
            self._drop(key)
            return None
        try:
            os.utime(meta_path)  # last use, for least-recently-used eviction
        except OSError:
            pass
        md5 = meta.get("md5")
        return Hit(obj, md5 if isinstance(md5, str) else None, bool(meta.get("verified")))

    # -- writing --------------------------------------------------------------------------------
    def fill(self, files: Iterable[tuple[str, Path | str, str | None, bool]]) -> None:
        """Make verified files of a job folder cached objects too: (key, path, md5, verified) each.

        One scan of the cache for the whole fill (sizes, link counts, last use): objects that no job
        folder links are evicted, least recently used first, to make room; a file that still does
        not fit stays uncached (it is in its job folder either way). Call it under `lock()`.
        """
        entries = self._entries()
        total = sum(size for _, size, _, _ in entries)
        budget = self._budget(total)
        evictable = sorted(e for e in entries if e[2] == 1)  # oldest use first; in use (links > 1): never
        known = {key for *_, key in entries}
        for key, path, md5, verified in files:
            if key in known:
                continue  # another job put the same content there already
            try:
                size = os.lstat(path).st_size
            except OSError:
                continue
            while total + size > budget and evictable:
                _, esize, _, ekey = evictable.pop(0)
                self._drop(ekey)
                self.evicted += 1
                total -= esize
            if total + size > budget:
                self.not_cached += 1
                continue
            if self._link_in(key, path, md5, verified):
                total += size
                known.add(key)
        while total > budget and evictable:  # a budget lowered since the last run
            _, esize, _, ekey = evictable.pop(0)
            self._drop(ekey)
            self.evicted += 1
            total -= esize

    def _link_in(self, key: str, final: Path | str, md5: str | None, verified: bool) -> bool:
        """Hard-link `final` in as object `key` (made read-only), then write its record: last."""
        folder = f"{self.objects}{os.sep}{key[:2]}"  # plain strings: this runs once per downloaded file
        obj, meta_path = f"{folder}{os.sep}{key}", f"{folder}{os.sep}{key}.json"
        st = os.lstat(final)
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
        record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "md5": md5,
                  "verified": verified}  # chmod changed none of these
        mtmp = f"{folder}{os.sep}.{key}.{os.getpid()}.json.tmp"
        fd = os.open(mtmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        try:
            os.write(fd, json.dumps(record).encode())
        finally:
            os.close(fd)
        os.replace(mtmp, meta_path)  # written last: from here on the object counts
        self.added += 1
        return True

    def _drop(self, key: str) -> None:
        obj, meta_path = self._paths(key)
        _unlink(meta_path)
        _unlink(obj)

    # -- the budget -----------------------------------------------------------------------------
    def _entries(self) -> list[tuple[float, int, int, str]]:
        """(last use, size, link count, key) of every recorded object."""
        out = []
        for folder in self.objects.iterdir() if self.objects.is_dir() else ():
            if not folder.is_dir():
                continue
            for name in os.listdir(folder):
                if not name.endswith(".json") or name.startswith("."):
                    continue
                key = name[:-5]
                try:
                    meta_st = os.stat(folder / name)
                    st = os.lstat(folder / key)
                except OSError:
                    continue
                out.append((meta_st.st_mtime, st.st_size, st.st_nlink, key))
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
