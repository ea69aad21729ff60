"""nodekit prep against rclone and AzCopy, side by side, on the same data in Azurite.

Run `bash bench/setup.sh` once, then `.bench/venv/bin/python bench/prep_bench.py`. For each
dataset it loads the blobs into a fresh Azurite, then for several rounds (the tools alternating
within each round) runs every tool cold (empty destination) and warm (nothing changed), and
prints the median wall time, the peak memory (max RSS of the process tree, from wait4) and
nodekit's ratio to each peer. The table is written to bench/results-prep.md. Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from azurite import DEV_ACCOUNT, DEV_KEY, start_azurite, stop_process  # noqa: E402

BENCH = ROOT / ".bench"
RCLONE = BENCH / "venv" / "bin" / "rclone"
NODEKIT = BENCH / "venv" / "bin" / "nodekit"
AZCOPY = BENCH / "npm" / "node_modules" / "@azure-tools" / "azcopy-linux" / "dist" / "bin" / "azcopy_linux_amd64"
KIB, MIB = 1024, 1024 * 1024


@dataclass
class Dataset:
    name: str
    small_count: int
    small_min: int
    small_max: int
    big_count: int
    big_size: int

    def describe(self) -> str:
        parts = []
        if self.small_count:
            same = self.small_min == self.small_max
            size = _h(self.small_max) if same else f"{_h(self.small_min)}-{_h(self.small_max)}"
            parts.append(f"{self.small_count:,} × {size}")
        if self.big_count:
            parts.append(f"{self.big_count} × {_h(self.big_size)}")
        return " + ".join(parts)


def _h(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def load(container_client: object, ds: Dataset, conn: str, container: str) -> None:
    """Upload the dataset: small files in one request each (they get a Content-MD5), big ones in blocks."""
    from azure.storage.blob import BlobClient

    rng = __import__("random").Random(42)
    pool = os.urandom(max(ds.small_max, 1))

    def put_small(i: int) -> None:
        size = rng.randint(ds.small_min, ds.small_max) if ds.small_min != ds.small_max else ds.small_max
        name = f"small/{i // 500:03}/file-{i:05}.bin"
        container_client.upload_blob(name, pool[:size] + i.to_bytes(4, "big"), overwrite=True)  # type: ignore[attr-defined]

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(put_small, range(ds.small_count)))
    for j in range(ds.big_count):
        blob = BlobClient.from_connection_string(conn, container, f"big/blob-{j}.bin",
                                                 max_single_put_size=8 * MIB, max_block_size=8 * MIB)
        chunk = os.urandom(8 * MIB)

        def gen(total: int = ds.big_size, chunk: bytes = chunk, j: int = j):  # type: ignore[no-untyped-def]
            sent = 0
            while sent < total:
                piece = chunk[: min(len(chunk), total - sent)]
                yield bytes([j]) + piece[1:]
                sent += len(piece)

        blob.upload_blob(gen(), length=ds.big_size, overwrite=True, max_concurrency=4)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in MiB, exit code) of `cmd`, measured by GNU time.

    Not wait4 on a child of ours: a forked Python child carries this process's own RSS until it
    execs, which would count as the tool's peak.
    """
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss_file:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
        rss_kib = int(Path(rss_file.name).read_text().split()[-1])
    return wall, rss_kib // 1024, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--datasets", default="small,large,mixed")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every file count and big size")
    ap.add_argument("--concurrency", type=int, default=None, help="nodekit --concurrency (default: its own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-prep.md"))
    ap.add_argument("--tools", default="nodekit,rclone,azcopy")
    args = ap.parse_args()
    for tool in (NODEKIT, RCLONE, AZCOPY):
        if not tool.exists():
            sys.exit(f"{tool} is missing: run bash bench/setup.sh first")

    s = args.scale
    all_sets = {
        "small": Dataset("small", int(2000 * s), 64 * KIB, 64 * KIB, 0, 0),
        "large": Dataset("large", 0, 0, 0, 4, int(256 * MIB * s)),
        "mixed": Dataset("mixed", int(10000 * s), 1 * KIB, 64 * KIB, 2, int(512 * MIB * s)),
        "warm10k": Dataset("warm10k", int(10000 * s), 1 * KIB, 4 * KIB, 0, 0),
    }
    tools = args.tools.split(",")
    rows: list[str] = []
    for name in args.datasets.split(","):
        ds = all_sets[name]
        server, proc = start_azurite()
        scratch = Path(tempfile.mkdtemp(prefix=f"nodekit-bench-{name}-"))
        try:
            rows += bench_dataset(ds, server, scratch, tools, args)
        finally:
            stop_process(proc)
            shutil.rmtree(scratch, ignore_errors=True)
    header = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024**3} GiB, {platform.platform()}; "
        f"Azurite 3.35 in memory on loopback; nodekit {_version([str(NODEKIT), '--version'])}, "
        f"{_version([str(RCLONE), 'version'])}, AzCopy {_version([str(AZCOPY), '--version']).split()[-1]}; "
        f"median of {args.rounds} rounds, tools alternating. Reproduce: `bash bench/setup.sh && "
        f".bench/venv/bin/python bench/prep_bench.py`.",
        "",
        "| dataset | run | nodekit | rclone | AzCopy | nodekit / rclone | nodekit / AzCopy "
        "| peak MiB nodekit / rclone / AzCopy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    Path(args.out).write_text(table, encoding="utf-8")


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def bench_dataset(ds: Dataset, server: object, scratch: Path, tools: list[str], args: argparse.Namespace) -> list[str]:
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    conn = server.connection_string  # type: ignore[attr-defined]
    endpoint = server.endpoint  # type: ignore[attr-defined]
    container = "bench"
    client = BlobServiceClient.from_connection_string(conn).get_container_client(container)
    client.create_container()
    t0 = time.perf_counter()
    load(client, ds, conn, container)
    print(f"[{ds.name}] loaded {ds.describe()} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    sas = generate_container_sas(DEV_ACCOUNT, container, account_key=DEV_KEY,
                                 permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=6))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "RCLONE_"))}
    (scratch / "azcopy-logs").mkdir()
    (scratch / "azcopy-plans").mkdir()
    conc = ["--concurrency", str(args.concurrency)] if args.concurrency else []
    commands = {
        "nodekit": lambda dest, warm: ([str(NODEKIT), "prep", f"data={endpoint}/{container}?{sas}", "--dest", str(dest),
                                        "--shared-dir", str(scratch), "--progress-interval", "0", *conc], base_env),
        "rclone": lambda dest, warm: ([str(RCLONE), "copy", f"az:{container}", str(dest / "data"), "--transfers", "16",
                                       "--checkers", "16"],
                                      {**base_env, "RCLONE_CONFIG_AZ_TYPE": "azureblob",
                                       "RCLONE_CONFIG_AZ_USE_EMULATOR": "true",
                                       "RCLONE_CONFIG_AZ_ENDPOINT": endpoint}),
        "azcopy": lambda dest, warm: (
            [str(AZCOPY), "sync", f"{endpoint}/{container}?{sas}", str(dest / "data"), "--from-to=BlobLocal",
             "--recursive", "--log-level=ERROR"] if warm else
            [str(AZCOPY), "copy", f"{endpoint}/{container}/*?{sas}", str(dest / "data"), "--from-to=BlobLocal",
             "--recursive", "--log-level=ERROR"],
            {**base_env, "AZCOPY_LOG_LOCATION": str(scratch / "azcopy-logs"),
             "AZCOPY_JOB_PLAN_LOCATION": str(scratch / "azcopy-plans")}),
    }
    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for r in range(args.rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        for tool in order:
            dest = scratch / f"dest-{tool}"
            shutil.rmtree(dest, ignore_errors=True)
            (dest / "data").mkdir(parents=True)
            shutil.rmtree(scratch / ".nodekit-cache", ignore_errors=True)  # cold means a new node: no cache
            for phase in ("cold", "warm"):
                cmd, env = commands[tool](dest, phase == "warm")
                wall, rss, _ = run(cmd, env)
                results.setdefault((tool, phase), []).append((wall, rss))
                print(f"[{ds.name}] round {r + 1} {tool:8} {phase}: {wall:7.2f} s, {rss} MiB", file=sys.stderr)
            shutil.rmtree(dest, ignore_errors=True)
    rows = []
    for phase in ("cold", "warm"):
        med = {t: statistics.median(w for w, _ in results[(t, phase)]) for t in tools}
        peak = {t: max(m for _, m in results[(t, phase)]) for t in tools}

        rows.append(f"| {ds.name}: {ds.describe()} | {phase} | {_cell(med, 'nodekit')} | {_cell(med, 'rclone')} "
                    f"| {_cell(med, 'azcopy')} | {_ratio(med, 'rclone')} | {_ratio(med, 'azcopy')} | "
                    f"{' / '.join(str(peak.get(t, '-')) for t in ('nodekit', 'rclone', 'azcopy'))} |")
    return rows


def _cell(med: dict[str, float], tool: str) -> str:
    return f"{med[tool]:.2f} s" if tool in med else "-"


def _ratio(med: dict[str, float], tool: str) -> str:
    return f"**{med['nodekit'] / med[tool]:.2f}x**" if tool in med and "nodekit" in med else "-"


if __name__ == "__main__":
    main()
