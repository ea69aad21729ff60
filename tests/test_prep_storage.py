"""prep against every store: a local folder and Azurite (the same tests, run twice each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import BatchNode, BlobRemote, Remote, remote_env, tree
from helpers import actions, report, run

BIG = 65 * 1024 * 1024 + 12345  # over 64 MiB: uploaded in blocks, so no Content-MD5 on Azurite

FILES = {
    "top.txt": b"top level\n",
    "nested/deeper/data.csv": b"a,b\n1,2\n",
    "nested/with space/file name.txt": b"spaces in names\n",
    "unicode/prix-€/donnée-ü.txt": "unicode ✓\n".encode(),
    "empty.bin": b"",
}


def _fill(remote: Remote, big: bytes | None = None) -> dict[str, bytes]:
    for name, data in FILES.items():
        remote.put(name, data)
    expected = {f"input/{k}": v for k, v in FILES.items()}
    if big is not None:
        remote.put("large/big.bin", big, blocks=True)
        expected["input/large/big.bin"] = big
    return expected


def _prep(node: BatchNode, remote: Remote, tmp_path: Path, *extra: str) -> dict:
    rep_path = tmp_path / "report.json"
    run(["prep", f"input={remote.url}", "--report", str(rep_path), "--progress-interval", "0", *extra],
        node.env(**remote_env(remote)))
    return report(rep_path)


def test_tree_lands_byte_identical_and_second_run_downloads_nothing(remote: Remote, batch_node: BatchNode,
                                                                   tmp_path: Path) -> None:
    big = os.urandom(BIG)
    expected = _fill(remote, big)

    first = _prep(batch_node, remote, tmp_path)
    assert tree(batch_node.job_dir) == expected
    assert first["downloaded"] == len(expected)
    assert first["bytes_downloaded"] == sum(len(v) for v in expected.values())
    by_name = {f["name"]: f for f in first["files"]}
    if isinstance(remote, BlobRemote):
        assert by_name["input/top.txt"]["verified"] is True  # single-put blobs carry Content-MD5
        assert by_name["input/large/big.bin"]["verified"] is False  # block blobs have none
    import base64
    import hashlib

    # the default (--md5 source) checks every Content-MD5 the source has, and hashes nothing else
    assert by_name["input/large/big.bin"]["md5"] is None
    if isinstance(remote, BlobRemote):
        assert by_name["input/top.txt"]["md5"] == base64.b64encode(hashlib.md5(expected["input/top.txt"]).digest()) \
            .decode()

    second = _prep(batch_node, remote, tmp_path)
    assert second["downloaded"] == 0
    assert second["skipped"] == len(expected)
    assert tree(batch_node.job_dir) == expected
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))


def test_replaced_blob_is_the_only_one_downloaded_again(remote: Remote, batch_node: BatchNode,
                                                        tmp_path: Path) -> None:
    expected = _fill(remote)
    _prep(batch_node, remote, tmp_path)
    remote.put("nested/deeper/data.csv", b"a,b\n3,4\n")
    expected["input/nested/deeper/data.csv"] = b"a,b\n3,4\n"

    rep = _prep(batch_node, remote, tmp_path)
    assert actions(rep, "download") == ["input/nested/deeper/data.csv"]
    assert rep["downloaded"] == 1
    assert "changed at the source" in next(f["reason"] for f in rep["files"] if f["action"] == "download")
    assert tree(batch_node.job_dir) == expected


def test_truncated_local_file_is_the_only_one_repaired(remote: Remote, batch_node: BatchNode,
                                                       tmp_path: Path) -> None:
    expected = _fill(remote)
    _prep(batch_node, remote, tmp_path)
    victim = batch_node.job_dir / "input" / "unicode" / "prix-€" / "donnée-ü.txt"
    with open(victim, "r+b") as fh:
        fh.truncate(3)

    rep = _prep(batch_node, remote, tmp_path)
    assert actions(rep, "download") == ["input/unicode/prix-€/donnée-ü.txt"]
    assert "modified locally" in next(f["reason"] for f in rep["files"] if f["action"] == "download")
    assert tree(batch_node.job_dir) == expected


def test_deleted_source_file_is_removed_but_task_files_stay(remote: Remote, batch_node: BatchNode,
                                                            tmp_path: Path) -> None:
    expected = _fill(remote)
    _prep(batch_node, remote, tmp_path)
    task_file = batch_node.job_dir / "input" / "nested" / "deeper" / "task-output.txt"
    task_file.write_bytes(b"written by a task")
    remote.delete("nested/deeper/data.csv")
    del expected["input/nested/deeper/data.csv"]
    expected["input/nested/deeper/task-output.txt"] = b"written by a task"

    rep = _prep(batch_node, remote, tmp_path)
    assert actions(rep, "remove") == ["input/nested/deeper/data.csv"]
    assert rep["removed"] == 1 and rep["downloaded"] == 0
    assert tree(batch_node.job_dir) == expected

    again = _prep(batch_node, remote, tmp_path)  # idempotent: nothing left to remove
    assert again["removed"] == 0 and again["downloaded"] == 0
    assert tree(batch_node.job_dir) == expected


def test_dry_run_plans_and_changes_nothing(remote: Remote, batch_node: BatchNode, tmp_path: Path) -> None:
    _fill(remote)
    result = run(["prep", f"input={remote.url}", "--dry-run"], batch_node.env(**remote_env(remote)))
    assert "[DRY RUN] download" in result.stdout
    assert "input/top.txt (missing locally)" in result.stdout
    assert not batch_node.job_dir.exists()
    assert list(batch_node.prep_wd.iterdir()) == []  # no report either


def test_filters_select_files(remote: Remote, batch_node: BatchNode, tmp_path: Path) -> None:
    _fill(remote)
    rep = _prep(batch_node, remote, tmp_path, "--include", "*.txt", "--exclude", "nested/**")
    assert sorted(f["name"] for f in rep["files"]) == ["input/top.txt", "input/unicode/prix-€/donnée-ü.txt"]
    assert sorted(tree(batch_node.job_dir)) == ["input/top.txt", "input/unicode/prix-€/donnée-ü.txt"]


def test_default_report_goes_to_the_task_working_dir(remote: Remote, batch_node: BatchNode) -> None:
    _fill(remote)
    run(["prep", remote.url, "--progress-interval", "0"], batch_node.env(**remote_env(remote)))
    rep = report(batch_node.prep_wd / "nodekit-prep.json")
    assert {"downloaded", "skipped", "removed", "bytes_downloaded", "retries", "files"} <= set(rep)
    assert rep["downloaded"] == len(FILES)


@pytest.mark.parametrize("count", [2])
def test_several_sources_each_in_their_own_folder(tmp_path: Path, batch_node: BatchNode, count: int,
                                                  blob_remote: BlobRemote) -> None:
    local = tmp_path / "local-src"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "x.txt").write_bytes(b"x")
    blob_remote.put("y.txt", b"y")
    rep_path = tmp_path / "r.json"
    run(["prep", f"ref={blob_remote.url}", str(local), "--report", str(rep_path)],
        batch_node.env(**remote_env(blob_remote)))
    assert tree(batch_node.job_dir) == {"ref/y.txt": b"y", "local-src/sub/x.txt": b"x"}
    assert len(report(rep_path)["sources"]) == count
