"""Issue 16: release keeps what it can, never destroys what it keeps, and a re-run with nothing new writes nothing.

Against a local folder and Azurite. Unreadable files are made by permissions; nodekit then runs without
root's override of them (setpriv), as a release task running as the pool's user would.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, BatchNode, BlobRemote, LocalRemote, Remote, remote_env
from helpers import report, run
from test_hostile import _as_unprivileged, snapshot
from test_release import _objects


def _node(node: BatchNode) -> tuple[Path, Path]:
    """Three tasks; returns (the job's task folders, the release task's own folder)."""
    work = node.root / "workitems" / node.job_id / "job-1"
    for task in ("task001", "task002", "task003"):
        (work / task / "wd").mkdir(parents=True)
        (work / task / "stdout.txt").write_text(f"{task} out\n")
        (work / task / "stderr.txt").write_text(f"{task} err\n")
        (work / task / "wd" / "run.log").write_text(f"log of {task}\n")
    (work / "task001" / "wd" / "core").write_bytes(b"dump one" * 5000)
    (work / "task002" / "wd" / "core").write_bytes(b"dump two" * 5000)
    (work / "task003" / "wd" / "private").mkdir()
    (work / "task003" / "wd" / "private" / "hidden.log").write_text("in a folder release cannot list\n")
    own = work / "jobrelease"
    (own / "wd").mkdir(parents=True)
    (node.job_dir / "in").mkdir(parents=True)
    (node.job_dir / "in" / "data.bin").write_bytes(b"input")
    return work, own


def _release(node: BatchNode, own: Path, remote: Remote, rep: Path, *, unprivileged: bool = False) -> \
        subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
    env = node.env(AZ_BATCH_TASK_ID="jobrelease", AZ_BATCH_TASK_DIR=str(own), AZ_BATCH_TASK_WORKING_DIR=str(own / "wd"),
                   **remote_env(remote))
    prefix = _as_unprivileged() if unprivileged else []
    return subprocess.run([*prefix, sys.executable, "-m", "nodekit", "release", "--upload-to", remote.url, "--logs",
                           "**/*.log", "--wipe-task-dirs", "--report", str(rep)], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _archive(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _storage(remote: Remote) -> dict[str, str]:
    """What storage holds with each object's version (a rewrite changes it even with the same bytes)."""
    if isinstance(remote, BlobRemote):
        return {b.name: f"{b.etag}:{b.last_modified}" for b in remote.client.list_blobs()}
    assert isinstance(remote, LocalRemote)
    return snapshot(remote.root)


def test_release_skips_what_it_cannot_read_keeps_the_rest_and_wipes_nothing(remote: Remote, batch_node: BatchNode,
                                                                             tmp_path: Path) -> None:
    work, own = _node(batch_node)
    (work / "task001" / "stdout.txt").chmod(0)  # a task ran as admin, release as the pool's user
    (work / "task001" / "wd" / "core").chmod(0)
    (work / "task002" / "stderr.txt").unlink()
    os.mkfifo(work / "task002" / "stderr.txt")  # a special file: never opened for a blocking read
    (work / "task003" / "wd" / "private").chmod(0)
    rep = tmp_path / "release.json"
    node_before = snapshot(batch_node.root)

    out = _release(batch_node, own, remote, rep, unprivileged=True)
    assert out.returncode == 5, out.stderr
    assert "nodekit bug" not in out.stderr and "Traceback" not in out.stderr
    data = report(rep)
    why = {Path(s["path"]).relative_to(work).as_posix(): s["why"] for s in data["skipped"]}
    assert why == {"task001/stdout.txt": "it cannot be read: Permission denied",
                   "task001/wd/core": "it cannot be read: Permission denied",
                   "task002/stderr.txt": "not a regular file (a FIFO)",
                   "task003/wd/private": "the folder cannot be listed (Permission denied): what it holds is not known"}
    for path in why:  # each named in the log too
        assert re.search(rf"not kept: {re.escape(str(work / path))}: ", out.stderr), out.stderr
    assert sorted(u["name"] for u in data["uploaded"]) == ["dumps/job-1/task002/wd/core.gz", "logs.tar.gz"]
    assert data["wiped"] == [] and data["kept"]  # not everything kept: nothing wiped
    objects = _objects(remote, "job-1/tvm-1/")
    assert sorted(_archive(objects["logs.tar.gz"])) == [  # every readable log; not the release task's own
        "job-1/task001/stderr.txt", "job-1/task001/wd/run.log", "job-1/task002/stdout.txt",
        "job-1/task002/wd/run.log", "job-1/task003/stderr.txt", "job-1/task003/stdout.txt",
        "job-1/task003/wd/run.log"]
    assert gzip.decompress(objects["dumps/job-1/task002/wd/core.gz"]) == b"dump two" * 5000
    assert json.loads(objects["manifest.json"])["complete"] is False
    assert snapshot(batch_node.root) == node_before  # nothing wiped, nothing left behind (no temporary archive)
    leftovers = [p for p in tmp_path.rglob("*") if ".nodekit-logs" in p.name or p.name.endswith("nodekit-partial")]
    assert leftovers == []

    # permissions repaired: the re-run keeps the rest, under new names, and wipes
    (work / "task001" / "stdout.txt").chmod(0o644)
    (work / "task001" / "wd" / "core").chmod(0o644)
    (work / "task002" / "stderr.txt").unlink()
    (work / "task003" / "wd" / "private").chmod(0o755)
    out = _release(batch_node, own, remote, rep, unprivileged=True)
    assert out.returncode == 0, out.stderr
    data = report(rep)
    assert sorted(u["name"] for u in data["uploaded"]) == ["dumps/job-1/task001/wd/core.gz", "logs-2.tar.gz"]
    assert [a["name"] for a in data["already_uploaded"]] == ["dumps/job-1/task002/wd/core.gz"]
    objects = _objects(remote, "job-1/tvm-1/")
    assert "job-1/task003/wd/private/hidden.log" in _archive(objects["logs-2.tar.gz"])
    assert json.loads(objects["manifest.json"])["complete"] is True
    assert not batch_node.job_dir.exists() and not (work / "task001" / "wd").exists()

    # 12. a re-run with nothing new writes nothing: not even the manifest
    stored = _storage(remote)
    out = _release(batch_node, own, remote, rep)
    assert out.returncode == 0, out.stderr
    assert report(rep)["uploaded"] == []
    assert _storage(remote) == stored


def test_a_relative_demo_root_keeps_the_logs_where_it_says(tmp_path: Path) -> None:
    """`./dev demo` runs `nodekit demo --root .demo`: the folder it prints exists and holds each node's logs."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
    out = subprocess.run([sys.executable, "-m", "nodekit", "demo", "--root", ".demo"], cwd=tmp_path, env=base,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kept_in = Path(re.search(r"^Logs kept in: (.+)$", out.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert kept_in == tmp_path / ".demo" / "storage" / "job-jobprepreleasesamplejob"
    nodes = re.findall(r"^(tvm-\d):\n  Prep task exit code:    0$", out.stdout, re.M)
    assert nodes and sorted(p.parent.parent.name for p in kept_in.glob("jobpreparation/*/$TaskLog/stdout.txt")) == \
        nodes


def test_a_wipe_the_disk_refuses_is_exit_8_after_everything_was_kept(batch_node: BatchNode, tmp_path: Path) -> None:
    work, own = _node(batch_node)
    stuck = batch_node.job_dir / "written-by-admin"
    stuck.mkdir()
    (stuck / "result.bin").write_bytes(b"x")
    stuck.chmod(0o555)  # release, as the pool's user, cannot delete what is inside
    dest = LocalRemote(tmp_path / "kept")
    rep = tmp_path / "release.json"
    try:
        out = _release(batch_node, own, dest, rep, unprivileged=True)
    finally:
        stuck.chmod(0o755)
    assert out.returncode == 8, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"cannot wipe {stuck / 'result.bin'}: Permission denied" in error[0], out.stderr
    data = report(rep)
    assert data["exit_code"] == 8 and [f["what"] for f in data["failed"]] == ["wipe"]
    assert sorted(u["name"] for u in data["uploaded"]) == [
        "dumps/job-1/task001/wd/core.gz", "dumps/job-1/task002/wd/core.gz", "logs.tar.gz"]
    assert not (work / "task001" / "wd").exists()  # the rest was wiped
    assert (stuck / "result.bin").exists()


def test_the_embedded_sample_is_not_a_destination(batch_node: BatchNode, tmp_path: Path) -> None:
    _work, own = _node(batch_node)
    before = snapshot(tmp_path)
    result = run(["release", "--upload-to", "builtin:sample"],
                 batch_node.env(AZ_BATCH_TASK_DIR=str(own), AZ_BATCH_TASK_WORKING_DIR=str(own / "wd")), ok=False)
    assert result.exit_code == 2 and "the embedded sample is not a destination" in result.stderr
    assert snapshot(tmp_path) == before


def test_a_log_that_vanishes_or_fails_mid_read_is_skipped_and_the_archive_built_without_it(
        batch_node: BatchNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Races a test cannot time: a log deleted between collection and archiving, and one whose disk fails
    part-way through (EIO). The archive in storage is whole and holds every other log."""
    import nodekit.release as release

    work, own = _node(batch_node)
    (work / "task002" / "wd" / "big.log").write_bytes(b"x" * (3 * 1024 * 1024))
    collect = release.collect

    def collect_then_delete(*args: object) -> release.Collection:
        found = collect(*args)  # type: ignore[arg-type]
        (work / "task001" / "wd" / "run.log").unlink()  # gone after it was collected
        return found

    opened = release.open_regular

    class FailingRead:
        def __init__(self, fh: io.BufferedReader) -> None:
            self.fh, self.n = fh, 0

        def read(self, n: int) -> bytes:
            self.n += 1
            if self.n == 2:
                raise OSError(5, "Input/output error")
            return self.fh.read(n)

        def __enter__(self) -> FailingRead:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def close(self) -> None:
            self.fh.close()

    def open_failing(path: Path) -> tuple[object, object, str]:
        fh, st, why = opened(path)
        return (FailingRead(fh), st, why) if fh is not None and path.name == "big.log" else (fh, st, why)

    monkeypatch.setattr(release, "collect", collect_then_delete)
    monkeypatch.setattr(release, "open_regular", open_failing)
    rep = tmp_path / "release.json"
    dest = tmp_path / "kept"
    result = run(["release", "--upload-to", str(dest), "--logs", "**/*.log", "--report", str(rep)],
                 batch_node.env(AZ_BATCH_TASK_DIR=str(own), AZ_BATCH_TASK_WORKING_DIR=str(own / "wd")), ok=False)
    assert result.exit_code == 5, result.stderr
    why = {Path(s["path"]).relative_to(work).as_posix(): s["why"] for s in report(rep)["skipped"]}
    assert why == {"task001/wd/run.log": "it vanished before it could be read",
                   "task002/wd/big.log": "reading it failed: Input/output error"}
    kept = (dest / "job-1" / "tvm-1" / "logs.tar.gz").read_bytes()
    names = _archive(kept)
    assert "job-1/task002/wd/run.log" in names and "job-1/task001/stdout.txt" in names
    assert "job-1/task002/wd/big.log" not in names and "job-1/task001/wd/run.log" not in names
    assert not [p for p in dest.rglob("*") if p.name.endswith("nodekit-partial")]
    assert batch_node.job_dir.exists()  # not everything kept: nothing wiped
