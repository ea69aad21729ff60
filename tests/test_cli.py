"""The command line as a whole: help texts, version, README coverage, python -m."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT

from nodekit.cli import cli
from nodekit.errors import ExitCode

README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_and_is_in_the_readme(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) > 5
    assert f"nodekit {command}" in README


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_option_is_in_the_readme(command: str) -> None:
    options = [o for p in cli.commands[command].params for o in p.opts if o.startswith("--")]
    missing = [o for o in options if f"`{o}" not in README]
    assert not missing


def test_every_exit_code_is_in_the_readme() -> None:
    for code in ExitCode:
        assert re.search(rf"\|\s*{int(code)}\s*\|\s*`{code.name}`", README), code.name


def test_python_dash_m_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "nodekit", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "nodekit, version" in out.stdout


def test_usage_errors_exit_2_without_traceback() -> None:
    result = CliRunner().invoke(cli, ["prep", "--concurrency", "0", "x"])
    assert result.exit_code == 2
    assert "--concurrency" in result.stderr and "Traceback" not in result.stderr
