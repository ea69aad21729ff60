"""A pool's job lifecycle on one machine: preparation → tasks → release, with Batch's rules.

Each simulated node gets Batch's folder layout (shared/, startup/, workitems/<job>/job-1/<task>/
with wd/, stdout.txt, stderr.txt) and the AZ_BATCH_* variables Batch sets for each kind of task.
Command lines run as Batch runs them: split into arguments (POSIX rules) and executed with no
shell added. Rules followed (see shared/reference/batch.md):

- the preparation task runs on a node before its first task, only on nodes that get a task;
  a non-zero exit is retried up to maxTaskRetryCount; with waitForSuccess a failed one keeps the
  node from running the job's tasks; maxWallClockTime kills it;
- tasks are spread over nodes and slots from one queue: a node that finishes early takes more, and a
  task taken by a node whose preparation task failed goes back to the queue for the other nodes;
- ids (job, tasks) are checked as Batch checks them, so none can write outside `root`;
- a simulated reboot re-runs the preparation task before the node's next task (unless
  rerunOnNodeRebootAfterSuccess is false and it had succeeded);
- on termination the release task runs on each node that ran the preparation task, killed at
  its maxWallClockTime (at most 15 minutes), and never on a node that did not.

`time_scale` multiplies every wall-clock limit, so that tests can see a kill in a second.
Raises UsageError for a job JSON it cannot run; never touches anything outside `root`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodekit.batchenv import is_batch_id
from nodekit.errors import UsageError
from nodekit.spec import parse_duration, read_json

log = logging.getLogger(__name__)

RELEASE_MAX_S = 15 * 60.0
_SHELL_SYNTAX = re.compile(r"(\$\w|\$\{|[|&;<>`]|\*)")
_SHELLS = {"/bin/bash", "/bin/sh", "bash", "sh", "/usr/bin/bash", "/usr/bin/env"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of the job (from a job JSON's prep/release or a "Task - Add Collection" body)."""

    id: str
    command_line: str
    env: tuple[tuple[str, str], ...] = ()
    max_wall_clock: float | None = None
    max_retries: int = 0
    wait_for_success: bool = True
    rerun_after_reboot: bool = True


@dataclass
class TaskResult:
    node: str
    task: str
    exit_code: int | None = None
    retries: int = 0
    duration_s: float = 0.0
    failure: str | None = None
    runs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "task": self.task, "exit_code": self.exit_code, "retries": self.retries,
                "duration_s": round(self.duration_s, 3), "failure": self.failure, "runs": self.runs}


def _duration(value: Any, what: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return parse_duration(str(value), what=what, maximum=10 * 365 * 86400)
    except UsageError as err:
        raise UsageError(f"job JSON: {err}") from None


def _env_pairs(items: Any, where: str) -> tuple[tuple[str, str], ...]:
    if items in (None, []):
        return ()
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        raise UsageError(f"{where}.environmentSettings must be a list of {{name, value}}.")
    return tuple((str(i["name"]), str(i.get("value", ""))) for i in items)


def _check_id(value: Any, what: str) -> str:
    """`value` if Batch would accept it as an id (letters, digits, '-', '_', at most 64), else UsageError."""
    if not isinstance(value, str) or not is_batch_id(value):
        raise UsageError(f"{what} {value!r} is not a valid Batch id (letters, digits, '-' and '_', at most 64 "
                         "characters): Batch would refuse it.")
    return value


def parse_job(job: Mapping[str, Any]) -> tuple[str, TaskSpec | None, TaskSpec | None]:
    """(job id, preparation task, release task) from a REST "Job - Add" body."""
    if not isinstance(job, dict) or not isinstance(job.get("id"), str):
        raise UsageError("job JSON: it needs an 'id' (the REST \"Job - Add\" body).")
    _check_id(job["id"], "job JSON: the job id")
    prep = release = None
    p = job.get("jobPreparationTask")
    if p is not None:
        if not isinstance(p, dict) or not isinstance(p.get("commandLine"), str):
            raise UsageError("job JSON: jobPreparationTask needs a commandLine.")
        c = p.get("constraints") or {}
        prep = TaskSpec(
            id=_check_id(p.get("id", "jobpreparation"), "job JSON: the jobPreparationTask id"),
            command_line=p["commandLine"],
            env=_env_pairs(p.get("environmentSettings"), "jobPreparationTask"),
            max_wall_clock=_duration(c.get("maxWallClockTime"), "jobPreparationTask maxWallClockTime"),
            max_retries=int(c.get("maxTaskRetryCount", 0)),
            wait_for_success=bool(p.get("waitForSuccess", True)),
            rerun_after_reboot=bool(p.get("rerunOnNodeRebootAfterSuccess", True)),
        )
    r = job.get("jobReleaseTask")
    if r is not None:
        if prep is None:
            raise UsageError("job JSON: a job cannot have a release task without a preparation task.")
        if not isinstance(r, dict) or not isinstance(r.get("commandLine"), str):
            raise UsageError("job JSON: jobReleaseTask needs a commandLine.")
        limit = _duration(r.get("maxWallClockTime"), "jobReleaseTask maxWallClockTime") or RELEASE_MAX_S
        if limit > RELEASE_MAX_S:
            raise UsageError("job JSON: jobReleaseTask maxWallClockTime is over 15 minutes; Batch refuses that.")
        release = TaskSpec(id=_check_id(r.get("id", "jobrelease"), "job JSON: the jobReleaseTask id"),
                           command_line=r["commandLine"],
                           env=_env_pairs(r.get("environmentSettings"), "jobReleaseTask"), max_wall_clock=limit)
    return job["id"], prep, release


def parse_tasks(data: Any) -> list[TaskSpec]:
    """Tasks from a "Task - Add Collection" body ({"value": [...]}) or a plain list."""
    items = data.get("value") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise UsageError("tasks JSON: give {\"value\": [{\"id\": ..., \"commandLine\": ...}, ...]}.")
    tasks = []
    seen: set[str] = set()
    for i, t in enumerate(items):
        if not isinstance(t, dict) or not isinstance(t.get("id"), str) or not isinstance(t.get("commandLine"), str):
            raise UsageError(f"tasks JSON: item {i} needs an 'id' and a 'commandLine'.")
        _check_id(t["id"], f"tasks JSON: item {i}'s id")
        if t["id"].lower() in seen:
            raise UsageError(f"tasks JSON: task id {t['id']!r} is given twice (Batch ids are case-insensitive).")
        seen.add(t["id"].lower())
        c = t.get("constraints") or {}
        tasks.append(TaskSpec(t["id"], t["commandLine"], _env_pairs(t.get("environmentSettings"), f"task {t['id']}"),
                              _duration(c.get("maxWallClockTime"), f"task {t['id']} maxWallClockTime"),
                              int(c.get("maxTaskRetryCount", 0))))
    return tasks


def split_command_line(line: str) -> list[str]:
    """Split a command line the way Batch does on Linux: POSIX word rules, no expansion."""
    try:
        return shlex.split(line)
    except ValueError as err:
        raise UsageError(f"command line {line!r} cannot be split ({err}).") from None


@dataclass
class Node:
    """One simulated compute node."""

    id: str
    root: Path
    prep_state: str = "none"  # none | running | succeeded | failed
    prep_ran: bool = False
    needs_prep: bool = True
    tasks_done: int = 0
    blocked: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    prep_result: TaskResult | None = None
    release_result: TaskResult | None = None

    @property
    def shared(self) -> Path:
        return self.root / "shared"


class Simulation:
    """Build nodes, run the job's tasks with its preparation task, then terminate (release)."""

    def __init__(self, root: Path, job_id: str, prep: TaskSpec | None, release: TaskSpec | None,
                 nodes: int = 2, slots: int = 1, time_scale: float = 1.0, pool_id: str = "simulated-pool",
                 base_env: Mapping[str, str] | None = None, reboots: Mapping[str, int] | None = None,
                 emit: Callable[[str], None] = print, install_nodekit: bool = True) -> None:
        if nodes < 1 or slots < 1:
            raise UsageError("--nodes and --slots must be at least 1.")
        if time_scale <= 0:
            raise UsageError("--time-scale must be more than zero.")
        self.root = root.resolve()  # Batch variables hold absolute paths
        self.job_id = job_id
        self.prep = prep
        self.release = release
        self.slots = slots
        self.scale = time_scale
        self.pool_id = pool_id
        self.base_env = dict(base_env or {})
        self.reboots = dict(reboots or {})
        self.emit = emit
        self.nodes = [Node(f"tvm-{i + 1}", self.root / f"tvm-{i + 1}") for i in range(nodes)]
        unknown = sorted(set(self.reboots) - {n.id for n in self.nodes})
        if unknown:
            raise UsageError(f"--reboot {unknown[0]}: there is no such node (the pool has "
                             f"{', '.join(n.id for n in self.nodes)}).")
        _check_id(job_id, "the job id")
        self.results: list[TaskResult] = []
        self._results_lock = threading.Lock()
        for node in self.nodes:
            for d in (node.shared, node.root / "startup" / "wd", node.root / "applications"):
                d.mkdir(parents=True, exist_ok=True)
            if install_nodekit:
                self._install_nodekit(node)

    def _install_nodekit(self, node: Node) -> None:
        """What the generated start task installs: a `nodekit` in SHARED/.nodekit/venv/bin."""
        exe = node.shared / ".nodekit" / "venv" / "bin" / "nodekit"
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m nodekit \"$@\"\n")
        exe.chmod(0o755)

    # -- folders and variables ----------------------------------------------------------------
    def task_dir(self, node: Node, task_id: str) -> Path:
        return node.root / "workitems" / self.job_id / "job-1" / task_id

    def _env(self, node: Node, task: TaskSpec, kind: str) -> dict[str, str]:
        tdir = self.task_dir(node, task.id)
        env = {
            **self.base_env,
            "AZ_BATCH_NODE_ROOT_DIR": str(node.root),
            "AZ_BATCH_NODE_SHARED_DIR": str(node.shared),
            "AZ_BATCH_NODE_STARTUP_DIR": str(node.root / "startup"),
            "AZ_BATCH_NODE_ID": node.id,
            "AZ_BATCH_POOL_ID": self.pool_id,
            "AZ_BATCH_ACCOUNT_NAME": "simulated",
            "AZ_BATCH_ACCOUNT_URL": "https://simulated.batch.local",
            "AZ_BATCH_NODE_IS_DEDICATED": "true",
            "AZ_BATCH_JOB_ID": self.job_id,
            "AZ_BATCH_TASK_ID": task.id,
            "AZ_BATCH_TASK_DIR": str(tdir),
            "AZ_BATCH_TASK_WORKING_DIR": str(tdir / "wd"),
            "AZ_BATCH_TASK_USER": "_azbatch",
        }
        if kind != "prep" and self.prep is not None:
            prep_dir = self.task_dir(node, self.prep.id)
            env["AZ_BATCH_JOB_PREP_DIR"] = str(prep_dir)
            env["AZ_BATCH_JOB_PREP_WORKING_DIR"] = str(prep_dir / "wd")
        env.update(dict(task.env))
        return env

    # -- running one command line -------------------------------------------------------------
    def _execute(self, node: Node, task: TaskSpec, kind: str, result: TaskResult) -> None:
        """Run `task` on `node` with its retries; fill `result`."""
        tdir = self.task_dir(node, task.id)
        (tdir / "wd").mkdir(parents=True, exist_ok=True)
        argv = split_command_line(task.command_line)
        if argv and argv[0] not in _SHELLS and _SHELL_SYNTAX.search(task.command_line):
            log.warning("%s %s on %s: the command line has shell syntax (%s) but Batch runs it without a shell, "
                        "so nothing is expanded or redirected; wrap it in /bin/bash -c '...'",
                        kind, task.id, node.id, _SHELL_SYNTAX.search(task.command_line).group(0))  # type: ignore[union-attr]
        limit = task.max_wall_clock * self.scale if task.max_wall_clock else None
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            code, failure = self._run_once(argv, tdir, self._env(node, task, kind), limit)
            result.exit_code, result.failure = code, failure
            if code == 0 or failure == "maxWallClockTime exceeded" or attempts > task.max_retries:
                break
        result.retries = attempts - 1
        result.runs += 1
        result.duration_s = time.monotonic() - started

    def _run_once(self, argv: list[str], tdir: Path, env: dict[str, str], limit: float | None) -> \
            tuple[int | None, str | None]:
        with open(tdir / "stdout.txt", "ab") as out, open(tdir / "stderr.txt", "ab") as err:
            try:
                proc = subprocess.Popen(argv, cwd=tdir / "wd", env=env, stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:  # Batch: the task fails to start
                err.write(f"could not start {argv[0] if argv else '(empty)'}: {exc.strerror}\n".encode())
                return None, f"could not start: {exc.strerror}"
            try:
                return proc.wait(timeout=limit), None
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                return proc.returncode, "maxWallClockTime exceeded"

    # -- the lifecycle ------------------------------------------------------------------------
    def _ensure_prep(self, node: Node) -> bool:
        """Run the preparation task on `node` if it must run now; True if the node may run tasks."""
        if self.prep is None:
            return True
        with node.lock:
            if node.needs_prep:
                node.needs_prep = False
                node.prep_ran = True
                if node.prep_result is None:
                    node.prep_result = TaskResult(node.id, self.prep.id)
                if self.prep.wait_for_success:
                    self._execute(node, self.prep, "prep", node.prep_result)
                    node.prep_state = "succeeded" if node.prep_result.exit_code == 0 else "failed"
                else:
                    node.prep_state = "running"
                    threading.Thread(target=self._prep_background, args=(node,), daemon=True).start()
            if node.prep_state == "failed" and self.prep.wait_for_success:
                if not node.blocked:
                    node.blocked = True
                    self.emit(f"{node.id}: the preparation task failed (exit {node.prep_result.exit_code}"  # type: ignore[union-attr]
                              f"{', ' + node.prep_result.failure if node.prep_result.failure else ''}): "  # type: ignore[union-attr]
                              "no task of this job runs on this node")
                return False
            return True

    def _prep_background(self, node: Node) -> None:
        assert self.prep is not None and node.prep_result is not None
        self._execute(node, self.prep, "prep", node.prep_result)
        node.prep_state = "succeeded" if node.prep_result.exit_code == 0 else "failed"

    def _reboot(self, node: Node) -> None:
        self.emit(f"{node.id}: rebooting (simulated)")
        with node.lock:
            if self.prep is not None and (self.prep.rerun_after_reboot or node.prep_state != "succeeded"):
                node.needs_prep = True

    def run_tasks(self, tasks: list[TaskSpec]) -> list[TaskResult]:
        """Run every task on the pool (nodes and slots pulling from one queue); returns their results.

        A node whose preparation task failed (waitForSuccess) puts the task it took back in the queue
        and takes no more; the other nodes' slots wait while a task may still come back, so they take it.
        """
        import collections

        for t in tasks:
            _check_id(t.id, "task id")
        pending = collections.deque(tasks)
        taken = 0  # tasks a slot has taken and not finished (or put back)
        cond = threading.Condition()
        workers = []

        def next_task() -> TaskSpec | None:
            nonlocal taken
            with cond:
                while not pending and taken:
                    cond.wait()
                if not pending:
                    return None
                taken += 1
                return pending.popleft()

        def done(task: TaskSpec | None) -> None:
            nonlocal taken
            with cond:
                taken -= 1
                if task is not None:
                    pending.appendleft(task)
                cond.notify_all()

        def work(node: Node) -> None:
            while (task := next_task()) is not None:
                if not self._ensure_prep(node):
                    done(task)  # back to the queue: another node may take it
                    return
                result = TaskResult(node.id, task.id)
                try:
                    self._execute(node, task, "task", result)
                finally:
                    done(None)
                with self._results_lock:
                    self.results.append(result)
                with node.lock:
                    node.tasks_done += 1
                    reboot = self.reboots.get(node.id) == node.tasks_done
                if reboot:
                    self._reboot(node)

        for node in self.nodes:
            for slot in range(self.slots):
                th = threading.Thread(target=work, args=(node,), name=f"{node.id}-slot{slot}")
                th.start()
                workers.append(th)
                time.sleep(0.001)
        for th in workers:
            th.join()
        for t in pending:  # no node could take them (every preparation task failed)
            self.results.append(TaskResult("-", t.id, failure="not run: no node could run it"))
        return self.results

    def terminate(self) -> None:
        """Run the release task on every node that ran the preparation task (and only there)."""
        if self.release is None:
            return
        threads = []
        for node in self.nodes:
            if not node.prep_ran:
                continue
            node.release_result = TaskResult(node.id, self.release.id)
            th = threading.Thread(target=self._execute, args=(node, self.release, "release", node.release_result))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()

    # -- reporting ----------------------------------------------------------------------------
    def exit_code_lines(self, trees: bool = True) -> list[str]:
        """Each node's preparation and release exit codes, and where its release kept what (with `trees`,
        the conventions layout's objects drawn as a tree)."""
        lines = []
        for node in self.nodes:
            prep = _code(node.prep_result)
            release = _code(node.release_result)
            lines += [f"{node.id}:", f"  Prep task exit code:    {prep}", f"  Release task exit code: {release}",
                      *self._kept_lines(node, trees), ""]
        return lines

    def release_report(self, node: Node) -> dict[str, Any] | None:
        """What `nodekit release` wrote in its default report on `node` (its working folder), if it ran there."""
        if self.release is None or node.release_result is None:
            return None
        path = self.task_dir(node, self.release.id) / "wd" / "nodekit-release.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _kept_lines(self, node: Node, trees: bool) -> list[str]:
        """Where nodekit's release kept this node's files, as its report says (nothing for other release tasks)."""
        rep = self.release_report(node)
        if rep is None or "destination" not in rep:
            return []
        names = sorted({o["name"] for o in rep.get("uploaded", []) + rep.get("already_uploaded", [])})
        layout = rep.get("layout", "nodekit")
        lines = [f"  Release kept:           {len(names)} objects in {rep['destination']} ({layout} layout)"]
        if trees and layout == "conventions" and len(names) <= TREE_MAX:  # the standard's tree: task, kind, files
            from nodekit.conventions import tree

            lines += [f"    {line}" for line in tree(rep["destination"], names)]
        for c in rep.get("conflicts", []):
            lines.append(f"    conflict: {c['name']} differs from this node's copy, kept as {c['kept_as']}")
        return lines

    def summary(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "root": str(self.root),
            "nodes": [{"node": n.id, "preparation": n.prep_result.as_dict() if n.prep_result else None,
                       "release": n.release_result.as_dict() if n.release_result else None,
                       "tasks": n.tasks_done} for n in self.nodes],
            "tasks": [r.as_dict() for r in sorted(self.results, key=lambda r: r.task)],
        }


TREE_MAX = 60  # a node's kept objects drawn as a tree up to this many


def _code(result: TaskResult | None) -> str:
    if result is None:
        return "- (did not run)"
    if result.failure:
        return f"{result.exit_code} ({result.failure})"
    return str(result.exit_code)


def load_json(path: str | Path, what: str) -> Any:
    """A JSON file (UTF-8, -16 or -32, with or without a byte-order mark); UsageError if it cannot be read."""
    return read_json(path, what)
