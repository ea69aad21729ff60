"""Real storage accounts: Data Lake folders, archived blobs, every endpoint form, redirects and long names.

Data Lake (hierarchical namespace) accounts list each directory as a zero-length blob with
`hdi_isfolder=true` metadata (and, with recent service versions, `<ResourceType>directory`): the
tests make such placeholders in Azurite, and replay a listing in the real service's shape from a
scripted server. An `abfss://` URL is read through the account's blob endpoint: Azurite answers
under its production name (devstoreaccount1.blob.core.windows.net) through the tests' proxy.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import AZURE_NAME, DEV_ACCOUNT, Azurite, BatchNode, BlobRemote, Tls, remote_env, tree
from helpers import actions, report, run
from netservers import Answer, ForwardProxy, ScriptedServer
from test_release import ReleaseNode, release_node  # noqa: F401 - the fixture

from nodekit.spec import parse_source

FORMS = [  # URL, kind -> account, container, prefix, endpoint
    ("https://acct.blob.core.windows.net/cont/a/b", None, "acct", "cont", "a/b", "https://acct.blob.core.windows.net"),
    ("https://acct.blob.core.chinacloudapi.cn/cont", None, "acct", "cont", "", "https://acct.blob.core.chinacloudapi.cn"),
    ("https://acct.blob.core.usgovcloudapi.net/cont/x", None, "acct", "cont", "x",
     "https://acct.blob.core.usgovcloudapi.net"),
    ("https://acct.blob.core.cloudapi.de/cont", None, "acct", "cont", "", "https://acct.blob.core.cloudapi.de"),
    ("https://acct.z22.blob.storage.azure.net/cont/p", None, "acct", "cont", "p",
     "https://acct.z22.blob.storage.azure.net"),
    ("https://acct-secondary.blob.core.windows.net/cont/p", None, "acct", "cont", "p",
     "https://acct-secondary.blob.core.windows.net"),
    ("https://acct.privatelink.blob.core.windows.net/cont", None, "acct", "cont", "",
     "https://acct.privatelink.blob.core.windows.net"),
    ("https://acct.dfs.core.windows.net/cont/dir/sub", None, "acct", "cont", "dir/sub",
     "https://acct.blob.core.windows.net"),
    ("https://acct.z07.dfs.storage.azure.net/cont", None, "acct", "cont", "", "https://acct.z07.blob.storage.azure.net"),
    ("https://acct-secondary.dfs.core.usgovcloudapi.net/cont", None, "acct", "cont", "",
     "https://acct-secondary.blob.core.usgovcloudapi.net"),
    ("abfss://cont@acct.dfs.core.windows.net/dir/sub", None, "acct", "cont", "dir/sub",
     "https://acct.blob.core.windows.net"),
    ("abfs://cont@acct.dfs.core.windows.net/", None, "acct", "cont", "", "https://acct.blob.core.windows.net"),
    ("http://127.0.0.1:10000/devstoreaccount1/cont/p", None, "devstoreaccount1", "cont", "p",
     "http://127.0.0.1:10000/devstoreaccount1"),
    ("http://localhost:10000/devstoreaccount1/cont", None, "devstoreaccount1", "cont", "",
     "http://localhost:10000/devstoreaccount1"),
    ("https://[::1]:10000/devstoreaccount1/cont", None, "devstoreaccount1", "cont", "",
     "https://[::1]:10000/devstoreaccount1"),
    ("https://data.contoso.com/cont/p/q", "blob", "", "cont", "p/q", "https://data.contoso.com"),
    ("http://azurite:10000/devstoreaccount1/cont", "blob", "devstoreaccount1", "cont", "",
     "http://azurite:10000/devstoreaccount1"),
]


@pytest.mark.parametrize("url, kind, account, container, prefix, endpoint", FORMS, ids=[f[0] for f in FORMS])
def test_every_endpoint_form_is_parsed(url: str, kind: str | None, account: str, container: str, prefix: str,
                                       endpoint: str) -> None:
    spec = parse_source(url, kind=kind)
    assert spec.blob is not None, url
    assert (spec.blob.account, spec.blob.container, spec.blob.prefix, spec.blob.endpoint) == \
        (account, container, prefix, endpoint)


def test_what_is_not_a_container_stays_a_file_url() -> None:
    for url in ("https://example.com/files/model.bin", "http://127.0.0.1:8080/files/model.bin",
                "https://data.contoso.com/cont/p"):
        assert parse_source(url).kind.value == "url", url
    for bad, says in (("abfss://acct.dfs.core.windows.net/x", "CONTAINER@ACCOUNT"),
                      ("abfss://cont@example.com/x", "CONTAINER@ACCOUNT"),
                      ("https://acct.dfs.core.windows.net/UPPER", "not a valid container name")):
        with pytest.raises(Exception, match=says):
            parse_source(bad)


def _hns(remote: BlobRemote) -> dict[str, bytes]:
    """A Data Lake-shaped tree: directories as placeholders (as the service lists them), files at every level."""
    files = {"top.txt": b"top\n", "hns/a.txt": b"a\n", "hns/hnsdir/inner.txt": b"inner\n",
             "hns/hnsdir/deep/leaf.bin": os.urandom(5000), "marker/x.txt": b"x\n"}
    for folder in ("hns", "hns/hnsdir", "hns/hnsdir/deep", "hns/empty", "hns/empty/nested"):
        remote.client.upload_blob(folder, b"", overwrite=True, metadata={"hdi_isfolder": "true"})
    remote.client.upload_blob("marker/", b"", overwrite=True)  # a folder marker some tools write
    remote.client.upload_blob("lonely/", b"", overwrite=True)
    for name, data in files.items():
        remote.put(name, data)
    return files


def _folders(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir() and ".nodekit" not in p.parts}


def test_a_data_lake_source_lands_its_folders_and_files_and_runs_twice(blob_remote: BlobRemote,
                                                                       batch_node: BatchNode, tmp_path: Path) -> None:
    files = _hns(blob_remote)
    env = batch_node.env(**remote_env(blob_remote))
    rep = tmp_path / "r.json"
    run(["prep", f"in={blob_remote.url}", "--report", str(rep)], env)
    assert tree(batch_node.job_dir) == {f"in/{k}": v for k, v in files.items()}
    assert _folders(batch_node.job_dir) == {"in", "in/hns", "in/hns/hnsdir", "in/hns/hnsdir/deep", "in/hns/empty",
                                            "in/hns/empty/nested", "in/marker", "in/lonely"}
    first = report(rep)
    assert first["downloaded"] == len(files) and len(first["files"]) == len(files)  # placeholders are not files
    run(["prep", f"in={blob_remote.url}", "--report", str(rep)], env)
    assert (report(rep)["downloaded"], report(rep)["skipped"]) == (0, len(files))
    assert _folders(batch_node.job_dir) >= {"in/hns/empty/nested", "in/lonely"}

    # a prefix inside the tree: its own placeholder is the root, not a file
    run(["prep", f"sub={blob_remote.url}/hns/hnsdir", "--job-id", "sub", "--report", str(rep)], env)
    assert tree(batch_node.shared / "sub") == {"sub/inner.txt": b"inner\n", "sub/deep/leaf.bin":
                                               files["hns/hnsdir/deep/leaf.bin"]}
    got = report(rep)
    assert got["downloaded"] + got["from_cache"] == 2 and len(got["files"]) == 2


LISTING = """<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ServiceEndpoint="https://acct.blob.core.windows.net/" ContainerName="lake"><Blobs>
<Blob><Name>raw</Name><Properties><Creation-Time>Sun, 29 Nov 2026 09:00:00 GMT</Creation-Time>
<Last-Modified>Sun, 29 Nov 2026 09:00:00 GMT</Last-Modified><Etag>0x8DD1</Etag><ResourceType>directory</ResourceType>
<Content-Length>0</Content-Length>
<Content-Type>application/octet-stream</Content-Type><BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier>
<AccessTierInferred>true</AccessTierInferred><LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState>
<ServerEncrypted>true</ServerEncrypted></Properties><Metadata><hdi_isfolder>true</hdi_isfolder></Metadata></Blob>
<Blob><Name>raw/2026</Name><Properties><Last-Modified>Sun, 29 Nov 2026 09:00:00 GMT</Last-Modified><Etag>0x8DD2</Etag>
<ResourceType>directory</ResourceType><Content-Length>0</Content-Length><BlobType>BlockBlob</BlobType></Properties>
<Metadata /></Blob>
<Blob><Name>raw/2026/prices.csv</Name><Properties><Last-Modified>Sun, 29 Nov 2026 09:01:00 GMT</Last-Modified>
<Etag>0x8DD3</Etag><ResourceType>file</ResourceType><Content-Length>12</Content-Length>
<Content-MD5>w8a8Kujs5L0lENyiEiXAQQ==</Content-MD5><BlobType>BlockBlob</BlobType><AccessTier>Cool</AccessTier></Properties>
<Metadata /></Blob>
<Blob><Name>raw/empty</Name><Properties><Last-Modified>Sun, 29 Nov 2026 09:00:00 GMT</Last-Modified><Etag>0x8DD4</Etag>
<ResourceType>directory</ResourceType><Content-Length>0</Content-Length></Properties><Metadata /></Blob>
</Blobs><NextMarker /></EnumerationResults>"""
CSV = b"a,b\n1,2\n3,4\n"  # 12 bytes


def _lake(archived: str | None = None) -> ScriptedServer:
    listing = LISTING if archived is None else LISTING.replace(
        "<AccessTier>Cool</AccessTier>", f"<AccessTier>Archive</AccessTier><ArchiveStatus>{archived}</ArchiveStatus>")

    def script(method: str, path: str, query: dict[str, list[str]]) -> Answer:
        if query.get("comp") == ["list"]:
            return 200, {"Content-Type": "application/xml"}, listing.encode()
        if path.endswith("/raw/2026/prices.csv"):
            return 200, {"ETag": '"0x8DD3"', "Content-MD5": "w8a8Kujs5L0lENyiEiXAQQ=="}, CSV
        return 404, {"x-ms-error-code": "BlobNotFound"}, b""

    return ScriptedServer(script).start()


def test_a_listing_in_the_real_services_shape(batch_node: BatchNode, tmp_path: Path) -> None:
    import base64
    import hashlib

    assert base64.b64encode(hashlib.md5(CSV).digest()).decode() == "w8a8Kujs5L0lENyiEiXAQQ=="
    server = _lake()
    expiry = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
    try:
        url = f"http://127.0.0.1:{server.port}/{DEV_ACCOUNT}/lake?sv=2025-01-05&sr=c&sp=rl&se={expiry}&sig=c2ln"
        rep = tmp_path / "r.json"
        for _ in range(2):
            run(["prep", f"lake={url}", "--report", str(rep)], batch_node.env())
        assert tree(batch_node.job_dir) == {"lake/raw/2026/prices.csv": CSV}
        assert _folders(batch_node.job_dir) == {"lake", "lake/raw", "lake/raw/2026", "lake/raw/empty"}
        assert report(rep)["skipped"] == 1 and [f["name"] for f in report(rep)["files"]] == ["lake/raw/2026/prices.csv"]
        # a blob still being rehydrated cannot be read either: refused before anything is written
        pending = _lake("rehydrate-pending-to-hot")
        try:
            url2 = url.replace(str(server.port), str(pending.port))
            result = run(["prep", f"lake={url2}", "--job-id", "pending"], batch_node.env(), ok=False)
        finally:
            pending.stop()
        assert result.exit_code == 4 and "lake/raw/2026/prices.csv (rehydrating)" in result.stderr, result.stderr
        assert not (batch_node.shared / "pending").exists()
    finally:
        server.stop()


def test_an_abfss_source_reads_a_data_lake_container_through_its_blob_endpoint(azurite_tls: Azurite, tls: Tls,
                                                                               batch_node: BatchNode) -> None:
    remote = BlobRemote(azurite_tls, verify=str(tls.ca.cert))
    files = _hns(remote)
    proxy = ForwardProxy(routes={f"{AZURE_NAME}:443": azurite_tls.port}).start()  # Azurite under Azure's name
    try:
        env = batch_node.env(AZURE_STORAGE_CONNECTION_STRING=azurite_tls.connection_string, HTTPS_PROXY=proxy.url,
                             REQUESTS_CA_BUNDLE=str(tls.ca.cert))
        for _ in range(2):
            run(["prep", f"lake=abfss://{remote.container}@{DEV_ACCOUNT}.dfs.core.windows.net/hns"], env)
    finally:
        proxy.stop()
    assert tree(batch_node.job_dir) == {f"lake/{k[4:]}": v for k, v in files.items() if k.startswith("hns/")}
    assert "lake/empty/nested" in _folders(batch_node.job_dir)
    assert proxy.tunnels[f"{AZURE_NAME}:443"] >= 1


def test_archived_blobs_are_decided_before_any_byte_moves(blob_remote: BlobRemote, batch_node: BatchNode,
                                                           tmp_path: Path) -> None:
    data = {f"f{i}.txt": f"file {i}\n".encode() for i in range(5)}
    for name, body in data.items():
        blob_remote.put(name, body)
    for name in ("f1.txt", "f3.txt"):
        blob_remote.client.get_blob_client(name).set_standard_blob_tier("Archive")
    blob_remote.client.get_blob_client("f4.txt").set_standard_blob_tier("Cool")  # cool downloads as usual
    env = batch_node.env(**remote_env(blob_remote))
    refused = run(["prep", f"in={blob_remote.url}"], env, ok=False)
    assert refused.exit_code == 4, refused.stderr
    assert "2 file(s) to download are in the archive tier" in refused.stderr
    assert "in/f1.txt (archive), in/f3.txt (archive)" in refused.stderr and "--skip-archived" in refused.stderr
    assert not batch_node.job_dir.exists()

    rep = tmp_path / "r.json"
    for _ in range(2):
        run(["prep", f"in={blob_remote.url}", "--skip-archived", "--report", str(rep)], env)
        assert tree(batch_node.job_dir) == {f"in/{k}": v for k, v in data.items() if k not in ("f1.txt", "f3.txt")}
        got = report(rep)
        assert got["skipped_archived"] == 2
        assert {f["name"]: f["reason"] for f in got["files"] if "archive" in f["reason"]}.keys() == {"in/f1.txt",
                                                                                                 "in/f3.txt"}
    for name in ("f1.txt", "f3.txt"):  # rehydrated (at once, in the emulator): the next run gets them
        blob_remote.client.get_blob_client(name).set_standard_blob_tier("Hot")
    run(["prep", f"in={blob_remote.url}", "--report", str(rep)], env)
    assert tree(batch_node.job_dir) == {f"in/{k}": v for k, v in data.items()}
    assert actions(report(rep), "download") == ["in/f1.txt", "in/f3.txt"]


def test_long_names_are_placed_with_short_temporary_names_or_refused_up_front(blob_remote: BlobRemote,
                                                                               batch_node: BatchNode,
                                                                               tmp_path: Path) -> None:
    long_ok = "L" * 246 + ".bin"  # 250 bytes: fits a file system name, not with nodekit's old temporary name
    blob_remote.put(f"d/{long_ok}", b"long but fine")
    multibyte = "é" + "x" * 120 + "é" * 70 + ".txt"  # 195 characters, but 266 bytes in UTF-8
    assert len(multibyte) < 255 < len(multibyte.encode())
    blob_remote.put(f"d/{multibyte}", b"multibyte")
    blob_remote.put(f"e/{'y' * 300}", b"far too long")
    blob_remote.put("short.txt", b"short")
    env = batch_node.env(**remote_env(blob_remote))
    refused = run(["prep", f"in={blob_remote.url}"], env, ok=False)
    assert refused.exit_code == 6, refused.stderr
    assert "refusing 2 unsafe name(s)" in refused.stderr and "longer than the file system's 255 bytes" in refused.stderr
    assert not batch_node.job_dir.exists()

    rep = tmp_path / "r.json"
    for _ in range(2):
        run(["prep", f"in={blob_remote.url}", "--exclude", "e/*", "--exclude", "d/é*", "--report", str(rep)], env)
    assert tree(batch_node.job_dir) == {f"in/d/{long_ok}": b"long but fine", "in/short.txt": b"short"}
    assert report(rep)["skipped"] == 2


def test_a_plain_url_follows_redirects_without_forwarding_the_credential(batch_node: BatchNode,
                                                                         tmp_path: Path) -> None:
    seen: list[dict[str, list[str]]] = []

    def target(method: str, path: str, query: dict[str, list[str]]) -> Answer:
        seen.append(query)
        return 200, {"ETag": '"v1"', "Last-Modified": "Sun, 29 Nov 2026 09:00:00 GMT", "Accept-Ranges": "bytes"}, \
            b"the model\n"

    real = ScriptedServer(target).start()
    hop = ScriptedServer(lambda m, p, q: (302, {"Location": f"http://127.0.0.1:{real.port}/real/model.bin"},
                                          b"")).start()
    loop = ScriptedServer(lambda m, p, q: (302, {"Location": p}, b"")).start()
    try:
        rep = tmp_path / "r.json"
        url = f"http://127.0.0.1:{hop.port}/files/model.bin?sv=2025-01-05&sr=b&sp=r&sig=c2VjcmV0"
        for _ in range(2):
            run(["prep", f"m={url}", "--report", str(rep)], batch_node.env())
        assert tree(batch_node.job_dir) == {"m/model.bin": b"the model\n"}
        assert report(rep)["sources"][0]["final_url"] == f"http://127.0.0.1:{real.port}/real/model.bin"
        assert seen and all("sig" not in q for q in seen)  # the SAS went to the first host only
        looping = run(["prep", f"m=http://127.0.0.1:{loop.port}/a/b.bin", "--job-id", "loop"], batch_node.env(),
                      ok=False)
        assert looping.exit_code == 4 and "too many redirects" in looping.stderr, looping.stderr
    finally:
        for s in (real, hop, loop):
            s.stop()


def test_release_uploads_to_a_data_lake_container(azurite_tls: Azurite, tls: Tls,
                                                  release_node: ReleaseNode) -> None:  # noqa: F811
    remote = BlobRemote(azurite_tls, verify=str(tls.ca.cert))
    _hns(remote)  # a container with Data Lake directories in it already
    proxy = ForwardProxy(routes={f"{AZURE_NAME}:443": azurite_tls.port}).start()
    try:
        env = release_node.env(AZURE_STORAGE_CONNECTION_STRING=azurite_tls.connection_string, HTTPS_PROXY=proxy.url,
                               REQUESTS_CA_BUNDLE=str(tls.ca.cert))
        for _ in range(2):
            run(["release", "--upload-to", f"abfss://{remote.container}@{DEV_ACCOUNT}.dfs.core.windows.net/keep"], env)
    finally:
        proxy.stop()
    kept = sorted(b.name for b in remote.client.list_blobs(name_starts_with="keep/"))
    assert kept == ["keep/job-1/tvm-1/dumps/job-1/task002/wd/core.gz", "keep/job-1/tvm-1/logs.tar.gz",
                    "keep/job-1/tvm-1/manifest.json"]
    assert not release_node.node.job_dir.exists()
