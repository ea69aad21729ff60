"""Carry out downloads: atomic placement, verification, progress (the decision is in plan.py).

`Downloader` streams files into a temporary name in the destination folder: files up to 16 MiB
as pipelined GETs (storage/pipeline.py), larger ones as parallel ranges written with `pwrite`
and hashed in order as they complete, anything that fails there again through the store with
retries. It verifies size and Content-MD5, sets the source's modification time, renames into
place with `os.replace`, and only then journals the record. Every failure path removes its
temporary file. Imported only when something is to be downloaded.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nodekit.errors import IntegrityError, LocalIOError, NodekitError, UnsafeInput
from nodekit.names import PARTIAL_SUFFIX
from nodekit.plan import (  # noqa: F401  (Action, LocalStat, decide, human_bytes: re-exported)
    Action,
    LocalStat,
    PlannedFile,
    _disk_error,
    _unlink_quietly,
    decide,
    human_bytes,
)
from nodekit.state import Record, StateStore
from nodekit.storage import CHUNK, RunContext, Store
from nodekit.storage.http import RETRY_STATUS, retry_after_seconds
from nodekit.storage.pipeline import DEFAULT_DEPTH, Body, Endpoint, Failure, Get, RangeReader, fetch_pipelined
from nodekit.storage.wire import split_url

log = logging.getLogger(__name__)

RANGE_THRESHOLD = 16 * 1024 * 1024  # files above this are fetched as parallel ranges
RANGE_SIZE = 64 * 1024 * 1024  # 8 MiB ranges cost Azurite 2x the CPU for the same bytes (measured)
INTEGRITY_ATTEMPTS = 3


@functools.lru_cache(maxsize=4096)
def _mtime_ns(last_modified: str) -> int | None:
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


class Progress:
    """Counters shared by the workers, and a thread that prints a line every `interval` seconds."""

    def __init__(self, total_files: int, total_bytes: int, emit: Callable[[str], None], interval: float) -> None:
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.files = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._emit = emit
        self._interval = interval
        self._done = threading.Event()
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def file_done(self) -> None:
        with self._lock:
            self.files += 1

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return (f"prep: {self.files}/{self.total_files} files, {human_bytes(self.bytes)}/"
                f"{human_bytes(self.total_bytes)}, {human_bytes(self.bytes / elapsed)}/s")

    def __enter__(self) -> Progress:
        if self._interval > 0:
            self._thread = threading.Thread(target=self._run, name="nodekit-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self._emit(self.line())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread:
            self._thread.join()


class _Writer:
    """Positional writes into one file from many threads (pwrite where the OS has it)."""

    def __init__(self, path: Path, size: int) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self.fd = os.open(path, flags, 0o644)
        self._lock = threading.Lock()
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise

    def write_at(self, data: bytes | memoryview, offset: int) -> None:
        if hasattr(os, "pwrite"):
            while data:
                n = os.pwrite(self.fd, data, offset)
                data, offset = data[n:], offset + n
            return
        with self._lock:  # pragma: no cover - Windows
            os.lseek(self.fd, offset, os.SEEK_SET)
            while data:
                data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _BigFile:
    """A large file being fetched as ranges; the worker that finishes the last range places it."""

    item: PlannedFile
    final: Path
    tmp: Path
    pending: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: _Writer | None = None
    failed: bool = False
    # The MD5 follows the ranges as they complete, in order (reading each back from the page cache),
    # so that hashing overlaps the rest of the download instead of following it.
    hasher: Any = None  # None: no MD5 wanted, or no positional reads here (hashed at the end)
    hashed_to: int = 0  # bytes [0, hashed_to) are in the hasher
    done: dict[int, int] = field(default_factory=dict)  # completed ranges not yet hashed: start -> end
    hashing: bool = False  # a thread is feeding the hasher


class _Dropped:
    """A body nobody wants (the run is stopping, or its file could not be opened)."""

    def write(self, data: memoryview) -> None:
        return None

    def finish(self) -> None:
        return None

    def discard(self) -> None:
        return None


_DROPPED = _Dropped()
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
_UTIME_FD = os.utime in os.supports_fd


class _Incoming:
    """A file arriving through the pipeline: written to its temporary name and hashed as it comes,
    then verified and placed by `finish` (or fetched again through the pool if it does not verify)."""

    __slots__ = ("dl", "error", "fd", "final", "hasher", "item", "size", "tmp")

    def __init__(self, dl: Downloader, item: PlannedFile) -> None:
        self.dl = dl
        self.item = item
        parent, _, name = item.path.rpartition("/")  # plain strings: this runs once per file
        folder = dl.job_root + parent.replace("/", os.sep) if parent else dl.job_root[:-1]
        if folder not in dl._folders_ok:
            dl._ensure_parent(dl._final(item.path))
            dl._folders_ok.add(folder)
        self.final = f"{folder}{os.sep}{name}"
        self.tmp = f"{folder}{os.sep}.{name}{PARTIAL_SUFFIX}"
        self.fd = os.open(self.tmp, _FLAGS, dl.file_mode)
        self.hasher = dl._hasher(item)
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: memoryview) -> None:
        self.size += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        if self.error is None:
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError as err:
                self.error = err  # reported by finish; the rest of the body is only read

    def discard(self) -> None:
        os.close(self.fd)
        self.fd = -1
        _unlink_quietly(self.tmp)

    def finish(self) -> None:
        dl, item = self.dl, self.item
        try:
            if self.error is not None:
                raise self.error
            try:
                md5, verified = dl._check(item, self.size, self.hasher)
            except IntegrityError as err:
                self.discard()
                log.debug("%s: %s; fetching it again with retries", item.path, err)
                dl.ctx.retry_delay(1)  # counted as a retry, like a mismatch on the pool's path
                dl._refetch(item, 0.0)
                return
            assert item.remote is not None
            mtime = _mtime_ns(item.remote.last_modified)
            if mtime is not None and _UTIME_FD:
                os.utime(self.fd, ns=(mtime, mtime))
            st = os.fstat(self.fd)
            os.close(self.fd)
            self.fd = -1
            if mtime is not None and not _UTIME_FD:  # pragma: no cover - Windows
                os.utime(self.tmp, ns=(mtime, mtime))
                st = os.stat(self.tmp)
            os.replace(self.tmp, self.final)
        except BaseException as err:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            _unlink_quietly(self.tmp)
            if isinstance(err, IsADirectoryError):
                err = LocalIOError(f"{self.final} is a folder where the source has a file; remove it and run again.")
            elif isinstance(err, OSError):
                err = _disk_error(err, Path(self.tmp))
            if not isinstance(err, Exception):
                raise
            dl._fail(item, err)
            return
        dl.progress.add_bytes(self.size)
        dl._record(item, self.final, md5, verified, st=st)


class Downloader:
    """Downloads planned files into `job_dir`; safe to re-run after any interruption."""

    def __init__(self, job_dir: Path, stores: list[Store], ctx: RunContext, state: StateStore,
                 concurrency: int, progress: Progress, read_timeout: float = 60.0,
                 pipeline: int = DEFAULT_DEPTH, hash_all: bool = True) -> None:
        self.job_dir = job_dir
        self.stores = stores
        self.ctx = ctx
        self.state = state
        self.concurrency = concurrency
        self.pipeline = pipeline
        self.hash_all = hash_all  # False: files without a source MD5 are not hashed (--md5 source)
        self._ranges = RangeReader(read_timeout)
        self.progress = progress
        self.read_timeout = read_timeout
        self._refetch: Callable[[PlannedFile, float], None] = self._whole
        self.on_placed: Callable[[PlannedFile], None] | None = None  # called for each file downloaded and placed
        self._errors: list[NodekitError] = []
        self._dirs_ok: set[Path] = {job_dir}
        self.job_root = str(job_dir) + os.sep
        self._folders_ok: set[str] = set()  # parent folders (as strings) known to exist, for _Incoming
        self.file_mode = 0o644  # 0o444 when the cache will take the files anyway (saves a chmod each)
        self._dirs_lock = threading.Lock()
        self.placed: dict[str, Record] = {}
        self._placed_lock = threading.Lock()

    # -- paths -----------------------------------------------------------------------------
    def _ensure_parent(self, final: Path) -> None:
        """Create the folders above `final`, refusing to pass through a symbolic link."""
        parent = final.parent
        with self._dirs_lock:
            if parent in self._dirs_ok:
                return
            chain = []
            p = parent
            while p not in self._dirs_ok and p != self.job_dir:
                chain.append(p)
                p = p.parent
            for d in reversed(chain):
                if os.path.islink(d):
                    raise UnsafeInput(f"{d} is a symbolic link: refusing to write through it; remove it and run again.")
                try:
                    os.mkdir(d)
                except FileExistsError:
                    if not os.path.isdir(d):
                        raise LocalIOError(f"{d} is a file where nodekit needs a folder; remove it and run again.") \
                            from None
                except OSError as err:
                    raise _disk_error(err, d) from err
                self._dirs_ok.add(d)

    def _final(self, path: str) -> Path:
        return self.job_dir.joinpath(*path.split("/"))

    # -- running ---------------------------------------------------------------------------
    def run(self, items: list[PlannedFile]) -> list[NodekitError]:
        """Download every item (action DOWNLOAD); return the errors (the first fatal one stops the rest).

        Large files go as parallel ranges to a thread pool; the other files of a store that
        speaks HTTP go through pipelined connections (storage/pipeline.py), and any of those that
        does not come back as a clean 200 is fetched again by the pool, with retries.
        """
        self._errors = []
        from concurrent.futures import Future, ThreadPoolExecutor  # not paid for by a warm re-run

        big = [i for i in items if i.remote and i.remote.size > RANGE_THRESHOLD
               and self.stores[i.source or 0].supports_ranges(i.remote)]
        big.sort(key=lambda i: -(i.remote.size if i.remote else 0))
        ranged = {id(i) for i in big}  # by identity: PlannedFile's == compares every field
        fast: dict[Endpoint, list[Get]] = {}
        threaded: list[PlannedFile] = []
        for item in items:
            if id(item) in ranged:
                continue
            get = self._fast_get(item)
            if get is None:
                threaded.append(item)
            else:
                fast.setdefault(get[0], []).append(get[1])
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="nodekit-dl") as pool:
            futures: list[Future[None]] = []
            for item in big:
                assert item.remote is not None
                final = self._final(item.path)
                ranges = [(s, min(RANGE_SIZE, item.remote.size - s)) for s in range(0, item.remote.size, RANGE_SIZE)]
                job = _BigFile(item, final, final.with_name("." + final.name + PARTIAL_SUFFIX), len(ranges))
                futures += [pool.submit(self._guard, self._range, job, s, n) for s, n in ranges]
            futures += [pool.submit(self._guard, self._whole, item) for item in threaded]

            def refetch(item: PlannedFile, delay: float = 0.0) -> None:
                futures.append(pool.submit(self._guard, self._whole, item, delay))

            def on_fallback(get: Get, failure: Failure) -> float:
                """Hand the file to the pool; a retryable failure counts as a retry and backs off first."""
                delay = self._retry_delay(failure)
                log.debug("%s: %s on the pipelined path; fetching it again with retries", get.item.path, failure.why)
                refetch(get.item, delay)
                return delay

            self._refetch = refetch
            try:
                for endpoint, gets in fast.items():
                    fetch_pipelined(endpoint, gets, connections=self._pipelined_connections(), depth=self.pipeline,
                                    read_timeout=self.read_timeout, receiver=self, on_fallback=on_fallback,
                                    stop=self.ctx.stop)
            except Exception as err:  # a bug in a connection thread: stop cleanly, report it
                self._errors.append(NodekitError(f"unexpected error while downloading: {type(err).__name__}: {err}"))
            finally:
                for f in futures:
                    f.result()
                self._refetch = self._whole
        return self._errors

    def _retry_delay(self, failure: Failure) -> float:
        """What a failure of a fast path costs before the file is fetched again: a retry and its backoff
        when a retry may help (a network failure or a retryable status), nothing otherwise."""
        if failure.status is None or failure.status in RETRY_STATUS:
            return self.ctx.retry_delay(1, retry_after_seconds(failure.retry_after))
        return 0.0

    def _pipelined_connections(self) -> int:
        """Connections for the pipelined path: `concurrency` requests in flight in all (at least 2 connections,
        so that one slow response does not hold everything up)."""
        return max(2, -(-self.concurrency // max(1, self.pipeline)))

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one unit of work; record its error on the item and stop the run when it is fatal."""
        item: PlannedFile = args[0].item if isinstance(args[0], _BigFile) else args[0]
        if self.ctx.stop.is_set() and fn != self._range:  # ranges run on to release their file
            return None
        try:
            return fn(*args)
        except Exception as err:
            self._fail(item, err)
        return None

    def _fail(self, item: PlannedFile, err: Exception) -> None:
        """Record `err` on `item`; stop the run when it is fatal (or a bug)."""
        if isinstance(err, NodekitError):
            item.error = str(err)
            with self._placed_lock:
                self._errors.append(err)
            if not err.retryable or isinstance(err, LocalIOError) or self.ctx.remaining() <= 0:
                self.ctx.stop.set()
            log.error("failed: %s: %s", item.path, err)
            return
        item.error = f"{type(err).__name__}: {err}"  # a bug: stop cleanly, report it
        with self._placed_lock:
            self._errors.append(NodekitError(f"unexpected error on {item.path}: {type(err).__name__}: {err}"))
        self.ctx.stop.set()
        log.error("unexpected error on %s", item.path, exc_info=err)

    def _direct(self, item: PlannedFile) -> tuple[Endpoint, str, dict[str, str]] | None:
        """(endpoint, target, headers) of a plain GET of `item`, or None when its store has no such thing."""
        remote = item.remote
        request = getattr(self.stores[item.source or 0], "get_request", None)
        if remote is None or request is None:
            return None
        url, headers = request(remote)
        try:
            endpoint, target = split_url(url)
        except ValueError:
            return None
        return endpoint, target, headers

    def _fast_get(self, item: PlannedFile) -> tuple[Endpoint, Get] | None:
        """The pipelined request for a file, or None when it must go through the pool."""
        direct = self._direct(item) if self.pipeline >= 1 else None
        if direct is None or item.remote is None:
            return None
        endpoint, target, headers = direct
        # a run can outlast a bearer token: each pipelined request takes the headers of its moment
        auth = getattr(self.stores[item.source or 0], "auth_headers", None)
        return endpoint, Get(item, target, headers, item.remote.size, auth)

    def open(self, get: Get) -> Body:
        """Where the pipelined body of `get` goes: its temporary file (see `_Incoming`)."""
        item: PlannedFile = get.item
        if self.ctx.stop.is_set():
            return _DROPPED
        try:
            return _Incoming(self, item)
        except OSError as err:
            self._fail(item, _disk_error(err, self._final(item.path)))
        except Exception as err:
            self._fail(item, err)
        return _DROPPED

    def _record(self, item: PlannedFile, final: Path | str, md5: str | None, verified: bool, cached: bool = False,
                st: os.stat_result | None = None) -> None:
        """Journal what was placed at `final` (`st`: its stat, if the caller has it)."""
        item.cached = cached
        remote = item.remote
        assert remote is not None
        if st is None:
            st = os.lstat(final)
        record: Record = {**remote.identity, "md5": md5, "verified": verified,
                          "local_size": st.st_size, "local_mtime_ns": st.st_mtime_ns}
        self.state.append(item.path, record)
        with self._placed_lock:
            self.placed[item.path] = record
        item.md5, item.verified, item.placed = md5, verified, True
        self.progress.file_done()
        if self.on_placed is not None and not cached:
            self.on_placed(item)
        log.debug("%s %s (%s, %s)", "from the cache" if item.cached else "downloaded", item.path,
                  human_bytes(remote.size),
                 "verified" if verified else "unverified: the source has no checksum; MD5 recorded")

    def place_cached(self, item: PlannedFile, obj: Path, md5: str | None, verified: bool) -> bool:
        """Put the cached object `obj` in place of `item` (a hard link, else a copy); False if it cannot."""
        final = self._final(item.path)
        self._ensure_parent(final)
        tmp = final.with_name("." + final.name + PARTIAL_SUFFIX)
        try:
            if _same_file(obj, final):  # a killed run placed this very object but did not record it
                self._record(item, final, md5, verified, cached=True)
                return True
            try:
                os.link(obj, tmp)
            except OSError:
                import shutil

                shutil.copy2(obj, tmp)  # another file system: a copy, as the last resort
            os.replace(tmp, final)
            _unlink_quietly(tmp)  # rename(2) of two links to one inode succeeds and does nothing
        except OSError as err:
            _unlink_quietly(tmp)
            log.warning("cache: could not place %s from the cache (%s): downloading it", item.path, err.strerror)
            return False
        self._record(item, final, md5, verified, cached=True)
        return True

    def _hasher(self, item: PlannedFile) -> Any:
        """An MD5 for `item`'s bytes, or None when it needs none (no source MD5 and --md5 source)."""
        return hashlib.md5() if self.hash_all or (item.remote and item.remote.content_md5) else None

    def _check(self, item: PlannedFile, got_size: int, hasher: Any) -> tuple[str | None, bool]:
        """(md5 base64 or None if not hashed, verified) or IntegrityError."""
        remote = item.remote
        assert remote is not None
        if got_size != remote.size:
            raise IntegrityError(f"{item.path}: got {got_size} bytes, the source lists {remote.size}.")
        if hasher is None:
            return None, False
        md5 = base64.b64encode(hasher.digest()).decode()
        if remote.content_md5:
            if md5 != remote.content_md5:
                raise IntegrityError(f"{item.path}: MD5 {md5} does not match the source's Content-MD5 "
                                     f"{remote.content_md5}.")
            return md5, True
        return md5, False

    def _place(self, item: PlannedFile, tmp: Path, final: Path) -> None:
        assert item.remote is not None
        mtime = _mtime_ns(item.remote.last_modified)
        try:
            if mtime is not None:
                os.utime(tmp, ns=(mtime, mtime))
            os.replace(tmp, final)
        except IsADirectoryError:
            raise LocalIOError(f"{final} is a folder where the source has a file; remove it and run again.") from None
        except OSError as err:
            raise _disk_error(err, final) from err

    def _stream_to(self, tmp: Path, store: Store, item: PlannedFile) -> tuple[int, Any]:
        """Fetch `item` into `tmp` in one stream, hashing as it is written: (size, MD5 hasher or None)."""
        remote = item.remote
        assert remote is not None
        hasher = self._hasher(item)
        size = 0
        try:
            with open(tmp, "wb") as fh:
                def sink(data: bytes) -> None:
                    nonlocal size
                    fh.write(data)
                    if hasher is not None:
                        hasher.update(data)
                    size += len(data)
                    self.progress.add_bytes(len(data))

                store.fetch(remote, 0, remote.size, sink)
        except OSError as err:
            raise _disk_error(err, tmp) from err
        return size, hasher

    def _whole(self, item: PlannedFile, delay: float = 0.0) -> None:
        """One request stream per file (after `delay` seconds): hash while writing, verify, place."""
        if delay > 0 and self.ctx.stop.wait(min(delay, max(0.0, self.ctx.remaining()))):
            return
        remote = item.remote
        assert remote is not None
        store = self.stores[item.source or 0]
        final = self._final(item.path)
        self._ensure_parent(final)
        tmp = final.with_name("." + final.name + PARTIAL_SUFFIX)
        try:
            for attempt in range(1, INTEGRITY_ATTEMPTS + 1):
                size, hasher = self._stream_to(tmp, store, item)
                try:
                    md5, verified = self._check(item, size, hasher)
                    break
                except IntegrityError as err:
                    if attempt == INTEGRITY_ATTEMPTS:
                        raise
                    self.ctx.backoff(attempt, f"downloading {item.path}", str(err))
            self._place(item, tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        self._record(item, final, md5, verified)

    def _range(self, job: _BigFile, start: int, length: int) -> None:
        """One range of a large file; the last range to finish verifies and places the file."""
        remote = job.item.remote
        assert remote is not None
        store = self.stores[job.item.source or 0]
        ok = False
        try:
            with job.lock:
                if job.failed or self.ctx.stop.is_set():
                    return
                if job.writer is None:
                    self._ensure_parent(job.final)
                    try:
                        job.writer = _Writer(job.tmp, remote.size)
                    except OSError as err:
                        raise _disk_error(err, job.tmp) from err
                    job.hasher = self._hasher(job.item) if _PREADV else None
            writer = job.writer
            pos = start

            def sink(data: bytes | memoryview) -> None:
                nonlocal pos
                if job.failed or self.ctx.stop.is_set():
                    raise _Abandoned()
                try:
                    writer.write_at(data, pos)
                except OSError as err:
                    raise _disk_error(err, job.tmp) from err
                pos += len(data)
                self.progress.add_bytes(len(data))

            try:
                direct = self._direct(job.item)
                if direct is not None:  # the lean path first; what it does not deliver, the store fetches with retries
                    _, failure = self._ranges.read(*direct, start, length, sink)
                    if failure is not None:
                        log.debug("%s: %s on the direct range path; going on with retries", job.item.path,
                                  failure.why)
                        delay = self._retry_delay(failure)
                        if delay > 0 and self.ctx.stop.wait(min(delay, max(0.0, self.ctx.remaining()))):
                            raise _Abandoned()
                if pos < start + length:
                    store.fetch(remote, pos, start + length - pos, sink)
            except _Abandoned:
                return
            self._hash_ahead(job, start, start + length)  # before this range counts as done (see below)
            ok = True
        finally:
            with job.lock:
                job.failed = job.failed or not ok
                job.pending -= 1
                last = job.pending == 0
            if last and job.failed:
                self._discard_big(job)
        if last:
            self._finish_big(job)

    def _discard_big(self, job: _BigFile) -> None:
        if job.writer is not None:
            job.writer.close()
            job.writer = None
        _unlink_quietly(job.tmp)

    def _hash_ahead(self, job: _BigFile, start: int, end: int) -> None:
        """Note the range [start, end) as complete and feed the hasher every range that now follows on.

        One thread at a time feeds it; a range that completes meanwhile is picked up by that thread.
        A range counts as done (`pending`) only after this returns, so while any thread hashes, the
        last range has not finished: `_finish_big` never runs beside it.
        """
        with job.lock:
            if job.hasher is None:
                return
            job.done[start] = end
            if job.hashing:
                return
            job.hashing = True
        try:
            self._drain_hash(job, holds_turn=True)
        except BaseException:
            with job.lock:
                job.hashing = False
            raise

    def _drain_hash(self, job: _BigFile, holds_turn: bool = False) -> None:
        """Feed the hasher every completed range that follows on from what it has, in order.

        With `holds_turn`, the turn to hash is given up under the same lock that finds nothing more
        to do, so a range completing just then is never left for nobody.
        """
        while True:
            with job.lock:
                begin = job.hashed_to
                stop = job.done.pop(begin, None)
                if stop is None or job.failed:
                    if holds_turn:
                        job.hashing = False
                    return
            assert job.writer is not None
            try:
                _hash_range(job.writer.fd, begin, stop, job.hasher)
            except OSError as err:
                raise _disk_error(err, job.tmp) from err
            with job.lock:
                job.hashed_to = stop

    def _finish_big(self, job: _BigFile) -> None:
        """Finish the hash, verify the file and place it (or fetch it again in one stream)."""
        item = job.item
        try:
            assert job.writer is not None
            if job.hasher is not None:
                self._drain_hash(job)  # whatever completed last (no other thread hashes any more)
            job.writer.close()
            job.writer = None
            try:
                if job.hasher is not None:  # a gap would show as a short size, and fail the check
                    hasher, size = job.hasher, job.hashed_to
                else:  # no MD5 wanted, or no positional reads on this system: hash the whole file now
                    hasher = self._hasher(item)
                    size = os.stat(job.tmp).st_size if hasher is None else _hash_file(job.tmp, hasher)
            except OSError as err:
                raise _disk_error(err, job.tmp) from err
            try:
                md5, verified = self._check(item, size, hasher)
            except IntegrityError:
                _unlink_quietly(job.tmp)
                log.warning("%s: checksum mismatch after a ranged download; fetching it again in one stream",
                            item.path)
                self._whole(item)
                return
            self._place(item, job.tmp, job.final)
        except BaseException:
            self._discard_big(job)
            raise
        self._record(item, job.final, md5, verified)


_PREADV = hasattr(os, "preadv")
_HASH_BUFFERS = threading.local()


def _hash_range(fd: int, start: int, end: int, hasher: Any) -> None:
    """Feed bytes [start, end) of the open file `fd` to `hasher` (a reused buffer per thread)."""
    buf = getattr(_HASH_BUFFERS, "buf", None)
    if buf is None:
        buf = _HASH_BUFFERS.buf = bytearray(CHUNK * 4)
    view = memoryview(buf)
    while start < end:
        n = os.preadv(fd, [view[:min(len(buf), end - start)]], start)
        if n <= 0:
            raise OSError(errno.EIO, "the file is shorter than the ranges written into it")
        hasher.update(view[:n])
        start += n


def _hash_file(path: Path, hasher: Any) -> int:
    """Feed the file at `path` to `hasher` through one reused buffer; return its size."""
    buf = bytearray(CHUNK * 4)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            hasher.update(view[:n])
            size += n
    return size


class _Abandoned(Exception):
    """A range stops early because its file already failed or the run is stopping."""


def _same_file(a: Path, b: Path) -> bool:
    """True if `b` is a regular file that is the same inode as `a` (hard links of one file)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return stat.S_ISREG(sb.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


