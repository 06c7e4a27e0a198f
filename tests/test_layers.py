"""The layers of docs/architecture.md are checked, and the check can fail.

`lint-imports` runs the import-linter contracts of pyproject.toml ([tool.importlinter]) on the
real tree (scripts/test runs it too), and on a copy of notifyd/ with one forbidden import
added, where it must name the contract that import breaks: a contract that cannot fail
proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """Runs the contracts on the `notifyd` package under `tree`, which comes first on the
    path (before the checkout's editable install)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"},  # one line per contract
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_tree_keeps_every_layer_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "store/templates.py",
            "from notifyd.providers import builtin_templates",
            "layers: entry -> composition",
        ),
        (
            "http/websockets.py",
            "from notifyd.realtime import hub",
            "handlers never call actors",
        ),
        (
            "http/notifications.py",
            "from notifyd.actors import dispatcher",
            "handlers never call actors",
        ),
        (
            "actors/sweeper.py",
            "from notifyd.actors import sender",
            "actors: no actor imports another",
        ),
        (
            "realtime/presence.py",
            "from notifyd.realtime import hub",
            "actors: no actor imports another",
        ),
        (
            "store/deliveries.py",
            "from notifyd import accept",
            "layers: entry -> composition",
        ),
    ],
    ids=["store-providers", "handler-hub", "handler-actor", "actor-actor", "hub-presence", "up"],
)
def test_one_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    shutil.copytree(
        ROOT / "notifyd", tmp_path / "notifyd", ignore=shutil.ignore_patterns("__pycache__")
    )
    path = tmp_path / "notifyd" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [row for row in result.stdout.splitlines() if row.endswith(" BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout
