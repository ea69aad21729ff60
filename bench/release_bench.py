"""nodekit release against a shell script doing the same work with tar, gzip and rclone.

Run `bash bench/setup.sh` once, then `.bench/venv/bin/python bench/release_bench.py`. Each round
builds the same fake node (logs and crash dumps, about 1 GiB in all by default), then times:

- nodekit: `nodekit release --upload-to URL --logs '**/*.log' --wipe-task-dirs`;
- the peer: `tar czf` of the logs (gzip level 6, as nodekit), `gzip -1` of each dump (as nodekit),
  `rclone copy` of the results into the same container, `rm -rf` of the job's folders.

It prints the median wall times, peak memory and the ratio, and writes bench/results-release.md.
Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from azurite import start_azurite, stop_process  # noqa: E402
from prep_bench import NODEKIT, RCLONE, run  # noqa: E402
from scratch import scratch as scratch_root  # noqa: E402

MIB = 1024 * 1024


def build_node(root: Path, job: str, log_mib: int, dump_mib: int, dumps: int) -> None:
    """Four tasks with stdout/stderr and text logs; `dumps` crash dumps of `dump_mib` each."""
    work = root / "workitems" / job / "job-1"
    line = b"2026-11-24T10:00:00Z INFO worker 7 processed item 123456 in 0.042 s status=ok\n"
    text = line * (MIB // len(line))
    page = 64 * 1024
    rnd = os.urandom(page)
    dump = b"".join(rnd if i % 4 == 0 else bytes(page) for i in range(dump_mib * MIB // page))
    for t in range(4):
        wd = work / f"task{t:03}" / "wd"
        (wd / "logs").mkdir(parents=True)
        (wd.parent / "stdout.txt").write_bytes(text[: 200_000])
        (wd.parent / "stderr.txt").write_bytes(text[: 20_000])
        with open(wd / "logs" / "app.log", "wb") as fh:
            for _ in range(log_mib):
                fh.write(text)
        if t < dumps:
            (wd / "core").write_bytes(dump)
    (root / "workitems" / job / "job-1" / "jobrelease" / "wd").mkdir(parents=True)
    (root / "shared" / job / "input").mkdir(parents=True)
    (root / "shared" / job / "input" / "data.bin").write_bytes(os.urandom(MIB))


PEER_SCRIPT = r"""
set -euo pipefail
work="$ROOT/workitems/$JOB"
out="$ROOT/release-out/$JOB/$NODE"
mkdir -p "$out/dumps"
(cd "$work" && find . -path ./job-1/jobrelease -prune -o \( -name stdout.txt -o -name stderr.txt -o -name '*.log' \) \
   -type f -print | tar czf "$out/logs.tar.gz" -T -)
(cd "$work" && find . -path ./job-1/jobrelease -prune -o -name core -type f -print) | while read -r f; do
  mkdir -p "$out/dumps/$(dirname "$f")"; gzip -1 -c "$work/$f" > "$out/dumps/$f.gz"; done
"$RCLONE" copy "$ROOT/release-out" az:release --transfers 16
rm -rf "$ROOT/shared/$JOB" "$ROOT/release-out"
for d in "$work"/job-1/*/; do [ "$d" = "$work/job-1/jobrelease/" ] || rm -rf "$d/wd"; done
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-mib", type=int, default=160, help="MiB of text logs per task (4 tasks)")
    ap.add_argument("--dump-mib", type=int, default=192, help="MiB per crash dump")
    ap.add_argument("--dumps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-release.md"))
    args = ap.parse_args()
    server, proc = start_azurite()
    scratch = Path(tempfile.mkdtemp(prefix="nodekit-release-bench-", dir=scratch_root()))
    results: dict[str, list[tuple[float, int]]] = {"nodekit": [], "peer": []}
    try:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(server.connection_string).create_container("release")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "RCLONE_"))}
        total = 4 * args.log_mib * MIB + args.dumps * args.dump_mib * MIB
        for r in range(args.rounds):
            for tool in (("nodekit", "peer") if r % 2 == 0 else ("peer", "nodekit")):
                root = scratch / f"node-{tool}"
                shutil.rmtree(root, ignore_errors=True)
                job = f"job-{tool}-{r}"
                build_node(root, job, args.log_mib, args.dump_mib, args.dumps)
                env = {**base, "AZ_BATCH_NODE_ROOT_DIR": str(root), "AZ_BATCH_NODE_SHARED_DIR": str(root / "shared"),
                       "AZ_BATCH_JOB_ID": job, "AZ_BATCH_NODE_ID": "tvm-1",
                       "AZ_BATCH_TASK_DIR": str(root / "workitems" / job / "job-1" / "jobrelease"),
                       "AZ_BATCH_TASK_WORKING_DIR": str(root / "workitems" / job / "job-1" / "jobrelease" / "wd")}
                if tool == "nodekit":
                    cmd = [str(NODEKIT), "release", "--upload-to", f"{server.endpoint}/release", "--logs", "**/*.log",
                           "--wipe-task-dirs"]
                    env["AZURE_STORAGE_CONNECTION_STRING"] = server.connection_string
                else:
                    cmd = ["bash", "-c", PEER_SCRIPT]
                    env.update(ROOT=str(root), JOB=job, NODE="tvm-1", RCLONE=str(RCLONE),
                               RCLONE_CONFIG_AZ_TYPE="azureblob", RCLONE_CONFIG_AZ_USE_EMULATOR="true",
                               RCLONE_CONFIG_AZ_ENDPOINT=server.endpoint)
                sample = run(cmd, env)
                wall, rss = sample.wall, sample.rss_mib
                assert not (root / "shared" / job).exists(), f"{tool} did not wipe"
                results[tool].append((wall, rss))
                print(f"round {r + 1} {tool:8}: {wall:6.2f} s, {rss} MiB", file=sys.stderr)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        stop_process(proc)
        shutil.rmtree(scratch, ignore_errors=True)
    med = {t: statistics.median(w for w, _ in v) for t, v in results.items()}
    peak = {t: max(m for _, m in v) for t, v in results.items()}
    table = (
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} cores; Azurite 3.35 in memory on "
        f"loopback; median of {args.rounds} rounds, alternating. Reproduce: `bash bench/setup.sh && "
        f".bench/venv/bin/python bench/release_bench.py`.\n\n"
        "| release of | nodekit release | tar + gzip -1 + rclone copy + rm -rf | ratio | peak MiB nodekit / peer |\n"
        "| --- | --- | --- | --- | --- |\n"
        f"| {total / MIB / 1024:.2f} GiB: 4 tasks' logs ({args.log_mib} MiB each), {args.dumps} dumps × "
        f"{args.dump_mib} MiB | {med['nodekit']:.2f} s | {med['peer']:.2f} s | "
        f"**{med['nodekit'] / med['peer']:.2f}x** | {peak['nodekit']} / {peak['peer']} |\n"
    )
    print(table)
    Path(args.out).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
