"""Promise mutants: break one promise at a time in a scratch copy and see its tests catch it.

`bash scripts/mutants` reads every `tests/mutants/*.toml` (format: tests/mutants/README.md),
checks the list against the tree first (unique names, files that exist, each `find` text
occurring exactly `count` times: a mutant whose text is gone is *stale*, the list must follow
the code), then, for each mutant, copies the working tree (tracked and untracked files, not
ignored ones: what `git status` sees) into a temporary folder, applies the change there and
runs `pytest` on the mutant's tests in that folder. A mutant is *caught* when one of its tests
fails, *survived* when all pass. Anything else (a test id pytest cannot find, a collection
error, a run past its deadline) is an *error*: it proves nothing either way.

The scratch run must import the scratch copy of notifyd, in pytest and in every
`python -m notifyd` a test starts, although .venv holds an editable install of the original
tree: that install is a meta-path finder appended after the path finders, so the scratch root
first on the path (the working directory of pytest and of the tests' subprocesses, and
PYTHONPATH) wins. `scripts/mutants_plugin.py` checks it in every run before any test (the
canary) and the whole run stops if it does not hold.

Exit status: 0 when every mutant was caught; 1 when one survived, is stale or errored; 2 for
a list that cannot be read at all, or a failed canary.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LIST_DIR = Path("tests/mutants")
PLUGIN = Path(__file__).resolve().parent / "mutants_plugin.py"
PLUGIN_MODULE = "_notifyd_mutants_plugin"
CANARY_EXIT = 70  # scripts/mutants_plugin.py
# per test inside a mutant's run (pytest-timeout): a mutant that makes a test hang is caught
# by this bound instead of the suite's 120 s; a mutant may set its own (`timeout`)
TEST_TIMEOUT_S = 60.0
# the whole pytest run of one mutant; past it, SIGINT (pytest tears its fixtures down),
# then SIGKILL
RUN_DEADLINE_S = 300.0
KEYS = {"name", "promise", "file", "find", "replace", "count", "tests", "timeout"}
REQUIRED = ("name", "promise", "file", "find", "replace", "tests")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    promise: str
    file: str
    find: str
    replace: str
    count: int
    tests: tuple[str, ...]
    timeout: float | None
    source: str  # the list it came from, relative to the root


@dataclass(slots=True)
class Outcome:
    """What became of one mutant: caught, survived, stale or error."""

    mutant: Mutant
    status: str
    caught_by: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.mutant.name,
            "promise": self.mutant.promise,
            "file": self.mutant.file,
            "list": self.mutant.source,
            "status": self.status,
            "caught_by": self.caught_by,
            "seconds": round(self.seconds, 1),
            "detail": self.detail,
        }


class ListError(Exception):
    """A mutant list that cannot be read at all (TOML syntax, a missing field)."""


class CanaryFailed(Exception):
    """The scratch run did not import the scratch copy of notifyd: no verdict can be trusted."""


# ------------------------------------------------------------------------------ the list


def load(root: Path) -> list[Mutant]:
    """Every mutant of every list, in file order; raises ListError for a malformed entry."""
    mutants: list[Mutant] = []
    for path in sorted((root / LIST_DIR).glob("*.toml")):
        source = str(path.relative_to(root))
        try:
            document = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ListError(f"{source}: {exc}") from None
        entries = document.get("mutant", [])
        if not isinstance(entries, list):
            raise ListError(f"{source}: `mutant` must be an array of tables ([[mutant]])")
        for index, entry in enumerate(entries):
            mutants.append(_mutant(entry, f"{source}, mutant {index + 1}", source))
    return mutants


def _mutant(entry: Any, where: str, source: str) -> Mutant:
    if not isinstance(entry, dict):
        raise ListError(f"{where}: not a table")
    unknown = set(entry) - KEYS
    if unknown:
        raise ListError(f"{where}: unknown keys {sorted(unknown)}")
    missing = [key for key in REQUIRED if key not in entry]
    if missing:
        raise ListError(f"{where}: missing {missing}")
    texts = ("name", "promise", "file", "find", "replace")
    if not all(isinstance(entry[key], str) for key in texts):
        raise ListError(f"{where}: {', '.join(texts)} must be strings")
    tests = entry["tests"]
    if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
        raise ListError(f"{where}: tests must be a non-empty list of pytest node ids")
    count = entry.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ListError(f"{where}: count must be a positive integer")
    timeout = entry.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ListError(f"{where}: timeout must be a positive number of seconds")
    if not entry["find"]:
        raise ListError(f"{where}: find must not be empty")
    return Mutant(
        name=entry["name"],
        promise=entry["promise"],
        file=entry["file"],
        find=entry["find"],
        replace=entry["replace"],
        count=count,
        tests=tuple(tests),
        timeout=float(timeout) if timeout is not None else None,
        source=source,
    )


def problems(root: Path, mutants: list[Mutant]) -> dict[str, str]:
    """Mutant name → why it cannot run against this tree (stale), for each that cannot."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    for mutant in mutants:
        if mutant.name in seen:
            found[mutant.name] = f"the name is used twice ({mutant.source})"
            continue
        seen.add(mutant.name)
        target = root / mutant.file
        if not target.is_file():
            found[mutant.name] = f"{mutant.file} does not exist"
            continue
        times = target.read_text().count(mutant.find)
        if times != mutant.count:
            found[mutant.name] = (
                f"`find` occurs {times} times in {mutant.file}, not {mutant.count}: "
                "the code changed, update the mutant"
            )
            continue
        for test in mutant.tests:
            test_file = test.split("::", 1)[0]
            if not (root / test_file).is_file():
                found[mutant.name] = f"test file {test_file} does not exist"
                break
    return found


# ------------------------------------------------------------------------- scratch trees


def working_files(root: Path) -> list[Path]:
    """The files `git status` sees (tracked, and untracked but not ignored), relative to
    root; every file but caches and virtualenvs outside a git work tree."""
    if (root / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        names = {Path(name.decode()) for name in listed.split(b"\0") if name}
        return sorted(name for name in names if (root / name).is_file())
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for filename in filenames:
            files.append((Path(dirpath) / filename).relative_to(root))
    return sorted(files)


def make_scratch(root: Path, files: list[Path], mutant: Mutant | None) -> Path:
    """A copy of `files` in a new temporary folder, with `mutant` applied."""
    scratch = Path(tempfile.mkdtemp(prefix="notifyd-mutant-")).resolve()
    for name in files:
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    shutil.copy2(PLUGIN, scratch / f"{PLUGIN_MODULE}.py")
    if mutant is not None:
        path = scratch / mutant.file
        text = path.read_text()
        path.write_text(text.replace(mutant.find, mutant.replace))
    return scratch


# -------------------------------------------------------------------------------- running


@dataclass
class Runner:
    """Runs mutants against copies of `files` of `root`; knows its live pytest processes so
    an interrupted run stops them (each runs in its own process group)."""

    root: Path
    files: list[Path]
    test_timeout: float = TEST_TIMEOUT_S
    deadline: float = RUN_DEADLINE_S
    keep: bool = False
    _live: set[subprocess.Popen[str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, mutant: Mutant) -> Outcome:
        started = time.monotonic()
        scratch = make_scratch(self.root, self.files, mutant)
        report = scratch / ".mutants-report.json"
        env = dict(os.environ)
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(
                    [str(scratch), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                "MUTANTS_SCRATCH": str(scratch),
                "MUTANTS_REPORT": str(report),
                "PYTHONDONTWRITEBYTECODE": "1",
                # the checkout's Kafka jars (scripts/kafka.py), not a Maven run per mutant
                "NOTIFYD_KAFKA_JARS": str(self.root / ".local" / "kafka-jars"),
                # and its cached empty PostgreSQL cluster (tests/conftest.py)
                "NOTIFYD_PG_INITDB_CACHE": str(self.root / ".local" / "pg-initdb"),
            }
        )
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            PLUGIN_MODULE,
            "-p",
            "no:cacheprovider",
            f"--rootdir={scratch}",
            f"--timeout={mutant.timeout or self.test_timeout}",
            *mutant.tests,
        ]
        try:
            code, output = self._pytest(argv, scratch, env)
            seconds = time.monotonic() - started
            if code == CANARY_EXIT:
                raise CanaryFailed(_tail(output))
            failed: list[str] = []
            if report.exists():
                failed = json.loads(report.read_text())["failed"]
            if code is None:
                detail = f"past the {self.deadline:.0f} s deadline"
                return Outcome(mutant, "error", failed, seconds, detail)
            if code == 0:
                return Outcome(mutant, "survived", [], seconds, "every test passed")
            if code == 1 and failed:
                return Outcome(mutant, "caught", failed, seconds)
            detail = f"pytest exit {code}: {_tail(output)}"
            return Outcome(mutant, "error", failed, seconds, detail)
        finally:
            if self.keep:
                print(f"  kept {scratch}", file=sys.stderr)
            else:
                shutil.rmtree(scratch, ignore_errors=True)

    def _pytest(self, argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int | None, str]:
        """(exit code, or None past the deadline; the output)."""
        with subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, to stop it whole
        ) as proc:
            with self._lock:
                self._live.add(proc)
            try:
                try:
                    output, _ = proc.communicate(timeout=self.deadline)
                    return proc.returncode, output
                except subprocess.TimeoutExpired:
                    pass
                _interrupt(proc)
                try:
                    output, _ = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    output, _ = proc.communicate()
                return None, output
            finally:
                with self._lock:
                    self._live.discard(proc)

    def interrupt(self) -> None:
        """Stop every pytest still running (Ctrl-C on the runner, a failed canary)."""
        with self._lock:
            for proc in self._live:
                _interrupt(proc)


def _interrupt(proc: subprocess.Popen[str]) -> None:
    """SIGINT to the run's process group: pytest stops and still tears its fixtures (the
    servers it started) down."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)


def _tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def run_all(runner: Runner, mutants: list[Mutant], *, jobs: int) -> list[Outcome]:
    """Every mutant (stale ones reported, not run), `jobs` at a time, in list order."""
    stale = problems(runner.root, mutants)
    outcomes = [Outcome(m, "stale", detail=stale[m.name]) for m in mutants if m.name in stale]
    for outcome in outcomes:
        print(f"stale     {outcome.mutant.name}: {outcome.detail}", file=sys.stderr)
    runnable = [m for m in mutants if m.name not in stale]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(runner.run, mutant) for mutant in runnable]
        try:
            for future in concurrent.futures.as_completed(futures):
                outcome = future.result()
                outcomes.append(outcome)
                note = f": {outcome.detail}" if outcome.status != "caught" else ""
                print(
                    f"{outcome.status:<9} {outcome.mutant.name} ({outcome.seconds:.1f} s){note}",
                    file=sys.stderr,
                    flush=True,
                )
        except BaseException:  # a failed canary, Ctrl-C: no run is left behind
            for future in futures:
                future.cancel()
            runner.interrupt()
            raise
    order = {m.name: i for i, m in enumerate(mutants)}
    return sorted(outcomes, key=lambda o: order[o.mutant.name])


# ------------------------------------------------------------------------------- reports


def table(outcomes: list[Outcome]) -> str:
    """mutant, promise (cut at 50), status, catching test, seconds: one line each."""
    rows = [("mutant", "promise", "status", "catching test", "s")]
    for o in outcomes:
        test = o.caught_by[0] if o.caught_by else "-"
        promise = o.mutant.promise if len(o.mutant.promise) <= 50 else o.mutant.promise[:49] + "…"
        rows.append((o.mutant.name, promise, o.status, test, f"{o.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(row[i].ljust(widths[i]) for i in range(3)), row[4].rjust(6), row[3]])
        for row in rows
    )


def summary(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("caught", "survived", "stale")}
    counts["error"] = sum(o.status == "error" for o in outcomes)
    return {
        **counts,
        "total": len(outcomes),
        "seconds": round(seconds, 1),
        "mutants": [o.as_json() for o in outcomes],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/mutants",
        description="Apply each promise mutant (tests/mutants/*.toml) to a scratch copy of the "
        "tree and run its tests there; fail if any survives or is stale.",
    )
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only this mutant (repeatable)"
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="mutants run at once (default: 2, or 1 on a single core)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TEST_TIMEOUT_S,
        help=f"seconds per test in a mutant's run (default {TEST_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=RUN_DEADLINE_S,
        help=f"seconds for one mutant's whole run (default {RUN_DEADLINE_S:.0f})",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch trees")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root.resolve()

    try:
        mutants = load(root)
    except ListError as exc:
        print(f"mutants: {exc}", file=sys.stderr)
        return 2
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            print(f"mutants: no mutant named {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.name in args.only]
    if args.list:
        stale = problems(root, mutants)
        for m in mutants:
            mark = f"  [stale: {stale[m.name]}]" if m.name in stale else ""
            print(f"{m.name}  ({m.source}){mark}\n    {m.promise}\n    {', '.join(m.tests)}")
        return 1 if stale else 0

    started = time.monotonic()
    runner = Runner(
        root,
        working_files(root),
        test_timeout=args.timeout,
        deadline=args.deadline,
        keep=args.keep,
    )
    try:
        outcomes = run_all(runner, mutants, jobs=args.jobs)
    except CanaryFailed as exc:
        print(f"mutants: the canary failed, no verdict can be trusted:\n{exc}", file=sys.stderr)
        return 2
    result = summary(outcomes, time.monotonic() - started)
    print(table(outcomes))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["caught"] == result["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
