"""pytest plugin of `scripts/mutants.py`, loaded in every scratch run (`-p`).

Two jobs, both about trusting a mutant's verdict:

- the canary: the run must test the scratch copy of notifyd, the one the mutant was applied
  to. The repository's .venv has an editable install of the original tree, so a test run
  that imported that one would report every mutant "survived" (or, worse, "caught" for an
  unrelated reason). Before any test runs, this checks that `notifyd` comes from the scratch
  tree in the pytest process, and in a child started the way the tests start
  `python -m notifyd …` (the scratch root as its working directory, only PATH in its
  environment); otherwise the session exits with CANARY_EXIT and the runner stops.
- the report: the node ids of the tests that failed, written as JSON to $MUTANTS_REPORT, so
  the runner can name the test that caught a mutant without parsing pytest's output.

It is copied into the scratch root under its own name and imported from there, so it never
imports anything from the tree under test but `notifyd` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CANARY_EXIT = 70  # EX_SOFTWARE: not a test outcome, so never read as "caught"
_PROBE = "import notifyd, sys; sys.stdout.write(notifyd.__file__ or '')"


def _under(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root)


def _scratch() -> Path:
    return Path(os.environ["MUTANTS_SCRATCH"]).resolve()


def pytest_sessionstart(session: pytest.Session) -> None:
    root = _scratch()
    import notifyd

    here = notifyd.__file__ or ""
    if not _under(here, root):
        pytest.exit(f"mutants canary: pytest imported notifyd from {here}, not {root}", CANARY_EXIT)
    child = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=root,
        env={"PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if child.returncode != 0 or not _under(child.stdout, root):
        pytest.exit(
            f"mutants canary: a child process imported notifyd from {child.stdout!r} "
            f"(exit {child.returncode}: {child.stderr.strip()[-300:]}), not {root}",
            CANARY_EXIT,
        )


_failed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed and report.nodeid not in _failed:
        _failed.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get("MUTANTS_REPORT")
    if target:
        Path(target).write_text(json.dumps({"failed": _failed, "exitstatus": int(exitstatus)}))
