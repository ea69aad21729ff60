"""Which credential a blob location uses, and tokens shared by both HTTP stacks.

Order of use (first that applies wins; the log says which kind was used, never its value):

1. a SAS in the URL (container, directory or blob scope; account, service or user-delegation);
2. AZURE_STORAGE_CONNECTION_STRING when it is for the same account or endpoint: its account key,
   or its SharedAccessSignature (`BlobEndpoint` honoured: the account and endpoint come from it);
3. AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_KEY for the same account;
4. AZURE_STORAGE_SAS_TOKEN;
5. azure-identity: the user-assigned managed identity of --identity-client-id / AZURE_CLIENT_ID,
   else DefaultAzureCredential.

An account key never leaves the process: the Azure SDK signs a short-lived read/list SAS with it
for prep's requests (`generate_container_sas`), and release's uploads sign with it directly. A SAS
whose expiry (`se`, a date or a time) has passed, or whose start (`st`) is clearly ahead, is refused
before any request, naming where it came from. A bearer token is never sent over http://.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nodekit.credentials import CredentialEnv
from nodekit.errors import AccessDenied, TransientError, UsageError
from nodekit.redact import register_secret
from nodekit.spec import BlobLocation
from nodekit.storage.retry import Credential

log = logging.getLogger(__name__)

STORAGE_SCOPE = "https://storage.azure.com/.default"
REFRESH_MARGIN = 300.0  # seconds before expiry when a token is renewed
REFRESH_EVERY = 10.0  # at most one renewal attempt this often
CLOCK_SKEW = timedelta(minutes=5)  # a SAS start this far ahead is refused up front; closer, the service decides


def _sas_time(values: list[str] | None) -> datetime | None:
    """A SAS `se`/`st` value (`2026-12-01` or `2026-12-01T10:00:00Z`) as an aware datetime, or None."""
    if not values:
        return None
    text = values[0].strip()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Sas:
    """A SAS token (the query string, without '?'), where it came from, and what its fields say."""

    query: str
    origin: str  # "the URL", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "the account key"
    expiry: datetime | None
    start: datetime | None
    resource: str  # sr: c (container), b (blob), d (directory), "" (account SAS: srt)
    permissions: str

    @classmethod
    def parse(cls, query: str, origin: str) -> Sas:
        query = query.lstrip("?")
        params = parse_qs(query, keep_blank_values=True)
        register_secret(query)
        for sig in params.get("sig", []):
            register_secret(sig)
        return cls(query, origin, _sas_time(params.get("se")), _sas_time(params.get("st")),
                   (params.get("sr") or [""])[0], (params.get("sp") or [""])[0])

    def check(self, shown: str) -> None:
        """AccessDenied if the SAS has expired or clearly has not started yet (no request is sent)."""
        now = datetime.now(timezone.utc)
        if self.expiry is not None and self.expiry <= now:
            raise AccessDenied(f"the SAS token from {self.origin} for {shown} expired at {self.expiry.isoformat()}: "
                               "make a new one.")
        if self.start is not None and self.start > now + CLOCK_SKEW:
            raise AccessDenied(f"the SAS token from {self.origin} for {shown} is not valid before "
                               f"{self.start.isoformat()}: wait, or make one that starts earlier.")

    @property
    def lists(self) -> bool:
        """False when the SAS cannot list: blob-scoped (`sr=b`) or without the list permission."""
        if self.resource == "b":
            return False
        return not self.permissions or "l" in self.permissions


class TokenSource:
    """A TokenCredential for Azure Storage, shared by the SDK's pipeline and the download path.

    It keeps the current token and renews it when less than REFRESH_MARGIN seconds are left (at
    most every REFRESH_EVERY seconds). A renewal that fails while the current token is still valid
    keeps using it (with one warning); once nothing valid is left, it is a TransientError with the
    cause. A credential that is not available at all is AccessDenied. Safe from many threads.
    """

    def __init__(self, credential: Any, kind: str) -> None:
        self.credential = credential
        self.kind = kind
        self._token: Any = None  # azure.core.credentials.AccessToken
        self._tried = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def _fetch(self) -> Any:
        from azure.core.exceptions import ClientAuthenticationError

        try:
            token = self.credential.get_token(STORAGE_SCOPE)
        except ClientAuthenticationError as err:
            raise _token_error(err, self.kind) from None
        except Exception as err:  # the token endpoint failed (network, 5xx): a later run may succeed
            raise TransientError(f"could not get a token for {self.kind}: {_first_line(err)}") from None
        register_secret(token.token)
        return token

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        """The current token (azure.core.credentials.AccessToken), renewed when due."""
        with self._lock:
            now = time.time()
            token = self._token
            if token is not None and token.expires_on - now > REFRESH_MARGIN:
                return token
            if token is not None and now - self._tried < REFRESH_EVERY and token.expires_on - now > 0:
                return token
            self._tried = now
            try:
                self._token = self._fetch()
            except (AccessDenied, TransientError) as err:
                if token is not None and token.expires_on - time.time() > 0:
                    if not self._warned:
                        log.warning("could not renew the token of %s (%s): the current one is valid for %.0f s more",
                                    self.kind, err, token.expires_on - time.time())
                        self._warned = True
                    return token
                if token is not None:
                    raise TransientError(f"the token of {self.kind} expired and could not be renewed: {err}") \
                        from None
                raise
            return self._token

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        from azure.core.credentials import AccessTokenInfo

        token = self.get_token(*scopes)
        return AccessTokenInfo(token.token, token.expires_on)

    def header(self) -> str:
        return f"Authorization: Bearer {self.get_token(STORAGE_SCOPE).token}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def _token_error(err: BaseException, kind: str) -> Exception:
    """Why no token came: AccessDenied when no credential is there or the identity is refused (naming what was
    tried); TransientError when an identity endpoint was there but failed (a later run may succeed)."""
    text = str(err)
    tried = [line.strip().split(":", 1)[0] for line in text.splitlines() if line.startswith("\t")]
    status = getattr(getattr(err, "response", None), "status_code", None)
    refused = status in (400, 401, 403) or "identity not found" in text.lower() or "invalid_request" in text
    if "Token request error" in text and not refused:  # the endpoint answered, with an error
        detail = text[text.index("Token request error"):].splitlines()[0]
        return TransientError(f"could not get a token for {kind}: the identity endpoint failed ({detail[:200]})")
    if type(err).__name__ == "CredentialUnavailableError" or tried or refused:
        how = f" (tried {', '.join(tried)})" if tried else f": {_first_line(err)}"
        return AccessDenied(f"no usable Azure credential for {kind}{how}. Put a SAS in the URL, set "
                            "AZURE_STORAGE_CONNECTION_STRING, or give the pool a managed identity "
                            "(--identity-client-id).")
    return TransientError(f"could not get a token for {kind}: {_first_line(err)}")


@dataclass
class Access:
    """How requests to one container authenticate (secrets inside: never print this)."""

    kind: str
    sas: Sas | None = None  # appended to every URL
    token: TokenSource | None = None  # an Authorization header
    key: tuple[str, str] | None = None  # (account, key): the SDK signs uploads with it

    @property
    def query(self) -> str:
        return self.sas.query if self.sas else ""

    def info(self) -> Credential:
        return Credential(self.kind, self.sas.expiry if self.sas else None, self.sas.start if self.sas else None)

    def sdk_credential(self) -> Any:
        """What the Azure SDK's clients take: the key, the token source, the SAS, or None."""
        if self.key is not None:
            from azure.core.credentials import AzureNamedKeyCredential

            return AzureNamedKeyCredential(*self.key)
        if self.token is not None:
            return self.token
        return self.sas.query if self.sas else None


def _connection_string(cs: str) -> tuple[str, str, Any]:
    """(account, endpoint URL without a query, credential) of a connection string, parsed by the SDK."""
    from azure.storage.blob import BlobServiceClient

    try:
        client = BlobServiceClient.from_connection_string(cs)
    except ValueError:
        raise UsageError("AZURE_STORAGE_CONNECTION_STRING is malformed (expected Key=Value;... with AccountName "
                         "and AccountKey, or BlobEndpoint and SharedAccessSignature): check it.") from None
    url, _, sas = client.url.partition("?")
    cred = client.credential
    if cred is not None and getattr(cred, "account_key", None):
        register_secret(cred.account_key)
        return client.account_name or "", url.rstrip("/"), (cred.account_name, cred.account_key)
    return client.account_name or "", url.rstrip("/"), sas


def _same_place(loc: BlobLocation, account: str, endpoint: str) -> bool:
    """True when a connection string's account or endpoint is the location's."""
    if account and account == loc.account:
        return True
    a, b = urlsplit(endpoint), urlsplit(loc.endpoint)
    return bool(a.netloc) and (a.netloc.lower(), a.path.rstrip("/")) == (b.netloc.lower(), b.path.rstrip("/"))


def resolve(loc: BlobLocation, creds: CredentialEnv, *, write: bool = False, lifetime: float = 3600.0) -> Access:
    """The credential for `loc`, in the documented order. AccessDenied for an expired SAS, UsageError for a
    bearer token over http:// or a malformed connection string. No request is sent."""
    shown = f"{loc.endpoint}/{loc.container}"
    if loc.sas:
        sas = Sas.parse(loc.sas, "the URL")
        sas.check(shown)
        return Access("SAS token in the URL", sas=sas)
    if creds.connection_string:
        account, endpoint, cred = _connection_string(creds.connection_string)
        if _same_place(loc, account, endpoint):
            if isinstance(cred, tuple):
                return _key_access(loc, cred, "AZURE_STORAGE_CONNECTION_STRING", write, lifetime)
            if cred:
                sas = Sas.parse(cred, "AZURE_STORAGE_CONNECTION_STRING")
                sas.check(shown)
                return Access("SAS from AZURE_STORAGE_CONNECTION_STRING", sas=sas)
        log.debug("AZURE_STORAGE_CONNECTION_STRING is for another account; not used for %s", loc.account)
    if creds.account and creds.key:
        if creds.account == loc.account or not loc.account:  # no account in the URL: a custom domain
            return _key_access(loc, (creds.account, creds.key), "AZURE_STORAGE_KEY", write, lifetime)
        log.debug("AZURE_STORAGE_ACCOUNT is another account; not used for %s", loc.account)
    if creds.sas_token:
        sas = Sas.parse(creds.sas_token, "AZURE_STORAGE_SAS_TOKEN")
        sas.check(shown)
        return Access("SAS token from AZURE_STORAGE_SAS_TOKEN", sas=sas)
    if urlsplit(loc.endpoint).scheme != "https":
        raise UsageError(f"{shown}: refusing to send an Azure AD token over plain http://: use an https:// URL, "
                         "or give a SAS or a key for this endpoint.")
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    if creds.client_id:
        kind = f"managed identity (client id {creds.client_id})"
        return Access(kind, token=TokenSource(ManagedIdentityCredential(client_id=creds.client_id), kind))
    kind = "DefaultAzureCredential (azure-identity)"
    return Access(kind, token=TokenSource(DefaultAzureCredential(exclude_interactive_browser_credential=True), kind))


def _key_access(loc: BlobLocation, key: tuple[str, str], source: str, write: bool, lifetime: float) -> Access:
    """An account key: the SDK signs uploads with it; reads use a read/list SAS it signs for the container."""
    import binascii
    from base64 import b64decode

    register_secret(key[1])
    try:
        b64decode(key[1], validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"the account key from {source} is not a valid storage key (base64): check it.") from None
    kind = f"account key from {source}"
    if write:
        return Access(kind, key=key)
    from azure.storage.blob import generate_container_sas

    now = datetime.now(timezone.utc)
    query = generate_container_sas(key[0], loc.container, account_key=key[1], permission="rl",
                                   start=now - timedelta(minutes=15), expiry=now + timedelta(seconds=lifetime + 3600))
    return Access(kind, sas=Sas.parse(query, "the account key"), key=key)
