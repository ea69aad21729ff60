"""The generator: golden outputs, command lines split back as each system would, run as Batch runs them."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, BatchNode, BlobRemote, tree
from helpers import run

from nodekit.cmdline import Description, job_json, prep_args, release_args
from nodekit.spec import ReleaseSettings, parse_source

GOLDEN = Path(__file__).parent / "golden"
WHEEL_URL = "https://acct1.blob.core.windows.net/tools/batch_nodekit-0.1.0-py3-none-any.whl"
AWKWARD_LINUX = "/mnt/data/it's \"quoted\" 100% & $HOME ü €"
AWKWARD_WINDOWS = "D:\\data\\it's 100% & $HOME ü €\\"


# -- splitting a command line back, the way each system does ----------------------------------------
def cmd_expand(text: str, env: dict[str, str]) -> str:
    """cmd's command-line %VAR% expansion: defined names expand, anything else stays as it is."""
    out, i = [], 0
    upper = {k.upper(): v for k, v in env.items()}
    while i < len(text):
        if text[i] == "%":
            end = text.find("%", i + 1)
            if end > i + 1 and text[i + 1:end].upper() in upper:
                out.append(upper[text[i + 1:end].upper()])
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def argv_split(text: str) -> list[str]:
    """CommandLineToArgvW: backslashes count only before a quote; quotes toggle; whitespace separates."""
    args: list[str] = []
    cur: list[str] = []
    in_quotes = have = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            n = 0
            while i < len(text) and text[i] == "\\":
                n += 1
                i += 1
            if i < len(text) and text[i] == '"':
                cur.append("\\" * (n // 2))
                if n % 2:
                    cur.append('"')
                    i += 1
                have = True
            else:
                cur.append("\\" * n)
                have = True
            continue
        if c == '"':
            in_quotes = not in_quotes
            have = True
        elif c in " \t" and not in_quotes:
            if have:
                args.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(c)
            have = True
        i += 1
    if have:
        args.append("".join(cur))
    return args


def windows_split(line: str, env: dict[str, str]) -> list[str]:
    """What the program started by `cmd /s /c "…"` receives as argv."""
    prefix = 'cmd /s /c "'
    assert line.startswith(prefix) and line.endswith('"'), line
    inner = cmd_expand(line[len(prefix):-1], env)  # /s: exactly the outer quotes go
    in_quotes = False
    for c in inner:  # cmd's metacharacters must all be inside quotes
        if c == '"':
            in_quotes = not in_quotes
        elif c in "&|<>^" and not in_quotes:
            raise AssertionError(f"cmd would interpret {c!r} in {inner!r}")
    assert not in_quotes, "unbalanced quotes"
    return argv_split(inner)


# -- descriptions ----------------------------------------------------------------------------------
def describe(os_name: str, **extra: Any) -> Description:
    local = AWKWARD_LINUX if os_name == "linux" else AWKWARD_WINDOWS
    return Description(
        job_id="risk-2026-11-24", pool_id="pool_1",
        sources=(parse_source("https://acct1.blob.core.windows.net/market/2026 11/ü", name="market data"),
                 parse_source(local, name="models & more")),
        include=("*.csv", "**/*.onnx"), exclude=("*.tmp",), prep_timeout=1800,
        release=ReleaseSettings(upload_to=parse_source("https://acct1.blob.core.windows.net/joblogs/risk", name="u"),
                                logs=("**/*.log",), deadline=600, wipe_task_dirs=True),
        identity_client_id="11111111-2222-3333-4444-555555555555", os=os_name, **extra)


@pytest.mark.parametrize("os_name", ["linux", "windows"])
def test_golden_outputs(os_name: str) -> None:
    desc = describe(os_name)
    from nodekit.cmdline import command_lines, start_task

    with_wheel = replace(desc, wheel_url=WHEEL_URL)  # batch-nodekit is not on the package index yet
    got = {"lines": "\n".join(command_lines(desc)) + "\n",
           "job": json.dumps(job_json(desc), indent=2, ensure_ascii=False) + "\n",
           "start-task": json.dumps(start_task(with_wheel), indent=2, ensure_ascii=False) + "\n"}
    for fmt, text in got.items():
        path = GOLDEN / f"{os_name}-{fmt}.txt"
        assert text == path.read_text(encoding="utf-8"), f"{path} differs"


def test_linux_lines_split_back_through_real_bash(batch_node: BatchNode) -> None:
    """Batch splits the line (POSIX rules, no shell); bash then runs the script: nodekit gets exactly its args."""
    desc = describe("linux")
    exe = batch_node.shared / ".nodekit" / "venv" / "bin" / "nodekit"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    from nodekit.cmdline import command_lines

    for line, want in zip(command_lines(desc), (prep_args(desc), release_args(desc)), strict=True):
        argv = shlex.split(line)
        assert argv[:2] == ["/bin/bash", "-c"] and len(argv) == 3
        out = subprocess.run(argv, env={"AZ_BATCH_NODE_SHARED_DIR": str(batch_node.shared), "HOME": "/nowhere",
                                        "PATH": os.environ["PATH"]}, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == want
    assert f"models & more={AWKWARD_LINUX}" in prep_args(desc)


def test_windows_lines_split_back_through_cmd_rules() -> None:
    desc = describe("windows")
    from nodekit.cmdline import command_lines

    env = {"AZ_BATCH_NODE_SHARED_DIR": "D:\\batch\\tasks\\shared", "HOME": "C:\\nowhere"}
    for line, want in zip(command_lines(desc), (prep_args(desc), release_args(desc)), strict=True):
        argv = windows_split(line, env)
        assert argv[0] == "D:\\batch\\tasks\\shared\\.nodekit\\venv\\Scripts\\nodekit.exe"
        assert argv[1:] == want
    assert f"models & more={AWKWARD_WINDOWS}" in prep_args(desc)


def test_job_json_is_accepted_by_the_batch_data_model() -> None:
    """az batch job create --json-file deserializes into azure-batch's JobAddParameter: check the same way."""
    from datetime import timedelta

    from azure.batch import models
    from msrest.serialization import Deserializer

    classes = {k: v for k, v in vars(models).items() if isinstance(v, type)}

    def unknown_keys(data: Any, cls: str, where: str) -> list[str]:
        attr_map = classes[cls]._attribute_map
        by_key = {v["key"]: v["type"] for v in attr_map.values()}
        bad = []
        for key, value in data.items():
            if key not in by_key:
                bad.append(f"{where}.{key}")
                continue
            typ = by_key[key]
            inner = typ[1:-1] if typ.startswith("[") else typ
            if inner in classes and hasattr(classes[inner], "_attribute_map"):
                for item in (value if typ.startswith("[") else [value]):
                    bad += unknown_keys(item, inner, f"{where}.{key}")
        return bad

    for os_name in ("linux", "windows"):
        data = job_json(describe(os_name, retention=3 * 86400))
        assert unknown_keys(data, "JobAddParameter", "job") == []
        job = Deserializer(classes)("JobAddParameter", data)
        assert job.validate() == []
        assert job.job_preparation_task.constraints.max_wall_clock_time == timedelta(minutes=35)
        assert job.job_preparation_task.constraints.retention_time == timedelta(days=3)
        assert job.job_preparation_task.wait_for_success is True
        assert job.job_preparation_task.rerun_on_node_reboot_after_success is True
        assert job.job_release_task.max_wall_clock_time == timedelta(minutes=15)
        assert job.job_release_task.retention_time == timedelta(days=3)


def test_generated_lines_run_as_batch_runs_them(batch_node: BatchNode, blob_remote: BlobRemote,
                                                azurite: Any, tmp_path: Path) -> None:
    """Split the lines and execute them with no shell of ours, in a fake node, against Azurite."""
    blob_remote.put("ref/a.csv", b"a,b\n")
    blob_remote.put("ref/deep/b.csv", b"c,d\n")
    blob_remote.put("ref/skip.tmp", b"x")
    local = tmp_path / "models & more"
    local.mkdir()
    (local / "m.onnx").write_bytes(b"model")
    logs = BlobRemote(azurite)
    desc = Description(job_id=batch_node.job_id, pool_id="p",
                       sources=(parse_source(f"{blob_remote.url}/ref", name="ref"), parse_source(str(local))),
                       exclude=("*.tmp",),
                       release=ReleaseSettings(upload_to=parse_source(logs.url, name="u"), logs=("**/*.log",),
                                               deadline=120, wipe_task_dirs=True))
    from nodekit.cmdline import command_lines

    prep_line, release_line = command_lines(desc)
    exe = batch_node.shared / ".nodekit" / "venv" / "bin" / "nodekit"  # what the start task installs
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m nodekit \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    pool_env = {"PATH": os.environ["PATH"], "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}

    for _ in range(2):  # the preparation task, and its re-run after a reboot
        out = subprocess.run(shlex.split(prep_line), env={**pool_env, **batch_node.env()}, cwd=batch_node.prep_wd,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert tree(batch_node.job_dir) == {"ref/a.csv": b"a,b\n", "ref/deep/b.csv": b"c,d\n",
                                        "models & more/m.onnx": b"model"}
    work = batch_node.root / "workitems" / batch_node.job_id / "job-1"
    (work / "task1" / "wd").mkdir(parents=True)
    (work / "task1" / "stdout.txt").write_text("task out")
    (work / "task1" / "wd" / "run.log").write_text("task log")
    own = work / "jobrelease"
    (own / "wd").mkdir(parents=True)
    env = {**pool_env, **batch_node.env(AZ_BATCH_TASK_ID="jobrelease", AZ_BATCH_TASK_DIR=str(own),
                                        AZ_BATCH_TASK_WORKING_DIR=str(own / "wd"))}
    out = subprocess.run(shlex.split(release_line), env=env, cwd=own / "wd", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = sorted(b.name for b in logs.client.list_blobs())
    assert names == [f"{batch_node.job_id}/tvm-1/logs.tar.gz", f"{batch_node.job_id}/tvm-1/manifest.json"]
    assert not batch_node.job_dir.exists() and not (work / "task1" / "wd").exists()
    assert (batch_node.shared / ".nodekit" / "venv" / "bin" / "nodekit").exists()  # nodekit itself stays


SRC = "https://acct1.blob.core.windows.net/data"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([SRC, "--release-max-wall-clock", "20m"], 2, "over Batch's 15 minutes"),
        ([SRC, "--deadline", "15m"], 2, "must end before the release task's maxWallClockTime"),
        ([SRC, "--release-max-wall-clock", "10m", "--deadline", "10m"], 2, "must end before"),
        ([SRC, "--job-id", "bad id!"], 2, "not a valid Batch id"),
        ([SRC, "--job-id", "x" * 65], 2, "not a valid Batch id"),
        ([SRC, "--pool-id", "pool.1"], 2, "pool id 'pool.1' is not a valid Batch id"),
        (["ftp://example.com/data"], 2, "unknown scheme 'ftp:'"),
        (["https://acct1.blob.core.windows.net/data?sv=2021&sp=rl&sig=c2VjcmV0"], 6, "credential"),
        ([SRC, "--upload-to", "https://acct1.blob.core.windows.net/logs?sv=1&sig=c2VjcmV0"], 6, "credential"),
        ([SRC, "--env", "AZURE_STORAGE_KEY=abc"], 6, "looks like a secret"),
        (["--os", "windows", 'C:\\data\\say "hi"'], 2, "double quote"),
        (["--os", "windows", "C:\\data\\%USERNAME%"], 2, "cmd would expand"),
        (["https://acct1.blob.core.windows.net/data/v=2"], 2, "cannot be given on a command line"),
        # issue 16: every credential cmdline can recognise, wherever it would land in the job
        ([SRC, "--env", "DATA_URL=https://acct1.blob.core.windows.net/c/x?sv=2021&sr=c&sig=c2VjcmV0"], 6,
         "--env DATA_URL: it holds a SAS token (its sig parameter)"),
        ([SRC, "--env", "STORE=DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0"], 6,
         "--env STORE: it holds an account key (AccountKey)"),
        ([SRC, "--env", "CS=BlobEndpoint=https://a.blob.core.windows.net;SharedAccessSignature=sv=1&c2VjcmV0"], 6,
         "it holds a SAS token (SharedAccessSignature)"),
        ([SRC, "--env", "QS=sv=2021-08-06&ss=b&sig=c2VjcmV0"], 6, "--env QS: it holds a SAS token (its sig parameter)"),
        ([SRC, "--env", "K=" + "c2VjcmV0" * 10 + "c2Vjcm=="], 6, "looks like a storage account key"),
        ([SRC, "--env", "AUTH=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2VjcmV0"], 6, "looks like an access token"),
        ([SRC, "--env", "HDR=Bearer c2VjcmV0"], 6, "a bearer token"),
        (["https://user:c2VjcmV0@files.example.com/data/model.tgz"], 6, "a password in a URL (user:password@)"),
        ([SRC, "--upload-to", "https://user:c2VjcmV0@acct1.blob.core.windows.net/logs"], 6, "user:password@"),
        ([SRC, "--upload-to", "logs"], 2, "a local destination must be an absolute path"),
        # any query parameter that carries a credential, percent-encoded or not (helper review, issue 16)
        (["https://files.example.com/model.bin?token=c2VjcmV0"], 6, "the 'token' parameter"),
        (["https://b.s3.amazonaws.com/m.bin?X-Amz-Credential=k&X-Amz-Signature=c2VjcmV0"], 6, "'X-Amz-Credential'"),
        (["https://acct1.blob.core.windows.net/data/v2?%73ig=c2VjcmV0"], 6, "the 'sig' parameter"),
        ([SRC, "--env", "MODEL=https://files.example.com/m.bin?access_token=c2VjcmV0"], 6, "'access_token'"),
    ],
)
def test_refusals(args: list[str], code: int, message: str) -> None:
    base = ["cmdline", "--job-id", "job1", "--pool-id", "pool1", "--upload-to",
            "https://acct1.blob.core.windows.net/logs", "--format", "job"]
    result = run([*base, *args], {}, ok=False)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert message in result.stderr
    assert result.stdout == ""  # nothing printed before the refusal
    assert "c2VjcmV0" not in result.stderr  # the SAS is not echoed either


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--wheel-url", "https://acct1.blob.core.windows.net/tools/batch_nodekit-0.1.0-py3-none-any.whl?sv=1&sig=c2VjcmV0"],
         "--wheel-url: it holds a SAS token (its sig parameter)"),
        (["--install", "batch-nodekit @ https://me:c2VjcmV0@pkgs.example.com/batch_nodekit-0.1.0-py3-none-any.whl"],
         "--install: it holds a password in a URL (user:password@)"),
    ],
)
def test_start_task_refuses_credentials(extra: list[str], message: str) -> None:
    result = run(["cmdline", "builtin:sample", "--job-id", "j1", "--upload-to", "/logs", "--format", "start-task",
                  *extra], {}, ok=False)
    assert (result.exit_code, result.stdout) == (6, "")
    assert message in result.stderr and "c2VjcmV0" not in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": $job_id, "poolInfo": {"poolId": $pool_id}, "x": "$HOME"}',
         "has $HOME, which is not one of its placeholders ($job_id, $pool_id, "),
        ('{"id": $job_id, "poolInfo": {"poolId": $pool_id}, "price": "100$ each"}',
         "has a '$' that starts no placeholder (line 1, col 64): write $$ for a literal $."),
    ],
)
def test_template_errors_hint_at_a_literal_dollar(tmp_path: Path, text: str, message: str) -> None:
    template = tmp_path / "job-template.json"
    template.write_text(text)
    result = run(["cmdline", SRC, "--job-id", "j1", "--pool-id", "p1", "--upload-to",
                  "https://acct1.blob.core.windows.net/logs", "--format", "job", "--template", str(template)], {},
                 ok=False)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert "$$" in result.stderr
    template.write_text(text.replace("$HOME", "$$HOME").replace("100$", "100$$"))  # the hint, followed
    job = json.loads(run(["cmdline", SRC, "--job-id", "j1", "--pool-id", "p1", "--upload-to",
                          "https://acct1.blob.core.windows.net/logs", "--format", "job", "--template",
                          str(template)], {}).stdout)
    assert job.get("x", "$HOME") == "$HOME" and job.get("price", "100$ each") == "100$ each"


def test_cmdline_from_a_description_file(tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"nodekit": 1, "job_id": "j1", "pool_id": "p1",
                                "prep": {"sources": ["ref=https://acct1.blob.core.windows.net/refdata"]},
                                "release": {"upload_to": "https://acct1.blob.core.windows.net/logs",
                                            "deadline": "10m"}}))
    result = run(["cmdline", "--spec", str(spec)], {})
    prep, release = result.stdout.splitlines()
    assert "prep ref=https://acct1.blob.core.windows.net/refdata" in prep
    assert "release --upload-to https://acct1.blob.core.windows.net/logs --deadline 600" in release
    assert "note:" in result.stderr


def test_the_documented_wheel_installs_and_generates_from_outside_the_source_tree(tmp_path: Path) -> None:
    """The wheel built as the README says is batch-nodekit, carries the templates (top-level templates/ in the
    source tree), and its `nodekit` generates from a folder far from the source tree.

    No package index: the documented command runs with --no-index --no-build-isolation (this environment's
    setuptools, which the test extra brings), and the wheel's dependencies come from this environment (a .pth
    line names its site-packages; the .pth files in it, such as nodekit's own editable install, are not read)."""
    from nodekit.cmdline import BUILD_WHEEL

    dist = tmp_path / "dist"
    argv = shlex.split(BUILD_WHEEL)  # python -m pip wheel --no-deps -w dist .
    argv[0], argv[argv.index("-w") + 1] = sys.executable, str(dist)
    build = subprocess.run([*argv, "--isolated", "--no-index", "--no-build-isolation"], cwd=ROOT, capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheels = sorted(p.name for p in dist.iterdir())
    assert wheels == ["batch_nodekit-0.1.0-py3-none-any.whl"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    Path(inner, "_deps_of_the_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                          "--isolated", "--disable-pip-version-check", "--no-index", "--no-deps",
                          str(dist / wheels[0])], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import nodekit.cmdline as c; print(c.__file__)"],
                           cwd=away, capture_output=True, text=True, env=env)
    assert where.stdout.startswith(inner), where.stdout  # the installed copy, not the source tree
    out = subprocess.run([str(venv / "bin" / "nodekit"), "cmdline", "builtin:sample", "--job-id", "j1", "--pool-id",
                          "p1", "--upload-to", "https://acct1.blob.core.windows.net/logs", "--format", "job"],
                         cwd=away, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["id"] == "j1" and job["jobReleaseTask"]["maxWallClockTime"] == "PT15M"
    start = subprocess.run([str(venv / "bin" / "nodekit"), "cmdline", "builtin:sample", "--job-id", "j1",
                            "--upload-to", "D:\\logs", "--format", "start-task", "--os", "windows", "--wheel-url",
                            WHEEL_URL], cwd=away, capture_output=True, text=True, env=env)
    assert start.returncode == 0, start.stderr
    task = json.loads(start.stdout)["startTask"]
    assert task["commandLine"].startswith('cmd /s /c "python -m venv')
    assert task["resourceFiles"] == [{"httpUrl": WHEEL_URL, "filePath": "batch_nodekit-0.1.0-py3-none-any.whl"}]


def test_the_start_task_needs_a_wheel_until_batch_nodekit_is_published() -> None:
    """`pip install nodekit` would install another project as root: the start task never defaults to it."""
    result = run(["cmdline", "builtin:sample", "--job-id", "j1", "--upload-to", "/logs", "--format", "start-task"], {},
                 ok=False)
    assert result.exit_code == 2, result.stderr
    assert "batch-nodekit is not on the Python package index yet" in result.stderr
    assert "python -m pip wheel --no-deps -w dist ." in result.stderr and "--wheel-url" in result.stderr
    assert result.stdout == ""
    ok = run(["cmdline", "builtin:sample", "--job-id", "j1", "--upload-to", "/logs", "--format", "start-task",
              "--install", "batch-nodekit @ file:///mnt/tools/batch_nodekit-0.1.0-py3-none-any.whl"], {})
    assert "batch-nodekit @ file:///mnt/tools/" in json.loads(ok.stdout)["startTask"]["commandLine"]
    assert "nodekit==" not in ok.stdout


def test_a_url_whose_query_carries_no_credential_is_passed_on() -> None:
    result = run(["cmdline", "--job-id", "job1", "--upload-to", "https://acct1.blob.core.windows.net/logs",
                  "m=https://files.example.com/model.bin?download=1&version=3"], {})
    assert "m=https://files.example.com/model.bin?download=1&version=3" in result.stdout


@pytest.mark.parametrize(("cache", "skip_archived", "want"), [
    (True, True, ["--cache-max-size", "20%", "--skip-archived"]),
    (True, False, ["--cache-max-size", "20%"]),
    (False, True, ["--no-cache", "--skip-archived"]),
])
def test_prep_args_carry_the_cache_settings_and_skip_archived_each_on_its_own(cache: bool, skip_archived: bool,
                                                                           want: list[str]) -> None:
    desc = Description(job_id="j", sources=(parse_source("https://acct1.blob.core.windows.net/data", name="in"),),
                       cache=cache, cache_max_size="20%", skip_archived=skip_archived)
    args = prep_args(desc)
    flags = [a for a in args if a in ("--no-cache", "--cache-max-size", "20%", "--skip-archived")]
    assert flags == want, args
