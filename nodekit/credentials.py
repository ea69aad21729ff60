"""The storage credentials nodekit may use, read once from the environment.

Order of use for a blob source (first that applies wins): a SAS token in the URL;
AZURE_STORAGE_CONNECTION_STRING; AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_KEY;
AZURE_STORAGE_SAS_TOKEN; azure-identity (a user-assigned managed identity by
--identity-client-id or AZURE_CLIENT_ID, else DefaultAzureCredential).
Every value is registered with `redact` so that it can never be printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nodekit.errors import UsageError
from nodekit.redact import register_secret


@dataclass(frozen=True)
class CredentialEnv:
    """Credential settings from the environment (values are secrets: never print them)."""

    connection_string: str | None = field(default=None, repr=False)
    account: str | None = None
    key: str | None = field(default=None, repr=False)
    sas_token: str | None = field(default=None, repr=False)
    client_id: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, client_id: str | None = None) -> CredentialEnv:
        """Read AZURE_STORAGE_* and AZURE_CLIENT_ID; `client_id` (an option) wins over the variable."""
        env = cls(
            connection_string=environ.get("AZURE_STORAGE_CONNECTION_STRING") or None,
            account=environ.get("AZURE_STORAGE_ACCOUNT") or None,
            key=environ.get("AZURE_STORAGE_KEY") or None,
            sas_token=(environ.get("AZURE_STORAGE_SAS_TOKEN") or "").lstrip("?") or None,
            client_id=client_id or environ.get("AZURE_CLIENT_ID") or None,
        )
        for secret in (env.connection_string, env.key, env.sas_token):
            register_secret(secret)
        if env.connection_string:
            parsed = parse_connection_string(env.connection_string)
            register_secret(parsed.get("accountkey"))
            register_secret(parsed.get("sharedaccesssignature"))
        return env


def parse_connection_string(text: str) -> dict[str, str]:
    """`Key=Value;...` into a dict with lower-cased keys; UsageError if malformed (value not shown)."""
    out: dict[str, str] = {}
    for part in text.strip().strip(";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError("AZURE_STORAGE_CONNECTION_STRING is malformed (expected Key=Value;...): check it.")
        out[key.strip().lower()] = value.strip()
    return out
