"""Pure checks on file names: where a source's names land, whether they are safe, and filters.

Nothing here touches the disk. `unsafe_reason` and `find_collisions` are run over a whole
listing before prep writes anything; `GlobFilter` applies --include/--exclude.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from nodekit.errors import UsageError

# Files nodekit writes while downloading; a source name may not end like this.
PARTIAL_SUFFIX = ".nodekit-partial"
# nodekit's own folder inside a job folder (state, journal, lock).
STATE_DIR = ".nodekit"
NAME_MAX = 255  # the longest name segment of the file systems nodekit writes to (ext4, xfs; NTFS in UTF-16 units)

_DRIVE = re.compile(r"^[A-Za-z]:")
_WINDOWS_BAD = set('<>:"|?*') | {chr(c) for c in range(32)}
_WINDOWS_RESERVED = {
    "con", "prn", "aux", "nul",
    *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10)),
}
CASE_INSENSITIVE = sys.platform in ("win32", "darwin")
WINDOWS = sys.platform == "win32"


def unsafe_reason(name: str) -> str | None:
    """Why `name` (a '/'-separated relative path) may not be written under a folder, or None if safe."""
    if not name:
        return "empty name"
    if "\x00" in name:
        return "contains a NUL character"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE.match(name):
        return "drive letter"
    parts = name.split("/")
    for part in parts:
        if part == "":
            return "empty path segment (leading, trailing or double '/')"
        if part in (".", ".."):
            return f"'{part}' path segment"
        if len(part) > NAME_MAX // 4 and too_long(part):
            return f"a name segment longer than the file system's {NAME_MAX} bytes"
        if WINDOWS:
            if set(part) & _WINDOWS_BAD:
                return "character not allowed on Windows"
            if part.split(".", 1)[0].lower() in _WINDOWS_RESERVED or part.endswith((" ", ".")):
                return "name reserved on Windows"
    if parts[-1].endswith(PARTIAL_SUFFIX):
        return f"ends with {PARTIAL_SUFFIX}, which nodekit reserves for partial downloads"
    if parts[0] == STATE_DIR:
        return f"top folder {STATE_DIR} is reserved for nodekit's state"
    return None


def too_long(part: str) -> bool:
    """True if `part` cannot be one file name: over NAME_MAX bytes as the OS encodes it (UTF-16 units on Windows)."""
    if WINDOWS:  # pragma: no cover - NTFS counts UTF-16 code units
        return len(part.encode("utf-16-le", "surrogatepass")) // 2 > NAME_MAX
    return len(os.fsencode(part)) > NAME_MAX


def find_collisions(paths: Iterable[str]) -> list[str]:
    """Pairs of paths that cannot both exist on disk, as 'a <-> b' strings (sorted).

    Two paths collide when they are equal (case-insensitively on Windows and macOS), or one
    is a folder of the other (file `a` and file `a/b`).
    """
    seen: dict[str, str] = {}
    problems: list[str] = []
    for path in paths:
        key = path.casefold() if CASE_INSENSITIVE else path
        if key in seen:
            problems.append(f"{seen[key]} <-> {path}")
        else:
            seen[key] = path
    keys = set(seen)
    folders: set[str] = set()  # every folder above a path, each walked up once
    for key in seen:
        cut = key.rfind("/")
        while cut > 0 and key[:cut] not in folders:
            folders.add(key[:cut])
            cut = key.rfind("/", 0, cut)
    if not problems and folders.isdisjoint(keys):
        return []  # the common case, in one pass: no file is also a folder
    for key, path in seen.items():
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in keys:
                problems.append(f"{seen[parent]} <-> {path}")
    return sorted(problems)


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob to a regex: `*` and `?` stay inside one segment, `**` crosses them."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE if CASE_INSENSITIVE else 0)


def check_glob(pattern: str, what: str = "pattern") -> str:
    """`pattern` if it is a usable glob, else UsageError naming `what` (the option or key it came from)."""
    try:
        _glob_regex(pattern.strip("/"))
    except re.error:
        raise UsageError(
            f"{what} {pattern!r} is not a valid pattern: a character class [...] is empty or has a reversed "
            "range; write [[] for a literal '['."
        ) from None
    return pattern


def check_globs(patterns: Iterable[str], what: str = "pattern") -> tuple[str, ...]:
    """Every pattern checked by `check_glob`, as a tuple."""
    return tuple(check_glob(p, what) for p in patterns)


def glob_match(pattern: str, name: str) -> bool:
    """True if `name` matches `pattern`; a pattern without '/' matches the last segment."""
    if "/" not in pattern.rstrip("/"):
        name = name.rsplit("/", 1)[-1]
    return _glob_regex(pattern.strip("/")).match(name) is not None


@dataclass(frozen=True)
class GlobFilter:
    """--include / --exclude: a name passes if it matches an include (or there are none) and no exclude."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_globs(self.include, "--include")
        check_globs(self.exclude, "--exclude")

    def __call__(self, name: str) -> bool:
        if self.include and not any(glob_match(p, name) for p in self.include):
            return False
        return not any(glob_match(p, name) for p in self.exclude)
