"""One decision for every failed request: permanent (a NodekitError to raise) or retry after a pause.

Whatever the stack that failed (libcurl on the download path, azure-core and requests elsewhere),
the same rules apply, as rclone's `shouldRetry` and AzCopy do:

- retried (within the run's deadline): 408, 429, 500, 502, 503 and 504; refused, reset and
  timed-out connections; a response cut short. A `Retry-After` is believed (RunContext.backoff);
- permanent: 401 and 403 (AccessDenied, with a message for the kind of credential), 404
  (NotFound), 409 BlobArchived (the blob must be rehydrated first), 412 (SourceChanged: the
  blob changed while it was read), any other 4xx; a certificate that is not trusted or is for
  another name, a host name that does not resolve, a proxy that cannot be resolved (SourceError,
  exit 4 within seconds, naming the cause and what to do).

Every failure names the request's `x-ms-client-request-id` (and the service's `x-ms-request-id`)
when there was one, so that Azure support can find it. Nothing here shows a URL's query string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from nodekit.errors import AccessDenied, NodekitError, NotFound, SourceError
from nodekit.storage import SourceChanged

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Failure:
    """A failed request: `error` is set when it is permanent; else retry, after `retry_after` if given."""

    reason: str  # short and secret-free: "503 ServerBusy", "connection reset"
    error: NodekitError | None = None
    retry_after: float | None = None


def request_ids(client_id: str | None, service_id: str | None) -> str:
    """' (request id X, service request id Y)' for messages, or ''."""
    parts = []
    if client_id:
        parts.append(f"client request id {client_id}")
    if service_id:
        parts.append(f"service request id {service_id}")
    return f" ({', '.join(parts)})" if parts else ""


@dataclass(frozen=True)
class Credential:
    """What a message about a refused request needs to know of the credential (never its value)."""

    kind: str  # "SAS token in the URL", "managed identity (client id …)", "account key from …"
    sas_expiry: datetime | None = None
    sas_start: datetime | None = None

    @property
    def is_sas(self) -> bool:
        return "SAS" in self.kind or "account key" in self.kind

    def refused(self, status: str, what: str, where: str) -> str:
        """Why a 401/403 happened, in the credential's own terms."""
        now = datetime.now(timezone.utc)
        if self.sas_expiry is not None and self.sas_expiry <= now:
            return f"{what}: the SAS ({self.kind}) expired at {self.sas_expiry.isoformat()} ({status}): make a new one."
        if self.sas_start is not None and self.sas_start > now:
            return (f"{what}: the SAS ({self.kind}) is not valid before {self.sas_start.isoformat()} ({status}): "
                    "wait, or make one that starts earlier (check the node's clock).")
        if "identity" in self.kind.lower() or "DefaultAzureCredential" in self.kind:
            return (f"{what}: access denied ({status}) for {self.kind}: give it a data role on {where} "
                    "(Storage Blob Data Reader to read, Contributor to write).")
        if "account key" in self.kind:
            return f"{what}: access denied ({status}) with the {self.kind}: check that the key is current for {where}."
        if self.is_sas:
            return (f"{what}: access denied ({status}) with the {self.kind}: check its permissions (read, list; "
                    f"create and write to upload) and scope for {where}.")
        return f"{what}: access denied ({status}) for {where}: give a SAS, a key or an identity with access."


def for_status(status: int, code: str, *, what: str, where: str, credential: Credential | None,
               retry_after: str | None = None, ids: str = "") -> Failure:
    """The verdict on an HTTP status (`code` is x-ms-error-code, or the reason phrase)."""
    shown = f"{status} {code}".strip()
    if status in RETRY_STATUS:
        return Failure(shown + ids, retry_after=retry_after_seconds(retry_after))
    if status in (401, 403):
        cred = credential or Credential("no credential")
        return Failure(shown, AccessDenied(cred.refused(shown, what, where) + ids))
    if status == 404:
        return Failure(shown, NotFound(f"{what}: not found ({shown}) at {where}: check the account, container and "
                                       f"path.{ids}"))
    if status == 409 and code == "BlobArchived":
        return Failure(shown, SourceError(f"{what}: the blob is in the archive tier ({shown}): rehydrate it to the "
                                          f"hot or cool tier first, or exclude it.{ids}"))
    if status in (304, 412):
        return Failure(shown, SourceChanged(f"{what}: changed at the source while being read ({shown}); run again."
                                            f"{ids}"))
    return Failure(shown, SourceError(f"{what}: storage refused the request ({shown}) at {where}.{ids}"))


# libcurl's error codes (curl.h) that mean a retry cannot help.
_CURL_PERMANENT = {
    1: "the URL's scheme is not supported",  # CURLE_UNSUPPORTED_PROTOCOL
    3: "the URL is malformed",  # CURLE_URL_MALFORMAT
    5: "the proxy's host name cannot be resolved: check HTTPS_PROXY / HTTP_PROXY",  # CURLE_COULDNT_RESOLVE_PROXY
    6: "the host name cannot be resolved: check the account name in the URL, DNS, or NO_PROXY",  # RESOLVE_HOST
    47: "too many redirects",  # CURLE_TOO_MANY_REDIRECTS
    58: "the client certificate was refused",  # CURLE_SSL_CERTPROBLEM
    77: "the CA bundle cannot be read",  # CURLE_SSL_CACERT_BADFILE
}
_CURL_TLS = {60}  # CURLE_PEER_FAILED_VERIFICATION: not trusted, expired, or for another name


def for_curl(errno: int, message: str, *, what: str, host: str, trust_hint: str, ids: str = "") -> Failure:
    """The verdict on a libcurl error (`message` is libcurl's, which names no query string)."""
    if errno in _CURL_TLS:
        lowered = message.lower()
        if "subject name" in lowered or "does not match" in lowered or "hostname" in lowered:
            why = (f"the TLS certificate of {host} is for another host name ({message}): check the URL, or the "
                   "private-endpoint DNS")
        else:
            why = f"the TLS certificate of {host} is not trusted ({message}): {trust_hint}"
        return Failure("TLS certificate", SourceError(f"{what}: {why}.{ids}"))
    if errno in _CURL_PERMANENT:
        return Failure(_CURL_PERMANENT[errno], SourceError(f"{what}: {_CURL_PERMANENT[errno]} ({host}: {message})."
                                                           f"{ids}"))
    short = {7: "connection refused", 28: "timed out", 52: "empty reply", 55: "send failed", 56: "connection reset",
             18: "response cut short", 35: "TLS handshake failed", 16: "HTTP/2 error", 92: "HTTP/2 stream error"}
    return Failure(short.get(errno, f"curl error {errno}") + ids)


def for_exception(err: BaseException, *, what: str, host: str, trust_hint: str, ids: str = "") -> Failure:
    """The verdict on an exception from azure-core, requests or urllib3 (raised before any status came back)."""
    import ssl

    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or str(cause.reason or "")
            if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
                return Failure("TLS certificate", SourceError(
                    f"{what}: the TLS certificate of {host} is for another host name ({detail}): check the URL, or "
                    f"the private-endpoint DNS.{ids}"))
            return Failure("TLS certificate", SourceError(
                f"{what}: the TLS certificate of {host} is not trusted ({detail}): {trust_hint}.{ids}"))
        if type(cause).__name__ in ("gaierror", "NameResolutionError"):  # urllib3 2 wraps gaierror in the latter
            return Failure("name resolution", SourceError(
                f"{what}: the host name {host} cannot be resolved: check the account name in the URL, DNS, or the "
                f"proxy settings (HTTPS_PROXY, NO_PROXY).{ids}"))
        nxt = getattr(cause, "inner_exception", None) or cause.__cause__ or cause.__context__
        if nxt is None and getattr(cause, "args", None):
            inner = [a for a in cause.args if isinstance(a, BaseException)]
            nxt = inner[0] if inner else None
        if nxt is None:
            reason = getattr(cause, "reason", None)
            nxt = reason if isinstance(reason, BaseException) else None
        cause = nxt
    return Failure(_short(err) + ids)


def _short(err: BaseException) -> str:
    """A short, secret-free name for a network exception (never its text: it may hold a URL)."""
    name = type(err).__name__
    return {"ServiceResponseError": "connection failed during the response", "ServiceRequestError":
            "connection failed", "ReadTimeout": "timed out", "ConnectTimeout": "connect timed out",
            "ConnectionError": "connection failed"}.get(name, name)
