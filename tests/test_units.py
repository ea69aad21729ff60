"""Pure functions, as tables: the skip-or-download decision, names, sources, globs, durations."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path

import pytest

from nodekit.errors import UnsafeInput, UsageError
from nodekit.names import GlobFilter, find_collisions, glob_match, unsafe_reason
from nodekit.redact import display_url, register_secret, scrub
from nodekit.spec import SourceKind, parse_duration, parse_source, parse_spec, split_named
from nodekit.storage import RemoteFile
from nodekit.storage.retry import retry_after_seconds
from nodekit.transfer import Action, LocalStat, decide

REMOTE = RemoteFile("a.txt", 10, "0x1", "Tue, 24 Nov 2026 10:00:00 GMT", "md5==")
RECORD = {**REMOTE.identity, "md5": "md5==", "verified": True, "local_size": 10, "local_mtime_ns": 5}
SAME = LocalStat(10, 5, True)


@pytest.mark.parametrize(
    ("remote", "record", "local", "action", "reason"),
    [
        (REMOTE, RECORD, SAME, Action.SKIP, "unchanged"),
        (REMOTE, RECORD, None, Action.DOWNLOAD, "missing locally"),
        (REMOTE, None, SAME, Action.DOWNLOAD, "not placed by nodekit"),
        (RemoteFile("a.txt", 10, "0x2", REMOTE.last_modified, "md5=="), RECORD, SAME, Action.DOWNLOAD,
         "changed at the source (etag"),
        (RemoteFile("a.txt", 11, "0x1", REMOTE.last_modified, "md5=="), RECORD, SAME, Action.DOWNLOAD,
         "changed at the source (size"),
        (RemoteFile("a.txt", 10, "0x1", REMOTE.last_modified, "other=="), RECORD, SAME, Action.DOWNLOAD,
         "changed at the source (content_md5"),
        (REMOTE, RECORD, LocalStat(3, 5, True), Action.DOWNLOAD, "modified locally (size 10 -> 3)"),
        (REMOTE, RECORD, LocalStat(10, 6, True), Action.DOWNLOAD, "modified locally (modification time"),
        (REMOTE, RECORD, LocalStat(10, 5, False), Action.DOWNLOAD, "not a regular file"),
        (None, RECORD, SAME, Action.REMOVE, "gone from the source"),
        (None, RECORD, None, Action.FORGET, "already gone locally"),
        (None, RECORD, LocalStat(99, 5, True), Action.KEEP, "changed locally"),
        (None, None, SAME, Action.KEEP, "not placed by nodekit"),
    ],
)
def test_decide(remote: RemoteFile | None, record: dict | None, local: LocalStat | None, action: Action,
                reason: str) -> None:
    got_action, got_reason = decide(remote, record, local)
    assert got_action is action
    assert reason in got_reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a/b.txt", None),
        ("ü €/x y.txt", None),
        ("..", "'..' path segment"),
        ("a/../b", "'..' path segment"),
        ("./a", "'.' path segment"),
        ("/etc/passwd", "absolute path"),
        ("C:/x", "drive letter"),
        ("c:x", "drive letter"),
        ("a\\b", "backslash"),
        ("a//b", "empty path segment"),
        ("a/", "empty path segment"),
        ("", "empty name"),
        ("a\x00b", "NUL"),
        ("x.nodekit-partial", "reserves"),
        (".nodekit/state.json", "reserved"),
    ],
)
def test_unsafe_reason(name: str, reason: str | None) -> None:
    got = unsafe_reason(name)
    assert (got is None) if reason is None else (got is not None and reason in got)


def test_collisions() -> None:
    assert find_collisions(["a", "a/b", "c/d", "c/e"]) == ["a <-> a/b"]
    assert find_collisions(["x/y/z", "x/y"]) == ["x/y <-> x/y/z"]
    assert find_collisions(["a/b", "a/c"]) == []


@pytest.mark.parametrize(
    ("pattern", "name", "match"),
    [
        ("*.csv", "deep/dir/x.csv", True),
        ("*.csv", "x.csv.gz", False),
        ("data/*.csv", "data/x.csv", True),
        ("data/*.csv", "data/sub/x.csv", False),
        ("data/**/*.csv", "data/sub/x.csv", True),
        ("data/**/*.csv", "data/x.csv", True),
        ("**", "anything/at/all", True),
        ("file-?.txt", "file-1.txt", True),
        ("file-[0-9].txt", "file-a.txt", False),
    ],
)
def test_glob(pattern: str, name: str, match: bool) -> None:
    assert glob_match(pattern, name) is match


def test_glob_filter() -> None:
    flt = GlobFilter(include=("*.txt",), exclude=("tmp/**",))
    assert flt("a/b.txt") and not flt("a/b.csv") and not flt("tmp/x.txt")
    assert GlobFilter()("anything")


@pytest.mark.parametrize(
    ("text", "kind", "account", "container", "prefix", "name"),
    [
        ("https://acct1.blob.core.windows.net/data", SourceKind.BLOB, "acct1", "data", "", "data"),
        ("https://acct1.blob.core.windows.net/data/ref/v2/", SourceKind.BLOB, "acct1", "data", "ref/v2", "v2"),
        ("https://acct1.blob.core.chinacloudapi.cn/data/x", SourceKind.BLOB, "acct1", "data", "x", "x"),
        ("http://127.0.0.1:10000/devstoreaccount1/data/p%20q", SourceKind.BLOB, "devstoreaccount1", "data", "p q",
         "p q"),
        ("http://localhost:10000/devstoreaccount1/data", SourceKind.BLOB, "devstoreaccount1", "data", "", "data"),
        ("https://example.com/files/model.onnx", SourceKind.URL, None, None, None, "downloads"),
        ("http://127.0.0.1:8000/files/model.onnx", SourceKind.URL, None, None, None, "downloads"),
        ("/mnt/data/models", SourceKind.LOCAL, None, None, None, "models"),
        ("file:///mnt/data/models/", SourceKind.LOCAL, None, None, None, "models"),
        ("builtin:sample", SourceKind.LOCAL, None, None, None, "sample"),
    ],
)
def test_parse_source(text: str, kind: SourceKind, account: str | None, container: str | None,
                      prefix: str | None, name: str) -> None:
    spec = parse_source(text)
    assert spec.kind is kind
    assert spec.name == name
    if kind is SourceKind.BLOB:
        assert spec.blob is not None
        assert (spec.blob.account, spec.blob.container, spec.blob.prefix) == (account, container, prefix)


def test_sas_is_kept_for_requests_but_not_shown() -> None:
    spec = parse_source("https://acct1.blob.core.windows.net/data?sv=2021&sp=rl&sig=c2VjcmV0c2lnbmF0dXJl")
    assert spec.blob is not None and spec.blob.sas and "sig=" in spec.blob.sas
    assert "sig" not in spec.display and "sig" not in repr(spec)
    with pytest.raises(UsageError, match="not a SAS token"):
        parse_source("https://acct1.blob.core.windows.net/data?foo=bar")


def test_named_sources() -> None:
    assert split_named("ref=https://a.blob.core.windows.net/c") == ("ref", "https://a.blob.core.windows.net/c")
    assert split_named("https://host/x?a=b") == (None, "https://host/x?a=b")
    assert split_named("/data/x=y") == (None, "/data/x=y")
    with pytest.raises(UnsafeInput):
        parse_source("/data", name="..")


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                               ("PT30M", 1800), ("PT1H30M", 5400), ("P1D", 86400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, what="--timeout") == seconds


@pytest.mark.parametrize(("text", "message"), [("0", "more than zero"), ("25h", "too long"), ("x", "not a duration"),
                                               ("P", "not a duration")])
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_duration(text, what="--timeout")


def test_spec_file_shape() -> None:
    spec = parse_spec({"nodekit": 1, "job_id": "j", "prep": {
        "sources": ["ref=https://acct1.blob.core.windows.net/ccc/p",
                    {"url": "/mnt/x", "name": "x", "include": "*.bin"}],
        "exclude": ["*.tmp"], "timeout": "10m", "concurrency": 8}})
    assert [s.name for s in spec.prep.sources] == ["ref", "x"]
    assert spec.prep.sources[1].filter.include == ("*.bin",)
    assert spec.prep.timeout == 600 and spec.prep.concurrency == 8 and spec.job_id == "j"
    for bad, message in (({"nodekit": 2}, "version 1"), ({"prep": {"sources": [{"name": "x"}]}}, "with a 'url'"),
                         ({"prep": {"concurrency": 0}}, "1 to 256"), ([], "JSON object")):
        with pytest.raises(UsageError, match=message):
            parse_spec(bad)


def test_redaction() -> None:
    register_secret("sv=2021&sig=topsecretvalue")
    assert "topsecret" not in scrub("GET /c?sv=2021&sig=topsecretvalue HTTP/1.1")
    assert scrub("AccountKey=abc123==;x") == "AccountKey=REDACTED;x"
    assert scrub("url?sig=unregistered&x=1") == "url?sig=REDACTED&x=1"
    assert display_url("https://u:p@acct.blob.core.windows.net/c/p?sig=x") == "https://acct.blob.core.windows.net/c/p"


def test_retry_after() -> None:
    assert retry_after_seconds("3") == 3
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("not a date") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_every_sas_form_is_read_the_same_way() -> None:
    """Service, account and user-delegation SAS alike: expiry and start (a date or a time) are checked before any
    request, blob-scoped or list-less ones are read without listing, and the whole query is a secret. (Azurite 3.35
    cannot check the signature of the SDK's current user-delegation SAS, so that form downloads only in unit form.)"""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import ContainerSasPermissions, UserDelegationKey, generate_container_sas

    from nodekit.errors import AccessDenied
    from nodekit.redact import scrub
    from nodekit.storage.auth import Sas

    key = UserDelegationKey()
    key.signed_oid, key.signed_tid = "0b9f0a1e-0000-4000-8000-000000000001", "72f988bf-86f1-41af-91ab-2d7cd011db47"
    key.signed_start, key.signed_expiry = "2026-11-29T00:00:00Z", "2026-12-06T00:00:00Z"
    key.signed_service, key.signed_version, key.value = "b", "2025-01-05", "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5"
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    delegated = generate_container_sas("acct", "cont", user_delegation_key=key,
                                       permission=ContainerSasPermissions(read=True, list=True), expiry=later)
    sas = Sas.parse(delegated, "the URL")
    sas.check("https://acct.blob.core.windows.net/cont")
    assert (sas.resource, sas.permissions, sas.lists) == ("c", "rl", True)
    assert sas.expiry is not None and abs((sas.expiry - later).total_seconds()) < 1
    assert "REDACTED" in scrub(f"x {delegated} y") and delegated not in scrub(f"x {delegated} y")

    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert Sas.parse(f"sv=2025-01-05&sr=b&sp=r&se={tomorrow}&sig=abc", "x").lists is False  # blob scope, date only
    assert Sas.parse(f"sv=2025-01-05&sr=c&sp=r&se={tomorrow}&sig=abc", "x").lists is False  # no list permission
    for query, says in (("sv=1&sr=c&sp=rl&se=2020-01-01&sig=abc", "expired at 2020-01-01"),
                        (f"sv=1&sr=c&sp=rl&st={tomorrow}&se=2099-01-01&sig=abc", "is not valid before")):
        try:
            Sas.parse(query, "AZURE_STORAGE_SAS_TOKEN").check("https://acct.blob.core.windows.net/cont")
        except AccessDenied as err:
            assert says in str(err) and "from AZURE_STORAGE_SAS_TOKEN" in str(err)
        else:
            raise AssertionError(f"{query} was not refused")


def test_a_landing_over_a_stale_temporary_file_holds_only_what_arrived(tmp_path: Path) -> None:
    """What a killed run left under the temporary name (longer than the new file) never shows through."""
    from nodekit.land import Landing, partial_name

    data = b"new content"
    remote = RemoteFile("a.bin", len(data), "e", "Tue, 24 Nov 2026 10:00:00 GMT",
                        content_md5=base64.b64encode(hashlib.md5(data).digest()).decode())
    (tmp_path / partial_name("a.bin")).write_bytes(b"x" * 10_000)
    landing = Landing("a.bin", remote, str(tmp_path / "a.bin"), hash_wanted=True)
    landing.begin()
    landing.write(data)
    md5, verified, _ = landing.finish()
    assert (tmp_path / "a.bin").read_bytes() == data and verified and md5 == remote.content_md5
    assert os.stat(tmp_path / "a.bin").st_mtime_ns == 1_795_514_400 * 10**9
    assert not (tmp_path / partial_name("a.bin")).exists()


def test_a_landing_without_a_source_time_keeps_the_time_it_arrived(tmp_path: Path) -> None:
    from nodekit.land import Landing

    before = time.time_ns()
    landing = Landing("b.txt", RemoteFile("b.txt", 2, "e", ""), str(tmp_path / "b.txt"), hash_wanted=False)
    landing.begin()
    landing.write(b"hi")
    assert landing.finish()[:2] == (None, False)
    assert (tmp_path / "b.txt").read_bytes() == b"hi" and os.stat(tmp_path / "b.txt").st_mtime_ns >= before - 10**9


def test_a_discarded_landing_closes_its_file_removes_it_and_may_be_discarded_again(tmp_path: Path) -> None:
    from nodekit.land import Landing

    landing = Landing("c.bin", RemoteFile("c.bin", 5, "e", ""), str(tmp_path / "c.bin"), hash_wanted=True)
    landing.begin()
    fd = landing.fd
    inode = os.fstat(fd).st_ino
    landing.write(b"ab")
    landing.discard()
    try:  # closed, not leaked (the number may have been reused since by another thread: then for another file)
        assert os.fstat(fd).st_ino != inode
    except OSError:
        pass
    assert list(tmp_path.iterdir()) == []
    landing.discard()  # after a failure the caller may discard again: nothing left to do, nothing raised
    assert list(tmp_path.iterdir()) == []


def test_a_landing_never_closes_a_descriptor_it_does_not_own(tmp_path: Path) -> None:
    """discard() before begin(), after a finish() that found a folder in the way, and twice after a transfer
    that failed: stdin and stdout (descriptors 0 and 1) stay open."""
    from nodekit.errors import InTheWay
    from nodekit.land import Landing

    saved = {fd: os.dup(fd) for fd in (0, 1)}
    before = {fd: (os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (0, 1)}

    def intact() -> bool:
        try:
            return all((os.fstat(fd).st_dev, os.fstat(fd).st_ino) == before[fd] for fd in (0, 1))
        except OSError:
            return False

    try:
        never_begun = Landing("n.bin", RemoteFile("n.bin", 1, "e", ""), str(tmp_path / "n.bin"), hash_wanted=False)
        never_begun.discard()  # as after a begin() the disk refused
        assert intact()
        (tmp_path / "d.bin").mkdir()  # a folder where the file goes
        landing = Landing("d.bin", RemoteFile("d.bin", 1, "e", ""), str(tmp_path / "d.bin"), hash_wanted=False)
        landing.begin()
        landing.write(b"x")
        with pytest.raises(InTheWay):
            landing.finish()
        landing.discard()
        landing.discard()
        assert intact()
        cut = Landing("c.bin", RemoteFile("c.bin", 9, "e", ""), str(tmp_path / "c.bin"), hash_wanted=False)
        cut.begin()
        cut.write(b"x")
        cut.discard()  # a transfer that failed half-way
        cut.discard()
        assert intact()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin"]
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
