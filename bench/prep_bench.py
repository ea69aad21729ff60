"""nodekit prep against rclone and AzCopy on a network like a Batch node's: TLS, server time per request,
a rate per connection. Side by side, on the same data, ratios within each round.

Run `bash bench/setup.sh` once, then `.bench/venv/bin/python bench/prep_bench.py`. Per dataset:

- Azurite serves HTTPS with a certificate the bench makes (every tool is told to trust it), behind
  bench/netsim.py, which waits D ms before answering each request, answers a connection's requests
  one after another, sends each body at most at `--rate` bytes/s per connection, and (after an
  untimed warm-up in which every tool runs once) answers reads it has seen from memory: on Azure the
  server is elsewhere and serves many requests at once, so the emulator's own CPU per request (one
  Node.js process) must be no floor here. Azurite and the proxy are pinned to one core, the tool
  under test to the other (`taskset`), so that no tool wins by taking CPU from the server.
- Each round runs every tool (their order rotating) cold (a new destination, no node cache, after
  the same memory primer) and then warm (nothing changed); medians over rounds; each ratio is taken
  within a round, then its median.
- Bounds: what the network allows at best with the tool's connections: requests × D ÷ connections
  for small files, bytes ÷ (connections in use × rate) for large ones (the larger of the two).

Tools: nodekit (its defaults), rclone `copy` with `--transfers/--checkers 16` and `64`, AzCopy `copy`
(cold) and `sync` (warm) with its defaults. Writes bench/results-prep.md. Not run in CI.
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
PYTHON = BENCH / "venv" / "bin" / "python"
AZCOPY = BENCH / "npm" / "node_modules" / "@azure-tools" / "azcopy-linux" / "dist" / "bin" / "azcopy_linux_amd64"
KIB, MIB = 1024, 1024 * 1024
TOOLS = ("nodekit", "rclone16", "rclone64", "azcopy")
LABEL = {"nodekit": "nodekit", "rclone16": "rclone 16", "rclone64": "rclone 64", "azcopy": "AzCopy"}
SERVER_CORE, TOOL_CORE = "0", "1"
AZCOPY_CONNECTIONS = 32  # its default on up to 4 CPUs (AZCOPY_CONCURRENCY_VALUE)
NODEKIT_CONNECTIONS = 64  # its default


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

    @property
    def files(self) -> int:
        return self.small_count + self.big_count


def _h(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def load(container_client: object, ds: Dataset, conn: str, container: str, **options: object) -> None:
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
        blob = BlobClient.from_connection_string(conn, container, f"big/blob-{j}.bin", max_single_put_size=8 * MIB,
                                                 max_block_size=8 * MIB, **options)
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


def run(cmd: list[str], env: dict[str, str], pin: str | None = None) -> Sample:
    """Run `cmd` (on core `pin`) under GNU time: wall seconds, peak RSS, CPU.

    Not wait4 on a child of ours: a forked Python child carries this process's own RSS until it
    execs, which would count as the tool's peak.
    """
    pinned = ["taskset", "-c", pin] if pin is not None else []
    with tempfile.NamedTemporaryFile(suffix=".time") as out:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", out.name, *pinned, *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
        rss_kib, user, system = Path(out.name).read_text().split()[-3:]
    return Sample(wall, int(rss_kib) // 1024, float(user) + float(system))


@dataclass
class Condition:
    delay_ms: float
    rate: float | None  # bytes/s per connection

    def describe(self) -> str:
        rate = f", {self.rate / 1e6:.0f} MB/s per connection" if self.rate else ""
        return f"D = {self.delay_ms:g} ms{rate}"


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    ratios: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (peer, phase): nodekit / peer

    def add(self, tool: str, phase: str, sample: Sample) -> None:
        self.samples.setdefault((tool, phase), []).append(sample)

    def median(self, tool: str, phase: str, attr: str = "wall") -> float | None:
        got = self.samples.get((tool, phase))
        return statistics.median(getattr(s, attr) for s in got) if got else None

    def peak(self, tool: str, phase: str) -> int | None:
        got = self.samples.get((tool, phase))
        return max(s.rss_mib for s in got) if got else None


def bound(ds: Dataset, cond: Condition, connections: int) -> float:
    """What the network allows at best with `connections`: request latency or bytes at the per-connection rate."""
    requests = ds.files + 1  # and one listing page per 5,000 (small next to the rest)
    latency = requests * cond.delay_ms / 1000 / connections
    if not cond.rate:
        return latency
    if ds.big_count:
        from_big = ds.big_count * ds.big_size / (min(connections, _ranges(ds)) * cond.rate)
    else:
        from_big = 0.0
    from_small = ds.small_count * (ds.small_min + ds.small_max) / 2 / (connections * cond.rate)
    return max(latency, from_big + from_small)


def _ranges(ds: Dataset) -> int:
    """How many ranges nodekit cuts the large files into (transfer.range_size with its defaults)."""
    sys.path.insert(0, str(ROOT))
    from nodekit.transfer import range_size

    size = range_size(ds.big_count * ds.big_size, NODEKIT_CONNECTIONS)
    return ds.big_count * -(-ds.big_size // size)


class Server:
    """Azurite over HTTPS and netsim in front of it, pinned to one core."""

    def __init__(self, work: Path) -> None:
        from tlscerts import make_ca, make_server_cert

        self.tls = work / "tls"
        self.ca = make_ca(self.tls)
        self.cert = make_server_cert(self.ca, self.tls, ["127.0.0.1", "localhost"])
        self.azurite, self.proc = start_azurite(self.cert.cert, self.cert.key)
        subprocess.run(["taskset", "-pac", SERVER_CORE, str(self.proc.pid)], check=True, capture_output=True)
        self.netsim: subprocess.Popen[str] | None = None
        self.port = 0

    def start_netsim(self, cond: Condition) -> None:
        self.stop_netsim()
        args = [str(PYTHON), str(ROOT / "bench" / "netsim.py"), "--upstream", f"127.0.0.1:{self.azurite.port}",
                "--upstream-tls", "--cert", str(self.cert.cert), "--key", str(self.cert.key), "--delay",
                str(cond.delay_ms), "--memory"]
        if cond.rate:
            args += ["--rate", str(cond.rate)]
        self.netsim = subprocess.Popen(["taskset", "-c", SERVER_CORE, *args], stdout=subprocess.PIPE, text=True,
                                       start_new_session=True)
        assert self.netsim.stdout is not None
        self.port = int(self.netsim.stdout.readline().split()[1])

    def stop_netsim(self) -> None:
        if self.netsim is not None:
            self.netsim.terminate()
            self.netsim.wait(10)
            self.netsim = None

    def stop(self) -> None:
        self.stop_netsim()
        stop_process(self.proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm-runs", type=int, default=2, help="warm runs after each cold run (each one a sample)")
    ap.add_argument("--datasets", default="small,large,mixed")
    ap.add_argument("--delays", default="0,5,15", help="milliseconds per request for the small dataset")
    ap.add_argument("--delay", type=float, default=5.0, help="milliseconds per request for the others")
    ap.add_argument("--rate", type=float, default=60e6, help="bytes/s per connection (0: none)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every file count and big size")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-prep.md"))
    args = ap.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    for binary in (RCLONE, AZCOPY, NODEKIT):
        if not binary.exists():
            sys.exit(f"{binary} is missing: run bash bench/setup.sh first")
    s = args.scale
    all_sets = {
        "small": Dataset("small", int(2000 * s), 64 * KIB, 64 * KIB, 0, 0),
        "large": Dataset("large", 0, 0, 0, 4, int(256 * MIB * s)),
        "mixed": Dataset("mixed", int(10000 * s), 1 * KIB, 64 * KIB, 2, int(512 * MIB * s)),
    }
    rate = args.rate or None
    base = scratch()
    rows: list[str] = []
    for name in args.datasets.split(","):
        ds = all_sets[name]
        delays = [float(d) for d in args.delays.split(",")] if name == "small" else [args.delay]
        work = base / f"prep-bench-{name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        server = Server(work)
        try:
            container, sas = _load(server, ds)
            for delay in delays:
                cond = Condition(delay, rate)
                server.start_netsim(cond)
                results = bench(ds, cond, server, container, sas, work, tools, args)
                rows += table_rows(ds, cond, results, tools)
        finally:
            server.stop()
            shutil.rmtree(work, ignore_errors=True)
    header = [
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024**3} GiB, {platform.platform()}, "
        f"Python {platform.python_version()}: Azurite 3.35 over HTTPS behind bench/netsim.py (D ms per request, "
        f"{(rate or 0) / 1e6:.0f} MB/s per connection, reads answered from memory after an untimed warm-up), "
        f"both on core {SERVER_CORE}; each tool on core {TOOL_CORE}. {_version([str(NODEKIT), '--version'])}, "
        f"{_version([str(RCLONE), 'version'])}, AzCopy {_version([str(AZCOPY), '--version']).split()[-1]}; "
        f"destinations on {'a journalled ext4 (loop)' if base.name == 'mnt' else base}; median of {args.rounds} "
        f"rounds (warm: {args.warm_runs} runs a round), the tools' order rotating; ratios taken within each round. "
        "Reproduce: `bash bench/setup.sh && .bench/venv/bin/python bench/prep_bench.py`.",
        "",
        "| dataset | network | run | nodekit | rclone 16 | rclone 64 | AzCopy | nodekit / rclone 16 "
        "| nodekit / rclone 64 | nodekit / AzCopy | nodekit's bound (64 connections) | nodekit / bound "
        "| peak MiB nodekit / rclone 16 / rclone 64 / AzCopy | CPU s nodekit / rclone 16 / rclone 64 / AzCopy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = "\n".join(header + rows) + "\n"
    print(table)
    Path(args.out).write_text(table, encoding="utf-8")


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def _load(server: Server, ds: Dataset) -> tuple[str, str]:
    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

    options = {"connection_verify": str(server.ca.cert)}
    conn = server.azurite.connection_string
    container = "bench"
    client = BlobServiceClient.from_connection_string(conn, **options).get_container_client(container)
    client.create_container()
    t0 = time.perf_counter()
    load(client, ds, conn, container, **options)
    print(f"[{ds.name}] loaded {ds.describe()} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    sas = generate_container_sas(DEV_ACCOUNT, container, account_key=DEV_KEY,
                                 permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=12))
    return container, sas


def bench(ds: Dataset, cond: Condition, server: Server, container: str, sas: str, work: Path, tools: list[str],
          args: argparse.Namespace) -> Results:
    endpoint = f"https://127.0.0.1:{server.port}/{DEV_ACCOUNT}"
    ca = str(server.ca.cert)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("AZ_BATCH_", "AZURE_", "RCLONE_", "NODEKIT_", "AZCOPY_"))
                and k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
                and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")}
    for sub in ("azcopy-logs", "azcopy-plans"):
        (work / sub).mkdir(exist_ok=True)

    def command(tool: str, shared: Path, warm: bool) -> tuple[list[str], dict[str, str]]:
        dest = shared / "dest" / "data"
        if tool == "nodekit":
            return ([str(NODEKIT), "prep", f"data={endpoint}/{container}?{sas}", "--job-id", "dest",
                     "--shared-dir", str(shared), "--progress-interval", "0"], {**base_env, "REQUESTS_CA_BUNDLE": ca})
        if tool.startswith("rclone"):
            n = tool.removeprefix("rclone")
            return ([str(RCLONE), "copy", "az:", str(dest), "--transfers", n, "--checkers", n, "--ca-cert", ca],
                    {**base_env, "RCLONE_CONFIG_AZ_TYPE": "azureblob",
                     "RCLONE_CONFIG_AZ_SAS_URL": f"{endpoint}/{container}?{sas}"})
        azenv = {**base_env, "AZCOPY_LOG_LOCATION": str(work / "azcopy-logs"), "SSL_CERT_FILE": ca,
                 "AZCOPY_JOB_PLAN_LOCATION": str(work / "azcopy-plans")}
        if warm:
            return ([str(AZCOPY), "sync", f"{endpoint}/{container}?{sas}", str(dest), "--from-to=BlobLocal",
                     "--recursive", "--log-level=ERROR"], azenv)
        return ([str(AZCOPY), "copy", f"{endpoint}/{container}/*?{sas}", str(dest), "--from-to=BlobLocal",
                 "--recursive", "--log-level=ERROR"], azenv)

    primer = int(ds.total_bytes * 1.2 / MIB) + 64

    def fresh(tool: str) -> Path:
        shared = work / tool
        shutil.rmtree(shared, ignore_errors=True)  # the last round's data and node cache: a new node
        (shared / "dest" / "data").mkdir(parents=True)
        return shared

    for tool in tools:  # untimed: every tool's reads pass through once, so that netsim answers them from memory
        cmd, env = command(tool, fresh(tool), False)
        run(cmd, env, TOOL_CORE)
    results = Results()
    for r in range(args.rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        got: dict[tuple[str, str], float] = {}
        for tool in order:
            shared = fresh(tool)
            prime(work, primer)
            for phase in ["cold"] + ["warm"] * args.warm_runs:
                cmd, env = command(tool, shared, phase == "warm")
                sample = run(cmd, env, TOOL_CORE)
                results.add(tool, phase, sample)
                got.setdefault((tool, phase), sample.wall)
                print(f"[{ds.name} {cond.describe()}] round {r + 1} {tool:9} {phase}: {sample.wall:6.2f} s, "
                      f"{sample.rss_mib} MiB, cpu {sample.cpu:.2f} s", file=sys.stderr)
        for phase in ("cold", "warm"):
            for peer in tools:
                if peer != "nodekit" and ("nodekit", phase) in got and (peer, phase) in got:
                    results.ratios.setdefault((peer, phase), []).append(got[("nodekit", phase)] / got[(peer, phase)])
    return results


def table_rows(ds: Dataset, cond: Condition, res: Results, tools: list[str]) -> list[str]:
    rows = []
    nodekit_bound = bound(ds, cond, NODEKIT_CONNECTIONS)
    for phase in ("cold", "warm"):
        def cell(tool: str, attr: str = "wall", phase: str = phase) -> str:
            v = res.median(tool, phase, attr)
            return "-" if v is None else f"{v:.2f}" + (" s" if attr == "wall" else "")

        def ratio(peer: str, phase: str = phase) -> str:
            got = res.ratios.get((peer, phase))
            return f"**{statistics.median(got):.2f}x**" if got else "-"

        mine = res.median("nodekit", phase)
        to_bound = f"{mine / nodekit_bound:.2f}x" if phase == "cold" and mine and nodekit_bound else "-"
        rows.append(
            f"| {ds.name}: {ds.describe()} | {cond.describe()} | {phase} | {cell('nodekit')} | {cell('rclone16')} "
            f"| {cell('rclone64')} | {cell('azcopy')} | {ratio('rclone16')} | {ratio('rclone64')} | {ratio('azcopy')} "
            f"| {nodekit_bound:.2f} s | {to_bound} "
            f"| {' / '.join(str(res.peak(t, phase) or '-') for t in TOOLS)} "
            f"| {' / '.join(cell(t, 'cpu') for t in TOOLS)} |")
    return rows


if __name__ == "__main__":
    main()
