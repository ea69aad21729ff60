"""The description of a job's data: sources (what prep fetches) and, later, release settings.

Everything here is pure: `parse_source` classifies a URL or path, `load_spec` reads a JSON
description file. Both raise UsageError or UnsafeInput with a message that names the
offending value (secrets removed) and touch nothing.

Description file (JSON; see the README for every key)::

    {"nodekit": 1,
     "job_id": "myjob",
     "prep": {"sources": ["https://acct.blob.core.windows.net/ref/v2",
                          {"url": "/mnt/data/models", "name": "models", "include": ["*.onnx"]}],
              "exclude": ["*.tmp"], "timeout": "30m"},
     "release": {}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from nodekit.conventions import is_job_ref, parse_job_ref
from nodekit.errors import UnsafeInput, UsageError
from nodekit.names import GlobFilter, check_globs, unsafe_reason
from nodekit.redact import display_url, register_secret

_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
# Azure's storage host names: ACCOUNT[-secondary].[zNN.][privatelink.](blob|dfs).SUFFIX, e.g.
# acct.blob.core.windows.net, acct-secondary.blob.core.chinacloudapi.cn, acct.z22.blob.storage.azure.net,
# acct.privatelink.blob.core.windows.net, acct.dfs.core.usgovcloudapi.net.
_AZURE_HOST = re.compile(r"^(?P<account>[a-z0-9]{3,24})(?P<secondary>-secondary)?\.(?P<zone>z[0-9]{1,3}\.)?"
                         r"(?P<privatelink>privatelink\.)?(?P<service>blob|dfs)\.(?P<suffix>[a-z0-9.-]+)$")
_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d)?$")
_ISO_DURATION = re.compile(
    r"^P(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)

MAX_TIMEOUT_S = 24 * 3600.0
# Sources shipped inside the package, for dry runs with no storage at all.
BUILTIN = {"builtin:sample": "sample"}
DEFAULT_TIMEOUT_S = 3600.0


NO_FILTER = GlobFilter()


class SourceKind(str, Enum):
    """What a source is: a blob container (or a folder in it), one file by URL, or a local folder."""

    BLOB = "blob"
    URL = "url"
    LOCAL = "local"


@dataclass(frozen=True)
class BlobLocation:
    """Where a container lives: `endpoint` is `scheme://host[:port]` plus `/account` for path-style URLs."""

    endpoint: str
    account: str
    container: str
    prefix: str  # '' or a folder, without leading or trailing '/'
    sas: str | None = field(default=None, repr=False)

    @property
    def container_url(self) -> str:
        return f"{self.endpoint}/{self.container}"


@dataclass(frozen=True)
class SourceSpec:
    """One source of prep, fully parsed. `display` is safe to print; `url` may hold a SAS."""

    kind: SourceKind
    name: str  # sub-folder of the job folder ('/'-separated, validated)
    display: str
    blob: BlobLocation | None = None
    url: str | None = field(default=None, repr=False)
    path: str | None = None
    filter: GlobFilter = NO_FILTER
    raw: str = field(default="", repr=False)  # the text as given (may hold a SAS: never print it)
    kind_given: str | None = None  # the kind the description named, if any


def parse_duration(value: str | float | int, *, what: str, maximum: float = MAX_TIMEOUT_S) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h`, `1d` or ISO 8601 `PT30M`; UsageError if bad or above `maximum`."""
    text = str(value).strip()
    seconds: float | None = None
    m = _DURATION.match(text)
    if m:
        scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group("unit")]
        seconds = float(m.group("n")) * scale
    else:
        iso = _ISO_DURATION.match(text)
        if iso and any(iso.groupdict().values()):
            g = {k: float(v or 0) for k, v in iso.groupdict().items()}
            seconds = g["d"] * 86400 + g["h"] * 3600 + g["m"] * 60 + g["s"]
    if seconds is None:
        raise UsageError(f"{what} {text!r} is not a duration: use seconds (90), 30m, 2h or PT30M.")
    if seconds <= 0:
        raise UsageError(f"{what} must be more than zero.")
    if seconds > maximum:
        raise UsageError(f"{what} {text} is too long: at most {_human_duration(maximum)}.")
    return seconds


def _human_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def _is_local_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        import ipaddress

        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def azure_host(host: str) -> tuple[str, str] | None:
    """(account, the blob service's host name) for an Azure storage host name (see _AZURE_HOST), else None.

    A Data Lake (`dfs`) host maps to the same account's blob host: the blob API reads and writes a
    hierarchical-namespace account's data too (multi-protocol access), so one code path serves both.
    """
    m = _AZURE_HOST.match(host)
    if m is None:
        return None
    blob = (f"{m['account']}{m['secondary'] or ''}.{m['zone'] or ''}{m['privatelink'] or ''}blob.{m['suffix']}")
    return m["account"], blob


def split_named(text: str) -> tuple[str | None, str]:
    """`NAME=SOURCE` -> (NAME, SOURCE); a URL or a path -> (None, text). UsageError for a bad NAME.

    Text before the first '=' is a NAME unless it holds ':' (a URL, whose query may hold '=', or a
    drive letter) or starts like a path (`/`, `./`, `../`, `~`). A NAME is one folder name: `=URL`
    and `a/b=URL` are refused rather than taken for a local path.
    """
    head, sep, rest = text.partition("=")
    if not sep or ":" in head or head.startswith(("/", "./", "../", "~")):
        return None, text
    if not head.strip():
        raise UsageError(f"{text!r}: NAME=SOURCE has no NAME before '='; give a folder name, "
                         "or start a path that contains '=' with ./ or /.")
    if "/" in head or "\\" in head:
        raise UsageError(f"{text!r}: NAME {head!r} must be one folder name (no '/' or "
                         "'\\'); start a path that contains '=' with ./ or /.")
    if not rest.strip():
        raise UsageError(f"{text!r}: nothing after '=': give NAME=SOURCE.")
    return head, rest


def _check_sas(query: str, shown: str) -> str | None:
    """The SAS query string if `query` is one (registered as a secret); UsageError if it has expired-looking junk."""
    if not query:
        return None
    params = parse_qs(query, keep_blank_values=True)
    if "sig" not in params:
        raise UsageError(f"{shown}: the query string is not a SAS token (no 'sig'): remove it or use a full SAS.")
    register_secret(params["sig"][0])
    register_secret(query)
    return query


def parse_source(
    text: str,
    *,
    name: str | None = None,
    kind: str | None = None,
    filter: GlobFilter = NO_FILTER,
) -> SourceSpec:
    """Classify `text` (URL or path) into a SourceSpec; UsageError/UnsafeInput on anything wrong.

    Blob containers: `https://ACCOUNT.blob.SUFFIX/CONTAINER[/PREFIX]` in every form Azure names
    storage (any cloud's suffix, `-secondary`, DNS zones `zNN.blob.storage.azure.net`,
    `privatelink.`, and Data Lake's `dfs` hosts and `abfs[s]://CONTAINER@ACCOUNT.dfs.SUFFIX/PATH`,
    read through the blob endpoint); path-style `http(s)://HOST[:PORT]/ACCOUNT/CONTAINER[/PREFIX]`
    when HOST is an IP address or localhost (Azurite); and, with `kind` "blob", a custom domain
    `https://HOST/CONTAINER[/PREFIX]` (its account comes from the credential). Other `http(s)://`
    URLs are one file. `file://` URLs and paths are local folders.
    """
    text = text.strip()
    if not text:
        raise UsageError("a source is empty: give a blob container URL, a https:// URL or a folder.")
    if is_job_ref(text):
        return _job_source(text, name=name, kind=kind, filter=filter)
    if kind is not None and kind not in {k.value for k in SourceKind}:
        raise UsageError(f"source kind {kind!r} is not one of blob, url, local.")
    if text.lower() in BUILTIN:
        path = str(Path(__file__).parent / BUILTIN[text.lower()])
        spec = SourceSpec(SourceKind.LOCAL, name or "sample", text.lower(), path=path, filter=filter)
        return _finish(spec, text, kind)
    try:
        parts = urlsplit(text)
    except ValueError as err:
        raise UsageError(f"malformed URL {display_url(text)!r} ({err}): check the brackets and port.") from None
    scheme = parts.scheme.lower()
    is_drive = len(scheme) == 1 and PureWindowsPath(text).drive != ""
    if kind == "local" or scheme == "file" or not scheme or is_drive:
        if kind not in (None, "local"):
            raise UsageError(f"source {text!r} is a path, not a {kind} URL.")
        path = unquote(parts.path) if scheme == "file" else text
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise UsageError(f"file URL {text!r} names a host: use file:///absolute/path.")
        if scheme == "file" and not path.startswith("/"):
            raise UsageError(f"file URL {text!r} has no absolute path: use file:///absolute/path "
                             "(file:// alone is not the current folder).")
        windows_path = is_drive or "\\" in path
        default_name = (PureWindowsPath(path).name if windows_path else Path(path.rstrip("/")).name) or "local"
        return _finish(SourceSpec(SourceKind.LOCAL, name or default_name, path, path=path, filter=filter), text, kind)
    if scheme in ("abfs", "abfss"):
        return _abfs(text, parts, name, kind, filter)
    if scheme == "builtin":
        raise UsageError(f"no embedded data named {text!r}: the only one is {', '.join(BUILTIN)}.")
    if scheme not in ("http", "https"):
        raise UsageError(
            f"unknown scheme '{parts.scheme}:' in source {display_url(text)!r}: "
            "use https:// (blob container or file), http:// (emulator) or a folder path."
        )
    try:
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError as err:
        raise UsageError(f"malformed URL {display_url(text)!r} ({err}).") from None
    if not host:
        raise UsageError(f"malformed URL {display_url(text)!r}: it has no host name.")
    netloc = f"{host}:{port}" if port else host
    if ":" in host:
        netloc = f"[{host}]:{port}" if port else f"[{host}]"
    segments = [unquote(s) for s in parts.path.split("/") if s]
    shown = display_url(text)
    azure = azure_host(host)
    if kind != "url" and (azure or kind == "blob" or _is_local_host(host)):
        if azure:
            account, endpoint = azure[0], f"{scheme}://{azure[1]}" + (f":{port}" if port else "")
        elif (segments and _ACCOUNT.match(segments[0]) and (_is_local_host(host) or segments[0] == "devstoreaccount1")
              and (kind == "blob" or (len(segments) > 1 and _CONTAINER.match(segments[1])))):
            account = segments.pop(0)  # path-style: the emulator, or a storage endpoint named by its address
            endpoint = f"{scheme}://{netloc}/{account}"
        elif kind == "blob" and not _is_local_host(host):
            account, endpoint = "", f"{scheme}://{netloc}"  # a custom domain: the container comes first
        else:
            account = ""
        if azure or account or kind == "blob":
            if not account and _is_local_host(host):
                raise UsageError(f"{shown}: no storage account in the URL (https://ACCOUNT.blob.core.windows.net/...).")
            return _blob_source(text, shown, endpoint, account, segments, parts.query, name, kind, filter)
    if not segments:
        raise UsageError(f"{shown}: a file URL needs a path that ends in a file name.")
    if parts.query and "sig=" in parts.query:
        _check_sas(parts.query, shown)
    return _finish(SourceSpec(SourceKind.URL, name or "downloads", shown, url=text, filter=filter), text, kind)


def _blob_source(text: str, shown: str, endpoint: str, account: str, segments: list[str], query: str,
                 name: str | None, kind: str | None, filter: GlobFilter) -> SourceSpec:
    if not segments:
        raise UsageError(f"{shown}: the URL names no container (.../CONTAINER[/PREFIX]).")
    container = segments[0]
    if not _CONTAINER.match(container):
        raise UsageError(f"{shown}: {container!r} is not a valid container name (3-63 lowercase letters, digits and "
                         "single hyphens).")
    sas = _check_sas(query, shown)
    location = BlobLocation(endpoint, account, container, "/".join(segments[1:]), sas)
    default_name = segments[-1] if len(segments) > 1 else container
    return _finish(SourceSpec(SourceKind.BLOB, name or default_name, shown, blob=location, filter=filter), text, kind)


def _abfs(text: str, parts: SplitResult, name: str | None, kind: str | None, filter: GlobFilter) -> SourceSpec:
    """`abfs[s]://CONTAINER@ACCOUNT.dfs.SUFFIX/PATH` (Hadoop's and Spark's Data Lake URLs): the same data by the
    blob endpoint over https."""
    shown = display_url(text)
    if kind not in (None, "blob"):
        raise UsageError(f"{shown}: an {parts.scheme}:// URL names a Data Lake container, not a {kind} source.")
    container, at, host = parts.netloc.rpartition("@")
    azure = azure_host(host.lower())
    if not at or not container or azure is None:
        raise UsageError(f"{shown}: write {parts.scheme}://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH.")
    segments = [container] + [unquote(x) for x in parts.path.split("/") if x]
    return _blob_source(text, shown, f"https://{azure[1]}", azure[0], segments, parts.query, name, "blob", filter)


def with_path(where: str, *segments: str) -> str:
    """`where` (a URL, its query kept, or a folder) with `segments` added to its path."""
    if "://" not in where:
        return str(Path(where).joinpath(*segments))
    parts = urlsplit(where)
    path = "/".join([parts.path.rstrip("/"), *segments])
    return parts._replace(path=path).geturl()


def _job_source(text: str, *, name: str | None, kind: str | None, filter: GlobFilter) -> SourceSpec:
    """A `job:` source (conventions.parse_job_ref): the standard's container and prefix of an earlier
    job, at the account or folder it names, parsed as any other source."""
    ref = parse_job_ref(text)
    if is_job_ref(ref.where):
        raise UsageError(f"{display_url(text)!r}: after '@' comes the storage account's URL or a folder.")
    spec = parse_source(with_path(ref.where, ref.container, *ref.prefix.split("/")), name=name or ref.default_name,
                        kind=kind, filter=filter)
    if spec.kind is SourceKind.URL:
        raise UsageError(f"{display_url(text)!r}: {display_url(ref.where)} is not a storage account's blob URL "
                         "(https://ACCOUNT.blob.core.windows.net) nor a folder.")
    return replace(spec, raw=text)


# What release's destination is checked with when it names an account: a container that cannot clash.
_PROBE = "nodekit-account-probe"


def parse_destination(text: str) -> SourceSpec:
    """release's --upload-to: a blob container URL (perhaps with a folder), a local folder, or a storage
    account's blob URL without a container (`https://ACCOUNT.blob.core.windows.net`), which the
    conventions layout completes with the job's container: a BLOB SourceSpec whose container is ''.

    A plain file URL is returned as it is (release refuses it with its own message). UsageError or
    UnsafeInput for anything else wrong; touches nothing.
    """
    if is_job_ref(text.strip()):
        raise UsageError(f"--upload-to {display_url(text)!r}: a job: form is a source for prep; give the storage "
                         "account's URL (the conventions layout names the container after the job).")
    try:
        spec: SourceSpec | None = parse_source(text, name="upload")
        failure: UsageError | None = None
    except UsageError as err:
        spec, failure = None, err
    if spec is not None and spec.kind is not SourceKind.URL:
        return spec
    try:
        probe = parse_source(with_path(text.strip(), _PROBE), name="upload")
    except UsageError:
        probe = None
    if probe is not None and probe.blob is not None and probe.blob.container == _PROBE and not probe.blob.prefix:
        return replace(probe, blob=replace(probe.blob, container=""), display=display_url(text.strip()),
                       raw=text.strip())
    if spec is not None:
        return spec
    assert failure is not None
    raise failure


def is_account(spec: SourceSpec) -> bool:
    """True for a destination that names a storage account but no container (see parse_destination)."""
    return spec.kind is SourceKind.BLOB and spec.blob is not None and not spec.blob.container


def _finish(spec: SourceSpec, raw: str, kind: str | None) -> SourceSpec:
    spec = replace(spec, raw=raw, kind_given=kind)
    reason = unsafe_reason(spec.name)
    if reason:
        raise UnsafeInput(f"source folder name {spec.name!r} for {spec.display} is unsafe ({reason}).")
    return spec


@dataclass(frozen=True)
class PrepSettings:
    """prep's part of a description file (command-line options override each)."""

    sources: tuple[SourceSpec, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    timeout: float | None = None
    dest: str | None = None
    concurrency: int | None = None
    cache: bool = True
    cache_max_size: str | None = None
    skip_archived: bool = False
    md5: str | None = None


MD5_POLICIES = ("all", "source")
# release's layouts in storage: nodekit's own (JOB/NODE/logs.tar.gz, dumps/, manifest.json) or the
# Batch File Conventions standard's (the job's container, <task>/$TaskLog/..., $JobOutput/...).
LAYOUTS = ("nodekit", "conventions")


@dataclass(frozen=True)
class ReleaseSettings:
    """release's part of a description file (command-line options override each)."""

    upload_to: SourceSpec | None = None
    logs: tuple[str, ...] = ()
    dumps: tuple[str, ...] | None = None
    deadline: float | None = None
    wipe_on_upload_failure: bool | None = None
    wipe_task_dirs: bool | None = None
    purge_cache: bool | None = None
    layout: str | None = None
    outputs: tuple[str, ...] = ()
    job_outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    """A whole description file."""

    job_id: str | None = None
    pool_id: str | None = None
    prep: PrepSettings = PrepSettings()
    release: ReleaseSettings = ReleaseSettings()


_TOP_KEYS = {"nodekit", "job_id", "pool_id", "prep", "release"}
_PREP_KEYS = {"sources", "include", "exclude", "timeout", "dest", "concurrency", "cache", "cache_max_size", "md5",
              "skip_archived"}
_SOURCE_KEYS = {"url", "name", "kind", "include", "exclude"}
_RELEASE_KEYS = {"upload_to", "logs", "dumps", "deadline", "wipe_on_upload_failure", "wipe_task_dirs",
                 "purge_cache", "layout", "outputs", "job_outputs"}
RELEASE_MAX_DEADLINE_S = 15 * 60.0


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where} must be a string or a list of strings.")
    return tuple(value)


def _globs(value: Any, where: str) -> tuple[str, ...]:
    return check_globs(_strings(value, where), where)


def _check_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))}).")


def parse_spec(data: Any, *, origin: str = "description") -> Spec:
    """Validate a decoded description (a dict) into a Spec; UsageError names the bad key."""
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: the top level must be a JSON object.")
    _check_keys(data, _TOP_KEYS, origin)
    version = data.get("nodekit", 1)
    if version != 1:
        raise UsageError(f"{origin}: 'nodekit' is {version!r}; this nodekit reads version 1.")
    prep_data = data.get("prep", {})
    if not isinstance(prep_data, dict):
        raise UsageError(f"{origin}: 'prep' must be an object.")
    if "pipeline" in prep_data:
        raise UsageError(f"{origin}: prep.pipeline is gone (nodekit no longer pipelines requests; "
                         "prep.concurrency sets the requests in flight): remove it.")
    _check_keys(prep_data, _PREP_KEYS, f"{origin} prep")
    sources = []
    raw_sources = prep_data.get("sources", [])
    if not isinstance(raw_sources, list):
        raise UsageError(f"{origin}: prep.sources must be a list.")
    for i, item in enumerate(raw_sources):
        where = f"{origin} prep.sources[{i}]"
        if isinstance(item, str):
            name, text = split_named(item)
            sources.append(parse_source(text, name=name))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise UsageError(f"{where} must be a URL string or an object with a 'url'.")
        _check_keys(item, _SOURCE_KEYS, where)
        flt = GlobFilter(_globs(item.get("include", []), f"{where}.include"),
                         _globs(item.get("exclude", []), f"{where}.exclude"))
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise UsageError(f"{where}.name must be a string.")
        sources.append(parse_source(item["url"], name=name, kind=item.get("kind"), filter=flt))
    timeout = prep_data.get("timeout")
    concurrency = prep_data.get("concurrency")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or not 1 <= concurrency <= 256):
        raise UsageError(f"{origin}: prep.concurrency must be a whole number from 1 to 256.")
    dest = prep_data.get("dest")
    if dest is not None and not isinstance(dest, str):
        raise UsageError(f"{origin}: prep.dest must be a string.")
    for key, default in (("cache", True), ("skip_archived", False)):
        if not isinstance(prep_data.get(key, default), bool):
            raise UsageError(f"{origin}: prep.{key} must be true or false.")
    if prep_data.get("cache_max_size") is not None and not isinstance(prep_data["cache_max_size"], str):
        raise UsageError(f"{origin}: prep.cache_max_size must be a string like \"10G\" or \"50%\".")
    md5 = prep_data.get("md5")
    if md5 is not None and md5 not in MD5_POLICIES:
        raise UsageError(f"{origin}: prep.md5 must be \"all\" or \"source\".")
    prep = PrepSettings(
        md5=md5,
        cache=prep_data.get("cache", True),
        skip_archived=prep_data.get("skip_archived", False),
        cache_max_size=prep_data.get("cache_max_size"),
        sources=tuple(sources),
        include=_globs(prep_data.get("include", []), f"{origin} prep.include"),
        exclude=_globs(prep_data.get("exclude", []), f"{origin} prep.exclude"),
        timeout=None if timeout is None else parse_duration(timeout, what=f"{origin} prep.timeout"),
        dest=dest,
        concurrency=concurrency,
    )
    release = _parse_release(data.get("release", {}), origin)
    for key in ("job_id", "pool_id"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise UsageError(f"{origin}: {key} must be a string.")
    return Spec(job_id=data.get("job_id"), pool_id=data.get("pool_id"), prep=prep, release=release)


def _parse_release(data: Any, origin: str) -> ReleaseSettings:
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: 'release' must be an object.")
    _check_keys(data, _RELEASE_KEYS, f"{origin} release")
    for key in ("wipe_on_upload_failure", "wipe_task_dirs", "purge_cache"):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise UsageError(f"{origin}: release.{key} must be true or false.")
    upload_to = data.get("upload_to")
    if upload_to is not None and not isinstance(upload_to, str):
        raise UsageError(f"{origin}: release.upload_to must be a URL or a folder.")
    deadline = data.get("deadline")
    layout = data.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"{origin}: release.layout must be \"nodekit\" or \"conventions\".")
    return ReleaseSettings(
        layout=layout,
        outputs=_globs(data.get("outputs", []), f"{origin} release.outputs"),
        job_outputs=_globs(data.get("job_outputs", []), f"{origin} release.job_outputs"),
        upload_to=None if upload_to is None else parse_destination(upload_to),
        logs=_globs(data.get("logs", []), f"{origin} release.logs"),
        dumps=None if data.get("dumps") is None else _globs(data["dumps"], f"{origin} release.dumps"),
        deadline=None if deadline is None else parse_duration(deadline, what=f"{origin} release.deadline",
                                                                maximum=RELEASE_MAX_DEADLINE_S),
        wipe_on_upload_failure=data.get("wipe_on_upload_failure"),
        wipe_task_dirs=data.get("wipe_task_dirs"),
        purge_cache=data.get("purge_cache"),
    )


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file decoded; UsageError naming `what` if unreadable, not JSON, nested too deeply, or with a key
    given twice in one object.

    Read as bytes, so that UTF-8 (with or without a byte-order mark), UTF-16 (as Windows PowerShell
    writes it) and UTF-32 are all read correctly.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror}.") from None
    import json  # not paid for by runs without a description file

    def no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise UsageError(f"{what} {path} gives {key!r} twice in one object: keep one (JSON would silently "
                                 "take the last).")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(data, object_pairs_hook=no_twice)
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not text in UTF-8, UTF-16 or UTF-32.") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}.") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is nested too deeply to be read.") from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a JSON description file; UsageError if unreadable or invalid."""
    return parse_spec(read_json(path, "description file"), origin=str(path))


def sources_from_args(args: Sequence[str]) -> tuple[SourceSpec, ...]:
    """Parse command-line SOURCE arguments (`[NAME=]URL_OR_PATH`)."""
    specs = []
    for arg in args:
        name, text = split_named(arg)
        specs.append(parse_source(text, name=name))
    return tuple(specs)


_SIZE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B?|B)?$", re.IGNORECASE)
_PERCENT = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*%$")


def parse_budget(text: str, what: str = "--cache-max-size") -> tuple[int | None, float | None]:
    """(bytes, None) from '10G', '500MiB', '1048576'; (None, share) from '50%'. UsageError otherwise."""
    text = str(text).strip()
    m = _PERCENT.match(text)
    if m:
        share = float(m.group("n")) / 100
        if not 0 < share <= 1:
            raise UsageError(f"{what} {text}: give a share from 1% to 100%.")
        return None, share
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{what} {text!r}: give a size (10G, 500M, bytes) or a share of the disk (50%).")
    unit = (m.group("unit") or "B").upper()[0]
    scale = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
    return int(float(m.group("n")) * scale), None
