"""Where a command's JSON report goes, and writing it (atomically, never failing the command)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from nodekit.batchenv import BatchEnv

log = logging.getLogger(__name__)


def report_path(explicit: Path | None, env: BatchEnv, name: str) -> Path | None:
    """--report, else NAME in the task's working folder on a Batch node, else none."""
    if explicit is not None:
        return explicit
    if env.task_working_dir:
        return Path(env.task_working_dir) / name
    return None


def write_report(data: dict[str, Any], path: Path | None) -> None:
    """Write the report through a temporary name; a failure is a warning, not the command's error."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the report %s: %s", path, err.strerror)
