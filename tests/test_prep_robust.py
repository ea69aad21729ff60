"""prep survives being killed, runs safely twice at once, and never prints a secret."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

from conftest import DEV_KEY, ROOT, BatchNode, BlobRemote, remote_env, tree
from helpers import report, run

BIG = 160 * 1024 * 1024


def _spawn(node: BatchNode, remote: BlobRemote, report_path: Path, *extra: str,
           url: str | None = None) -> subprocess.Popen[bytes]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))},
           **node.env(**remote_env(remote))}
    return subprocess.Popen(
        [sys.executable, "-m", "nodekit", "prep", f"input={url or remote.url}", "--report", str(report_path),
         "--progress-interval", "0", *extra],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_during_a_large_download_then_rerun_repairs(blob_remote: BlobRemote, batch_node: BatchNode,
                                                            tmp_path: Path) -> None:
    from faultproxy import FaultProxy, Rule

    big = os.urandom(BIG)
    blob_remote.put("big.bin", big, blocks=True)
    blob_remote.put("small.txt", b"small")
    slow = FaultProxy(blob_remote.server.port).start()  # 160 MiB at 40 MB/s a connection: seconds, not a blink
    try:
        slow.set_rules([Rule("slow", 1.0, pattern=r"big\.bin$", bytes_per_s=40e6)])
        via = f"http://127.0.0.1:{slow.port}/devstoreaccount1/{blob_remote.container}"
        proc = _spawn(batch_node, blob_remote, tmp_path / "r1.json", "--concurrency", "2", url=via)
        partial = batch_node.job_dir / "input" / ".big.bin.nodekit-partial"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and partial.stat().st_blocks > 0:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "prep finished before it could be killed"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        slow.stop()
    assert not (batch_node.job_dir / "input" / "big.bin").exists()  # never a half file under the final name

    rep_path = tmp_path / "r2.json"
    run(["prep", f"input={blob_remote.url}", "--report", str(rep_path)], batch_node.env(**remote_env(blob_remote)))
    assert tree(batch_node.job_dir) == {"input/big.bin": big, "input/small.txt": b"small"}
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))
    assert "input/big.bin" in [f["name"] for f in report(rep_path)["files"] if f["action"] == "download"]


def test_two_preps_at_once_both_succeed_and_the_data_is_right(blob_remote: BlobRemote, batch_node: BatchNode,
                                                              tmp_path: Path) -> None:
    expected = {}
    for i in range(40):
        data = os.urandom(1000 + i * 997)
        blob_remote.put(f"f{i:02}.bin", data)
        expected[f"input/f{i:02}.bin"] = data
    big = os.urandom(40 * 1024 * 1024)
    blob_remote.put("big.bin", big, blocks=True)
    expected["input/big.bin"] = big
    procs = [_spawn(batch_node, blob_remote, tmp_path / f"r{i}.json") for i in range(2)]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert tree(batch_node.job_dir) == expected
    downloaded = [report(tmp_path / f"r{i}.json")["downloaded"] for i in range(2)]
    assert sorted(downloaded) == [0, len(expected)]  # the second waited for the lock and found the work done


def _secrets_absent(secrets: list[str], *texts: str) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text


def test_no_sas_or_key_in_any_output(blob_remote: BlobRemote, batch_node: BatchNode, tmp_path: Path) -> None:
    blob_remote.put("a.txt", b"a")
    sas_url = blob_remote.sas_url()
    sig = parse_qs(sas_url.split("?", 1)[1])["sig"][0]
    secrets = [sig, DEV_KEY, sas_url.split("?", 1)[1]]
    rep_path = tmp_path / "r.json"
    outputs = []
    for args in (["-v", "prep", sas_url, "--report", str(rep_path)],
                 ["prep", sas_url, "--dry-run"],
                 ["-v", "prep", f"{blob_remote.url}", "--report", str(rep_path)]):
        env = batch_node.env(**remote_env(blob_remote)) if sas_url not in args else batch_node.env()
        result = run(args, env)
        outputs += [result.stdout, result.stderr]
        if args[0] == "-v":
            assert "GET http://127.0.0.1" in result.stdout  # every request was logged (without its query)
    outputs.append(rep_path.read_text())
    outputs.append(json.dumps(json.loads((batch_node.job_dir / ".nodekit" / "state.json").read_text())))
    _secrets_absent(secrets, *outputs)

    # failures: a tampered signature (403) and a missing container (404) carry the URL's SAS too
    bad = sas_url.replace("sig=", "sig=AAAA")
    missing = sas_url.replace(blob_remote.container, "nosuchcontainer1")
    for url, code in ((bad, 4), (missing, 4)):
        result = run(["-v", "prep", url], batch_node.env(), ok=False)
        assert result.exit_code == code, result.stderr
        _secrets_absent([*secrets, "AAAA" + sig], result.stdout, result.stderr)


def test_content_md5_mismatch_is_retried_then_fails_and_places_nothing(blob_remote: BlobRemote,
                                                                       batch_node: BatchNode,
                                                                       tmp_path: Path) -> None:
    from azure.storage.blob import ContentSettings

    blob_remote.put("good.txt", b"good")
    blob_remote.put("bad.txt", b"the bytes")
    blob_remote.client.get_blob_client("bad.txt").set_http_headers(
        ContentSettings(content_md5=bytearray(b"0123456789abcdef")))  # a wrong checksum on the blob
    rep_path = tmp_path / "r.json"
    result = run(["prep", f"in={blob_remote.url}", "--report", str(rep_path)],
                 batch_node.env(**remote_env(blob_remote)), ok=False)
    assert result.exit_code == 7, result.stderr
    assert "does not match the source's Content-MD5" in result.stderr
    rep = report(rep_path)
    assert rep["retries"] >= 2  # fetched three times in all
    assert not (batch_node.job_dir / "in" / "bad.txt").exists()
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))
    assert next(f for f in rep["files"] if f["name"] == "in/bad.txt")["error"]
