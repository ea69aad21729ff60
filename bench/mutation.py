#!/usr/bin/env python3
"""Mutation testing of nodekit's safety-critical code: which deliberate faults would the tests miss?

    python3 bench/mutation.py --jobs 2              # every target below -> bench/results-mutation.md
    python3 bench/mutation.py --only batchenv,plan  # some of them
    python3 bench/mutation.py --list                # the targets, their functions and mutant counts only
    python3 bench/mutation.py --rev COMMIT ...      # the files (and this table) of an earlier commit

Not part of the test suite and not run in CI (it lives in bench/, outside pytest's `testpaths`):
it takes about half an hour of the machine on 2 cores. Run it after changing a module of the table,
explain every survivor in bench/results-mutation.md (the "why" section is kept by hand), and put
the scores in the README's "Development" section.

The tool: Cosmic Ray (pinned below), installed by this script into a virtual environment of its
own, `.mutation/venv`, so that its dependencies never change what the tests run against (the
project's `.venv`, which `./dev test` creates; this script runs that first if it is missing, and
adds coverage to it). Why Cosmic Ray rather than mutmut 3, the other maintained tool: Cosmic Ray
writes each mutant into the module's file and runs an ordinary test command, so the mutant is what
*every* process imports, including the `python -m nodekit` and console-script subprocesses that
many tests start (nodekit killed mid-run, a disk that fills, generated command lines run as Batch
runs them). mutmut 3 switches mutants on with an environment variable inside trampolines and picks
the tests of each function from calls it saw in the pytest process itself, so code that only a
subprocess reaches would count as "no tests", and it leaves decorated functions alone. Cosmic Ray
also keeps every result in a resumable SQLite session that can be filtered before it runs.

How a run goes:

1. The tree (tracked and new files, as they are in the working folder, or those of `--rev`) is
   copied to `WORK/tree-N/` (WORK: `.mutation/`, or `--work`); Cosmic Ray mutates files there,
   never in the working folder. Tests run with that copy as the current folder and first on
   PYTHONPATH, so `import nodekit`, `python -m nodekit` and the console script all load the mutated
   copy (checked before the run).
2. Each target gets an Azurite of its own, shared by all its test runs (`NODEKIT_TEST_AZURITE_PORT`,
   read by tests/conftest.py) instead of one start per mutant, stopped by its process id after.
3. For each target: each test selector of the table runs once under coverage (subprocesses
   included), which gives, for every line of the module, the selectors that execute it; they must
   pass (else the run stops). Then a session of every mutant of the module, and everything outside
   the target's functions (when it names some), inside a type annotation (never evaluated here), or
   of an operator not in OPERATORS is marked skipped. Each mutant then runs, under `nice -n 19`,
   only the selectors that execute its line (`--run-mutant`, Cosmic Ray's test command), in the
   table's order with `pytest -x`; a mutant no selector reaches survives as "no test reaches it".
   A mutant whose tests fail or pass the time limit is killed; one whose tests pass survived.
4. Targets are taken one at a time by each of `--jobs` copies. Each target's outcome is saved as it
   ends (`WORK/NAME/outcome.json`); the report (`--out`) gives per target killed / survived / total,
   the minutes taken, and every survivor with its line and diff. `--report-from WORK...` writes the
   report again from saved outcomes (a later folder wins for a target).

The table TARGETS is the thing to edit: which module, which of its functions (`Class.method` or
`function`; none: the whole module), and which tests cover it, fastest and most telling first
(with `-x` a killed mutant stops at the first failing test). A function named there that no longer
exists stops the run, so a rename shows up at once: when the data path is rewritten, point
"landing" at the module that lands a file and at its functions.

OPERATORS keeps, like mutmut, one or two mutations per place rather than Cosmic Ray's every
operator for every operator: a comparison turned into its negation or its boundary, arithmetic to
its opposite, `and`/`or` swapped, a condition negated (a dropped check), True/False swapped (a link
followed), a number off by one, a loop that runs zero times, break/continue swapped, an except
clause that no longer catches.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"  # --work changes it (two runs at once need two)
TOOL = "cosmic-ray==8.7.0"
TOOL_VENV = ROOT / ".mutation" / "venv"
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"

OPERATORS = [
    r"core/ReplaceComparisonOperator_(Eq_NotEq|NotEq_Eq|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Is_IsNot|IsNot_Is)",
    r"core/ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_Div|Pow_Mul|BitOr_BitAnd"
    r"|BitAnd_BitOr|BitXor_BitAnd|LShift_RShift|RShift_LShift)",
    r"core/ReplaceUnaryOperator_(Delete_Not|USub_UAdd)",
    r"core/(AddNot|ReplaceTrueWithFalse|ReplaceFalseWithTrue|ReplaceAndWithOr|ReplaceOrWithAnd"
    r"|ReplaceBreakWithContinue|ReplaceContinueWithBreak|ExceptionReplacer|NumberReplacer|ZeroIterationForLoop)",
]


@dataclass(frozen=True)
class Target:
    """A module (or some of its functions) and the tests that cover it."""

    module: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()
    note: str = ""


S = "tests/test_safety.py::"  # the tests written for these targets come first: small, and aimed

LANDING_TESTS = (
    "tests/test_units.py::test_a_landing_over_a_stale_temporary_file_holds_only_what_arrived",
    "tests/test_units.py::test_a_landing_without_a_source_time_keeps_the_time_it_arrived",
    "tests/test_units.py::test_a_discarded_landing_closes_its_file_removes_it_and_may_be_discarded_again",
    "tests/test_units.py::test_a_landing_never_closes_a_descriptor_it_does_not_own",
    S + "test_landed_files_carry_the_sources_time_and_are_writable_without_the_cache",
    S + "test_a_body_damaged_once_in_transit_is_fetched_again_and_lands_whole",
    S + "test_a_blob_storage_no_longer_serves_fails_the_run_and_lands_nowhere",
    S + "test_two_local_sources_each_land_their_own_files",
    "tests/test_hostile.py::test_a_folder_prep_cannot_create_is_exit_8_naming_it",
    "tests/test_hostile.py::test_a_read_only_job_folder_is_exit_8_with_the_path_and_a_report",
    S + "test_a_folder_or_a_file_in_the_way_ends_with_8_and_is_left_alone",
    S + "test_prep_never_writes_through_a_linked_folder",
    S + "test_a_folder_replaced_by_a_link_after_prep_is_neither_written_nor_emptied",
    S + "test_a_wrong_md5_is_fetched_again_a_bounded_number_of_times_then_fails_with_7_and_lands_nowhere",
    S + "test_a_cached_object_that_cannot_be_linked_into_place_is_copied",
    S + "test_a_cached_file_with_a_folder_in_its_way_ends_with_8",
    S + "test_names_too_long_for_the_disk_are_refused_up_front",
    S + "test_a_url_without_a_modification_time_lands_with_the_time_of_its_download",
    S + "test_a_large_blob_is_fetched_once_in_ranges",
    S + "test_a_file_refused_once_on_the_fast_path_is_fetched_again_and_lands",
    S + "test_a_write_refused_by_the_disk_ends_with_8_and_leaves_no_partial_file",
    "tests/test_prep_robust.py::test_content_md5_mismatch_is_retried_then_fails_and_places_nothing",
    "tests/test_prep_storage.py",
    "tests/test_prep_fast.py::test_a_wrong_content_md5_is_caught_with_md5_source_too",
    "tests/test_prep_fast.py::test_md5_source_hashes_only_what_the_source_can_check",
    "tests/test_prep_fast.py::test_the_md5_of_a_large_file_follows_its_ranges_in_any_order",
    "tests/test_faults.py::test_no_blob_name_lets_prep_write_outside_the_job_folder",
    "tests/test_faults.py::test_a_disk_that_fills_ends_clearly_and_a_rerun_completes",
    "tests/test_cache.py::test_files_placed_from_the_cache_but_not_recorded_are_taken_as_they_are",
    "tests/test_cache.py::test_second_job_with_90_percent_in_common_downloads_only_the_rest",
    "tests/test_prep_robust.py::test_sigkill_during_a_large_download_then_rerun_repairs",
    "tests/test_sources.py::test_long_names_are_placed_with_short_temporary_names_or_refused_up_front",
    "tests/test_faults.py::test_a_blob_cut_half_way_resumes_from_what_is_on_disk",
)

TARGETS: dict[str, Target] = {
    "batchenv": Target(
        "nodekit/batchenv.py",
        note="the path guard: the job's folders, ensure_inside",
        tests=(
            S + "test_a_missing_batch_variable_names_the_option_that_stands_in_for_it",
            S + "test_an_unusable_shared_directory_is_refused_with_exit_3",
            S + "test_a_relative_dest_is_taken_inside_the_shared_directory_and_may_not_leave_it",
            S + "test_release_wipes_links_but_never_follows_them",
            "tests/test_release.py::test_unsafe_environment_is_refused_and_nothing_deleted",
            "tests/test_prep_errors.py",
            "tests/test_hostile.py",
            "tests/test_faults.py::test_no_job_id_lets_prep_or_release_leave_the_job_folders",
            "tests/test_release.py::test_symlink_in_job_folder_is_removed_not_followed",
        ),
    ),
    "release": Target(
        "nodekit/release.py",
        note="the wipe and release's keep-and-verify logic",
        functions=("ReleaseResult.exit_code", "job_places", "_own_tasks", "check_own_task", "_is_dir", "task_dirs",
                   "collect", "wipe_targets",
                   "_guard", "wipe", "_Uploader.__init__", "_Uploader.already_there", "_Uploader.free_name",
                   "_Uploader._names", "_Uploader.put", "_Uploader.write_manifest", "run_release"),
        tests=(
            S + "test_release_wipes_links_but_never_follows_them",
            S + "test_release_never_collects_a_log_or_dump_that_is_a_link",
            S + "test_a_wipe_target_holding_the_release_tasks_own_folder_is_refused_before_anything",
            S + "test_a_rerun_never_overwrites_what_an_earlier_run_kept",
            S + "test_an_object_changed_in_storage_since_is_not_taken_as_kept",
            S + "test_a_short_deadline_keeps_back_a_fifth_for_the_wipe_and_no_more",
            S + "test_a_dump_that_would_fit_the_deadline_but_not_before_the_wipes_reserve_is_skipped",
            S + "test_release_gives_up_on_storage_that_is_down_within_its_deadline",
            S + "test_storage_that_drops_the_content_md5_is_not_taken_as_verified_and_nothing_is_wiped",
            S + "test_release_takes_only_this_jobs_task_folders_and_what_is_there",
            S + "test_a_dry_run_lists_every_log_and_dump_and_what_it_would_delete",
            S + "test_release_without_a_task_working_folder_keeps_its_scratch_elsewhere",
            S + "test_a_manifest_that_is_not_json_is_rewritten",
            S + "test_a_node_id_that_cannot_name_a_folder_in_storage_is_refused",
            S + "test_a_manifest_of_another_node_in_this_nodes_folder_is_not_trusted",
            S + "test_every_dump_already_kept_is_recognised",
            S + "test_an_object_storage_cannot_find_right_after_its_upload_is_not_kept",
            S + "test_a_dump_that_does_not_read_back_leaves_an_incomplete_manifest_and_no_wipe",
            "tests/test_release.py::test_unsafe_environment_is_refused_and_nothing_deleted",
            "tests/test_release.py::test_dry_run_lists_and_changes_nothing",
            "tests/test_release.py::test_symlink_in_job_folder_is_removed_not_followed",
            "tests/test_release.py::test_release_keeps_logs_and_dump_then_wipes",
            "tests/test_release.py::test_storage_down_keeps_everything",
            "tests/test_release.py::test_deadline_too_short_for_the_dump",
            "tests/test_release.py::test_spec_release_section",
            "tests/test_faults.py::test_no_job_id_lets_prep_or_release_leave_the_job_folders",
            "tests/test_cache.py::test_release_leaves_other_jobs_and_the_cache_and_purge_removes_only_the_cache",
            "tests/test_faults.py::test_release_killed_during_its_upload_then_run_again_has_no_duplicates",
            "tests/test_hostile.py::test_a_wipe_that_cannot_delete_everything_deletes_the_rest_after_keeping_the_logs_"
            "and_ends_with_8",
            "tests/test_hostile.py::test_release_knows_its_own_folder_from_its_working_folder_or_where_it_runs",
            "tests/test_hostile.py::test_a_job_folder_that_is_a_link_the_wipe_cannot_remove_is_exit_8_and_its_target_"
            "is_untouched",
            "tests/test_hostile.py::test_a_task_that_wrote_only_to_stderr_has_it_kept",
            "tests/test_hostile.py::test_one_file_the_wipe_cannot_delete_is_named_and_its_folder_counted",
            "tests/test_release_keep.py",
            "tests/test_hostile.py::test_release_refuses_what_would_destroy_what_it_keeps",
            "tests/test_conventions.py",
        ),
    ),
    "plan": Target(
        "nodekit/plan.py",
        note="the plan (download, skip, remove, keep), the removals, the sweep of partial files",
        functions=("LocalStat.of", "decide", "plan", "_unlink_quietly", "sweep_partials", "remove_placed"),
        tests=(
            "tests/test_units.py::test_decide",
            S + "test_partial_files_of_a_killed_run_are_swept_and_nothing_else",
            S + "test_files_gone_from_the_source_are_removed_with_the_folders_they_emptied",
            S + "test_a_folder_replaced_by_a_link_after_prep_is_neither_written_nor_emptied",
            S + "test_a_warm_rerun_reports_what_was_verified_when_each_file_landed",
            S + "test_names_too_long_for_the_disk_are_refused_up_front",
            S + "test_a_cached_object_that_cannot_be_linked_into_place_is_copied",
            "tests/test_prep_storage.py",
            "tests/test_prep_robust.py::test_sigkill_during_a_large_download_then_rerun_repairs",
        ),
    ),
    "landing": Target(
        "nodekit/land.py",
        note="the landing of a file: temporary name, hashing, checks, mtime, rename, clean-up on failure",
        tests=LANDING_TESTS,
    ),
    "landing-transfer": Target(
        "nodekit/transfer.py",
        note="where transfer.py lands files: folders (never through a link), large files, the journal, the cache",
        functions=("Downloader._ensure_parent", "Downloader._final", "Downloader._landing", "Downloader._done",
                   "Downloader._part_done", "Downloader._finish_big", "Downloader._whole", "Downloader._record",
                   "Downloader.place_cached", "_hash_range", "_same_file"),
        tests=LANDING_TESTS,
    ),
    "redact": Target(
        "nodekit/redact.py",
        note="secret redaction: registered secrets, secret-looking parameters, the logging filter",
        tests=(
            S + "test_registered_secrets_are_scrubbed_whole_whatever_they_look_like",
            S + "test_urls_are_shown_without_query_or_user",
            S + "test_a_server_that_echoes_the_sas_gets_it_into_no_log_line_or_report",
            "tests/test_units.py::test_redaction",
            "tests/test_units.py::test_sas_is_kept_for_requests_but_not_shown",
            "tests/test_prep_robust.py::test_no_sas_or_key_in_any_output",
            "tests/test_hostile.py::test_control_characters_in_names_never_reach_the_terminal",
        ),
    ),
    "cache": Target(
        "nodekit/cache.py",
        note="the cache's tamper check: an object counts only while its stat matches its index line",
        functions=("NodeCache._load", "NodeCache.lookup", "NodeCache._link_in", "NodeCache._drop",
                   "NodeCache.repair"),
        tests=(
            S + "test_the_cache_hands_out_only_objects_whose_stat_still_matches_and_repairs_leftovers",
            S + "test_the_cache_index_is_rewritten_when_a_repair_or_its_history_calls_for_it_and_only_then",
            S + "test_landed_files_carry_the_sources_time_and_are_writable_without_the_cache",
            "tests/test_cache.py::test_a_task_writing_into_an_input_does_not_change_what_the_next_job_gets",
            "tests/test_cache.py::test_files_placed_from_the_cache_but_not_recorded_are_taken_as_they_are",
            "tests/test_cache.py::test_second_job_with_90_percent_in_common_downloads_only_the_rest",
            "tests/test_cache.py::test_the_budget_holds_and_files_in_use_are_never_evicted",
        ),
    ),
}


# -- set-up ------------------------------------------------------------------------------------------
def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(cmd, check=True, **{"text": True, **kw})


def ensure_tool() -> Path:
    """The tool's own virtual environment, with the pinned Cosmic Ray; returns its bin folder."""
    bin_dir = TOOL_VENV / "bin"
    version = TOOL.split("==")[1]
    probe = subprocess.run([str(bin_dir / "cosmic-ray"), "--version"], capture_output=True, text=True) \
        if (bin_dir / "cosmic-ray").exists() else None
    if probe is None or version not in probe.stdout + probe.stderr:
        _run([sys.executable, "-m", "venv", str(TOOL_VENV)])
        _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", TOOL])
    return bin_dir


def ensure_project() -> None:
    """The project's .venv and Azurite, as `./dev test` installs them."""
    if not PROJECT_PYTHON.exists() or not (ROOT / "node_modules" / ".bin" / "azurite-blob").exists():
        _run([str(ROOT / "dev"), "test", "--collect-only", "-q"], cwd=ROOT, stdout=subprocess.DEVNULL)


def copy_tree(dest: Path, rev: str | None = None) -> None:
    """The working folder's tracked and new files (not ignored ones), or those of commit `rev`, into
    `dest`; node_modules linked."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if rev:
        archive = _run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, text=False).stdout
        _run(["tar", "-x", "-C", str(dest)], input=archive, text=False)
    else:
        listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                      capture_output=True).stdout.split("\0")
        for rel in filter(None, listed):
            src = ROOT / rel
            if src.is_file() and not rel.startswith(".mutation"):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    (dest / "node_modules").symlink_to(ROOT / "node_modules")


def check_copy_is_imported(tree: Path, env: dict[str, str]) -> None:
    """`import nodekit` must load the copy: from the copy itself (pytest, `python -m nodekit`, whose
    sys.path starts with the current folder) and from anywhere else (the console script)."""
    probe = "import nodekit.cli; print(nodekit.cli.__file__)"
    for cwd in (tree, Path("/")):
        where = _run([str(PROJECT_PYTHON), "-c", probe], cwd=cwd, env=env, capture_output=True).stdout.strip()
        if not where.startswith(str(tree) + os.sep):
            raise SystemExit(f"run from {cwd}, nodekit would be imported from {where}, not from the copy {tree}")


def function_lines(path: Path, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """Line ranges (first, last) of the named functions (`Class.method` or `function`) of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: dict[str, tuple[int, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[prefix + child.name] = (child.lineno, child.end_lineno or child.lineno)
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(tree, "")
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"{path.relative_to(path.parents[1])}: no function {', '.join(missing)}: update TARGETS")
    return [found[n] for n in names]


# -- which tests reach which line ----------------------------------------------------------------------
COVERAGE = "coverage==7.17.3"  # in the project's .venv: it must run inside the processes under test
_COVERAGERC = """[run]
parallel = true
include = {tree}/nodekit/*
patch =
    _exit
    subprocess
"""


def ensure_coverage() -> None:
    probe = subprocess.run([str(PROJECT_PYTHON), "-c", "import coverage; print(coverage.__version__)"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != COVERAGE.split("==")[1]:
        _run([str(PROJECT_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check", COVERAGE])


def pytest_args(selectors: list[str] | tuple[str, ...]) -> list[str]:
    # hypothesis' pytest plugin costs 2 s of start-up per run (its @given tests run without it)
    return ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-o", "addopts=",
            "--no-header", "-W", "ignore", *selectors]


def measure_coverage(name: str, target: Target, tree: Path, env: dict[str, str]) -> tuple[dict[str, list[int]],
                                                                                            float]:
    """Run each test selector of `target` once under coverage (subprocesses included): for each line of
    the module, which selectors execute it; and how long all of them took. Stops if one fails."""
    work = WORK / name
    rc = work / "coveragerc"
    rc.write_text(_COVERAGERC.format(tree=tree), encoding="utf-8")
    module = str(tree / target.module)
    covered: dict[str, list[int]] = {}
    total = 0.0
    for i, selector in enumerate(target.tests):
        data = work / f"cov-{i}"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        cenv = {**env, "COVERAGE_FILE": str(data / ".coverage"), "COVERAGE_RCFILE": str(rc)}
        started = time.monotonic()
        res = subprocess.run(["nice", "-n", "19", str(PROJECT_PYTHON), "-m", "coverage", "run",
                              *pytest_args([selector])], cwd=tree, env=cenv, capture_output=True, text=True)
        total += time.monotonic() - started
        if res.returncode != 0:
            raise SystemExit(f"{name}: {selector} fails without any mutant:\n{res.stdout[-3000:]}{res.stderr[-2000:]}")
        _run([str(PROJECT_PYTHON), "-m", "coverage", "combine", "-q"], cwd=data, env=cenv, capture_output=True)
        lines = _run([str(PROJECT_PYTHON), "-c", "import coverage, json, sys; d = coverage.CoverageData(sys.argv[1]); "
                      "d.read(); print(json.dumps(sorted(d.lines(sys.argv[2]) or [])))",
                      str(data / ".coverage"), module], cwd=data, env=cenv, capture_output=True).stdout
        for line in json.loads(lines):
            covered.setdefault(str(line), []).append(i)
    return covered, total


def statement_starts(source: str) -> dict[int, list[int]]:
    """For every line, the first lines of the statements that contain it, innermost first (coverage
    reports a statement spread over several lines at its first line)."""
    out: dict[int, list[int]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                out.setdefault(line, []).append(node.lineno)
    return {line: sorted(set(starts), reverse=True) for line, starts in out.items()}


def run_mutant(name: str, work: Path) -> int:
    """Cosmic Ray's test command (run in the copy, with a mutant in place): the selectors that execute
    the mutated lines, in the table's order, with `pytest -x`; none: the mutant survives uncovered."""
    target = TARGETS[name]
    pristine = (work / "pristine.py").read_text(encoding="utf-8").splitlines()
    current = Path(target.module).read_text(encoding="utf-8").splitlines()
    changed = set()
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=pristine, b=current, autojunk=False).get_opcodes():
        if tag != "equal":
            changed.update(range(i1 + 1, max(i2, i1 + 1) + 1))
    covered = json.loads((work / "covered.json").read_text(encoding="utf-8"))
    starts = statement_starts("\n".join(pristine))
    chosen: set[int] = set()
    for line in changed:
        for start in [line, *starts.get(line, [])]:
            if str(start) in covered:
                chosen.update(covered[str(start)])
                break
    if not chosen:
        print(NOT_COVERED)
        return 0
    selectors = [target.tests[i] for i in sorted(chosen)]
    return subprocess.run([sys.executable, *pytest_args(selectors)]).returncode


NOT_COVERED = "no test of the table executes the mutated line"


# -- one target ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    target: Target
    killed: int = 0
    timeouts: int = 0
    survived: list[dict[str, Any]] = field(default_factory=list)
    incompetent: int = 0
    skipped: int = 0
    pending: int = 0  # not run: the run was stopped before them
    seconds: float = 0.0
    coverage_s: float = 0.0

    @property
    def total(self) -> int:
        return self.killed + len(self.survived)


def prepare_session(name: str, target: Target, tree: Path, bin_dir: Path, env: dict[str, str],
                    timeout: float) -> tuple[Path, Path, int]:
    """(config, session, mutants to run) of a target: every mutant, then the filters."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    exclude = "^(?!(" + "|".join(OPERATORS) + ")$)"
    config: dict[str, Any] = {
        "module-path": target.module,
        "timeout": timeout,
        "excluded-modules": [],
        "test-command": f"{PROJECT_PYTHON} bench/mutation.py --run-mutant {name} --work {work}",
        "distributor": {"name": "local"},
        "filters": {"operators-filter": {"exclude-operators": [exclude]}},
    }
    if target.functions:
        ranges = function_lines(tree / target.module, target.functions)
        config["filters"]["line-filter"] = {"lines": {target.module: [f"{a}-{b}" for a, b in ranges]}}
    cfg = work / "config.toml"
    cfg.write_text(_toml({"cosmic-ray": config}), encoding="utf-8")
    session = work / "session.sqlite"
    session.unlink(missing_ok=True)
    quiet = {"cwd": tree, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    _run([str(bin_dir / "cosmic-ray"), "init", str(cfg), str(session)], **quiet)
    _run([str(bin_dir / "cr-filter-operators"), str(session), str(cfg)], **quiet)
    if target.functions:
        _run([str(bin_dir / "cr-filter-lines"), str(session), "--config", str(cfg)], **quiet)
    spans = json.dumps(annotation_spans(tree / target.module))
    _run([str(bin_dir / "python"), "-c", _SKIP_ANNOTATIONS, str(session), spans], **quiet)
    return cfg, session, _count_pending(bin_dir, session, tree, env)


def annotation_spans(path: Path) -> list[tuple[int, int, int, int]]:
    """(line, column, end line, end column) of every type annotation: with `from __future__ import
    annotations` (every module here) they are never evaluated, so a mutant there is equivalent."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        notes: list[ast.expr | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            notes = [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
            notes.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            notes = [node.annotation]
        spans += [(n.lineno, n.col_offset, n.end_lineno or n.lineno, n.end_col_offset or 0) for n in notes if n]
    return spans


# Run by the tool's interpreter: marks as skipped the pending mutants that lie inside an annotation.
_SKIP_ANNOTATIONS = """
import json, sys
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult
spans = json.loads(sys.argv[2])
with use_db(sys.argv[1], WorkDB.Mode.open) as db:
    for item in list(db.pending_work_items):
        m = item.mutations[0]
        start, end = tuple(m.start_pos), tuple(m.end_pos)
        if any((a, b) <= start and end <= (c, d) for a, b, c, d in spans):
            db.set_result(item.job_id, WorkResult(output="in a type annotation",
                                                  worker_outcome=WorkerOutcome.SKIPPED))
"""


def run_target(name: str, target: Target, tree: Path, bin_dir: Path, env: dict[str, str], log: Any) -> Outcome:
    out = Outcome(name, target)
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy2(tree / target.module, work / "pristine.py")
    started = time.monotonic()
    covered, tests_s = measure_coverage(name, target, tree, env)
    (work / "covered.json").write_text(json.dumps(covered), encoding="utf-8")
    out.coverage_s = time.monotonic() - started
    timeout = max(60.0, 3 * tests_s)
    cfg, session, pending = prepare_session(name, target, tree, bin_dir, env, timeout)
    log(f"{name}: {pending} mutants; its tests took {tests_s:.0f} s (limit per mutant {timeout:.0f} s)")
    started = time.monotonic()
    _run(["nice", "-n", "19", str(bin_dir / "cosmic-ray"), "exec", str(cfg), str(session)], cwd=tree, env=env)
    out.seconds = time.monotonic() - started
    read_session(out, _dump(bin_dir, session, tree, env))
    log(f"{name}: killed {out.killed}/{out.total} in {out.seconds:.0f} s")
    (work / "outcome.json").write_text(json.dumps({k: v for k, v in out.__dict__.items() if k != "target"}),
                                       encoding="utf-8")
    return out


def read_session(out: Outcome, items: list[tuple[dict[str, Any], Any]]) -> None:
    """Count a session's results into `out`; a mutant without a result (a run stopped early) is `pending`."""
    for item, result in items:
        if result is None:
            out.pending += 1
            continue
        if result.get("worker_outcome") == "skipped":
            out.skipped += 1
            continue
        outcome = result.get("test_outcome")
        output = (result.get("output") or "").strip()
        if outcome == "survived":
            m = item["mutations"][0]
            out.survived.append({"line": m["start_pos"][0], "operator": m["operator_name"],
                                 "function": m.get("definition_name"), "diff": result.get("diff") or "",
                                 "uncovered": NOT_COVERED in output})
        elif outcome == "killed":
            out.killed += 1
            if output == "timeout":
                out.timeouts += 1
        else:
            out.incompetent += 1
    out.survived.sort(key=lambda s: (s["line"], s["operator"]))


def _dump(bin_dir: Path, session: Path, tree: Path, env: dict[str, str]) -> list[tuple[dict[str, Any], Any]]:
    text = _run([str(bin_dir / "cosmic-ray"), "dump", str(session)], cwd=tree, env=env, capture_output=True).stdout
    return [tuple(json.loads(line)) for line in text.splitlines() if line.strip()]  # type: ignore[misc]


def _count_pending(bin_dir: Path, session: Path, tree: Path, env: dict[str, str]) -> int:
    return sum(1 for _, result in _dump(bin_dir, session, tree, env) if result is None)


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for the config: scalars, lists of strings, nested tables."""
    lines, tables = [], []
    for key, value in data.items():
        qkey = json.dumps(key) if re.search(r"[^A-Za-z0-9_-]", key) else key
        if isinstance(value, dict):
            tables.append(_toml(value, f"{prefix}{qkey}."))
        else:
            lines.append(f"{qkey} = {json.dumps(value)}")
    head = f"[{prefix[:-1]}]\n" if prefix else ""
    return head + "".join(line + "\n" for line in lines) + "\n" + "".join(tables)


# -- leftovers and the report ---------------------------------------------------------------------------
def stop_leftovers(marker: str) -> None:
    """End processes this run started that outlived a timed-out test run (found by their marker variable)."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"NODEKIT_MUTATION_RUN={marker}".encode() in environ.split(b"\0"):
            try:
                os.kill(int(proc.name), 9)
            except ProcessLookupError:
                pass


def report(outcomes: list[Outcome], how: str) -> str:
    killed = sum(o.killed for o in outcomes)
    total = sum(o.total for o in outcomes)
    lines = [
        "# Mutation testing of nodekit's safety-critical code",
        "",
        how,
        "",
        "| target | module | mutants | killed | survived (no test reaches it) | score | timeouts (counted killed) "
        "| not run (run stopped) | minutes (coverage + mutants) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        score = f"{100 * o.killed / o.total:.1f}%" if o.total else "-"
        uncovered = sum(1 for s in o.survived if s["uncovered"])
        lines.append(f"| {o.name} | `{o.target.module}` | {o.total} | {o.killed} | {len(o.survived)} ({uncovered}) | "
                     f"{score} | {o.timeouts} | {o.pending} | {o.coverage_s / 60:.1f} + {o.seconds / 60:.1f} |")
    lines.append(f"| **all** | | {total} | {killed} | {total - killed} | "
                 f"**{100 * killed / max(total, 1):.1f}%** | {sum(o.timeouts for o in outcomes)} | "
                 f"{sum(o.pending for o in outcomes)} | "
                 f"{sum(o.coverage_s + o.seconds for o in outcomes) / 60:.1f} |")
    for o in outcomes:
        lines += ["", f"## {o.name}: {o.target.note}", "",
                  f"Functions: {', '.join(o.target.functions) if o.target.functions else 'the whole module'}.",
                  "", "Tests: " + ", ".join("`" + t + "`" for t in o.target.tests) + ".", ""]
        if o.incompetent:
            lines += [f"({o.incompetent} mutants were incompetent: not counted.)", ""]
        if not o.survived:
            lines.append("No survivor.")
        for s in o.survived:
            diff = "\n".join(d for d in s["diff"].splitlines() if d.startswith(("+", "-"))
                             and not d.startswith(("+++", "---")))
            where = " — no test of the table executes it" if s["uncovered"] else ""
            lines += [f"- line {s['line']} ({s['function']}), {s['operator'].removeprefix('core/')}{where}:", "",
                      "  ```diff", *("  " + d for d in diff.splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def targets_at(rev: str) -> dict[str, Target]:
    """The table of targets as it was in commit `rev` (its tests are the ones that existed then)."""
    text = _run(["git", "show", f"{rev}:bench/mutation.py"], cwd=ROOT, capture_output=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutation_at_rev.py"
        path.write_text(text, encoding="utf-8")
        spec = importlib.util.spec_from_file_location("mutation_at_rev", path)
        assert spec is not None and spec.loader is not None
        then = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(then)
    return {name: Target(t.module, tuple(t.tests), tuple(t.functions), t.note) for name, t in then.TARGETS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated target names (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once, each in its own copy")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results-mutation.md")
    parser.add_argument("--list", action="store_true", help="show the targets and their mutant counts; run nothing")
    parser.add_argument("--run-mutant", metavar="TARGET", help=argparse.SUPPRESS)  # Cosmic Ray's test command
    parser.add_argument("--work", type=Path, help="working folder (default .mutation/)")
    parser.add_argument("--rev", help="mutate the files of this commit instead of the working folder's")
    parser.add_argument("--report-from", type=Path, nargs="+", metavar="WORK",
                        help="only write the report, from the outcomes recorded in these working folders")
    args = parser.parse_args()
    if args.run_mutant:
        sys.exit(run_mutant(args.run_mutant, args.work))
    global WORK, TARGETS
    WORK = (args.work or WORK).resolve()
    names = args.only.split(",") if args.only else list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.report_from:
        if args.rev:
            TARGETS = targets_at(args.rev)
        found = {}
        for folder in args.report_from:
            for n in names:
                if (folder / n / "outcome.json").exists():
                    data = json.loads((folder / n / "outcome.json").read_text(encoding="utf-8"))
                    found[n] = Outcome(target=TARGETS[n], **data)
                elif (folder / n / "session.sqlite").exists():  # a run stopped early: what it did
                    found[n] = Outcome(n, TARGETS[n])
                    read_session(found[n], _dump(ensure_tool(), folder / n / "session.sqlite", ROOT,
                                                 dict(os.environ)))
        folders = ", ".join(str(f) for f in args.report_from)
        how = (f"Assembled with `--report-from` from the outcomes saved in {folders}"
               f"{f' (commit {args.rev})' if args.rev else ''}, {TOOL}, on {os.cpu_count()} cores; "
               f"the minutes are each target's own.")
        args.out.write_text(report([found[n] for n in names if n in found], how), encoding="utf-8")
        return
    if args.list:
        bin_dir = ensure_tool()
        WORK = Path(tempfile.mkdtemp(prefix="nodekit-mutation-list-"))  # never a running session's folder
        for n in names:
            t = TARGETS[n]
            ranges = function_lines(ROOT / t.module, t.functions) if t.functions else "whole module"
            _, _, count = prepare_session(n, t, ROOT, bin_dir, dict(os.environ), 60.0)
            print(f"{n}: {t.module} {ranges}: {count} mutants\n    tests: {' '.join(t.tests)}")
        shutil.rmtree(WORK)
        return

    ensure_project()
    ensure_coverage()
    bin_dir = ensure_tool()
    marker = uuid.uuid4().hex
    sys.path.insert(0, str(ROOT / "tests"))
    from azurite import start_azurite, stop_process

    began = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - began:7.1f} s] {msg}", flush=True)

    outcomes: dict[str, Outcome] = {}
    jobs = max(1, min(args.jobs, len(names)))
    trees = [WORK / f"tree-{i}" for i in range(jobs)]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_BATCH_", "AZURE_", "NODEKIT_"))}
    for tree in trees:
        copy_tree(tree, args.rev)
        check_copy_is_imported(tree, {**base_env, "PYTHONPATH": str(tree)})
    if args.rev:  # that commit's table: its tests are the ones that exist there
        TARGETS = targets_at(args.rev)
    todo = list(names)  # taken one at a time by whichever copy is free
    todo_lock = threading.Lock()

    def worker(i: int) -> None:
        while True:
            with todo_lock:
                if not todo:
                    return
                n = todo.pop(0)
            # an Azurite of its own per target: the emulator keeps every blob in memory
            server, proc = start_azurite()
            env = {**base_env, "PYTHONPATH": str(trees[i]), "NODEKIT_TEST_AZURITE_PORT": str(server.port),
                   "NODEKIT_MUTATION_RUN": marker, "PYTHONDONTWRITEBYTECODE": "1"}
            try:
                outcomes[n] = run_target(n, TARGETS[n], trees[i], bin_dir, env, log)
            finally:
                stop_process(proc)

    try:
        with ThreadPoolExecutor(jobs) as pool:
            for fut in [pool.submit(worker, i) for i in range(jobs)]:
                fut.result()
    finally:
        stop_leftovers(marker)
    wall = time.monotonic() - began
    how = (f"`python3 bench/mutation.py{' --rev ' + args.rev if args.rev else ''}` ({TOOL}; {jobs} target(s) at a "
           f"time under `nice -n 19`) on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}: wall time "
           f"{wall / 60:.1f} min.")
    text = report([outcomes[n] for n in names if n in outcomes], how)
    args.out.write_text(text, encoding="utf-8")
    log(f"done in {wall / 60:.1f} min: {args.out}")


if __name__ == "__main__":
    main()
