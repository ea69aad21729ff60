"""The plan of a prep run: for every path, download, skip, remove, keep or forget, and why.

`decide` is a pure function from (remote file, recorded state, local stat) to an Action and a
reason; `plan` applies it to every listed or recorded path. `remove_placed` and
`sweep_partials` carry out the removals. Nothing here downloads: a warm re-run, which only
decides, never imports the download machinery (transfer.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from nodekit.errors import LocalIOError, NodekitError
from nodekit.names import PARTIAL_SUFFIX, STATE_DIR
from nodekit.state import Record, StateStore
from nodekit.storage import RemoteFile

log = logging.getLogger(__name__)


class Action(str, Enum):
    DOWNLOAD = "download"
    SKIP = "skip"
    REMOVE = "remove"
    KEEP = "keep"  # gone from the source, but changed locally: left alone
    FORGET = "forget"  # gone from the source and from disk: only the record is dropped


@dataclass(frozen=True)
class LocalStat:
    """What is on disk at a path (lstat: a symbolic link is not a regular file)."""

    size: int
    mtime_ns: int
    regular: bool

    @classmethod
    def of(cls, path: str | Path) -> LocalStat | None:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            if err.errno == errno.ENAMETOOLONG:  # cannot exist here: downloading it says so (exit 8)
                return None
            raise
        return cls(st.st_size, st.st_mtime_ns, stat.S_ISREG(st.st_mode))


_IDENTITY_KEYS = ("etag", "size", "last_modified", "content_md5")


def decide(remote: RemoteFile | None, record: Record | None, local: LocalStat | None) -> tuple[Action, str]:
    """What to do with one path, and why. Pure: the same inputs always give the same answer."""
    if remote is None:
        if record is None:
            return Action.KEEP, "not placed by nodekit"
        if local is None:
            return Action.FORGET, "gone from the source and already gone locally"
        if local.regular and (local.size, local.mtime_ns) == (record.get("local_size"), record.get("local_mtime_ns")):
            return Action.REMOVE, "gone from the source"
        return Action.KEEP, "gone from the source, but changed locally since nodekit placed it: left alone"
    if local is None:
        return Action.DOWNLOAD, "missing locally"
    if record is None:
        return Action.DOWNLOAD, "present locally but not placed by nodekit (no record)"
    if (record.get("etag"), record.get("size"), record.get("last_modified"), record.get("content_md5")) != (
            remote.etag, remote.size, remote.last_modified, remote.content_md5):  # one comparison, then why
        for key in _IDENTITY_KEYS:
            if record.get(key) != remote.identity[key]:
                return Action.DOWNLOAD, (f"changed at the source ({key} {record.get(key)!r} -> "
                                         f"{remote.identity[key]!r})")
    if not local.regular:
        return Action.DOWNLOAD, "not a regular file locally"
    if local.size != record.get("local_size"):
        return Action.DOWNLOAD, f"modified locally (size {record.get('local_size')} -> {local.size})"
    if local.mtime_ns != record.get("local_mtime_ns"):
        return Action.DOWNLOAD, "modified locally (modification time changed)"
    return Action.SKIP, "unchanged"


@dataclass
class PlannedFile:
    """One line of the plan: a job-relative path, where it comes from, and the decision."""

    path: str
    action: Action
    reason: str
    source: int | None = None  # index into the run's sources
    remote: RemoteFile | None = None
    verified: bool | None = None
    md5: str | None = None
    error: str | None = None
    cached: bool = False  # placed from the node's cache instead of downloaded
    archived: bool = False  # skipped: archived at the source (--skip-archived)
    placed: bool = False  # in place and recorded by this run


def plan(
    listing: dict[str, tuple[int, RemoteFile]],
    records: dict[str, Record],
    stat: Callable[[str], LocalStat | None],
) -> list[PlannedFile]:
    """Decide every path that is in the listing or in the records (pure but for `stat`)."""
    out = []
    for path in sorted(set(listing) | set(records)):
        src, remote = listing.get(path, (None, None))
        record = records.get(path)
        action, reason = decide(remote, record, stat(path))
        if remote is not None and record is not None and action is Action.SKIP:
            out.append(PlannedFile(path, action, reason, src, remote, record.get("verified"), record.get("md5")))
        else:
            out.append(PlannedFile(path, action, reason, src, remote))
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover



def _unlink_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def disk_error(err: OSError, path: Path) -> NodekitError:
    """The LocalIOError (exit 8) for a disk that refused to write `path`: full, read-only, not permitted."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return LocalIOError(f"the disk is full while writing {path}: free space on the node and run again.")
    if err.errno == errno.EFBIG:
        return LocalIOError(f"the disk is full for this process while writing {path} (a file-size limit was "
                            "reached): raise the limit or free space, and run again.")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return LocalIOError(f"cannot write {path}: {err.strerror}; check the folder's permissions.")
    return LocalIOError(f"writing {path} failed: {err.strerror}.")


def sweep_partials(job_dir: Path) -> int:
    """Remove temporary files left by a killed run (never following links); return how many."""
    removed = 0
    for folder, dirs, files in os.walk(job_dir, followlinks=False):
        if folder == str(job_dir) and STATE_DIR in dirs:
            dirs.remove(STATE_DIR)
        for name in files:
            if name.endswith(PARTIAL_SUFFIX):
                _unlink_quietly(Path(folder) / name)
                removed += 1
    return removed


def remove_placed(job_dir: Path, items: Iterable[PlannedFile], state: StateStore) -> None:
    """Delete files prep placed that are gone from the source; drop records of files already gone.

    Only regular files inside `job_dir` are deleted, never through a symbolic link; emptied
    folders above them are removed up to `job_dir`.
    """
    for item in items:
        if item.action is Action.FORGET:
            state.append(item.path, None)
            continue
        target = job_dir.joinpath(*item.path.split("/"))
        parent = target.parent
        real_parent = Path(os.path.realpath(parent))
        if real_parent != parent and not (real_parent == job_dir or job_dir in real_parent.parents):
            item.action, item.reason = Action.KEEP, "its folder is a symbolic link out of the job folder: left alone"
            continue
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise disk_error(err, target) from err
        state.append(item.path, None)
        log.info("removed %s (%s)", item.path, item.reason)
        while parent != job_dir:
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = parent.parent


