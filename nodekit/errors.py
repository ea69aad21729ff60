"""Errors nodekit raises, each carrying its exit code.

This module owns the exit-code table: the CLI turns any `NodekitError` into a one-line
`Error: ...` on stderr and exits with `error.exit_code`, in one place (`cli.NodekitGroup`).
Errors are sorted where they arise into *retry may help* (`retryable = True`) and permanent.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of every nodekit command (listed in the README)."""

    OK = 0  # success, also when there was nothing to do
    FAILURE = 1  # an unexpected internal error (a bug: please report it)
    USAGE = 2  # bad option, URL, description file or value
    BATCH_ENV = 3  # a Batch variable (or its --option) is missing or unusable
    SOURCE = 4  # source not found, or access denied
    TRANSIENT = 5  # storage kept failing until the retries or --timeout ran out: a retry may help
    UNSAFE = 6  # unsafe input refused: names or paths that would leave the job's folders
    INTEGRITY = 7  # downloaded data did not match its checksum, even after retries
    LOCAL_IO = 8  # the node's disk refused a write (full, read-only, permissions)
    KEPT_ALL = 9  # release: storage failed, so nothing was uploaded and nothing wiped
    CONFLICT = 10  # release: everything kept (and wiped), but storage held other content under a name it
    #                wrote (a job output another node kept differently): this node's copy kept beside it


class NodekitError(Exception):
    """Base class: a message for the user and the exit code that goes with it."""

    exit_code: ExitCode = ExitCode.FAILURE
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(NodekitError):
    """The command line or description file is wrong: fix it and run again."""

    exit_code = ExitCode.USAGE


class BatchEnvError(NodekitError):
    """A Batch environment variable that the command needs is missing or unusable."""

    exit_code = ExitCode.BATCH_ENV


class SourceError(NodekitError):
    """The source does not exist, or the credential was refused: permanent."""

    exit_code = ExitCode.SOURCE


class AccessDenied(SourceError):
    """Storage refused the credential (401/403)."""


class NotFound(SourceError):
    """The account, container, blob, URL or folder does not exist (404)."""


class TransientError(NodekitError):
    """Storage or the network failed in a way that a later retry may fix."""

    exit_code = ExitCode.TRANSIENT
    retryable = True


class UnsafeInput(NodekitError):
    """A name or path would write or delete outside the job's folders."""

    exit_code = ExitCode.UNSAFE


class IntegrityError(NodekitError):
    """Downloaded bytes did not match the source's checksum or size."""

    exit_code = ExitCode.INTEGRITY
    retryable = True


class LocalIOError(NodekitError):
    """The local disk refused a write: full, read-only or not permitted."""

    exit_code = ExitCode.LOCAL_IO


class InTheWay(LocalIOError):
    """Something else is where one file (or folder) goes: that file fails, the others go on (exit 8 in the end)."""
