"""The job preparation recipe: list the sources, plan, repair the job folder, report.

`run_prep` is safe to run again at any time, also after being killed at any point: files
are placed atomically and recorded only once in place, stale partial files are swept, and a
lock makes a second run for the same job wait and then find the work done. It raises
NodekitError subclasses (see errors.py) and changes nothing when its input is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodekit.batchenv import BatchEnv, check_local_source, ensure_inside, job_folder
from nodekit.credentials import CredentialEnv
from nodekit.errors import InTheWay, LocalIOError, NodekitError, NotFound, SourceError, UnsafeInput, UsageError
from nodekit.names import STATE_DIR, GlobFilter, find_collisions, unsafe_reason
from nodekit.plan import (
    Action,
    LocalStat,
    PlannedFile,
    disk_error,
    human_bytes,
    plan,
    remove_placed,
    sweep_partials,
)
from nodekit.report import report_path, write_report
from nodekit.spec import BUILTIN, SourceKind, SourceSpec
from nodekit.state import STATE_FILE, JobLock, StateStore
from nodekit.storage import RemoteFile, RunContext, Store
from nodekit.storage.factory import open_store
from nodekit.storage.net import NetConfig

if TYPE_CHECKING:
    from nodekit.cache import NodeCache
    from nodekit.transfer import Downloader

# The download machinery (transfer, cache, the download engine) is imported only when there is something
# to download: a warm re-run, which only lists and decides, does not pay for it.

log = logging.getLogger(__name__)

def default_concurrency(memory: int | None = None) -> int:
    """Requests in flight by default: 64, and at most one per 16 MiB of memory.

    On a node the time of a small file is the server's time per request, not the node's CPU:
    what counts is how many requests are in flight (measured on the latency bench, README
    performance section: 64 connections of one request each were the fastest). Each transfer
    holds at most one 512 KiB buffer of libcurl's (files are streamed, never held whole), so
    memory stays bounded whatever the file sizes; the memory term only matters on tiny nodes.
    """
    if memory is None:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # pragma: no cover - Windows
            memory = 0
    by_memory = memory // (16 * 1024 * 1024) if memory else 64
    return max(4, min(64, by_memory))


DEFAULT_CONCURRENCY = default_concurrency()
RUNNING_MARKER = "running"  # present while a run works: a run that finds it sweeps partial files
_MAX_LISTED = 10


@dataclass(frozen=True)
class PrepOptions:
    """Everything one prep run needs besides the environment."""

    sources: tuple[SourceSpec, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    timeout: float = 3600.0
    dest: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    dry_run: bool = False
    report_path: Path | None = None
    progress_interval: float = 5.0
    read_timeout: float = 60.0
    cache: bool = True
    cache_max_size: str = "50%"
    md5: str = "source"  # "all": files without a source MD5 are hashed too, and their MD5 recorded
    skip_archived: bool = False  # archived blobs: skipped (True) or the run refused (False)


@dataclass
class PrepResult:
    """What a run did (or, with --dry-run, would do)."""

    job_dir: Path
    sources: list[dict[str, str]]
    files: list[PlannedFile] = field(default_factory=list)
    retries: int = 0
    elapsed: float = 0.0
    dry_run: bool = False
    swept: int = 0
    error: str | None = None
    cache: dict[str, Any] | None = None

    def count(self, action: Action) -> int:
        return sum(1 for f in self.files if f.action is action and not f.error)

    def _got(self, cached: bool) -> list[PlannedFile]:
        return [f for f in self.files if f.action is Action.DOWNLOAD and not f.error and f.placed
                and f.cached is cached]

    @property
    def bytes_downloaded(self) -> int:
        return sum(f.remote.size for f in self._got(False) if f.remote)

    @property
    def downloaded(self) -> int:
        return len(self._got(False))

    def report(self) -> dict[str, Any]:
        """The JSON report (no secrets: sources are shown without their query strings)."""
        return {
            "command": "prep",
            "dry_run": self.dry_run,
            "job_dir": str(self.job_dir),
            "sources": self.sources,
            "downloaded": 0 if self.dry_run else self.downloaded,
            "skipped": self.count(Action.SKIP),
            "removed": 0 if self.dry_run else self.count(Action.REMOVE),
            "kept": self.count(Action.KEEP),
            "failed": sum(1 for f in self.files if f.error),
            "bytes_downloaded": 0 if self.dry_run else self.bytes_downloaded,
            "skipped_archived": sum(1 for f in self.files if f.archived),
            "from_cache": len(self._got(True)),
            "bytes_from_cache": sum(f.remote.size for f in self._got(True) if f.remote),
            "cache": self.cache,
            "retries": self.retries,
            "swept_partial_files": self.swept,
            "elapsed_s": round(self.elapsed, 3),
            "error": self.error,
            "files": [
                {"name": f.path, "action": f.action.value, "reason": f.reason,
                 "size": f.remote.size if f.remote else None, "verified": f.verified, "md5": f.md5,
                 **({"from_cache": True} if f.cached else {}),
                 **({"error": f.error} if f.error else {})}
                for f in self.files if f.action is not Action.FORGET
            ],
        }

    def summary(self) -> str:
        verb = "would download" if self.dry_run else "downloaded"
        n_down = self.count(Action.DOWNLOAD) if self.dry_run else self.downloaded
        size = sum(f.remote.size for f in self.files if f.action is Action.DOWNLOAD and f.remote) \
            if self.dry_run else self.bytes_downloaded
        unverified = sum(1 for f in self.files if f.action is Action.DOWNLOAD and f.verified is False)
        text = (f"prep: {'[DRY RUN] ' if self.dry_run else ''}{verb} {n_down} ({human_bytes(size)}), "
                f"skipped {self.count(Action.SKIP)}, {'would remove' if self.dry_run else 'removed'} "
                f"{self.count(Action.REMOVE)}, kept {self.count(Action.KEEP)} in {self.job_dir} "
                f"in {self.elapsed:.2f} s, {self.retries} retries")
        cached = self._got(True)
        if cached:
            size = sum(f.remote.size for f in cached if f.remote)
            text += f"; {len(cached)} from the node's cache ({human_bytes(size)})"
        if unverified and not self.dry_run:
            hashed = sum(1 for f in self.files if f.action is Action.DOWNLOAD and f.verified is False and f.md5)
            text += (f"; {unverified} without a source checksum (MD5 recorded)" if hashed == unverified else
                     f"; {unverified} without a source checksum (size checked)" if not hashed else
                     f"; {unverified} without a source checksum ({hashed} hashed)")
        return text


def _list_sources(stores: list[Store], sources: tuple[SourceSpec, ...], flt: GlobFilter) -> \
        tuple[dict[str, tuple[int, RemoteFile]], list[str]]:
    """The combined listing by job-relative path, and the folders the sources hold as such (Data Lake
    directories, `name/` markers: created even when empty). UnsafeInput for unsafe or colliding names.

    Each batch a store hands over while it is still listing is filtered and checked at once, in
    the listing's thread, so that this work overlaps the service's work on the next folders.
    Folders follow --exclude; with an --include (which selects files) only the files' own folders appear.
    """
    listing: dict[str, tuple[int, RemoteFile]] = {}
    unsafe: list[str] = []
    paths: list[str] = []
    folders: list[str] = []
    for i, (store, source) in enumerate(zip(stores, sources, strict=False)):
        kept_n = kept_bytes = 0
        prefix = f"{source.name}/"

        def take(batch: list[RemoteFile], i: int = i, source: SourceSpec = source, prefix: str = prefix) -> None:
            nonlocal kept_n, kept_bytes
            for f in batch:
                if not (flt(f.name) and source.filter(f.name)):
                    continue
                kept_n += 1
                kept_bytes += f.size
                reason = unsafe_reason(f.name)
                if reason:
                    unsafe.append(f"{f.name!r} ({reason})")
                    continue
                path = prefix + f.name
                paths.append(path)
                listing[path] = (i, f)

        files = store.list_files(on_batch=take)
        for folder in getattr(store, "folders", ()):
            if flt.include or source.filter.include or not (flt(folder) and source.filter(folder)):
                continue
            reason = unsafe_reason(folder)
            if reason:
                unsafe.append(f"{folder + '/'!r} ({reason})")
            else:
                folders.append(prefix + folder)
        if not kept_n:
            what = f"{len(files)} before --include/--exclude" if files else "it is empty"
            raise NotFound(f"source {store.display} has no files ({what}): check the URL, prefix and filters.")
        log.info("listed %s: %d files, %s (credential: %s)", store.display, kept_n, human_bytes(kept_bytes),
                 store.credential_kind)
    if unsafe:
        raise UnsafeInput(f"refusing {len(unsafe)} unsafe name(s): {_some(unsafe)}; nothing was written.")
    collisions = find_collisions(paths) + [f"{f}/ <-> {f}" for f in sorted(set(folders) & set(listing))]
    if collisions:
        raise UnsafeInput(f"refusing names that cannot all exist on disk: {_some(collisions)}; nothing was written.")
    return listing, sorted(set(folders))


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def run_prep(opts: PrepOptions, env: BatchEnv, creds: CredentialEnv,
             emit: Callable[[str], None] = print, net: NetConfig | None = None) -> PrepResult:
    """Bring the job folder in line with the sources. See the module docstring for what is safe.

    Input is checked before anything is written: sources, filters, the job folder, and local sources
    that overlap the job folder, nodekit's own folders or another job's (UnsafeInput). A disk error
    anywhere (full, read-only, not permitted) is a LocalIOError naming the path, and the report is
    written first. `net` says how to reach storage (trust, timeouts; the CLI reads it from the
    environment).
    """
    import sys

    # Threads here mostly wait on sockets; when one has a response to handle it should not wait
    # the default 5 ms for another thread's turn (measured: listing requests went out late).
    sys.setswitchinterval(0.001)
    if not opts.sources:
        raise UsageError("no source given: pass SOURCE arguments or --spec FILE.")
    names = [s.name for s in opts.sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"two sources are both named {twice[0]!r} (each lands in the folder of its name): "
                         "give each its own NAME=SOURCE.")
    flt = GlobFilter(opts.include, opts.exclude)
    shared, job_dir = job_folder(env, opts.dest)
    ensure_inside(shared, job_dir, what="the job folder", strict_child=True)
    for source in opts.sources:
        if source.kind is SourceKind.LOCAL and source.path is not None and source.display not in BUILTIN:
            check_local_source(shared, job_dir, source.path)
    ctx = RunContext(timeout=opts.timeout)
    net = net or NetConfig(read_timeout=opts.read_timeout)
    net.read_timeout = opts.read_timeout
    stores = [open_store(s, creds, net, ctx) for s in opts.sources]
    result = PrepResult(job_dir, [{"name": s.name, "source": st.display, "credential": st.credential_kind}
                                  for s, st in zip(opts.sources, stores, strict=False)], dry_run=opts.dry_run)
    try:
        return _run(opts, env, emit, shared, job_dir, ctx, net, stores, flt, result)
    except OSError as err:  # a file operation that no step turned into a LocalIOError
        error = disk_error(err, Path(err.filename) if err.filename else job_dir)
        _fail_report(result, error, ctx, opts, env)
        raise error from err
    except LocalIOError as err:
        _fail_report(result, err, ctx, opts, env)
        raise


def _fail_report(result: PrepResult, err: NodekitError, ctx: RunContext, opts: PrepOptions, env: BatchEnv) -> None:
    """The report of a run that failed (written once: a failed download wrote it already; none in a dry run)."""
    if result.error is None and not opts.dry_run:
        result.error = str(err)
        result.retries, result.elapsed = ctx.retries, time.monotonic() - ctx.started
        _write_report(result, opts, env)


def _run(opts: PrepOptions, env: BatchEnv, emit: Callable[[str], None], shared: Path, job_dir: Path,
         ctx: RunContext, net: NetConfig, stores: list[Store], flt: GlobFilter, result: PrepResult) -> PrepResult:
    state = StateStore(job_dir)
    scan = _LocalScan(job_dir, state)  # reads the records and stats their files while the listing runs
    try:
        listing, folders = _list_sources(stores, opts.sources, flt)
        for shown, store in zip(result.sources, stores, strict=False):
            final = getattr(store, "final_display", None)
            if final and final != store.display:  # a URL that redirected: where the data came from
                shown["final_url"] = final
    except NodekitError as err:
        if err.retryable:  # the run did not finish (a deadline, storage down): say why
            _fail_report(result, err, ctx, opts, env)
        raise  # a refused input changes nothing, not even the report
    finally:
        scan.join()
    records, stat = scan.result()
    result.files = plan(listing, records, stat)  # a pure function of these: planned once
    _archived(result.files, opts.skip_archived)  # refused before anything is written
    if opts.dry_run:
        result.retries, result.elapsed = ctx.retries, time.monotonic() - ctx.started
        for f in result.files:
            if f.action is not Action.FORGET:
                emit(f"[DRY RUN] {f.action.value:8} {f.path} ({f.reason})")
        for folder in folders:
            if not (job_dir / folder).is_dir():
                emit(f"[DRY RUN] folder   {folder}/ (a folder at the source)")
        return result

    try:
        (job_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LocalIOError(f"cannot create {job_dir / STATE_DIR}: {err.strerror}.") from err
    with JobLock(job_dir, timeout=max(1.0, ctx.remaining())) as lock:
        if lock.waited > 0.5:
            log.info("waited %.1f s for another nodekit run on this job to finish", lock.waited)
        fresh, stat = scan.result()
        if fresh is not records:  # another run changed the records since the scan: plan again
            records = fresh
            result.files = plan(listing, records, stat)
            _archived(result.files, opts.skip_archived)
        marker = job_dir / STATE_DIR / RUNNING_MARKER
        if marker.exists() or not (job_dir / STATE_DIR / STATE_FILE).exists():  # the last run did not finish
            result.swept = sweep_partials(job_dir)
            if result.swept:
                log.info("removed %d partial file(s) left by an interrupted run", result.swept)
        marker.touch()
        for f in result.files:
            if f.action is Action.SKIP:
                log.debug("skip %s (%s)", f.path, f.reason)
            elif f.action is Action.KEEP and f.path in records:
                log.info("kept %s (%s)", f.path, f.reason)
        to_get = [f for f in result.files if f.action is Action.DOWNLOAD]
        errors: list[NodekitError] = []
        placed: dict[str, Any] = {}
        unrecorded: NodekitError | None = None
        try:
            removals = [f for f in result.files if f.action in (Action.REMOVE, Action.FORGET)]
            if removals:
                remove_placed(job_dir, removals, state)
            if to_get:
                errors = _download(opts, shared, job_dir, stores, ctx, net, state, to_get, emit, result, placed)
            if folders and not errors:
                _make_folders(job_dir, folders)
        finally:
            for f in result.files:
                if f.action in (Action.REMOVE, Action.FORGET):
                    records.pop(f.path, None)
            records.update(placed)
            try:
                state.compact(records)
            except OSError as err:  # the files are in place but unrecorded: the next run fetches them again
                unrecorded = disk_error(err, Path(err.filename) if err.filename else job_dir / STATE_DIR)
                log.error("%s", unrecorded)  # an error already on its way (the first one) goes on
        if unrecorded is not None and not errors:
            errors = [unrecorded]
        result.retries, result.elapsed = ctx.retries, time.monotonic() - ctx.started
        if not errors:
            marker.unlink()  # finished: no partial file can be left behind
        else:
            result.error = str(errors[0])
            _write_report(result, opts, env)
            raise errors[0]
    _write_report(result, opts, env)
    return result


ARCHIVED = ("Archive", "Rehydrating")


def _archived(files: list[PlannedFile], skip: bool) -> None:
    """Files to download whose blob is archived (or still rehydrating) cannot be read: SourceError naming
    them before anything is written, or, with `skip`, a skip with its reason for each."""
    archived = [f for f in files if f.action is Action.DOWNLOAD and f.remote and f.remote.tier in ARCHIVED]
    if not archived:
        return
    if not skip:
        names = [f"{f.path} ({f.remote.tier.lower() if f.remote and f.remote.tier else ''})" for f in archived]
        raise SourceError(f"refusing: {len(archived)} file(s) to download are in the archive tier, which cannot be "
                          f"read: {_some(names)}. Rehydrate them (set their tier to Hot or Cool; hours with Standard "
                          "priority), or go on without them with --skip-archived or --exclude; nothing was written.")
    for f in archived:
        f.action = Action.SKIP
        f.reason = ("in the archive tier at the source: not downloaded (--skip-archived); rehydrate it (set its tier "
                    "to Hot or Cool) and run again to get it")
        f.archived = True
        log.warning("skipped %s: %s", f.path, f.reason)


def _make_folders(job_dir: Path, folders: list[str]) -> None:
    """Create the folders the sources hold as such (empty ones too), never through a symbolic link."""
    for folder in folders:
        path = job_dir
        for part in folder.split("/"):
            path = path / part
            if os.path.islink(path):
                raise UnsafeInput(f"{path} is a symbolic link: refusing to create folders through it.")
            try:
                path.mkdir(exist_ok=True)
            except FileExistsError:
                raise InTheWay(f"{path} is a file where the source has a folder; remove it and run again.") \
                    from None
            except OSError as err:
                raise disk_error(err, path) from err


class _LocalScan:
    """The job folder's records, and the stat of each file they name, read in a thread while the
    sources are listed (on a warm re-run that is most of the local work). `result` hands them
    over if the state files did not change since, else reads them again."""

    def __init__(self, job_dir: Path, state: StateStore) -> None:
        import threading

        self.root = str(job_dir) + os.sep
        self.state = state
        self.seen: object = None
        self.records: dict[str, Any] = {}
        self.stats: dict[str, LocalStat | None] = {}
        self.thread = threading.Thread(target=self._run, name="nodekit-scan", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            seen = self.state.identity()
            self.records = self.state.load()
            self.stats = {path: self.stat(path) for path in self.records}
            self.seen = seen
        except Exception as err:  # only a head start: result() reads again
            log.debug("local scan: %s", err)

    def stat(self, path: str) -> LocalStat | None:
        return LocalStat.of(self.root + path.replace("/", os.sep))

    def join(self) -> None:
        self.thread.join()

    def result(self) -> tuple[dict[str, Any], Callable[[str], LocalStat | None]]:
        """(records, stat function): the scan's, or read afresh if another run changed the state since."""
        self.thread.join()
        if self.seen is None or self.seen != self.state.identity():
            return self.state.load(), self.stat
        stats = self.stats
        return self.records, lambda path: stats[path] if path in stats else self.stat(path)


def _download(opts: PrepOptions, shared: Path, job_dir: Path, stores: list[Store], ctx: RunContext,
              net: NetConfig, state: StateStore, to_get: list[PlannedFile], emit: Callable[[str], None],
              result: PrepResult, placed: dict[str, Any]) -> list[NodekitError]:
    """Fetch `to_get`, from the node's cache where it has them; `placed` gets the record of each file
    put in place (also when the run fails part-way). Returns the errors, the first fatal one first."""
    from nodekit.cache import cache_key
    from nodekit.cache import describe as describe_cache
    from nodekit.transfer import Downloader, Progress

    cache = _open_cache(opts, shared)
    keys = {f.path: cache_key(stores[f.source or 0].display, f.remote) for f in to_get if f.remote} \
        if cache else {}
    progress = Progress(len(to_get), sum(f.remote.size for f in to_get if f.remote), emit, opts.progress_interval)
    downloader = Downloader(job_dir, stores, ctx, state, opts.concurrency, progress, net, opts.read_timeout,
                            hash_all=opts.md5 == "all")
    try:
        if cache is not None:
            to_get = [f for f in to_get if not _from_cache(cache, downloader, f, keys[f.path])]
            cache.flush()  # the last-use lines of what was taken
        _check_space(job_dir, to_get)
        filler = _CacheFiller(cache, job_dir, keys) if cache is not None and to_get else None
        if filler is not None:
            downloader.on_placed = filler.add
            downloader.file_mode = 0o444  # the cache makes them read-only anyway
        try:
            with progress:
                errors = downloader.run(to_get)
        finally:
            if filler is not None:
                filler.close()
        if cache is not None:
            result.cache = describe_cache(cache)
        return errors
    finally:
        placed.update(downloader.placed)


def _open_cache(opts: PrepOptions, shared: Path) -> NodeCache | None:
    """The node's cache, opened and repaired; None with --no-cache or when it cannot be used."""
    if not opts.cache:
        return None
    from nodekit.cache import NodeCache, parse_budget

    max_bytes, share = parse_budget(opts.cache_max_size)
    cache = NodeCache(shared, max_bytes, share)
    try:
        cache.open()
    except OSError as err:
        log.warning("cache: not used (%s)", err.strerror)
        return None
    return cache


def _from_cache(cache: NodeCache, downloader: Downloader, item: PlannedFile, key: str) -> bool:
    hit = cache.lookup(key)
    return hit is not None and downloader.place_cached(item, hit.path, hit.md5, hit.verified)


FILL_PAUSE = 0.05  # seconds the cache filler sleeps between batches


class _CacheFiller:
    """Adds each file to the cache as soon as it is placed, in a thread of its own under the cache's lock,
    so that filling the cache overlaps the downloads; `close` waits for it and keeps the budget."""

    def __init__(self, cache: NodeCache, job_dir: Path, keys: dict[str, str]) -> None:
        import queue
        import threading

        self.cache = cache
        self.root = str(job_dir) + os.sep
        self.keys = keys
        self.queue: queue.SimpleQueue[tuple[str, str, str | None, bool] | None] = queue.SimpleQueue()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nodekit-cache", daemon=True)
        self.thread.start()

    def add(self, item: PlannedFile) -> None:
        self.queue.put((self.keys[item.path], self.root + item.path.replace("/", os.sep), item.md5,
                        bool(item.verified)))

    def _items(self) -> Iterator[tuple[str, str, str | None, bool]]:
        """What was placed, taken in batches a few times a second: one wake-up per file cost the
        downloads more than the filling itself (thread hand-offs, measured)."""
        import queue

        while True:
            batch = [self.queue.get()]
            try:
                while batch[-1] is not None:
                    batch.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            for entry in batch:
                if entry is None:
                    return
                yield entry
            self.closing.wait(FILL_PAUSE)

    def _run(self) -> None:
        try:
            with self.cache.lock():
                self.cache.fill(self._items())
        except OSError as err:
            log.warning("cache: not filled (%s)", err.strerror)
        except NodekitError as err:  # another prep held the cache's lock too long
            log.warning("cache: not filled (%s)", err)

    def close(self) -> None:
        self.closing.set()
        self.queue.put(None)
        self.thread.join()


def _check_space(job_dir: Path, to_get: list[PlannedFile]) -> None:
    """LocalIOError before any download when the disk cannot hold what is to come."""
    need = sum(f.remote.size for f in to_get if f.remote)
    if not need:
        return
    import shutil

    free = shutil.disk_usage(job_dir).free
    if need > free:
        raise LocalIOError(f"the download needs {human_bytes(need)} but only {human_bytes(free)} is free "
                           f"under {job_dir}: free space or use a larger disk.")


def _write_report(result: PrepResult, opts: PrepOptions, env: BatchEnv) -> None:
    path = report_path(opts.report_path, env, "nodekit-prep.json")
    if path is not None:
        write_report(result.report(), path)
