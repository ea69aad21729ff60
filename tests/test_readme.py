"""The README is true: its shell examples run as written, and the command lines it shows are nodekit's.

Rules the README follows (its Development section says so):
- every line of a ```bash block is a `nodekit` command, run as written by bash, in order, in one new
  folder that holds the files the README marks `<!-- file: NAME -->`; each must exit 0;
- examples that would reach Azure are `cmdline` commands, which never send a request;
- every Batch command line shown in a ```text block is one that a README `cmdline` command prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.S)


def _blocks() -> list[tuple[str, str | None, str]]:
    return [(m["lang"], m["file"], m["body"]) for m in BLOCK.finditer(README)]


def _commands(body: str) -> list[str]:
    """The block's commands, continuation lines (ending in a backslash) joined."""
    commands, current = [], ""
    for line in body.splitlines():
        if line.endswith("\\"):
            current += line[:-1]
            continue
        commands.append(current + line)
        current = ""
    return [c.strip() for c in commands if c.strip()]


def test_every_shell_example_runs_as_written(tmp_path: Path) -> None:
    blocks = _blocks()
    for _lang, name, body in blocks:
        if name:
            (tmp_path / name).write_text(body + "\n", encoding="utf-8")
    assert {"job.json", "tasks.json"} <= {p.name for p in tmp_path.iterdir()}
    commands = [c for lang, _, body in blocks if lang == "bash" for c in _commands(body)]
    assert len(commands) >= 7
    (tmp_path / "tmp").mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path / "tmp"), "LANG": "C.UTF-8"}  # `nodekit` is the installed console script
    outputs = []
    for command in commands:
        assert command.startswith("nodekit "), command
        if "blob.core.windows.net" in command:
            assert command.startswith("nodekit cmdline "), f"an example that would reach Azure: {command}"
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)

    # what the examples say they do
    job = json.loads((tmp_path / "job-add.json").read_text())
    assert (job["id"], job["poolInfo"]["poolId"]) == ("risk-2026-11-24", "risk-pool")
    assert json.loads((tmp_path / "job.json").read_text())["job_id"] == "risk-2026-11-24"  # its input, intact
    start = json.loads((tmp_path / "start-task.json").read_text())["startTask"]
    assert start["resourceFiles"][0]["filePath"] == "batch_nodekit-0.1.0-py3-none-any.whl"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(t["task"] for t in summary["tasks"]) == ["render-1", "render-2", "render-3"]
    assert all(t["exit_code"] == 0 for t in summary["tasks"]), summary["tasks"]
    assert all(n["release"]["exit_code"] == 0 for n in summary["nodes"] if n["release"]), summary["nodes"]
    assert list((tmp_path / "kept" / "try-1").glob("tvm-*/logs.tar.gz"))
    conventions = tmp_path / "kept" / "job-try-2"  # the conventions example: the job's container folder
    assert sorted(p.read_text() for p in conventions.glob("task*/$TaskOutput/frame.txt")) == \
        ["task001\n", "task002\n", "task003\n"]
    demo_out = outputs[next(i for i, c in enumerate(commands) if c.startswith("nodekit demo"))]
    kept_in = Path(re.search(r"^Logs kept in: (.+)$", demo_out, re.M).group(1))  # type: ignore[union-attr]
    assert kept_in.is_absolute() and kept_in == tmp_path / "demo-run" / "storage" / "job-jobprepreleasesamplejob"
    assert len(list(kept_in.glob("jobpreparation/tvm-*/$TaskLog/stdout.txt"))) == 2
    assert all(p.name.startswith("nodekit-simulate-") for p in (tmp_path / "tmp").iterdir())  # nothing else left

    # every command line the README shows is one a README command prints
    shown = [line for lang, _, body in blocks if lang == "text" for line in body.splitlines()
             if line.startswith(("/bin/bash -c", "cmd /s /c"))]
    assert shown
    printed = {line for out in outputs for line in out.splitlines()}
    for line in shown:
        assert line in printed, f"the README shows a command line no example prints: {line}"


def test_the_readme_names_the_distribution_and_the_wheel_command() -> None:
    from nodekit.cmdline import BUILD_WHEEL, DISTRIBUTION, PUBLISHED

    assert f"**`{DISTRIBUTION}`**" in README and BUILD_WHEEL in README
    assert ("not published on the index yet" in README) is not PUBLISHED
    assert "nodekit-venv" not in README and "nodekit/templates/`" in README  # the old lies
