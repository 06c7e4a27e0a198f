"""A regular install is complete: the wheel carries the migrations, and installed outside the
checkout `notifyd migrate` and `notifyd serve` work; every version shown is pyproject's.

The wheel is built from a copy of the sources whose version is changed, installed with
`pip install --target` into a folder of its own and run from another folder, so nothing of the
checkout (its `notifyd/sql/`, its editable install) can stand in for what the wheel lacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts.localservers import free_port
from tests.helpers import ROOT, base_env, wait_for

# a version no checkout has: seen anywhere, it came from the wheel's own metadata
WHEEL_VERSION = "0.0.0+packaging.test"
PIP_RUN: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 240}


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def copy_sources(dest: Path, version: str) -> Path:
    """pyproject.toml, README.md and notifyd/ (no byte code), with `version` in pyproject."""
    dest.mkdir()
    pyproject = (ROOT / "pyproject.toml").read_text()
    line = f'version = "{project_version()}"'
    assert pyproject.count(line) == 1, "pyproject.toml's [project] version line moved"
    (dest / "pyproject.toml").write_text(pyproject.replace(line, f'version = "{version}"'))
    shutil.copy(ROOT / "README.md", dest / "README.md")
    shutil.copytree(
        ROOT / "notifyd", dest / "notifyd", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed in), built once for this module's tests."""
    base = tmp_path_factory.mktemp("packaging")
    sources = copy_sources(base / "src", WHEEL_VERSION)
    dist, site = base / "dist", base / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # pip's build isolation fetches the build backend pyproject.toml names (setuptools), as
    # `pip install .` does on a server
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(dist), str(sources)],
        **PIP_RUN,
        cwd=base,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("notifyd-*.whl")
    put = subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        **PIP_RUN,
        cwd=base,
    )
    assert put.returncode == 0, put.stdout + put.stderr
    return wheel, site


def run_installed(
    site: Path, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The wheel's own `notifyd` script, importing only from `site` (and the interpreter's
    dependencies), in a folder outside the checkout."""
    return subprocess.run(
        [str(site / "bin" / "notifyd"), *args],
        env=installed_env(site, env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def start_installed(
    site: Path, cwd: Path, log_path: Path, *args: str, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """As run_installed, in the background, its output in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(site / "bin" / "notifyd"), *args],
            env=installed_env(site, env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def installed_env(site: Path, env: dict[str, str]) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site), **env}


def test_the_wheel_carries_every_migration(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    shipped = sorted((ROOT / "notifyd" / "sql").glob("*.sql"))
    assert shipped, "no migrations in notifyd/sql"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for path in shipped:
            name = f"notifyd/sql/{path.name}"
            assert name in names, f"{name} is not in {wheel.name}"
            assert archive.read(name) == path.read_bytes()


def test_the_wheel_carries_the_web_components(installed: tuple[Path, Path]) -> None:
    """`/ui/notifyd-inbox.js` and the others are served from the installed package."""
    wheel, _ = installed
    shipped = [*sorted((ROOT / "notifyd" / "ui").glob("*.js")), ROOT / "notifyd/ui/demo.html"]
    assert len(shipped) >= 4, shipped
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for path in shipped:
            name = f"notifyd/ui/{path.name}"
            assert name in names, f"{name} is not in {wheel.name}"
            assert archive.read(name) == path.read_bytes()


def test_the_installed_package_is_the_wheels_not_the_checkouts(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """The checks below would prove nothing if the checkout's editable install answered."""
    _, site = installed
    probe = subprocess.run(
        [sys.executable, "-c", "import notifyd; print(notifyd.__file__, notifyd.__version__)"],
        env=installed_env(site, {}),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    path, version = probe.stdout.split()
    assert Path(path).is_relative_to(site), path
    assert version == WHEEL_VERSION


async def test_installed_wheel_migrates_and_serves_outside_the_checkout(
    installed: tuple[Path, Path], empty_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    _, site = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    port = free_port()
    env = base_env(empty_database_url, redis_url, NOTIFYD_PORT=str(port))

    shown = run_installed(site, work, "--version")
    assert shown.stdout.strip() == f"notifyd {WHEEL_VERSION}", shown.stdout + shown.stderr

    migrated = run_installed(site, work, "migrate", env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    applied = migrated.stdout.strip().removeprefix("applied: ").split(", ")
    expected = sorted(p.stem for p in (ROOT / "notifyd" / "sql").glob("*.sql"))
    assert applied == expected, migrated.stdout

    log_path = tmp_path / "serve.log"
    serve = start_installed(site, work, log_path, "serve", env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                if serve.poll() is not None:
                    raise AssertionError(f"serve exited early:\n{log_path.read_text()}")
                try:
                    async with http.get(base + "/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(ready, timeout=30, interval=0.1)
            async with http.get(base + "/openapi.json") as response:
                assert (await response.json())["info"]["version"] == WHEEL_VERSION
            async with http.get(base + "/metrics") as response:
                metrics = await response.text()
            build_info = [line for line in metrics.splitlines() if "notifyd_build_info{" in line]
            assert build_info and f'version="{WHEEL_VERSION}"' in build_info[0], build_info
        serve.terminate()
        assert serve.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=10)


def test_one_version_source() -> None:
    """pyproject.toml's version is the only one written down: the package reads it from its
    installed metadata."""
    import notifyd

    assert notifyd.__version__ == project_version()
    init = (ROOT / "notifyd" / "__init__.py").read_text()
    assert project_version() not in init
