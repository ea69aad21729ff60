"""The Batch environment, read once, and the job's folders with their path guard.

`BatchEnv.from_environ(mapping)` is the only reader of `AZ_BATCH_*`; nothing below the CLI
reads `os.environ`. `job_folder` and `ensure_inside` are the guard that every write and
delete goes through: they resolve paths and refuse anything outside the job's folders.

The shared directory's layout, as nodekit uses it: `SHARED/<job id>` is that job's folder (prep
fills it, the job's release wipes it); folders whose name starts with `.nodekit` are nodekit's
own (`.nodekit/venv` where the start task installs it, `.nodekit-cache` the node's cache) and
belong to no job: a dot cannot occur in a Batch id. `check_dest` and `check_local_source` keep
prep's writes and reads apart from the folders of other jobs and from nodekit's own.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from nodekit.errors import BatchEnvError, NotFound, SourceError, UnsafeInput

# Batch ids: letters, digits, hyphens and underscores, at most 64 characters.
_BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_PREFIX = ".nodekit"  # SHARED/.nodekit (the venv), SHARED/.nodekit-cache: nodekit's own folders

_VARS = {
    "root_dir": "AZ_BATCH_NODE_ROOT_DIR",
    "shared_dir": "AZ_BATCH_NODE_SHARED_DIR",
    "startup_dir": "AZ_BATCH_NODE_STARTUP_DIR",
    "task_dir": "AZ_BATCH_TASK_DIR",
    "task_working_dir": "AZ_BATCH_TASK_WORKING_DIR",
    "job_prep_dir": "AZ_BATCH_JOB_PREP_DIR",
    "job_prep_working_dir": "AZ_BATCH_JOB_PREP_WORKING_DIR",
    "job_id": "AZ_BATCH_JOB_ID",
    "task_id": "AZ_BATCH_TASK_ID",
    "node_id": "AZ_BATCH_NODE_ID",
    "pool_id": "AZ_BATCH_POOL_ID",
    "account_name": "AZ_BATCH_ACCOUNT_NAME",
    "account_url": "AZ_BATCH_ACCOUNT_URL",
}

# Which command-line option stands in for a variable on a local run.
_OPTION_FOR = {"shared_dir": "--shared-dir", "job_id": "--job-id", "node_id": "--node-id", "root_dir": "--root-dir"}


@dataclass(frozen=True)
class BatchEnv:
    """The `AZ_BATCH_*` variables nodekit uses; a field is None when its variable is unset or empty."""

    root_dir: str | None = None
    shared_dir: str | None = None
    startup_dir: str | None = None
    task_dir: str | None = None
    task_working_dir: str | None = None
    job_prep_dir: str | None = None
    job_prep_working_dir: str | None = None
    job_id: str | None = None
    task_id: str | None = None
    node_id: str | None = None
    pool_id: str | None = None
    account_name: str | None = None
    account_url: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> BatchEnv:
        """Read the variables from `environ`; an empty value counts as unset."""
        return cls(**{field: (environ.get(var) or None) for field, var in _VARS.items()})

    def with_overrides(self, **values: str | None) -> BatchEnv:
        """A copy with the given fields replaced where the value is not None (command-line options)."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def with_job_id(self, option: str | None, described: str | None) -> BatchEnv:
        """A copy whose job id is `option` (--job-id), else AZ_BATCH_JOB_ID, else `described` (the
        description file's job_id). A description naming another job than the one this runs for is
        refused (UnsafeInput): a job.json reused for the next job must not make release wipe the last one's folder.
        """
        current = option or self.job_id
        if described and current and current.strip() != described.strip():
            given = "--job-id" if option else "AZ_BATCH_JOB_ID"
            raise UnsafeInput(f"the description file names job {described!r}, but this is job {current!r} ({given}): "
                              "refusing to act on another job's folder; correct job_id in the description file "
                              "or leave it out.")
        return replace(self, job_id=current or described)

    def require(self, field: str) -> str:
        """The value of `field`, or BatchEnvError naming the variable and the option to use."""
        value = getattr(self, field)
        if value is None or not str(value).strip():
            var = _VARS[field]
            option = _OPTION_FOR.get(field)
            hint = f"run this on a Batch node, or pass {option} for a local run" if option else (
                "run this on a Batch node"
            )
            raise BatchEnvError(f"{var} is not set: {hint}.")
        return str(value)


def is_batch_id(text: str) -> bool:
    """True if `text` could be a Batch job id (so `SHARED/text` may be a job's folder)."""
    return _BATCH_ID.match(text) is not None


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it follows Batch's rules for ids, else raise UnsafeInput."""
    if not _BATCH_ID.match(job_id):
        raise UnsafeInput(
            f"job id {job_id!r} is not a valid Batch id (letters, digits, '-' and '_', "
            "at most 64 characters): refusing to use it as a folder name."
        )
    return job_id


def shared_root(env: BatchEnv) -> Path:
    """The node's shared directory, resolved; refuses a missing, relative-to-nothing or root folder."""
    raw = env.require("shared_dir")
    path = Path(raw).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise BatchEnvError(
            f"the shared directory {raw} does not exist: check AZ_BATCH_NODE_SHARED_DIR or --shared-dir."
        ) from None
    except OSError as err:
        raise BatchEnvError(f"the shared directory {raw} cannot be used: {err.strerror}.") from err
    except RuntimeError as err:  # a loop of symbolic links, before Python 3.13 (an OSError since)
        raise BatchEnvError(f"the shared directory {raw} cannot be used: {err}.") from err
    if not resolved.is_dir():
        raise BatchEnvError(f"the shared directory {raw} is not a folder.")
    if resolved == Path(resolved.anchor):
        raise UnsafeInput(
            f"the shared directory resolves to {resolved}, the root of a file system: refusing to use it."
        )
    return resolved


def job_folder(env: BatchEnv, dest: str | None = None) -> tuple[Path, Path]:
    """(shared directory, the job's folder in it), both resolved.

    The job folder is `<shared>/<job id>` unless `dest` names another folder, which must lie
    strictly inside the shared directory. Raises BatchEnvError or UnsafeInput; touches nothing.
    """
    shared = shared_root(env)
    if dest is None:
        job_id = check_job_id(env.require("job_id"))
        return shared, shared / job_id
    candidate = Path(dest).expanduser()
    if not candidate.is_absolute():
        candidate = shared / candidate
    resolved = ensure_inside(shared, candidate, what="the destination", strict_child=True)
    check_dest(shared, resolved, env.job_id)
    return shared, resolved


def _top(shared: Path, path: Path) -> str:
    """The first folder of `path` below `shared` (both resolved, `path` strictly inside)."""
    return path.relative_to(shared).parts[0]


def check_dest(shared: Path, dest: Path, job_id: str | None) -> None:
    """UnsafeInput unless `dest` (resolved, strictly inside `shared`) is this job's folder, a folder in
    it, or a folder that no job owns (its name not a Batch id, e.g. `refdata.v2`; never wiped by a release).

    Refused: nodekit's own folders (the cache, `.nodekit`) and another job's folder — any folder named
    like a Batch id other than this job's. Touches nothing.
    """
    top = _top(shared, dest)
    if top.startswith(RESERVED_PREFIX):
        raise UnsafeInput(f"the destination {dest} lies in {shared / top}, nodekit's own folder (its venv or the "
                          "node's cache): refusing to fill it.")
    own = next((part for part in dest.relative_to(shared).parts[1:] if part.startswith(RESERVED_PREFIX)), None)
    if own is not None:
        raise UnsafeInput(f"the destination {dest} lies in a folder named {own}, which nodekit keeps for its own "
                          "records (names starting with .nodekit are reserved): choose another folder.")
    if _BATCH_ID.match(top) and top != job_id:
        if job_id is None:
            raise UnsafeInput(f"the destination {dest} lies in {shared / top}, which may be a job's folder: give "
                              "--job-id (or AZ_BATCH_JOB_ID) to say whose it is.")
        raise UnsafeInput(f"the destination {dest} lies in {shared / top}, another job's folder (this job is "
                          f"{job_id}): refusing to fill it; that job's release would wipe it.")


def check_local_source(shared: Path, job_dir: Path, path: str) -> None:
    """Refuse a local source that would copy prep's output into itself or read what it does not own.

    UnsafeInput when the source (links resolved) is, contains or lies inside the job folder, lies in
    nodekit's own folders (`.nodekit`, the cache) or in another job's folder; NotFound when it is a
    link loop; SourceError when it is neither a folder nor a regular file. `shared` and `job_dir`
    must be resolved. Touches nothing.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NotFound(f"source {path} cannot be read: it is a loop of symbolic links.") from None
        return  # missing or unreadable: the store says so when it lists
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise SourceError(f"source {path} is neither a folder nor a regular file (a device, a pipe or a socket): "
                          "give a folder or a file.")
    real = Path(os.path.realpath(path))
    if real == job_dir or job_dir in real.parents or real in job_dir.parents:
        raise UnsafeInput(f"source {path} resolves to {real}, which is, contains or lies inside the job folder "
                          f"{job_dir}: prep would copy its own output into itself. Refusing it.")
    if shared in real.parents:
        top = _top(shared, real)
        if top.startswith(RESERVED_PREFIX):
            raise UnsafeInput(f"source {path} resolves to {real}, inside {shared / top}, nodekit's own folder: "
                              "refusing it.")
        if _BATCH_ID.match(top) and (shared / top) != job_dir and shared / top not in job_dir.parents:
            raise UnsafeInput(f"source {path} resolves to {real}, inside {shared / top}, another job's folder "
                              "(its release may wipe it at any moment): refusing it.")


def ensure_inside(root: Path, path: Path, *, what: str, strict_child: bool = False) -> Path:
    """Resolve `path` (following links that exist) and return it if it lies inside `root`.

    `root` must already be resolved. With `strict_child`, `path` may not be `root` itself.
    Raises UnsafeInput naming `what` otherwise. Touches nothing on disk.
    """
    resolved = Path(os.path.realpath(path))
    inside = resolved == root or root in resolved.parents
    if not inside or (strict_child and resolved == root):
        raise UnsafeInput(
            f"{what} {path} resolves to {resolved}, which is not inside {root}: refusing to use it."
        )
    return resolved
