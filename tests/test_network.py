"""The network as real nodes meet it, on loopback: TLS, proxies, managed identities and every credential form.

Azurite runs over HTTPS with a certificate from the tests' own CA and `--oauth basic`; a forward
proxy (tests/netservers.py) tunnels CONNECT and forwards plain requests; a managed-identity token
endpoint speaks App Service's protocol to azure-identity. Servers named 127.0.0.2 are reachable only
through the proxy (they listen on 127.0.0.1), so a run that succeeds against them went through it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import DEV_ACCOUNT, DEV_KEY, Azurite, BatchNode, BlobRemote, Tls, tree
from faultproxy import FaultProxy, Rule
from helpers import report, run
from netservers import ForwardProxy, TlsStub, TokenEndpoint
from test_release import ReleaseNode, release_node  # noqa: F401 - the fixture

from nodekit import __version__

FILES = {"a.txt": b"alpha\n", "d/b.bin": os.urandom(70_000), "d/e/c.bin": os.urandom(3_000_000)}


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    p = ForwardProxy().start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def tokens() -> Iterator[TokenEndpoint]:
    t = TokenEndpoint().start()
    try:
        yield t
    finally:
        t.stop()


def _fill(remote: BlobRemote) -> dict[str, bytes]:
    for name, data in FILES.items():
        remote.put(name, data)
    return {f"in/{k}": v for k, v in FILES.items()}


def test_https_trusted_works_untrusted_and_wrong_name_fail_at_once(azurite_tls: Azurite, tls: Tls,
                                                                   batch_node: BatchNode) -> None:
    remote = BlobRemote(azurite_tls, verify=str(tls.ca.cert))
    expected = _fill(remote)
    creds = {"AZURE_STORAGE_CONNECTION_STRING": azurite_tls.connection_string}
    for variable in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        job = f"trust-{variable.lower().replace('_', '-')}"
        run(["prep", f"in={remote.url}", "--job-id", job], batch_node.env(**creds, **{variable: str(tls.ca.cert)}))
        assert tree(batch_node.shared / job) == {k: v for k, v in expected.items()}

    started = time.monotonic()
    untrusted = run(["prep", f"in={remote.url}", "--job-id", "untrusted"], batch_node.env(**creds), ok=False)
    assert time.monotonic() - started < 15
    assert untrusted.exit_code == 4, untrusted.stderr
    assert "is not trusted" in untrusted.stderr and "REQUESTS_CA_BUNDLE" in untrusted.stderr
    assert len(untrusted.stderr.strip().splitlines()) == 1
    assert not (batch_node.shared / "untrusted").exists() or tree(batch_node.shared / "untrusted") == {}

    stub = TlsStub(tls.wrong_name.cert, tls.wrong_name.key).start()  # trusted CA, certificate for other.example
    try:
        started = time.monotonic()
        url = f"https://127.0.0.1:{stub.port}/{DEV_ACCOUNT}/{remote.container}?sv=2025-01-05&sr=c&sp=rl&sig=x"
        wrong = run(["prep", f"in={url}", "--job-id", "wrong"], batch_node.env(REQUESTS_CA_BUNDLE=str(tls.ca.cert)),
                    ok=False)
    finally:
        stub.stop()
    assert time.monotonic() - started < 15
    assert wrong.exit_code == 4 and "for another host name" in wrong.stderr, wrong.stderr
    assert stub.connections >= 1  # it was this server's certificate that was judged

    started = time.monotonic()
    unknown = run(["prep", "in=https://nosuchaccount.blob.core.invalid/cont/x?sv=1&sr=c&sp=rl&sig=x", "--job-id",
                   "dns"], batch_node.env(), ok=False)
    assert time.monotonic() - started < 15
    assert unknown.exit_code == 4 and "cannot be resolved" in unknown.stderr, unknown.stderr


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"])
def test_proxy_variables_carry_every_request_of_prep_and_release(variable: str, forward_proxy: ForwardProxy,
                                                                 azurite: Azurite, azurite_tls: Azurite, tls: Tls,
                                                                 release_node: ReleaseNode,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    server = azurite_tls if variable.lower().startswith("https") else azurite
    ca = {"REQUESTS_CA_BUNDLE": str(tls.ca.cert)} if server is azurite_tls else {}
    remote = BlobRemote(server, verify=str(tls.ca.cert) if ca else None)
    expected = _fill(remote)
    hidden = server.via("127.0.0.2")  # nothing listens there: only the proxy can reach it
    url = f"{hidden.endpoint}/{remote.container}"
    env = release_node.env(AZURE_STORAGE_CONNECTION_STRING=hidden.connection_string, **{variable: forward_proxy.url},
                           **ca)
    node = release_node.node
    run(["prep", f"in={url}", "--job-id", "job-1", "--report", str(tmp_path / "p.json")], env)
    assert tree(node.job_dir) == {**expected, "task-output.txt": b"written by a task", "input/data.bin":
                                  (node.job_dir / "input" / "data.bin").read_bytes()}
    run(["release", "--upload-to", f"{hidden.endpoint}/{remote.container}", "--report", str(tmp_path / "r.json")],
        env)
    kept = sorted(b.name for b in remote.client.list_blobs(name_starts_with="job-1/tvm-1/"))
    assert kept == ["job-1/tvm-1/dumps/job-1/task002/wd/core.gz", "job-1/tvm-1/logs.tar.gz",
                    "job-1/tvm-1/manifest.json"]
    assert not node.job_dir.exists()
    if server is azurite_tls:
        assert forward_proxy.tunnels[f"127.0.0.2:{server.port}"] >= 1 and not forward_proxy.requests
    else:
        seen = forward_proxy.requests
        assert seen[f"GET 127.0.0.2:{server.port}"] >= len(FILES) and seen[f"PUT 127.0.0.2:{server.port}"] >= 3


def test_no_proxy_names_the_host_and_nothing_goes_through_the_proxy(forward_proxy: ForwardProxy, azurite: Azurite,
                                                                     azurite_tls: Azurite, tls: Tls,
                                                                     batch_node: BatchNode) -> None:
    for server, variable, no_proxy in ((azurite, "HTTP_PROXY", "NO_PROXY"), (azurite_tls, "https_proxy", "no_proxy")):
        ca = {"REQUESTS_CA_BUNDLE": str(tls.ca.cert)} if server is azurite_tls else {}
        remote = BlobRemote(server, verify=str(tls.ca.cert) if ca else None)
        expected = _fill(remote)
        job = f"direct-{server.scheme}"
        run(["prep", f"in={remote.url}", "--job-id", job],
            batch_node.env(AZURE_STORAGE_CONNECTION_STRING=server.connection_string, **{variable: forward_proxy.url},
                           **{no_proxy: "localhost,127.0.0.1"}, **ca))
        assert tree(batch_node.shared / job) == expected
    assert not forward_proxy.tunnels and not forward_proxy.requests


def test_managed_identity_end_to_end_prep_and_release(azurite_tls: Azurite, tls: Tls, tokens: TokenEndpoint,
                                                      forward_proxy: ForwardProxy,
                                                      release_node: ReleaseNode,  # noqa: F811
                                                      tmp_path: Path) -> None:
    remote = BlobRemote(azurite_tls, verify=str(tls.ca.cert))
    expected = _fill(remote)
    hidden = azurite_tls.via("127.0.0.2")
    # the token endpoint is reachable only through the proxy too: tokens honour HTTP_PROXY as data does
    env = release_node.env(REQUESTS_CA_BUNDLE=str(tls.ca.cert), HTTPS_PROXY=forward_proxy.url,
                           HTTP_PROXY=forward_proxy.url, **tokens.env(host="127.0.0.2"))
    run(["prep", f"in={hidden.endpoint}/{remote.container}", "--identity-client-id", "cid-1234", "--job-id",
         "job-1", "--report", str(tmp_path / "p.json")], env)
    node = release_node.node
    assert {k: (node.job_dir / k).read_bytes() for k in expected} == expected
    assert report(tmp_path / "p.json")["sources"][0]["credential"] == "managed identity (client id cid-1234)"
    run(["release", "--upload-to", f"{hidden.endpoint}/{remote.container}", "--identity-client-id", "cid-1234"], env)
    kept = sorted(b.name for b in remote.client.list_blobs(name_starts_with="job-1/tvm-1/"))
    assert "job-1/tvm-1/logs.tar.gz" in kept and not node.job_dir.exists()
    assert tokens.issued >= 2 and set(tokens.client_ids) == {"cid-1234"}
    assert forward_proxy.requests[f"GET 127.0.0.2:{tokens.port}"] >= 2  # the token requests went through the proxy


def test_a_token_renewal_that_fails_mid_run_keeps_the_valid_token(azurite_tls: Azurite, tls: Tls,
                                                                  batch_node: BatchNode, tmp_path: Path) -> None:
    """azure-identity renews a token that has less than 5 minutes left at most every 30 s: a run of about
    40 s sees one renewal fail (the endpoint answers 500 after the first token) and goes on with the token
    it has, which is valid for 4 minutes."""
    remote = BlobRemote(azurite_tls, verify=str(tls.ca.cert))
    for i in range(11):
        remote.put(f"f{i:02}.bin", os.urandom(256 * 1024))
    tokens = TokenEndpoint(minutes=4, fail_after=1).start()
    slow = FaultProxy(azurite_tls.port, tls=(str(tls.server.cert), str(tls.server.key))).start()
    try:
        slow.set_rules([Rule("slow", 1.0, pattern=rf"^GET /{DEV_ACCOUNT}/{remote.container}/f", bytes_per_s=85_000)])
        url = f"https://127.0.0.1:{slow.port}/{DEV_ACCOUNT}/{remote.container}"
        rep = tmp_path / "r.json"
        started = time.monotonic()
        run(["prep", f"in={url}", "--identity-client-id", "cid-1", "--concurrency", "1", "--report", str(rep),
             "--progress-interval", "0"], batch_node.env(REQUESTS_CA_BUNDLE=str(tls.ca.cert), **tokens.env()))
        took = time.monotonic() - started
    finally:
        slow.stop()
        tokens.stop()
    assert took > 32, took  # long enough for azure-identity to try a renewal
    assert tokens.issued == 1 and tokens.failed >= 1  # a renewal was tried, and failed
    assert report(rep)["downloaded"] == 11

    # once nothing valid is left (no token could be had at all): a transient failure, said in one line
    dead = TokenEndpoint(fail_after=0).start()
    try:
        result = run(["prep", f"in={azurite_tls.endpoint}/{remote.container}", "--identity-client-id", "cid-1",
                      "--job-id", "dead"], batch_node.env(REQUESTS_CA_BUNDLE=str(tls.ca.cert), **dead.env()), ok=False)
    finally:
        dead.stop()
    assert result.exit_code == 5, result.stderr
    assert "could not get a token for managed identity (client id cid-1)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_credential_at_all_is_one_line_naming_what_was_tried(azurite_tls: Azurite, tls: Tls,
                                                                 batch_node: BatchNode) -> None:
    remote = BlobRemote(azurite_tls, verify=str(tls.ca.cert))
    _fill(remote)
    result = run(["prep", f"in={remote.url}"], batch_node.env(REQUESTS_CA_BUNDLE=str(tls.ca.cert)), ok=False)
    assert result.exit_code == 4, result.stderr
    assert "no usable Azure credential" in result.stderr and "ManagedIdentityCredential" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # azure-identity's own log lines stay quiet


def test_a_bearer_token_is_never_sent_over_http(azurite: Azurite, tokens: TokenEndpoint,
                                                batch_node: BatchNode) -> None:
    remote = BlobRemote(azurite)
    _fill(remote)
    for extra in (["--identity-client-id", "cid-1"], []):
        result = run(["prep", f"in={remote.url}", *extra], batch_node.env(**tokens.env()), ok=False)
        assert result.exit_code == 2, result.stderr
        assert "refusing to send an Azure AD token over plain http://" in result.stderr
    assert tokens.issued == 0


def _sas_forms(remote: BlobRemote) -> dict[str, tuple[str, dict[str, str]]]:
    """Each credential form: (source argument, environment) that should download FILES (or one of them)."""
    from azure.storage.blob import (
        AccountSasPermissions,
        BlobSasPermissions,
        ContainerSasPermissions,
        ResourceTypes,
        generate_account_sas,
        generate_blob_sas,
        generate_container_sas,
    )

    later = datetime.now(timezone.utc) + timedelta(hours=2)
    container, base = remote.container, remote.url
    endpoint = remote.server.endpoint
    sas_c = generate_container_sas(DEV_ACCOUNT, container, account_key=DEV_KEY,
                                   permission=ContainerSasPermissions(read=True, list=True), expiry=later)
    read_only = generate_container_sas(DEV_ACCOUNT, container, account_key=DEV_KEY,
                                       permission=ContainerSasPermissions(read=True), expiry=later)
    blob_sas = generate_blob_sas(DEV_ACCOUNT, container, "d/b.bin", account_key=DEV_KEY,
                                 permission=BlobSasPermissions(read=True), expiry=later)
    account = generate_account_sas(DEV_ACCOUNT, DEV_KEY, ResourceTypes(container=True, object=True),
                                   AccountSasPermissions(read=True, list=True), expiry=later)
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=2)).strftime("%Y-%m-%d")
    dated = generate_container_sas(DEV_ACCOUNT, container, account_key=DEV_KEY,
                                   permission=ContainerSasPermissions(read=True, list=True), expiry=tomorrow)
    forms = {
        "container SAS in the URL": (f"in={base}?{sas_c}", {}),
        "read-only SAS on a one-blob URL": (f"in={base}/d/b.bin?{read_only}", {}),
        "blob SAS on a one-blob URL": (f"in={base}/d/b.bin?{blob_sas}", {}),
        "account SAS in the URL": (f"in={base}?{account}", {}),
        "a SAS with a date-only expiry": (f"in={base}?{dated}", {}),
        "key connection string": (f"in={base}", {"AZURE_STORAGE_CONNECTION_STRING": remote.server.connection_string}),
        "SAS connection string": (f"in={base}", {"AZURE_STORAGE_CONNECTION_STRING":
                                                 f"BlobEndpoint={endpoint};SharedAccessSignature={account}"}),
        "account and key": (f"in={base}", {"AZURE_STORAGE_ACCOUNT": DEV_ACCOUNT, "AZURE_STORAGE_KEY": DEV_KEY}),
        "AZURE_STORAGE_SAS_TOKEN": (f"in={base}", {"AZURE_STORAGE_SAS_TOKEN": sas_c}),
    }
    return forms


def test_every_credential_form_downloads_the_right_bytes(azurite: Azurite, azurite_tls: Azurite, tls: Tls,
                                                         tokens: TokenEndpoint, batch_node: BatchNode,
                                                         tmp_path: Path) -> None:
    plain = BlobRemote(azurite)
    expected = _fill(plain)
    secure = BlobRemote(azurite_tls, verify=str(tls.ca.cert))
    _fill(secure)
    ca = {"REQUESTS_CA_BUNDLE": str(tls.ca.cert)}
    cases = [(name, arg, env) for name, (arg, env) in _sas_forms(plain).items()]
    cases.append(("DefaultAzureCredential", f"in={secure.url}", {**ca, **tokens.env()}))
    cases.append(("managed identity by client id", f"in={secure.url}", {**ca, **tokens.env(),
                                                                         "AZURE_CLIENT_ID": "cid-env"}))
    for i, (name, arg, env) in enumerate(cases):
        job = f"form-{i}"
        rep = tmp_path / f"{job}.json"
        run(["prep", arg, "--job-id", job, "--report", str(rep), "--no-cache"], batch_node.env(**env))
        got = tree(batch_node.shared / job)
        if "one-blob" in name:
            assert got == {"in/b.bin": FILES["d/b.bin"]}, name
        else:
            assert got == expected, name
        assert report(rep)["retries"] == 0, name
        run(["prep", arg, "--job-id", job, "--report", str(rep), "--no-cache"], batch_node.env(**env))
        assert report(rep)["downloaded"] == 0 and report(rep)["skipped"] == len(got), name
    assert "cid-env" in tokens.client_ids


def test_expired_and_not_yet_valid_sas_are_named_wherever_they_come_from(blob_remote: BlobRemote,
                                                                           batch_node: BatchNode) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    _fill(blob_remote)
    now = datetime.now(timezone.utc)
    expired = generate_container_sas(DEV_ACCOUNT, blob_remote.container, account_key=DEV_KEY,
                                     permission=ContainerSasPermissions(read=True, list=True),
                                     start=now - timedelta(days=3), expiry=now - timedelta(days=1))
    future = generate_container_sas(DEV_ACCOUNT, blob_remote.container, account_key=DEV_KEY,
                                    permission=ContainerSasPermissions(read=True, list=True),
                                    start=now + timedelta(days=1), expiry=now + timedelta(days=2))
    endpoint = blob_remote.server.endpoint
    for sas, says in ((expired, "expired at"), (future, "is not valid before")):
        for arg, env, origin in (
                (f"in={blob_remote.url}?{sas}", {}, "the URL"),
                (f"in={blob_remote.url}", {"AZURE_STORAGE_SAS_TOKEN": sas}, "AZURE_STORAGE_SAS_TOKEN"),
                (f"in={blob_remote.url}", {"AZURE_STORAGE_CONNECTION_STRING":
                                           f"BlobEndpoint={endpoint};SharedAccessSignature={sas}"},
                 "AZURE_STORAGE_CONNECTION_STRING")):
            result = run(["prep", arg], batch_node.env(**env), ok=False)
            assert result.exit_code == 4, result.stderr
            assert f"the SAS token from {origin}" in result.stderr and says in result.stderr, result.stderr
            assert "sig=" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not batch_node.job_dir.exists() or tree(batch_node.job_dir) == {}


def test_every_request_names_nodekit_and_carries_a_request_id_that_failures_repeat(
        azurite: Azurite, blob_remote: BlobRemote, batch_node: BatchNode, tmp_path: Path) -> None:
    _fill(blob_remote)
    spy = FaultProxy(azurite.port).start()
    try:
        url = f"http://127.0.0.1:{spy.port}/{DEV_ACCOUNT}/{blob_remote.container}"
        env = batch_node.env(AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string)
        run(["prep", f"in={url}", "--job-id", "ok"], env)
        spy.set_rules([Rule("500", 1.0, pattern=r"^GET .*/d/e/c\.bin$")])
        rep = tmp_path / "r.json"
        failed = run(["prep", f"in={url}", "--job-id", "bad", "--timeout", "4", "--report", str(rep),
                      "--no-cache"], env, ok=False)
    finally:
        spy.stop()
    assert spy.seen and all(ua.startswith(f"nodekit/{__version__}") and rid for _, _, ua, rid in spy.seen)
    assert len({rid for *_, rid in spy.seen}) == len(spy.seen)  # a fresh id for every request
    assert failed.exit_code == 5, failed.stderr
    ids = [rid for m, p, _, rid in spy.seen if p.endswith("/d/e/c.bin")]
    assert any(rid in failed.stderr for rid in ids), failed.stderr
    assert any(rid in json.dumps(report(rep)) for rid in ids)
