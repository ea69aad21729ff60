"""Where the benchmarks write: a file system like a Batch node's temporary disk, not this VM's /tmp.

Measured on the 2-core machines these benchmarks run on (see the README, Performance):

- The root file system is ext4 *without a journal*. Without one, ext4 skips inodes freed in the
  last 30 seconds when it allocates a new one (`recently_deleted`, seen with perf), reading the
  inode table for each: creating 2,000 files right after deleting 2,000 others took 1.0 s
  instead of 0.04 s. A benchmark that deletes one tool's output and then runs the next tool
  measures that, not the tools. A Batch node's temporary disk is ext4 with a journal.
- Memory this VM returns to its host (free page reporting) costs about 2.4 ms per MiB when it is
  touched again, so writing 1 GiB into the page cache cost 0.2 s or 2.5 s depending on whether
  recently freed pages were at hand. `prime` writes and deletes a file of the given size just
  before each timed cold run, so that every tool starts with the same recycled pages.

`scratch()` mounts a sparse ext4 image with a journal on a loop device at .bench/mnt (root
only; it stays mounted for later runs) and falls back to .bench/scratch with a warning.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / ".bench" / "scratch.img"
MOUNT = ROOT / ".bench" / "mnt"
FALLBACK = ROOT / ".bench" / "scratch"


def _mounted(path: Path) -> bool:
    with open("/proc/mounts", encoding="utf-8") as fh:
        return any(line.split()[1] == str(path) for line in fh)


def scratch(size_gib: int = 40) -> Path:
    """A folder on a journalled ext4 (see the module docstring), made empty-ish by the caller."""
    if _mounted(MOUNT):
        return MOUNT
    if os.geteuid() == 0 and shutil.which("mkfs.ext4") and Path("/dev/loop-control").exists():
        try:
            MOUNT.mkdir(parents=True, exist_ok=True)
            if not IMAGE.exists():
                with open(IMAGE, "wb") as fh:
                    fh.truncate(size_gib * 1024**3)  # sparse: takes disk only as it is written
                subprocess.run(["mkfs.ext4", "-q", "-F", str(IMAGE)], check=True)
            subprocess.run(["mount", "-o", "loop", str(IMAGE), str(MOUNT)], check=True, capture_output=True)
            return MOUNT
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"bench: could not mount a scratch file system ({err}); using {FALLBACK}", file=sys.stderr)
    else:
        print(f"bench: not root or no loop device: writing to {FALLBACK}, a file system whose behaviour "
              "after deletes may dominate small-file timings (see bench/scratch.py)", file=sys.stderr)
    FALLBACK.mkdir(parents=True, exist_ok=True)
    return FALLBACK


def prime(folder: Path, mib: int) -> None:
    """Write and delete `mib` MiB in `folder`: the next writer gets recycled, host-backed pages."""
    path = folder / ".bench-primer"
    block = b"\1" * (1024 * 1024)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, block)
    finally:
        os.close(fd)
        os.unlink(path)
