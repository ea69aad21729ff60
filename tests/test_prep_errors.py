"""Bad input: each case ends in one line on stderr, its documented exit code, and no file changed."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import DEV_ACCOUNT, DEV_KEY, Azurite, BatchNode, BlobRemote, tree
from helpers import run

from nodekit.errors import ExitCode


@dataclass
class Case:
    id: str
    setup: Callable[[BatchNode, Azurite, Path], tuple[list[str], dict[str, str]]]
    code: ExitCode
    message: str


def _blob(server: Azurite, *names: str, raw: bool = False) -> BlobRemote:
    remote = BlobRemote(server)
    for name in names:
        (remote.put_raw if raw else remote.put)(name, b"data")
    return remote


def _cs(server: Azurite) -> dict[str, str]:
    return {"AZURE_STORAGE_CONNECTION_STRING": server.connection_string}


def _expired_sas(server: Azurite) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    remote = _blob(server, "a.txt")
    sas = generate_container_sas(DEV_ACCOUNT, remote.container, account_key=DEV_KEY,
                                 permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.now(timezone.utc) - timedelta(hours=1))
    return f"{remote.url}?{sas}"


CASES = [
    Case("unknown-scheme", lambda n, s, t: (["prep", "ftp://example.com/data"], n.env()),
         ExitCode.USAGE, "unknown scheme 'ftp:'"),
    Case("malformed-url", lambda n, s, t: (["prep", "http://[::1/data"], n.env()),
         ExitCode.USAGE, "malformed URL"),
    Case("bad-container-name", lambda n, s, t: (["prep", "https://acct.blob.core.windows.net/Bad_Name"], n.env()),
         ExitCode.USAGE, "is not a valid container name"),
    Case("missing-container", lambda n, s, t: (["prep", f"{s.endpoint}/nosuchcontainer"], {**n.env(), **_cs(s)}),
         ExitCode.SOURCE, "not found (404 ContainerNotFound)"),
    Case("wrong-key", lambda n, s, t: (
        ["prep", _blob(s, "a.txt").url],
        {**n.env(), "AZURE_STORAGE_ACCOUNT": DEV_ACCOUNT, "AZURE_STORAGE_KEY": "d3Jvbmcga2V5IHdyb25nIGtleQ=="}),
         ExitCode.SOURCE, "access denied (403"),
    Case("key-not-base64", lambda n, s, t: (
        ["prep", _blob(s, "a.txt").url],
        {**n.env(), "AZURE_STORAGE_ACCOUNT": DEV_ACCOUNT, "AZURE_STORAGE_KEY": "not base64 !"}),
         ExitCode.USAGE, "is not a valid storage key"),
    Case("expired-sas", lambda n, s, t: (["prep", _expired_sas(s)], n.env()),
         ExitCode.SOURCE, "expired at"),
    Case("traversal-names", lambda n, s, t: (
        ["prep", _blob(s, "ok.txt", "../evil.txt", "sub/../../evil2.txt", raw=True).url], {**n.env(), **_cs(s)}),
         ExitCode.UNSAFE, "refusing 2 unsafe name(s)"),
    Case("absolute-and-drive-names", lambda n, s, t: (
        ["prep", _blob(s, "ok.txt", "/abs.txt", "C:/win.txt").url], {**n.env(), **_cs(s)}),
         ExitCode.UNSAFE, "'/abs.txt' (absolute path)"),
    Case("colliding-names", lambda n, s, t: (["prep", _blob(s, "a", "a/b").url], {**n.env(), **_cs(s)}),
         ExitCode.UNSAFE, "/a <-> "),
    Case("missing-job-id", lambda n, s, t: (
        ["prep", "builtin:sample"], {k: v for k, v in n.env().items() if k != "AZ_BATCH_JOB_ID"}),
         ExitCode.BATCH_ENV, "AZ_BATCH_JOB_ID is not set"),
    Case("missing-shared-dir", lambda n, s, t: (
        ["prep", "builtin:sample"], {k: v for k, v in n.env().items() if k != "AZ_BATCH_NODE_SHARED_DIR"}),
         ExitCode.BATCH_ENV, "AZ_BATCH_NODE_SHARED_DIR is not set"),
    Case("dest-outside-shared-dir", lambda n, s, t: (["prep", "builtin:sample", "--dest", str(t / "elsewhere")],
                                                     n.env()),
         ExitCode.UNSAFE, "is not inside"),
    Case("dest-is-shared-dir", lambda n, s, t: (["prep", "builtin:sample", "--dest", "."], n.env()),
         ExitCode.UNSAFE, "is not inside"),
    Case("job-id-dotdot", lambda n, s, t: (["prep", "builtin:sample", "--job-id", ".."], n.env()),
         ExitCode.UNSAFE, "is not a valid Batch id"),
    Case("source-name-dotdot", lambda n, s, t: (["prep", "..=builtin:sample"], n.env()),
         ExitCode.UNSAFE, "source folder name '..'"),
    Case("timeout-too-long", lambda n, s, t: (["prep", "builtin:sample", "--timeout", "48h"], n.env()),
         ExitCode.USAGE, "--timeout 48h is too long"),
    Case("timeout-not-duration", lambda n, s, t: (["prep", "builtin:sample", "--timeout", "soon"], n.env()),
         ExitCode.USAGE, "is not a duration"),
    Case("empty-source", lambda n, s, t: (["prep", BlobRemote(s).url], {**n.env(), **_cs(s)}),
         ExitCode.SOURCE, "has no files (it is empty)"),
    Case("filters-select-nothing", lambda n, s, t: (["prep", "builtin:sample", "--include", "*.nothing"], n.env()),
         ExitCode.SOURCE, "has no files (6 before --include/--exclude)"),
    Case("missing-local-folder", lambda n, s, t: (["prep", str(t / "no-such-folder")], n.env()),
         ExitCode.SOURCE, "does not exist"),
    Case("no-source", lambda n, s, t: (["prep"], n.env()), ExitCode.USAGE, "no source given"),
    Case("spec-not-json", lambda n, s, t: (["prep", "--spec", str(_write(t / "s.json", "{oops"))], n.env()),
         ExitCode.USAGE, "is not valid JSON"),
    Case("spec-unknown-key", lambda n, s, t: (
        ["prep", "--spec", str(_write(t / "s.json", json.dumps({"prep": {"source": []}})))], n.env()),
         ExitCode.USAGE, "unknown key 'source'"),
    Case("spec-and-arguments", lambda n, s, t: (
        ["prep", "builtin:sample", "--spec",
         str(_write(t / "s.json", json.dumps({"prep": {"sources": ["builtin:sample"]}})))], n.env()),
         ExitCode.USAGE, "not both"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, batch_node: BatchNode, azurite: Azurite, tmp_path: Path) -> None:
    args, env = case.setup(batch_node, azurite, tmp_path)
    before = tree(batch_node.root)
    result = run(args, env, ok=False)
    assert result.exit_code == case.code, (result.exit_code, result.stderr)
    assert case.message in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "Error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert tree(batch_node.root) == before
    assert not batch_node.job_dir.exists()
