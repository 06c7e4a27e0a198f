"""`bash scripts/mutants` tells caught from survived and stale, and tests what it claims to.

Run on a tiny project of its own in tmp_path (a `notifyd` package of one function, two tests),
not on the real suite, so it takes seconds: a mutant its test catches is `caught` and names
that test; one whose test cannot see it is `survived` and fails the run; one whose `find`
text is gone is `stale` and fails the run; and a scratch run that would import the
repository's own notifyd (the .venv's editable install) instead of the scratch copy stops
the whole run (the canary), since every verdict would then be about the wrong code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import mutants

CALC = "def add(a: int, b: int) -> int:\n    return a + b\n"
TESTS = """\
from notifyd.calc import add


def test_add() -> None:
    assert add(2, 3) == 5


def test_add_zero() -> None:  # cannot tell + from -
    assert add(0, 0) == 0
"""
LIST = """\
[[mutant]]
name = "add-subtracts"
promise = "add adds"
file = "notifyd/calc.py"
find = "a + b"
replace = "a - b"
tests = ["tests/test_calc.py::test_add"]

[[mutant]]
name = "add-subtracts-unseen"
promise = "add adds"
file = "notifyd/calc.py"
find = "a + b"
replace = "a - b"
tests = ["tests/test_calc.py::test_add_zero"]

[[mutant]]
name = "add-gone-stale"
promise = "add adds"
file = "notifyd/calc.py"
find = "a + c"
replace = "a - c"
tests = ["tests/test_calc.py::test_add"]
"""


def project(root: Path, *, with_notifyd: bool = True) -> Path:
    files = {
        "tests/__init__.py": "",
        "tests/test_calc.py": TESTS,
        "tests/mutants/calc.toml": LIST,
    }
    if with_notifyd:
        files |= {"notifyd/__init__.py": "", "notifyd/calc.py": CALC}
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run(root: Path, *args: str) -> tuple[int, dict[str, dict[str, object]]]:
    report = root / "summary.json"
    code = mutants.main(["--root", str(root), "--json", str(report), "--timeout", "30", *args])
    if not report.exists():
        return code, {}
    return code, {m["name"]: m for m in json.loads(report.read_text())["mutants"]}


def test_caught_survived_and_stale_mutants_are_told_apart(tmp_path: Path) -> None:
    root = project(tmp_path)
    code, found = run(root, "-j", "2")
    assert code == 1
    assert found["add-subtracts"]["status"] == "caught"
    assert found["add-subtracts"]["caught_by"] == ["tests/test_calc.py::test_add"]
    assert found["add-subtracts-unseen"]["status"] == "survived"
    assert found["add-gone-stale"]["status"] == "stale"
    assert "occurs 0 times" in str(found["add-gone-stale"]["detail"])
    # the mutants changed only the scratch copies
    assert (root / "notifyd/calc.py").read_text() == CALC


def test_a_run_of_caught_mutants_only_passes(tmp_path: Path) -> None:
    code, found = run(project(tmp_path), "--only", "add-subtracts")
    assert code == 0
    assert list(found) == ["add-subtracts"]


def test_the_list_is_checked_names_unique_files_present(tmp_path: Path) -> None:
    root = project(tmp_path)
    first = LIST.split("\n\n")[0] + "\n"
    gone = first.replace("add-subtracts", "add-elsewhere").replace("calc.py", "gone.py")
    (root / "tests/mutants/more.toml").write_text(first + "\n" + gone)
    stale = mutants.problems(root, mutants.load(root))
    assert stale["add-subtracts"].startswith("the name is used twice")
    assert stale["add-elsewhere"] == "notifyd/gone.py does not exist"
    (root / "tests/mutants/more.toml").write_text(first + 'colour = "red"\n')
    with pytest.raises(mutants.ListError, match="unknown keys"):
        mutants.load(root)


def test_a_scratch_run_importing_the_installed_notifyd_stops_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a notifyd of its own, the scratch tree's tests would import the .venv's
    editable install (the repository's tree): the canary must refuse to judge."""
    root = project(tmp_path, with_notifyd=False)
    (root / "tests/mutants/calc.toml").write_text(
        LIST.split("\n\n")[0]
        .replace("notifyd/calc.py", "tests/test_calc.py")
        .replace('"a + b"', '"== 5"')
        .replace('"a - b"', '"== 6"')
        + "\n"
    )
    code, found = run(root)
    assert code == 2
    assert found == {}
    assert "canary" in capsys.readouterr().err
