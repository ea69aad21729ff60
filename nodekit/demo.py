"""Microsoft's JobPrepRelease sample, re-enacted on simulated nodes with nodekit doing the work.

A pool of two nodes; a preparation task that runs `nodekit prep` (the embedded sample data, or a
container in a running Azurite) and writes the node's id into a file in the job's shared folder;
eight tasks that each append their id to that file and read the input; each node's file printed;
`nodekit release` keeping the logs, each task's output file and the job's results (in a local
folder, or Azurite) in the Batch File Conventions layout, and wiping; the preparation and release
exit codes per node, and the tree in storage. Needs nothing but the installed package.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodekit.cmdline import VENV_LINUX, bash_word, linux_line
from nodekit.conventions import container_name, tree
from nodekit.errors import UsageError
from nodekit.simulate import Simulation, TaskSpec

JOB_ID = "JobPrepReleaseSampleJob"
FILE = "job_prep_and_release.txt"
DEV_ACCOUNT = "devstoreaccount1"
_NK = f'"{VENV_LINUX}/bin/nodekit"'
_FILE = f'"$AZ_BATCH_NODE_SHARED_DIR/$AZ_BATCH_JOB_ID/{FILE}"'
_RESULTS = '"$AZ_BATCH_NODE_SHARED_DIR/$AZ_BATCH_JOB_ID/results"'  # each task's result: the job's output


@dataclass
class DemoResult:
    simulation: Simulation
    files: dict[str, str]  # node id -> contents of its job_prep_and_release.txt
    kept_in: str  # the job's container (Azurite) or its folder: where the layout is
    kept: list[str]  # the names kept there

    @property
    def ok(self) -> bool:
        nodes = [n for n in self.simulation.nodes if n.prep_ran]
        return bool(nodes) and all(
            n.prep_result is not None and n.prep_result.exit_code == 0 and n.release_result is not None
            and n.release_result.exit_code == 0 for n in nodes) and all(
            r.exit_code == 0 for r in self.simulation.results)


def _azurite_env(endpoint: str) -> dict[str, str]:
    from nodekit.storage.azure import DEV_KEY

    return {"AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};"
                                               f"AccountKey={DEV_KEY};BlobEndpoint={endpoint}/{DEV_ACCOUNT};"}


def _seed_azurite(endpoint: str) -> tuple[str, str]:
    """Put the sample data into a container of the Azurite at `endpoint`; (source URL, the account's URL,
    where release names the job's container)."""
    from nodekit.credentials import CredentialEnv
    from nodekit.spec import parse_source
    from nodekit.storage import RunContext
    from nodekit.storage.factory import open_destination
    from nodekit.storage.local import LocalStore
    from nodekit.storage.net import NetConfig

    base = endpoint.rstrip("/")
    creds = CredentialEnv.from_environ(_azurite_env(base))
    net, ctx = NetConfig(), RunContext(timeout=60)
    source, account = f"{base}/{DEV_ACCOUNT}/nodekit-demo-input", f"{base}/{DEV_ACCOUNT}"
    dest = open_destination(parse_source(source, name="in"), creds, net, ctx)
    dest.create_container()  # type: ignore[attr-defined]
    sample = LocalStore(str(Path(__file__).parent / "sample"))
    for f in sample.list_files():
        chunks: list[bytes] = []
        sample.fetch(f, 0, f.size, chunks.append)
        dest.put(f"sample/{f.name}", iter(chunks or [b""]))
    return f"{source}/sample", account


def _kept(where: str, azurite: str | None) -> list[str]:
    """The names kept in the job's container (Azurite) or folder."""
    if azurite is None:
        root = Path(where)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    from nodekit.credentials import CredentialEnv
    from nodekit.spec import parse_source
    from nodekit.storage import RunContext
    from nodekit.storage.factory import open_store
    from nodekit.storage.net import NetConfig

    store = open_store(parse_source(where), CredentialEnv.from_environ(_azurite_env(azurite.rstrip("/"))),
                       NetConfig(), RunContext(timeout=60))
    return sorted(f.name for f in store.list_files())


def run_demo(root: Path | None, azurite: str | None, emit: Callable[[str], None] = print,
             time_scale: float = 1.0) -> DemoResult:
    """Run the sample; returns what happened. Raises UsageError if `root` holds an earlier run."""
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="nodekit-demo-"))
    elif root.exists() and any(root.iterdir()):
        raise UsageError(f"--root {root} is not empty: give a new or empty folder.")
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()  # the release task runs in its own working folder: every path it gets is absolute
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root)}
    container = container_name(JOB_ID)
    if azurite:
        source, account = _seed_azurite(azurite)
        env.update(_azurite_env(azurite.rstrip("/")))
        kept_in = f"{account}/{container}"
        emit(f"Using Azurite at {azurite}: input {source}, logs and outputs in {kept_in}")
    else:
        source, account = "builtin:sample", str(root / "storage")
        kept_in = f"{account}/{container}"
    prep = TaskSpec("jobpreparation", linux_line(
        f"{_NK} prep {bash_word('sample=' + source)} --progress-interval 0 "
        f'&& echo "$AZ_BATCH_NODE_ID tasks:" > {_FILE}'), max_wall_clock=600, max_retries=1)
    release = TaskSpec("jobrelease", linux_line(
        f"exec {_NK} release --upload-to {bash_word(account)} --layout conventions --outputs {bash_word('frame.txt')} "
        f"--job-outputs {bash_word('results/*.txt')} --wipe-task-dirs --deadline 5m"), max_wall_clock=900)
    tasks = [TaskSpec(f"task{i:03d}", linux_line(
        f'echo "  $AZ_BATCH_TASK_ID" >> {_FILE} '
        '&& test -s "$AZ_BATCH_NODE_SHARED_DIR/$AZ_BATCH_JOB_ID/sample/reference/model.json" '
        '&& echo "frame of $AZ_BATCH_TASK_ID, rendered on $AZ_BATCH_NODE_ID" > frame.txt '
        f'&& mkdir -p {_RESULTS} && echo "$AZ_BATCH_TASK_ID: ok" > {_RESULTS}/"$AZ_BATCH_TASK_ID.txt" && sleep 0.2'))
        for i in range(1, 9)]
    emit("Attempting to create pool: JobPrepReleaseSamplePool (2 simulated nodes)")
    sim = Simulation(root / "nodes", JOB_ID, prep, release, nodes=2, slots=1, time_scale=time_scale,
                     pool_id="JobPrepReleaseSamplePool", base_env=env, emit=emit)
    emit(f"Created pool JobPrepReleaseSamplePool with 2 nodes under {sim.root}")
    emit("Submitting tasks and awaiting completion...")
    sim.run_tasks(tasks)
    emit("All tasks completed.\n")
    files = {}
    for node in sim.nodes:
        path = node.shared / JOB_ID / FILE
        if path.exists():
            files[node.id] = path.read_text()
            emit(f"Contents of shared/{JOB_ID}/{FILE} on {node.id}:")
            emit("-------------------------------------------")
            emit(files[node.id].rstrip("\n") + "\n")
    emit(f"Terminating job {JOB_ID}: the release tasks run...")
    sim.terminate()
    emit("")
    for line in sim.exit_code_lines(trees=False):
        emit(line)
    left = [str(n.shared / JOB_ID) for n in sim.nodes if (n.shared / JOB_ID).exists()]
    emit(f"Job data left in the nodes' shared folders: {', '.join(left) if left else 'none'}")
    kept = _kept(kept_in, azurite)
    emit(f"Logs and outputs kept in the Batch File Conventions layout ({len(kept)} objects):")
    alike = tuple(f"task{i:03d}/" for i in range(3, 9))  # tasks 3 to 8 look like tasks 1 and 2
    for line in tree(kept_in, [n for n in kept if not n.startswith(alike)]):
        emit(line)
    if any(n.startswith(alike) for n in kept):
        emit("    ... and task003/ to task008/, the same shape")
    emit(f"Logs kept in: {kept_in}")
    return DemoResult(sim, files, kept_in, kept)
