"""A private RabbitMQ broker for tests: free ports, a temporary folder, stopped at the end.

Like scripts/localservers.py does for PostgreSQL and Redis, nothing depends on a broker
someone started by hand, and nothing here disturbs a system one: the node has its own name,
AMQP, distribution and epmd ports, data, logs, config and Erlang cookie (HOME is the folder).
It runs the broker's own start script (Debian's /usr/sbin wrapper would `su rabbitmq` and drop
the environment), in the foreground as a child process. Start-up takes a few seconds, so the
tests start one per session; `restart` keeps ports and data (durable queues survive it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from scripts.localservers import free_port

# the broker's own script, not Debian's su wrapper in /usr/sbin
_SCRIPT_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class RabbitMqError(RuntimeError):
    pass


def find_rabbitmq_server() -> Path | None:
    for candidate in _SCRIPT_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    # Debian's /usr/sbin/rabbitmq-server switches user and loses our environment
    script = Path(found).resolve()
    return None if "su rabbitmq" in script.read_text(errors="replace") else script


def _find_epmd() -> str | None:
    found = shutil.which("epmd")
    if found is not None:
        return found
    candidates = sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))
    return str(candidates[-1]) if candidates else None


class RabbitMqServer:
    def __init__(self, base_dir: Path) -> None:
        script = find_rabbitmq_server()
        if script is None:
            raise RabbitMqError("rabbitmq-server is not installed (bash scripts/bootstrap.sh)")
        self.script = script
        self.base_dir = Path(base_dir).resolve()
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"notifyd-test-{self.port}@localhost"
        self.output = self.base_dir / "broker.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        base = self.base_dir
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"),
            "HOME": str(base),  # the Erlang cookie lives here
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(base / "broker.pid"),
        }

    def start(self, timeout: float = 60.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "disk_free_limit.absolute = 1MB\n"  # a nearly full CI disk must not block publishers
        )
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's
        with self.output.open("ab") as out:
            self._proc = subprocess.Popen(
                [str(self.script)],
                cwd=self.base_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the broker answers the AMQP protocol header (its listener opens last)."""
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self._proc is not None and self._proc.poll() is not None:
                raise RabbitMqError(f"rabbitmq-server exited during start-up\n{self._tail()}")
            if time.monotonic() > deadline:
                raise RabbitMqError(f"RabbitMQ not ready after {timeout:.0f}s\n{self._tail()}")
            time.sleep(0.1)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(_AMQP_HEADER)
                return sock.recv(1) == b"\x01"  # a method frame: Connection.Start
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the start script stops the broker cleanly (durable data kept)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_vm()
            proc.kill()
            proc.wait(10)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the broker and the epmd its Erlang VM started on our private port."""
        self.stop()
        epmd = _find_epmd()
        if epmd is not None:
            subprocess.run(
                [epmd, "-kill"],
                env={**self._env()},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )

    def _kill_vm(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.base_dir / "broker.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)

    def _tail(self, lines: int = 30) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])
