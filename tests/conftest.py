"""Shared fixtures: a scrubbed environment, a fake Batch node, Azurite, and sources to fill.

Azurite is required: if it cannot start, the tests that need it fail (they never skip).
It is started once per session on a free loopback port and stopped by its process id.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azurite import DEV_ACCOUNT, DEV_KEY, ROOT, Azurite, start_azurite, stop_process
from faultproxy import FaultProxy
from tlscerts import CertFiles, make_ca, make_server_cert

__all__ = ["DEV_ACCOUNT", "DEV_KEY", "ROOT", "Azurite", "start_azurite", "stop_process"]


@pytest.fixture(autouse=True)
def _scrub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's Batch, Azure or nodekit settings, trust or proxies."""
    for name in list(os.environ):
        if name.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_", "IDENTITY_", "MSI_")) or name in _NETWORK or \
                name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)


_NETWORK = {"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"}


@dataclass
class BatchNode:
    """A fake node folder with Batch's layout and the variables a job preparation task sees."""

    root: Path
    job_id: str = "job-1"

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def job_dir(self) -> Path:
        return self.shared / self.job_id

    @property
    def prep_wd(self) -> Path:
        return self.root / "workitems" / self.job_id / "job-1" / "jobpreparation" / "wd"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "AZ_BATCH_NODE_ROOT_DIR": str(self.root),
            "AZ_BATCH_NODE_SHARED_DIR": str(self.shared),
            "AZ_BATCH_JOB_ID": self.job_id,
            "AZ_BATCH_NODE_ID": "tvm-1",
            "AZ_BATCH_TASK_ID": "jobpreparation",
            "AZ_BATCH_TASK_DIR": str(self.prep_wd.parent),
            "AZ_BATCH_TASK_WORKING_DIR": str(self.prep_wd),
            **extra,
        }


@pytest.fixture
def batch_node(tmp_path: Path) -> BatchNode:
    node = BatchNode(tmp_path / "node")
    for d in (node.shared, node.root / "startup" / "wd", node.prep_wd):
        d.mkdir(parents=True)
    return node


# bench/mutation.py runs the tests once per mutant: one Azurite it started serves all those runs.
_RUNNING_AZURITE = os.environ.get("NODEKIT_TEST_AZURITE_PORT")


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    if _RUNNING_AZURITE:
        yield Azurite(int(_RUNNING_AZURITE), pid=0)
        return
    server, proc = start_azurite()
    try:
        yield server
    finally:
        stop_process(proc)


AZURE_NAME = f"{DEV_ACCOUNT}.blob.core.windows.net"  # Azurite under its production name, through the tests' proxy


@dataclass(frozen=True)
class Tls:
    """A test certificate authority, a server certificate it signed for the loopback names, and one for
    another name."""

    ca: CertFiles
    server: CertFiles
    wrong_name: CertFiles


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca(folder)
    return Tls(ca, make_server_cert(ca, folder, ["127.0.0.1", "127.0.0.2", "localhost", AZURE_NAME]),
               make_server_cert(ca, folder, ["other.example"], stem="other"))


@pytest.fixture(scope="session")
def azurite_tls(tls: Tls) -> Iterator[Azurite]:
    """Azurite over HTTPS (the test CA's certificate) with `--oauth basic`: bearer tokens work."""
    server, proc = start_azurite(tls.server.cert, tls.server.key, oauth=True)
    try:
        yield server
    finally:
        stop_process(proc)


class Remote:
    """A source the tests fill: `put`, `delete`, and the `url` prep is given."""

    kind: str
    url: str

    def put(self, name: str, data: bytes, *, blocks: bool = False) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError


class LocalRemote(Remote):
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.url = str(root)

    def put(self, name: str, data: bytes, *, blocks: bool = False) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        # a different mtime than any earlier version, as a new upload would have
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_007))

    def delete(self, name: str) -> None:
        (self.root / name).unlink()


class BlobRemote(Remote):
    kind = "azurite"

    def __init__(self, server: Azurite, prefix: str = "", verify: str | None = None) -> None:
        from azure.storage.blob import BlobServiceClient

        self.server = server
        self.container = f"c{uuid.uuid4().hex[:20]}"
        self.options = {"connection_verify": verify} if verify else {}
        self.service = BlobServiceClient.from_connection_string(server.connection_string, **self.options)
        self.client = self.service.get_container_client(self.container)
        self.client.create_container()
        self.prefix = prefix
        self.url = f"{server.endpoint}/{self.container}" + (f"/{prefix}" if prefix else "")

    def _name(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes, *, blocks: bool = False) -> None:
        if blocks:
            from azure.storage.blob import BlobClient

            blob = BlobClient.from_connection_string(
                self.server.connection_string, self.container, self._name(name),
                max_single_put_size=4 * 1024 * 1024, max_block_size=8 * 1024 * 1024, **self.options)
            blob.upload_blob(data, overwrite=True, max_concurrency=4)
        else:
            self.client.upload_blob(self._name(name), data, overwrite=True)

    def delete(self, name: str) -> None:
        self.client.delete_blob(self._name(name))

    def put_raw(self, name: str, data: bytes) -> None:
        """Upload under exactly `name`, every character percent-encoded (so '..' is not normalised away)."""
        from urllib.parse import quote

        import urllib3

        url = self.sas_url(write=True, create=True)
        base, sas = url.split("?", 1)
        container_url = base[: base.index(self.container) + len(self.container)]
        resp = urllib3.request("PUT", f"{container_url}/{quote(self._name(name), safe='')}?{sas}", body=data,
                               headers={"x-ms-version": "2021-08-06", "x-ms-blob-type": "BlockBlob"})
        assert resp.status == 201, resp.status

    def sas_url(self, **perm: bool) -> str:
        from datetime import datetime, timedelta, timezone

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        sas = generate_container_sas(DEV_ACCOUNT, self.container, account_key=DEV_KEY,
                                     permission=ContainerSasPermissions(read=True, list=True, **perm),
                                     expiry=datetime.now(timezone.utc) + timedelta(hours=1))
        return f"{self.url}?{sas}"


@pytest.fixture(params=["local", "azurite"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    """The same storage tests run against a local folder and against Azurite."""
    if request.param == "local":
        yield LocalRemote(tmp_path / "source")
        return
    blobs = BlobRemote(request.getfixturevalue("azurite"))
    yield blobs
    blobs.client.delete_container()  # the emulator keeps everything in memory


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    """The tests' fault-injecting proxy in front of the session's Azurite (no faults until a test adds rules)."""
    p = FaultProxy(azurite.port).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def blob_remote(azurite: Azurite) -> Iterator[BlobRemote]:
    blobs = BlobRemote(azurite)
    yield blobs
    blobs.client.delete_container()


def remote_env(remote: Remote) -> dict[str, str]:
    """The credential variables a test run needs for `remote` (none for a local folder)."""
    if isinstance(remote, BlobRemote):
        return {"AZURE_STORAGE_CONNECTION_STRING": remote.server.connection_string}
    return {}


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` (but nodekit's state folder) by '/'-path."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".nodekit"):
            out[rel] = path.read_bytes()
    return out


