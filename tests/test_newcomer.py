"""The newcomer's first try works: every command `bash scripts/dev` prints, and every ```sh
block of README.md, succeeds pasted into a new shell in the checkout.

`scripts/dev` runs for real (bootstrap, private PostgreSQL and Redis, migrate, serve) in a
throwaway copy of the checkout, so the developer's own `.local/` is never touched: the copy
holds what the script and the commands use (scripts/, pyproject.toml, requirements.lock,
README.md) and a `.venv` of links to the real one with its own install stamp, so bootstrap
finds it current and never runs pip. Each command then runs with `bash -c` in an environment
of PATH and HOME only, as a new terminal would. Every curl must say whether it worked
(`--fail-with-body`: an error status fails the command), so success is its exit status.
The one thing changed is the port: 8000 may be the developer's own dev server.

And a fresh machine gets what the tests need: bootstrap installs `wrk` and `chromium`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.localservers import free_port
from tests.helpers import ROOT

# what a new terminal has: no virtualenv, no notifyd settings
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEV_START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": CLEAN_PATH, "HOME": os.environ.get("HOME", "/root"), **extra}


def make_checkout(base: Path) -> Path:
    checkout = base / "checkout"
    checkout.mkdir()
    shutil.copytree(
        ROOT / "scripts", checkout / "scripts", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "requirements.lock", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    venv = checkout / ".venv"
    venv.mkdir()
    for entry in (ROOT / ".venv").iterdir():
        if entry.name not in (".lock-stamp", "pip.log"):
            (venv / entry.name).symlink_to(entry)
    # the stamp scripts/bootstrap.sh writes after installing: sha256 of the lock + pyproject
    stamp = hashlib.sha256(
        (ROOT / "requirements.lock").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    ).hexdigest()
    (venv / ".lock-stamp").write_text(stamp + "\n")
    return checkout


def printed_commands(text: str) -> list[str]:
    """The commands of scripts/dev's message: each line indented by exactly two spaces
    starts one, a trailing backslash continues it on the next line."""
    commands: list[str] = []
    continued = False
    for line in text.splitlines():
        if continued:
            commands[-1] += "\n" + line
        elif re.match(r"  \S", line):
            commands.append(line.strip())
        else:
            continue
        continued = line.endswith("\\")
    return commands


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def run_pasted(command: str, checkout: Path) -> subprocess.CompletedProcess[str]:
    for curl in re.findall(r"(?m)^\s*curl\b.*", command):
        assert "--fail-with-body" in curl, f"a curl that hides an error status: {curl}"
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=checkout,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


class DevProcess:
    """`bash scripts/dev` (which execs `notifyd serve`), its stderr in a file."""

    def __init__(self, checkout: Path, port: int) -> None:
        self.log_path = checkout / "dev.log"
        self.base = f"http://127.0.0.1:{port}"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "scripts/dev"],
                cwd=checkout,
                # settings already in the environment win: the port, and a mail relay so the
                # dev mail server's fixed port 8025 is not needed (no email is sent here)
                env=clean_env(
                    NOTIFYD_PORT=str(port), EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(free_port())
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self) -> None:
        """Until the message is printed and /readyz answers 200 (polled with curl)."""
        deadline = time.monotonic() + DEV_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"scripts/dev exited with {self.proc.returncode}:\n{self.output()}"
                )
            if "notifyd is starting on" in self.output():
                ready = subprocess.run(
                    ["curl", "-fsS", "-o", "/dev/null", self.base + "/readyz"],
                    capture_output=True,
                    timeout=10,
                )
                if ready.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"scripts/dev not serving after {DEV_START_TIMEOUT_S}s:\n{self.output()}"
                )
            time.sleep(0.2)

    def interrupt(self) -> int:
        """Ctrl-C, as the message says."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def checkout() -> Iterator[Path]:
    # outside pytest's basetemp, as conftest's PostgreSQL: another pytest session resets it
    # to 0700 and would cut the postgres OS user off from this one's data
    base = Path(tempfile.mkdtemp(prefix="notifyd-newcomer-"))
    checkout = make_checkout(base)
    try:
        yield checkout
    finally:
        subprocess.run(
            ["python3", "scripts/localservers.py", "down", "--dir", ".local"],
            cwd=checkout,
            env=clean_env(),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_every_command_dev_and_readme_print_works_in_a_new_shell(checkout: Path) -> None:
    port = free_port()
    dev = DevProcess(checkout, port)
    try:
        dev.wait_serving()
        message = dev.output()
        commands = printed_commands(message[message.index("notifyd is starting on") :])
        assert any(c.startswith("curl") for c in commands), message
        stop = [c for c in commands if c == "bash scripts/dev stop"]
        blocks = [b.replace("localhost:8000", f"127.0.0.1:{port}") for b in readme_blocks()]
        assert any("curl" in b for b in blocks), "README's curl example is no ```sh block"

        outputs = []
        for command in [c for c in commands if c not in stop] + blocks:
            result = run_pasted(command, checkout)
            assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
            outputs.append(result.stdout)
        # the notification center lists what the first curl sent: both reached the server
        assert any('"message":"Hello"' in out.replace(" ", "") for out in outputs), outputs
        assert stop, "scripts/dev says how to stop what it started"
        tokens = [c for c in commands if c.startswith("bash scripts/dev token")]
        assert tokens and re.fullmatch(
            r"[\w-]+\.[\w-]+\.[\w-]+\n", run_pasted(tokens[0], checkout).stdout
        )

        assert dev.interrupt() == 0, dev.output()
        stopped = run_pasted(stop[0], checkout)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        status = subprocess.run(
            ["python3", "scripts/localservers.py", "status", "--dir", ".local"],
            cwd=checkout,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 3, status.stdout
    finally:
        dev.kill()


def test_the_dev_secret_stays_in_dev(tmp_path: Path) -> None:
    """notifyd never reads .local/: a token command outside scripts/dev finds no secret
    there, so tests, CI and production cannot pick the dev secret up by accident."""
    local = tmp_path / ".local"
    local.mkdir()
    (local / "jwt_secret").write_text("a-dev-secret-that-is-long-enough-0123456789\n")
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "notifyd"), "token", "--tenant", "T", "--user", "u"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "JWT_SECRET" in result.stderr


@pytest.mark.parametrize("package", ["wrk", "chromium"])
def test_bootstrap_installs_a_missing_test_tool(tmp_path: Path, package: str) -> None:
    """A fresh machine gets `wrk`, the load generator tests/test_bench.py's wrk cases need
    (skipped without it), and `chromium`, the browser tests/test_ui*.py drive. apt-get
    cannot run for real here: a stand-in records what bootstrap asks of it, on a PATH that
    has every command of this machine but the package's."""
    checkout = make_checkout(tmp_path)
    path = tmp_path / "bin"
    path.mkdir()
    for folder in CLEAN_PATH.split(":"):
        for command in Path(folder).iterdir() if Path(folder).is_dir() else []:
            if command.name != package and not (path / command.name).exists():
                (path / command.name).symlink_to(command)
    asked = tmp_path / "apt-get.log"
    for name, body in (("apt-get", f'echo "$*" >>{asked}'), ("sudo", 'exec "$@"')):
        (path / name).unlink(missing_ok=True)
        (path / name).write_text(f"#!/bin/sh\n{body}\n")
        (path / name).chmod(0o755)
    result = subprocess.run(
        ["bash", "scripts/bootstrap.sh"],
        cwd=checkout,
        env=clean_env(PATH=str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = asked.read_text() if asked.exists() else ""
    installs = [line.split() for line in calls.splitlines()]
    installs = [words for words in installs if words[:1] == ["install"]]
    assert installs == [["install", "-y", "-q", package]], installs
