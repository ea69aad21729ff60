"""Why nodekit downloads with libcurl and reads listings with ElementTree: the client CPU each way costs.

The same 2,000 blobs of 64 KiB, behind bench/netsim.py (TLS, D ms per request, reads from memory),
the client pinned to its own core, 64 requests in flight, each body hashed (MD5) and written to a
file as prep does. Engines:

- `sdk`: azure-storage-blob's `download_blob().readall()` from 64 threads (one shared session);
- `urllib3`: urllib3 (requests' engine, what azure-core's transport runs on) from 64 threads;
- `pycurl`: libcurl's multi interface from one thread (what nodekit uses);

and listings of those 2,000 blobs: the SDK's `list_blobs` (generated models) against one List
Blobs answer read with ElementTree (`nodekit.storage.azure.parse_listing`). Prints CPU seconds
(user + system) and wall time per engine, the median of `--rounds`. Run with the bench venv:
`.bench/venv/bin/python bench/engines_bench.py`. Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

ENGINES = ("sdk", "urllib3", "pycurl", "list-sdk", "list-etree")
N, SIZE, CONC = 2000, 64 * 1024, 64

CLIENT = r'''
import hashlib, os, sys, time, json
engine, url, sas, ca, dest = sys.argv[1:6]
names = [f"small/{i // 500:03}/file-{i:05}.bin" for i in range(2000)]
def land(name, data):
    h = hashlib.md5(); h.update(data); h.digest()
    path = os.path.join(dest, name.replace("/", "_")); fd = os.open(path + ".part", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data); os.close(fd); os.replace(path + ".part", path)
if engine == "sdk":
    from concurrent.futures import ThreadPoolExecutor
    import requests
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import ContainerClient
    session = requests.Session(); session.verify = ca  # a transport of our own: its session decides trust
    session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=70))
    cc = ContainerClient(url.rsplit("/", 1)[0], url.rsplit("/", 1)[1], credential=sas, connection_verify=ca,
                         transport=RequestsTransport(session=session, session_owner=False, connection_verify=ca),
                         retry_total=0)
    with ThreadPoolExecutor(64) as ex:
        list(ex.map(lambda n: land(n, cc.get_blob_client(n).download_blob().readall()), names))
elif engine == "urllib3":
    import ssl, urllib3
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    pool = urllib3.HTTPSConnectionPool(parts.hostname, parts.port, maxsize=64,
                                       ssl_context=ssl.create_default_context(cafile=ca))
    def get(n):
        r = pool.urlopen("GET", f"{parts.path}/{n}?{sas}", headers={"x-ms-version": "2025-01-05"},
                         preload_content=True, retries=False)
        assert r.status == 200
        land(n, r.data)
    with ThreadPoolExecutor(64) as ex:
        list(ex.map(get, names))
elif engine == "pycurl":
    import pycurl
    from collections import deque
    m = pycurl.CurlMulti(); free = []
    for _ in range(64):
        c = pycurl.Curl(); c.setopt(pycurl.CAINFO, ca); c.setopt(pycurl.NOSIGNAL, 1); free.append(c)
    pending, active = deque(names), {}
    while pending or active:
        while pending and free:
            n, c = pending.popleft(), free.pop(); chunks = []
            c.setopt(pycurl.URL, f"{url}/{n}?{sas}"); c.setopt(pycurl.HTTPHEADER, ["x-ms-version: 2025-01-05"])
            c.setopt(pycurl.WRITEFUNCTION, chunks.append); m.add_handle(c); active[c] = (n, chunks)
        while m.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            q, ok, bad = m.info_read()
            for c in ok:
                n, chunks = active.pop(c); m.remove_handle(c); free.append(c); land(n, b"".join(chunks))
            assert not bad, bad
            if not q:
                break
        if active:
            m.select(1.0)
elif engine == "list-sdk":
    from azure.storage.blob import ContainerClient
    cc = ContainerClient(url.rsplit("/", 1)[0], url.rsplit("/", 1)[1], credential=sas, connection_verify=ca)
    assert sum(1 for _ in cc.list_blobs(include=["metadata"])) == 2000
else:
    import pycurl
    body = []
    c = pycurl.Curl(); c.setopt(pycurl.CAINFO, ca)
    c.setopt(pycurl.URL, f"{url}?restype=container&comp=list&include=metadata&maxresults=5000&{sas}")
    c.setopt(pycurl.HTTPHEADER, ["x-ms-version: 2025-01-05"]); c.setopt(pycurl.WRITEFUNCTION, body.append)
    c.perform()
    from nodekit.storage.azure import parse_listing
    assert len(parse_listing(b"".join(body), "listing")[0]) == 2000
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=15.0)
    ap.add_argument("--engines", default=",".join(ENGINES))
    args = ap.parse_args()
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas
    from azurite import DEV_ACCOUNT, DEV_KEY
    from prep_bench import PYTHON, SERVER_CORE, TOOL_CORE, Condition, Server
    from scratch import scratch

    work = scratch() / "engines-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = Server(work)
    try:
        conn = server.azurite.connection_string
        client = BlobServiceClient.from_connection_string(conn, connection_verify=str(server.ca.cert))
        cc = client.get_container_client("bench")
        cc.create_container()
        data = os.urandom(SIZE)
        from concurrent.futures import ThreadPoolExecutor

        def put(i: int) -> None:
            cc.upload_blob(f"small/{i // 500:03}/file-{i:05}.bin", data[:-4] + i.to_bytes(4, "big"))

        with ThreadPoolExecutor(16) as ex:
            list(ex.map(put, range(N)))
        sas = generate_container_sas(DEV_ACCOUNT, "bench", account_key=DEV_KEY, expiry=datetime.now(timezone.utc)
                                     + timedelta(hours=2), permission=ContainerSasPermissions(read=True, list=True))
        server.start_netsim(Condition(args.delay, 60e6))
        url = f"https://127.0.0.1:{server.port}/devstoreaccount1/bench"
        script = work / "client.py"
        script.write_text(CLIENT)
        env = {k: v for k, v in os.environ.items()
               if k not in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "SSL_CERT_DIR")}
        env["PYTHONPATH"] = str(ROOT)
        results: dict[str, list[tuple[float, float]]] = {}
        engines = [e for e in args.engines.split(",") if e]
        for r in range(args.rounds + 1):  # the first round is an untimed warm-up (netsim learns the reads)
            for engine in engines:
                dest = work / "dest"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                with tempfile.NamedTemporaryFile(suffix=".time") as out:
                    started = time.perf_counter()
                    subprocess.run(["/usr/bin/time", "-f", "%U %S", "-o", out.name, "taskset", "-c", TOOL_CORE,
                                    str(PYTHON), str(script), engine, url, sas, str(server.ca.cert), str(dest)],
                                   env=env, check=True)
                    wall = time.perf_counter() - started
                    user, system = Path(out.name).read_text().split()[-2:]
                if r:
                    results.setdefault(engine, []).append((float(user) + float(system), wall))
                    print(f"round {r} {engine:10} cpu {float(user) + float(system):.2f} s, wall {wall:.2f} s",
                          file=sys.stderr)
        print(f"2,000 × 64 KiB over TLS, D = {args.delay:g} ms, 64 in flight; server on core {SERVER_CORE}, client on "
              f"core {TOOL_CORE}; median of {args.rounds} (CPU: the client process's, import included)\n")
        print("| engine | CPU s | wall s |\n| --- | --- | --- |")
        for engine, got in results.items():
            cpu, wall = statistics.median(c for c, _ in got), statistics.median(w for _, w in got)
            print(f"| {engine} | {cpu:.2f} | {wall:.2f} |")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
