"""The job preparation recipe: list the sources, plan, repair the job folder, report.

`run_prep` is safe to run again at any time, also after being killed at any point: files
are placed atomically and recorded only once in place, stale partial files are swept, and a
lock makes a second run for the same job wait and then find the work done. It raises
NodekitError subclasses (see errors.py) and changes nothing when its input is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodekit.batchenv import BatchEnv, ensure_inside, job_folder
from nodekit.cache import NodeCache, cache_key, parse_budget
from nodekit.cache import describe as describe_cache
from nodekit.credentials import CredentialEnv
from nodekit.errors import LocalIOError, NodekitError, NotFound, UnsafeInput, UsageError
from nodekit.names import STATE_DIR, GlobFilter, find_collisions, unsafe_reason
from nodekit.report import report_path, write_report
from nodekit.spec import SourceSpec
from nodekit.state import STATE_FILE, JobLock, StateStore
from nodekit.storage import RemoteFile, RunContext, Store
from nodekit.storage.factory import open_store
from nodekit.storage.http import HttpClient
from nodekit.transfer import (
    PIPELINE_DEPTH,
    Action,
    Downloader,
    LocalStat,
    PlannedFile,
    Progress,
    human_bytes,
    plan,
    remove_placed,
    sweep_partials,
)

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = min(64, 8 * (os.cpu_count() or 2))
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
    md5: str = "all"  # "source": files without a source MD5 are not hashed
    pipeline: int = PIPELINE_DEPTH


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
                     f"; {unverified} without a source checksum ({hashed} hashed)")
        return text


def _list_sources(stores: list[Store], sources: tuple[SourceSpec, ...], flt: GlobFilter) -> \
        dict[str, tuple[int, RemoteFile]]:
    """The combined listing by job-relative path; UnsafeInput for unsafe or colliding names."""
    listing: dict[str, tuple[int, RemoteFile]] = {}
    unsafe: list[str] = []
    paths: list[str] = []
    for i, (store, source) in enumerate(zip(stores, sources, strict=False)):
        files = store.list_files()
        kept = [f for f in files if flt(f.name) and source.filter(f.name)]
        if not kept:
            what = f"{len(files)} before --include/--exclude" if files else "it is empty"
            raise NotFound(f"source {store.display} has no files ({what}): check the URL, prefix and filters.")
        for f in kept:
            reason = unsafe_reason(f.name)
            if reason:
                unsafe.append(f"{f.name!r} ({reason})")
                continue
            path = f"{source.name}/{f.name}"
            paths.append(path)
            listing[path] = (i, f)
        log.info("listed %s: %d files, %s (credential: %s)", store.display, len(kept),
                 human_bytes(sum(f.size for f in kept)), store.credential_kind)
    if unsafe:
        raise UnsafeInput(f"refusing {len(unsafe)} unsafe name(s): {_some(unsafe)}; nothing was written.")
    collisions = find_collisions(paths)
    if collisions:
        raise UnsafeInput(f"refusing names that cannot all exist on disk: {_some(collisions)}; nothing was written.")
    return listing


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def run_prep(opts: PrepOptions, env: BatchEnv, creds: CredentialEnv,
             emit: Callable[[str], None] = print) -> PrepResult:
    """Bring the job folder in line with the sources. See the module docstring for what is safe."""
    if not opts.sources:
        raise UsageError("no source given: pass SOURCE arguments or --spec FILE.")
    shared, job_dir = job_folder(env, opts.dest)
    ensure_inside(shared, job_dir, what="the job folder", strict_child=True)
    ctx = RunContext(timeout=opts.timeout)
    http = HttpClient(ctx, read_timeout=opts.read_timeout)
    stores = [open_store(s, creds, http) for s in opts.sources]
    result = PrepResult(job_dir, [{"name": s.name, "source": st.display, "credential": st.credential_kind}
                                  for s, st in zip(opts.sources, stores, strict=False)], dry_run=opts.dry_run)
    listing = _list_sources(stores, opts.sources, GlobFilter(opts.include, opts.exclude))

    job_root = str(job_dir) + os.sep

    def stat(path: str) -> LocalStat | None:
        return LocalStat.of(job_root + path.replace("/", os.sep))

    state = StateStore(job_dir)
    if opts.dry_run:
        result.files = plan(listing, state.load() if job_dir.is_dir() else {}, stat)
        result.retries, result.elapsed = ctx.retries, time.monotonic() - ctx.started
        for f in result.files:
            if f.action is not Action.FORGET:
                emit(f"[DRY RUN] {f.action.value:8} {f.path} ({f.reason})")
        return result

    try:
        (job_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LocalIOError(f"cannot create {job_dir / STATE_DIR}: {err.strerror}.") from err
    with JobLock(job_dir, timeout=max(1.0, ctx.remaining())) as lock:
        if lock.waited > 0.5:
            log.info("waited %.1f s for another nodekit run on this job to finish", lock.waited)
        records = state.load()
        marker = job_dir / STATE_DIR / RUNNING_MARKER
        if marker.exists() or not (job_dir / STATE_DIR / STATE_FILE).exists():  # the last run did not finish
            result.swept = sweep_partials(job_dir)
            if result.swept:
                log.info("removed %d partial file(s) left by an interrupted run", result.swept)
        marker.touch()
        result.files = plan(listing, records, stat)
        for f in result.files:
            if f.action is Action.SKIP:
                log.debug("skip %s (%s)", f.path, f.reason)
            elif f.action is Action.KEEP and f.path in records:
                log.info("kept %s (%s)", f.path, f.reason)
        to_get = [f for f in result.files if f.action is Action.DOWNLOAD]
        cache = _open_cache(opts, shared) if to_get else None
        keys = {f.path: cache_key(stores[f.source or 0].display, f.remote) for f in to_get if f.remote} \
            if cache else {}
        errors: list[NodekitError] = []
        downloader = None
        try:
            remove_placed(job_dir, [f for f in result.files if f.action in (Action.REMOVE, Action.FORGET)], state)
            progress = Progress(len(to_get), sum(f.remote.size for f in to_get if f.remote), emit,
                                opts.progress_interval)
            downloader = Downloader(job_dir, stores, ctx, state, opts.concurrency, progress, opts.read_timeout,
                                    pipeline=opts.pipeline, hash_all=opts.md5 != "source")
            if cache is not None:
                to_get = [f for f in to_get if not _from_cache(cache, downloader, f, keys[f.path])]
            _check_space(job_dir, to_get)
            with progress:
                errors = downloader.run(to_get)
            if cache is not None:
                _fill_cache(cache, job_dir, to_get, keys)
                result.cache = describe_cache(cache)
        finally:
            for f in result.files:
                if f.action in (Action.REMOVE, Action.FORGET):
                    records.pop(f.path, None)
            if downloader is not None:
                records.update(downloader.placed)
            state.compact(records)
        result.retries, result.elapsed = ctx.retries, time.monotonic() - ctx.started
        if not errors:
            marker.unlink()  # finished: no partial file can be left behind
        else:
            result.error = str(errors[0])
            _write_report(result, opts, env)
            raise errors[0]
    _write_report(result, opts, env)
    return result


def _open_cache(opts: PrepOptions, shared: Path) -> NodeCache | None:
    """The node's cache, opened and repaired; None with --no-cache or when it cannot be used."""
    if not opts.cache:
        return None
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


def _fill_cache(cache: NodeCache, job_dir: Path, downloaded: list[PlannedFile], keys: dict[str, str]) -> None:
    """Add what was just downloaded and verified to the cache, then keep it within its budget."""
    try:
        with cache.lock():
            cache.fill([(keys[f.path], job_dir.joinpath(*f.path.split("/")), f.md5, bool(f.verified))
                        for f in downloaded if f.placed and not f.error])
    except OSError as err:
        log.warning("cache: not filled (%s)", err.strerror)


def _check_space(job_dir: Path, to_get: list[PlannedFile]) -> None:
    """LocalIOError before any download when the disk cannot hold what is to come."""
    need = sum(f.remote.size for f in to_get if f.remote)
    if not need:
        return
    free = shutil.disk_usage(job_dir).free
    if need > free:
        raise LocalIOError(f"the download needs {human_bytes(need)} but only {human_bytes(free)} is free "
                           f"under {job_dir}: free space or use a larger disk.")


def _write_report(result: PrepResult, opts: PrepOptions, env: BatchEnv) -> None:
    write_report(result.report(), report_path(opts.report_path, env, "nodekit-prep.json"))
