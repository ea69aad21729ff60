"""The node-level cache on a shared pool: reuse across jobs, isolation, a budget, kills, purge."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Azurite, BatchNode, BlobRemote, remote_env, tree
from faultproxy import FaultProxy
from helpers import report, run

from nodekit.cache import CACHE_DIR, NodeCache

MIB = 1024 * 1024


@pytest.fixture
def counting_proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    p = FaultProxy(azurite.port).start()  # no faults: it only counts what nodekit asks Azurite
    try:
        yield p
    finally:
        p.stop()


def _prep(node: BatchNode, url: str, job: str, tmp_path: Path, env: dict[str, str], *extra: str) -> dict:
    rep = tmp_path / f"{job}.json"
    run(["prep", f"in={url}", "--job-id", job, "--report", str(rep), "--progress-interval", "0", *extra],
        {**node.env(), **env})
    return report(rep)


def _objects(node: BatchNode) -> dict[str, int]:
    out = {}
    for p in (node.shared / CACHE_DIR / "objects").rglob("*"):
        if p.is_file() and not p.name.endswith(".json"):
            out[p.name] = os.stat(p).st_nlink
    return out


def test_second_job_with_90_percent_in_common_downloads_only_the_rest(
        counting_proxy: FaultProxy, blob_remote: BlobRemote, batch_node: BatchNode, tmp_path: Path) -> None:
    data = {f"d/f{i:02}.bin": os.urandom(2000 + i) for i in range(40)}
    data["big.bin"] = os.urandom(20 * MIB)  # ranged, no Content-MD5: cached by location and ETag
    for name, content in data.items():
        blob_remote.put(name, content, blocks=name == "big.bin")
    url = f"http://127.0.0.1:{counting_proxy.port}/devstoreaccount1/{blob_remote.container}"
    env = remote_env(blob_remote)
    first = _prep(batch_node, url, "job-a", tmp_path, env)
    assert first["downloaded"] == 41 and first["from_cache"] == 0
    changed = [f"d/f{i:02}.bin" for i in range(0, 40, 10)] + []  # 4 of 41 files: the 10% that differ
    for name in changed:
        data[name] = os.urandom(3000)
        blob_remote.put(name, data[name])
    before = len(counting_proxy.ranges)
    second = _prep(batch_node, url, "job-b", tmp_path, env)
    gets = sorted({p.rsplit("/", 1)[-1] for m, p, r in counting_proxy.ranges[before:]
                   if m == "GET" and p != f"/devstoreaccount1/{blob_remote.container}"})
    assert gets == sorted(n.rsplit("/", 1)[-1] for n in changed)  # Azurite was asked for exactly those
    assert (second["downloaded"], second["from_cache"]) == (4, 37)
    assert second["bytes_from_cache"] == sum(len(data[n]) for n in data if n not in changed)
    assert tree(batch_node.shared / "job-b") == {f"in/{k}": v for k, v in data.items()}
    # the same file is one inode: on disk once
    assert os.stat(batch_node.shared / "job-a" / "in" / "big.bin").st_ino == \
        os.stat(batch_node.shared / "job-b" / "in" / "big.bin").st_ino


def test_a_task_writing_into_an_input_does_not_change_what_the_next_job_gets(
        batch_node: BatchNode, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(b"the right bytes" * 1000)
    (src / "other.bin").write_bytes(b"other")
    _prep(batch_node, str(src), "job-1", tmp_path, {})
    victim = batch_node.shared / "job-1" / "in" / "model.bin"
    assert not os.stat(victim).st_mode & 0o222  # read-only: a non-root task cannot write into it
    with open(victim, "r+b") as fh:  # a root task can: it writes in place, into the shared inode
        fh.write(b"CORRUPTED")
    second = _prep(batch_node, str(src), "job-2", tmp_path, {})
    assert (batch_node.shared / "job-2" / "in" / "model.bin").read_bytes() == (src / "model.bin").read_bytes()
    assert second["downloaded"] == 1 and second["from_cache"] == 1  # the changed object was dropped
    again = _prep(batch_node, str(src), "job-1", tmp_path, {})  # and job 1's own copy is repaired,
    fixed = next(f for f in again["files"] if f["name"] == "in/model.bin")  # from job 2's fresh object
    assert fixed["action"] == "download" and "modified locally" in fixed["reason"] and fixed["from_cache"]
    assert victim.read_bytes() == (src / "model.bin").read_bytes()


def test_the_budget_holds_and_files_in_use_are_never_evicted(batch_node: BatchNode, tmp_path: Path) -> None:
    sources = {}
    for job in ("a", "b", "c"):
        src = tmp_path / f"src-{job}"
        src.mkdir()
        for i in range(10):
            (src / f"{job}{i}.bin").write_bytes(os.urandom(MIB))
        sources[job] = src
    budget = ["--cache-max-size", "15M"]
    cache = NodeCache(batch_node.shared, 15 * MIB)

    _prep(batch_node, str(sources["a"]), "job-a", tmp_path, {}, *budget)
    assert cache.usage() <= 15 * MIB
    a_objects = set(_objects(batch_node))
    assert len(a_objects) == 10

    rep = _prep(batch_node, str(sources["b"]), "job-b", tmp_path, {}, *budget)
    assert cache.usage() <= 15 * MIB
    assert a_objects <= set(_objects(batch_node))  # job a still uses them: none evicted
    assert rep["cache"]["not_cached"] == 5  # 5 of job b's files fit beside a's 10 MiB; the rest stay uncached
    assert len(tree(batch_node.shared / "job-b")) == 10

    dest = tmp_path / "kept"
    run(["release", "--upload-to", str(dest), "--job-id", "job-a", "--node-id", "tvm-1"], batch_node.env())
    rep = _prep(batch_node, str(sources["c"]), "job-c", tmp_path, {}, *budget)
    assert cache.usage() <= 15 * MIB
    assert rep["cache"]["evicted"] == 10  # job a is gone: its objects made room for job c's
    assert all(nlink > 1 for nlink in _objects(batch_node).values())  # what stays is in use by job c


def test_kills_at_random_points_never_lead_to_a_wrong_file(batch_node: BatchNode, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(1500):  # many files: filling the cache takes a while, so kills land in it too
        (src / f"s{i:04}.bin").write_bytes(os.urandom(500 + i))
    (src / "big.bin").write_bytes(os.urandom(16 * MIB))
    expected = {f"in/{p.name}": p.read_bytes() for p in src.iterdir()}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))},
           **batch_node.env()}

    def start(job: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "nodekit", "prep", f"in={src}", "--job-id", job,
                                 "--progress-interval", "0"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    clean = tmp_path / "clean-node"  # uninterrupted runs on a node of their own, to time the windows
    clean.mkdir()
    windows = []
    for job in ("cold", "warm"):  # an empty cache: downloads and a fill; a full one: placements
        began = time.monotonic()
        assert subprocess.run([sys.executable, "-m", "nodekit", "prep", f"in={src}", "--shared-dir", str(clean),
                               "--job-id", job], env=env, cwd=ROOT, capture_output=True).returncode == 0
        windows.append(time.monotonic() - began)
    rng = random.Random(20261124)
    killed = 0
    for i in range(20):
        if i % 2 == 0:
            shutil.rmtree(batch_node.shared / CACHE_DIR, ignore_errors=True)
        proc = start(f"kill-{i}")
        time.sleep(rng.uniform(0.05, 0.95) * windows[i % 2])
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        # a later prep of another job must get exactly the right bytes, from the cache or not
        run(["prep", f"in={src}", "--job-id", f"check-{i}", "--progress-interval", "0"], batch_node.env())
        assert tree(batch_node.shared / f"check-{i}") == expected, f"run {i}"
        run(["prep", f"in={src}", "--job-id", f"kill-{i}", "--progress-interval", "0"], batch_node.env())
        assert tree(batch_node.shared / f"kill-{i}") == expected, f"run {i}"
        shutil.rmtree(batch_node.shared / f"check-{i}")
        shutil.rmtree(batch_node.shared / f"kill-{i}")
    assert killed >= 15  # the runs were really cut short, at points spread over the whole run
    leftovers = [p for p in (batch_node.shared / CACHE_DIR).rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_files_placed_from_the_cache_but_not_recorded_are_taken_as_they_are(batch_node: BatchNode,
                                                                           tmp_path: Path) -> None:
    """What a kill between placing from the cache and journalling leaves: links with no record."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}.bin").write_bytes(os.urandom(100 + i))
    _prep(batch_node, str(src), "job-1", tmp_path, {})
    _prep(batch_node, str(src), "job-2", tmp_path, {})  # from the cache: hard links
    (batch_node.shared / "job-2" / ".nodekit" / "state.json").unlink()  # as if killed before recording
    rep = _prep(batch_node, str(src), "job-2", tmp_path, {})
    assert rep["from_cache"] == 30
    assert not list((batch_node.shared / "job-2").rglob("*.nodekit-partial"))  # rename(a, a) left nothing
    assert tree(batch_node.shared / "job-2") == {f"in/{p.name}": p.read_bytes() for p in src.iterdir()}


def test_release_leaves_other_jobs_and_the_cache_and_purge_removes_only_the_cache(
        batch_node: BatchNode, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 5000)
    for job in ("job-1", "job-2"):
        _prep(batch_node, str(src), job, tmp_path, {})
    other = batch_node.shared / "not-nodekit.txt"
    other.write_text("something else in the shared folder")
    objects = _objects(batch_node)
    dest = tmp_path / "kept"
    run(["release", "--upload-to", str(dest), "--job-id", "job-1", "--node-id", "tvm-1"], batch_node.env())
    assert not (batch_node.shared / "job-1").exists()
    assert tree(batch_node.shared / "job-2") == {"in/a.bin": b"a" * 5000}
    assert set(_objects(batch_node)) == set(objects)
    run(["release", "--upload-to", str(dest), "--job-id", "job-2", "--node-id", "tvm-1", "--purge-cache"],
        batch_node.env())
    assert not (batch_node.shared / CACHE_DIR).exists()
    assert other.read_text() == "something else in the shared folder"
    assert sorted(p.name for p in batch_node.shared.iterdir()) == ["not-nodekit.txt"]


def test_no_cache_leaves_no_trace(batch_node: BatchNode, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    rep = _prep(batch_node, str(src), "job-1", tmp_path, {}, "--no-cache")
    assert rep["cache"] is None and not (batch_node.shared / CACHE_DIR).exists()
    assert os.stat(batch_node.shared / "job-1" / "in" / "a.bin").st_mode & 0o200  # writable, as it came
    bad = run(["prep", f"in={src}", "--job-id", "job-2", "--cache-max-size", "lots"], batch_node.env(), ok=False)
    assert bad.exit_code == 2 and "--cache-max-size" in bad.stderr
