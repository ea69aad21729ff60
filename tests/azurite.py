"""Azurite (the Azure Storage emulator) on a free loopback port, for the tests and the benchmarks.

Started with the flags it needs on this Node version and stopped by its process id (and group).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = ROOT / "node_modules" / ".bin" / "azurite-blob"
DEV_ACCOUNT = "devstoreaccount1"
# The emulator's published development key: not a secret.
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Azurite:
    port: int
    pid: int
    scheme: str = "http"
    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{DEV_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol={self.scheme};AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
                f"BlobEndpoint={self.endpoint};")

    def via(self, host: str) -> Azurite:
        """The same server named by another host (127.0.0.2: reachable only through tests' forward proxy)."""
        return Azurite(self.port, self.pid, self.scheme, host)


def start_azurite(cert: Path | None = None, key: Path | None = None,
                  oauth: bool = False) -> tuple[Azurite, subprocess.Popen[bytes]]:
    """Start azurite-blob on a free loopback port (HTTPS with `cert`/`key`, and `--oauth basic` with
    `oauth`); raise if it does not answer within 30 s."""
    if not AZURITE_BIN.exists():
        raise RuntimeError(f"{AZURITE_BIN} is missing: run the README's test command (it runs npm ci).")
    port = free_port()
    tls = ["--cert", str(cert), "--key", str(key)] if cert and key else []
    proc = subprocess.Popen(
        [str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
         "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent", *tls,
         *(["--oauth", "basic"] if oauth else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Azurite exited at start: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return Azurite(port, proc.pid, "https" if tls else "http"), proc
        except OSError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError("Azurite did not start listening within 30 s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process (and its group) by its id: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


