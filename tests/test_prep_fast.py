"""prep's speed options against Azurite: --md5, --concurrency, range sizes, and their description-file keys."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from conftest import BatchNode, BlobRemote, remote_env, tree
from helpers import report, run

from nodekit.cmdline import Description, prep_args
from nodekit.spec import parse_source

MIB = 1024 * 1024


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _prep(node: BatchNode, remote: BlobRemote, tmp_path: Path, job: str, *extra: str) -> dict:
    rep = tmp_path / f"{job}.json"
    result = run(["prep", f"in={remote.url}", "--job-id", job, "--report", str(rep), "--progress-interval", "0",
                  "--no-cache", *extra], node.env(**remote_env(remote)))
    data = report(rep)
    data["summary"] = result.stdout.strip().splitlines()[-1]
    return data


def test_md5_source_hashes_only_what_the_source_can_check(blob_remote: BlobRemote, batch_node: BatchNode,
                                                          tmp_path: Path) -> None:
    files = {
        "checked.txt": b"a blob put in one request: the service keeps its Content-MD5\n" * 50,
        "blocks/small.bin": os.urandom(5 * MIB),  # in blocks, no Content-MD5: one GET
        "blocks/large.bin": os.urandom(20 * MIB),  # in blocks, no Content-MD5: parallel ranges
    }
    for name, data in files.items():
        blob_remote.put(name, data, blocks=name.startswith("blocks/"))
    first = _prep(batch_node, blob_remote, tmp_path, "job-src")  # the default: --md5 source
    assert tree(batch_node.shared / "job-src") == {f"in/{k}": v for k, v in files.items()}
    by_name = {f["name"]: f for f in first["files"]}
    assert (by_name["in/checked.txt"]["verified"], by_name["in/checked.txt"]["md5"]) == \
        (True, _md5(files["checked.txt"]))  # still checked against the source
    for name in ("in/blocks/small.bin", "in/blocks/large.bin"):
        assert (by_name[name]["verified"], by_name[name]["md5"]) == (False, None)  # not hashed
    assert "2 without a source checksum (size checked)" in first["summary"]
    again = _prep(batch_node, blob_remote, tmp_path, "job-src", "--md5", "source")
    assert (again["downloaded"], again["skipped"]) == (0, 3)

    full = _prep(batch_node, blob_remote, tmp_path, "job-all", "--md5", "all")  # hashes everything
    assert {f["name"]: f["md5"] for f in full["files"]} == {f"in/{k}": _md5(v) for k, v in files.items()}
    assert "2 without a source checksum (MD5 recorded)" in full["summary"]


def test_a_wrong_content_md5_is_caught_with_md5_source_too(blob_remote: BlobRemote, batch_node: BatchNode,
                                                           tmp_path: Path) -> None:
    from azure.storage.blob import ContentSettings

    blob_remote.put("bad.txt", b"the bytes")
    blob_remote.client.get_blob_client("bad.txt").set_http_headers(
        ContentSettings(content_md5=bytearray(b"0123456789abcdef")))
    result = run(["prep", f"in={blob_remote.url}", "--md5", "source", "--progress-interval", "0"],
                 batch_node.env(**remote_env(blob_remote)), ok=False)
    assert result.exit_code == 7 and "does not match the source's Content-MD5" in result.stderr
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))


def test_any_concurrency_lands_the_same_files(blob_remote: BlobRemote, batch_node: BatchNode, tmp_path: Path) -> None:
    files = {f"d{i % 4}/f{i:03}.bin": os.urandom(1000 + 97 * i) for i in range(120)}
    files["empty.bin"] = b""
    for name, data in files.items():
        blob_remote.put(name, data)
    expected = {f"in/{k}": v for k, v in files.items()}
    for job, extra in (("job-c1", ["--concurrency", "1"]), ("job-c4", ["--concurrency", "4"]), ("job-env", [])):
        env_extra = {"NODEKIT_CONCURRENCY": "2"} if job == "job-env" else {}
        rep = tmp_path / f"{job}.json"
        run(["prep", f"in={blob_remote.url}", "--job-id", job, "--report", str(rep), "--no-cache", *extra],
            batch_node.env(**remote_env(blob_remote), **env_extra))
        assert tree(batch_node.shared / job) == expected
        assert report(rep)["downloaded"] == len(files) and report(rep)["retries"] == 0


def test_md5_in_a_description_file_and_on_the_generated_line(blob_remote: BlobRemote,
                                                                            batch_node: BatchNode,
                                                                            tmp_path: Path) -> None:
    blob_remote.put("x/block.bin", os.urandom(5 * MIB), blocks=True)  # over 4 MiB: in blocks, no MD5
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"nodekit": 1, "prep": {"sources": [f"in={blob_remote.url}"], "md5": "all",
                                                       "cache": False}}))
    rep = tmp_path / "r.json"
    run(["prep", "--spec", str(spec), "--report", str(rep)], batch_node.env(**remote_env(blob_remote)))
    assert [f["verified"] for f in report(rep)["files"]] == [False]
    assert report(rep)["files"][0]["md5"] is not None  # --md5 all from the description file: hashed
    for bad, message in (({"md5": "some"}, 'prep.md5 must be "all" or "source"'),
                         ({"pipeline": 4}, "prep.pipeline is gone")):
        spec.write_text(json.dumps({"nodekit": 1, "prep": {"sources": ["/tmp"], **bad}}))
        result = run(["prep", "--spec", str(spec)], batch_node.env(), ok=False)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    bad_cli = run(["prep", "in=/tmp", "--md5", "sometimes"], batch_node.env(), ok=False)
    assert bad_cli.exit_code == 2 and "--md5" in bad_cli.stderr
    desc = Description(job_id="j", sources=(parse_source("https://acct.blob.core.windows.net/refdata/v2", name="in"),),
                       md5="all")
    args = prep_args(desc)
    assert args[args.index("--md5") + 1] == "all" and "--pipeline" not in args
    assert "--md5" not in prep_args(Description(job_id="j", sources=desc.sources))  # the default adds nothing


def test_the_default_concurrency_follows_the_machine() -> None:
    from nodekit.prep import default_concurrency

    gib = 1024**3
    assert default_concurrency(24 * gib) == 64  # requests in flight for latency, whatever the CPUs
    assert default_concurrency(gib // 2) == 32  # a small node: one per 16 MiB of memory
    assert default_concurrency(32 * 1024 * 1024) == 4  # never fewer than 4


def test_a_warm_run_with_a_sas_imports_no_azure_storage_sdk(blob_remote: BlobRemote, batch_node: BatchNode,
                                                            tmp_path: Path) -> None:
    """Listing runs on azure-core alone: azure-storage-blob's import (0.25 s here) is paid only where it is
    used (keys, connection strings, uploads)."""
    import subprocess
    import sys

    from conftest import ROOT

    blob_remote.put("a.txt", b"a")
    code = ("import sys\nfrom nodekit.cli import cli\n"
            f"cli.main(['prep', 'in={blob_remote.sas_url()}', '--no-cache', '--progress-interval', '0'], "
            "standalone_mode=False)\n"
            "print(sorted(m for m in sys.modules if m.startswith('azure.storage')))")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))},
           **batch_node.env()}
    for _ in range(2):  # cold, then warm
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (batch_node.job_dir / "in" / "a.txt").read_bytes() == b"a"


def test_the_md5_of_a_large_file_follows_its_ranges_in_any_order(blob_remote: BlobRemote, batch_node: BatchNode,
                                                                 tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Ranges complete out of order (the first is slowed down); the MD5, fed as they complete, is right."""
    from conftest import Azurite
    from faultproxy import FaultProxy, Rule

    import nodekit.transfer

    monkeypatch.setattr(nodekit.transfer, "RANGE_SIZE", 2 * MIB)  # 21 ranges instead of 5
    big = os.urandom(40 * MIB + 12345)
    blob_remote.put("big.bin", big, blocks=True)  # no Content-MD5: only nodekit's own MD5 says what landed
    server: Azurite = blob_remote.server
    proxy = FaultProxy(server.port).start()
    try:
        path = f"^GET /devstoreaccount1/{blob_remote.container}/big.bin$"
        slow = Rule("slow", 1.0, pattern=path, max_count=1, bytes_per_s=2e6)  # the first range: about 1 s
        proxy.set_rules([slow])
        rep = tmp_path / "r.json"
        run(["prep", f"in=http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}", "--report",
             str(rep), "--no-cache", "--concurrency", "8", "--md5", "all"], batch_node.env(**remote_env(blob_remote)))
    finally:
        proxy.stop()
    assert slow.hits == 1 and len([r for r in proxy.ranges if r[1].endswith("big.bin")]) == 21
    entry = report(rep)["files"][0]
    assert entry["md5"] == _md5(big) and entry["verified"] is False
    assert (batch_node.job_dir / "in" / "big.bin").read_bytes() == big
