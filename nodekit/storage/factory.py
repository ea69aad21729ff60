"""Open the store a parsed source names."""

from __future__ import annotations

from nodekit.credentials import CredentialEnv
from nodekit.errors import UsageError
from nodekit.spec import SourceKind, SourceSpec
from nodekit.storage import Store, WritableStore
from nodekit.storage.http import HttpClient


def open_store(source: SourceSpec, creds: CredentialEnv, http: HttpClient) -> Store:
    """A Store for `source`; credentials are resolved here (no request is sent yet)."""
    if source.kind is SourceKind.LOCAL:
        from nodekit.storage.local import LocalStore

        assert source.path is not None
        return LocalStore(source.path)
    if source.kind is SourceKind.URL:
        from nodekit.storage.url import UrlStore

        assert source.url is not None
        return UrlStore(source.url, http)
    from nodekit.storage.azure import AzureBlobStore, resolve_auth

    assert source.blob is not None
    return AzureBlobStore(source.blob, resolve_auth(source.blob, creds, lifetime=http.ctx.timeout), http)


def open_destination(dest: SourceSpec, creds: CredentialEnv, http: HttpClient) -> WritableStore:
    """A WritableStore for release's --upload-to: a blob container (or folder in it) or a local folder."""
    if dest.kind is SourceKind.LOCAL:
        from nodekit.storage.local import LocalStore

        assert dest.path is not None
        return LocalStore(dest.path)
    if dest.kind is SourceKind.URL or dest.blob is None:
        raise UsageError(f"--upload-to {dest.display}: give a blob container URL or a folder, not a file URL.")
    from nodekit.storage.azure import AzureBlobStore, resolve_auth

    auth = resolve_auth(dest.blob, creds, permission="rcwl", lifetime=http.ctx.timeout)
    return AzureBlobStore(dest.blob, auth, http)
