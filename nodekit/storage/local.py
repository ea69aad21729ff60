"""A local or mounted folder as a store (also the embedded default for dry runs)."""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from nodekit.errors import AccessDenied, LocalIOError, NotFound, UnsafeInput
from nodekit.names import PARTIAL_SUFFIX, unsafe_reason
from nodekit.storage import CHUNK, ObjectExists, RemoteFile, Sink, SourceChanged, hand_over

log = logging.getLogger(__name__)

_HOST = os.uname().nodename.replace("/", "_") if hasattr(os, "uname") else "host"


def _sweep_partials(path: Path) -> None:
    """Remove the create-only temporary files of `path` that a process of this host, now gone, left."""
    head = f".{path.name}.{_HOST}."
    try:
        siblings = [e.name for e in os.scandir(path.parent) if e.name.startswith(head)]
    except OSError:
        return  # no folder yet: nothing left behind
    for sibling in siblings:
        pid, _, rest = sibling[len(head):].partition(".")
        if not pid.isdigit() or not rest.endswith(PARTIAL_SUFFIX) or _alive(int(pid)):
            continue
        try:
            os.unlink(path.parent / sibling)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process, or a platform that cannot say: leave it
    return True


def _identity(st: os.stat_result) -> tuple[str, str]:
    etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"
    modified = datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=timezone.utc).isoformat()
    return etag, modified


class LocalStore:
    """Files under a folder (or one file). Symbolic links to files are read; links to folders are not walked."""

    credential_kind = "local folder (no credential)"

    def __init__(self, path: str) -> None:
        self.root = Path(path).expanduser()
        self.display = os.path.abspath(self.root)  # one identity however the path was written
        self._single: str | None = None

    def _path(self, name: str) -> Path:
        return self.root if self._single == name else self.root / name

    def list_files(self, on_batch: Callable[[list[RemoteFile]], None] | None = None) -> list[RemoteFile]:
        return hand_over(self._list(), on_batch)

    def _list(self) -> list[RemoteFile]:
        try:
            st = self.root.stat()
        except FileNotFoundError:
            raise NotFound(f"source folder {self.root} does not exist: check the path or the mount.") from None
        except PermissionError:
            raise AccessDenied(f"source folder {self.root}: permission denied.") from None
        if stat.S_ISREG(st.st_mode):
            self._single = self.root.name
            etag, modified = _identity(st)
            return [RemoteFile(self.root.name, st.st_size, etag, modified)]
        files: list[RemoteFile] = []
        stack = [("", str(self.root))]
        while stack:
            prefix, folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except PermissionError:
                raise AccessDenied(f"source folder {folder}: permission denied.") from None
            for entry in entries:
                name = f"{prefix}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    stack.append((name + "/", entry.path))
                    continue
                try:
                    est = entry.stat(follow_symlinks=True)
                except OSError as err:
                    log.warning("skipped %s in the source: a link to nothing (%s)", entry.path, err.strerror)
                    continue
                if stat.S_ISREG(est.st_mode):  # a file, or a link to one: its content is copied
                    etag, modified = _identity(est)
                    files.append(RemoteFile(name, est.st_size, etag, modified))
                elif stat.S_ISDIR(est.st_mode):
                    log.warning("skipped %s in the source: a link to a folder, which prep does not follow", entry.path)
                else:
                    log.warning("skipped %s in the source: neither a file nor a folder (a pipe, socket or device)",
                                entry.path)
        files.sort(key=lambda f: f.name)
        return files

    def supports_ranges(self, file: RemoteFile) -> bool:
        return True

    def fetch(self, file: RemoteFile, start: int, length: int, sink: Sink) -> None:
        path = self._path(file.name)
        try:
            with open(path, "rb") as fh:
                if _identity(os.fstat(fh.fileno()))[0] != file.etag:
                    raise SourceChanged(f"{path} changed while nodekit was copying it; run prep again.")
                fh.seek(start)
                left = length
                while left > 0:
                    data = fh.read(min(CHUNK, left))
                    if not data:
                        raise SourceChanged(f"{path} became shorter while nodekit was copying it.")
                    sink(data)
                    left -= len(data)
        except FileNotFoundError:
            raise NotFound(f"{path} disappeared from the source folder.") from None
        except PermissionError:
            raise AccessDenied(f"{path}: permission denied.") from None
        except IsADirectoryError:
            raise NotFound(f"{path} is now a folder.") from None
        except OSError as err:
            raise LocalIOError(f"reading {path} failed: {err.strerror}.") from err

    # -- as a destination (release) ---------------------------------------------------------
    def _target(self, name: str) -> Path:
        reason = unsafe_reason(name)
        if reason:
            raise UnsafeInput(f"refusing to write {name!r} under {self.root} ({reason}).")
        return self.root.joinpath(*name.split("/"))

    def head(self, name: str) -> RemoteFile | None:
        """The object's size and MD5 (read back from disk: a real check), or None."""
        path = self._target(name)
        try:
            st = os.stat(path)
            digest = hashlib.md5()
            with open(path, "rb") as fh:
                while chunk := fh.read(4 * CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LocalIOError(f"reading {path} failed: {err.strerror}.") from err
        etag, modified = _identity(st)
        return RemoteFile(name, st.st_size, etag, modified, base64.b64encode(digest.digest()).decode())

    def read_small(self, name: str) -> bytes | None:
        try:
            return self._target(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LocalIOError(f"reading {self.root / name} failed: {err.strerror}.") from err

    def put(self, name: str, chunks: Iterable[bytes], *, metadata: dict[str, str] | None = None,
            content_type: str | None = None, create_only: bool = False) -> RemoteFile:
        """Write through a temporary name and rename; metadata and content type are not kept by a folder.

        `create_only` puts the file in place with a hard link, which the file system refuses when the
        name exists (also one created meanwhile): ObjectExists, nothing written. Its temporary name is
        its own (host, process, token: two writers of one name, such as two nodes sharing the folder,
        never share one); what a killed writer on this host left is removed by the next writer of the name.
        """
        path = self._target(name)
        tag = ""
        if create_only:
            tag = f".{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"
            _sweep_partials(path)
        tmp = path.with_name(f".{path.name}{tag}{PARTIAL_SUFFIX}")
        digest = hashlib.md5()
        size = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if create_only:
                written = RemoteFile(name, size, "", "", base64.b64encode(digest.digest()).decode())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ObjectExists(name, written) from None
                except OSError as err:
                    if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                        raise
                    if os.path.lexists(path):  # no hard links here: an existence check, then the rename
                        raise ObjectExists(name, written) from None
                    os.replace(tmp, path)
                else:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except OSError as err:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise LocalIOError(f"writing {path} failed: {err.strerror}.") from err
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        etag, modified = _identity(os.stat(path))
        return RemoteFile(name, size, etag, modified, base64.b64encode(digest.digest()).decode())
