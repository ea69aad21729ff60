"""nodekit simulate follows Batch's rules; nodekit demo re-enacts the JobPrepRelease sample."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from conftest import Azurite
from helpers import run


def _job(tmp_path: Path, prep: str, release: str = "/bin/true", **prep_extra: Any) -> Path:
    constraints = prep_extra.pop("constraints", {})
    job = {"id": "simjob", "poolInfo": {"poolId": "p"},
           "jobPreparationTask": {"commandLine": prep, "constraints": constraints, **prep_extra},
           "jobReleaseTask": {"commandLine": release}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path


def _simulate(tmp_path: Path, job: Path, *args: str, ok: bool = True) -> tuple[dict[str, Any], Any]:
    summary = tmp_path / "summary.json"
    result = run(["simulate", str(job), "--root", str(tmp_path / "pool"), "--summary", str(summary), *args], {},
                 ok=ok)
    return json.loads(summary.read_text()), result


def _node(summary: dict[str, Any], node: str) -> dict[str, Any]:
    return next(n for n in summary["nodes"] if n["node"] == node)


def test_preparation_fails_twice_then_succeeds_within_its_retries(tmp_path: Path) -> None:
    prep = "/bin/bash -c 'n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; [ \"$n\" -ge 2 ]'"
    job = _job(tmp_path, prep, constraints={"maxTaskRetryCount": 2})
    summary, _ = _simulate(tmp_path, job, "--nodes", "1", "--task-count", "2", "--task-command", "/bin/true")
    p = _node(summary, "tvm-1")["preparation"]
    assert (p["exit_code"], p["retries"]) == (0, 2)
    assert [t["exit_code"] for t in summary["tasks"]] == [0, 0]


def test_a_node_whose_preparation_always_fails_runs_no_task(tmp_path: Path) -> None:
    job = _job(tmp_path, "/bin/bash -c '[ \"$AZ_BATCH_NODE_ID\" != tvm-1 ]'", constraints={"maxTaskRetryCount": 1})
    summary, result = _simulate(tmp_path, job, "--nodes", "2", "--task-count", "4", "--task-command",
                                "/bin/sleep 0.05")
    assert _node(summary, "tvm-1")["preparation"]["exit_code"] == 1
    assert _node(summary, "tvm-1")["preparation"]["retries"] == 1
    assert _node(summary, "tvm-1")["tasks"] == 0
    assert {t["node"] for t in summary["tasks"]} == {"tvm-2"} and len(summary["tasks"]) == 4
    assert "tvm-1: the preparation task failed" in result.stdout


def test_the_release_task_is_killed_at_its_wall_clock_limit(tmp_path: Path) -> None:
    job = json.loads(_job(tmp_path, "/bin/true", "/bin/sleep 60").read_text())
    job["jobReleaseTask"]["maxWallClockTime"] = "PT10M"
    path = tmp_path / "job2.json"
    path.write_text(json.dumps(job))
    started = time.monotonic()
    summary, result = _simulate(tmp_path, path, "--nodes", "1", "--task-count", "1", "--task-command", "/bin/true",
                                "--time-scale", "0.001")  # 10 minutes become 0.6 s
    release = _node(summary, "tvm-1")["release"]
    assert release["failure"] == "maxWallClockTime exceeded"
    assert release["exit_code"] == -9
    assert time.monotonic() - started < 10
    assert "Release task exit code: -9 (maxWallClockTime exceeded)" in result.stdout


def test_a_node_that_got_no_task_runs_neither_preparation_nor_release(tmp_path: Path) -> None:
    job = _job(tmp_path, "/bin/true")
    summary, _ = _simulate(tmp_path, job, "--nodes", "3", "--task-count", "1", "--task-command", "/bin/true")
    ran = [n for n in summary["nodes"] if n["preparation"] is not None]
    idle = [n for n in summary["nodes"] if n["preparation"] is None]
    assert len(ran) == 1 and len(idle) == 2
    for n in idle:
        assert n["release"] is None
        assert not (tmp_path / "pool" / n["node"] / "workitems").exists()
    assert ran[0]["release"]["exit_code"] == 0


def test_generated_job_runs_unchanged_and_a_reboot_reruns_prep_which_downloads_nothing(tmp_path: Path) -> None:
    gen = run(["cmdline", "builtin:sample", "--job-id", "gen-job", "--pool-id", "p1", "--upload-to",
               str(tmp_path / "kept"), "--format", "job"], {})
    job = tmp_path / "generated.json"
    job.write_text(gen.stdout)  # exactly what the generator printed
    task = "/bin/bash -c 'test -s \"$AZ_BATCH_NODE_SHARED_DIR/$AZ_BATCH_JOB_ID/sample/reference/model.json\"'"
    summary, _ = _simulate(tmp_path, job, "--nodes", "1", "--task-count", "3", "--task-command", task,
                           "--reboot", "tvm-1:1")
    node = _node(summary, "tvm-1")
    assert node["preparation"]["runs"] == 2 and node["preparation"]["exit_code"] == 0
    assert [t["exit_code"] for t in summary["tasks"]] == [0, 0, 0]
    prep_dir = tmp_path / "pool" / "tvm-1" / "workitems" / "gen-job" / "job-1" / "jobpreparation"
    assert len(re.findall(r"^prep: ", (prep_dir / "stdout.txt").read_text(), re.M)) == 2
    second = json.loads((prep_dir / "wd" / "nodekit-prep.json").read_text())
    assert (second["downloaded"], second["skipped"]) == (0, 6)
    assert node["release"]["exit_code"] == 0
    assert not (tmp_path / "pool" / "tvm-1" / "shared" / "gen-job").exists()
    assert (tmp_path / "kept" / "gen-job" / "tvm-1" / "manifest.json").exists()


def test_shell_syntax_without_a_shell_is_not_expanded(tmp_path: Path) -> None:
    job = _job(tmp_path, "/bin/true")
    _summary, result = _simulate(tmp_path, job, "--nodes", "1", "--task-count", "1", "--task-command",
                                "echo $HOME > x")
    task_dir = tmp_path / "pool" / "tvm-1" / "workitems" / "simjob" / "job-1" / "task001"
    assert (task_dir / "stdout.txt").read_text() == "$HOME > x\n"  # echo got three literal arguments
    assert not (task_dir / "wd" / "x").exists()
    assert "without a shell" in result.stderr and "/bin/bash -c" in result.stderr


def test_the_task_environment_is_batchs(tmp_path: Path) -> None:
    job = _job(tmp_path, "/bin/true")
    _simulate(tmp_path, job, "--nodes", "1", "--task-count", "1", "--task-command", "/usr/bin/env")
    env = dict(line.split("=", 1) for line in (tmp_path / "pool" / "tvm-1" / "workitems" / "simjob" / "job-1" /
                                               "task001" / "stdout.txt").read_text().splitlines())
    node = tmp_path / "pool" / "tvm-1"
    assert env["AZ_BATCH_NODE_SHARED_DIR"] == str(node / "shared")
    assert env["AZ_BATCH_TASK_WORKING_DIR"] == str(node / "workitems" / "simjob" / "job-1" / "task001" / "wd")
    assert env["AZ_BATCH_JOB_PREP_WORKING_DIR"] == str(node / "workitems" / "simjob" / "job-1" / "jobpreparation"
                                                       / "wd")
    assert (env["AZ_BATCH_JOB_ID"], env["AZ_BATCH_TASK_ID"], env["AZ_BATCH_NODE_ID"]) == ("simjob", "task001",
                                                                                        "tvm-1")


def _demo_blocks(stdout: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    for m in re.finditer(r"on (tvm-\d):\n-+\n((?:.+\n)+)", stdout):
        lines = m.group(2).splitlines()
        assert lines[0] == f"{m.group(1)} tasks:"
        blocks[m.group(1)] = [line.strip() for line in lines[1:]]
    return blocks


def test_demo(tmp_path: Path) -> None:
    result = run(["demo", "--root", str(tmp_path / "demo")], {})
    blocks = _demo_blocks(result.stdout)
    all_ids = sorted(t for ids in blocks.values() for t in ids)
    assert all_ids == [f"task{i:03d}" for i in range(1, 9)]  # every task id exactly once over both nodes
    assert result.stdout.count("Prep task exit code:    0") == len(blocks)
    assert result.stdout.count("Release task exit code: 0") == len(blocks)
    assert "Job data left in the nodes' shared folders: none" in result.stdout
    for node in ("tvm-1", "tvm-2"):
        assert not (tmp_path / "demo" / "nodes" / node / "shared" / "JobPrepReleaseSampleJob").exists()
    _kept_in_the_layout(result.stdout, tmp_path / "demo" / "storage" / "job-jobprepreleasesamplejob", blocks)
    again = run(["demo", "--root", str(tmp_path / "demo")], {}, ok=False)
    assert again.exit_code == 2 and "is not empty" in again.stderr


def test_demo_against_azurite(tmp_path: Path, azurite: Azurite) -> None:
    result = run(["demo", "--root", str(tmp_path / "demo"), "--azurite", f"http://127.0.0.1:{azurite.port}"], {})
    blocks = _demo_blocks(result.stdout)
    assert sorted(t for ids in blocks.values() for t in ids) == [f"task{i:03d}" for i in range(1, 9)]
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        "job-jobprepreleasesamplejob")  # the Batch File Conventions container of the sample's job id
    names = {b.name for b in client.list_blobs()}
    assert names == _layout(blocks)
    assert client.download_blob("task001/$TaskOutput/frame.txt").readall().startswith(b"frame of task001")
    assert f"Logs kept in: {azurite.endpoint}/job-jobprepreleasesamplejob" in result.stdout


def _layout(blocks: dict[str, list[str]]) -> set[str]:
    """What the demo's release keeps: every task's logs and frame, the job's results, each node's prep logs."""
    tasks = [f"task{i:03d}" for i in range(1, 9)]
    return ({f"{t}/$TaskLog/{f}" for t in tasks for f in ("stdout.txt", "stderr.txt")} |
            {f"{t}/$TaskOutput/frame.txt" for t in tasks} | {f"$JobOutput/results/{t}.txt" for t in tasks} |
            {f"jobpreparation/{n}/$TaskLog/{f}" for n in blocks for f in ("stdout.txt", "stderr.txt")} |
            {f"jobrelease/{n}/$TaskLog/nodekit-manifest.json" for n in blocks})


def _kept_in_the_layout(stdout: str, folder: Path, blocks: dict[str, list[str]]) -> None:
    assert f"Logs kept in: {folder}" in stdout.splitlines()
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == _layout(blocks)
    assert f"{folder}/" in stdout.splitlines() and "├── $JobOutput/" in stdout.splitlines()  # the tree is shown


def test_a_task_taken_by_a_node_whose_preparation_failed_goes_to_another_node(tmp_path: Path) -> None:
    """Batch's rule: the other nodes take it. tvm-1 fails its preparation slowly, after tvm-2 found the queue empty."""
    job = _job(tmp_path, "/bin/bash -c 'if [ \"$AZ_BATCH_NODE_ID\" = tvm-1 ]; then sleep 0.5; exit 1; fi'")
    summary, result = _simulate(tmp_path, job, "--nodes", "2", "--task-count", "2", "--task-command",
                                "/bin/sleep 0.05")
    assert [(t["task"], t["node"], t["exit_code"]) for t in summary["tasks"]] == [
        ("task001", "tvm-2", 0), ("task002", "tvm-2", 0)]
    assert _node(summary, "tvm-1")["tasks"] == 0
    assert "not run" not in result.stdout


def _outside(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "pool" not in p.parts)


def test_ids_are_checked_as_batch_checks_them_and_nothing_is_written_outside_root(tmp_path: Path) -> None:
    bad_job = tmp_path / "bad-job.json"
    bad_job.write_text(json.dumps({"id": "../../escaped", "jobPreparationTask": {"commandLine": "/bin/true"}}))
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"value": [{"id": "../../../escaped-task", "commandLine": "/bin/true"}]}))
    good_job = _job(tmp_path, "/bin/true")
    before = _outside(tmp_path)
    for args, message in (
            ([str(bad_job), "--task-count", "1", "--task-command", "/bin/true"],
             "job JSON: the job id '../../escaped' is not a valid Batch id"),
            ([str(good_job), "--tasks", str(tasks)], "tasks JSON: item 0's id '../../../escaped-task' is not a valid"),
            ([str(good_job), "--task-count", "1", "--task-command", "/bin/true", "--reboot", "tvm-9:1"],
             "--reboot tvm-9: there is no such node (the pool has tvm-1, tvm-2)")):
        result = run(["simulate", *args, "--root", str(tmp_path / "pool")], {}, ok=False)
        assert result.exit_code == 2, result.stderr
        assert message in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
        assert _outside(tmp_path) == before
    tasks.write_text(json.dumps({"value": [{"id": "t1", "commandLine": "/bin/true"},
                                           {"id": "T1", "commandLine": "/bin/true"}]}))
    result = run(["simulate", str(good_job), "--tasks", str(tasks)], {}, ok=False)
    assert result.exit_code == 2 and "task id 'T1' is given twice" in result.stderr
