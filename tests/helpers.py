"""Helpers the test modules share: run the CLI the way a node would, read reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from nodekit.cli import cli


def run(args: list[str], env: dict[str, str], *, ok: bool = True) -> Result:
    """Invoke `nodekit ARGS` in-process with exactly `env` added; assert exit 0 when `ok`."""
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=not ok)
    if ok:
        assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def actions(rep: dict[str, Any], action: str) -> list[str]:
    return sorted(f["name"] for f in rep["files"] if f["action"] == action)
