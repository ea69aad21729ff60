"""Open the store a parsed source names (credentials resolved here; no request is sent yet)."""

from __future__ import annotations

from nodekit.credentials import CredentialEnv
from nodekit.errors import UsageError
from nodekit.spec import SourceKind, SourceSpec
from nodekit.storage import RunContext, Store, WritableStore
from nodekit.storage.net import NetConfig


def open_store(source: SourceSpec, creds: CredentialEnv, net: NetConfig, ctx: RunContext) -> Store:
    """A Store for `source`. Raises AccessDenied (an expired SAS) or UsageError before any request."""
    if source.kind is SourceKind.LOCAL:
        from nodekit.storage.local import LocalStore

        assert source.path is not None
        return LocalStore(source.path)
    if source.kind is SourceKind.URL:
        from nodekit.storage.url import UrlStore

        assert source.url is not None
        return UrlStore(source.url, net, ctx)
    from nodekit.storage.auth import resolve
    from nodekit.storage.azure import AzureBlobStore

    assert source.blob is not None
    return AzureBlobStore(source.blob, resolve(source.blob, creds, lifetime=ctx.timeout), net, ctx)


def open_destination(dest: SourceSpec, creds: CredentialEnv, net: NetConfig, ctx: RunContext) -> WritableStore:
    """A WritableStore for release's --upload-to: a blob container (or folder in it) or a local folder."""
    if dest.kind is SourceKind.LOCAL:
        from nodekit.storage.local import LocalStore

        assert dest.path is not None
        return LocalStore(dest.path)
    if dest.kind is SourceKind.URL or dest.blob is None:
        raise UsageError(f"--upload-to {dest.display}: give a blob container URL or a folder, not a file URL.")
    if not dest.blob.container:
        raise UsageError(f"--upload-to {dest.display} names a storage account but no container.")
    from nodekit.storage.auth import resolve
    from nodekit.storage.azure import AzureBlobStore

    return AzureBlobStore(dest.blob, resolve(dest.blob, creds, write=True, lifetime=ctx.timeout), net, ctx)
