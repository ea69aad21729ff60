"""Open the store a parsed source names."""

from __future__ import annotations

from nodekit.credentials import CredentialEnv
from nodekit.spec import SourceKind, SourceSpec
from nodekit.storage import Store
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
