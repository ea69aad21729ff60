"""Where a command's JSON report goes, and writing it (atomically, never failing the command)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from nodekit.batchenv import BatchEnv
from nodekit.redact import scrub

log = logging.getLogger(__name__)


def report_path(explicit: Path | None, env: BatchEnv, name: str) -> Path | None:
    """--report, else NAME in the task's working folder on a Batch node, else none."""
    if explicit is not None:
        return explicit
    if env.task_working_dir:
        return Path(env.task_working_dir) / name
    return None


def dumps(data: dict[str, Any]) -> str:
    """The report as JSON: a key per line, and a list of objects (the files) an object per line.

    json.dumps with indent runs the pure-Python encoder: 4x slower on a report of 10,000 files.
    """
    import json

    parts = []
    for key, value in data.items():
        text = json.dumps(value, ensure_ascii=False)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            # '}, {"' occurs only between objects: inside strings a quote is escaped
            text = "[\n    " + text[1:-1].replace('}, {"', '},\n    {"') + "\n  ]"
        parts.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_report(data: dict[str, Any], path: Path | None) -> None:
    """Write the report through a temporary name; a failure is a warning, not the command's error."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(scrub(dumps(data)), encoding="utf-8")  # error messages may carry a URL's SAS
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the report %s: %s", path, err.strerror)
