"""Issue 16: release and prep killed (SIGKILL) at random moments, then run again: byte-identical results,
nothing lost. Each kill is counted only if the process was still running when it was sent.

Batch re-runs a release task interrupted by a reboot, and a preparation task after a reboot or a
recovery: both must finish the job they were doing, from wherever the kill left it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, Azurite, BatchNode, BlobRemote, LocalRemote, Remote, remote_env, tree
from helpers import report, run
from test_release import _objects

MIB = 1024 * 1024
KILLS = 10  # real kills wanted (the process still running when SIGKILL was sent)
ATTEMPTS = 24  # at most this many runs: one that finished first makes the next kill come earlier
_BASE = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}


def _template(root: Path) -> None:
    """A node after a job: five tasks' logs (a few MiB to archive), two dumps, the job's input."""
    rng = random.Random(16)
    work = root / "workitems" / "job-1" / "job-1"
    for task in ("jobpreparation", "task001", "task002", "task003", "task004"):
        (work / task / "wd" / "logs").mkdir(parents=True)
        (work / task / "stdout.txt").write_text(f"{task} out\n" * 1000)
        (work / task / "stderr.txt").write_text(f"{task} err\n")
        lines = "".join(f"{i} {rng.random()} {task} step done\n" for i in range(40_000))
        (work / task / "wd" / "logs" / "app.log").write_text(lines)
    page = os.urandom(64 * 1024)
    (work / "task002" / "wd" / "core").write_bytes(b"".join(page if i % 3 else bytes(64 * 1024) for i in range(384)))
    (work / "task004" / "wd" / "crash.dmp").write_bytes(os.urandom(2 * MIB))
    (work / "jobrelease" / "wd").mkdir(parents=True)
    (root / "shared" / "job-1" / "in").mkdir(parents=True)
    (root / "shared" / "job-1" / "in" / "data.bin").write_bytes(os.urandom(MIB))


def _destination(kind: str, tmp_path: Path, i: int, request: pytest.FixtureRequest) -> Remote:
    if kind == "local":
        return LocalRemote(tmp_path / f"dest-{i}")
    return BlobRemote(request.getfixturevalue("azurite"))


def _release_argv(remote: Remote) -> list[str]:
    return [sys.executable, "-m", "nodekit", "release", "--upload-to", remote.url, "--logs", "**/*.log",
            "--wipe-task-dirs", "--deadline", "5m"]


def _release_env(node: Path, remote: Remote) -> dict[str, str]:
    own = node / "workitems" / "job-1" / "job-1" / "jobrelease"
    return {**_BASE, "AZ_BATCH_NODE_ROOT_DIR": str(node), "AZ_BATCH_NODE_SHARED_DIR": str(node / "shared"),
            "AZ_BATCH_JOB_ID": "job-1", "AZ_BATCH_NODE_ID": "tvm-1", "AZ_BATCH_TASK_ID": "jobrelease",
            "AZ_BATCH_TASK_DIR": str(own), "AZ_BATCH_TASK_WORKING_DIR": str(own / "wd"), **remote_env(remote)}


def _kill_at_random(argv: list[str], env: dict[str, str], rng: random.Random, window: float) -> tuple[bool, float]:
    """Start nodekit, SIGKILL it at a random moment of `window` seconds: (killed, the window for next time)."""
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.05, 0.95) * window)
    hit = proc.poll() is None
    if hit:
        proc.send_signal(signal.SIGKILL)
    else:
        window *= 0.8  # this machine runs faster now than when the window was timed
    proc.wait()
    return hit, window


@pytest.mark.parametrize("kind", ["local", "azurite"])
def test_release_killed_at_random_moments_then_run_again_keeps_everything(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    template = tmp_path / "template"
    _template(template)
    # an uninterrupted run: what storage must hold in the end, and how long a run takes
    ref_node = tmp_path / "ref-node"
    shutil.copytree(template, ref_node, symlinks=True)
    ref_dest = _destination(kind, tmp_path, -1, request)
    began = time.monotonic()
    done = subprocess.run(_release_argv(ref_dest), env=_release_env(ref_node, ref_dest), cwd=ROOT,
                          capture_output=True, text=True)
    window = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    expected = _objects(ref_dest, "job-1/tvm-1/")
    assert sorted(expected) == ["dumps/job-1/task002/wd/core.gz", "dumps/job-1/task004/wd/crash.dmp.gz",
                                "logs.tar.gz", "manifest.json"]

    rng = random.Random(20261129)
    killed = stored_part = wiped_part = attempts = 0
    for i in range(ATTEMPTS):
        if killed >= KILLS + 2:
            break
        attempts += 1
        node = tmp_path / f"node-{i}"
        shutil.copytree(template, node, symlinks=True)  # the same files, the same times
        dest = _destination(kind, tmp_path, i, request)
        env = _release_env(node, dest)
        hit, window = _kill_at_random(_release_argv(dest), env, rng, window)
        killed += hit
        if _objects(dest, "job-1/tvm-1/"):
            stored_part += 1
        if not (node / "shared" / "job-1").exists():
            wiped_part += 1
        again = subprocess.run(_release_argv(dest), env=env, cwd=ROOT, capture_output=True, text=True)
        assert again.returncode == 0, f"attempt {i}: {again.stderr}"
        assert _objects(dest, "job-1/tvm-1/") == expected, f"attempt {i}"  # byte-identical, manifest included
        assert not (node / "shared" / "job-1").exists(), f"attempt {i}"
        assert not list((node / "workitems" / "job-1" / "job-1").glob("task*/wd")), f"attempt {i}"
        if isinstance(dest, LocalRemote):
            assert not [p for p in dest.root.rglob("*") if p.name.endswith(".nodekit-partial")], f"attempt {i}"
        shutil.rmtree(node)
    print(f"release ({kind}): {killed} of {attempts} runs killed; {stored_part} had stored something, "
          f"{wiped_part} had wiped, before the kill; every re-run ended with the same objects")
    assert killed >= KILLS  # the runs were really cut short
    assert stored_part >= 1  # and some kills landed mid-upload, not only during start-up


def test_prep_killed_at_random_moments_then_run_again_lands_the_same_bytes(
        blob_remote: BlobRemote, batch_node: BatchNode, tmp_path: Path, azurite: Azurite) -> None:
    expected = {}
    for i in range(300):
        data = os.urandom(2000 + 37 * i)
        blob_remote.put(f"small/f{i:03}.bin", data)
        expected[f"in/small/f{i:03}.bin"] = data
    big = os.urandom(40 * MIB)
    blob_remote.put("big.bin", big, blocks=True)  # no Content-MD5: parallel ranges
    expected["in/big.bin"] = big
    env = {**_BASE, **batch_node.env(**remote_env(blob_remote))}

    def argv(job: str) -> list[str]:
        return [sys.executable, "-m", "nodekit", "prep", f"in={blob_remote.url}", "--job-id", job,
                "--progress-interval", "0"]

    began = time.monotonic()
    assert subprocess.run(argv("clean"), env=env, cwd=ROOT, capture_output=True).returncode == 0
    window = time.monotonic() - began
    shutil.rmtree(batch_node.shared / ".nodekit-cache")  # each attempt downloads for real
    rng = random.Random(16)
    killed = partial_left = attempts = 0
    for i in range(ATTEMPTS):
        if killed >= KILLS + 2:
            break
        attempts += 1
        job = f"kill-{i}"
        hit, window = _kill_at_random(argv(job), env, rng, window)
        killed += hit
        job_dir = batch_node.shared / job
        if job_dir.exists() and tree(job_dir) != expected:
            partial_left += 1
            for name, data in tree(job_dir).items():  # never a wrong file under a final name
                if not name.endswith(".nodekit-partial"):
                    assert data == expected[name], f"attempt {i}: {name}"
        rep = tmp_path / f"{job}.json"
        run(["prep", f"in={blob_remote.url}", "--job-id", job, "--progress-interval", "0", "--report", str(rep)],
            batch_node.env(**remote_env(blob_remote)))
        assert tree(job_dir) == expected, f"attempt {i}"
        assert not list(job_dir.rglob("*.nodekit-partial"))
        assert report(rep)["failed"] == 0
        run(["prep", f"in={blob_remote.url}", "--job-id", job, "--progress-interval", "0", "--report", str(rep)],
            batch_node.env(**remote_env(blob_remote)))
        assert report(rep)["downloaded"] == 0 and report(rep)["skipped"] == len(expected)  # recorded, trusted
        shutil.rmtree(job_dir)
        shutil.rmtree(batch_node.shared / ".nodekit-cache", ignore_errors=True)
    print(f"prep: {killed} of {attempts} runs killed, {partial_left} left a part of the job folder; every re-run "
          "landed the same bytes")
    assert killed >= KILLS
    assert partial_left >= 1
