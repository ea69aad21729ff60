"""The job release recipe: keep the job's logs and crash dumps, then wipe the job's data.

Four steps, in order: **collect** (what this node holds of the job: logs, dumps, and what
cannot be kept, each with its reason), **upload** (the logs archive first, then the dumps, each
compressed on its own), the **manifest**, then the **wipe** — always with time left for the wipe
before `deadline`. Every uploaded object is verified (size and Content-MD5 read back) and recorded
in the manifest as soon as it is; a re-run skips what the manifest and storage agree is there, and
writes nothing when nothing is new. A file that cannot be read (permissions, vanished, not a
regular file) is skipped on its own and named in the log and the report; everything else is kept.
Nothing is wiped unless everything that was to be kept is kept, unless `wipe_on_upload_failure`
says the retention policy comes first.

Two layouts in storage: nodekit's (`JOB_ID/NODE_ID/`: `logs.tar.gz`, `dumps/…/<path>.gz`,
`manifest.json`) and the Batch File Conventions standard's (`layout="conventions"`: every log, dump,
task output and job output its own object in the job's container, named by `conventions`; see
`conventions_name` and `_Conventions`), where objects are only ever created, never replaced, and other
content found under a name is a conflict (ExitCode.CONFLICT) with this node's copy kept beside it.

A local destination must lie outside everything the wipe deletes. Safe to run again after an
interruption at any point.
Raises NodekitError subclasses; `ReleaseResult.exit_code` says how a completed run went.
"""

from __future__ import annotations

import base64
import errno
import gzip
import json
import logging
import os
import shutil
import stat
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nodekit import conventions
from nodekit.batchenv import RESERVED_PREFIX, BatchEnv, check_job_id, ensure_inside, is_batch_id, shared_root
from nodekit.cache import CACHE_DIR
from nodekit.credentials import CredentialEnv
from nodekit.errors import (
    AccessDenied,
    BatchEnvError,
    ExitCode,
    LocalIOError,
    NodekitError,
    TransientError,
    UnsafeInput,
    UsageError,
)
from nodekit.names import PARTIAL_SUFFIX, STATE_DIR, check_globs, glob_match, unsafe_reason
from nodekit.plan import human_bytes
from nodekit.report import report_path, write_report
from nodekit.spec import BUILTIN, LAYOUTS, SourceKind, SourceSpec, is_account, parse_source, with_path
from nodekit.storage import CHUNK, ObjectExists, RemoteFile, RunContext, WritableStore
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
MANIFEST_EVERY_S = 2.0  # the conventions layout's many small objects: the manifest at most this often
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
    layout: str = "nodekit"  # or "conventions": the Batch File Conventions standard's layout
    outputs: tuple[str, ...] = ()  # task outputs: globs in the tasks' working folders (conventions)
    job_outputs: tuple[str, ...] = ()  # job outputs: globs in the job's shared folder (conventions)


@dataclass(frozen=True)
class Collected:
    """A file to keep: its path on the node, its name in storage, and what it is."""

    path: Path
    name: str  # '/'-path below the job's workitems folder, e.g. job-1/task001/wd/app.log; a job output's
    #            below the job's shared folder, e.g. results/summary.csv
    size: int
    mtime_ns: int
    kind: str  # "log", "dump", "output" (a task's) or "job-output"


@dataclass
class ReleaseResult:
    """What a run did (or would do)."""

    prefix: str
    dry_run: bool = False
    logs: list[Collected] = field(default_factory=list)
    dumps: list[Collected] = field(default_factory=list)
    outputs: list[Collected] = field(default_factory=list)
    job_outputs: list[Collected] = field(default_factory=list)
    layout: str = "nodekit"
    conflicts: list[dict[str, Any]] = field(default_factory=list)
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
        if any(f["what"] == "wipe" for f in self.failed):
            return ExitCode.LOCAL_IO
        if not (self.failed or self.skipped):
            return ExitCode.CONFLICT if self.conflicts else ExitCode.OK
        if self.failed and not self.uploaded and not self.already and not self.wiped:
            return ExitCode.KEPT_ALL
        return ExitCode.TRANSIENT

    def skip(self, name: str, path: Path | str, why: str) -> None:
        """Record that `path` is not kept, and why (once per path); logged as a warning."""
        if any(s["path"] == str(path) for s in self.skipped):
            return
        self.skipped.append({"name": name, "path": str(path), "why": why})
        log.warning("not kept: %s: %s", path, why)

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
            **({"layout": self.layout, "outputs": [c.name for c in self.outputs],
                "job_outputs": [c.name for c in self.job_outputs], "conflicts": self.conflicts}
               if self.layout != "nodekit" else {}),
        }

    def summary(self) -> str:
        tag = "[DRY RUN] " if self.dry_run else ""
        if self.layout != "nodekit":
            tag += (f"{self.layout} layout: {len(self.outputs)} outputs, {len(self.job_outputs)} job outputs, "
                    f"{len(self.conflicts)} conflicts, ")
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
    own_tasks: tuple[Path, ...]  # the release task's own folder (as each clue names it): never touched
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
    if not root.is_dir():
        raise BatchEnvError(f"AZ_BATCH_NODE_ROOT_DIR {env.root_dir} is not a folder on this node: check it, or pass "
                            "--root-dir for a local run (release looks for the job's logs under it).")
    work = root / "workitems" / job_id
    return JobPlaces(shared, job_dir, work, _own_tasks(env, work), job_id, node_id)


def _own_tasks(env: BatchEnv, work: Path) -> tuple[Path, ...]:
    """The release task's own folder, resolved, as each clue names it: AZ_BATCH_TASK_DIR, the parent of
    AZ_BATCH_TASK_WORKING_DIR, and the task folder (WORK/job-N/TASK) this process runs in."""
    clues = [env.task_dir, os.path.dirname(env.task_working_dir.rstrip("/\\")) if env.task_working_dir else None]
    cwd = Path(os.path.realpath(os.getcwd()))
    below = cwd.relative_to(work).parts if work in cwd.parents else ()
    if len(below) >= 2:
        clues.append(str(work.joinpath(*below[:2])))
    return tuple(dict.fromkeys(Path(os.path.realpath(c)) for c in clues if c and c.strip()))


def check_own_task(places: JobPlaces, env: BatchEnv) -> None:
    """For --wipe-task-dirs: BatchEnvError unless the release task's own folder is known and is one of
    the job's task folders, so that the wipe of the others can leave it alone. Touches nothing."""
    if not (env.task_dir or env.task_working_dir):
        raise BatchEnvError("AZ_BATCH_TASK_DIR is not set: --wipe-task-dirs must know the release task's own folder "
                            "to leave it alone; run this as a job release task, or set AZ_BATCH_TASK_DIR for a "
                            "local run.")
    for own in places.own_tasks:
        if places.work not in own.parents:
            raise BatchEnvError(f"AZ_BATCH_TASK_DIR (or AZ_BATCH_TASK_WORKING_DIR) names {own}, which is not a task "
                                f"folder of job {places.job_id} under {places.work}: --wipe-task-dirs cannot tell "
                                "its own folder from the others; check the variables.")


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
            if _is_dir(task) and Path(os.path.realpath(task)) not in places.own_tasks:
                out.append(task)
    return out


@dataclass
class Collection:
    """What this node holds of the job: the logs and dumps to keep, and what cannot be kept (and why)."""

    logs: list[Collected] = field(default_factory=list)
    dumps: list[Collected] = field(default_factory=list)
    outputs: list[Collected] = field(default_factory=list)
    job_outputs: list[Collected] = field(default_factory=list)
    skipped: list[tuple[str, Path, str]] = field(default_factory=list)  # (name, path, why)

    def add(self, item: Collected) -> None:
        {"log": self.logs, "dump": self.dumps, "output": self.outputs, "job-output": self.job_outputs}[
            item.kind].append(item)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _not_regular(mode: int) -> str:
    return f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'a special file')})"


def open_regular(path: Path) -> tuple[IO[bytes] | None, os.stat_result | None, str]:
    """(file, its stat, '') for a regular file that can be read now, else (None, None, why not).

    Never follows a link, never blocks on a FIFO; the stat is of the file opened.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return None, None, "it vanished before it could be read"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, None, "it became a symbolic link (never followed)"
        return None, None, f"it cannot be read: {err.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None, None, _not_regular(st.st_mode)
        return os.fdopen(fd, "rb"), st, ""
    except OSError as err:  # pragma: no cover - fstat of an open descriptor
        os.close(fd)
        return None, None, f"it cannot be read: {err.strerror}"


def collect(places: JobPlaces, log_globs: tuple[str, ...], dump_globs: tuple[str, ...],
            output_globs: tuple[str, ...] = (), job_output_globs: tuple[str, ...] = ()) -> Collection:
    """This job's logs, dumps and outputs on this node, each checked to be readable now.

    In the tasks' working folders a file is a dump, else a log, else an output (the first of its
    patterns that match); job outputs are `job_output_globs` matched in the job's shared folder
    (but prep's own state folder and partial downloads).
    Symbolic links are skipped, never followed (and not reported: they are not this job's data).
    A file to keep that cannot be read, vanished, or is not a regular file (a FIFO, a device), and a
    folder that cannot be listed, go into `skipped` with the reason.
    """
    out = Collection()

    def consider(path: Path, kind: str, name: str) -> None:
        fh, st, why = open_regular(path)
        if fh is None or st is None:
            out.skipped.append((name, path, why))
            return
        fh.close()
        out.add(Collected(path, name, st.st_size, st.st_mtime_ns, kind))

    def kind_of(rel: str) -> str | None:
        if any(glob_match(g, rel) for g in dump_globs):
            return "dump"
        if any(glob_match(g, rel) for g in log_globs):
            return "log"
        if any(glob_match(g, rel) for g in output_globs):
            return "output"
        return None

    def walk(top: Path, base: Path, classify: Callable[[str], str | None]) -> None:
        """Files under `top` that `classify` (given the path below `top`) keeps; names below `base`."""
        def unreadable(err: OSError) -> None:
            folder = Path(err.filename) if err.filename else top
            if err.errno != errno.ENOENT:  # a folder removed meanwhile held nothing to keep
                out.skipped.append((folder.relative_to(base).as_posix(), folder,
                                    f"the folder cannot be listed ({err.strerror}): what it holds is not known"))

        for folder, dirs, files in os.walk(top, onerror=unreadable, followlinks=False):
            dirs.sort()
            for fname in sorted(files):
                p = Path(folder) / fname
                kind = classify(p.relative_to(top).as_posix())
                if kind is None:
                    continue
                name = p.relative_to(base).as_posix()
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    out.skipped.append((name, p, "it vanished before it could be read"))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    log.debug("skipped %s: a symbolic link (never followed)", p)
                    continue
                consider(p, kind, name)

    for task in task_dirs(places):
        for fname in ("stdout.txt", "stderr.txt"):
            p = task / fname
            try:
                st = os.lstat(p)
            except OSError:
                continue  # none written: nothing to keep
            if not stat.S_ISLNK(st.st_mode):
                consider(p, "log", p.relative_to(places.work).as_posix())
        wd = task / "wd"
        if _is_dir(wd):
            walk(wd, places.work, kind_of)

    def job_output(rel: str) -> str | None:
        if rel.split("/", 1)[0] == STATE_DIR or rel.endswith(PARTIAL_SUFFIX):
            return None  # prep's state and downloads in progress are not the job's output
        return "job-output" if any(glob_match(g, rel) for g in job_output_globs) else None

    if job_output_globs and _is_dir(places.job_dir):
        walk(places.job_dir, places.job_dir, job_output)
    return out


def check_destination(places: JobPlaces, dest: SourceSpec, wipe_task_dirs: bool, purge_cache: bool,
                      below: tuple[str, ...] | None = None) -> None:
    """Refuse a local destination that the wipe would delete, before anything happens.

    The objects go to DEST/JOB_ID/NODE_ID (or DEST/`below`): that folder (links resolved) may not lie inside the job's
    folder, another job's folder in the shared directory, nodekit's own folders there (the node's cache,
    which prep repairs by deleting what it does not know), nor — with --wipe-task-dirs — a task's
    working folder. A relative destination is refused: on a node it would resolve in the release
    task's own working folder, which Batch deletes. Raises UsageError or UnsafeInput; touches nothing.
    """
    if dest.kind is not SourceKind.LOCAL or dest.path is None:
        return
    if dest.display in BUILTIN:
        raise UsageError(f"--upload-to {dest.display}: the embedded sample is not a destination; give a blob "
                         "container URL or an absolute folder.")
    raw = os.path.expanduser(dest.path)
    if not os.path.isabs(raw):
        raise UsageError(f"--upload-to {dest.path}: a local destination must be an absolute path (a relative one "
                         "resolves in the release task's working folder, which Batch deletes).")
    resolved = Path(os.path.realpath(raw))
    existing = resolved
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--upload-to {dest.path}: {existing} is not a folder: give a folder (created if missing) "
                         "or a blob container URL.")
    target = resolved.joinpath(*(below if below is not None else (places.job_id, places.node_id)))

    def refuse(what: str) -> None:
        raise UnsafeInput(f"--upload-to {dest.path}: the logs would go to {target}, inside {what}, which "
                          "release or prep deletes: choose a folder outside the job's folders.")

    if target == places.job_dir or places.job_dir in target.parents:
        refuse(f"the job folder {places.job_dir}")
    if places.shared in target.parents:
        top = target.relative_to(places.shared).parts[0]
        if top.startswith(RESERVED_PREFIX):
            refuse(f"{places.shared / top}, nodekit's own folder" +
                   (" (the node's cache, purged by --purge-cache)" if top == CACHE_DIR and purge_cache else ""))
        if is_batch_id(top):
            refuse(f"{places.shared / top}, another job's folder")
    if wipe_task_dirs and places.work in target.parents:
        parts = target.relative_to(places.work).parts
        task = places.work.joinpath(*parts[:2])
        if len(parts) >= 3 and parts[2] == "wd" and parts[0].startswith("job-") and task not in places.own_tasks:
            refuse(f"the working folder of task {parts[1]} (--wipe-task-dirs)")


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
    if any(own == real or real in own.parents for own in places.own_tasks):
        raise UnsafeInput(f"refusing to wipe {target}: it holds the release task's own folder.")


def wipe(places: JobPlaces, target: Path) -> bool:
    """Delete `target` without following links; True if something was deleted ('already gone' is fine).

    Raises LocalIOError naming the first path that could not be deleted (the rest is deleted anyway).
    """
    _guard(places, target)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise LocalIOError(f"cannot wipe {target}: {err.strerror}.") from err
    errors: list[tuple[str, str]] = []

    def note(_fn: Any, path: str, exc: Any) -> None:
        err = exc if isinstance(exc, BaseException) else exc[1]
        if not isinstance(err, FileNotFoundError):
            errors.append((path, getattr(err, "strerror", None) or str(err)))

    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(target)  # a link is removed, never followed
        except FileNotFoundError:
            return False
        except OSError as err:
            raise LocalIOError(f"cannot wipe {target}: {err.strerror}.") from err
        return True
    # removes links inside as links (fd-based on Linux: no symlink races); goes on past what it cannot delete
    if sys.version_info >= (3, 12):
        shutil.rmtree(target, onexc=note)
    else:  # pragma: no cover - older Pythons
        shutil.rmtree(target, onerror=note)
    if errors:
        path, why = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise LocalIOError(f"cannot wipe {path}: {why}{more}; check the folder's permissions.")
    return True


# -- uploading ----------------------------------------------------------------------------------
class _Deadline(Exception):
    """The upload would not finish before the deadline (the wipe's reserve included)."""


class _Unreadable(Exception):
    """A file being uploaded could not be read to its end: the upload is abandoned (never committed).

    Not an OSError, so that no store takes it for a failure of the destination.
    """

    def __init__(self, item: Collected, why: str) -> None:
        super().__init__(why)
        self.item = item
        self.why = why


def _read(fh: IO[bytes], n: int, item: Collected) -> bytes:
    try:
        return fh.read(n)
    except OSError as err:
        raise _Unreadable(item, f"reading it failed: {err.strerror}") from None


def _gzip_blocks(fh: IO[bytes], item: Collected, stop_at: float, rate: list[float]) -> Iterator[bytes]:
    """The open file as concatenated gzip members, compressed two blocks at a time in parallel, in order."""
    started = time.monotonic()
    done = 0
    with fh, ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        window = []
        eof = False
        while not eof or window:
            while not eof and len(window) < 4:
                block = _read(fh, DUMP_BLOCK, item)
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


class _Buffer:
    """A write-only file that the gzip writer fills and the archive generator drains."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


def _logs_archive(logs: list[Collected], files: dict[str, list[int]], skip: Callable[[Collected, str], None]) -> \
        Iterator[bytes]:
    """The logs as a deterministic .tar.gz (same logs, same bytes), streamed in blocks of DUMP_BLOCK.

    No temporary file: memory stays at about one block whatever the logs' sizes. A log that cannot be
    opened is skipped (`skip`); one that cannot be read to the end raises _Unreadable (the archive
    is then built again without it). `files` gets the size and mtime of each log archived.
    """
    out = _Buffer()
    offset = 0  # bytes of tar written, for the final record padding
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=LOGS_LEVEL, mtime=0) as gz:  # type: ignore[arg-type]
        for c in logs:
            fh, st, why = open_regular(c.path)
            if fh is None or st is None:
                skip(c, why)
                continue
            with fh:
                info = tarfile.TarInfo(c.name)
                info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                gz.write(header)
                offset += len(header)
                left = st.st_size
                while left > 0:
                    piece = _read(fh, min(CHUNK, left), c)
                    if not piece:
                        raise _Unreadable(c, "it became shorter while it was being archived")
                    gz.write(piece)
                    left -= len(piece)
                    if len(out.data) >= DUMP_BLOCK:
                        yield out.take()
                pad = -st.st_size % tarfile.BLOCKSIZE
                gz.write(b"\0" * pad)
                offset += st.st_size + pad
                files[c.name] = [st.st_size, st.st_mtime_ns]
        end = 2 * tarfile.BLOCKSIZE
        gz.write(b"\0" * (end + (-(offset + end) % tarfile.RECORDSIZE)))
    yield out.take()


class _Uploader:
    """Uploads into `<prefix>/` (or the store's root), verifies each object, and keeps the manifest current.

    Safe to use from several threads. With `batched`, the manifest is written at most every
    MANIFEST_EVERY_S seconds (and after any large object) rather than after each object: a run
    killed in between finds its last objects in storage without a manifest entry, and the
    conventions layout's create-only uploads recognise them there by their MD5.
    """

    def __init__(self, store: WritableStore, prefix: str, places: JobPlaces, result: ReleaseResult,
                 manifest: str = MANIFEST, batched: bool = False, extra: dict[str, Any] | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.result = result
        self.manifest_name = manifest
        self.batched = batched
        self.lock = threading.RLock()
        self.last_write = 0.0
        self.manifest: dict[str, Any] = {"job_id": places.job_id, "node_id": places.node_id, "complete": False,
                                         **(extra or {}), "objects": {}}
        old = store.read_small(self.full(manifest))
        self.written: bytes | None = old  # what storage holds: a manifest equal to it is not written again
        self.previous: dict[str, Any] = {}
        if old:
            try:
                data = json.loads(old)
                if data.get("job_id") == places.job_id and data.get("node_id") == places.node_id:
                    self.previous = dict(data.get("objects", {}))
            except ValueError:
                log.warning("the manifest in storage is not valid JSON: it will be rewritten")

    def full(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

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
            remote = self.store.head(self.full(candidate))
            if remote is None or remote.size != entry.get("size") or remote.content_md5 != entry.get("md5"):
                continue
            with self.lock:
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

    def put(self, name: str, chunks: Iterator[bytes], source: dict[str, Any], kind: str, *,
            content_type: str | None = None, create_only: bool = False) -> None:
        """Upload, read back, record. `source` is read after the upload (the archive fills it as it goes).

        With `create_only`, ObjectExists (storage holds that name already) comes through, nothing written.
        """
        full = self.full(name)
        written = self.store.put(full, chunks, metadata={"nodekitkind": kind}, content_type=content_type,
                                 create_only=create_only)
        remote = self.store.head(full)
        if remote is None or remote.size != written.size or remote.content_md5 != written.content_md5:
            raise TransientError(f"{full}: what storage holds does not match what was uploaded; run release again.")
        self.record(name, {"size": written.size, "md5": written.content_md5, "kind": kind, "source": source},
                    uploaded=True)
        log.info("uploaded and verified %s (%s)", name, human_bytes(written.size))

    def record(self, name: str, entry: dict[str, Any], *, uploaded: bool) -> None:
        """List `name` in the manifest (and the report: uploaded, or already there) and save the manifest."""
        with self.lock:
            self.manifest["objects"][name] = entry
            (self.result.uploaded if uploaded else self.result.already).append(
                {"name": name, "size": entry["size"], "md5": entry["md5"]})
            if not self.batched or entry["size"] >= DUMP_BLOCK or time.monotonic() - self.last_write >= \
                    MANIFEST_EVERY_S:
                self.write_manifest()

    def write_manifest(self, complete: bool = False) -> None:
        """Write the manifest, unless storage already holds exactly this one (a re-run with nothing new)."""
        with self.lock:
            for name, entry in self.previous.items():  # what earlier runs kept stays listed
                self.manifest["objects"].setdefault(name, entry)
            self.manifest["complete"] = complete
            body = json.dumps(self.manifest, indent=2, sort_keys=True).encode()
            self.last_write = time.monotonic()
            if body == self.written:
                return
            self.store.put(self.full(self.manifest_name), iter([body]), metadata={"nodekitkind": "manifest"},
                           content_type="application/json")
            self.written = body


def _upload_logs(up: _Uploader, logs: list[Collected], result: ReleaseResult) -> None:
    """The logs archive, unless an earlier run kept one that covers these logs. A log that turns out
    unreadable while archived is skipped and the archive built again without it."""
    left = list(logs)

    def skip(c: Collected, why: str) -> None:
        result.skip(c.name, c.path, why)

    while left:
        wanted = {c.name: [c.size, c.mtime_ns] for c in left}

        def covers(source: dict[str, Any], wanted: dict[str, list[int]] = wanted) -> bool:
            kept = source.get("files", {})
            return all(kept.get(n) == v for n, v in wanted.items())

        if up.already_there(LOGS_ARCHIVE, covers):
            return
        files: dict[str, list[int]] = {}
        try:
            up.put(up.free_name(LOGS_ARCHIVE), _logs_archive(left, files, skip), {"files": files}, "logs")
            return
        except _Unreadable as err:
            skip(err.item, err.why)
            left = [c for c in left if c.path != err.item.path and not any(
                s["path"] == str(c.path) for s in result.skipped)]


def _upload_dumps(up: _Uploader, dumps: list[Collected], stop_at: float, result: ReleaseResult) -> None:
    """Each dump compressed and streamed on its own, smallest first, while the deadline allows."""
    rate = [float(ASSUMED_RATE)]
    for c in sorted(dumps, key=lambda d: d.size):
        name = f"dumps/{c.name}.gz"
        source = {"path": c.name, "size": c.size, "mtime_ns": c.mtime_ns}
        if up.already_there(name, lambda s, source=source: s == source):  # type: ignore[misc]
            continue
        left = stop_at - time.monotonic()
        if c.size / rate[0] > left:
            result.skip(name, c.path, f"would take about {c.size / rate[0]:.0f} s at {human_bytes(rate[0])}/s; "
                                      f"{max(left, 0):.0f} s were left before the wipe's reserve")
            continue
        fh, _st, why = open_regular(c.path)
        if fh is None:
            result.skip(name, c.path, why)
            continue
        try:
            up.put(up.free_name(name), _gzip_blocks(fh, c, stop_at, rate), source, "dump")
        except _Deadline:
            result.skip(name, c.path, "the deadline came during its upload (the partial upload is not visible)")
        except _Unreadable as err:
            result.skip(name, c.path, f"{err.why} (the partial upload is not visible)")
        finally:
            fh.close()


# -- the Batch File Conventions layout ------------------------------------------------------------
CONVENTIONS_MANIFEST = "nodekit-manifest.json"  # under jobrelease/<node>/$TaskLog/: this node's record
SMALL = DUMP_BLOCK  # objects up to this size go up side by side
SMALL_WORKERS = 8


def conventions_name(item: Collected, node_id: str) -> str:
    """Where the standard keeps `item` in the job's container (pure).

    A task's stdout.txt and stderr.txt: `<task>/$TaskLog/stdout.txt`; a file of its working folder:
    `<task>/$TaskLog/<path>` (a log), `<task>/$TaskLog/<path>.gz` (a dump, compressed), or
    `<task>/$TaskOutput/<path>` (an output), `<path>` below the working folder; the job preparation
    task's under `jobpreparation/<node>/`. A job output: `$JobOutput/<path>` below the job's folder.
    """
    if item.kind == "job-output":
        return f"{conventions.job_prefix('JobOutput')}/{item.name}"
    _run, task, *rest = item.name.split("/")
    if rest[0] == "wd":
        rest = rest[1:]
    kind = "TaskOutput" if item.kind == "output" else "TaskLog"
    path = "/".join(rest) + (".gz" if item.kind == "dump" else "")
    return f"{conventions.task_prefix(task, kind, node_id)}/{path}"


def conflict_name(name: str, node_id: str) -> str:
    """Where this node keeps its own copy of `name` when storage holds other content there:
    `jobrelease/<node>/$TaskOutput/<name>`, the release task's output on this node."""
    return f"{conventions.task_prefix('jobrelease', 'TaskOutput', node_id)}/{name}"


def _content_type(item: Collected, name: str) -> str:
    import mimetypes

    if item.kind == "dump":
        return "application/gzip"
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed and not encoding:
        return guessed + ("; charset=utf-8" if guessed == "text/plain" else "")
    return "text/plain; charset=utf-8" if item.kind == "log" else "application/octet-stream"


def _file_blocks(fh: IO[bytes], item: Collected, stop_at: float, rate: list[float]) -> Iterator[bytes]:
    """The open file as it is, in blocks of DUMP_BLOCK; _Deadline when the deadline comes first."""
    started = time.monotonic()
    done = 0
    with fh:
        while block := _read(fh, DUMP_BLOCK, item):
            if time.monotonic() > stop_at:
                raise _Deadline()
            yield block
            done += len(block)
            if done >= DUMP_BLOCK:  # a rate worth measuring (small files measure the latency)
                rate[0] = done / max(time.monotonic() - started, 1e-3)


def _local_md5(item: Collected) -> tuple[int, str] | None:
    """(size, base64 MD5) of the file as it is now, or None if it cannot be read."""
    import hashlib

    fh, _st, _why = open_regular(item.path)
    if fh is None:
        return None
    digest = hashlib.md5()
    size = 0
    try:
        with fh:
            while chunk := fh.read(DUMP_BLOCK):
                digest.update(chunk)
                size += len(chunk)
    except OSError:
        return None
    return size, base64.b64encode(digest.digest()).decode()


class _Conventions:
    """Keeps each collected file as its own object in the standard's layout (see `conventions_name`).

    Each object is created only where none exists (If-None-Match: *): a name that storage already
    holds is never replaced. When it holds the same bytes (the MD5 matches: another node kept the
    same job output, or a killed run of this one got that far) the object counts as kept; other
    bytes are a conflict, reported, and this node's copy is kept under `conflict_name`. A job output
    is looked up first (the other nodes' copy is the common case): the same content is then not
    uploaded at all, only read here to compare.
    """

    def __init__(self, up: _Uploader, node_id: str, stop_at: float, result: ReleaseResult) -> None:
        self.up = up
        self.node_id = node_id
        self.stop_at = stop_at
        self.result = result
        self.rate = [float(ASSUMED_RATE)]

    def run(self, found: Collection) -> None:
        planned: dict[str, Collected] = {}
        for item in found.logs + found.job_outputs + found.outputs + found.dumps:
            name = conventions_name(item, self.node_id)
            if name in planned:
                self.result.skip(name, item.path, f"{planned[name].path} goes to the same name in the layout")
                continue
            planned[name] = item
        small: list[tuple[str, Collected]] = []
        large: list[tuple[str, Collected]] = []
        for name, item in planned.items():
            (small if item.kind != "dump" and item.size <= SMALL else large).append((name, item))
        if small:  # side by side: each is a few requests, mostly waiting
            pool = ThreadPoolExecutor(max_workers=SMALL_WORKERS, thread_name_prefix="nodekit-keep")
            try:
                for future in [pool.submit(self.keep, n, c) for n, c in small]:
                    future.result()  # the first storage failure ends the run: the others not started are dropped
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        for name, item in sorted(large, key=lambda p: p[1].size):  # smallest first, while the deadline allows
            self.keep(name, item)

    def keep(self, name: str, item: Collected) -> None:
        """Keep one file under `name`, unless the manifest and storage say it is kept already."""
        source = {"path": item.name, "size": item.size, "mtime_ns": item.mtime_ns}
        if self.up.already_there(name, lambda s: s == source):
            return
        target = self.up.free_name(name)
        if item.kind == "job-output" and self._same_as_stored(target, item, source):
            return
        left = self.stop_at - time.monotonic()
        if left <= 0 or (item.size > SMALL and item.size / self.rate[0] > left):
            self.result.skip(target, item.path, f"would take about {item.size / self.rate[0]:.0f} s at "
                                                f"{human_bytes(self.rate[0])}/s; {max(left, 0):.0f} s were left "
                                                "before the wipe's reserve")
            return
        try:
            self._upload(target, item, source)
        except ObjectExists as exists:
            log.info("%s was created meanwhile by another writer: comparing", target)
            self._settle(target, item, source, exists.written)

    def _chunks(self, item: Collected) -> tuple[Iterator[bytes] | None, str]:
        fh, _st, why = open_regular(item.path)
        if fh is None:
            return None, why
        if item.kind == "dump":
            return _gzip_blocks(fh, item, self.stop_at, self.rate), ""
        return _file_blocks(fh, item, self.stop_at, self.rate), ""

    def _upload(self, target: str, item: Collected, source: dict[str, Any]) -> None:
        chunks, why = self._chunks(item)
        if chunks is None:
            self.result.skip(target, item.path, why)
            return
        try:
            self.up.put(target, chunks, source, item.kind, content_type=_content_type(item, target), create_only=True)
        except _Deadline:
            self.result.skip(target, item.path, "the deadline came during its upload (the partial upload is not "
                                                "visible)")
        except _Unreadable as err:
            self.result.skip(target, item.path, f"{err.why} (the partial upload is not visible)")

    def _same_as_stored(self, target: str, item: Collected, source: dict[str, Any]) -> bool:
        """A job output that storage holds already: True if it is kept (the same bytes, or a conflict
        settled); False if storage has nothing under that name yet."""
        remote = self.up.store.head(self.up.full(target))
        if remote is None:
            return False
        local = _local_md5(item)
        if local is None:
            self.result.skip(target, item.path, "it could not be read to compare it with the copy in storage")
            return True
        self._settle(target, item, source, RemoteFile(target, local[0], "", "", local[1]), remote)
        return True

    def _settle(self, target: str, item: Collected, source: dict[str, Any], ours: RemoteFile,
                remote: RemoteFile | None = None) -> None:
        """Storage holds `target` already: the same bytes as `ours` count as kept; other bytes are a conflict."""
        remote = remote or self.up.store.head(self.up.full(target))
        if remote is None:  # gone again meanwhile: try once more
            try:
                self._upload(target, item, source)
                return
            except ObjectExists as exists:
                ours = exists.written
                remote = self.up.store.head(self.up.full(target))
        if remote is not None and remote.size == ours.size and remote.content_md5 and \
                remote.content_md5 == ours.content_md5:
            log.info("already in storage with the same content: %s", target)
            self.up.record(target, {"size": ours.size, "md5": ours.content_md5, "kind": item.kind,
                                    "source": source}, uploaded=False)
            return
        theirs = remote.content_md5 if remote is not None else None
        beside = conflict_name(target, self.node_id)
        why = (f"storage holds other content under {target} (MD5 {theirs or 'not recorded'}, "
               f"{remote.size if remote else '?'} bytes; this node's: MD5 {ours.content_md5}, {ours.size} bytes)")
        log.warning("conflict: %s: not overwritten; this node's copy is kept as %s", why, beside)
        with self.up.lock:
            self.result.conflicts.append({"name": target, "path": str(item.path), "kept_as": beside,
                                          "md5": ours.content_md5, "size": ours.size, "stored_md5": theirs,
                                          "stored_size": remote.size if remote is not None else None})
        if self.up.already_there(beside, lambda s: s == source):
            return
        try:
            self._upload(beside, item, source)
        except ObjectExists:
            self.result.skip(beside, item.path, f"{why}, and {beside} holds other content too")


def _upload_conventions(up: _Uploader, found: Collection, node_id: str, stop_at: float,
                        result: ReleaseResult) -> None:
    _Conventions(up, node_id, stop_at, result).run(found)


@dataclass(frozen=True)
class Where:
    """Where a run keeps things: the store to open, the prefix inside it, and what to show."""

    dest: SourceSpec  # what open_destination opens
    prefix: str  # every object's name starts with it ('' for none)
    display: str  # the container (or folder) and prefix, safe to print
    below: tuple[str, ...]  # a local destination: the folders below it that receive the objects
    container: str = ""  # the conventions layout: the job's container (or the one given)
    create: bool = False  # the container is the standard's: create it when missing


def _where(opts: ReleaseOptions, places: JobPlaces) -> Where:
    """Resolve --upload-to for the layout; UsageError for a destination the layout cannot use (pure).

    nodekit's layout: `<container or folder>/JOB_ID/NODE_ID/`. The conventions layout: a storage
    account's URL gets the standard's container for the job (created when missing); a container
    URL is used as given (its folder, if any, holds the layout); a local folder stands for an
    account, the container being a folder in it.
    """
    dest = opts.upload_to
    if opts.layout not in LAYOUTS:
        raise UsageError(f"--layout {opts.layout!r}: use nodekit or conventions.")
    if dest.kind is SourceKind.URL:
        raise UsageError(f"--upload-to {dest.display}: give a blob container URL, a storage account's URL "
                         "(--layout conventions) or a folder, not a file URL.")
    if opts.layout == "nodekit":
        if opts.outputs or opts.job_outputs:
            raise UsageError("--outputs and --job-outputs need --layout conventions: nodekit's own layout keeps "
                             "logs and dumps only.")
        if is_account(dest):
            raise UsageError(f"--upload-to {dest.display} names a storage account but no container: give "
                             ".../CONTAINER, or --layout conventions (which keeps the job's files in the "
                             "container the Batch File Conventions name after the job).")
        prefix = f"{places.job_id}/{places.node_id}"
        return Where(dest, prefix, f"{dest.display}/{prefix}", (places.job_id, places.node_id))
    name = conventions.container_name(places.job_id)
    if is_account(dest):
        resolved = parse_source(with_path(dest.raw, name), name="upload")
        return Where(resolved, "", resolved.display, (), name, create=True)
    if dest.kind is SourceKind.LOCAL:
        return Where(dest, name, f"{dest.display}/{name}", (name,), name)
    assert dest.blob is not None
    return Where(dest, "", dest.display, (), dest.blob.container)


def _create_container(store: WritableStore, display: str) -> None:
    """Create the standard's container when missing; a credential that may not create containers
    (but may write into an existing one) is told in the log, and the uploads say the rest."""
    create = getattr(store, "create_container", None)
    if create is None:
        return  # a folder: created with its first file
    try:
        create()
    except AccessDenied as err:
        log.warning("could not create the container %s (%s); uploading into it as it is", display, err)


def run_release(opts: ReleaseOptions, env: BatchEnv, creds: CredentialEnv,
                emit: Callable[[str], None] = print, net: NetConfig | None = None) -> ReleaseResult:
    """Keep the job's logs and dumps (and, in the conventions layout, outputs), then wipe its data.
    See the module docstring.

    `net` says how to reach storage (trust, timeouts; the CLI reads it from the environment)."""
    started = time.monotonic()
    check_globs(opts.logs, "--logs")
    check_globs(opts.dumps, "--dumps")
    check_globs(opts.outputs, "--outputs")
    check_globs(opts.job_outputs, "--job-outputs")
    places = job_places(env)
    where = _where(opts, places)
    check_destination(places, opts.upload_to, opts.wipe_task_dirs, opts.purge_cache, where.below)
    if opts.wipe_task_dirs:
        check_own_task(places, env)
    reserve = min(60.0, 0.2 * opts.deadline)  # time kept back for the wipe
    stop_at = started + opts.deadline - reserve
    ctx = RunContext(timeout=max(1.0, opts.deadline - reserve))
    prefix = where.prefix
    targets = wipe_targets(places, opts.wipe_task_dirs, opts.purge_cache)
    for t in targets:
        _guard(places, t)

    # 1. collect
    found = collect(places, opts.logs, opts.dumps, opts.outputs, opts.job_outputs)
    result = ReleaseResult(prefix=where.display, dry_run=opts.dry_run, logs=found.logs, dumps=found.dumps,
                           outputs=found.outputs, job_outputs=found.job_outputs, layout=opts.layout)
    if opts.dry_run:
        if opts.layout == "conventions":
            for c in found.logs + found.job_outputs + found.outputs + found.dumps:
                emit(f"[DRY RUN] upload   {where.display}/{conventions_name(c, places.node_id)} <- {c.path} "
                     f"({human_bytes(c.size)})")
        else:
            for c in found.logs:
                emit(f"[DRY RUN] upload   {prefix}/{LOGS_ARCHIVE} <- {c.path} ({human_bytes(c.size)})")
            for c in found.dumps:
                emit(f"[DRY RUN] upload   {prefix}/dumps/{c.name}.gz <- {c.path} ({human_bytes(c.size)})")
        for _name, path, why in found.skipped:
            emit(f"[DRY RUN] skip     {path} ({why})")
        for t in targets:
            if os.path.lexists(t):
                emit(f"[DRY RUN] delete   {t}")
        result.elapsed = time.monotonic() - started
        return result
    for name, path, why in found.skipped:
        result.skip(name, path, why)

    # 2. upload, 3. the manifest
    failure: NodekitError | None = None
    try:
        store = open_destination(where.dest, creds, net or NetConfig(), ctx)
        if opts.layout == "conventions":
            if where.create:
                _create_container(store, where.display)
            manifest = f"{conventions.task_prefix('jobrelease', 'TaskLog', places.node_id)}/{CONVENTIONS_MANIFEST}"
            up = _Uploader(store, prefix, places, result, manifest=manifest, batched=True,
                           extra={"layout": "conventions", "container": where.container})
            _upload_conventions(up, found, places.node_id, stop_at, result)
        else:
            up = _Uploader(store, prefix, places, result)
            _upload_logs(up, found.logs, result)
            _upload_dumps(up, found.dumps, stop_at, result)
        up.write_manifest(complete=not result.skipped)
    except NodekitError as err:
        failure = err
        result.failed.append({"what": "upload", "error": str(err)})
        log.error("upload failed: %s", err)
    result.retries = ctx.retries

    # 4. the wipe
    incomplete = failure is not None or bool(result.skipped)
    if incomplete and not opts.wipe_on_upload_failure:
        why = ("the upload failed" if failure else f"{len(result.skipped)} file(s) could not be kept (see skipped)") + \
            ": nothing wiped, so nothing is lost (--wipe-on-upload-failure puts the retention policy first)"
        for t in targets:
            if os.path.lexists(t):
                result.kept.append({"path": str(t), "why": why})
        log.warning("kept the job's data: %s", why)
    else:
        if incomplete:
            log.warning("wiping although %s (--wipe-on-upload-failure)",
                        "the upload failed" if failure else "not everything could be kept")
        for t in targets:
            try:
                if wipe(places, t):
                    result.wiped.append(str(t))
                    log.info("wiped %s", t)
            except LocalIOError as err:
                result.failed.append({"what": "wipe", "path": str(t), "error": str(err)})
                log.error("%s", err)
    result.elapsed = time.monotonic() - started
    _write_report(result, opts, env)
    if failure is not None and result.exit_code is ExitCode.KEPT_ALL:
        raise _KeptAll(f"{failure} Nothing was wiped: the job's data is still on the node.")
    wipe_failures = [f["error"] for f in result.failed if f["what"] == "wipe"]
    if wipe_failures:
        raise LocalIOError(f"{wipe_failures[0]} (the logs and dumps were kept; the report says what was wiped).")
    return result


class _KeptAll(NodekitError):
    exit_code = ExitCode.KEPT_ALL


def _write_report(result: ReleaseResult, opts: ReleaseOptions, env: BatchEnv) -> None:
    write_report(result.report(), report_path(opts.report_path, env, "nodekit-release.json"))
