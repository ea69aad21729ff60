"""What prep placed in a job folder, kept so that a re-run can skip or repair it.

`<job>/.nodekit/state.json` holds one record per file prep placed; while a run works, each
placed file is also appended to `journal.jsonl` right after it is in place, so a run killed
at any point loses at most the record of the file it was renaming (that file is then
downloaded again, never trusted blindly). `compact` folds the journal into state.json by a
temporary file and `os.replace`. `JobLock` keeps two runs for one job apart (Linux and Windows).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from nodekit.errors import TransientError
from nodekit.names import STATE_DIR

STATE_FILE = "state.json"
JOURNAL_FILE = "journal.jsonl"
FLUSH_INTERVAL = 0.25  # seconds between journal writes
LOCK_FILE = "lock"

Record = dict[str, Any]


class StateStore:
    """The records of one job folder. `append` is safe from many threads."""

    def __init__(self, job_dir: Path) -> None:
        self.dir = job_dir / STATE_DIR
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._journal: Any = None
        self._pending: list[str] = []
        self._last_flush = time.monotonic()
        self.dirty = False  # something was journalled: compact() has work to do

    def identity(self) -> tuple[tuple[int, int, int] | None, ...]:
        """What the state files are now (size, mtime, inode of each): equal means unchanged since."""
        out = []
        for name in (STATE_FILE, JOURNAL_FILE):
            try:
                st = os.stat(self.dir / name)
                out.append((st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def load(self) -> dict[str, Record]:
        """Records by job-relative path; a missing, torn or foreign file counts as empty."""
        import json

        records: dict[str, Record] = {}
        try:
            data = json.loads((self.dir / STATE_FILE).read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                records.update(data["files"])
        except (OSError, ValueError):
            pass
        try:
            with open(self.dir / JOURNAL_FILE, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        break  # a torn last line from a killed run
                    if entry.get("record") is None:
                        records.pop(entry["path"], None)
                    else:
                        records[entry["path"]] = entry["record"]
        except OSError:
            pass
        return records

    def append(self, path: str, record: Record | None) -> None:
        """Journal that `path` now holds `record` (None: prep no longer owns it). Safe from many threads.

        Lines are buffered and written at most `FLUSH_INTERVAL` seconds apart: a kill loses at most
        the records of the last moments, whose files are then downloaded again (never trusted).
        """
        import json

        line = json.dumps({"path": path, "record": record}, ensure_ascii=False) + "\n"
        with self._lock:
            self._pending.append(line)
            due = time.monotonic() - self._last_flush >= FLUSH_INTERVAL
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the buffered journal lines (one write, no fsync)."""
        with self._flush_lock:
            with self._lock:
                lines, self._pending = self._pending, []
                self._last_flush = time.monotonic()
            if not lines:
                return
            if self._journal is None:
                self._journal = open(self.dir / JOURNAL_FILE, "a", encoding="utf-8")
            self._journal.write("".join(lines))
            self._journal.flush()
            self.dirty = True

    def compact(self, records: dict[str, Record]) -> None:
        """Write `records` as the new state.json (atomically) and drop the journal.

        Does nothing when nothing was journalled and state.json is current (a warm re-run).
        """
        import json

        self.flush()
        if not self.dirty and not (self.dir / JOURNAL_FILE).exists() and (self.dir / STATE_FILE).exists():
            return
        with self._flush_lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            tmp = self.dir / (STATE_FILE + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:  # dumps, not dump: the C encoder in one piece
                fh.write(json.dumps({"version": 1, "files": records}, ensure_ascii=False, separators=(",", ":")))
            # No fsync: it waited for the file system's journal behind the data just downloaded (up to
            # 140 ms after 1 GiB, measured). A state file lost to a power cut costs a fresh download of
            # what it recorded (a missing or torn state counts as empty), never a wrong file.
            os.replace(tmp, self.dir / STATE_FILE)
            try:
                os.unlink(self.dir / JOURNAL_FILE)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.flush()
        with self._flush_lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None


class JobLock:
    """An exclusive lock on a job folder, held by an open file (released by the OS if the process dies)."""

    def __init__(self, job_dir: Path, timeout: float, name: str | None = None) -> None:
        self.path = job_dir / name if name else job_dir / STATE_DIR / LOCK_FILE
        self.timeout = timeout
        self._fh: Any = None
        self.waited = 0.0

    def __enter__(self) -> JobLock:
        self._fh = open(self.path, "a+b")
        start = time.monotonic()
        while not self._try_lock():
            self.waited = time.monotonic() - start
            if self.waited >= self.timeout:
                self._fh.close()
                raise TransientError(
                    f"another nodekit run holds {self.path} and did not finish within the timeout; "
                    "run again when it has finished."
                )
            time.sleep(0.1)
        self.waited = time.monotonic() - start
        return self

    def _try_lock(self) -> bool:
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            import msvcrt

            try:
                self._fh.seek(0)
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError:
                return False
            return True
        import fcntl

        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._fh is not None:
            if os.name == "nt":  # pragma: no cover
                import msvcrt

                try:
                    self._fh.seek(0)
                    msvcrt.locking(self._fh.fileno(), msvcrt.LK_UNLCK, 1)
                except OSError:
                    pass
            self._fh.close()
            self._fh = None
