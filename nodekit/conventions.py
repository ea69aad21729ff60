"""The Batch File Conventions standard: where a job's and its tasks' files live in blob storage.

Pure: names in, names out; nothing here touches storage or the disk.

The standard (Microsoft.Azure.Batch.Conventions.Files, whose layout Batch Explorer lists for a
task: `<taskId>/$TaskOutput` and `<taskId>/$TaskLog` of the job's container in the Batch account's
linked storage account) keeps every file of a job in **one container named after the
job** (`container_name`), task files under `<taskId>/$<Kind>/<path>` and job files under
`$<Kind>/<path>`. Read in the reference implementation, Azure/azure-sdk-for-net:

- `sdk/batch/Microsoft.Azure.Batch.Conventions.Files/src/Utilities/ContainerNameUtils.cs`
  (`GetSafeContainerName`, `TransformToContainerName`) and its unit tests
  `tests/UnitTests/Utilities/ContainerNameUtilsTests.cs`, whose examples `tests/test_conventions.py`
  repeats;
- the same folder's `README.md` ("Job Output Container Name", "Job Output Blob Path") and
  `src/StoragePath.cs` (`JobStoragePath`: `$<kind>/<path>`; `TaskStoragePath`: `<taskId>/$<kind>/<path>`;
  a path that starts with `../`, such as the task's `../stdout.txt`, is stored from below it);
- Batch Explorer's copy of the same algorithm, Azure/BatchExplorer `src/app/utils/storage-utils.ts`
  (`StorageUtils.getSafeContainerName`), tested with the same examples in `storage-utils.spec.ts`.

The job preparation and release tasks run under one task id on every node; the reference's older
README (`src/SDKs/Batch/Support/FileConventions/README.md`) keeps their files per node, as
`jobpreparation/<nodeId>/$TaskLog/install.log` in its example, which `task_prefix` follows.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from nodekit.batchenv import is_batch_id
from nodekit.errors import UsageError

CONTAINER_PREFIX = "job-"
MAX_CONTAINER = 63
MAX_USABLE_ID = MAX_CONTAINER - len(CONTAINER_PREFIX)  # 59: longer ids are hashed
MAX_ID_IN_HASHED = 15  # 63 - len("job-") - 1 (the hyphen before the hash) - 40 (SHA-1 in hex) = 18, kept at 15
_PERMITTED = re.compile(r"^[a-z0-9][-a-z0-9]*$")
_RUNS = re.compile(r"[:_-]+")

JOB_KINDS = ("JobOutput", "JobPreview")
TASK_KINDS = ("TaskOutput", "TaskLog", "TaskPreview", "TaskIntermediate")
# Tasks that run on every node under one id: their files are kept per node.
PER_NODE_TASKS = ("jobpreparation", "jobrelease")


def container_name(job_id: str) -> str:
    """The standard's container for `job_id`, computed as the reference implementation computes it.

    The id in lower case (Batch ids are case-insensitively unique, so this stays unique) with
    `job-` before it, when that is a valid container name: at most 59 characters, starting with a
    letter or digit, only letters, digits and single hyphens, not ending in a hyphen. Otherwise
    `job-` + a readable part + `-` + the SHA-1 (hex) of the lower-case id, where the readable part
    is the id with every run of `-`, `_` and `:` made one hyphen, hyphens trimmed from both ends,
    cut to 15 characters (and trimmed again), or `job` when nothing is left.
    """
    if not job_id:
        raise UsageError("a job id is needed for the Batch File Conventions container name.")
    lower = job_id.lower()  # ids are ASCII letters, digits, '-' and '_': no locale issue
    if len(lower) <= MAX_USABLE_ID and _PERMITTED.match(lower) and not lower.endswith("-") and "--" not in lower:
        return CONTAINER_PREFIX + lower
    digest = hashlib.sha1(lower.encode("utf-8")).hexdigest()
    readable = _RUNS.sub("-", lower).strip("-")
    if len(readable) > MAX_ID_IN_HASHED:
        readable = readable[:MAX_ID_IN_HASHED].strip("-")
    elif not readable:
        readable = "job"
    return f"{CONTAINER_PREFIX}{readable}-{digest}"


def job_prefix(kind: str) -> str:
    """`$<kind>`: where the job's own files of that kind live in its container."""
    return f"${kind}"


def task_prefix(task_id: str, kind: str, node_id: str | None = None) -> str:
    """`<taskId>/$<kind>`, or `<taskId>/<nodeId>/$<kind>` for the per-node tasks (job preparation, release)."""
    if task_id in PER_NODE_TASKS and node_id:
        return f"{task_id}/{node_id}/${kind}"
    return f"{task_id}/${kind}"


@dataclass(frozen=True)
class JobRef:
    """A `job:` source: the files of an earlier job kept in the standard's layout."""

    job_id: str
    task_id: str | None
    kind: str
    where: str  # the account: a blob service URL, or a local folder that stands for one

    @property
    def container(self) -> str:
        return container_name(self.job_id)

    @property
    def prefix(self) -> str:
        return task_prefix(self.task_id, self.kind) if self.task_id else job_prefix(self.kind)

    @property
    def default_name(self) -> str:
        return self.task_id or self.job_id


JOB_SCHEME = "job:"


def is_job_ref(text: str) -> bool:
    return text[: len(JOB_SCHEME)].lower() == JOB_SCHEME


def parse_job_ref(text: str) -> JobRef:
    """`job:JOB[/TASK][/$KIND]@WHERE` -> JobRef; UsageError naming what is wrong.

    Without a kind: `$JobOutput` for a job, `$TaskOutput` for a task. WHERE is the storage
    account's blob URL (`https://ACCOUNT.blob.core.windows.net`, an emulator's
    `http://127.0.0.1:10000/devstoreaccount1`) or a local folder that holds job containers.
    """
    body = text[len(JOB_SCHEME):]
    ref, at, where = body.partition("@")
    usage = "job:JOB_ID[/TASK_ID][/$KIND]@ACCOUNT_URL"
    if not at or not where.strip():
        raise UsageError(f"{'job:' + ref!r}: say where the job's files are kept: {usage} "
                         "(the account's blob URL, or a local folder).")
    parts = ref.split("/")
    kind = None
    if len(parts) > 1 and parts[-1].startswith("$"):
        kind = parts.pop()[1:]
    if not 1 <= len(parts) <= 2 or not all(is_batch_id(p) for p in parts):
        raise UsageError(f"'job:{ref}' is not {usage}: job and task ids are letters, digits, '-' and '_' "
                         "(at most 64), and a kind starts with '$'.")
    job_id = parts[0]
    task_id = parts[1] if len(parts) == 2 else None
    allowed = TASK_KINDS if task_id else JOB_KINDS
    if kind is None:
        kind = allowed[0]
    if kind not in allowed:
        level = "a task's" if task_id else "a job's"
        raise UsageError(f"'job:{ref}': ${kind} is not one of {level} kinds "
                         f"({', '.join('$' + k for k in allowed)}).")
    if task_id in PER_NODE_TASKS:
        raise UsageError(f"'job:{ref}': the files of {task_id} are kept per node "
                         f"({task_id}/NODE_ID/${kind}); give that folder's URL instead.")
    return JobRef(job_id, task_id, kind, where.strip())


def tree(root: str, names: list[str]) -> list[str]:
    """`names` ('/'-paths) drawn as a tree below `root`, folders first, for people to read."""
    nested: dict[str, dict] = {}  # type: ignore[type-arg]
    for name in names:
        node = nested
        for part in name.split("/"):
            node = node.setdefault(part, {})
    lines = [root.rstrip("/") + "/"]

    def draw(node: dict, indent: str) -> None:  # type: ignore[type-arg]
        items = sorted(node.items(), key=lambda kv: (not kv[1], kv[0]))
        for i, (part, child) in enumerate(items):
            last = i == len(items) - 1
            lines.append(f"{indent}{'└── ' if last else '├── '}{part}{'/' if child else ''}")
            draw(child, indent + ("    " if last else "│   "))

    draw(nested, "")
    return lines
