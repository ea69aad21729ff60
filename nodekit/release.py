"""The job release recipe: keep the job's logs and crash dumps, then wipe the job's data.

Order: the logs archive first, then the dumps (each compressed on its own), then the
manifest, then the wipe — always with time left for the wipe before `deadline`. Every
uploaded object is verified (size and Content-MD5 read back) and recorded in the manifest
as soon as it is; a re-run skips what the manifest and storage agree is there. Nothing is
wiped unless everything that was to be kept is kept, unless `wipe_on_upload_failure` says the
retention policy comes first. Safe to run again after an interruption at any point.
Raises NodekitError subclasses; `ReleaseResult.exit_code` says how a completed run went.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodekit.batchenv import BatchEnv, check_job_id, ensure_inside, shared_root
from nodekit.cache import CACHE_DIR
from nodekit.credentials import CredentialEnv
from nodekit.errors import ExitCode, NodekitError, TransientError, UnsafeInput
from nodekit.names import glob_match, unsafe_reason
from nodekit.plan import human_bytes
from nodekit.report import report_path, write_report
from nodekit.spec import SourceSpec
from nodekit.storage import CHUNK, RunContext, WritableStore
from nodekit.storage.factory import open_destination
from nodekit.storage.net import NetConfig

log = logging.getLogger(__name__)

DEFAULT_DUMPS = ("core", "core.*", "*.dmp", "*.mdmp")
DEFAULT_DEADLINE_S = 12 * 60.0
MAX_DEADLINE_S = 15 * 60.0  # Batch kills a release task after 15 minutes
DUMP_BLOCK = 8 * CHUNK  # each compressed independently: a gzip member, an uploaded block
DUMP_LEVEL = 1  # measured: level 1 is several times faster than 6 on dumps for a few % more bytes
LOGS_LEVEL = 6
ASSUMED_RATE = 50 * CHUNK  # bytes/s of a dump's compress+upload until one has been measured
MANIFEST = "manifest.json"
LOGS_ARCHIVE = "logs.tar.gz"


@dataclass(frozen=True)
class ReleaseOptions:
    """Everything one release run needs besides the environment."""

    upload_to: SourceSpec
    logs: tuple[str, ...] = ()
    dumps: tuple[str, ...] = DEFAULT_DUMPS
    deadline: float = DEFAULT_DEADLINE_S
    wipe_on_upload_failure: bool = False
    wipe_task_dirs: bool = False
    purge_cache: bool = False
    dry_run: bool = False
    report_path: Path | None = None


@dataclass(frozen=True)
class Collected:
    """A file to keep: its path on the node, its name in storage, and what it is."""

    path: Path
    name: str  # '/'-path below the job's workitems folder, e.g. job-1/task001/wd/app.log
    size: int
    mtime_ns: int
    kind: str  # "log" or "dump"


@dataclass
class ReleaseResult:
    """What a run did (or would do)."""

    prefix: str
    dry_run: bool = False
    logs: list[Collected] = field(default_factory=list)
    dumps: list[Collected] = field(default_factory=list)
    uploaded: list[dict[str, Any]] = field(default_factory=list)
    already: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    wiped: list[str] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)
    elapsed: float = 0.0
    retries: int = 0

    @property
    def bytes_uploaded(self) -> int:
        return sum(int(o["size"]) for o in self.uploaded)

    @property
    def exit_code(self) -> ExitCode:
        if not (self.failed or self.skipped):
            return ExitCode.OK
        if self.failed and not self.uploaded and not self.already and not self.wiped:
            return ExitCode.KEPT_ALL
        return ExitCode.TRANSIENT

    def report(self) -> dict[str, Any]:
        return {
            "command": "release",
            "dry_run": self.dry_run,
            "destination": self.prefix,
            "logs": [c.name for c in self.logs],
            "dumps": [c.name for c in self.dumps],
            "uploaded": self.uploaded,
            "already_uploaded": self.already,
            "bytes_uploaded": self.bytes_uploaded,
            "skipped": self.skipped,
            "failed": self.failed,
            "wiped": self.wiped,
            "kept": self.kept,
            "retries": self.retries,
            "elapsed_s": round(self.elapsed, 3),
            "exit_code": int(self.exit_code),
        }

    def summary(self) -> str:
        tag = "[DRY RUN] " if self.dry_run else ""
        return (f"release: {tag}{len(self.logs)} logs, {len(self.dumps)} dumps; uploaded {len(self.uploaded)} "
                f"({human_bytes(self.bytes_uploaded)}), already there {len(self.already)}, skipped "
                f"{len(self.skipped)}, failed {len(self.failed)}; wiped {len(self.wiped)}, kept {len(self.kept)} "
                f"in {self.elapsed:.2f} s")


# -- where things are ---------------------------------------------------------------------------
@dataclass(frozen=True)
class JobPlaces:
    """The job's folders on this node, resolved and checked."""

    shared: Path
    job_dir: Path  # SHARED/JOB_ID: what prep filled and tasks may have written to
    work: Path  # ROOT/workitems/JOB_ID: the job's task folders
    own_task: Path | None  # the release task's own folder: never touched
    job_id: str
    node_id: str


def job_places(env: BatchEnv) -> JobPlaces:
    """Resolve and check every folder release may read or delete; touches nothing.

    Refuses a missing or invalid job id, a missing node id, and a shared directory at the root
    of a file system (BatchEnvError / UnsafeInput).
    """
    job_id = check_job_id(env.require("job_id").strip())
    node_id = env.require("node_id").strip()
    if unsafe_reason(node_id) or "/" in node_id:
        raise UnsafeInput(f"node id {node_id!r} cannot be used in a blob name.")
    shared = shared_root(env)
    job_dir = shared / job_id
    root = Path(os.path.realpath(env.require("root_dir")))
    if root == Path(root.anchor):
        raise UnsafeInput(f"AZ_BATCH_NODE_ROOT_DIR resolves to {root}, the root of a file system: refusing it.")
    work = root / "workitems" / job_id
    own = Path(os.path.realpath(env.task_dir)) if env.task_dir else None
    return JobPlaces(shared, job_dir, work, own, job_id, node_id)


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def task_dirs(places: JobPlaces) -> list[Path]:
    """The job's task folders on this node (ROOT/workitems/JOB/job-N/TASK), not through links, not our own."""
    out = []
    if not _is_dir(places.work):
        return out
    for run in sorted(places.work.iterdir()):
        if not run.name.startswith("job-") or not _is_dir(run):
            continue
        for task in sorted(run.iterdir()):
            if _is_dir(task) and (places.own_task is None or Path(os.path.realpath(task)) != places.own_task):
                out.append(task)
    return out


def collect(places: JobPlaces, log_globs: tuple[str, ...], dump_globs: tuple[str, ...]) -> \
        tuple[list[Collected], list[Collected]]:
    """(logs, dumps) of this job on this node. Symbolic links are skipped, never followed."""
    logs: list[Collected] = []
    dumps: list[Collected] = []

    def add(path: Path, kind: str) -> None:
        st = os.lstat(path)
        name = path.relative_to(places.work).as_posix()
        (logs if kind == "log" else dumps).append(Collected(path, name, st.st_size, st.st_mtime_ns, kind))

    for task in task_dirs(places):
        for fname in ("stdout.txt", "stderr.txt"):
            p = task / fname
            if p.exists() and stat.S_ISREG(os.lstat(p).st_mode):
                add(p, "log")
        wd = task / "wd"
        if not _is_dir(wd):
            continue
        for folder, dirs, files in os.walk(wd, followlinks=False):
            dirs.sort()
            for fname in sorted(files):
                p = Path(folder) / fname
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    log.debug("skipped %s: not a regular file (links are never followed)", p)
                    continue
                rel = p.relative_to(wd).as_posix()
                if any(glob_match(g, rel) for g in dump_globs):
                    add(p, "dump")
                elif any(glob_match(g, rel) for g in log_globs):
                    add(p, "log")
    return logs, dumps


def wipe_targets(places: JobPlaces, with_task_dirs: bool, purge_cache: bool = False) -> list[Path]:
    """What the wipe deletes: the job's shared folder and, when asked, its tasks' working folders
    and the node's cache of inputs."""
    targets = [places.job_dir]
    if with_task_dirs:
        targets += [t / "wd" for t in task_dirs(places)]
    if purge_cache:
        targets.append(places.shared / CACHE_DIR)
    return targets


def _guard(places: JobPlaces, target: Path) -> None:
    """UnsafeInput unless `target` lies inside the job's folders and does not hold our own task folder."""
    base = places.shared if target in (places.job_dir, places.shared / CACHE_DIR) else places.work
    parent = ensure_inside(base, target.parent, what="a wipe target's folder")
    real = parent / target.name
    if real == base:
        raise UnsafeInput(f"refusing to wipe {target}: it is {base} itself.")
    if places.own_task is not None and (places.own_task == real or real in places.own_task.parents):
        raise UnsafeInput(f"refusing to wipe {target}: it holds the release task's own folder.")


def wipe(places: JobPlaces, target: Path) -> bool:
    """Delete `target` without following links; True if something was deleted ('already gone' is fine)."""
    _guard(places, target)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        os.unlink(target)  # a link is removed, never followed
        return True
    shutil.rmtree(target)  # removes links inside as links (fd-based on Linux: no symlink races)
    return True


# -- uploading ----------------------------------------------------------------------------------
class _Deadline(Exception):
    """The upload would not finish before the deadline (the wipe's reserve included)."""


def _gzip_blocks(path: Path, stop_at: float, rate: list[float]) -> Iterator[bytes]:
    """The file as concatenated gzip members, compressed two blocks at a time in parallel, in order."""
    started = time.monotonic()
    done = 0
    with open(path, "rb") as fh, ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        window = []
        eof = False
        while not eof or window:
            while not eof and len(window) < 4:
                block = fh.read(DUMP_BLOCK)
                if not block:
                    eof = True
                    break
                window.append((len(block), pool.submit(gzip.compress, block, DUMP_LEVEL, mtime=0)))
            if not window:
                break
            n, fut = window.pop(0)
            if time.monotonic() > stop_at:
                raise _Deadline()
            yield fut.result()
            done += n
            rate[0] = done / max(time.monotonic() - started, 1e-3)


def _logs_archive(logs: list[Collected], where: Path) -> Path:
    """A deterministic .tar.gz of the logs (same logs, same bytes) in `where`."""
    fd, name = tempfile.mkstemp(prefix=".nodekit-logs-", suffix=".tar.gz", dir=where)
    os.close(fd)
    path = Path(name)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=LOGS_LEVEL,
                                                 mtime=0) as gz, tarfile.open(fileobj=gz, mode="w",
                                                                              format=tarfile.PAX_FORMAT) as tar:
        for c in logs:
            info = tar.gettarinfo(str(c.path), arcname=c.name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(c.path, "rb") as fh:
                tar.addfile(info, fh)
    return path


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(DUMP_BLOCK):
            yield chunk


class _Uploader:
    """Uploads into `<prefix>/`, verifies each object, and keeps the manifest current."""

    def __init__(self, store: WritableStore, prefix: str, places: JobPlaces, result: ReleaseResult) -> None:
        self.store = store
        self.prefix = prefix
        self.result = result
        self.manifest: dict[str, Any] = {"job_id": places.job_id, "node_id": places.node_id, "complete": False,
                                         "objects": {}}
        old = store.read_small(f"{prefix}/{MANIFEST}")
        self.previous: dict[str, Any] = {}
        if old:
            try:
                data = json.loads(old)
                if data.get("job_id") == places.job_id and data.get("node_id") == places.node_id:
                    self.previous = dict(data.get("objects", {}))
            except ValueError:
                log.warning("the manifest in storage is not valid JSON: it will be rewritten")

    def already_there(self, name: str, covers: Callable[[dict[str, Any]], bool]) -> str | None:
        """The name of a verified object in storage whose recorded source `covers` accepts, else None.

        Looks at `name` and its numbered successors (`name` never gets overwritten with other content:
        see `free_name`). Verified means: storage still holds the size and MD5 the manifest recorded.
        """
        for candidate in self._names(name):
            entry = self.previous.get(candidate)
            if entry is None:
                return None
            if not covers(entry.get("source", {})):
                continue
            remote = self.store.head(f"{self.prefix}/{candidate}")
            if remote is None or remote.size != entry.get("size") or remote.content_md5 != entry.get("md5"):
                continue
            self.manifest["objects"][candidate] = entry
            self.result.already.append({"name": candidate, "size": entry["size"], "md5": entry["md5"]})
            log.info("already uploaded and verified: %s", candidate)
            return candidate
        return None  # pragma: no cover - _names is endless

    def free_name(self, name: str) -> str:
        """`name`, or `name` numbered (-2, -3, …) when an earlier run kept other content under it."""
        for candidate in self._names(name):
            if candidate not in self.previous:
                return candidate
        return name  # pragma: no cover

    @staticmethod
    def _names(name: str) -> Iterator[str]:
        yield name
        folder, slash, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        n = 2
        while True:
            yield f"{folder}{slash}{stem}-{n}{dot}{ext}"
            n += 1

    def put(self, name: str, chunks: Iterator[bytes], source: dict[str, Any], kind: str) -> None:
        full = f"{self.prefix}/{name}"
        written = self.store.put(full, chunks, metadata={"nodekitkind": kind})
        remote = self.store.head(full)
        if remote is None or remote.size != written.size or remote.content_md5 != written.content_md5:
            raise TransientError(f"{full}: what storage holds does not match what was uploaded; run release again.")
        entry = {"size": written.size, "md5": written.content_md5, "kind": kind, "source": source}
        self.manifest["objects"][name] = entry
        self.result.uploaded.append({"name": name, "size": written.size, "md5": written.content_md5})
        log.info("uploaded and verified %s (%s)", name, human_bytes(written.size))
        self.write_manifest()

    def write_manifest(self, complete: bool = False) -> None:
        for name, entry in self.previous.items():  # what earlier runs kept stays listed
            self.manifest["objects"].setdefault(name, entry)
        self.manifest["complete"] = complete
        body = json.dumps(self.manifest, indent=2, sort_keys=True).encode()
        self.store.put(f"{self.prefix}/{MANIFEST}", iter([body]), metadata={"nodekitkind": "manifest"})


def run_release(opts: ReleaseOptions, env: BatchEnv, creds: CredentialEnv,
                emit: Callable[[str], None] = print, net: NetConfig | None = None) -> ReleaseResult:
    """Keep the job's logs and dumps, then wipe its data. See the module docstring.

    `net` says how to reach storage (trust, timeouts; the CLI reads it from the environment)."""
    started = time.monotonic()
    places = job_places(env)
    reserve = min(60.0, 0.2 * opts.deadline)  # time kept back for the wipe
    stop_at = started + opts.deadline - reserve
    ctx = RunContext(timeout=max(1.0, opts.deadline - reserve))
    prefix = f"{places.job_id}/{places.node_id}"
    logs, dumps = collect(places, opts.logs, opts.dumps)
    targets = wipe_targets(places, opts.wipe_task_dirs, opts.purge_cache)
    for t in targets:
        _guard(places, t)
    result = ReleaseResult(prefix=f"{opts.upload_to.display}/{prefix}", dry_run=opts.dry_run, logs=logs, dumps=dumps)

    if opts.dry_run:
        for c in logs:
            emit(f"[DRY RUN] upload   {prefix}/{LOGS_ARCHIVE} <- {c.path} ({human_bytes(c.size)})")
        for c in dumps:
            emit(f"[DRY RUN] upload   {prefix}/dumps/{c.name}.gz <- {c.path} ({human_bytes(c.size)})")
        for t in targets:
            if os.path.lexists(t):
                emit(f"[DRY RUN] delete   {t}")
        result.elapsed = time.monotonic() - started
        return result

    failure: NodekitError | None = None
    try:
        store = open_destination(opts.upload_to, creds, net or NetConfig(), ctx)
        up = _Uploader(store, prefix, places, result)
        if logs:
            files = {c.name: [c.size, c.mtime_ns] for c in logs}

            def covers_logs(source: dict[str, Any]) -> bool:
                kept = source.get("files", {})
                return all(kept.get(n) == v for n, v in files.items())

            if not up.already_there(LOGS_ARCHIVE, covers_logs):
                scratch = Path(env.task_working_dir) if env.task_working_dir else Path(tempfile.gettempdir())
                archive = _logs_archive(logs, scratch)
                try:
                    up.put(up.free_name(LOGS_ARCHIVE), _file_chunks(archive), {"files": files}, "logs")
                finally:
                    archive.unlink(missing_ok=True)
        rate = [float(ASSUMED_RATE)]

        def skip(c: Collected, name: str, why: str) -> None:
            result.skipped.append({"name": name, "path": str(c.path), "why": why})
            log.warning("skipped %s: %s", c.path, why)

        for c in sorted(dumps, key=lambda d: d.size):
            name = f"dumps/{c.name}.gz"
            source = {"path": c.name, "size": c.size, "mtime_ns": c.mtime_ns}
            if up.already_there(name, lambda s, source=source: s == source):  # type: ignore[misc]
                continue
            left = stop_at - time.monotonic()
            if c.size / rate[0] > left:
                skip(c, name, f"would take about {c.size / rate[0]:.0f} s at {human_bytes(rate[0])}/s; "
                              f"{max(left, 0):.0f} s were left before the wipe's reserve")
                continue
            try:
                up.put(up.free_name(name), _gzip_blocks(c.path, stop_at, rate), source, "dump")
            except _Deadline:
                skip(c, name, "the deadline came during its upload (the partial upload is not visible)")
        up.write_manifest(complete=not result.skipped)
    except NodekitError as err:
        failure = err
        result.failed.append({"what": "upload", "error": str(err)})
        log.error("upload failed: %s", err)
    result.retries = ctx.retries

    incomplete = failure is not None or bool(result.skipped)
    if incomplete and not opts.wipe_on_upload_failure:
        why = ("the upload failed" if failure else "not everything was uploaded before the deadline") + \
            ": nothing wiped, so nothing is lost (--wipe-on-upload-failure puts the retention policy first)"
        for t in targets:
            if os.path.lexists(t):
                result.kept.append({"path": str(t), "why": why})
        log.warning("kept the job's data: %s", why)
    else:
        if incomplete:
            log.warning("wiping although %s (--wipe-on-upload-failure)",
                        "the upload failed" if failure else "not everything was uploaded")
        for t in targets:
            if wipe(places, t):
                result.wiped.append(str(t))
                log.info("wiped %s", t)
    result.elapsed = time.monotonic() - started
    _write_report(result, opts, env)
    if failure is not None and result.exit_code is ExitCode.KEPT_ALL:
        raise _KeptAll(f"{failure} Nothing was wiped: the job's data is still on the node.")
    return result


class _KeptAll(NodekitError):
    exit_code = ExitCode.KEPT_ALL


def _write_report(result: ReleaseResult, opts: ReleaseOptions, env: BatchEnv) -> None:
    write_report(result.report(), report_path(opts.report_path, env, "nodekit-release.json"))
