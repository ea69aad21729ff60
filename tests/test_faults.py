"""Faults between nodekit and storage (a fault-injecting proxy in front of Azurite), a full disk,
and properties over every name: nothing is written or deleted outside the job's folders."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from conftest import ROOT, Azurite, BatchNode, BlobRemote, remote_env
from faultproxy import FaultProxy, Rule
from helpers import report, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_release import ReleaseNode, release_node  # noqa: F401 - the fixture

from nodekit.batchenv import BatchEnv, job_folder
from nodekit.errors import NodekitError
from nodekit.names import unsafe_reason
from nodekit.prep import DEFAULT_CONCURRENCY
from nodekit.release import _guard, job_places, wipe_targets
from nodekit.transfer import Downloader, range_size

MIB = 1024 * 1024




def _via(proxy: FaultProxy, remote: BlobRemote) -> str:
    return f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{remote.container}"


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _tree_md5(root: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(".nodekit"):
            h = hashlib.md5()
            with open(p, "rb") as fh:
                while chunk := fh.read(8 * MIB):
                    h.update(chunk)
            out[rel] = base64.b64encode(h.digest()).decode()
    return out


def test_mixed_dataset_through_503s_resets_and_stalls_lands_byte_identical(
        proxy: FaultProxy, blob_remote: BlobRemote, batch_node: BatchNode, tmp_path: Path) -> None:
    expected = {}
    for i in range(150):
        data = os.urandom(1024 + (i * 4099) % (63 * 1024))
        blob_remote.put(f"small/f{i:03}.bin", data)
        expected[f"in/small/f{i:03}.bin"] = _md5(data)
    for j in range(2):
        big = os.urandom(257 * MIB)
        blob_remote.put(f"big/b{j}.bin", big, blocks=True)
        expected[f"in/big/b{j}.bin"] = _md5(big)
        del big
    blob = rf"^GET /devstoreaccount1/{blob_remote.container}/"
    proxy.set_rules([Rule("503", 0.20, retry_after=1), Rule("reset", 0.05, pattern=blob),
                     Rule("stall", 0.02, pattern=blob, stall_s=4)])
    rep_path = tmp_path / "r.json"
    run(["prep", f"in={_via(proxy, blob_remote)}", "--read-timeout", "2", "--timeout", "10m", "--report",
         str(rep_path), "--progress-interval", "0"], batch_node.env(**remote_env(blob_remote)))
    assert _tree_md5(batch_node.job_dir) == expected
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))
    faults = proxy.counts["503"] + proxy.counts["reset"] + proxy.counts["stall"]
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0 and proxy.counts["stall"] > 0
    assert report(rep_path)["retries"] >= faults  # every fault cost a retry, and the report counts them


def test_a_blob_cut_half_way_resumes_from_what_is_on_disk(proxy: FaultProxy, blob_remote: BlobRemote,
                                                          batch_node: BatchNode) -> None:
    size = 40 * MIB
    big = os.urandom(size)
    blob_remote.put("big.bin", big, blocks=True)
    path = f"/devstoreaccount1/{blob_remote.container}/big.bin"
    proxy.set_rules([Rule("reset", 1.0, pattern=f"^GET {path}$", max_count=3, reset_at=0.5)])
    run(["prep", f"in={_via(proxy, blob_remote)}", "--read-timeout", "5"], batch_node.env(**remote_env(blob_remote)))
    assert (batch_node.job_dir / "in" / "big.bin").read_bytes() == big
    assert proxy.counts["reset"] == 3
    # three ranges were cut half-way; had they restarted from their start, 12 MiB more would have been sent
    assert proxy.bytes_by_path[path] < size + 3 * MIB
    step = range_size(size, DEFAULT_CONCURRENCY)
    starts = [int(r.split("=")[1].split("-")[0]) for m, p, r in proxy.ranges if p == path]
    resumed = [s for s in starts if s % step]
    assert len(resumed) >= 3  # requests that started in the middle of a range


def test_storage_failing_every_request_stops_within_the_timeout(proxy: FaultProxy, blob_remote: BlobRemote,
                                                                batch_node: BatchNode) -> None:
    blob_remote.put("a.bin", os.urandom(1000))
    proxy.set_rules([Rule("503", 1.0, retry_after=1)])
    started = time.monotonic()
    result = run(["prep", f"in={_via(proxy, blob_remote)}", "--timeout", "5"],
                 batch_node.env(**remote_env(blob_remote)), ok=False)
    assert time.monotonic() - started < 8
    assert result.exit_code == 5
    assert "gave up after" in result.stderr and "503 ServerBusy" in result.stderr
    assert not list(batch_node.shared.rglob("*.nodekit-partial"))


def test_release_under_faults_keeps_everything_verified_then_wipes(proxy: FaultProxy, azurite: Azurite,
                                                                   release_node: ReleaseNode) -> None:  # noqa: F811
    logs = BlobRemote(azurite)
    proxy.set_rules([Rule("503", 0.20, retry_after=1), Rule("reset", 0.05)])
    rn = release_node
    run(["release", "--upload-to", _via(proxy, logs), "--logs", "**/*.log", "--wipe-task-dirs"],
        rn.env(**remote_env(logs)))
    names = {b.name for b in logs.client.list_blobs()}
    assert names == {"job-1/tvm-1/logs.tar.gz", "job-1/tvm-1/dumps/job-1/task002/wd/core.gz",
                     "job-1/tvm-1/manifest.json"}
    manifest = json.loads(logs.client.download_blob("job-1/tvm-1/manifest.json").readall())
    for name, entry in manifest["objects"].items():
        assert _md5(logs.client.download_blob(f"job-1/tvm-1/{name}").readall()) == entry["md5"]
    assert proxy.counts["503"] > 0
    assert not rn.node.job_dir.exists()


def test_release_killed_during_its_upload_then_run_again_has_no_duplicates(
        proxy: FaultProxy, azurite: Azurite, release_node: ReleaseNode) -> None:  # noqa: F811
    logs = BlobRemote(azurite)
    rn = release_node
    proxy.set_rules([Rule("slow", 1.0, pattern=r"comp=block|/core", bytes_per_s=20 * MIB)])
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))},
           **rn.env(**remote_env(logs))}
    args = ["release", "--upload-to", _via(proxy, logs), "--logs", "**/*.log"]
    proc = subprocess.Popen([sys.executable, "-m", "nodekit", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proxy.counts["requests"] < 6:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "release finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert rn.node.job_dir.exists()  # killed before the wipe
    proxy.set_rules([])
    run(args, rn.env(**remote_env(logs)))
    names = sorted(b.name for b in logs.client.list_blobs())
    assert names == ["job-1/tvm-1/dumps/job-1/task002/wd/core.gz", "job-1/tvm-1/logs.tar.gz",
                     "job-1/tvm-1/manifest.json"]
    manifest = json.loads(logs.client.download_blob("job-1/tvm-1/manifest.json").readall())
    assert manifest["complete"] is True and sorted(manifest["objects"]) == [
        "dumps/job-1/task002/wd/core.gz", "logs.tar.gz"]
    assert not rn.node.job_dir.exists()


def test_a_disk_that_fills_ends_clearly_and_a_rerun_completes(batch_node: BatchNode, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    big = os.urandom(30 * MIB)
    (source / "big.bin").write_bytes(big)
    for i in range(5):
        (source / f"s{i}.txt").write_bytes(b"x" * 1000)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))},
           **batch_node.env()}

    def limit_file_size() -> None:  # this process may not write a file past 20 MiB: the disk is "full"
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * MIB, 20 * MIB))

    out = subprocess.run([sys.executable, "-m", "nodekit", "prep", f"in={source}"], env=env, cwd=ROOT,
                         capture_output=True, text=True, preexec_fn=limit_file_size)
    assert out.returncode == 8, out.stderr
    assert "disk is full" in out.stderr
    assert not (batch_node.job_dir / "in" / "big.bin").exists()
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))
    run(["prep", f"in={source}"], batch_node.env())  # space freed (no limit): completes
    assert (batch_node.job_dir / "in" / "big.bin").read_bytes() == big


NAMES = st.lists(st.sampled_from([*"ab./\\:C ~%", "..", "\x00", "€", ".nodekit", "x.nodekit-partial"]),
                 max_size=10).map("".join)


@settings(max_examples=400, deadline=None)
@given(name=NAMES)
def test_no_blob_name_lets_prep_write_outside_the_job_folder(name: str) -> None:
    job_dir = Path("/nodes/shared/job-1")
    final = Downloader._final(SimpleNamespace(job_dir=job_dir), name)  # type: ignore[arg-type]
    inside = os.path.normpath(final).startswith(str(job_dir) + os.sep)
    if unsafe_reason(name) is None:
        assert inside and os.path.normpath(final) == str(final)  # nothing to normalise away either
    if not inside:
        assert unsafe_reason(name) is not None


JOB_IDS = st.lists(st.sampled_from([*"aZ9_-./\\ :~*", "..", "\x00", "é", "a" * 30]), max_size=8).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job_id=JOB_IDS)
def test_no_job_id_lets_prep_or_release_leave_the_job_folders(job_id: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve() / "node"
        shared = root / "shared"
        shared.mkdir(parents=True)
        env = BatchEnv(root_dir=str(root), shared_dir=str(shared), job_id=job_id or None, node_id="tvm-1")
        try:
            _, jd = job_folder(env)
        except NodekitError:
            jd = None
        if jd is not None:
            assert jd.parent == shared and jd.name == job_id
        try:
            places = job_places(env)
        except NodekitError:
            return
        for target in wipe_targets(places, with_task_dirs=True):
            _guard(places, target)
            assert shared in target.parents or (root / "workitems") in target.parents
            assert target not in (shared, root, root / "workitems")
