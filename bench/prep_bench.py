"""nodekit prep against rclone and AzCopy, side by side, on the same data in Azurite.

Run `bash bench/setup.sh` once, then `.bench/venv/bin/python bench/prep_bench.py`. For each
dataset it loads the blobs into a fresh Azurite, then for several rounds (the tools' order
rotating from round to round) runs every tool cold (empty destination, no node cache) and warm
(nothing changed), and prints the median wall time, the peak memory (GNU time's max RSS), the
CPU the tool and the emulator spent, and nodekit's ratio to each peer. Destinations live on a
journalled ext4 scratch file system, and each cold run starts after the same memory primer
(bench/scratch.py says why). nodekit also runs with `--md5 source` on the datasets whose large
blobs have no Content-MD5. The table is written to bench/results-prep.md. Not run in CI.
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
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from azurite import DEV_ACCOUNT, DEV_KEY, start_azurite, stop_process  # noqa: E402
from scratch import prime, scratch  # noqa: E402

BENCH = ROOT / ".bench"
RCLONE = BENCH / "venv" / "bin" / "rclone"
NODEKIT = BENCH / "venv" / "bin" / "nodekit"
AZCOPY = BENCH / "npm" / "node_modules" / "@azure-tools" / "azcopy-linux" / "dist" / "bin" / "azcopy_linux_amd64"
KIB, MIB = 1024, 1024 * 1024
TOOLS = ("nodekit", "nodekit-md5src", "rclone", "azcopy")
LABEL = {"nodekit": "nodekit", "nodekit-md5src": "nodekit --md5 source", "rclone": "rclone", "azcopy": "AzCopy"}


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

    @property
    def total_bytes(self) -> int:
        return self.small_count * (self.small_min + self.small_max) // 2 + self.big_count * self.big_size


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


@dataclass
class Sample:
    wall: float
    rss_mib: int
    cpu: float  # the tool's user + system seconds
    emulator_cpu: float  # Azurite's user + system seconds during the run


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, tool: str, phase: str, sample: Sample) -> None:
        self.samples.setdefault((tool, phase), []).append(sample)

    def median(self, tool: str, phase: str, attr: str = "wall") -> float | None:
        got = self.samples.get((tool, phase))
        return statistics.median(getattr(s, attr) for s in got) if got else None

    def peak(self, tool: str, phase: str) -> int | None:
        got = self.samples.get((tool, phase))
        return max(s.rss_mib for s in got) if got else None


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], env: dict[str, str], emulator_pid: int) -> Sample:
    """Run `cmd` under GNU time: wall seconds, peak RSS, CPU of the tool and of the emulator.

    Not wait4 on a child of ours: a forked Python child carries this process's own RSS until it
    execs, which would count as the tool's peak.
    """
    with tempfile.NamedTemporaryFile(suffix=".time") as out:
        before = _cpu_seconds(emulator_pid)
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", out.name, *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        emulator = _cpu_seconds(emulator_pid) - before
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
        rss_kib, user, system = Path(out.name).read_text().split()[-3:]
    return Sample(wall, int(rss_kib) // 1024, float(user) + float(system), emulator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warm-runs", type=int, default=3, help="warm runs after each cold run (each one a sample)")
    ap.add_argument("--datasets", default="small,large,mixed")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every file count and big size")
    ap.add_argument("--small-count", type=int, help="the mixed dataset's small files (default 10,000)")
    ap.add_argument("--big-size-mib", type=int, help="the mixed dataset's big blobs (default 512 MiB)")
    ap.add_argument("--concurrency", type=int, default=None, help="nodekit --concurrency (default: its own)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-prep.md"))
    args = ap.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    for tool in tools:
        binary = {"rclone": RCLONE, "azcopy": AZCOPY}.get(tool, NODEKIT)
        if not binary.exists():
            sys.exit(f"{binary} is missing: run bash bench/setup.sh first")

    s = args.scale
    all_sets = {
        "small": Dataset("small", int(2000 * s), 64 * KIB, 64 * KIB, 0, 0),
        "large": Dataset("large", 0, 0, 0, 4, int(256 * MIB * s)),
        "mixed": Dataset("mixed", args.small_count or int(10000 * s), 1 * KIB, 64 * KIB, 2,
                         (args.big_size_mib * MIB) if args.big_size_mib else int(512 * MIB * s)),
        "warm10k": Dataset("warm10k", int(10000 * s), 1 * KIB, 4 * KIB, 0, 0),
    }
    base = scratch()
    rows: list[str] = []
    for name in args.datasets.split(","):
        ds = all_sets[name]
        server, proc = start_azurite()
        work = base / f"prep-bench-{name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            results = bench_dataset(ds, server, proc.pid, work, tools, args)
        finally:
            stop_process(proc)
            shutil.rmtree(work, ignore_errors=True)
        rows += table_rows(ds, results, tools)
    header = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024**3} GiB, {platform.platform()}, "
        f"Python {platform.python_version()}; Azurite 3.35 in memory on loopback; "
        f"{_version([str(NODEKIT), '--version'])}, {_version([str(RCLONE), 'version'])} "
        f"(--transfers 16 --checkers 16), AzCopy {_version([str(AZCOPY), '--version']).split()[-1]}; "
        f"destinations on {'a journalled ext4 (loop)' if base.name == 'mnt' else base}; "
        f"median of {args.rounds} rounds (warm: {args.warm_runs} runs a round), the tools' order rotating. "
        f"Reproduce: `bash bench/setup.sh && "
        f".bench/venv/bin/python bench/prep_bench.py`.",
        "",
        "| dataset | run | nodekit | nodekit --md5 source | rclone | AzCopy | nodekit / rclone | nodekit / AzCopy "
        "| --md5 source / rclone | peak MiB nodekit / rclone / AzCopy | CPU s nodekit / rclone / AzCopy "
        "| Azurite CPU s nodekit / rclone / AzCopy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    Path(args.out).write_text(table, encoding="utf-8")


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def bench_dataset(ds: Dataset, server: object, emulator_pid: int, work: Path, tools: list[str],
                  args: argparse.Namespace) -> Results:
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
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "RCLONE_", "NODEKIT_"))}
    (work / "azcopy-logs").mkdir()
    (work / "azcopy-plans").mkdir()
    conc = ["--concurrency", str(args.concurrency)] if args.concurrency else []

    def nodekit(shared: Path, extra: list[str]) -> tuple[list[str], dict[str, str]]:
        return ([str(NODEKIT), "prep", f"data={endpoint}/{container}?{sas}", "--job-id", "dest",
                 "--shared-dir", str(shared), "--progress-interval", "0", *conc, *extra], base_env)

    def command(tool: str, shared: Path, warm: bool) -> tuple[list[str], dict[str, str]]:
        dest = shared / "dest" / "data"
        if tool == "nodekit":
            return nodekit(shared, [])
        if tool == "nodekit-md5src":
            return nodekit(shared, ["--md5", "source"])
        if tool == "rclone":
            return ([str(RCLONE), "copy", f"az:{container}", str(dest), "--transfers", "16", "--checkers", "16"],
                    {**base_env, "RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_USE_EMULATOR": "true",
                     "RCLONE_CONFIG_AZ_ENDPOINT": endpoint})
        azenv = {**base_env, "AZCOPY_LOG_LOCATION": str(work / "azcopy-logs"),
                 "AZCOPY_JOB_PLAN_LOCATION": str(work / "azcopy-plans")}
        if warm:
            return ([str(AZCOPY), "sync", f"{endpoint}/{container}?{sas}", str(dest), "--from-to=BlobLocal",
                     "--recursive", "--log-level=ERROR"], azenv)
        return ([str(AZCOPY), "copy", f"{endpoint}/{container}/*?{sas}", str(dest), "--from-to=BlobLocal",
                 "--recursive", "--log-level=ERROR"], azenv)

    # --md5 source changes nothing where every blob has a Content-MD5, nor on a warm run
    active = [t for t in tools if t != "nodekit-md5src" or ds.big_count]
    results = Results()
    primer = int(ds.total_bytes * 1.2 / MIB) + 64
    warmup = work / "warm-up"  # the emulator's first requests are slow (its JIT): paid by nobody's timing
    (warmup / "dest").mkdir(parents=True)
    subprocess.run(nodekit(warmup, ["--no-cache"])[0], env=base_env, stdout=subprocess.DEVNULL, check=True)
    shutil.rmtree(warmup)
    for r in range(args.rounds):
        order = active[r % len(active):] + active[: r % len(active)]
        for tool in order:
            shared = work / tool
            shutil.rmtree(shared, ignore_errors=True)  # the last round's data and node cache: a new node
            (shared / "dest" / "data").mkdir(parents=True)
            prime(work, primer)
            phases = ["cold"] if tool == "nodekit-md5src" else ["cold"] + ["warm"] * args.warm_runs
            for i, phase in enumerate(phases):
                if phase == "warm" and i == 1:
                    time.sleep(1.0)  # let the emulator finish collecting the cold run's garbage
                cmd, env = command(tool, shared, phase == "warm")
                sample = run(cmd, env, emulator_pid)
                results.add(tool, phase, sample)
                print(f"[{ds.name}] round {r + 1} {tool:15} {phase}: {sample.wall:7.2f} s, {sample.rss_mib} MiB, "
                      f"cpu {sample.cpu:.2f} s, Azurite {sample.emulator_cpu:.2f} s", file=sys.stderr)
    return results


def table_rows(ds: Dataset, res: Results, tools: list[str]) -> list[str]:
    rows = []
    for phase in ("cold", "warm"):
        def cell(tool: str, attr: str = "wall", phase: str = phase) -> str:
            v = res.median(tool, phase, attr)
            return "-" if v is None else f"{v:.2f}" + (" s" if attr == "wall" else "")

        def ratio(a: str, b: str, phase: str = phase) -> str:
            x, y = res.median(a, phase), res.median(b, phase)
            return "-" if x is None or y is None else f"**{x / y:.2f}x**"

        trio = ("nodekit", "rclone", "azcopy")
        rows.append(
            f"| {ds.name}: {ds.describe()} | {phase} | {cell('nodekit')} | {cell('nodekit-md5src')} | {cell('rclone')} "
            f"| {cell('azcopy')} | {ratio('nodekit', 'rclone')} | {ratio('nodekit', 'azcopy')} "
            f"| {ratio('nodekit-md5src', 'rclone')} "
            f"| {' / '.join(str(res.peak(t, phase) or '-') for t in trio)} "
            f"| {' / '.join(cell(t, 'cpu') for t in trio)} | {' / '.join(cell(t, 'emulator_cpu') for t in trio)} |")
    return rows


if __name__ == "__main__":
    main()
