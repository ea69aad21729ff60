"""The simulator's Batch rules that no other test exercises: each one through `nodekit simulate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_simulate import _job, _node, _simulate

SHARED_FLAG = '"$AZ_BATCH_NODE_SHARED_DIR/prep-finished"'


def test_no_rerun_after_a_reboot_when_rerun_on_node_reboot_after_success_is_false(tmp_path: Path) -> None:
    prep = "/bin/bash -c 'echo ran >> \"$AZ_BATCH_NODE_SHARED_DIR/prep-runs\"'"
    job = _job(tmp_path, prep, rerunOnNodeRebootAfterSuccess=False)
    summary, result = _simulate(tmp_path, job, "--nodes", "1", "--task-count", "3", "--task-command", "/bin/true",
                                "--reboot", "tvm-1:1")
    node = _node(summary, "tvm-1")
    assert "tvm-1: rebooting (simulated)" in result.stdout
    assert node["preparation"]["runs"] == 1 and node["preparation"]["exit_code"] == 0
    assert (tmp_path / "pool" / "tvm-1" / "shared" / "prep-runs").read_text() == "ran\n"
    assert [t["exit_code"] for t in summary["tasks"]] == [0, 0, 0]


def test_a_failed_preparation_runs_again_after_a_reboot_even_when_rerun_is_false(tmp_path: Path) -> None:
    """Batch re-runs a preparation task that had not succeeded after a reboot, whatever the flag says;
    with waitForSuccess false the node ran a task meanwhile, which is what brings the reboot."""
    prep = "/bin/bash -c 'echo ran >> \"$AZ_BATCH_NODE_SHARED_DIR/prep-runs\"; exit 3'"
    job = _job(tmp_path, prep, rerunOnNodeRebootAfterSuccess=False, waitForSuccess=False)
    summary, _ = _simulate(tmp_path, job, "--nodes", "1", "--task-count", "2", "--task-command", "/bin/sleep 0.5",
                           "--reboot", "tvm-1:1")
    assert _node(summary, "tvm-1")["preparation"]["runs"] == 2
    assert (tmp_path / "pool" / "tvm-1" / "shared" / "prep-runs").read_text() == "ran\nran\n"


def test_the_preparation_task_is_killed_at_its_wall_clock_limit_and_the_node_runs_no_task(tmp_path: Path) -> None:
    job = _job(tmp_path, "/bin/sleep 60", constraints={"maxWallClockTime": "PT10M", "maxTaskRetryCount": 2})
    summary, result = _simulate(tmp_path, job, "--nodes", "1", "--task-count", "2", "--task-command", "/bin/true",
                                "--time-scale", "0.001")  # 10 minutes become 0.6 s
    prep = _node(summary, "tvm-1")["preparation"]
    assert (prep["failure"], prep["exit_code"]) == ("maxWallClockTime exceeded", -9)
    assert prep["retries"] == 0 and prep["duration_s"] < 5  # a kill at the limit is not retried
    assert _node(summary, "tvm-1")["tasks"] == 0
    assert [t["failure"] for t in summary["tasks"]] == ["not run: no node could run it"] * 2
    assert "Prep task exit code:    -9 (maxWallClockTime exceeded)" in result.stdout
    assert "tvm-1: the preparation task failed (exit -9, maxWallClockTime exceeded)" in result.stdout


def test_with_wait_for_success_false_tasks_start_before_the_preparation_ends_even_if_it_fails(
        tmp_path: Path) -> None:
    prep = f"/bin/bash -c 'sleep 0.5; touch {SHARED_FLAG}; exit 3'"
    job = _job(tmp_path, prep, waitForSuccess=False)
    # each task checks that the preparation task has not finished yet when it starts
    task = f"/bin/bash -c 'test ! -e {SHARED_FLAG} && sleep 1'"
    summary, result = _simulate(tmp_path, job, "--nodes", "1", "--task-count", "2", "--task-command", task)
    assert [t["exit_code"] for t in summary["tasks"]] != [] and summary["tasks"][0]["exit_code"] == 0
    assert _node(summary, "tvm-1")["tasks"] == 2
    assert _node(summary, "tvm-1")["preparation"]["exit_code"] == 3  # it failed, and the node ran the tasks
    assert "no task of this job runs on this node" not in result.stdout


def _tasks_file(tmp_path: Path, tasks: list[dict[str, Any]]) -> Path:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"value": tasks}))
    return path


def _meet(me: str, other: str) -> str:
    """A task that leaves its mark, then succeeds only if `other` leaves its own within 2.5 s."""
    return (f"/bin/bash -c 'touch \"$AZ_BATCH_NODE_SHARED_DIR/{me}\"; for i in $(seq 25); do "
            f"[ -e \"$AZ_BATCH_NODE_SHARED_DIR/{other}\" ] && exit 0; sleep 0.1; done; exit 1'")


def test_slots_run_tasks_of_one_node_at_the_same_time(tmp_path: Path) -> None:
    tasks = _tasks_file(tmp_path, [{"id": "left", "commandLine": _meet("left", "right")},
                                   {"id": "right", "commandLine": _meet("right", "left")}])
    job = _job(tmp_path, "/bin/true")
    summary, _ = _simulate(tmp_path, job, "--nodes", "1", "--slots", "2", "--tasks", str(tasks))
    assert {t["task"]: t["exit_code"] for t in summary["tasks"]} == {"left": 0, "right": 0}
    assert _node(summary, "tvm-1")["tasks"] == 2


def test_one_slot_runs_them_one_after_the_other(tmp_path: Path) -> None:
    tasks = _tasks_file(tmp_path, [{"id": "left", "commandLine": _meet("left", "right")},
                                   {"id": "right", "commandLine": _meet("right", "left")}])
    job = _job(tmp_path, "/bin/true")
    summary, _ = _simulate(tmp_path, job, "--nodes", "1", "--slots", "1", "--tasks", str(tasks))
    assert sorted(t["exit_code"] for t in summary["tasks"]) == [0, 1]  # the first waited for nobody


def test_tasks_file_settings_and_simulate_env_reach_each_task(tmp_path: Path) -> None:
    printenv = "/bin/bash -c 'echo \"$POOL_WIDE $OWN\"'"
    tasks = _tasks_file(tmp_path, [
        {"id": "alpha", "commandLine": printenv, "environmentSettings": [{"name": "OWN", "value": "a-value"}]},
        {"id": "beta", "commandLine": printenv},
        {"id": "flaky", "commandLine": "/bin/bash -c 'n=$(cat n 2>/dev/null || echo 0); echo $((n+1)) > n; "
                                       "[ \"$n\" -ge 1 ]'", "constraints": {"maxTaskRetryCount": 1}},
    ])
    job = _job(tmp_path, "/bin/bash -c 'echo \"$POOL_WIDE\" > seen-by-prep'")
    summary, _ = _simulate(tmp_path, job, "--nodes", "1", "--tasks", str(tasks), "--env", "POOL_WIDE=from-the-pool")
    work = tmp_path / "pool" / "tvm-1" / "workitems" / "simjob" / "job-1"
    assert (work / "alpha" / "stdout.txt").read_text() == "from-the-pool a-value\n"
    assert (work / "beta" / "stdout.txt").read_text() == "from-the-pool \n"
    assert (work / "jobpreparation" / "wd" / "seen-by-prep").read_text() == "from-the-pool\n"
    flaky = next(t for t in summary["tasks"] if t["task"] == "flaky")
    assert (flaky["exit_code"], flaky["retries"]) == (0, 1)  # its own maxTaskRetryCount
    assert sorted(t["task"] for t in summary["tasks"]) == ["alpha", "beta", "flaky"]
