"""--timeout is one deadline for the whole run, listing included; listings that are not listings are refused.

A scripted server on loopback plays a storage account that answers listings badly (a marker that
never ends, the same marker twice, bytes that are not XML); a fault proxy slows real downloads.
Each run must end within a few seconds of its deadline, cleanly: exit 5, the report written, no
temporary file left, and what was finished kept for the next run.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import Azurite, BatchNode, BlobRemote, remote_env, tree
from faultproxy import FaultProxy, Rule
from helpers import report, run
from netservers import Answer, ScriptedServer

EXPIRY = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
SAS = f"sv=2025-01-05&sr=c&sp=rl&se={EXPIRY}&sig=c2lnbmF0dXJl"


def _listing(blobs: str, marker: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ContainerName="cont"><Blobs>{blobs}</Blobs>'
            f"<NextMarker>{marker}</NextMarker></EnumerationResults>").encode()


def _blob(name: str, size: str = "5") -> str:
    return (f"<Blob><Name>{name}</Name><Properties><Content-Length>{size}</Content-Length><Etag>0x1</Etag>"
            "<Last-Modified>Sun, 29 Nov 2026 10:00:00 GMT</Last-Modified></Properties></Blob>")


def _serve(script: ScriptedServer, batch_node: BatchNode, tmp_path: Path, *extra: str) -> tuple[object, float, dict]:
    """Start `script`, run prep against it, stop it: (result, seconds prep took, its report)."""
    rep = tmp_path / "r.json"
    script.start()
    try:
        started = time.monotonic()
        result = run(["prep", f"in=http://127.0.0.1:{script.port}/devstoreaccount1/cont?{SAS}", "--report",
                      str(rep), "--progress-interval", "0", *extra], batch_node.env(), ok=False)
        took = time.monotonic() - started
    finally:
        script.stop()
    return result, took, report(rep) if rep.exists() else {}


def test_a_listing_that_never_ends_stops_at_the_deadline(batch_node: BatchNode, tmp_path: Path) -> None:
    counter = iter(range(10**9))

    def endless(method: str, path: str, query: dict[str, list[str]]) -> Answer:
        n = next(counter)
        return 200, {"Content-Type": "application/xml"}, _listing(_blob(f"f{n:09}.txt"), marker=f"m{n + 1}")

    server = ScriptedServer(endless)
    result, took, rep = _serve(server, batch_node, tmp_path, "--timeout", "3")
    assert result.exit_code == 5, result.stderr  # type: ignore[attr-defined]
    assert "timeout" in result.stderr and len(result.stderr.strip().splitlines()) == 1  # type: ignore[attr-defined]
    assert took < 8, took
    assert rep["error"] and "timeout" in rep["error"]  # the report says why
    assert server.requests > 3  # it did list until the deadline
    assert not batch_node.job_dir.exists() or tree(batch_node.job_dir) == {}


def test_a_listing_that_repeats_its_marker_is_an_error(batch_node: BatchNode, tmp_path: Path) -> None:
    def stuck(method: str, path: str, query: dict[str, list[str]]) -> Answer:
        return 200, {"Content-Type": "application/xml"}, _listing(_blob("a.txt"), marker="again")

    server = ScriptedServer(stuck)
    result, took, _ = _serve(server, batch_node, tmp_path, "--timeout", "60")
    assert result.exit_code == 4, result.stderr  # type: ignore[attr-defined]
    assert "the same continuation marker twice" in result.stderr  # type: ignore[attr-defined]
    assert took < 10 and server.requests < 10


@pytest.mark.parametrize("body, says", [
    (b'<?xml version="1.0"?><EnumerationResults><Blobs><Blob><Name>\xff\xfe</Name></Blob></Blobs></EnumerationResults>',
     "not a valid blob listing"),
    (_listing(_blob("bad&#x110000;name")), "not a valid blob listing"),
    (_listing(_blob("a.txt", size="twelve")), "a size that is not a number"),
    (b"<html><body>Sign in to continue</body></html>", "not a blob listing"),
])
def test_a_listing_that_is_not_a_listing_is_refused(body: bytes, says: str, batch_node: BatchNode,
                                                    tmp_path: Path) -> None:
    server = ScriptedServer(lambda m, p, q: (200, {"Content-Type": "application/xml"}, body))
    result, _, rep = _serve(server, batch_node, tmp_path)
    assert result.exit_code == 4, result.stderr  # type: ignore[attr-defined]
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1  # type: ignore[attr-defined]
    assert rep == {} and not batch_node.job_dir.exists()  # a refused source changes nothing, not even the report


def test_slow_downloads_stop_at_the_deadline_and_the_next_run_goes_on(azurite: Azurite, blob_remote: BlobRemote,
                                                                      batch_node: BatchNode, tmp_path: Path) -> None:
    expected = {}
    for i in range(30):
        data = os.urandom(200_000)
        blob_remote.put(f"s/f{i:02}.bin", data)
        expected[f"in/s/f{i:02}.bin"] = data
    big = os.urandom(40 * 1024 * 1024)
    blob_remote.put("big.bin", big, blocks=True)
    expected["in/big.bin"] = big
    proxy = FaultProxy(azurite.port).start()
    try:
        proxy.set_rules([Rule("slow", 1.0, pattern=r"^GET /devstoreaccount1/c[0-9a-f]+/(s/|big)",
                              bytes_per_s=400_000)])
        url = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
        rep = tmp_path / "r.json"
        started = time.monotonic()
        result = run(["prep", f"in={url}", "--timeout", "5", "--report", str(rep), "--concurrency", "4",
                      "--progress-interval", "0", "--no-cache"], batch_node.env(**remote_env(blob_remote)), ok=False)
        took = time.monotonic() - started
    finally:
        proxy.stop()
    assert result.exit_code == 5, result.stderr
    assert took < 9, took  # within a few seconds of the deadline, though 40 MiB at this pace needs minutes
    data = report(rep)
    assert "timeout" in data["error"] and data["downloaded"] < len(expected)
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))
    placed = tree(batch_node.job_dir)
    assert all(expected[k] == v for k, v in placed.items())  # what is there is whole and right
    run(["prep", f"in={blob_remote.url}", "--report", str(rep), "--no-cache"],
        batch_node.env(**remote_env(blob_remote)))
    assert tree(batch_node.job_dir) == expected
    assert json.loads(rep.read_text())["skipped"] == len(placed)  # the first run's files were kept
