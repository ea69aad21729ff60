"""Issue 16: hostile input and misconfiguration, as a new user and a hostile tester would try them.

Each case gives its documented exit code, one `Error:` line naming what is wrong, and changes no file
outside the folders it may change (here: none). Disk errors (a read-only job folder, a disk filling
mid-run) are exit 8 with the path, and the report is written. Cases that need the kernel to refuse
what root may do run nodekit without root's file-permission override (setpriv), or on a small tmpfs
in a mount namespace of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, BatchNode, remote_env
from helpers import report, run

from nodekit.errors import ExitCode


def snapshot(root: Path, *, allow: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file, folder and link under `root` (but `allow`ed folders) with what it holds."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if any(path == a or a in path.parents for a in allow):
                continue
            st = os.lstat(path)
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[str(path)] = f"dir:{st.st_mode:o}"
            elif not path.is_file():  # a FIFO or a device: never read
                out[str(path)] = f"special:{st.st_mode:o}"
            else:
                try:
                    digest = hashlib.md5(path.read_bytes()).hexdigest()
                except OSError:
                    digest = "unreadable"
                out[str(path)] = f"file:{st.st_mode:o}:{st.st_size}:{st.st_mtime_ns}:{digest}"
    return out


@dataclass
class Case:
    id: str
    setup: Callable[[BatchNode, Path], tuple[list[str], dict[str, str]]]
    code: ExitCode
    message: str


def _sample(node: BatchNode, tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    (src / "a.txt").write_text("a")
    return src


def _other_job(node: BatchNode) -> Path:
    other = node.shared / "other-job"
    (other / ".nodekit").mkdir(parents=True, exist_ok=True)
    (other / "input.txt").write_text("another job's input")
    return other


def _loop(tmp: Path) -> Path:
    (tmp / "loop-a").symlink_to(tmp / "loop-b")
    (tmp / "loop-b").symlink_to(tmp / "loop-a")
    return tmp / "loop-a"


def _spec(tmp: Path, text: str | bytes) -> str:
    path = tmp / "spec.json"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)  # type: ignore[operator]
    return str(path)


PREP_CASES = [
    Case("glob-empty-class", lambda n, t: (["prep", str(_sample(n, t)), "--include", "[]"], n.env()),
         ExitCode.USAGE, "--include '[]' is not a valid pattern"),
    Case("glob-reversed-range", lambda n, t: (["prep", str(_sample(n, t)), "--exclude", "[z-a]"], n.env()),
         ExitCode.USAGE, "--exclude '[z-a]' is not a valid pattern"),
    Case("glob-in-spec", lambda n, t: (
        ["prep", "--spec", _spec(t, json.dumps({"prep": {"sources": [str(_sample(n, t))], "include": ["[z-a]"]}}))],
        n.env()), ExitCode.USAGE, "prep.include '[z-a]' is not a valid pattern"),
    Case("port-above-65535", lambda n, t: (["prep", "http://127.0.0.1:70000/devstoreaccount1/data"], n.env()),
         ExitCode.USAGE, "Port out of range 0-65535"),
    Case("name-empty", lambda n, t: (["prep", "=https://acct1.blob.core.windows.net/data"], n.env()),
         ExitCode.USAGE, "NAME=SOURCE has no NAME before '='"),
    Case("name-with-slash", lambda n, t: (["prep", "a/b=https://acct1.blob.core.windows.net/data"], n.env()),
         ExitCode.USAGE, "NAME 'a/b' must be one folder name"),
    Case("file-url-without-path", lambda n, t: (["prep", "file://"], n.env()),
         ExitCode.USAGE, "file URL 'file://' has no absolute path"),
    Case("spec-nested-100000-deep", lambda n, t: (["prep", "--spec", _spec(t, "[" * 100_000 + "]" * 100_000)],
                                                  n.env()),
         ExitCode.USAGE, "is nested too deeply to be read"),
    Case("spec-not-text", lambda n, t: (["prep", "--spec", _spec(t, b'{"prep": "\xff\xfe\xfd"}')], n.env()),
         ExitCode.USAGE, "is not text in UTF-8, UTF-16 or UTF-32"),
    Case("env-concurrency", lambda n, t: (["prep", "builtin:sample"], n.env(NODEKIT_CONCURRENCY="0")),
         ExitCode.USAGE, "Invalid value for 'NODEKIT_CONCURRENCY'"),
    Case("env-timeout", lambda n, t: (["prep", "builtin:sample"], n.env(NODEKIT_TIMEOUT="soon")),
         ExitCode.USAGE, "NODEKIT_TIMEOUT 'soon' is not a duration"),
    Case("env-cache-size", lambda n, t: (["prep", "builtin:sample"], n.env(NODEKIT_CACHE_MAX_SIZE="lots")),
         ExitCode.USAGE, "NODEKIT_CACHE_MAX_SIZE 'lots'"),
    Case("env-md5", lambda n, t: (["prep", "builtin:sample"], n.env(NODEKIT_MD5="some")),
         ExitCode.USAGE, "Invalid value for 'NODEKIT_MD5'"),
    Case("env-verbose", lambda n, t: (["prep", "builtin:sample"], n.env(NODEKIT_VERBOSE="maybe")),
         ExitCode.USAGE, "Invalid value for 'NODEKIT_VERBOSE'"),
    Case("source-symlink-loop", lambda n, t: (["prep", f"in={_loop(t)}"], n.env()),
         ExitCode.SOURCE, "is a loop of symbolic links"),
    Case("source-is-shared-dir", lambda n, t: (["prep", f"in={n.shared}"], n.env()),
         ExitCode.UNSAFE, "is, contains or lies inside the job folder"),
    Case("source-contains-job-folder", lambda n, t: (["prep", f"in={n.root}"], n.env()),
         ExitCode.UNSAFE, "is, contains or lies inside the job folder"),
    Case("source-inside-job-folder", lambda n, t: (
        ["prep", f"in={(n.job_dir / 'in').mkdir(parents=True) or n.job_dir / 'in'}"], n.env()),
         ExitCode.UNSAFE, "is, contains or lies inside the job folder"),
    Case("source-in-cache", lambda n, t: (
        ["prep", f"in={(n.shared / '.nodekit-cache').mkdir() or n.shared / '.nodekit-cache'}"], n.env()),
         ExitCode.UNSAFE, "nodekit's own folder"),
    Case("source-in-nodekit-venv", lambda n, t: (
        ["prep", f"in={(n.shared / '.nodekit' / 'venv').mkdir(parents=True) or n.shared / '.nodekit' / 'venv'}"],
        n.env()), ExitCode.UNSAFE, "nodekit's own folder"),
    Case("source-in-another-job", lambda n, t: (["prep", f"in={_other_job(n)}"], n.env()),
         ExitCode.UNSAFE, "another job's folder"),
    Case("source-link-to-job-folder", lambda n, t: (
        ["prep", f"in={(t / 'innocent').symlink_to(n.shared) or t / 'innocent'}"], n.env()),
         ExitCode.UNSAFE, "is, contains or lies inside the job folder"),
    Case("dest-cache", lambda n, t: (["prep", "builtin:sample", "--dest", ".nodekit-cache"], n.env()),
         ExitCode.UNSAFE, "nodekit's own folder"),
    Case("dest-venv", lambda n, t: (["prep", "builtin:sample", "--dest", ".nodekit/venv"], n.env()),
         ExitCode.UNSAFE, "nodekit's own folder"),
    Case("dest-another-job", lambda n, t: (["prep", "builtin:sample", "--dest", str(_other_job(n))], n.env()),
         ExitCode.UNSAFE, "another job's folder (this job is job-1)"),
    # helper review, issue 16
    Case("source-is-a-device", lambda n, t: (["prep", "x=/dev/null"], n.env()),
         ExitCode.SOURCE, "source /dev/null is neither a folder nor a regular file"),
    Case("dest-in-the-job-records", lambda n, t: (["prep", "builtin:sample", "--dest", "job-1/.nodekit"], n.env()),
         ExitCode.UNSAFE, "names starting with .nodekit are reserved"),
    Case("spec-names-another-job", lambda n, t: (["prep", "--spec", _spec(t, json.dumps(
        {"nodekit": 1, "job_id": _other_job(n).name, "prep": {"sources": ["builtin:sample"]}}))], n.env()),
         ExitCode.UNSAFE, "the description file names job 'other-job', but this is job 'job-1' (AZ_BATCH_JOB_ID)"),
    Case("spec-key-twice", lambda n, t: (["prep", "--spec", _spec(
        t, '{"nodekit": 1, "prep": {"sources": ["builtin:sample"]}, "prep": {"sources": []}}')], n.env()),
         ExitCode.USAGE, "gives 'prep' twice in one object"),
    Case("spec-concurrency-true", lambda n, t: (["prep", "--spec", _spec(
        t, '{"nodekit": 1, "prep": {"sources": ["builtin:sample"], "concurrency": true}}')], n.env()),
         ExitCode.USAGE, "prep.concurrency must be a whole number"),
    Case("builtin-unknown", lambda n, t: (["prep", "builtin:nonexistent"], n.env()),
         ExitCode.USAGE, "no embedded data named 'builtin:nonexistent': the only one is builtin:sample"),
    Case("two-sources-one-name", lambda n, t: (["prep", f"in={_sample(n, t)}", "in=builtin:sample"], n.env()),
         ExitCode.USAGE, "two sources are both named 'in'"),
    Case("control-characters", lambda n, t: (["prep", f"in={t}/no\nsuch\x1b[31mfolder"], n.env()),
         ExitCode.SOURCE, "no\\nsuch\\x1b[31mfolder does not exist"),
]


@pytest.mark.parametrize("case", PREP_CASES, ids=[c.id for c in PREP_CASES])
def test_prep_refuses_hostile_input_cleanly(case: Case, batch_node: BatchNode, tmp_path: Path) -> None:
    args, env = case.setup(batch_node, tmp_path)
    before = snapshot(tmp_path)
    result = run(args, env, ok=False)
    assert result.exit_code == case.code, (result.exit_code, result.stderr)
    assert case.message in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "\x1b" not in result.stderr + result.stdout and "nodekit bug" not in result.stderr
    assert snapshot(tmp_path) == before


def _release_node(node: BatchNode) -> Path:
    """A job with two tasks' logs and a dump, the release task's own folder; returns its folder."""
    work = node.root / "workitems" / node.job_id / "job-1"
    for task in ("task001", "task002"):
        (work / task / "wd").mkdir(parents=True)
        (work / task / "stdout.txt").write_text(f"{task} out\n")
        (work / task / "stderr.txt").write_text(f"{task} err\n")
        (work / task / "wd" / "run.log").write_text(f"log of {task}\n")
    (work / "task002" / "wd" / "core").write_bytes(b"\0dump" * 1000)
    own = work / "jobrelease"
    (own / "wd").mkdir(parents=True)
    (node.job_dir / "in").mkdir(parents=True)
    (node.job_dir / "in" / "data.bin").write_bytes(b"input")
    return own


def _release_env(node: BatchNode, own: Path, **extra: str) -> dict[str, str]:
    return node.env(**{"AZ_BATCH_TASK_ID": "jobrelease", "AZ_BATCH_TASK_DIR": str(own),
                       "AZ_BATCH_TASK_WORKING_DIR": str(own / "wd"), **extra})


RELEASE_CASES = [
    Case("logs-glob", lambda n, t: (["release", "--upload-to", str(t / "kept"), "--logs", "[]"], {}),
         ExitCode.USAGE, "--logs '[]' is not a valid pattern"),
    Case("dumps-glob", lambda n, t: (["release", "--upload-to", str(t / "kept"), "--dumps", "[z-a]"], {}),
         ExitCode.USAGE, "--dumps '[z-a]' is not a valid pattern"),
    Case("env-upload-to", lambda n, t: (["release"], {"NODEKIT_UPLOAD_TO": "ftp://example.com/logs"}),
         ExitCode.USAGE, "Invalid value for 'NODEKIT_UPLOAD_TO': unknown scheme 'ftp:'"),
    Case("env-deadline", lambda n, t: (["release", "--upload-to", str(t / "kept")], {"NODEKIT_DEADLINE": "20m"}),
         ExitCode.USAGE, "NODEKIT_DEADLINE 20m is too long"),
    Case("upload-to-relative", lambda n, t: (["release", "--upload-to", "kept"], {}),
         ExitCode.USAGE, "a local destination must be an absolute path"),
    Case("upload-to-job-folder", lambda n, t: (["release", "--upload-to", str(n.job_dir / "kept")], {}),
         ExitCode.UNSAFE, "inside the job folder"),
    Case("upload-to-shared-dir", lambda n, t: (["release", "--upload-to", str(n.shared)], {}),
         ExitCode.UNSAFE, "inside the job folder"),
    Case("upload-to-link-into-job-folder", lambda n, t: (
        ["release", "--upload-to", str((t / "logs-link").symlink_to(n.job_dir) or t / "logs-link")], {}),
         ExitCode.UNSAFE, "inside the job folder"),
    Case("upload-to-task-wd", lambda n, t: (
        ["release", "--upload-to", str(n.root / "workitems" / n.job_id / "job-1" / "task001" / "wd" / "kept"),
         "--wipe-task-dirs"], {}), ExitCode.UNSAFE, "the working folder of task task001 (--wipe-task-dirs)"),
    Case("upload-to-cache", lambda n, t: (
        ["release", "--upload-to", str(n.shared / ".nodekit-cache" / "logs"), "--purge-cache"], {}),
         ExitCode.UNSAFE, "the node's cache, purged by --purge-cache"),
    Case("upload-to-another-job", lambda n, t: (["release", "--upload-to", str(_other_job(n) / "logs")], {}),
         ExitCode.UNSAFE, "another job's folder"),
    # helper review, issue 16
    Case("upload-to-a-file", lambda n, t: (
        ["release", "--upload-to", str((t / "a-file").write_text("x") and t / "a-file" / "logs")], {}),
         ExitCode.USAGE, "a-file is not a folder: give a folder"),
    Case("upload-to-dev-null", lambda n, t: (["release", "--upload-to", "/dev/null"], {}),
         ExitCode.USAGE, "/dev/null is not a folder"),
    Case("root-dir-missing", lambda n, t: (["release", "--upload-to", str(t / "kept")],
                                           {"AZ_BATCH_NODE_ROOT_DIR": str(t / "no-such-root")}),
         ExitCode.BATCH_ENV, "AZ_BATCH_NODE_ROOT_DIR"),
    Case("wipe-task-dirs-without-own-folder", lambda n, t: (
        ["release", "--upload-to", str(t / "kept"), "--wipe-task-dirs"],
        {"AZ_BATCH_TASK_DIR": "", "AZ_BATCH_TASK_WORKING_DIR": ""}),
         ExitCode.BATCH_ENV, "AZ_BATCH_TASK_DIR is not set: --wipe-task-dirs must know the release task's own"),
    Case("wipe-task-dirs-own-folder-elsewhere", lambda n, t: (
        ["release", "--upload-to", str(t / "kept"), "--wipe-task-dirs"],
        {"AZ_BATCH_TASK_DIR": str(t), "AZ_BATCH_TASK_WORKING_DIR": ""}),
         ExitCode.BATCH_ENV, "which is not a task folder of job job-1"),
    Case("spec-names-another-job", lambda n, t: (["release", "--spec", _spec(t, json.dumps(
        {"nodekit": 1, "job_id": _other_job(n).name, "release": {"upload_to": str(t / "kept")}}))], {}),
         ExitCode.UNSAFE, "the description file names job 'other-job', but this is job 'job-1'"),
]


@pytest.mark.parametrize("case", RELEASE_CASES, ids=[c.id for c in RELEASE_CASES])
def test_release_refuses_what_would_destroy_what_it_keeps(case: Case, batch_node: BatchNode,
                                                          tmp_path: Path) -> None:
    own = _release_node(batch_node)
    args, extra = case.setup(batch_node, tmp_path)
    before = snapshot(tmp_path)
    result = run(args, _release_env(batch_node, own, **extra), ok=False)
    assert result.exit_code == case.code, (result.exit_code, result.stderr)
    assert case.message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
    assert snapshot(tmp_path) == before  # nothing uploaded, nothing wiped, no report


def test_release_knows_its_own_folder_from_its_working_folder_or_where_it_runs(batch_node: BatchNode,
                                                                               tmp_path: Path) -> None:
    """AZ_BATCH_TASK_DIR unset: the parent of AZ_BATCH_TASK_WORKING_DIR, or the task folder the process
    runs in, is the release task's own; --wipe-task-dirs leaves it and its logs alone."""
    own = _release_node(batch_node)
    (own / "stdout.txt").write_text("release's own output\n")
    for n, extra in enumerate(({"AZ_BATCH_TASK_DIR": ""},
                               {"AZ_BATCH_TASK_DIR": str(own), "AZ_BATCH_TASK_WORKING_DIR": ""})):
        (batch_node.job_dir / "in").mkdir(parents=True, exist_ok=True)
        work = batch_node.root / "workitems" / batch_node.job_id / "job-1"
        (work / "task001" / "wd").mkdir(exist_ok=True)
        cwd = os.getcwd()
        os.chdir(own / "wd")  # where Batch runs the release task
        try:
            result = run(["release", "--upload-to", str(tmp_path / f"kept{n}"), "--wipe-task-dirs"],
                         _release_env(batch_node, own, **extra))
        finally:
            os.chdir(cwd)
        assert (own / "wd").is_dir() and (own / "stdout.txt").exists(), result.stdout
        assert not (work / "task001" / "wd").exists() and not batch_node.job_dir.exists()
        manifest = json.loads((tmp_path / f"kept{n}" / batch_node.job_id / "tvm-1" / "manifest.json").read_text())
        assert "jobrelease" not in json.dumps(manifest), manifest
    # neither variable: only the folder it runs in says which task is its own (its logs are not collected)
    cwd = os.getcwd()
    os.chdir(own / "wd")
    try:
        run(["release", "--upload-to", str(tmp_path / "kept2")],
            _release_env(batch_node, own, AZ_BATCH_TASK_DIR="", AZ_BATCH_TASK_WORKING_DIR=""))
    finally:
        os.chdir(cwd)
    with tarfile.open(tmp_path / "kept2" / batch_node.job_id / "tvm-1" / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "job-1/task002/stdout.txt" in names and not [n for n in names if "jobrelease" in n], names


def test_a_local_source_copies_linked_files_and_names_each_entry_it_skips(batch_node: BatchNode,
                                                                         tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    (src / "real" / "f.txt").write_text("in a folder")
    (tmp_path / "store.bin").write_bytes(b"from the store")
    (src / "linked.bin").symlink_to(tmp_path / "store.bin")
    (src / "folder-link").symlink_to(src / "real")
    (src / "dangling").symlink_to(tmp_path / "nothing")
    os.mkfifo(src / "pipe")
    result = run(["prep", f"in={src}", "--progress-interval", "0"], batch_node.env())
    landed = batch_node.job_dir / "in"
    assert (landed / "linked.bin").read_bytes() == b"from the store" and not (landed / "linked.bin").is_symlink()
    assert (landed / "real" / "f.txt").read_text() == "in a folder"
    assert not any((landed / name).exists() for name in ("folder-link", "dangling", "pipe"))
    for name, why in (("folder-link", "a link to a folder"), ("dangling", "a link to nothing"),
                      ("pipe", "neither a file nor a folder")):
        assert f"skipped {src / name} in the source: {why}" in result.stderr, result.stderr


def test_a_task_working_folder_is_a_fine_destination_when_it_is_not_wiped(batch_node: BatchNode,
                                                                          tmp_path: Path) -> None:
    own = _release_node(batch_node)
    dest = batch_node.root / "workitems" / batch_node.job_id / "job-1" / "task001" / "wd" / "kept"
    run(["release", "--upload-to", str(dest)], _release_env(batch_node, own))
    assert (dest / batch_node.job_id / "tvm-1" / "logs.tar.gz").exists()


def test_description_files_in_utf16_or_with_a_bom_are_read(batch_node: BatchNode, tmp_path: Path) -> None:
    src = _sample(batch_node, tmp_path)
    text = json.dumps({"nodekit": 1, "prep": {"sources": [f"in={src}"], "exclude": ["*.tmp"]}})
    for encoding in ("utf-16", "utf-8-sig", "utf-16-be", "utf-32"):
        data = text.encode(encoding) if encoding != "utf-16-be" else b"\xfe\xff" + text.encode("utf-16-be")
        result = run(["prep", "--spec", _spec(tmp_path, data), "--dry-run"], batch_node.env())
        assert "[DRY RUN] download in/a.txt (missing locally)" in result.stdout, encoding


def test_control_characters_in_names_never_reach_the_terminal(batch_node: BatchNode, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "evil\nname").mkdir(parents=True)
    (src / "evil\nname" / "red\x1b[31m.txt").write_text("x")
    (src / "bidi\u202etxt.exe").write_text("y")
    for args in (["-v", "prep", f"in={src}", "--progress-interval", "0"], ["prep", f"in={src}", "--dry-run"]):
        result = run(args, batch_node.env())
        out = result.stdout + result.stderr
        assert "\x1b" not in out and "\u202e" not in out
        assert all("\n" not in line for line in out.splitlines())
        assert "in/evil\\nname/red\\x1b[31m.txt" in out and "bidi\\u202etxt.exe" in out
    assert (batch_node.job_dir / "in" / "evil\nname" / "red\x1b[31m.txt").read_text() == "x"  # names kept as they are


# -- the node's disk refuses --------------------------------------------------------------------------
def _as_unprivileged() -> list[str]:
    """A prefix that runs a command without root's override of file permissions (nothing if not root)."""
    if os.geteuid() != 0:
        return []
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test permissions as root"
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _nodekit(args: list[str], env: dict[str, str], prefix: list[str] = (), **kw: object) -> \
        subprocess.CompletedProcess[str]:  # type: ignore[assignment]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
    return subprocess.run([*prefix, sys.executable, "-m", "nodekit", *args], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


def _release_refused_by_the_disk(node: BatchNode, own: Path, dest: Path, read_only: Path) -> list[str]:
    """Run release as the pool's user with `read_only` made 0o555 meanwhile: asserts exit 8, returns its Error lines."""
    read_only.chmod(0o555)
    try:
        out = _nodekit(["release", "--upload-to", str(dest)], _release_env(node, own), _as_unprivileged())
    finally:
        read_only.chmod(0o755)
    assert out.returncode == 8, out.stderr
    return [line for line in out.stderr.splitlines() if line.startswith("Error:")]


def test_a_wipe_that_cannot_delete_everything_deletes_the_rest_after_keeping_the_logs_and_ends_with_8(
        batch_node: BatchNode, tmp_path: Path) -> None:
    own = _release_node(batch_node)
    locked = batch_node.job_dir / "locked"
    locked.mkdir()
    for name in ("a", "b"):
        (locked / name).write_text(name)
    (batch_node.job_dir / "free").mkdir()
    (batch_node.job_dir / "free" / "f.txt").write_text("free")
    first = next(os.scandir(locked)).name  # the order the wipe meets them in
    # locked's files cannot be unlinked without root's override
    error = _release_refused_by_the_disk(batch_node, own, tmp_path / "kept", locked)
    # a and b, then the two folders they keep from being removed: the first named, the other three counted
    assert len(error) == 1 and error[0].startswith(f"Error: cannot wipe {locked / first}: Permission denied "
                                                   "(and 3 more); check the folder's permissions."), error
    assert sorted(p.name for p in locked.iterdir()) == ["a", "b"]  # what could not go is still there, unchanged
    assert not (batch_node.job_dir / "free").exists() and not (batch_node.job_dir / "in").exists()  # the rest went
    kept = tmp_path / "kept" / batch_node.job_id / "tvm-1"
    assert json.loads((kept / "manifest.json").read_text())["complete"] is True and (kept / "logs.tar.gz").exists()


def test_one_file_the_wipe_cannot_delete_is_named_and_its_folder_counted(batch_node: BatchNode, tmp_path: Path) -> None:
    own = _release_node(batch_node)
    shutil.rmtree(batch_node.job_dir / "in")
    stuck = batch_node.job_dir / "top.bin"
    stuck.write_bytes(b"written by admin")
    error = _release_refused_by_the_disk(batch_node, own, tmp_path / "kept", batch_node.job_dir)
    # the file, then the job folder it keeps from being removed
    assert len(error) == 1 and error[0].startswith(f"Error: cannot wipe {stuck}: Permission denied (and 1 more); "), \
        error
    assert stuck.read_bytes() == b"written by admin"


def test_a_job_folder_that_is_a_link_the_wipe_cannot_remove_is_exit_8_and_its_target_is_untouched(
        batch_node: BatchNode, tmp_path: Path) -> None:
    own = _release_node(batch_node)
    target = tmp_path / "elsewhere"
    shutil.move(batch_node.job_dir, target)
    batch_node.job_dir.symlink_to(target)
    # the link cannot be removed by the pool's user
    error = _release_refused_by_the_disk(batch_node, own, tmp_path / "kept", batch_node.shared)
    assert error == [f"Error: cannot wipe {batch_node.job_dir}: Permission denied. (the logs and dumps were kept; "
                     "the report says what was wiped)."], error
    assert batch_node.job_dir.is_symlink() and (target / "in" / "data.bin").read_bytes() == b"input"


def test_a_task_that_wrote_only_to_stderr_has_it_kept(batch_node: BatchNode, tmp_path: Path) -> None:
    own = _release_node(batch_node)
    work = batch_node.root / "workitems" / batch_node.job_id / "job-1"
    (work / "task001" / "stdout.txt").unlink()
    run(["release", "--upload-to", str(tmp_path / "kept")], _release_env(batch_node, own))
    with tarfile.open(tmp_path / "kept" / batch_node.job_id / "tvm-1" / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"job-1/task001/stderr.txt", "job-1/task002/stdout.txt", "job-1/task002/stderr.txt"} <= names, names
    assert "job-1/task001/stdout.txt" not in names


def test_a_folder_prep_cannot_create_is_exit_8_naming_it(batch_node: BatchNode, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.txt").write_text("x")
    landed = batch_node.job_dir / "in"
    landed.mkdir(parents=True)
    landed.chmod(0o555)  # the pool's user cannot make in/sub
    try:
        out = _nodekit(["prep", f"in={src}", "--progress-interval", "0"], batch_node.env(), _as_unprivileged())
    finally:
        landed.chmod(0o755)
    assert out.returncode == 8, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and str(landed / "sub") in error[0] and "ermission denied" in error[0], out.stderr
    assert list(landed.iterdir()) == []


def test_a_read_only_job_folder_is_exit_8_with_the_path_and_a_report(batch_node: BatchNode, tmp_path: Path) -> None:
    src = _sample(batch_node, tmp_path)
    run(["prep", f"in={src}", "--progress-interval", "0"], batch_node.env())
    (src / "new.txt").write_text("new")
    rep = tmp_path / "report.json"
    state = batch_node.job_dir / ".nodekit"
    for folder in (batch_node.job_dir / "in", state):
        before = snapshot(batch_node.job_dir, allow=(state,))
        folder.chmod(0o555)
        try:
            out = _nodekit(["prep", f"in={src}", "--report", str(rep), "--progress-interval", "0"],
                           batch_node.env(), _as_unprivileged())
        finally:
            folder.chmod(0o755)
        assert out.returncode == 8, out.stderr
        error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and str(folder) in error[0] and "Permission denied" in error[0], out.stderr
        assert report(rep)["error"] == error[0].removeprefix("Error: ")
        placed = batch_node.job_dir / "in" / "new.txt"  # with .nodekit read-only the copy lands, unrecorded
        assert not placed.exists() or placed.read_text() == "new"
        assert snapshot(batch_node.job_dir, allow=(state, placed)) == before
        rep.unlink()
    run(["prep", f"in={src}", "--progress-interval", "0"], batch_node.env())  # writable again: repaired
    assert (batch_node.job_dir / "in" / "new.txt").read_text() == "new"


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


DISK_FULL = ["file-size-limit"] + (["tmpfs-out-of-inodes"] if os.geteuid() == 0 and shutil.which("unshare") else [])


@pytest.mark.parametrize("how", DISK_FULL)
def test_a_disk_filling_mid_run_is_exit_8_with_the_path_and_a_report(
        how: str, batch_node: BatchNode, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Out of space mid-run: on a tmpfs with few inodes (root may mount one in a namespace of its own), the
    space check before downloading passes and the disk fills part-way (a local source); or out of file size
    for this process, downloading from Azurite."""
    rep = tmp_path / "report.json"
    common = ["--report", str(rep), "--progress-interval", "0", "--no-cache"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
    if how == "tmpfs-out-of-inodes":
        src = tmp_path / "src"
        src.mkdir()
        for i in range(40):
            (src / f"f{i:02}.bin").write_bytes(os.urandom(1000))
        script = (f"mount -t tmpfs -o size=64m,nr_inodes=24 tmpfs '{batch_node.shared}' && exec '{sys.executable}' "
                  f"-m nodekit prep 'in={src}' " + " ".join(f"'{a}'" for a in common))
        out = subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env={**base, **batch_node.env()})
        full = "the disk is full while writing"
    else:
        remote = request.getfixturevalue("blob_remote")
        for i in range(5):
            remote.put(f"f{i}.bin", os.urandom(100 * 1024))
        remote.put("big.bin", os.urandom(20 * 1024 * 1024), blocks=True)
        out = subprocess.run([sys.executable, "-m", "nodekit", "prep", f"in={remote.url}", *common], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size,
                             env={**base, **batch_node.env(**remote_env(remote))})
        full = "the disk is full for this process while writing"
    assert out.returncode == 8, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and full in error[0] and str(batch_node.job_dir) in error[0], out.stderr
    rep_data = report(rep)
    assert rep_data["error"] == error[0].removeprefix("Error: ")
    assert rep_data["failed"] >= 1
    assert "Traceback" not in out.stderr


def test_a_source_may_be_a_folder_no_job_owns_or_another_folder_of_this_jobs(batch_node: BatchNode) -> None:
    """The refusals above stop at the job's own folders: reference data in a folder no job owns, or one
    folder of this job's copied into another (`--dest job-1/models` from `job-1/raw`), is read."""
    refdata = batch_node.shared / "refdata.v2"
    refdata.mkdir()
    (refdata / "r.txt").write_text("reference")
    run(["prep", f"in={refdata}", "--progress-interval", "0"], batch_node.env())
    assert (batch_node.job_dir / "in" / "r.txt").read_text() == "reference"
    raw = batch_node.job_dir / "raw"
    raw.mkdir()
    (raw / "w.txt").write_text("weights")
    run(["prep", f"in={raw}", "--dest", "job-1/models", "--progress-interval", "0"], batch_node.env())
    assert (batch_node.job_dir / "models" / "in" / "w.txt").read_text() == "weights"
    assert (raw / "w.txt").read_text() == "weights" and (refdata / "r.txt").read_text() == "reference"


def test_dest_may_be_in_the_job_folder_or_a_folder_no_job_owns(batch_node: BatchNode, tmp_path: Path) -> None:
    src = _sample(batch_node, tmp_path)
    for dest, lands in (("job-1/models", batch_node.job_dir / "models"),
                        ("refdata.v2", batch_node.shared / "refdata.v2")):
        run(["prep", f"in={src}", "--dest", dest, "--progress-interval", "0"], batch_node.env())
        assert (lands / "in" / "a.txt").read_text() == "a"
    env = {k: v for k, v in batch_node.env().items() if k != "AZ_BATCH_JOB_ID"}
    result = run(["prep", f"in={src}", "--dest", "some-job"], env, ok=False)
    assert result.exit_code == 6 and "which may be a job's folder: give --job-id" in result.stderr


@pytest.mark.parametrize("args", [["prep", "--timeout", "0", "builtin:sample"], ["prep", "--concurrency", "0"],
                                  ["release"], ["prep", "--no-such-option"], ["cmdline", "--os", "dos"]])
def test_a_usage_error_is_one_line_naming_the_help_to_read(args: list[str], batch_node: BatchNode) -> None:
    result = run(args, batch_node.env(), ok=False)
    assert result.exit_code == ExitCode.USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert lines[0].endswith(f" {args[0]} --help').")  # the command's own help (CliRunner calls nodekit 'cli')
