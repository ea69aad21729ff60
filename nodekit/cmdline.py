"""The generator: preparation and release command lines, job JSON and pool start task.

Pure: a `Description` in, strings and dicts out; nothing here touches the disk or the network
(templates are read by `load_template`). Everything is checked before anything is produced:
what Batch would refuse (ids, the release task's 15 minutes), what prep or release would refuse
(sources, destinations), and any credential that would land on a command line, which anyone who
can read the job sees. Raises UsageError or UnsafeInput.

nodekit's distribution is `batch-nodekit` (the command stays `nodekit`; `nodekit` on the Python
package index is another project). It is not published yet (`PUBLISHED`): until it is, the start
task installs the wheel given by `--wheel-url` (built with `python -m pip wheel --no-deps -w dist .`)
or what `--install` names, and refuses to guess.

Command lines run without a shell on Batch, so they call one: `/bin/bash -c '…'` on Linux
(arguments quoted for bash inside, the script quoted for Batch's splitter), `cmd /s /c "…"` on
Windows (each argument quoted so that cmd's metacharacters stay literal). Both call nodekit
from the virtual environment that the start task installs once per node, by absolute path.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PureWindowsPath
from string import Template
from typing import Any
from urllib.parse import parse_qsl

from nodekit import __version__
from nodekit.batchenv import check_job_id
from nodekit.conventions import container_name
from nodekit.errors import UnsafeInput, UsageError
from nodekit.spec import ReleaseSettings, SourceKind, SourceSpec, is_account, split_named

# Where the start task installs nodekit. A dot cannot occur in a Batch job id, so no job
# folder (SHARED/JOB_ID) can ever be this folder, and release can never wipe it.
VENV_LINUX = "$AZ_BATCH_NODE_SHARED_DIR/.nodekit/venv"
VENV_WINDOWS = r"%AZ_BATCH_NODE_SHARED_DIR%\.nodekit\venv"
RELEASE_MAX_S = 15 * 60
PREP_MARGIN_S = 5 * 60  # maxWallClockTime = prep's own --timeout + this, so nodekit stops first, clearly
DISTRIBUTION = "batch-nodekit"  # the name on the Python package index; the command stays `nodekit`
PUBLISHED = False  # True once DISTRIBUTION==__version__ is on the index: then it is the start task's default
BUILD_WHEEL = "python -m pip wheel --no-deps -w dist ."  # in nodekit's source folder: dist/batch_nodekit-*.whl
# Credentials that cmdline recognises in anything it would write into the job or the pool, each with
# what to call it (the value itself is never printed).
_CREDENTIALS = [
    (re.compile(r"(?i)(^|[?&;\s])sig="), "a SAS token (its sig parameter)"),
    (re.compile(r"(?i)[?&]se=.*[?&]sp="), "a SAS token"),
    (re.compile(r"(?i)AccountKey="), "an account key (AccountKey)"),
    (re.compile(r"(?i)SharedAccessSignature="), "a SAS token (SharedAccessSignature)"),
    (re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^/?#@\s]*:[^/?#@\s]*@"), "a password in a URL (user:password@)"),
    (re.compile(r"^[A-Za-z0-9+/]{86}==$"), "what looks like a storage account key"),
    (re.compile(r"\beyJ[\w-]+\.eyJ[\w-]+\.[\w-]+"), "what looks like an access token"),
    (re.compile(r"(?i)\bbearer\s+\S+"), "a bearer token"),
]
_SECRET_NAMES = re.compile(r"(?i)(KEY|SECRET|PASSWORD|TOKEN|CONNECTION_STRING|SAS)")
# A URL's query string (what follows '?' up to a fragment or a space) and the parameter names in it
# that carry credentials on Azure, S3, GCS and OAuth-style links (checked after percent-decoding).
_URL_QUERY = re.compile(r"\?([^#\s]*)")
_SECRET_PARAM = re.compile(r"(?i)^(sig|signature|x-amz-.*|x-goog-.*|.*(token|key|secret|password|passwd|pwd|"
                           r"credential|auth).*)$")
NO_RELEASE = ReleaseSettings()
_WIN_SAFE = re.compile(r"^[A-Za-z0-9_./:=+@,-]+$")
_BASH_SAFE = re.compile(r"^[A-Za-z0-9_./:=+@,%-]+$")
_LINUX_SAFE_EXE = f'"{VENV_LINUX}/bin/nodekit"'
_WIN_EXE = f'"{VENV_WINDOWS}\\Scripts\\nodekit.exe"'


@dataclass(frozen=True)
class Description:
    """Everything the generator needs: the job's data (as in a description file) and how to run it."""

    job_id: str
    pool_id: str | None = None
    sources: tuple[SourceSpec, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    prep_timeout: float = 3600.0
    concurrency: int | None = None
    release: ReleaseSettings = NO_RELEASE
    identity_client_id: str | None = None
    os: str = "linux"
    install: str | None = None  # None: DISTRIBUTION==__version__ once PUBLISHED, else --wheel-url is needed
    wheel_url: str | None = None
    prep_retries: int = 2
    release_max_wall_clock: float = RELEASE_MAX_S
    retention: float | None = None
    env: tuple[tuple[str, str], ...] = field(default=())
    cache: bool = True
    cache_max_size: str | None = None
    md5: str | None = None  # prep --md5 (None: prep's default)
    skip_archived: bool = False  # prep --skip-archived


def iso_duration(seconds: float) -> str:
    """ISO 8601 duration as Batch writes it: PT1H5M, PT15M, P7D, PT90S."""
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = "P" + (f"{days}D" if days else "")
    time = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "") + (f"{secs}S" if secs else "")
    return out + ("T" + time if time else "") if (days or time) else "PT0S"


def check(desc: Description) -> None:
    """Refuse what Batch, prep or release would refuse, and any credential in what would be printed."""
    if desc.os not in ("linux", "windows"):
        raise UsageError(f"--os {desc.os!r}: use linux or windows.")
    try:
        check_job_id(desc.job_id)
    except UnsafeInput as err:
        raise UsageError(str(err).replace("refusing to use it as a folder name", "Batch would refuse it")) from None
    if desc.pool_id is not None:
        try:
            check_job_id(desc.pool_id)
        except UnsafeInput:
            raise UsageError(f"pool id {desc.pool_id!r} is not a valid Batch id (letters, digits, '-' and '_', "
                             "at most 64 characters).") from None
    if not desc.sources:
        raise UsageError("no source: give SOURCE arguments or a --spec with prep.sources.")
    if desc.release.upload_to is None:
        raise UsageError("no release destination: give --upload-to or release.upload_to in --spec.")
    if desc.release.upload_to.kind is SourceKind.URL:
        raise UsageError(f"--upload-to {desc.release.upload_to.display}: give a blob container URL or a folder.")
    dest = desc.release.upload_to
    conventions = desc.release.layout == "conventions"
    if not conventions and (desc.release.outputs or desc.release.job_outputs):
        raise UsageError("--outputs and --job-outputs need --layout conventions: nodekit's own layout keeps logs "
                         "and dumps only.")
    if not conventions and is_account(dest):
        raise UsageError(f"--upload-to {dest.display} names a storage account but no container: give "
                         ".../CONTAINER, or --layout conventions.")
    if dest.kind is SourceKind.LOCAL and dest.path is not None and not (
            PureWindowsPath(dest.path).is_absolute() if desc.os == "windows" else dest.path.startswith(("/", "~"))):
        raise UsageError(f"--upload-to {dest.path}: a local destination must be an absolute path (a relative one "
                         "resolves in the release task's working folder, which Batch deletes).")
    for s in desc.sources:
        if s.filter.include or s.filter.exclude:
            raise UsageError(f"source {s.display}: per-source include/exclude cannot be put on a command line "
                             "yet; use the global --include/--exclude.")
        if s.kind_given is not None:
            raise UsageError(f"source {s.display}: an explicit source kind cannot be put on a command line yet.")
    if desc.release_max_wall_clock > RELEASE_MAX_S:
        raise UsageError(f"the release task's maxWallClockTime {iso_duration(desc.release_max_wall_clock)} is over "
                         "Batch's 15 minutes (PT15M): Batch would refuse the job.")
    deadline = desc.release.deadline or 12 * 60
    if deadline >= desc.release_max_wall_clock:
        raise UsageError(f"the release deadline ({iso_duration(deadline)}) must end before the release task's "
                         f"maxWallClockTime ({iso_duration(desc.release_max_wall_clock)}), or Batch kills it first.")
    if desc.cache_max_size:
        from nodekit.spec import parse_budget

        parse_budget(desc.cache_max_size)
    if not 0 <= desc.prep_retries <= 100:
        raise UsageError("--prep-retries must be from 0 to 100.")
    places = [(f"source {s.display}", s.raw) for s in desc.sources] + \
        [(f"--upload-to {desc.release.upload_to.display}", desc.release.upload_to.raw)] + \
        [(f"--env {name}", value) for name, value in desc.env]
    for where, text in places:
        refuse_credential(where, text)
    for name, _ in desc.env:
        if _SECRET_NAMES.search(name):
            raise UnsafeInput(f"--env {name}: it looks like a secret, and job settings are visible to anyone who "
                              "can read the job; give the pool a managed identity instead.")


def _credential_in_query(text: str) -> str | None:
    """What a URL's query string holds that looks like a credential (`sig`, `token`, `X-Amz-Signature`,
    percent-encoded or not), named by its parameter; None if nothing does."""
    for url in _URL_QUERY.findall(text):
        for key, _ in parse_qsl(url, keep_blank_values=True):
            if _SECRET_PARAM.search(key):
                return f"a credential in its query string (the {key!r} parameter)"
    return None


def refuse_credential(where: str, text: str) -> None:
    """UnsafeInput if `text` holds a credential cmdline recognises; the message never holds the value."""
    found = next((what for pattern, what in _CREDENTIALS if pattern.search(text)), None) or _credential_in_query(text)
    if found:
        raise UnsafeInput(
            f"{where}: it holds {found}, a credential that would be written into the job or the pool, where "
            "anyone who can read them sees it: remove it and use --identity-client-id (a managed identity) "
            "or AZURE_STORAGE_* variables that the pool provides.")


def _named(source: SourceSpec) -> str:
    """`NAME=SOURCE`, checked to split back the same way on the node."""
    text = f"{source.name}={source.raw}"
    if split_named(text) != (source.name, source.raw):
        raise UsageError(f"source folder name {source.name!r} cannot be given on a command line (it holds '=', "
                         "'/', '\\' or ':'): choose another NAME.")
    return text


def prep_args(desc: Description) -> list[str]:
    """nodekit prep's arguments for `desc` (no program name)."""
    args = ["prep"] + [_named(s) for s in desc.sources]
    for g in desc.include:
        args += ["--include", g]
    for g in desc.exclude:
        args += ["--exclude", g]
    args += ["--timeout", f"{int(desc.prep_timeout)}"]
    if desc.concurrency:
        args += ["--concurrency", str(desc.concurrency)]
    if desc.md5:
        args += ["--md5", desc.md5]
    if not desc.cache:
        args.append("--no-cache")
    elif desc.cache_max_size:
        args += ["--cache-max-size", desc.cache_max_size]
    if desc.skip_archived:
        args.append("--skip-archived")
    if desc.identity_client_id:
        args += ["--identity-client-id", desc.identity_client_id]
    return args


def release_args(desc: Description) -> list[str]:
    """nodekit release's arguments for `desc` (no program name)."""
    r = desc.release
    assert r.upload_to is not None
    args = ["release", "--upload-to", r.upload_to.raw]
    for g in r.logs:
        args += ["--logs", g]
    for g in r.dumps or ():
        args += ["--dumps", g]
    args += ["--deadline", f"{int(r.deadline or 12 * 60)}"]
    if r.wipe_task_dirs:
        args.append("--wipe-task-dirs")
    if r.wipe_on_upload_failure:
        args.append("--wipe-on-upload-failure")
    if r.purge_cache:
        args.append("--purge-cache")
    if r.layout == "conventions":
        args += ["--layout", "conventions"]
        for g in r.outputs:
            args += ["--outputs", g]
        for g in r.job_outputs:
            args += ["--job-outputs", g]
    if desc.identity_client_id:
        args += ["--identity-client-id", desc.identity_client_id]
    return args


def kept_where(desc: Description) -> str | None:
    """Where release will keep the job's files in the conventions layout (for a note), else None."""
    dest = desc.release.upload_to
    if desc.release.layout != "conventions" or dest is None:
        return None
    name = container_name(desc.job_id)
    if is_account(dest):
        return f"container {name} of {dest.display} (the Batch File Conventions layout)"
    if dest.kind is SourceKind.LOCAL:
        return f"{dest.display}/{name} (the Batch File Conventions layout)"
    return f"{dest.display} (the Batch File Conventions layout, in the container given rather than {name})"


def linux_line(script: str) -> str:
    """A Batch command line that runs `script` in bash (Batch splits it as a POSIX shell would)."""
    return "/bin/bash -c " + shlex.quote(script)


def bash_word(arg: str) -> str:
    """One argument for bash: bare when plain, else in double quotes with \\ " $ ` escaped.

    (Double rather than single quotes inside, so that the outer single-quoted layer stays readable.)
    """
    if arg and _BASH_SAFE.match(arg):
        return arg
    return '"' + re.sub(r'([\\"$`])', r"\\\1", arg) + '"'


def linux_nodekit(args: list[str]) -> str:
    return linux_line(f"exec {_LINUX_SAFE_EXE} " + " ".join(bash_word(a) for a in args))


def windows_quote(arg: str) -> str:
    """One argument for CommandLineToArgvW inside `cmd /s /c "…"`; UsageError if cmd cannot carry it."""
    if '"' in arg:
        raise UsageError(f"{arg!r} contains a double quote, which cannot pass through cmd safely on Windows.")
    if re.search(r"%[^%\s]+%", arg):
        raise UsageError(f"{arg!r} contains %NAME%, which cmd would expand on Windows: rename the path or value.")
    if arg and _WIN_SAFE.match(arg):
        return arg
    trailing = len(arg) - len(arg.rstrip("\\"))
    return '"' + arg + "\\" * trailing + '"'  # backslashes before the closing quote are doubled


def windows_line(inner: str) -> str:
    """A Batch command line that runs `inner` through cmd (/s: cmd strips exactly the outer quotes)."""
    return f'cmd /s /c "{inner}"'


def windows_nodekit(args: list[str]) -> str:
    return windows_line(f"{_WIN_EXE} " + " ".join(windows_quote(a) for a in args))


def command_lines(desc: Description) -> tuple[str, str]:
    """(preparation command line, release command line) for desc.os; checks `desc` first."""
    check(desc)
    make = linux_nodekit if desc.os == "linux" else windows_nodekit
    return make(prep_args(desc)), make(release_args(desc))


def start_task(desc: Description, template: str | None = None) -> dict[str, Any]:
    """The pool's startTask that installs nodekit into its own virtual environment, once per node."""
    resource_files: list[dict[str, str]] = []
    requirement = desc.install or (f"{DISTRIBUTION}=={__version__}" if PUBLISHED else None)
    if desc.install:
        refuse_credential("--install", desc.install)
    if desc.wheel_url:
        refuse_credential("--wheel-url", desc.wheel_url)
        wheel = desc.wheel_url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if not wheel.endswith(".whl"):
            raise UsageError(f"--wheel-url must name a .whl file, not {wheel!r}.")
        resource_files.append({"httpUrl": desc.wheel_url, "filePath": wheel})
        requirement = wheel
    if requirement is None:
        raise UsageError(
            f"the start task needs nodekit's wheel: {DISTRIBUTION} is not on the Python package index yet. Build "
            f"it in nodekit's source folder with `{BUILD_WHEEL}`, put dist/{DISTRIBUTION.replace('-', '_')}-"
            f"{__version__}-py3-none-any.whl where the pool's nodes can download it, and pass --wheel-url URL "
            "(or --install REQUIREMENT).")
    if desc.os == "linux":
        req = shlex.quote(requirement if not desc.wheel_url else f"./{requirement}")
        script = (f'set -e; v="{VENV_LINUX}"; '
                  'python3 -m venv "$v" || { apt-get update -qq && apt-get install -y -qq python3-venv '
                  '&& python3 -m venv "$v"; }; '
                  f'"$v/bin/python" -m pip install --disable-pip-version-check -q --upgrade {req}')
        line = linux_line(script)
    else:
        req = windows_quote(requirement if not desc.wheel_url else f".\\{requirement}")
        line = windows_line(f'python -m venv "{VENV_WINDOWS}" && "{VENV_WINDOWS}\\Scripts\\python.exe" -m pip '
                            f"install --disable-pip-version-check -q --upgrade {req}")
    text = template if template is not None else load_template(f"start-task-{desc.os}.json")
    return _fill(text, {"command_line": line, "resource_files": resource_files}, "start task")


def job_json(desc: Description, template: str | None = None) -> dict[str, Any]:
    """The REST "Job - Add" body (for `az batch job create --json-file`) carrying both command lines."""
    prep_line, release_line = command_lines(desc)
    if desc.pool_id is None:
        raise UsageError("--pool-id is needed for the job JSON.")
    retention = iso_duration(desc.retention) if desc.retention else None
    values = {
        "job_id": desc.job_id,
        "pool_id": desc.pool_id,
        "prep_command_line": prep_line,
        "release_command_line": release_line,
        "prep_max_wall_clock": iso_duration(desc.prep_timeout + PREP_MARGIN_S),
        "prep_max_task_retry_count": desc.prep_retries,
        "release_max_wall_clock": iso_duration(desc.release_max_wall_clock),
        "environment_settings": [{"name": k, "value": v} for k, v in desc.env],
    }
    text = template if template is not None else load_template(f"job-{desc.os}.json")
    job = _fill(text, values, "job")
    if retention:
        for task in ("jobPreparationTask", "jobReleaseTask"):
            if isinstance(job.get(task), dict):
                holder = job[task].setdefault("constraints", {}) if task == "jobPreparationTask" else job[task]
                holder["retentionTime"] = retention
    return job


def load_template(name: str) -> str:
    """A packaged template: `templates/` at the top of the source tree, shipped in the wheel as
    `nodekit/templates/` (pyproject.toml maps one onto the other)."""
    packaged = resources.files("nodekit").joinpath("templates", name)
    if packaged.is_file():  # installed from the wheel
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "templates" / name).read_text(encoding="utf-8")


def read_template(path: str | Path) -> str:
    """Your own template: UTF-8 (a byte-order mark is fine), UTF-16 or UTF-32."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read template {path}: {err.strerror}.") from None
    try:
        return data.decode(json.detect_encoding(data))
    except UnicodeDecodeError:
        raise UsageError(f"template {path} is not text in UTF-8, UTF-16 or UTF-32.") from None


def _fill(text: str, values: dict[str, Any], what: str) -> dict[str, Any]:
    """Substitute `$name` placeholders with JSON values, then parse; UsageError if the result is not JSON."""
    known = ", ".join(f"${k}" for k in values)
    try:
        filled = Template(text).substitute({k: json.dumps(v, ensure_ascii=False) for k, v in values.items()})
    except KeyError as err:
        raise UsageError(f"the {what} template has ${err.args[0]}, which is not one of its placeholders ({known}): "
                         f"write $${err.args[0]} for a literal $.") from None
    except ValueError as err:  # a '$' followed by no name: 'Invalid placeholder in string: line L, col C'
        where = str(err).rpartition(": ")[2]
        raise UsageError(f"the {what} template has a '$' that starts no placeholder ({where}): write $$ for a "
                         "literal $.") from None
    try:
        data = json.loads(filled)
    except json.JSONDecodeError as err:
        raise UsageError(f"the {what} template does not give valid JSON: {err.msg} at line {err.lineno}.") from None
    if not isinstance(data, dict):
        raise UsageError(f"the {what} template must give a JSON object.")
    return data



