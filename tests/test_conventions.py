"""Issue 17: release in the Batch File Conventions layout, and prep reading it back, against Azurite and a folder.

The container name is the standard's, checked against the reference implementation's own examples
(Azure/azure-sdk-for-net, Microsoft.Azure.Batch.Conventions.Files, ContainerNameUtilsTests.cs; the same
table in Batch Explorer's storage-utils.spec.ts).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Azurite, BatchNode
from helpers import report, run
from test_hostile import snapshot

from nodekit.conventions import container_name, parse_job_ref
from nodekit.errors import UsageError
from nodekit.spec import is_account, parse_destination, parse_source
from nodekit.storage import ObjectExists, RunContext
from nodekit.storage.local import LocalStore

# ---------------------------------------------------------------------------------------------------------------
# the container name


@pytest.mark.parametrize(("job_id", "expected"), [
    # the reference implementation's examples (ContainerNameUtilsTests.cs, storage-utils.spec.ts): no change needed
    ("job-15", "job-job-15"),
    ("MyTerrificJob", "job-myterrificjob"),
    ("J", "job-j"),
    ("j", "job-j"),
    # ... and ids that must be hashed: underscores, runs of hyphens and underscores, leading and trailing hyphens,
    # upper case with them, nothing readable left, colons (Batch Explorer's extra case), and a long id
    ("my_job-bob", "job-my-job-bob-e04620bc2add214df74e158ba60d24273a0e0927"),
    ("-my_job-sam--", "job-my-job-sam-47f54d840815af2592a12213db05f8a8277a098d"),
    ("my-_EVEN_MORE_-terrific-job", "job-my-even-more-te-68b05a7d8aa6aa65b9a6892c667a6c406a16ad65"),
    ("---", "job-job-58b63e273b964039d6ef432a415df3f177c818e5"),
    ("-_-", "job-job-6fe16b401f95cfcf3aba78023b0a14ef782813e1"),
    ("-", "job-job-3bc15c8aae3e4124dd409035f32ea2fd6835efc9"),
    ("_", "job-job-53a0acfad59379b3e050338bf9f23cfc172ee787"),
    ("job:my-job-1", "job-job-my-job-1-fdddfdd04eab0771edb90374860d2736481d162d"),
    (":", "job-job-05a79f06cf3f67f726dae68d18a2290f6c9a50c9"),
    ("myverylongjobnameallinonewordreallystartingtogetreallysillynow",
     "job-myverylongjobna-a8700e4947d0c8c621e53b24246aa0349d830e41"),
    # our own: upper case only is lowered, not hashed; one hyphen is fine, two in a row are not
    ("Risk-Run-7", "job-risk-run-7"),
    ("RISK--7", "job-risk-7-" + hashlib.sha1(b"risk--7").hexdigest()),
    ("trailing-", "job-trailing-" + hashlib.sha1(b"trailing-").hexdigest()),
    # the length limit: job- + 59 characters is the longest name; 60 and Batch's 64 are hashed, and a
    # truncation that ends in a hyphen loses it
    ("a" * 59, "job-" + "a" * 59),
    ("a" * 60, "job-aaaaaaaaaaaaaaa-" + hashlib.sha1(b"a" * 60).hexdigest()),
    ("B" * 64, "job-bbbbbbbbbbbbbbb-" + hashlib.sha1(b"b" * 64).hexdigest()),
    ("abcdefghijklmn-" + "x" * 50,
     "job-abcdefghijklmn-" + hashlib.sha1(("abcdefghijklmn-" + "x" * 50).encode()).hexdigest()),
])
def test_container_name_is_the_reference_implementations(job_id: str, expected: str) -> None:
    name = container_name(job_id)
    assert name == expected
    assert 3 <= len(name) <= 63 and name == name.lower() and "--" not in name and not name.endswith("-")
    assert parse_source(f"https://acct.blob.core.windows.net/{name}").blob.container == name  # type: ignore[union-attr]


@pytest.mark.parametrize(("text", "container", "prefix", "name"), [
    ("job:risk-1@https://acct.blob.core.windows.net", "job-risk-1", "$JobOutput", "risk-1"),
    ("job:risk-1/$JobPreview@https://acct.blob.core.windows.net/", "job-risk-1", "$JobPreview", "risk-1"),
    ("job:Risk_1/task007@https://acct.blob.core.windows.net", container_name("Risk_1"), "task007/$TaskOutput",
     "task007"),
    ("job:risk-1/task007/$TaskLog@http://127.0.0.1:10000/devstoreaccount1", "job-risk-1", "task007/$TaskLog",
     "task007"),
])
def test_job_source_resolves_to_the_standards_container_and_prefix(text: str, container: str, prefix: str,
                                                                    name: str) -> None:
    spec = parse_source(text)
    assert spec.blob is not None and (spec.blob.container, spec.blob.prefix, spec.name) == (container, prefix, name)
    assert spec.raw == text


@pytest.mark.parametrize(("text", "message"), [
    ("job:risk-1", "say where the job's files are kept"),
    ("job:risk-1/$TaskLog@https://acct.blob.core.windows.net", "$TaskLog is not one of a job's kinds"),
    ("job:risk-1/t1/$JobOutput@https://acct.blob.core.windows.net", "$JobOutput is not one of a task's kinds"),
    ("job:risk.1@https://acct.blob.core.windows.net", "is not job:JOB_ID"),
    ("job:a/b/c@https://acct.blob.core.windows.net", "is not job:JOB_ID"),
    ("job:risk-1/jobpreparation@https://acct.blob.core.windows.net", "are kept per node"),
    ("job:risk-1@https://example.com/files", "is not a storage account's blob URL"),
])
def test_job_source_mistakes_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_source(text)
    assert message in str(err.value)


def test_destination_may_name_an_account() -> None:
    for text in ("https://acct.blob.core.windows.net", "https://acct.blob.core.windows.net/",
                 "http://127.0.0.1:10000/devstoreaccount1"):
        assert is_account(parse_destination(text)), text
    assert not is_account(parse_destination("https://acct.blob.core.windows.net/logs"))
    assert parse_destination("/mnt/kept").path == "/mnt/kept"
    assert parse_job_ref("job:j@/mnt/kept").where == "/mnt/kept"


# ---------------------------------------------------------------------------------------------------------------
# the storage contract: create-only puts never replace anything


def test_create_only_put_never_replaces(azurite: Azurite, tmp_path: Path) -> None:
    from nodekit.credentials import CredentialEnv
    from nodekit.storage.factory import open_destination
    from nodekit.storage.net import NetConfig

    container = f"c{uuid.uuid4().hex[:20]}"
    creds = CredentialEnv.from_environ({"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string})
    blob = open_destination(parse_source(f"{azurite.endpoint}/{container}"), creds, NetConfig(), RunContext(60))
    blob.create_container()  # type: ignore[attr-defined]
    for store in (blob, LocalStore(str(tmp_path / "kept"))):
        first = store.put("a/b.txt", iter([b"one"]), create_only=True)
        with pytest.raises(ObjectExists) as exists:
            store.put("a/b.txt", iter([b"two", b"!"]), create_only=True)
        assert exists.value.written.size == 4
        assert exists.value.written.content_md5 == base64.b64encode(hashlib.md5(b"two!").digest()).decode()
        assert store.read_small("a/b.txt") == b"one" and store.head("a/b.txt").content_md5 == first.content_md5  # type: ignore[union-attr]
        store.put("empty", iter([b""]), create_only=True)
        assert store.read_small("empty") == b""
    assert not [p for p in (tmp_path / "kept").rglob("*") if p.name.endswith("nodekit-partial")]


# ---------------------------------------------------------------------------------------------------------------
# release in the layout


DUMP = 12 * 1024 * 1024 + 5  # more than one 8 MiB block, compressed in parallel members


def _dump_bytes() -> bytes:
    page = 64 * 1024
    rnd = os.urandom(page)
    data = b"".join(rnd if i % 4 == 0 else bytes(page) for i in range(DUMP // page + 1))
    return data[:DUMP]


@dataclass
class Job:
    """A job's folders on one node: three tasks with logs, outputs and a dump; job outputs in the shared folder."""

    node: BatchNode
    node_id: str
    work: Path
    own: Path
    files: dict[str, bytes]  # expected name in the container -> bytes on the node

    def env(self, **extra: str) -> dict[str, str]:
        return self.node.env(AZ_BATCH_NODE_ID=self.node_id, AZ_BATCH_TASK_ID="jobrelease",
                             AZ_BATCH_TASK_DIR=str(self.own), AZ_BATCH_TASK_WORKING_DIR=str(self.own / "wd"), **extra)


def _make_job(root: Path, job_id: str, node_id: str = "tvm-1", dump: bytes | None = None,
              job_outputs: dict[str, bytes] | None = None, first_task: int = 1) -> Job:
    """Tasks taskNNN from `first_task`, three of them (a task id runs on one node); the dump in the second."""
    node = BatchNode(root, job_id)
    node.shared.mkdir(parents=True)
    work = root / "workitems" / job_id / "job-1"
    files: dict[str, bytes] = {}

    def put(path: Path, data: bytes, name: str | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if name:
            files[name] = data

    tasks = [f"task{n:03d}" for n in range(first_task, first_task + 3)]
    for task in ("jobpreparation", *tasks):
        where = f"jobpreparation/{node_id}" if task == "jobpreparation" else task
        put(work / task / "stdout.txt", f"{task} on {node_id}: out\n".encode(), f"{where}/$TaskLog/stdout.txt")
        put(work / task / "stderr.txt", b"" if task == tasks[2] else f"{task} err\n".encode(),
            f"{where}/$TaskLog/stderr.txt")
    for task in tasks:
        put(work / task / "wd" / "logs" / "app.log", f"log of {task}\n".encode() * 200, f"{task}/$TaskLog/logs/app.log")
        put(work / task / "wd" / "out" / f"frame-{task}.csv", f"frame,{task}\n".encode(),
            f"{task}/$TaskOutput/out/frame-{task}.csv")
        put(work / task / "wd" / "scratch.tmp", b"not kept", None)
    if dump is not None:
        put(work / tasks[1] / "wd" / "core", dump, None)
    for name, data in (job_outputs or {}).items():
        put(node.job_dir / name, data, f"$JobOutput/{name}")
    put(node.job_dir / "input" / "data.bin", b"input, not output", None)
    own = work / "jobrelease"
    (own / "wd").mkdir(parents=True)
    (own / "stdout.txt").write_text("being written by Batch\n")
    return Job(node, node_id, work, own, files)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _container(azurite: Azurite, name: str) -> Any:
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(name)


def _blobs(azurite: Azurite, container: str, prefix: str = "") -> dict[str, Any]:
    """Every blob of the container under `prefix`: its properties."""
    return {b.name: b for b in _container(azurite, container).list_blobs(name_starts_with=prefix)}


def _release_args(url: str, rep: Path, *extra: str) -> list[str]:
    return ["release", "--upload-to", url, "--layout", "conventions", "--logs", "**/*.log", "--outputs", "out/*.csv",
            "--job-outputs", "results/**", "--wipe-task-dirs", "--report", str(rep), *extra]


def test_release_three_tasks_in_the_conventions_layout_then_a_rerun_writes_nothing(azurite: Azurite,
                                                                                   tmp_path: Path) -> None:
    job_id = f"Conv_{uuid.uuid4().hex[:8]}"  # an underscore: the container name is hashed
    dump = _dump_bytes()
    job = _make_job(tmp_path / "node", job_id, dump=dump, job_outputs={"results/summary.json": b'{"ok": true}\n'})
    rep = tmp_path / "release.json"
    env = job.env(AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string)
    run(_release_args(azurite.endpoint, rep), env)  # the account's URL: the container is the standard's

    container = container_name(job_id)
    readable = job_id.lower().replace("_", "-")[:15]
    assert container == f"job-{readable}-{hashlib.sha1(job_id.lower().encode()).hexdigest()}"
    blobs = _blobs(azurite, container)
    manifest = "jobrelease/tvm-1/$TaskLog/nodekit-manifest.json"
    assert sorted(blobs) == sorted([*job.files, "task002/$TaskLog/core.gz", manifest])
    # listed by prefix exactly as the standard places them
    assert sorted(_blobs(azurite, container, "task002/$TaskLog/")) == [
        "task002/$TaskLog/core.gz", "task002/$TaskLog/logs/app.log", "task002/$TaskLog/stderr.txt",
        "task002/$TaskLog/stdout.txt"]
    assert sorted(_blobs(azurite, container, "task001/$TaskOutput/")) == ["task001/$TaskOutput/out/frame-task001.csv"]
    assert sorted(_blobs(azurite, container, "$JobOutput/")) == ["$JobOutput/results/summary.json"]
    assert sorted(_blobs(azurite, container, "jobpreparation/tvm-1/$TaskLog/")) == [
        "jobpreparation/tvm-1/$TaskLog/stderr.txt", "jobpreparation/tvm-1/$TaskLog/stdout.txt"]
    # bytes and Content-MD5: plain blobs as they were on the node, each with its MD5; the dump gzip-compressed
    client = _container(azurite, container)
    for name, data in job.files.items():
        assert client.download_blob(name).readall() == data, name
        props = blobs[name]
        assert base64.b64encode(props.content_settings.content_md5).decode() == _md5(data), name
        assert props.content_settings.content_encoding in (None, ""), name
    assert blobs["task001/$TaskLog/stdout.txt"].content_settings.content_type == "text/plain; charset=utf-8"
    assert blobs["task001/$TaskOutput/out/frame-task001.csv"].content_settings.content_type == "text/csv"
    stored_dump = client.download_blob("task002/$TaskLog/core.gz").readall()
    assert gzip.decompress(stored_dump) == dump
    assert base64.b64encode(blobs["task002/$TaskLog/core.gz"].content_settings.content_md5).decode() == \
        _md5(stored_dump)
    assert blobs["task002/$TaskLog/core.gz"].content_settings.content_type == "application/gzip"
    # the manifest lists every object with its size and MD5; the report says the same
    listed = json.loads(client.download_blob(manifest).readall())
    assert listed["complete"] is True and listed["layout"] == "conventions" and listed["container"] == container
    assert sorted(listed["objects"]) == sorted([*job.files, "task002/$TaskLog/core.gz"])
    for name, entry in listed["objects"].items():
        stored = client.download_blob(name).readall()
        assert (entry["size"], entry["md5"]) == (len(stored), _md5(stored)), name
    first = report(rep)
    assert first["exit_code"] == 0 and first["conflicts"] == [] and first["layout"] == "conventions"
    assert sorted(u["name"] for u in first["uploaded"]) == sorted(listed["objects"])
    assert not job.node.job_dir.exists() and not list(job.work.glob("task*/wd"))  # wiped after everything was kept

    # a second run (as after a reboot during the release task): exit 0, nothing written
    run(_release_args(azurite.endpoint, rep), env)
    second = report(rep)
    assert second["uploaded"] == [] and second["bytes_uploaded"] == 0
    after = _blobs(azurite, container)
    assert {n: (b.etag, b.last_modified) for n, b in after.items()} == \
        {n: (b.etag, b.last_modified) for n, b in blobs.items()}


def test_release_to_a_local_folder_and_an_explicit_container(azurite: Azurite, tmp_path: Path) -> None:
    """A folder stands for the account (the container is a folder in it); a container URL is used as given."""
    job = _make_job(tmp_path / "node", "local-1", job_outputs={"results/a.txt": b"a"})
    kept = tmp_path / "kept"
    run(_release_args(str(kept), tmp_path / "r.json"), job.env())
    stored = {p.relative_to(kept).as_posix(): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    assert {n: stored[f"job-local-1/{n}"] for n in job.files} == job.files
    assert sorted(stored) == sorted([f"job-local-1/{n}" for n in job.files] +
                                    ["job-local-1/jobrelease/tvm-1/$TaskLog/nodekit-manifest.json"])
    run(_release_args(str(kept), tmp_path / "r.json"), job.env())
    assert report(tmp_path / "r.json")["uploaded"] == []

    job2 = _make_job(tmp_path / "node2", "explicit-1")
    container = f"c{uuid.uuid4().hex[:16]}"
    _container(azurite, container).create_container()
    run(_release_args(f"{azurite.endpoint}/{container}/runs", tmp_path / "r2.json"),
        job2.env(AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string))
    assert sorted(_blobs(azurite, container)) == sorted(
        [f"runs/{n}" for n in job2.files] + ["runs/jobrelease/tvm-1/$TaskLog/nodekit-manifest.json"])


def test_two_nodes_keep_the_same_job_output_once(azurite: Azurite, tmp_path: Path) -> None:
    job_id = f"same-{uuid.uuid4().hex[:8]}"
    shared = {"results/model.bin": os.urandom(300_000), "results/summary.txt": b"one summary\n"}
    a = _make_job(tmp_path / "a", job_id, "tvm-1", job_outputs=shared)
    b = _make_job(tmp_path / "b", job_id, "tvm-2", job_outputs=shared, first_task=4)
    conn = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
    run(_release_args(azurite.endpoint, tmp_path / "a.json"), a.env(**conn))
    container = container_name(job_id)
    before = {n: (p.etag, p.last_modified) for n, p in _blobs(azurite, container, "$JobOutput/").items()}
    assert sorted(before) == ["$JobOutput/results/model.bin", "$JobOutput/results/summary.txt"]

    run(_release_args(azurite.endpoint, tmp_path / "b.json"), b.env(**conn))
    rep = report(tmp_path / "b.json")
    assert rep["exit_code"] == 0 and rep["conflicts"] == []
    assert sorted(o["name"] for o in rep["already_uploaded"]) == sorted(before)  # seen there, not uploaded again
    assert not [u for u in rep["uploaded"] if u["name"].startswith("$JobOutput/")]
    after = {n: (p.etag, p.last_modified) for n, p in _blobs(azurite, container, "$JobOutput/").items()}
    assert after == before  # written once
    # each node's own task logs are there, and each manifest lists the job outputs it vouched for
    for node in ("tvm-1", "tvm-2"):
        listed = json.loads(_container(azurite, container).download_blob(
            f"jobrelease/{node}/$TaskLog/nodekit-manifest.json").readall())
        assert set(before) <= set(listed["objects"])
        assert f"jobpreparation/{node}/$TaskLog/stdout.txt" in listed["objects"]
    assert not b.node.job_dir.exists()  # kept (by the other node): wiped


def test_a_conflicting_job_output_is_reported_not_overwritten(azurite: Azurite, tmp_path: Path) -> None:
    job_id = f"diff-{uuid.uuid4().hex[:8]}"
    a = _make_job(tmp_path / "a", job_id, "tvm-1", job_outputs={"results/summary.txt": b"node one's numbers\n"})
    b = _make_job(tmp_path / "b", job_id, "tvm-2", job_outputs={"results/summary.txt": b"node two's numbers!\n"},
                  first_task=4)
    conn = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
    run(_release_args(azurite.endpoint, tmp_path / "a.json"), a.env(**conn))
    container = container_name(job_id)
    client = _container(azurite, container)
    etag = client.get_blob_client("$JobOutput/results/summary.txt").get_blob_properties().etag

    result = run(_release_args(azurite.endpoint, tmp_path / "b.json"), b.env(**conn), ok=False)
    assert result.exit_code == 10, result.stderr
    assert "conflict: storage holds other content under $JobOutput/results/summary.txt" in result.stderr
    assert client.download_blob("$JobOutput/results/summary.txt").readall() == b"node one's numbers\n"
    assert client.get_blob_client("$JobOutput/results/summary.txt").get_blob_properties().etag == etag
    beside = "jobrelease/tvm-2/$TaskOutput/$JobOutput/results/summary.txt"
    assert client.download_blob(beside).readall() == b"node two's numbers!\n"  # nothing lost
    rep = report(tmp_path / "b.json")
    assert rep["conflicts"] == [{
        "name": "$JobOutput/results/summary.txt", "path": str(b.node.job_dir / "results" / "summary.txt"),
        "kept_as": beside, "md5": _md5(b"node two's numbers!\n"), "size": 20,
        "stored_md5": _md5(b"node one's numbers\n"), "stored_size": 19}]
    assert rep["exit_code"] == 10 and not b.node.job_dir.exists()  # everything kept, so wiped

    # run again (as after a reboot): the job folder is gone and the manifest vouches for the copy kept beside, so
    # nothing is written; exit 0, since only the run that met the conflict can see it
    run(_release_args(azurite.endpoint, tmp_path / "b.json"), b.env(**conn))
    assert report(tmp_path / "b.json")["uploaded"] == []


def _release_process(job: Job, azurite: Azurite, rep: Path) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
    env = {**base, **job.env(AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string)}
    return subprocess.Popen([sys.executable, "-m", "nodekit", *_release_args(azurite.endpoint, rep)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("same", [True, False], ids=["same-content", "different-content"])
def test_nodes_racing_for_one_job_output_never_mix_or_overwrite(azurite: Azurite, tmp_path: Path,
                                                                same: bool) -> None:
    """Three nodes release at once, each holding results/big.bin (24 MiB, three blocks): the blob is created once,
    whole, by one of them (its bytes and Content-MD5 agree); the others find the same bytes there, or report a
    conflict and keep their copy beside it."""
    job_id = f"race-{uuid.uuid4().hex[:8]}"
    common = os.urandom(24 * 1024 * 1024)
    contents = {f"tvm-{i}": common if same else os.urandom(24 * 1024 * 1024) for i in (1, 2, 3)}
    jobs = {n: _make_job(tmp_path / n, job_id, n, job_outputs={"results/big.bin": data}, first_task=3 * i + 1)
            for i, (n, data) in enumerate(contents.items())}
    procs = {n: _release_process(job, azurite, tmp_path / f"{n}.json") for n, job in jobs.items()}
    outs = {n: p.communicate(timeout=300) for n, p in procs.items()}
    codes = {n: p.returncode for n, p in procs.items()}
    raced = sum("big.bin was created meanwhile by another writer" in out for out, _err in outs.values())
    print(f"{raced} of {len(procs) - 1} nodes found the blob created while they were uploading it")
    container = container_name(job_id)
    client = _container(azurite, container)
    stored = client.download_blob("$JobOutput/results/big.bin").readall()
    props = client.get_blob_client("$JobOutput/results/big.bin").get_blob_properties()
    assert base64.b64encode(props.content_settings.content_md5).decode() == _md5(stored)
    winners = [n for n, data in contents.items() if data == stored]
    assert winners, "the blob holds bytes that no node had"
    reports = {n: report(tmp_path / f"{n}.json") for n in jobs}
    uploaded = [n for n, r in reports.items() if "$JobOutput/results/big.bin" in {u["name"] for u in r["uploaded"]}]
    assert len(uploaded) == 1 and uploaded[0] in winners  # created once
    if same:
        assert codes == {n: 0 for n in jobs}, {n: err for n, (_out, err) in outs.items()}
        assert all(r["conflicts"] == [] for r in reports.values())
    else:
        losers = sorted(set(jobs) - set(uploaded))
        assert codes == {n: (0 if n in uploaded else 10) for n in jobs}
        for n in losers:
            beside = f"jobrelease/{n}/$TaskOutput/$JobOutput/results/big.bin"
            assert [c["kept_as"] for c in reports[n]["conflicts"]] == [beside]
            assert client.download_blob(beside).readall() == contents[n]
    assert all(not job.node.job_dir.exists() for job in jobs.values())


# ---------------------------------------------------------------------------------------------------------------
# prep reads it back


def test_prep_of_an_earlier_jobs_output_by_job_id_twice(azurite: Azurite, tmp_path: Path) -> None:
    job_id = f"Stage_{uuid.uuid4().hex[:8]}"  # hashed container name: prep computes the same one
    outputs = {"results/model.bin": os.urandom(2 * 1024 * 1024 + 3), "results/summary.txt": b"numbers\n",
               "results/deep/er/part-0001.csv": b"a,b\n1,2\n"}
    earlier = _make_job(tmp_path / "earlier", job_id, job_outputs=outputs)
    conn = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
    run(_release_args(azurite.endpoint, tmp_path / "r.json"), earlier.env(**conn))

    node = BatchNode(tmp_path / "next", "stage-2")
    for d in (node.shared, node.prep_wd):
        d.mkdir(parents=True)
    source = f"prev=job:{job_id}@{azurite.endpoint}"
    rep = tmp_path / "prep.json"
    run(["prep", source, "--report", str(rep), "--progress-interval", "0"], node.env(**conn))
    landed = {p.relative_to(node.job_dir / "prev").as_posix(): p.read_bytes()
              for p in (node.job_dir / "prev").rglob("*") if p.is_file()}
    assert landed == outputs
    first = report(rep)
    assert first["downloaded"] == 3 and all(f["verified"] for f in first["files"])
    assert first["sources"][0]["source"] == f"{azurite.endpoint}/{container_name(job_id)}/$JobOutput"

    run(["prep", source, "--report", str(rep), "--progress-interval", "0"], node.env(**conn))
    second = report(rep)
    assert second["downloaded"] == 0 and second["skipped"] == 3

    # a task's output, by task id, lands the same way
    run(["prep", f"frames=job:{job_id}/task002@{azurite.endpoint}", "--progress-interval", "0"], node.env(**conn))
    assert (node.job_dir / "frames" / "out" / "frame-task002.csv").read_bytes() == b"frame,task002\n"


def test_release_refuses_what_the_layout_cannot_use(tmp_path: Path) -> None:
    job = _make_job(tmp_path / "node", "refuse-1")
    cases = [
        (["--upload-to", "https://acct.blob.core.windows.net"], "names a storage account but no container"),
        (["--upload-to", str(tmp_path / "k"), "--outputs", "*.csv"], "need --layout conventions"),
        (["--upload-to", "job:x@https://acct.blob.core.windows.net", "--layout", "conventions"],
         "a job: form is a source for prep"),
    ]
    for args, message in cases:
        result = run(["release", *args], job.env(), ok=False)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert job.node.job_dir.exists()


# ---------------------------------------------------------------------------------------------------------------
# the generator carries it; simulate shows it


def test_cmdline_carries_the_layout_into_both_command_lines_and_the_job(tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({
        "nodekit": 1, "job_id": "Stage_2", "pool_id": "pool",
        "prep": {"sources": ["prev=job:Stage_1@https://acct.blob.core.windows.net",
                             "frames=job:Stage_1/task007/$TaskOutput@https://acct.blob.core.windows.net"]},
        "release": {"upload_to": "https://acct.blob.core.windows.net", "layout": "conventions",
                    "outputs": ["out/*.csv"], "job_outputs": ["results/**"]}}))
    result = run(["cmdline", "--spec", str(spec), "--format", "job"], {})
    job = json.loads(result.stdout)
    prep_line, release_line = job["jobPreparationTask"]["commandLine"], job["jobReleaseTask"]["commandLine"]
    assert "prev=job:Stage_1@https://acct.blob.core.windows.net" in prep_line
    assert 'frames=job:Stage_1/task007/\\$TaskOutput@https://acct.blob.core.windows.net' in prep_line
    assert ("release --upload-to https://acct.blob.core.windows.net" in release_line and
            "--layout conventions --outputs \"out/*.csv\" --job-outputs \"results/**\"" in release_line)
    assert f"container {container_name('Stage_2')} of https://acct.blob.core.windows.net" in result.stderr
    # the same from options, as bare lines; each line splits back into what prep and release parse
    lines = run(["cmdline", "prev=job:Stage_1@https://acct.blob.core.windows.net", "--job-id", "Stage_2",
                 "--upload-to", "https://acct.blob.core.windows.net", "--layout", "conventions", "--outputs",
                 "out/*.csv", "--job-outputs", "results/**"], {}).stdout.splitlines()
    assert lines[1] == release_line and lines[0] == prep_line.replace(
        ' "frames=job:Stage_1/task007/\\$TaskOutput@https://acct.blob.core.windows.net"', "")
    import shlex

    inner = shlex.split(shlex.split(release_line)[2])  # bash -c 'exec "…/nodekit" release …'
    assert inner[2:] == ["release", "--upload-to", "https://acct.blob.core.windows.net", "--deadline", "720",
                         "--layout", "conventions", "--outputs", "out/*.csv", "--job-outputs", "results/**"]
    # what cannot work is refused before anything is printed
    for args, message in (
            (["--upload-to", "https://acct.blob.core.windows.net"], "names a storage account but no container"),
            (["--upload-to", "https://acct.blob.core.windows.net/logs", "--outputs", "*.csv"],
             "need --layout conventions"),
            (["--upload-to", "https://acct.blob.core.windows.net?sv=2024&sig=abc", "--layout", "conventions"],
             "a SAS token")):
        bad = run(["cmdline", "builtin:sample", "--job-id", "j", *args], {}, ok=False)
        assert bad.exit_code in (2, 6) and message in bad.stderr and bad.stdout == "", (args, bad.stderr)
    bad = run(["cmdline", "prev=job:j@https://acct.blob.core.windows.net?sv=2024&sig=abc", "--job-id", "j",
               "--upload-to", "/mnt/kept"], {}, ok=False)
    assert bad.exit_code == 6 and "a SAS token" in bad.stderr and "abc" not in bad.stderr


def test_simulate_shows_each_nodes_tree_in_the_layout(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    job_json = tmp_path / "job-add.json"
    job_json.write_text(run(["cmdline", "builtin:sample", "--job-id", "sim-conv", "--pool-id", "local",
                             "--upload-to", str(kept), "--layout", "conventions", "--outputs", "frame.txt",
                             "--format", "job"], {}).stdout)
    result = run(["simulate", str(job_json), "--nodes", "2", "--task-count", "4", "--root", str(tmp_path / "pool"),
                  "--task-command", "/bin/bash -c 'echo $AZ_BATCH_TASK_ID > frame.txt'"], {})
    folder = kept / "job-sim-conv"
    stored = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {f"task00{i}/$TaskOutput/frame.txt" for i in range(1, 5)} <= set(stored)
    assert result.stdout.count(f"objects in {folder} (conventions layout)") == 2
    assert f"    {folder}/" in result.stdout.splitlines()
    assert "    └── task004/" in result.stdout.splitlines() or "    ├── task004/" in result.stdout.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# killed at random moments


@pytest.mark.parametrize("kind", ["local", "azurite"])
def test_release_in_the_layout_killed_at_random_moments_then_run_again(kind: str, tmp_path: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    """SIGKILL at a random moment, then the run Batch would start after the reboot: exit 0, no conflict with the
    killed run's own objects (committed but not yet in its manifest), the same objects and manifest, byte for byte,
    as an uninterrupted run, and no temporary file left in a folder."""
    import random
    import shutil
    import time

    from conftest import BlobRemote, LocalRemote
    from test_kills import _kill_at_random, _release_env, _template
    from test_release import _objects

    template = tmp_path / "template"
    _template(template)

    def destination(i: int) -> Any:
        if kind == "local":
            return LocalRemote(tmp_path / f"dest-{i}")
        return BlobRemote(request.getfixturevalue("azurite"))  # a container of its own, given as the container

    def argv(dest: Any) -> list[str]:
        return [sys.executable, "-m", "nodekit", "release", "--upload-to", dest.url, "--layout", "conventions",
                "--logs", "**/*.log", "--outputs", "logs/*.log", "--wipe-task-dirs", "--deadline", "5m"]

    prefix = "job-job-1/" if kind == "local" else ""  # a folder holds the job's container folder
    manifest = "jobrelease/tvm-1/$TaskLog/nodekit-manifest.json"

    def stored(dest: Any) -> dict[str, Any]:
        """The objects, the manifest decoded but for the container's name (a new one per attempt)."""
        objects: dict[str, Any] = _objects(dest, prefix)
        objects[manifest] = {k: v for k, v in json.loads(objects[manifest]).items() if k != "container"}
        return objects
    ref = destination(-1)
    ref_node = tmp_path / "ref-node"
    shutil.copytree(template, ref_node, symlinks=True)
    began = time.monotonic()
    done = subprocess.run(argv(ref), env=_release_env(ref_node, ref), cwd=ROOT, capture_output=True, text=True)
    window = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    expected = stored(ref)
    assert "task002/$TaskLog/core.gz" in expected and expected[manifest]["complete"] is True

    rng = random.Random(17)
    killed = runs = 0
    while killed < 3 and runs < 12:  # at least 3 real kills, however loaded the machine is
        i, runs = runs, runs + 1
        node = tmp_path / f"node-{i}"
        shutil.copytree(template, node, symlinks=True)
        dest = destination(i)
        env = _release_env(node, dest)
        hit, window = _kill_at_random(argv(dest), env, rng, window)
        killed += hit
        again = subprocess.run(argv(dest), env=env, cwd=ROOT, capture_output=True, text=True)
        assert again.returncode == 0, f"attempt {i}: {again.stderr}"
        assert "conflict" not in again.stderr, f"attempt {i}: {again.stderr}"
        assert stored(dest) == expected, f"attempt {i}"
        if isinstance(dest, LocalRemote):
            assert not [p for p in dest.root.rglob("*") if p.name.endswith(".nodekit-partial")], f"attempt {i}"
        shutil.rmtree(node)
    print(f"release, conventions layout ({kind}): {killed} of {runs} runs killed; every re-run ended with the same "
          "objects")
    assert killed >= 3


def test_job_outputs_never_take_preps_records_nor_a_download_in_progress(azurite: Azurite, tmp_path: Path) -> None:
    job_id = f"Out{uuid.uuid4().hex[:8]}"
    job = _make_job(tmp_path / "node", job_id, job_outputs={"results/r.json": b"{}\n"})
    (job.node.job_dir / ".nodekit").mkdir()
    (job.node.job_dir / ".nodekit" / "state.json").write_text('{"files": {}}')
    (job.node.job_dir / "input" / ".late.bin.nodekit-partial").write_bytes(b"half")
    env = job.env(AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string)
    run(["release", "--upload-to", azurite.endpoint, "--layout", "conventions", "--job-outputs", "**"], env)
    outputs = sorted(_blobs(azurite, container_name(job_id), "$JobOutput/"))
    assert outputs == ["$JobOutput/input/data.bin", "$JobOutput/results/r.json"]


def test_a_dry_run_in_the_conventions_layout_lists_every_object_and_changes_nothing(tmp_path: Path) -> None:
    job = _make_job(tmp_path / "node", "DryConv1", dump=b"\0dump" * 100, job_outputs={"results/r.json": b"{}\n"})
    before = snapshot(tmp_path)
    out = run(["release", "--upload-to", str(tmp_path / "kept"), "--layout", "conventions", "--logs", "**/*.log",
               "--outputs", "out/*.csv", "--job-outputs", "results/**", "--dry-run"], job.env()).stdout
    for name in [*job.files, "task002/$TaskLog/core.gz"]:
        assert f"/{name} <- " in out, (name, out)
    assert snapshot(tmp_path) == before
