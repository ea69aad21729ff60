"""Carry out downloads: scheduling, large files in ranges, progress (the decision is in plan.py,
the landing of each file in land.py).

`Downloader.run` sends the files of stores that speak HTTP (Azure, a plain URL) to one download
engine (storage/fetch.py: libcurl, `concurrency` requests in flight); files over 16 MiB go as
parallel ranges written in place with `pwrite`, hashed in order as the ranges complete (in a
thread of their own) when an MD5 is wanted. Files of a local folder are copied by a few threads.
Every file is checked (size always; MD5 when the source has one, or with `--md5 all` recorded),
given the source's modification time, renamed into place and only then journalled. Every failure
path removes its temporary file. Imported only when something is to be downloaded.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodekit.errors import IntegrityError, InTheWay, LocalIOError, NodekitError, TransientError, UnsafeInput
from nodekit.land import Landing, check, mtime_ns, partial_name
from nodekit.plan import (  # noqa: F401  (Action, LocalStat, decide, human_bytes: re-exported)
    Action,
    LocalStat,
    PlannedFile,
    _unlink_quietly,
    decide,
    disk_error,
    human_bytes,
)
from nodekit.state import Record, StateStore
from nodekit.storage import CHUNK, RunContext, Store
from nodekit.storage.net import NetConfig

log = logging.getLogger(__name__)

RANGE_THRESHOLD = 16 * 1024 * 1024  # files above this are fetched as parallel ranges
RANGE_SIZE = 64 * 1024 * 1024  # the largest range
MIN_RANGE = 8 * 1024 * 1024  # the smallest range (when large files are few, they are cut finer)
PART_BUFFER = 1024 * 1024  # each range's file buffer: one write system call a MiB
WIDE = 16  # connections large files are spread over (see range_size)
INTEGRITY_ATTEMPTS = 3
LOCAL_WORKERS = 8  # threads copying from a local folder


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


def range_size(big_bytes: int, concurrency: int) -> int:
    """The size of the ranges large files are cut into: enough ranges for WIDE connections at once (or
    `concurrency`, if less), none smaller than MIN_RANGE (per-request costs) nor larger than RANGE_SIZE
    (memory, resumption). At Azure's rate per connection (about 60 MB/s), WIDE connections carry about
    1 GB/s, more than most Batch nodes' network; more would only add requests and TLS work."""
    smallest = min(MIN_RANGE, RANGE_SIZE)
    want = -(-big_bytes // max(1, min(WIDE, concurrency)))
    mib = 1024 * 1024
    return max(smallest, min(RANGE_SIZE, -(-want // mib) * mib))


@dataclass
class _BigFile:
    """A large file fetched as ranges into one temporary file; the last range to finish places it."""

    item: PlannedFile
    final: Path
    tmp: Path
    ranges: list[tuple[int, int]]
    attempt: int = 1
    fd: int = -1
    pending: int = 0
    failed: NodekitError | None = None
    hasher: Any = None  # None: no MD5 wanted
    hashed_to: int = 0  # bytes [0, hashed_to) are in the hasher
    done: dict[int, int] = field(default_factory=dict)  # completed ranges not yet hashed: start -> end
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> None:
        """Open (and size) the temporary file when the first range starts."""
        if self.fd < 0:
            flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
            self.fd = os.open(self.tmp, flags, 0o644)
            assert self.item.remote is not None
            os.ftruncate(self.fd, self.item.remote.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Part:
    """One range of a _BigFile: libcurl writes it straight into a file object of its own, positioned at the
    range (storage/fetch.py, file mode); `settle` says how far it got, and counts the progress."""

    __slots__ = ("big", "file", "on_bytes", "reached", "start", "tmp")

    def __init__(self, big: _BigFile, start: int, on_bytes: Callable[[int], None]) -> None:
        self.big = big
        self.start = start
        self.reached = start
        self.on_bytes = on_bytes
        self.tmp = str(big.tmp)
        self.file: Any = None

    def begin(self) -> None:
        self.big.begin()
        self.file = open(self.big.tmp, "r+b", buffering=PART_BUFFER)
        self.file.seek(self.start)

    def settle(self) -> int:
        """Flush what arrived; the position reached (a retry goes on from there)."""
        self.file.flush()
        pos = self.file.tell()
        self.on_bytes(pos - self.reached)
        self.reached = pos
        return pos

    def write(self, data: bytes) -> None:  # pragma: no cover - libcurl writes into `file`
        self.file.write(data)

    def rewind(self) -> None:  # pragma: no cover - a file-mode Get never rewinds (its head is checked first)
        self.file.seek(self.start)
        self.reached = self.start

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Downloader:
    """Downloads planned files into `job_dir`; safe to re-run after any interruption."""

    def __init__(self, job_dir: Path, stores: list[Store], ctx: RunContext, state: StateStore,
                 concurrency: int, progress: Progress, net: NetConfig | None = None, read_timeout: float = 60.0,
                 hash_all: bool = False) -> None:
        self.job_dir = job_dir
        self.stores = stores
        self.ctx = ctx
        self.state = state
        self.concurrency = concurrency
        self.net = net or NetConfig(read_timeout=read_timeout)
        self.read_timeout = read_timeout
        self.hash_all = hash_all  # True (--md5 all): hash every file; else only those with a source MD5
        self.progress = progress
        self.on_placed: Callable[[PlannedFile], None] | None = None  # called for each file downloaded and placed
        self.file_mode = 0o644  # 0o444 when the cache will take the files anyway (saves a chmod each)
        self.placed: dict[str, Record] = {}
        self._errors: list[NodekitError] = []
        self._dirs_ok: set[Path] = {job_dir}
        self._dirs_lock = threading.Lock()
        self._placed_lock = threading.Lock()
        self._engine: Any = None
        self._hashing: ThreadPoolExecutor | None = None
        self._proxies: dict[int, str] = {}

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
                        raise InTheWay(f"{d} is a file where nodekit needs a folder; remove it and run again.") \
                            from None
                except OSError as err:
                    raise disk_error(err, d) from err
                self._dirs_ok.add(d)

    def _final(self, path: str) -> Path:
        return self.job_dir.joinpath(*path.split("/"))

    def _hash_wanted(self, item: PlannedFile) -> bool:
        return self.hash_all or bool(item.remote and item.remote.content_md5)

    def _landing(self, item: PlannedFile) -> Landing:
        assert item.remote is not None
        final = self._final(item.path)
        self._ensure_parent(final)
        return Landing(item.path, item.remote, str(final), hash_wanted=self._hash_wanted(item), mode=self.file_mode,
                       on_bytes=self.progress.add_bytes)

    # -- running ---------------------------------------------------------------------------
    def run(self, items: list[PlannedFile]) -> list[NodekitError]:
        """Download every item (action DOWNLOAD); return the errors (the first fatal one stops the rest)."""
        self._errors = []
        http = [i for i in items if hasattr(self.stores[i.source or 0], "get_request")]
        local = [i for i in items if not hasattr(self.stores[i.source or 0], "get_request")]
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, LOCAL_WORKERS)),
                                  thread_name_prefix="nodekit-copy") if local else None
        futures: list[Future[None]] = []
        try:
            if pool is not None:
                futures = [pool.submit(self._guard, self._whole, item) for item in local]
            if http:
                self._run_http(http)
        except Exception as err:  # a bug in the engine: stop cleanly, report it
            self.ctx.stop.set()
            self._errors.append(NodekitError(f"unexpected error while downloading: {type(err).__name__}: {err}"))
            log.debug("engine failure", exc_info=err)
        finally:
            for f in futures:
                f.result()
            if pool is not None:
                pool.shutdown()
            if self._hashing is not None:
                self._hashing.shutdown()
        return self._errors

    def _run_http(self, items: list[PlannedFile]) -> None:
        from nodekit.storage.fetch import CurlEngine, Get

        engine = CurlEngine(self.net, self.ctx, self.concurrency, self.read_timeout)
        self._engine = engine
        big = [i for i in items if i.remote and i.remote.size > RANGE_THRESHOLD
               and self.stores[i.source or 0].supports_ranges(i.remote)]
        big_ids = {id(i) for i in big}
        size = range_size(sum(i.remote.size for i in big if i.remote), self.concurrency)
        gets: list[Get] = []
        for item in sorted(big, key=lambda i: -(i.remote.size if i.remote else 0)):
            try:
                gets += self._big_gets(item, size, 1)
            except NodekitError as err:
                self._fail(item, err)
        for item in items:
            if id(item) not in big_ids:
                try:
                    gets.append(self._small_get(item))
                except NodekitError as err:
                    self._fail(item, err)
        engine.run(gets, self._done)

    def _request(self, item: PlannedFile) -> dict[str, Any]:
        """What every Get of `item` shares: URL, headers, credential, names for messages."""
        store: Any = self.stores[item.source or 0]
        assert item.remote is not None
        url, headers = store.get_request(item.remote)
        access = getattr(store, "access", None)
        source = item.source or 0
        if source not in self._proxies:  # one look-up per store: they name one host each
            self._proxies[source] = self.net.proxy_for(url) or ""
        return {"url": url, "headers": headers, "what": f"downloading {item.path}", "where": store.where(item.remote),
                "token": access.token if access is not None else None,
                "credential": access.info() if access is not None else None,
                "follow": bool(getattr(store, "follow_redirects", False)), "proxy": self._proxies[source]}

    def _small_get(self, item: PlannedFile) -> Any:
        from nodekit.storage.fetch import Get

        assert item.remote is not None
        return Get(start=0, end=item.remote.size, body=self._landing(item), ranged=False, item=item,
                   **self._request(item))

    def _big_gets(self, item: PlannedFile, size: int, attempt: int) -> list[Any]:
        from nodekit.storage.fetch import Get

        remote = item.remote
        assert remote is not None
        final = self._final(item.path)
        self._ensure_parent(final)
        ranges = [(s, min(s + size, remote.size)) for s in range(0, remote.size, size)]
        big = _BigFile(item, final, final.with_name(partial_name(final.name)), ranges, attempt=attempt,
                       pending=len(ranges))
        if self._hash_wanted(item):
            big.hasher = hashlib.md5()
        request = self._request(item)
        return [Get(start=s, end=e, body=_Part(big, s, self.progress.add_bytes), ranged=True, item=big, **request)
                for s, e in ranges]

    # -- completions (in the engine's thread) ----------------------------------------------------
    def _done(self, get: Any, err: NodekitError | None) -> None:
        from nodekit.storage.fetch import Stopped

        if isinstance(get.item, _BigFile):
            self._part_done(get.item, get.body, get.start, get.end, err)
            return
        item: PlannedFile = get.item
        landing: Landing = get.body
        if err is not None:
            landing.discard()
            if not isinstance(err, Stopped):
                self._fail(item, err)
            return
        try:
            md5, verified, st = landing.finish()
        except IntegrityError as ierr:
            get.attempt += 1
            if get.attempt >= INTEGRITY_ATTEMPTS:
                landing.discard()
                self._fail(item, ierr)
                return
            log.debug("%s: %s; fetching it again", item.path, ierr)
            landing.rewind()
            get.pos = get.start
            self._engine.add(get, self.ctx.retry_delay(get.attempt))
            return
        except NodekitError as nerr:
            landing.discard()
            self._fail(item, nerr)
            return
        except OSError as oerr:
            landing.discard()
            self._fail(item, disk_error(oerr, Path(landing.tmp)))
            return
        self._record(item, landing.final, md5, verified, st=st)

    def _part_done(self, big: _BigFile, part: _Part, start: int, end: int, err: NodekitError | None) -> None:
        from nodekit.storage.fetch import Stopped

        try:
            part.close()
        except OSError as oerr:  # the last write-back failed: the range is not whole
            err = err or disk_error(oerr, big.tmp)
        with big.lock:
            big.pending -= 1
            if err is not None and big.failed is None:
                big.failed = err
            last = big.pending == 0
            failed = big.failed
        if err is None and big.hasher is not None and failed is None:
            big.done[start] = end
            self._engine.hold()
            self._hasher().submit(self._hash_ahead, big)
        if not last:
            return
        if failed is not None:
            big.close()
            _unlink_quietly(big.tmp)
            if not isinstance(failed, Stopped):
                self._fail(big.item, failed)
            return
        if big.hasher is not None:
            self._engine.hold()
            self._hasher().submit(self._finish_big, big)
        else:
            self._finish_big(big, held=False)

    def _hasher(self) -> ThreadPoolExecutor:
        if self._hashing is None:
            self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nodekit-md5")
        return self._hashing

    def _hash_ahead(self, big: _BigFile) -> None:
        """Feed the hasher every completed range that follows on from what it has (in the hashing thread)."""
        try:
            while big.failed is None and not self.ctx.stop.is_set():
                stop = big.done.pop(big.hashed_to, None)
                if stop is None:
                    return
                _hash_range(big.fd, big.tmp, big.hashed_to, stop, big.hasher)
                big.hashed_to = stop
        except OSError as err:
            big.failed = disk_error(err, big.tmp)
        finally:
            self._engine.release()

    def _finish_big(self, big: _BigFile, held: bool = True) -> None:
        """Check the whole file and place it, or fetch it again (at most INTEGRITY_ATTEMPTS times)."""
        item = big.item
        remote = item.remote
        assert remote is not None
        try:
            if big.failed is not None:
                raise big.failed
            size = big.hashed_to if big.hasher is not None else os.fstat(big.fd).st_size
            try:
                md5, verified = check(item.path, remote, size, big.hasher)
            except IntegrityError as ierr:
                big.close()
                _unlink_quietly(big.tmp)
                if big.attempt >= INTEGRITY_ATTEMPTS:
                    raise
                log.warning("%s: %s; fetching it again", item.path, ierr)
                delay = self.ctx.retry_delay(big.attempt)
                for get in self._big_gets(item, big.ranges[0][1] - big.ranges[0][0], big.attempt + 1):
                    self._engine.add(get, delay)
                return
            mtime = mtime_ns(remote.last_modified)
            if mtime is not None:
                os.utime(big.fd if os.utime in os.supports_fd else big.tmp, ns=(mtime, mtime))
            st = os.fstat(big.fd)
            big.close()
            os.replace(big.tmp, big.final)
            self._record(item, big.final, md5, verified, st=st)
        except Exception as err:
            big.close()
            _unlink_quietly(big.tmp)
            if isinstance(err, IsADirectoryError):
                err = InTheWay(f"{big.final} is a folder where the source has a file; remove it and run again.")
            elif isinstance(err, OSError):
                err = disk_error(err, big.tmp)
            self._fail(item, err)
        finally:
            if held:
                self._engine.release()

    # -- local folders (a few threads) -------------------------------------------------------------
    def _whole(self, item: PlannedFile) -> None:
        """Copy one file of a local store: hash while writing, check, place (three tries on a mismatch)."""
        remote = item.remote
        assert remote is not None
        store = self.stores[item.source or 0]
        landing = self._landing(item)

        def sink(data: bytes) -> None:
            if self.ctx.remaining() <= 0:
                raise TransientError(f"copying {item.path}: not finished within the {self.ctx.timeout:g} s timeout; "
                                     "a later run goes on from what is in place.")
            if self.ctx.stop.is_set():
                raise _Stopping()
            try:
                landing.write(data)
            except OSError as err:  # the disk's error, not the source's
                raise disk_error(err, Path(landing.tmp)) from err

        try:
            try:
                landing.begin()
            except OSError as err:
                raise disk_error(err, Path(landing.tmp)) from err
            for attempt in range(1, INTEGRITY_ATTEMPTS + 1):
                try:
                    store.fetch(remote, 0, remote.size, sink)
                    md5, verified, st = landing.finish()
                    break
                except IntegrityError as err:
                    if attempt == INTEGRITY_ATTEMPTS:
                        raise
                    landing.rewind()
                    self.ctx.backoff(attempt, f"copying {item.path}", str(err))
                except OSError as err:
                    raise disk_error(err, Path(landing.tmp)) from err
        except BaseException:
            landing.discard()
            raise
        self._record(item, landing.final, md5, verified, st=st)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one unit of work; record its error on the item and stop the run when it is fatal."""
        item: PlannedFile = args[0]
        if self.ctx.stop.is_set():
            return None
        if self.ctx.remaining() <= 0:
            self._fail(item, TransientError(f"copying {item.path}: not started within the {self.ctx.timeout:g} s "
                                            "timeout; a later run goes on from what is in place."))
            return None
        try:
            return fn(*args)
        except _Stopping:
            return None
        except Exception as err:
            self._fail(item, err)
        return None

    def _fail(self, item: PlannedFile, err: Exception) -> None:
        """Record `err` on `item`; stop the run when it is fatal (or a bug)."""
        if isinstance(err, NodekitError):
            item.error = str(err)
            with self._placed_lock:
                self._errors.append(err)
            if not isinstance(err, InTheWay) and (not err.retryable or isinstance(err, LocalIOError)
                                                  or self.ctx.remaining() <= 0):
                self.ctx.stop.set()
            log.error("failed: %s: %s", item.path, err)
            return
        item.error = f"{type(err).__name__}: {err}"  # a bug: stop cleanly, report it
        with self._placed_lock:
            self._errors.append(NodekitError(f"unexpected error on {item.path}: {type(err).__name__}: {err}"))
        self.ctx.stop.set()
        log.error("unexpected error on %s", item.path, exc_info=err)

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
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s (%s, %s)", "from the cache" if item.cached else "downloaded", item.path,
                      human_bytes(remote.size), "verified" if verified else
                      "unverified: the source has no checksum" + ("; MD5 recorded" if md5 else ""))

    def place_cached(self, item: PlannedFile, obj: Path, md5: str | None, verified: bool) -> bool:
        """Put the cached object `obj` in place of `item` (a hard link, else a copy); False if it cannot."""
        final = self._final(item.path)
        self._ensure_parent(final)
        tmp = final.with_name(partial_name(final.name))
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


class _Stopping(Exception):
    """A copy stops early because the run is stopping after another error."""


_HASH_BUFFERS = threading.local()


def _hash_range(fd: int, path: Path, start: int, end: int, hasher: Any) -> None:
    """Feed bytes [start, end) of the file being written (`fd`, at `path`) to `hasher`, read back from the page
    cache: positional reads where the OS has them, else a reader of its own (Windows)."""
    buf = getattr(_HASH_BUFFERS, "buf", None)
    if buf is None:
        buf = _HASH_BUFFERS.buf = bytearray(CHUNK * 4)
    view = memoryview(buf)
    reader = None if hasattr(os, "preadv") else open(path, "rb", buffering=0)
    try:
        if reader is not None:  # pragma: no cover - Windows
            reader.seek(start)
        while start < end:
            want = min(len(buf), end - start)
            n = os.preadv(fd, [view[:want]], start) if reader is None else reader.readinto(view[:want])
            if not n:
                raise OSError(errno.EIO, "the file is shorter than the ranges written into it")
            hasher.update(view[:n])
            start += n
    finally:
        if reader is not None:  # pragma: no cover - Windows
            reader.close()


def _same_file(a: Path, b: Path) -> bool:
    """True if `b` is a regular file that is the same inode as `a` (hard links of one file)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return stat.S_ISREG(sb.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
