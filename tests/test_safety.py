"""The README's strongest promises, each held by a test through the command line and real folders
or Azurite: links inside the job's folders change nothing outside them; a release re-run never
overwrites what it kept; what storage holds is read back before anything is wiped; partial files of
a killed run are swept; no secret reaches a log line or a report; a large blob with a wrong MD5 and a
disk too small are caught before anything lands under a final name."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from azurite import free_port
from conftest import ROOT, BatchNode, BlobRemote, LocalRemote, Remote, remote_env, tree
from faultproxy import FaultProxy, Rule
from helpers import report, run

MIB = 1024 * 1024


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    """Everything under `root` (links as links, never followed), to compare before and after."""
    out: dict[str, tuple[str, bytes | str]] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_file():
                out[rel] = ("file", path.read_bytes())
            else:
                out[rel] = ("dir", b"")
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Data outside every job folder, which no nodekit command may change."""
    root = tmp_path / "outside"
    (root / "folder").mkdir(parents=True)
    (root / "folder" / "a.txt").write_text("precious a")
    (root / "folder" / "old.txt").write_text("precious old")
    (root / "folder" / ".x.bin.nodekit-partial").write_text("not ours")
    (root / "secret.txt").write_text("precious file")
    return root


# -- the path guard ----------------------------------------------------------------------------------------
def test_a_missing_batch_variable_names_the_option_that_stands_in_for_it(tmp_path: Path) -> None:
    src = LocalRemote(tmp_path / "src")
    src.put("a.txt", b"a")
    result = run(["prep", f"in={src.url}"], {"AZ_BATCH_JOB_ID": "j"}, ok=False)
    assert result.exit_code == 3
    assert result.stderr == ("Error: AZ_BATCH_NODE_SHARED_DIR is not set: run this on a Batch node, or pass "
                             "--shared-dir for a local run.\n")


@pytest.mark.parametrize(("shared", "message"), [
    ("missing", "does not exist"),
    ("a-file/shared", "does not exist"),
    ("x" * 300, "cannot be used: File name too long"),
    ("loop", "cannot be used"),
    ("a-file", "is not a folder"),
])
def test_an_unusable_shared_directory_is_refused_with_exit_3(tmp_path: Path, shared: str, message: str) -> None:
    (tmp_path / "a-file").write_text("a file")
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    src = LocalRemote(tmp_path / "src")
    src.put("a.txt", b"a")
    env = {"AZ_BATCH_NODE_SHARED_DIR": str(tmp_path / shared), "AZ_BATCH_JOB_ID": "j"}
    result = run(["prep", f"in={src.url}"], env, ok=False)
    assert result.exit_code == 3, result.output
    assert message in result.stderr and result.stderr.count("Error:") == 1


def test_a_relative_dest_is_taken_inside_the_shared_directory_and_may_not_leave_it(batch_node: BatchNode,
                                                                                     tmp_path: Path) -> None:
    src = LocalRemote(tmp_path / "src")
    src.put("a.txt", b"a")
    env = batch_node.env()
    # folders no job owns (a name that is not a Batch id, issue 16: no release wipes them)
    run(["prep", f"in={src.url}", "--dest", "else.where/job-x", "--progress-interval", "0"], env)
    assert (batch_node.shared / "else.where" / "job-x" / "in" / "a.txt").read_bytes() == b"a"
    run(["prep", f"in={src.url}", "--dest", str(batch_node.shared / "abs.data"), "--progress-interval", "0"], env)
    assert (batch_node.shared / "abs.data" / "in" / "a.txt").read_bytes() == b"a"
    before = _snapshot(tmp_path / "node")
    for dest in ("../escaped", ".", str(tmp_path / "outside-dest"), "else.where/../.."):
        result = run(["prep", f"in={src.url}", "--dest", dest], env, ok=False)
        assert result.exit_code == 6, (dest, result.output)
        assert "is not inside" in result.stderr, dest
    assert _snapshot(tmp_path / "node") == before
    assert not (tmp_path / "outside-dest").exists() and not (batch_node.root / "escaped").exists()


# -- prep: links, the landing of a file, a wrong MD5, a disk too small -------------------------------------
def test_prep_never_writes_through_a_linked_folder(remote: Remote, batch_node: BatchNode, outside: Path,
                                                    tmp_path: Path) -> None:
    before = _snapshot(outside)
    remote.put("sub/a.txt", b"from the source")
    remote.put("top.txt", b"top")
    (batch_node.job_dir / "in").mkdir(parents=True)
    (batch_node.job_dir / "in" / "sub").symlink_to(outside / "folder")  # a task left a link where a folder goes
    result = run(["prep", f"in={remote.url}", "--progress-interval", "0"], batch_node.env(**remote_env(remote)),
                 ok=False)
    assert result.exit_code == 6, result.output
    assert "symbolic link" in result.stderr and result.stderr.count("Error:") == 1
    assert _snapshot(outside) == before  # no file written there, not even a temporary one


def test_a_folder_replaced_by_a_link_after_prep_is_neither_written_nor_emptied(
        remote: Remote, batch_node: BatchNode, outside: Path, tmp_path: Path) -> None:
    remote.put("sub/a.txt", b"version 1")
    remote.put("sub/old.txt", b"old one")
    remote.put("zz.txt", b"removed after the one left alone")
    env = batch_node.env(**remote_env(remote))
    run(["prep", f"in={remote.url}", "--progress-interval", "0"], env)
    sub = batch_node.job_dir / "in" / "sub"
    # the folder nodekit filled is replaced by a link to a folder outside that holds files of the same
    # names, sizes and times: what prep recorded would match them
    for name in ("a.txt", "old.txt"):
        shutil.copy2(sub / name, outside / "folder" / name)
    shutil.rmtree(sub)
    sub.symlink_to(outside / "folder")
    before = _snapshot(outside)
    remote.delete("zz.txt")
    remote.delete("sub/old.txt")  # prep would remove it...
    remote.put("sub/a.txt", b"version 2, longer")  # ...and download this one again
    rep_path = tmp_path / "r.json"
    result = run(["prep", f"in={remote.url}", "--progress-interval", "0", "--report", str(rep_path)], env, ok=False)
    assert result.exit_code == 6, result.output
    assert _snapshot(outside) == before
    removal = [f for f in report(rep_path)["files"] if f["name"] == "in/sub/old.txt"]
    assert removal and removal[0]["action"] == "keep" and "symbolic link" in removal[0]["reason"]
    assert not (batch_node.job_dir / "in" / "zz.txt").exists()  # the removals after it went on


def _source_mtime_ns(remote: Remote, name: str) -> int:
    if isinstance(remote, BlobRemote):
        props = remote.client.get_blob_client(name).get_blob_properties()
        return int(props.last_modified.timestamp()) * 1_000_000_000
    assert isinstance(remote, LocalRemote)
    return os.stat(remote.root / name).st_mtime_ns


def stat_mode(st: os.stat_result) -> int:
    return st.st_mode & 0o777


def test_landed_files_carry_the_sources_time_and_are_writable_without_the_cache(remote: Remote,
                                                                                  batch_node: BatchNode) -> None:
    files = {"small.txt": b"small", "deep/er/mid.bin": os.urandom(300_000)}
    if isinstance(remote, BlobRemote):
        files["big.bin"] = os.urandom(17 * MIB)  # ranged
    for name, data in files.items():
        remote.put(name, data, blocks=len(data) > 4 * MIB)
    env = batch_node.env(**remote_env(remote))
    rep_path = batch_node.root / "r.json"
    run(["prep", f"in={remote.url}", "--no-cache", "--progress-interval", "0", "--report", str(rep_path),
         "--md5", "all"], env)  # every file's MD5 recorded (the default records only what the source can check)
    recorded = {f["name"]: f["md5"] for f in report(rep_path)["files"]}
    for name, data in files.items():
        landed = batch_node.job_dir / "in" / name
        assert landed.read_bytes() == data
        assert recorded[f"in/{name}"] == _md5(data), name
        st = os.stat(landed)
        assert abs(st.st_mtime_ns - _source_mtime_ns(remote, name)) < 1000, name  # to the microsecond
        assert stat_mode(st) == 0o644, name
    run(["prep", f"in={remote.url}", "--job-id", "job-2", "--progress-interval", "0"], env)  # cached: read-only
    assert {stat_mode(os.stat(batch_node.shared / "job-2" / "in" / n)) for n in files} == {0o444}


def test_a_folder_or_a_file_in_the_way_ends_with_8_and_is_left_alone(remote: Remote, batch_node: BatchNode) -> None:
    remote.put("x.txt", b"x")
    remote.put("d/y.txt", b"y")
    job_in = batch_node.job_dir / "in"
    (job_in / "x.txt").mkdir(parents=True)  # a task made a folder where the source has a file
    (job_in / "x.txt" / "kept").write_text("the task's")
    if isinstance(remote, BlobRemote):  # a large one too (fetched as ranges)
        remote.put("big.bin", os.urandom(17 * MIB), blocks=True)
        (job_in / "big.bin").mkdir()
    (job_in / "d").write_text("a file where the source has a folder")
    result = run(["prep", f"in={remote.url}", "--progress-interval", "0"], batch_node.env(**remote_env(remote)),
                 ok=False)
    assert result.exit_code == 8, result.output
    assert ("is a folder where the source has a file" in result.stderr
            or "is a file where nodekit needs a folder" in result.stderr)
    assert (job_in / "x.txt" / "kept").read_text() == "the task's"
    assert (job_in / "d").read_text() == "a file where the source has a folder"
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))
    (job_in / "d").unlink()
    result = run(["prep", f"in={remote.url}", "--progress-interval", "0"], batch_node.env(**remote_env(remote)),
                 ok=False)
    assert result.exit_code == 8 and "is a folder where the source has a file" in result.stderr, result.output
    assert (job_in / "d" / "y.txt").read_bytes() == b"y"


def test_a_wrong_md5_is_fetched_again_a_bounded_number_of_times_then_fails_with_7_and_lands_nowhere(
        proxy: FaultProxy, blob_remote: BlobRemote, batch_node: BatchNode) -> None:
    from azure.storage.blob import ContentSettings

    sizes = {"big.bin": 17 * MIB, "small.bin": 9000}  # over 16 MiB: fetched as ranges, hashed as they complete
    for name, size in sizes.items():
        blob_remote.put(name, os.urandom(size), blocks=size > 4 * MIB)
        wrong = bytearray(hashlib.md5(b"something else").digest())
        blob_remote.client.get_blob_client(name).set_http_headers(ContentSettings(content_md5=wrong))
    blob_remote.put("good.bin", b"good")
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
    for name, size in sizes.items():  # one at a time: the first fatal error stops the rest of a run
        result = run(["prep", f"in={via}", "--include", name, "--include", "good.bin", "--progress-interval", "0"],
                     batch_node.env(**remote_env(blob_remote)), ok=False)
        assert result.exit_code == 7, result.output
        assert "does not match the source's Content-MD5" in result.stderr
        served = proxy.bytes_by_path[f"/devstoreaccount1/{blob_remote.container}/{name}"]
        assert 2 * size <= served <= 4 * size, (name, served / size)  # fetched again, but not forever
        assert not (batch_node.job_dir / "in" / name).exists()
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))
    state = batch_node.job_dir / ".nodekit" / "state.json"
    assert "big.bin" not in (state.read_text() if state.exists() else "")


def test_a_body_damaged_once_in_transit_is_fetched_again_and_lands_whole(proxy: FaultProxy, blob_remote: BlobRemote,
                                                                          batch_node: BatchNode) -> None:
    data = os.urandom(300_000)  # put whole: it has a Content-MD5; over 256 KiB: part is on disk before the check
    blob_remote.put("a.bin", data)
    proxy.set_rules([Rule("flip", pattern=r"/a\.bin$", max_count=1)])
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
    run(["prep", f"in={via}", "--progress-interval", "0"], batch_node.env(**remote_env(blob_remote)))
    assert proxy.counts["flip"] == 1
    assert proxy.bytes_by_path[f"/devstoreaccount1/{blob_remote.container}/a.bin"] == 2 * len(data)
    assert (batch_node.job_dir / "in" / "a.bin").read_bytes() == data  # the second copy only, from its first byte
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))


@pytest.mark.parametrize("name", ["big.bin", "small.txt"])
def test_a_blob_storage_no_longer_serves_fails_the_run_and_lands_nowhere(name: str, proxy: FaultProxy,
                                                                         blob_remote: BlobRemote,
                                                                         batch_node: BatchNode) -> None:
    blob_remote.put("big.bin", os.urandom(17 * MIB), blocks=True)  # over 16 MiB: fetched as ranges
    blob_remote.put("small.txt", b"small")
    proxy.set_rules([Rule("404", pattern=rf"^GET \S*/{re.escape(name)}")])  # listed, then gone (every range)
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
    result = run(["prep", f"in={via}", "--progress-interval", "0"], batch_node.env(**remote_env(blob_remote)),
                 ok=False)
    assert result.exit_code == 4, result.output
    assert name in result.stderr
    assert not (batch_node.job_dir / "in" / name).exists()
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))


def test_two_local_sources_each_land_their_own_files(batch_node: BatchNode, tmp_path: Path) -> None:
    for folder in ("first", "second"):
        (tmp_path / folder / "sub").mkdir(parents=True)
        (tmp_path / folder / "sub" / "same-name.txt").write_text(f"from {folder}")
    run(["prep", f"first={tmp_path / 'first'}", f"second={tmp_path / 'second'}", "--progress-interval", "0"],
        batch_node.env())
    assert tree(batch_node.job_dir) == {"first/sub/same-name.txt": b"from first",
                                        "second/sub/same-name.txt": b"from second"}


def test_a_download_larger_than_the_free_disk_is_refused_before_writing_anything(batch_node: BatchNode,
                                                                                   tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("small")
    free = shutil.disk_usage(tmp_path).free
    with open(src / "huge.bin", "wb") as fh:  # sparse: its size costs no disk
        os.truncate(fh.fileno(), min(free + 64 * 1024**3, 15 * 1024**4))
    rep_path = tmp_path / "r.json"
    result = run(["prep", f"in={src}", "--report", str(rep_path)], batch_node.env(), ok=False)
    assert result.exit_code == 8, result.output
    assert "is free" in result.stderr and "the download needs" in result.stderr
    written = [p for p in batch_node.job_dir.rglob("*") if p.is_file() and ".nodekit" not in p.parts]
    assert written == []


@pytest.mark.parametrize("md5", ["all", "source"])
def test_a_large_blob_is_fetched_once_in_ranges(proxy: FaultProxy, blob_remote: BlobRemote, batch_node: BatchNode,
                                                  md5: str, tmp_path: Path) -> None:
    data = os.urandom(40 * MIB)  # uploaded in blocks: no Content-MD5 to check against
    blob_remote.put("big.bin", data, blocks=True)
    blob_remote.put("small.bin", b"small, with a Content-MD5")
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
    rep_path = tmp_path / "r.json"
    run(["prep", f"in={via}", "--md5", md5, "--report", str(rep_path), "--progress-interval", "0"],
        batch_node.env(**remote_env(blob_remote)))
    assert (batch_node.job_dir / "in" / "big.bin").read_bytes() == data
    for name, size in (("big.bin", len(data)), ("small.bin", 25)):
        assert proxy.bytes_by_path[f"/devstoreaccount1/{blob_remote.container}/{name}"] == size, name  # once
    entries = {f["name"]: f for f in report(rep_path)["files"]}
    assert (entries["in/big.bin"]["verified"], entries["in/big.bin"]["md5"]) == (
        False, _md5(data) if md5 == "all" else None)
    assert entries["in/small.bin"]["verified"] is True and report(rep_path)["retries"] == 0


def test_a_cached_file_with_a_folder_in_its_way_ends_with_8(batch_node: BatchNode, tmp_path: Path) -> None:
    src = LocalRemote(tmp_path / "src")
    src.put("x.txt", b"x")
    env = batch_node.env()
    run(["prep", f"in={src.url}", "--progress-interval", "0"], env)  # now in the node's cache
    (batch_node.shared / "job-2" / "in" / "x.txt").mkdir(parents=True)
    result = run(["prep", f"in={src.url}", "--job-id", "job-2", "--progress-interval", "0"], env, ok=False)
    assert result.exit_code == 8, result.output
    assert "x.txt is a folder where the source has a file" in result.stderr
    assert "could not place in/x.txt from the cache" in result.stderr


def test_names_too_long_for_the_disk_are_refused_up_front(blob_remote: BlobRemote, batch_node: BatchNode) -> None:
    """Issue 15: a segment over the file system's 255 bytes is refused with the other unsafe names, exit 6,
    before anything is written (it was exit 8, "File name too long", from the first file it reached)."""
    for name in ("f" * 300 + "/x.txt", "n" * 300 + ".txt"):  # a blob name may be 1,024 characters; a file 255
        blob_remote.put(name, b"x")
        result = run(["prep", f"in={blob_remote.url}", "--progress-interval", "0"],
                     batch_node.env(**remote_env(blob_remote)), ok=False)
        assert result.exit_code == 6, result.output
        assert "longer than the file system's 255 bytes" in result.stderr and result.stderr.count("Error:") == 1
        assert not batch_node.job_dir.exists()
        blob_remote.delete(name)


class _NoDatesHandler(http.server.BaseHTTPRequestHandler):
    """A server that says nothing usable about when its file changed (no ETag; no Last-Modified, or
    `last_modified`, text that is no date)."""

    body = b"generated on request\n"
    gets = 0
    last_modified: str | None = None

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        if self.last_modified is not None:
            self.send_header("Last-Modified", self.last_modified)
        self.end_headers()

    def do_GET(self) -> None:
        type(self).gets += 1
        self.do_HEAD()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("last_modified", [None, "sometime last week"])
def test_a_url_without_a_modification_time_lands_with_the_time_of_its_download(batch_node: BatchNode,
                                                                              last_modified: str | None) -> None:
    handler = type("Handler", (_NoDatesHandler,), {"last_modified": last_modified, "gets": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = time.time_ns()
        run(["prep", f"gen=http://127.0.0.1:{server.server_address[1]}/report.csv", "--progress-interval", "0"],
            batch_node.env())
    finally:
        server.shutdown()
        server.server_close()
    landed = batch_node.job_dir / "gen" / "report.csv"
    assert landed.read_bytes() == _NoDatesHandler.body
    assert os.stat(landed).st_mtime_ns >= before - 1_000_000_000
    assert handler.gets == 1  # fetched once, checked once


def test_a_file_refused_once_on_the_fast_path_is_fetched_again_and_lands(proxy: FaultProxy, blob_remote: BlobRemote,
                                                                          batch_node: BatchNode) -> None:
    blob_remote.put("a.txt", b"once refused")
    blob_remote.put("b.txt", b"never refused")
    proxy.set_rules([Rule("503", pattern=r"/a\.txt$", max_count=1, retry_after=1)])
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
    started = time.monotonic()
    run(["prep", f"in={via}", "--progress-interval", "0"], batch_node.env(**remote_env(blob_remote)))
    assert time.monotonic() - started >= 1.0  # its Retry-After was believed before asking again
    assert proxy.counts["503"] == 1
    assert tree(batch_node.job_dir) == {"in/a.txt": b"once refused", "in/b.txt": b"never refused"}


def test_a_write_refused_by_the_disk_ends_with_8_and_leaves_no_partial_file(batch_node: BatchNode,
                                                                             tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.bin").write_bytes(os.urandom(300 * 1024))  # under 16 MiB: streamed in one piece

    def limit_file_size() -> None:  # this process may not write a file past 100 KiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, 100 * 1024))

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))},
           **batch_node.env()}
    out = subprocess.run([sys.executable, "-m", "nodekit", "prep", f"in={src}", "--no-cache"], env=env, cwd=ROOT,
                         capture_output=True, text=True, preexec_fn=limit_file_size)
    assert out.returncode == 8, out.stderr
    assert "a file-size limit was reached" in out.stderr and out.stderr.count("Error:") == 1
    assert not (batch_node.job_dir / "in" / "small.bin").exists()
    assert not list(batch_node.job_dir.rglob("*.nodekit-partial"))


# -- prep: re-runs, removals, partial files of a killed run ------------------------------------------------
def test_a_warm_rerun_reports_what_was_verified_when_each_file_landed(blob_remote: BlobRemote, batch_node: BatchNode,
                                                                       tmp_path: Path) -> None:
    blob_remote.put("a.txt", b"checked against its Content-MD5")
    rep_path = tmp_path / "r.json"
    env = batch_node.env(**remote_env(blob_remote))
    for _ in range(2):
        run(["prep", f"in={blob_remote.url}", "--report", str(rep_path), "--progress-interval", "0"], env)
    files = report(rep_path)["files"]
    assert [(f["action"], f["verified"], f["md5"]) for f in files] == [
        ("skip", True, _md5(b"checked against its Content-MD5"))]


def test_files_gone_from_the_source_are_removed_with_the_folders_they_emptied(remote: Remote,
                                                                               batch_node: BatchNode) -> None:
    for name in ("keep.txt", "a-deleted-by-a-task.txt", "gone/deep/er/a.txt", "gone/deep/b.txt", "half/c.txt"):
        remote.put(name, name.encode())
    env = batch_node.env(**remote_env(remote))
    run(["prep", f"in={remote.url}", "--progress-interval", "0"], env)
    job_in = batch_node.job_dir / "in"
    (job_in / "half" / "task.out").write_text("a task's file")  # keeps its folder
    (job_in / "a-deleted-by-a-task.txt").unlink()  # gone on both sides: only its record goes
    for name in ("a-deleted-by-a-task.txt", "gone/deep/er/a.txt", "gone/deep/b.txt", "half/c.txt"):
        remote.delete(name)
    run(["prep", f"in={remote.url}", "--progress-interval", "0"], env)
    assert sorted(p.relative_to(job_in).as_posix() for p in job_in.rglob("*")) == [
        "half", "half/task.out", "keep.txt"]


def test_partial_files_of_a_killed_run_are_swept_and_nothing_else(batch_node: BatchNode, outside: Path,
                                                                  tmp_path: Path) -> None:
    src = LocalRemote(tmp_path / "src")
    src.put("a.txt", b"a")
    src.put("deep/b.txt", b"b")
    env = batch_node.env()
    run(["prep", f"in={src.url}", "--progress-interval", "0"], env)
    job = batch_node.job_dir
    # what a run killed mid-download leaves: its marker and temporary files, in any folder
    leftovers = [job / "in" / ".a.txt.nodekit-partial", job / "in" / "deep" / ".c.bin.nodekit-partial",
                 job / ".x.nodekit-partial", job / "in" / ".nodekit" / ".y.nodekit-partial"]  # a blob prefix may
    (job / "in" / ".nodekit").mkdir()  # be called .nodekit: only the job folder's own is nodekit's state
    for p in leftovers:
        p.write_bytes(b"half a file")
    (job / "in" / "task-output.txt").write_text("a task's file")
    (job / "in" / "linked").symlink_to(outside / "folder")  # holds a partial-looking file of its own
    (job / ".nodekit" / "running").touch()
    (job / ".nodekit" / ".kept.nodekit-partial").write_text("nodekit's own folder is never swept")
    before = _snapshot(outside)
    rep_path = tmp_path / "r.json"
    run(["prep", f"in={src.url}", "--progress-interval", "0", "--report", str(rep_path)], env)
    assert [p for p in leftovers if p.exists()] == []
    assert report(rep_path)["swept_partial_files"] == 4
    assert (job / "in" / "task-output.txt").read_text() == "a task's file"
    assert _snapshot(outside) == before
    assert not (job / ".nodekit" / "running").exists()
    assert (job / ".nodekit" / ".kept.nodekit-partial").exists()

    # after a run that finished, a file of that shape is nobody's leftover: it stays
    (job / "in" / ".mine.nodekit-partial").write_text("a task named it so")
    run(["prep", f"in={src.url}", "--progress-interval", "0", "--report", str(rep_path)], env)
    assert (job / "in" / ".mine.nodekit-partial").exists()
    assert report(rep_path)["swept_partial_files"] == 0


# -- the node cache's tamper check and repair --------------------------------------------------------------
def test_the_cache_hands_out_only_objects_whose_stat_still_matches_and_repairs_leftovers(
        batch_node: BatchNode, tmp_path: Path) -> None:
    src = LocalRemote(tmp_path / "src")
    data = {f"f{i}.bin": os.urandom(1000 + i) for i in range(4)}
    for name, content in data.items():
        src.put(name, content)
    env = batch_node.env()

    def prep(job: str) -> dict:
        rep_path = tmp_path / f"{job}.json"
        run(["prep", f"in={src.url}", "--job-id", job, "--report", str(rep_path), "--progress-interval", "0",
             "--md5", "all"], env)
        assert tree(batch_node.shared / job) == {f"in/{k}": v for k, v in data.items()}, job
        return report(rep_path)

    assert prep("job-a")["cache"]["added"] == 4
    cache = batch_node.shared / ".nodekit-cache"
    index = cache / "index.jsonl"
    objects = sorted(p for p in (cache / "objects").rglob("*") if p.is_file())
    assert len(objects) == 4 and len(index.read_text().splitlines()) == 4
    by_content = {p.read_bytes(): p for p in objects}
    # what tasks and kills can leave: an object written into (same size, new time), one replaced by a
    # file of the same size and time (a new inode), one gone, an object nobody recorded, a torn last
    # line, a compaction's temporary file
    touched, replaced, gone, dropped = (by_content[data[f"f{i}.bin"]] for i in range(4))
    st = os.stat(touched)
    os.chmod(touched, 0o644)
    touched.write_bytes(b"X" * st.st_size)  # in place: the same inode and size, a new time
    st = os.stat(replaced)
    os.unlink(replaced)
    replaced.write_bytes(b"Y" * st.st_size)
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns))
    gone.unlink()
    orphan = cache / "objects" / "ff" / ("ff" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"never recorded")
    with open(index, "a") as fh:  # lines that say nothing, then ones that still count: the last word wins
        fh.write('{"k": "torn\n{}\n[1]\n"text"\n')
        fh.write(json.dumps({"k": dropped.name, "drop": True}) + "\n")
        fh.write(json.dumps({"k": dropped.name, "t": 1}) + "\n")  # a use after the drop: nothing to update
    (cache / "index.jsonl.999.tmp").write_text("half a compaction")
    (cache / "objects" / "stray.txt").write_text("not an object folder")
    outside_objects = tmp_path / "outside-objects"
    outside_objects.mkdir()
    (outside_objects / "precious").write_text("not the cache's")
    (cache / "objects" / "zz").symlink_to(outside_objects)  # never followed, never emptied

    second = prep("job-b")  # exactly the right bytes, all four downloaded again
    assert (second["downloaded"], second["from_cache"]) == (4, 0)
    assert not orphan.exists() and not (cache / "index.jsonl.999.tmp").exists()
    assert (outside_objects / "precious").read_text() == "not the cache's"
    lines = [json.loads(line) for line in index.read_text().splitlines()]  # every line whole again
    assert all(isinstance(line, dict) and "k" in line for line in lines)
    assert len({line["k"] for line in lines if "size" in line}) == 4
    third = prep("job-c")  # the repaired cache serves everything, with the MD5 recorded when it was cached
    assert (third["downloaded"], third["from_cache"]) == (0, 4)
    assert {f["name"]: f["md5"] for f in third["files"]} == {f"in/{k}": _md5(v) for k, v in data.items()}


def test_a_cached_object_that_cannot_be_linked_into_place_is_copied(batch_node: BatchNode, tmp_path: Path) -> None:
    src = LocalRemote(tmp_path / "src")
    src.put("f.bin", b"the right bytes")
    env = batch_node.env()
    run(["prep", f"in={src.url}", "--progress-interval", "0"], env)
    landed = batch_node.job_dir / "in" / "f.bin"
    landed.unlink()
    landed.write_bytes(b"a task's version")  # a new file (the cached object is untouched): to be repaired
    (landed.parent / ".f.bin.nodekit-partial").write_text("in the way of the link")  # link(2) refuses: EEXIST
    rep_path = tmp_path / "r.json"
    result = run(["-v", "prep", f"in={src.url}", "--progress-interval", "0", "--report", str(rep_path)], env)
    assert landed.read_bytes() == b"the right bytes"
    assert "from the cache in/f.bin (15 B, unverified: the source has no checksum" in result.stdout
    assert "downloaded in/f.bin" not in result.stdout
    entry = next(f for f in report(rep_path)["files"] if f["name"] == "in/f.bin")
    assert entry["action"] == "download" and entry.get("from_cache") is True  # copied from the cache
    assert os.stat(landed).st_nlink == 1  # a copy, not a link
    assert not (landed.parent / ".f.bin.nodekit-partial").exists()


def test_the_cache_index_is_rewritten_when_a_repair_or_its_history_calls_for_it_and_only_then(
        batch_node: BatchNode, tmp_path: Path) -> None:
    src = LocalRemote(tmp_path / "src")
    for i in range(4):
        src.put(f"f{i}.bin", os.urandom(100 + i))
    env = batch_node.env()
    cache = batch_node.shared / ".nodekit-cache"
    index = cache / "index.jsonl"

    def prep(job: str) -> str:
        result = run(["prep", f"in={src.url}", "--job-id", job, "--progress-interval", "0"], env)
        assert len(tree(batch_node.shared / job)) == 4
        return result.stdout

    def lines() -> int:
        return len(index.read_text().splitlines())

    prep("job-a")
    first = index.read_text()
    prep("job-b")  # four uses, appended: nothing to repair, nothing rewritten
    assert index.read_text().startswith(first) and lines() == 8
    prep("job-b2")  # half of it history now, still far from worth a rewrite
    assert index.read_text().startswith(first) and lines() == 12
    (cache / "index.jsonl.7.tmp").write_text("a compaction cut short")
    assert "cache: repaired 1 leftover(s) of an interrupted run" in prep("job-c")
    assert lines() == 4 + 4  # rewritten as its four live records, then job-c's uses
    orphan = cache / "objects" / "ee" / ("ee" + "1" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"linked but never recorded")
    assert "cache: repaired 1 leftover(s)" in prep("job-d")
    assert lines() == 4 + 4 and not orphan.exists()
    objects = sorted(p for p in (cache / "objects").rglob("*") if p.is_file())
    objects[0].unlink()  # recorded, but gone
    assert "cache: repaired 1 leftover(s)" in prep("job-e")
    assert lines() == 3 + 3 + 1  # three live records; three uses; the one downloaded again, recorded
    with open(index, "a") as fh:  # mostly history: a thousand and more uses of four objects
        fh.writelines(json.dumps({"k": objects[1].name, "t": n}) + "\n" for n in range(1100))
    prep("job-f")
    assert lines() == 4 + 4


# -- release: links, its own folder, the wipe's reserve ----------------------------------------------------
@dataclass
class SmallNode:
    """A release node with small logs and a small dump (quick to upload again and again)."""

    node: BatchNode
    work: Path
    own: Path

    def env(self, **extra: str) -> dict[str, str]:
        return self.node.env(AZ_BATCH_TASK_ID="jobrelease", AZ_BATCH_TASK_DIR=str(self.own),
                             AZ_BATCH_TASK_WORKING_DIR=str(self.own / "wd"), **extra)


@pytest.fixture
def small_node(batch_node: BatchNode) -> SmallNode:
    work = batch_node.root / "workitems" / batch_node.job_id / "job-1"
    for task in ("jobpreparation", "task001", "task002"):
        (work / task / "wd").mkdir(parents=True, exist_ok=True)
        (work / task / "stdout.txt").write_text(f"{task} out\n")
        (work / task / "stderr.txt").write_text(f"{task} err\n")
    (work / "task001" / "wd" / "app.log").write_text("log of task001\n")
    (work / "task002" / "wd" / "core").write_bytes(os.urandom(64 * 1024) + bytes(3 * MIB))
    own = work / "jobrelease"
    (own / "wd").mkdir(parents=True)
    (batch_node.job_dir / "input").mkdir(parents=True)
    (batch_node.job_dir / "input" / "data.bin").write_bytes(b"input")
    return SmallNode(batch_node, work, own)


def _archive_names(data: bytes) -> list[str]:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz, tarfile.open(fileobj=gz) as tar:
        return sorted(tar.getnames())


def test_release_wipes_links_but_never_follows_them(small_node: SmallNode, outside: Path, tmp_path: Path) -> None:
    sn = small_node
    # a working folder that is itself a link, a task folder that is a link, links inside the job folder
    shutil.rmtree(sn.work / "task002" / "wd")
    (sn.work / "task002" / "wd").symlink_to(outside / "folder")
    (sn.work / "task003").symlink_to(outside)
    (sn.node.job_dir / "input" / "to-folder").symlink_to(outside / "folder")
    (sn.node.job_dir / "to-file").symlink_to(outside / "secret.txt")
    before = _snapshot(outside)
    dest = tmp_path / "kept"
    run(["release", "--upload-to", str(dest), "--wipe-task-dirs", "--logs", "**/*.txt"], sn.env())
    assert _snapshot(outside) == before
    assert not sn.node.job_dir.exists()
    assert not os.path.lexists(sn.work / "task001" / "wd")
    assert not os.path.lexists(sn.work / "task002" / "wd")  # the link is gone, what it pointed to is not
    assert (sn.work / "task003").is_symlink()  # not a task folder of this job: not touched
    assert (sn.work / "task002" / "stdout.txt").exists()
    names = _archive_names((dest / "job-1" / "tvm-1" / "logs.tar.gz").read_bytes())
    assert not [n for n in names if "task003" in n or "a.txt" in n or "old.txt" in n]


def test_release_never_collects_a_log_or_dump_that_is_a_link(small_node: SmallNode, outside: Path,
                                                               tmp_path: Path) -> None:
    sn = small_node
    (sn.work / "task001" / "stdout.txt").unlink()
    (sn.work / "task001" / "stdout.txt").symlink_to(outside / "secret.txt")
    (sn.work / "task001" / "wd" / "linked.log").symlink_to(outside / "secret.txt")
    (sn.work / "task001" / "wd" / "core.42").symlink_to(outside / "secret.txt")
    (sn.work / "task001" / "wd" / "logs").symlink_to(outside / "folder")  # a folder of "logs" elsewhere
    (sn.work / "task001" / "wd" / "zz.log").write_text("a log after the links")
    dest = tmp_path / "kept"
    rep_path = tmp_path / "r.json"
    run(["release", "--upload-to", str(dest), "--logs", "**/*.log", "--logs", "**/*.txt", "--report",
         str(rep_path)], sn.env())
    kept = dest / "job-1" / "tvm-1"
    names = _archive_names((kept / "logs.tar.gz").read_bytes())
    assert names == ["job-1/jobpreparation/stderr.txt", "job-1/jobpreparation/stdout.txt",
                     "job-1/task001/stderr.txt", "job-1/task001/wd/app.log", "job-1/task001/wd/zz.log",
                     "job-1/task002/stderr.txt", "job-1/task002/stdout.txt"]
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "dumps/job-1/task002/wd/core.gz", "logs.tar.gz", "manifest.json"]
    assert b"precious" not in b"".join(p.read_bytes() for p in kept.rglob("*") if p.is_file() and p.suffix != ".gz")
    assert b"precious" not in gzip.decompress((kept / "logs.tar.gz").read_bytes())
    assert report(rep_path)["dumps"] == ["job-1/task002/wd/core"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_wipe_target_holding_the_release_tasks_own_folder_is_refused_before_anything(
        small_node: SmallNode, tmp_path: Path, dry_run: bool) -> None:
    sn = small_node
    own = sn.node.job_dir / "release-task"  # the release task's folder inside the job's shared folder
    (own / "wd").mkdir(parents=True)
    before = _snapshot(sn.node.root)
    dest = tmp_path / "kept"
    env = {**sn.env(), "AZ_BATCH_TASK_DIR": str(own), "AZ_BATCH_TASK_WORKING_DIR": str(own / "wd")}
    result = run(["release", "--upload-to", str(dest), *(["--dry-run"] if dry_run else [])], env, ok=False)
    assert result.exit_code == 6, result.output
    assert "holds the release task's own folder" in result.stderr
    assert not dest.exists() and _snapshot(sn.node.root) == before


def test_a_short_deadline_keeps_back_a_fifth_for_the_wipe_and_no_more(small_node: SmallNode, tmp_path: Path) -> None:
    """--deadline 10s: 2 s are kept for the wipe, 8 s are enough to keep a small job's logs and dump."""
    sn = small_node
    rep_path = tmp_path / "r.json"
    run(["release", "--upload-to", str(tmp_path / "kept"), "--deadline", "10s", "--report", str(rep_path)], sn.env())
    rep = report(rep_path)
    assert rep["skipped"] == [] and rep["exit_code"] == 0
    assert sorted(u["name"] for u in rep["uploaded"]) == ["dumps/job-1/task002/wd/core.gz", "logs.tar.gz"]
    assert rep["wiped"] == [str(sn.node.job_dir)]


def test_a_dump_that_would_fit_the_deadline_but_not_before_the_wipes_reserve_is_skipped(small_node: SmallNode,
                                                                                       tmp_path: Path) -> None:
    """--deadline 2s keeps 0.4 s for the wipe: a dump estimated at 2 s (100 MiB at the assumed 50 MiB/s,
    before any upload was measured) is skipped, and said so, rather than eating into the reserve."""
    sn = small_node
    (sn.work / "task002" / "wd" / "core").unlink()
    dumps = ((sn.work / "task001" / "wd" / "core", 100 * MIB), (sn.work / "task002" / "wd" / "a.dmp", 120 * MIB))
    for path, size in dumps:
        with open(path, "wb") as fh:
            os.truncate(fh.fileno(), size)  # sparse: costs no disk
    rep_path = tmp_path / "r.json"
    started = time.monotonic()
    result = run(["release", "--upload-to", str(tmp_path / "kept"), "--deadline", "2s", "--report", str(rep_path)],
                 sn.env(), ok=False)
    assert time.monotonic() - started < 2
    assert result.exit_code == 5, result.output
    rep = report(rep_path)
    assert [(s["name"], s["why"][:36]) for s in rep["skipped"]] == [
        ("dumps/job-1/task001/wd/core.gz", "would take about 2 s at 50.0 MiB/s; "),
        ("dumps/job-1/task002/wd/a.dmp.gz", "would take about 2 s at 50.0 MiB/s; ")]  # each one named
    assert [u["name"] for u in rep["uploaded"]] == ["logs.tar.gz"] and rep["wiped"] == []


def test_release_gives_up_on_storage_that_is_down_within_its_deadline(small_node: SmallNode) -> None:
    dead = f"http://127.0.0.1:{free_port()}/devstoreaccount1/logs"  # nothing listens there
    env = small_node.env(AZURE_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true")
    started = time.monotonic()
    result = run(["release", "--upload-to", dead, "--deadline", "4s"], env, ok=False)
    assert time.monotonic() - started < 4  # its retries stop before the wipe's reserve (0.8 s here)
    assert result.exit_code == 9 and small_node.node.job_dir.exists()


def test_release_takes_only_this_jobs_task_folders_and_what_is_there(small_node: SmallNode, tmp_path: Path) -> None:
    sn = small_node
    stray = sn.work.parent / "extra" / "task009"  # not a job-N folder: not this job's tasks
    (stray / "wd").mkdir(parents=True)
    (stray / "stdout.txt").write_text("not collected")
    (sn.work.parent / "job-2").write_text("a file, not a folder")
    (sn.work / "task002" / "stderr.txt").unlink()  # a task that wrote no stderr.txt
    shutil.rmtree(sn.work / "task001" / "wd")
    (sn.work / "task001" / "wd").write_text("a working folder that is a file")
    shutil.rmtree(sn.node.job_dir)  # prep never ran on this node
    rep_path = tmp_path / "r.json"
    result = run(["release", "--upload-to", str(tmp_path / "kept"), "--wipe-task-dirs", "--report", str(rep_path)],
                 sn.env())
    assert result.stderr == ""  # nothing to warn about
    names = _archive_names((tmp_path / "kept" / "job-1" / "tvm-1" / "logs.tar.gz").read_bytes())
    assert names == ["job-1/jobpreparation/stderr.txt", "job-1/jobpreparation/stdout.txt",
                     "job-1/task001/stderr.txt", "job-1/task001/stdout.txt", "job-1/task002/stdout.txt"]
    rep = report(rep_path)
    assert sorted(rep["wiped"]) == sorted(str(sn.work / t / "wd") for t in ("jobpreparation", "task001", "task002"))
    assert (stray / "wd").is_dir() and (sn.work.parent / "job-2").is_file()
    assert 0 <= rep["elapsed_s"] < 60


def test_a_dry_run_lists_every_log_and_dump_and_what_it_would_delete(small_node: SmallNode, tmp_path: Path) -> None:
    sn = small_node
    result = run(["release", "--upload-to", str(tmp_path / "kept"), "--dry-run"], sn.env())
    lines = result.stdout.splitlines()
    uploads = [line for line in lines if line.startswith("[DRY RUN] upload   job-1/tvm-1/logs.tar.gz <- ")]
    assert len(uploads) == 6  # stdout and stderr of three tasks
    assert any(line.startswith("[DRY RUN] upload   job-1/tvm-1/dumps/job-1/task002/wd/core.gz <- ") for line in lines)
    assert f"[DRY RUN] delete   {sn.node.job_dir}" in lines
    assert not (tmp_path / "kept").exists() and sn.node.job_dir.exists()


@pytest.mark.parametrize("node_id", ["..", "a/b", "tvm/../x"])
def test_a_node_id_that_cannot_name_a_folder_in_storage_is_refused(small_node: SmallNode, tmp_path: Path,
                                                                     node_id: str) -> None:
    before = _snapshot(small_node.node.root)
    result = run(["release", "--upload-to", str(tmp_path / "kept"), "--node-id", node_id], small_node.env(), ok=False)
    assert result.exit_code == 6, result.output
    assert "cannot be used in a blob name" in result.stderr
    assert _snapshot(small_node.node.root) == before and not (tmp_path / "kept").exists()


def test_a_manifest_of_another_node_in_this_nodes_folder_is_not_trusted(small_node: SmallNode, tmp_path: Path) -> None:
    kept = tmp_path / "kept" / "job-1" / "tvm-1"
    kept.mkdir(parents=True)
    entry = {"size": 1, "md5": "x", "kind": "logs", "source": {}}
    (kept / "manifest.json").write_text(json.dumps({"job_id": "job-1", "node_id": "tvm-9", "complete": True,
                                                    "objects": {"logs.tar.gz": entry}}))
    rep_path = tmp_path / "r.json"
    run(["release", "--upload-to", str(tmp_path / "kept"), "--report", str(rep_path)], small_node.env())
    assert sorted(u["name"] for u in report(rep_path)["uploaded"]) == ["dumps/job-1/task002/wd/core.gz",
                                                                       "logs.tar.gz"]
    manifest = json.loads((kept / "manifest.json").read_text())
    assert manifest["node_id"] == "tvm-1" and manifest["objects"]["logs.tar.gz"]["size"] > 1


def test_release_without_a_task_working_folder_keeps_its_scratch_elsewhere(small_node: SmallNode,
                                                                          tmp_path: Path) -> None:
    env = {k: v for k, v in small_node.env().items() if k != "AZ_BATCH_TASK_WORKING_DIR"}
    run(["release", "--upload-to", str(tmp_path / "kept")], env)
    assert (tmp_path / "kept" / "job-1" / "tvm-1" / "logs.tar.gz").exists()
    assert not small_node.node.job_dir.exists()


# -- release re-runs ---------------------------------------------------------------------------------------
def _objects(dest: Remote, prefix: str) -> dict[str, bytes]:
    if isinstance(dest, BlobRemote):
        return {b.name[len(prefix):]: dest.client.download_blob(b.name).readall()
                for b in dest.client.list_blobs(name_starts_with=prefix)}
    assert isinstance(dest, LocalRemote)
    return tree(dest.root / prefix)


@pytest.fixture(params=["local", "azurite"])
def destination(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    if request.param == "local":
        yield LocalRemote(tmp_path / "kept")
        return
    blobs = BlobRemote(request.getfixturevalue("azurite"))
    yield blobs
    blobs.client.delete_container()


def test_a_rerun_never_overwrites_what_an_earlier_run_kept(destination: Remote, small_node: SmallNode,
                                                            tmp_path: Path) -> None:
    sn = small_node
    env = sn.env(**remote_env(destination))
    args = ["release", "--upload-to", destination.url, "--logs", "**/*.log"]
    run(args, env)
    first = _objects(destination, "job-1/tvm-1/")
    assert sorted(first) == ["dumps/job-1/task002/wd/core.gz", "logs.tar.gz", "manifest.json"]

    # the same release again (Batch re-runs it after a reboot): the logs and the dump changed meanwhile
    with open(sn.work / "task001" / "stdout.txt", "a") as fh:
        fh.write("written after the first release\n")
    core = sn.work / "task002" / "wd" / "core"
    core.write_bytes(os.urandom(4096) + bytes(MIB))
    rep_path = tmp_path / "r2.json"
    run([*args, "--report", str(rep_path)], env)
    second = _objects(destination, "job-1/tvm-1/")
    for name in ("logs.tar.gz", "dumps/job-1/task002/wd/core.gz"):
        assert second[name] == first[name], f"{name} was overwritten"
    assert sorted(second) == ["dumps/job-1/task002/wd/core-2.gz", "dumps/job-1/task002/wd/core.gz",
                              "logs-2.tar.gz", "logs.tar.gz", "manifest.json"]
    assert gzip.decompress(second["dumps/job-1/task002/wd/core-2.gz"]) == core.read_bytes()
    with gzip.GzipFile(fileobj=io.BytesIO(second["logs-2.tar.gz"])) as gz, \
            tarfile.open(fileobj=gz) as tar:
        member = tar.extractfile("job-1/task001/stdout.txt")
        assert member is not None and member.read().endswith(b"written after the first release\n")
    # the manifest lists everything any run kept, each with the MD5 and size of what storage holds
    manifest = json.loads(second["manifest.json"])
    assert manifest["complete"] is True
    assert sorted(manifest["objects"]) == sorted(n for n in second if n != "manifest.json")
    for name, entry in manifest["objects"].items():
        assert (entry["md5"], entry["size"]) == (_md5(second[name]), len(second[name])), name
    assert sorted(u["name"] for u in report(rep_path)["uploaded"]) == ["dumps/job-1/task002/wd/core-2.gz",
                                                                      "logs-2.tar.gz"]

    # a third run with nothing changed uploads nothing and keeps the list whole
    rep3 = tmp_path / "r3.json"
    run([*args, "--report", str(rep3)], env)
    third = _objects(destination, "job-1/tvm-1/")
    assert {k: v for k, v in third.items() if k != "manifest.json"} == \
        {k: v for k, v in second.items() if k != "manifest.json"}
    assert report(rep3)["uploaded"] == []
    assert sorted(a["name"] for a in report(rep3)["already_uploaded"]) == ["dumps/job-1/task002/wd/core-2.gz",
                                                                          "logs-2.tar.gz"]
    assert json.loads(third["manifest.json"])["objects"] == manifest["objects"]

    # logs changed once more: a third name, the two earlier archives untouched
    with open(sn.work / "task001" / "stdout.txt", "a") as fh:
        fh.write("and again\n")
    run(args, env)
    fourth = _objects(destination, "job-1/tvm-1/")
    assert sorted(n for n in fourth if n.startswith("logs")) == ["logs-2.tar.gz", "logs-3.tar.gz", "logs.tar.gz"]
    assert (fourth["logs.tar.gz"], fourth["logs-2.tar.gz"]) == (first["logs.tar.gz"], second["logs-2.tar.gz"])


def test_an_object_changed_in_storage_since_is_not_taken_as_kept(small_node: SmallNode, tmp_path: Path) -> None:
    sn = small_node
    dest = LocalRemote(tmp_path / "kept")
    args = ["release", "--upload-to", dest.url]
    run(args, sn.env())
    archive = dest.root / "job-1" / "tvm-1" / "logs.tar.gz"
    damaged = bytes(len(archive.read_bytes()))  # same size, other bytes: storage no longer holds what was kept
    archive.write_bytes(damaged)
    rep_path = tmp_path / "r.json"
    run([*args, "--report", str(rep_path)], sn.env())
    rep = report(rep_path)
    assert [u["name"] for u in rep["uploaded"]] == ["logs-2.tar.gz"]  # kept again, under a free name
    assert archive.read_bytes() == damaged
    run([*args, "--report", str(rep_path)], sn.env())  # again: the damaged one is passed over, not the good one
    assert report(rep_path)["uploaded"] == []
    assert sorted(a["name"] for a in report(rep_path)["already_uploaded"]) == [
        "dumps/job-1/task002/wd/core.gz", "logs-2.tar.gz"]
    (dest.root / "job-1" / "tvm-1" / "logs-2.tar.gz").unlink()  # and gone from storage: kept once more
    archive.unlink()
    run([*args, "--report", str(rep_path)], sn.env())
    assert [u["name"] for u in report(rep_path)["uploaded"]] == ["logs-3.tar.gz"]


def test_a_manifest_that_is_not_json_is_rewritten(small_node: SmallNode, tmp_path: Path) -> None:
    kept = tmp_path / "kept" / "job-1" / "tvm-1"
    kept.mkdir(parents=True)
    (kept / "manifest.json").write_text("{not json")
    result = run(["release", "--upload-to", str(tmp_path / "kept")], small_node.env())
    assert "not valid JSON" in result.stderr
    manifest = json.loads((kept / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert sorted(manifest["objects"]) == ["dumps/job-1/task002/wd/core.gz", "logs.tar.gz"]


def test_every_dump_already_kept_is_recognised(small_node: SmallNode, tmp_path: Path) -> None:
    sn = small_node
    (sn.work / "task001" / "wd" / "core.7").write_bytes(bytes(MIB))
    args = ["release", "--upload-to", str(tmp_path / "kept")]
    run(args, sn.env())
    rep_path = tmp_path / "r.json"
    run([*args, "--report", str(rep_path)], sn.env())
    rep = report(rep_path)
    assert rep["uploaded"] == []
    assert sorted(a["name"] for a in rep["already_uploaded"]) == [
        "dumps/job-1/task001/wd/core.7.gz", "dumps/job-1/task002/wd/core.gz", "logs.tar.gz"]


# -- reading back what storage holds -----------------------------------------------------------------------


def test_storage_that_drops_the_content_md5_is_not_taken_as_verified_and_nothing_is_wiped(
        proxy: FaultProxy, blob_remote: BlobRemote, small_node: SmallNode, tmp_path: Path) -> None:
    sn = small_node
    before = tree(sn.node.job_dir)
    proxy.set_rules([Rule("strip", header="x-ms-blob-content-md5")])
    # a SAS, not the account key: a shared-key signature covers the x-ms- headers, so the stripped commit
    # would be refused (403) rather than stored without its MD5
    sas = blob_remote.sas_url(write=True, create=True).split("?", 1)[1]
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}?{sas}"
    rep_path = tmp_path / "r.json"
    result = run(["release", "--upload-to", via, "--wipe-task-dirs", "--report", str(rep_path)], sn.env(), ok=False)
    assert proxy.counts["strip"] >= 1
    stored = {b.name: b for b in blob_remote.client.list_blobs(name_starts_with="job-1/tvm-1/")}
    assert "job-1/tvm-1/logs.tar.gz" in stored
    assert not stored["job-1/tvm-1/logs.tar.gz"].content_settings.content_md5  # what the proxy did
    assert result.exit_code == 9, result.output
    assert "does not match what was uploaded" in result.stderr
    rep = report(rep_path)
    assert rep["uploaded"] == [] and rep["already_uploaded"] == [] and rep["wiped"] == []
    assert tree(sn.node.job_dir) == before and (sn.work / "task001" / "wd" / "app.log").exists()
    assert [k["path"] for k in rep["kept"]] == [str(sn.node.job_dir)] + [
        str(sn.work / t / "wd") for t in ("jobpreparation", "task001", "task002")]
    assert all(k["why"].startswith("the upload failed: nothing wiped") for k in rep["kept"])
    result = run(["release", "--upload-to", via, "--wipe-on-upload-failure", "--report", str(rep_path)],
                 sn.env(), ok=False)  # a retention policy first: wiped, and said so
    assert "wiping although the upload failed (--wipe-on-upload-failure)" in result.stderr
    assert not sn.node.job_dir.exists() and report(rep_path)["wiped"][0] == str(sn.node.job_dir)
    manifest = blob_remote.client.get_blob_client("job-1/tvm-1/manifest.json")
    assert not manifest.exists() or json.loads(manifest.download_blob().readall())["objects"] == {}


def test_an_object_storage_cannot_find_right_after_its_upload_is_not_kept(
        proxy: FaultProxy, blob_remote: BlobRemote, small_node: SmallNode, tmp_path: Path) -> None:
    proxy.set_rules([Rule("404", pattern=r"^HEAD .*/logs\.tar\.gz$")])
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
    result = run(["release", "--upload-to", via], small_node.env(**remote_env(blob_remote)), ok=False)
    assert result.exit_code == 9, result.output
    assert "does not match what was uploaded" in result.stderr
    assert small_node.node.job_dir.exists()


def test_a_dump_that_does_not_read_back_leaves_an_incomplete_manifest_and_no_wipe(
        proxy: FaultProxy, blob_remote: BlobRemote, small_node: SmallNode, tmp_path: Path) -> None:
    proxy.set_rules([Rule("strip", pattern=r"/dumps/", header="x-ms-blob-content-md5")])
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}"
    rep_path = tmp_path / "r.json"
    result = run(["release", "--upload-to", via, "--report", str(rep_path)],
                 small_node.env(**remote_env(blob_remote)), ok=False)
    assert result.exit_code == 5, result.output  # kept in part
    rep = report(rep_path)
    assert [u["name"] for u in rep["uploaded"]] == ["logs.tar.gz"] and rep["wiped"] == []
    manifest = json.loads(blob_remote.client.download_blob("job-1/tvm-1/manifest.json").readall())
    assert manifest["complete"] is False and sorted(manifest["objects"]) == ["logs.tar.gz"]
    assert small_node.node.job_dir.exists()


# -- secrets -----------------------------------------------------------------------------------------------
def _assert_absent(secrets: list[str], *texts: str) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text


def test_a_server_that_echoes_the_sas_gets_it_into_no_log_line_or_report(
        proxy: FaultProxy, blob_remote: BlobRemote, small_node: SmallNode, tmp_path: Path) -> None:
    """A proxy answers 403 with the request's URL, SAS and all, in its status line, error code and body
    (an error message carrying the URL, as HTTP libraries' exceptions do): release logs that error,
    prep reports it; neither shows the signature."""
    sn = small_node
    proxy.set_rules([Rule("echo")])
    sas = blob_remote.sas_url(write=True, create=True).split("?", 1)[1]
    sig = parse_qs(sas)["sig"][0]
    via = f"http://127.0.0.1:{proxy.port}/devstoreaccount1/{blob_remote.container}?{sas}"
    secrets = [sig, sas, sas.split("sig=")[1]]
    rep_path = tmp_path / "release.json"
    result = run(["-v", "release", "--upload-to", via, "--report", str(rep_path)], sn.env(), ok=False)
    assert result.exit_code in (4, 9), result.output
    assert proxy.counts["echo"] >= 1
    assert "Denied" in result.stderr  # the server's words got through, its secrets did not
    _assert_absent(secrets, result.stdout, result.stderr, rep_path.read_text())
    assert sn.node.job_dir.exists()

    prep_report = tmp_path / "prep.json"
    result = run(["-v", "prep", f"in={via}", "--report", str(prep_report)], sn.node.env(), ok=False)
    assert result.exit_code == 4, result.output
    assert "Denied" in result.stderr
    _assert_absent(secrets, result.stdout, result.stderr, prep_report.read_text() if prep_report.exists() else "")


def test_registered_secrets_are_scrubbed_whole_whatever_they_look_like() -> None:
    from nodekit.redact import register_secret, scrub

    register_secret("Zm9vYmFyYmF6cXV4")  # a key: nothing about it looks like a secret
    register_secret("Zm9vYmFyYmF6cXV4LWxvbmdlcg")  # a longer one that contains it
    assert scrub("key Zm9vYmFyYmF6cXV4LWxvbmdlcg and Zm9vYmFyYmF6cXV4.") == "key REDACTED and REDACTED."
    register_secret("six666")  # six characters are enough to be registered...
    register_secret("five5")  # ...five are not (they would blank out ordinary words)
    assert scrub("six666 five5") == "REDACTED five5"
    register_secret(None)
    register_secret("")


@pytest.mark.parametrize(("url", "shown"), [
    ("https://acct.blob.core.windows.net/c/p?sv=1&sig=abc", "https://acct.blob.core.windows.net/c/p"),
    ("https://user:pw@acct.blob.core.windows.net:8443/c?x=1", "https://acct.blob.core.windows.net:8443/c"),
    ("/mnt/data/in?token=abc", "/mnt/data/in"),
    ("C:\\data\\in?token=abc", "C:\\data\\in"),
    ("http://[::1/broken?sig=abc", "<unparseable URL>"),
])
def test_urls_are_shown_without_query_or_user(url: str, shown: str) -> None:
    from nodekit.redact import display_url

    assert display_url(url) == shown
