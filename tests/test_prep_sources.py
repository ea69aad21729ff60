"""Other source forms: one file by URL (a real HTTP server), one blob by URL, a description file."""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BatchNode, BlobRemote, remote_env, tree
from helpers import actions, report, run


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_one_file_by_url(web_root: tuple[Path, str], batch_node: BatchNode, tmp_path: Path) -> None:
    root, base = web_root
    (root / "models").mkdir()
    model = root / "models" / "model v1.onnx"
    model.write_bytes(os.urandom(300_000))
    url = f"{base}/models/model%20v1.onnx"
    rep_path = tmp_path / "r.json"
    run(["prep", f"models={url}", "--report", str(rep_path)], batch_node.env())
    assert tree(batch_node.job_dir) == {"models/model v1.onnx": model.read_bytes()}
    assert report(rep_path)["downloaded"] == 1

    run(["prep", f"models={url}", "--report", str(rep_path)], batch_node.env())
    assert report(rep_path)["downloaded"] == 0

    model.write_bytes(b"new version")
    st = model.stat()
    os.utime(model, (st.st_atime, st.st_mtime + 5))
    run(["prep", f"models={url}", "--report", str(rep_path)], batch_node.env())
    assert actions(report(rep_path), "download") == ["models/model v1.onnx"]
    assert tree(batch_node.job_dir) == {"models/model v1.onnx": b"new version"}


def test_missing_url_is_a_source_error(web_root: tuple[Path, str], batch_node: BatchNode) -> None:
    _, base = web_root
    result = run(["prep", f"{base}/nothing/here.bin"], batch_node.env(), ok=False)
    assert result.exit_code == 4
    assert "not found (404" in result.stderr


def test_a_blob_url_naming_one_blob_fetches_that_blob(blob_remote: BlobRemote, batch_node: BatchNode) -> None:
    blob_remote.put("dir/one.bin", b"one")
    blob_remote.put("dir/two.bin", b"two")
    run(["prep", f"x={blob_remote.url}/dir/one.bin"], batch_node.env(**remote_env(blob_remote)))
    assert tree(batch_node.job_dir) == {"x/one.bin": b"one"}


def test_description_file(blob_remote: BlobRemote, batch_node: BatchNode, tmp_path: Path) -> None:
    blob_remote.put("ref/a.csv", b"a")
    blob_remote.put("ref/b.tmp", b"b")
    local = tmp_path / "mounted"
    local.mkdir()
    (local / "m.bin").write_bytes(b"m")
    (local / "skip.txt").write_bytes(b"s")
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({
        "nodekit": 1,
        "job_id": "from-spec",
        "prep": {
            "sources": [f"reference={blob_remote.url}/ref", {"url": str(local), "name": "models",
                                                              "include": ["*.bin"]}],
            "exclude": ["*.tmp"],
            "timeout": "10m",
        },
    }))
    env = {k: v for k, v in batch_node.env(**remote_env(blob_remote)).items() if k != "AZ_BATCH_JOB_ID"}
    for _ in range(2):
        run(["prep", "--spec", str(spec)], env)
        assert tree(batch_node.shared / "from-spec") == {"reference/a.csv": b"a", "models/m.bin": b"m"}
