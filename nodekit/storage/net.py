"""The one network set-up every remote store shares: trust, proxies, timeouts, User-Agent.

nodekit speaks to storage through two well-kept HTTP stacks, both configured here so that they
behave alike:

- libcurl (pycurl): the downloads (storage/fetch.py: one thread keeps many requests in flight,
  with TLS and HTTP parsing in C; see the README's performance section for the measurements that
  chose it), and the transport of nodekit's own azure-core pipeline for listings and properties
  (storage/transport.py);
- azure-core's `RequestsTransport` (requests and urllib3 underneath) for the Azure SDK's own
  clients: release's uploads and read-backs, containers; azure-identity's token requests use its
  default transport, which reads the same proxy and CA variables.

Trust: the CA bundle named by REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE or SSL_CERT_FILE (first that is
set; SSL_CERT_DIR for a folder), else certifi's bundle, which is what requests and the Azure SDK
use by default. Proxies: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY in either case, resolved
for each URL by requests' own rules (`get_environ_proxies`), and handed to libcurl explicitly, so
that both stacks pick the same proxy (libcurl alone would ignore upper-case HTTP_PROXY).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nodekit import __version__

API_VERSION = "2025-01-05"  # the Blob service version nodekit's requests ask for
CONNECT_TIMEOUT = 20.0  # seconds to set up a connection (TCP and TLS)
CA_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


def user_agent(full: bool = False) -> str:
    """`nodekit/VERSION`: first in every request's User-Agent (the SDK appends its own). `full`: with the
    Python version and the OS, for requests no SDK names."""
    if not full:
        return f"nodekit/{__version__}"
    import platform
    import sys

    return f"nodekit/{__version__} Python/{platform.python_version()} ({sys.platform})"


@dataclass
class NetConfig:
    """How to reach storage: built once from the environment; safe to share between threads."""

    ca_bundle: str | None = None  # a PEM file or a folder of hashed certificates; None: certifi's bundle
    ca_variable: str | None = None  # the variable that named it
    read_timeout: float = 60.0
    pool_size: int = 16  # connections kept per host by the requests session
    _session: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _proxies: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, read_timeout: float = 60.0) -> NetConfig:
        """Read the CA variables (proxies are resolved per URL, by requests' rules, when used)."""
        for name in CA_VARIABLES:
            value = (environ.get(name) or "").strip()
            if value:
                return cls(ca_bundle=value, ca_variable=name, read_timeout=read_timeout)
        return cls(read_timeout=read_timeout)

    # -- trust ---------------------------------------------------------------------------------
    def verify(self) -> str:
        """What to trust, as a path: the configured bundle or folder, else certifi's bundle."""
        if self.ca_bundle:
            return self.ca_bundle
        import certifi

        return str(certifi.where())

    def trust_hint(self) -> str:
        """The sentence an untrusted-certificate message ends with."""
        if self.ca_variable:
            return (f"nodekit trusts the certificates in {self.ca_bundle} ({self.ca_variable}): add the authority "
                    "that signed this one to it")
        return ("if your network uses its own certificate authority (a TLS-inspecting proxy), set REQUESTS_CA_BUNDLE "
                "(or SSL_CERT_FILE) to a PEM file that holds it")

    # -- proxies -------------------------------------------------------------------------------
    def proxy_for(self, url: str) -> str | None:
        """The proxy URL requests would use for `url` (None: direct), from the environment, cached per host."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        with self._lock:
            if key in self._proxies:
                return self._proxies[key] or None
        import urllib.request

        if urllib.request.getproxies():  # requests' own rules (NO_PROXY with CIDRs and ports, ALL_PROXY)
            from requests.utils import get_environ_proxies, select_proxy

            proxy = select_proxy(url, get_environ_proxies(url)) or ""
        else:  # no proxy variable at all: no need to import requests (60 ms of a warm re-run)
            proxy = ""
        with self._lock:
            self._proxies[key] = proxy
        return proxy or None

    # -- the requests stack (azure-core's transport) -------------------------------------------
    def transport(self) -> Any:
        """An azure-core RequestsTransport over one shared requests session (proxies from the environment)."""
        from azure.core.pipeline.transport import RequestsTransport

        with self._lock:
            if self._session is None:
                import requests
                from requests.adapters import HTTPAdapter

                session = requests.Session()  # trust_env: HTTP(S)_PROXY and NO_PROXY, as the SDK does
                adapter = HTTPAdapter(pool_connections=8, pool_maxsize=self.pool_size, max_retries=0)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                self._session = session
        return RequestsTransport(session=self._session, session_owner=False, connection_timeout=CONNECT_TIMEOUT,
                                 read_timeout=self.read_timeout)

    def sdk_options(self) -> dict[str, Any]:
        """Keyword arguments for every Azure SDK client: this transport, trust, User-Agent, and no retries
        of its own (nodekit's retry decision is in storage/retry.py)."""
        return {"transport": self.transport(), "connection_verify": self.verify(), "user_agent": user_agent(),
                "retry_total": 0, "logging_enable": False}


def curl_ca_options(verify: str) -> tuple[str, str]:
    """('CAINFO', file) or ('CAPATH', folder) for libcurl."""
    return ("CAPATH", verify) if os.path.isdir(verify) else ("CAINFO", verify)
