"""nodekit release against Azurite and a local folder: keep logs and dumps, then wipe safely."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from azurite import free_port
from conftest import BatchNode, BlobRemote, LocalRemote, Remote, remote_env, tree
from helpers import report, run

CORE = 200 * 1024 * 1024


def _core_bytes(size: int) -> bytes:
    """Dump-like content: mostly zero pages with random ones between (compresses, but not to nothing)."""
    page = 64 * 1024
    random_page = os.urandom(page)
    return b"".join(random_page if i % 4 == 0 else bytes(page) for i in range(size // page))


@dataclass
class ReleaseNode:
    node: BatchNode
    work: Path
    own: Path
    core: bytes

    def env(self, **extra: str) -> dict[str, str]:
        return self.node.env(AZ_BATCH_TASK_ID="jobrelease", AZ_BATCH_TASK_DIR=str(self.own),
                             AZ_BATCH_TASK_WORKING_DIR=str(self.own / "wd"), **extra)


@pytest.fixture
def release_node(batch_node: BatchNode) -> ReleaseNode:
    """Three tasks of job-1 (stdout, stderr, a .log; task002 crashed with a 200 MiB core), a prep task,
    the release task's own folder, and another job's task and shared data."""
    root = batch_node.root
    work = root / "workitems" / batch_node.job_id / "job-1"
    for task in ("jobpreparation", "task001", "task002", "task003"):
        (work / task / "wd").mkdir(parents=True, exist_ok=True)
        (work / task / "stdout.txt").write_text(f"{task} out\n")
        (work / task / "stderr.txt").write_text(f"{task} err\n")
    for task in ("task001", "task002", "task003"):
        (work / task / "wd" / "logs").mkdir()
        (work / task / "wd" / "logs" / "app.log").write_text(f"log of {task}\n" * 100)
        (work / task / "wd" / "result.dat").write_bytes(b"not kept")
    core = _core_bytes(CORE)
    (work / "task002" / "wd" / "core").write_bytes(core)
    own = work / "jobrelease"
    (own / "wd").mkdir(parents=True)
    (own / "stdout.txt").write_text("being written by Batch\n")
    other = root / "workitems" / "other-job" / "job-1" / "t1"
    (other / "wd").mkdir(parents=True)
    (other / "stdout.txt").write_text("other job\n")
    (other / "wd" / "core").write_bytes(b"other job's dump")
    (batch_node.shared / "other-job").mkdir()
    (batch_node.shared / "other-job" / "data.txt").write_text("other job's input")
    (batch_node.job_dir / "input").mkdir(parents=True)
    (batch_node.job_dir / "input" / "data.bin").write_bytes(os.urandom(1000))
    (batch_node.job_dir / "task-output.txt").write_text("written by a task")
    return ReleaseNode(batch_node, work, own, core)


def _others(rn: ReleaseNode) -> dict[str, bytes]:
    root = rn.node.root
    return {**tree(root / "workitems" / "other-job"), **{"shared/" + k: v for k, v in
                                                          tree(rn.node.shared / "other-job").items()},
            **{"own/" + k: v for k, v in tree(rn.own).items()}}


def _objects(remote: Remote, prefix: str) -> dict[str, bytes]:
    if isinstance(remote, BlobRemote):
        out = {}
        for b in remote.client.list_blobs(name_starts_with=prefix):
            out[b.name[len(prefix):]] = remote.client.download_blob(b.name).readall()
        return out
    assert isinstance(remote, LocalRemote)
    return tree(remote.root / prefix)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_release_keeps_logs_and_dump_then_wipes(remote: Remote, release_node: ReleaseNode, tmp_path: Path) -> None:
    rn = release_node
    others = _others(rn)
    rep_path = tmp_path / "release.json"
    args = ["release", "--upload-to", remote.url, "--logs", "**/*.log", "--wipe-task-dirs", "--report", str(rep_path)]
    run(args, rn.env(**remote_env(remote)))

    objects = _objects(remote, "job-1/tvm-1/")
    assert sorted(objects) == ["dumps/job-1/task002/wd/core.gz", "logs.tar.gz", "manifest.json"]
    manifest = json.loads(objects["manifest.json"])
    assert manifest["complete"] is True
    for name, entry in manifest["objects"].items():
        assert entry["md5"] == _md5(objects[name]) and entry["size"] == len(objects[name])
    if isinstance(remote, BlobRemote):  # Content-MD5 is set for later readers
        props = remote.client.get_blob_client("job-1/tvm-1/dumps/job-1/task002/wd/core.gz").get_blob_properties()
        assert base64.b64encode(props.content_settings.content_md5).decode() == _md5(objects[
            "dumps/job-1/task002/wd/core.gz"])
    # the archive opens with standard tools and holds every log
    archive = tmp_path / "logs.tar.gz"
    archive.write_bytes(objects["logs.tar.gz"])
    listed = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True, check=True).stdout.split()
    expected_logs = sorted([f"job-1/{t}/{f}" for t in ("jobpreparation", "task001", "task002", "task003")
                            for f in ("stdout.txt", "stderr.txt")] +
                           [f"job-1/{t}/wd/logs/app.log" for t in ("task001", "task002", "task003")])
    assert sorted(listed) == expected_logs
    dump = tmp_path / "core.gz"
    dump.write_bytes(objects["dumps/job-1/task002/wd/core.gz"])
    unpacked = subprocess.run(["gzip", "-dc", str(dump)], capture_output=True, check=True).stdout
    assert unpacked == rn.core
    # wiped: the job's shared folder and its tasks' working folders; the rest untouched
    assert not rn.node.job_dir.exists()
    for task in ("jobpreparation", "task001", "task002", "task003"):
        assert not (rn.work / task / "wd").exists()
        assert (rn.work / task / "stdout.txt").exists()
    assert _others(rn) == others
    rep = report(rep_path)
    assert rep["bytes_uploaded"] == sum(len(v) for v in objects.values()) - len(objects["manifest.json"])
    assert str(rn.node.job_dir) in rep["wiped"]

    # a second run: exit 0, nothing new uploaded, nothing lost
    run(args, rn.env(**remote_env(remote)))
    rep2 = report(rep_path)
    assert rep2["uploaded"] == [] and rep2["bytes_uploaded"] == 0
    assert sorted(o["name"] for o in rep2["already_uploaded"]) == ["logs.tar.gz"]
    assert _objects(remote, "job-1/tvm-1/") == {**objects, "manifest.json": _objects(remote, "job-1/tvm-1/")[
        "manifest.json"]}


def test_storage_down_keeps_everything(release_node: ReleaseNode, tmp_path: Path) -> None:
    rn = release_node
    before = tree(rn.node.root)
    dead = f"http://127.0.0.1:{free_port()}/devstoreaccount1/logs"  # nothing listens there
    env = rn.env(AZURE_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true")
    result = run(["release", "--upload-to", dead, "--deadline", "4s", "--wipe-task-dirs"], env, ok=False)
    assert result.exit_code == 9, result.stderr
    assert "Nothing was wiped" in result.stderr
    after = tree(rn.node.root)
    assert {k: v for k, v in after.items() if not k.endswith("nodekit-release.json")} == before

    result = run(["release", "--upload-to", dead, "--deadline", "4s", "--wipe-on-upload-failure"], env, ok=False)
    assert result.exit_code == 5, result.stderr
    assert "upload failed" in result.stderr
    assert not rn.node.job_dir.exists()


def test_deadline_too_short_for_the_dump(blob_remote: BlobRemote, release_node: ReleaseNode,
                                        tmp_path: Path) -> None:
    rn = release_node
    rep_path = tmp_path / "r.json"
    started = time.monotonic()
    result = run(["release", "--upload-to", blob_remote.url, "--deadline", "3s", "--report", str(rep_path)],
                 rn.env(**remote_env(blob_remote)), ok=False)
    assert time.monotonic() - started < 3
    assert result.exit_code == 5
    rep = report(rep_path)
    assert [s["name"] for s in rep["skipped"]] == ["dumps/job-1/task002/wd/core.gz"]
    assert [u["name"] for u in rep["uploaded"]] == ["logs.tar.gz"]
    assert rn.node.job_dir.exists() and rep["wiped"] == []  # the default policy keeps the data

    run(["release", "--upload-to", blob_remote.url, "--deadline", "3s", "--wipe-on-upload-failure", "--report",
         str(rep_path)], rn.env(**remote_env(blob_remote)), ok=False)
    assert not rn.node.job_dir.exists()
    assert (rn.work / "task002" / "wd" / "core").exists()  # task folders were not asked for


def test_symlink_in_job_folder_is_removed_not_followed(blob_remote: BlobRemote, release_node: ReleaseNode,
                                                       tmp_path: Path) -> None:
    rn = release_node
    outside = tmp_path / "precious.txt"
    outside.write_text("outside the job")
    outside_dir = tmp_path / "precious-dir"
    outside_dir.mkdir()
    (outside_dir / "f").write_text("x")
    (rn.node.job_dir / "link-to-file").symlink_to(outside)
    (rn.node.job_dir / "input" / "link-to-dir").symlink_to(outside_dir)
    (rn.work / "task001" / "wd" / "link.log").symlink_to(outside)  # not collected either
    run(["release", "--upload-to", blob_remote.url, "--logs", "**/*.log", "--wipe-task-dirs"],
        rn.env(**remote_env(blob_remote)))
    assert outside.read_text() == "outside the job"
    assert (outside_dir / "f").read_text() == "x"
    assert not rn.node.job_dir.exists()


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"AZ_BATCH_JOB_ID": ".."}, 6, "is not a valid Batch id"),
        ({"AZ_BATCH_JOB_ID": ""}, 3, "AZ_BATCH_JOB_ID is not set"),
        ({"AZ_BATCH_NODE_SHARED_DIR": "/"}, 6, "the root of a file system"),
        ({"AZ_BATCH_NODE_ID": ""}, 3, "AZ_BATCH_NODE_ID is not set"),
    ],
)
def test_unsafe_environment_is_refused_and_nothing_deleted(release_node: ReleaseNode, tmp_path: Path,
                                                           change: dict[str, str], code: int, message: str) -> None:
    rn = release_node
    before = tree(rn.node.root)
    dest = tmp_path / "kept"
    result = run(["release", "--upload-to", str(dest), "--wipe-task-dirs"], {**rn.env(), **change}, ok=False)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
    assert tree(rn.node.root) == before
    assert not dest.exists()


def test_dry_run_lists_and_changes_nothing(release_node: ReleaseNode, tmp_path: Path) -> None:
    rn = release_node
    before = tree(rn.node.root)
    dest = tmp_path / "kept"
    result = run(["release", "--upload-to", str(dest), "--wipe-task-dirs", "--dry-run"], rn.env())
    assert "[DRY RUN] upload   job-1/tvm-1/dumps/job-1/task002/wd/core.gz" in result.stdout
    assert f"[DRY RUN] delete   {rn.node.job_dir}" in result.stdout
    assert tree(rn.node.root) == before and not dest.exists()


def test_spec_release_section(release_node: ReleaseNode, tmp_path: Path) -> None:
    rn = release_node
    dest = tmp_path / "kept"
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"nodekit": 1, "release": {"upload_to": str(dest), "logs": ["**/*.log"],
                                                          "dumps": ["*.nothing"], "deadline": "5m"}}))
    run(["release", "--spec", str(spec)], rn.env())
    assert sorted(tree(dest)) == ["job-1/tvm-1/logs.tar.gz", "job-1/tvm-1/manifest.json"]
    with gzip.open(dest / "job-1" / "tvm-1" / "logs.tar.gz") as gz, tarfile.open(fileobj=gz) as tar:
        assert "job-1/task003/wd/logs/app.log" in tar.getnames()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"release": {"deadline": "20m"}}))
    result = run(["release", "--spec", str(bad), "--upload-to", str(dest)], rn.env(), ok=False)
    assert result.exit_code == 2 and "too long: at most 15m" in result.stderr
