"""The conventions layout's two questions, measured: gzip logs (with Content-Encoding) or not, and what
one object per file costs against nodekit's one archive.

Run `.venv/bin/python bench/conventions_bench.py` (Azurite from `./dev test`'s node_modules). Not run in CI.

1. Logs: for real logs found on this machine (/var/log) and a synthetic application log, gzip level 6
   (what nodekit's archive uses) and level 1: the ratio, the compression rate (CPU), and the link
   rate below which compressing before the upload saves time (bytes saved / seconds spent).
2. Layout: one node with TASKS tasks (stdout 200 KB, stderr 20 KB, one 1 MiB app.log each),
   `nodekit release` into Azurite in nodekit's layout and in the conventions layout; median wall
   time of ROUNDS rounds and the objects written.

Prints a Markdown table and writes bench/results-conventions.md.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from azurite import start_azurite, stop_process  # noqa: E402

MIB = 1024 * 1024


def synthetic_log(size: int, seed: int = 17) -> bytes:
    """An application log: timestamps, levels, a few message shapes with ids, numbers and paths."""
    rng = random.Random(seed)
    shapes = [
        "INFO  worker-{w} processed item {i} in {t:.3f} s status=ok",
        "DEBUG cache lookup key=sha256:{h} hit={b}",
        "INFO  wrote /mnt/batch/tasks/workitems/job/job-1/task{w:03d}/wd/out/part-{i:05d}.csv ({n} rows)",
        "WARN  retrying GET https://acct.blob.core.windows.net/in/v2/shard-{i} after {t:.1f} s (503 ServerBusy)",
        "ERROR step {i} failed: ValueError: column 'price' has {n} missing values",
    ]
    out = bytearray()
    clock = 1_764_000_000.0
    while len(out) < size:
        clock += rng.expovariate(50)
        line = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(clock)) + f".{int(clock % 1 * 1000):03d}Z " + \
            rng.choices(shapes, weights=[50, 25, 15, 7, 3])[0].format(
                w=rng.randrange(16), i=rng.randrange(10**6), t=rng.random() * 3, h=f"{rng.getrandbits(64):016x}",
                b=rng.random() < 0.8, n=rng.randrange(10**5))
        out += line.encode() + b"\n"
    return bytes(out[:size])


def corpus() -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for path in sorted(Path("/var/log").rglob("*.log")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) >= 64 * 1024:
            found[str(path)] = data
    found["synthetic application log"] = synthetic_log(8 * MIB)
    return found


def gzip_rows() -> list[str]:
    rows = []
    for name, data in corpus().items():
        cells = [name, f"{len(data) / MIB:.2f} MiB"]
        for level in (6, 1):
            start = time.process_time()
            packed = gzip.compress(data, level, mtime=0)
            cpu = max(time.process_time() - start, 1e-6)
            ratio = len(data) / len(packed)
            rate = len(data) / cpu / MIB
            break_even = (len(data) - len(packed)) / cpu / MIB  # MiB/s of link at which both take as long
            cells += [f"{ratio:.1f}x", f"{rate:.0f} MiB/s", f"{break_even:.0f} MiB/s ({break_even * 8.389:.0f} Mbit/s)"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def build_node(root: Path, job: str, tasks: int) -> None:
    work = root / "workitems" / job / "job-1"
    app = synthetic_log(MIB)
    for t in range(tasks):
        task = work / f"task{t:04d}"
        (task / "wd" / "logs").mkdir(parents=True)
        (task / "stdout.txt").write_bytes(synthetic_log(200_000, seed=t))
        (task / "stderr.txt").write_bytes(synthetic_log(20_000, seed=-t))
        (task / "wd" / "logs" / "app.log").write_bytes(app)
    (work / "jobrelease" / "wd").mkdir(parents=True)
    (root / "shared" / job).mkdir(parents=True)


def layout_rows(tasks: int, rounds: int) -> list[str]:
    from azure.storage.blob import BlobServiceClient

    server, proc = start_azurite()
    scratch = Path(tempfile.mkdtemp(prefix="nodekit-conventions-bench-"))
    times: dict[str, list[float]] = {"nodekit": [], "conventions": []}
    objects: dict[str, int] = {}
    try:
        service = BlobServiceClient.from_connection_string(server.connection_string)
        service.create_container("release")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
        for r in range(rounds):
            for layout in (("nodekit", "conventions") if r % 2 == 0 else ("conventions", "nodekit")):
                root = scratch / f"node-{layout}-{r}"
                job = f"bench-{layout}-{r}"
                build_node(root, job, tasks)
                own = root / "workitems" / job / "job-1" / "jobrelease"
                env = {**base, "AZ_BATCH_NODE_ROOT_DIR": str(root), "AZ_BATCH_NODE_SHARED_DIR": str(root / "shared"),
                       "AZ_BATCH_JOB_ID": job, "AZ_BATCH_NODE_ID": "tvm-1", "AZ_BATCH_TASK_DIR": str(own),
                       "AZ_BATCH_TASK_WORKING_DIR": str(own / "wd"),
                       "AZURE_STORAGE_CONNECTION_STRING": server.connection_string}
                url = f"{server.endpoint}/release" if layout == "nodekit" else server.endpoint
                cmd = [sys.executable, "-m", "nodekit", "release", "--upload-to", url, "--logs", "**/*.log",
                       "--layout", layout]
                start = time.perf_counter()
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
                times[layout].append(time.perf_counter() - start)
                container = "release" if layout == "nodekit" else job
                prefix = f"{job}/" if layout == "nodekit" else ""
                name = container if layout == "nodekit" else f"job-{job}"
                objects[layout] = sum(1 for _ in service.get_container_client(name).list_blobs(
                    name_starts_with=prefix))
                print(f"round {r + 1} {layout:11}: {times[layout][-1]:.2f} s, {objects[layout]} objects",
                      file=sys.stderr)
                shutil.rmtree(root)
    finally:
        stop_process(proc)
        shutil.rmtree(scratch, ignore_errors=True)
    size = tasks * (200_000 + 20_000 + MIB) / MIB
    return [f"| {layout} | {tasks} tasks, {size:.0f} MiB of logs | {statistics.median(t):.2f} s | {objects[layout]} |"
            for layout, t in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-conventions.md"))
    args = ap.parse_args()
    text = (
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}; Azurite in memory on loopback. Reproduce: `.venv/bin/python "
        "bench/conventions_bench.py`.\n\n"
        "| log | size | gzip -6 ratio | -6 rate (CPU) | -6 pays below | gzip -1 ratio | -1 rate (CPU) | "
        "-1 pays below |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(gzip_rows()) +
        f"\n\n| layout | node | release (median of {args.rounds}) | objects |\n| --- | --- | --- | --- |\n" +
        "\n".join(layout_rows(args.tasks, args.rounds)) + "\n")
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
