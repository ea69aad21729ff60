"""Two jobs in a row on one node, 90% of their input in common: the second with nodekit's cache.

Run `.bench/venv/bin/python bench/cache_bench.py` (after `bash bench/setup.sh`). It loads the
mixed dataset of the prep benchmark into Azurite (sizes configurable), runs job 1's prep cold,
replaces 10% of the small files at the source (a new day's data), runs job 2's prep on the same
node, and prints both times, their ratio, and what the second job downloaded and took from the
cache. Writes bench/results-cache.md. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from azurite import start_azurite, stop_process  # noqa: E402
from prep_bench import KIB, MIB, NODEKIT, Dataset, load  # noqa: E402
from scratch import scratch as scratch_root  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-cache.md"))
    args = ap.parse_args()
    ds = Dataset("mixed", int(10000 * args.scale), 1 * KIB, 64 * KIB, 2, int(512 * MIB * args.scale))
    server, proc = start_azurite()
    scratch = Path(tempfile.mkdtemp(prefix="nodekit-cache-bench-", dir=scratch_root()))
    try:
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(server.connection_string).get_container_client("bench")
        client.create_container()
        load(client, ds, server.connection_string, "bench")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))},
               "AZURE_STORAGE_CONNECTION_STRING": server.connection_string}
        shared = scratch / "shared"
        shared.mkdir()

        def prep(job: str) -> tuple[float, dict]:
            rep = scratch / f"{job}.json"
            start = time.perf_counter()
            subprocess.run([str(NODEKIT), "prep", f"{server.endpoint}/bench", "--shared-dir", str(shared),
                            "--job-id", job, "--progress-interval", "0", "--report", str(rep)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            return time.perf_counter() - start, json.loads(rep.read_text())

        first, r1 = prep("job-1")
        changed = [f"small/{i // 500:03}/file-{i:05}.bin" for i in range(0, ds.small_count, 10)]
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda n: client.upload_blob(n, os.urandom(2048), overwrite=True), changed))
        second, r2 = prep("job-2")
        table = (
            f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} cores, Azurite in memory: "
            f"{ds.describe()}; between the jobs {len(changed):,} small files (10% of the files) were replaced at "
            "the source. Reproduce: `.bench/venv/bin/python bench/cache_bench.py`.\n\n"
            "| job | time | downloaded | from the cache | ratio to job 1 |\n| --- | --- | --- | --- | --- |\n"
            f"| job 1 (cold node) | {first:.2f} s | {r1['downloaded']:,} | {r1['from_cache']:,} | 1.00x |\n"
            f"| job 2 (90% in common) | {second:.2f} s | {r2['downloaded']:,} ({r2['bytes_downloaded'] / MIB:.1f} "
            f"MiB) | {r2['from_cache']:,} ({r2['bytes_from_cache'] / MIB:.1f} MiB) | **{second / first:.2f}x** |\n")
        print(table)
        Path(args.out).write_text(table, encoding="utf-8")
    finally:
        stop_process(proc)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
