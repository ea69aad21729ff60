"""Many nodes preparing the same job at once through a throttled storage account (simulated).

Run `.bench/venv/bin/python bench/scale_bench.py --nodes 50 --rps 200`: it loads a dataset into
Azurite, puts the fault-injecting proxy of the tests in front of it admitting at most RPS
requests per second in all (the rest get 503 ServerBusy with Retry-After, as a throttled
account answers), starts NODES `nodekit prep` processes at the same moment, each into its own
node folder, checks every node's data, and prints the total time against the lower bound the
throttle allows (every node must list once and fetch every file once), the 503s seen and the
retries spent. Not run in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from azurite import DEV_ACCOUNT, DEV_KEY, start_azurite, stop_process  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from scratch import scratch as scratch_root  # noqa: E402

NODEKIT = ROOT / ".bench" / "venv" / "bin" / "nodekit"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--rps", type=float, default=200.0)
    ap.add_argument("--files", type=int, default=60, help="files in the job's input")
    ap.add_argument("--size", type=int, default=16 * 1024, help="bytes per file")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-scale.md"))
    args = ap.parse_args()
    nodekit = str(NODEKIT) if NODEKIT.exists() else None
    server, proc = start_azurite()
    scratch = Path(tempfile.mkdtemp(prefix="nodekit-scale-", dir=scratch_root()))
    proxy = None
    try:
        from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

        client = BlobServiceClient.from_connection_string(server.connection_string).get_container_client("job")
        client.create_container()
        want = {}
        for i in range(args.files):
            data = os.urandom(args.size)
            client.upload_blob(f"input/f{i:04}.bin", data)
            want[f"input/f{i:04}.bin"] = hashlib.md5(data).hexdigest()
        sas = generate_container_sas(DEV_ACCOUNT, "job", account_key=DEV_KEY,
                                     permission=ContainerSasPermissions(read=True, list=True),
                                     expiry=datetime.now(timezone.utc) + timedelta(hours=2))
        proxy = FaultProxy(server.port, rps=args.rps).start()
        url = f"http://127.0.0.1:{proxy.port}/{DEV_ACCOUNT}/job?{sas}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
        cmd = [nodekit] if nodekit else [sys.executable, "-m", "nodekit"]
        procs = []
        started = time.monotonic()
        for n in range(args.nodes):
            shared = scratch / f"node{n:03}" / "shared"
            shared.mkdir(parents=True)
            procs.append(subprocess.Popen(
                [*cmd, "prep", url, "--shared-dir", str(shared), "--job-id", "job", "--progress-interval", "0",
                 "--report", str(shared.parent / "report.json"), "--timeout", "10m"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        failures = [p.communicate()[1].decode()[-300:] for p in procs if p.wait() != 0]
        total = time.monotonic() - started
        retries = 0
        wrong = 0
        for n in range(args.nodes):
            node = scratch / f"node{n:03}"
            retries += json.loads((node / "report.json").read_text())["retries"] if (node / "report.json").exists() \
                else 0
            for name, md5 in want.items():
                path = node / "shared" / "job" / "job" / name
                if not path.exists() or hashlib.md5(path.read_bytes()).hexdigest() != md5:
                    wrong += 1
        needed = args.nodes * (args.files + 1)  # one listing and one GET per file, per node
        bound = needed / args.rps
        table = (
            f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} cores: {args.nodes} nodes at once, "
            f"{args.files} files × {args.size // 1024} KiB each, a proxy admitting {args.rps:g} requests/s in all "
            f"(the rest: 503 ServerBusy, Retry-After: 1). Reproduce: `.bench/venv/bin/python bench/scale_bench.py "
            f"--nodes {args.nodes} --rps {args.rps:g}`.\n\n"
            "| nodes | requests needed | bound at the throttle | total time | ratio | 503s seen | retries | "
            "nodes failed | files wrong |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            f"| {args.nodes} | {needed:,} | {bound:.1f} s | {total:.1f} s | **{total / bound:.2f}x** | "
            f"{proxy.counts['throttled']:,} | {retries:,} | {len(failures)} | {wrong} |\n")
        print(table)
        for f in failures[:3]:
            print("failure:", f, file=sys.stderr)
        Path(args.out).write_text(table, encoding="utf-8")
    finally:
        if proxy is not None:
            proxy.stop()
        stop_process(proc)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
