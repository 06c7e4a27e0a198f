"""A real Apache Kafka broker for tests and development: its jars from Maven, KRaft, no tarball.

Usage (from the checkout; the standard library only, like scripts/localservers.py):

    python3 scripts/kafka.py fetch                 the jars into .local/kafka-jars (cached)
    python3 scripts/kafka.py up --dir .local       start a broker; prints `export ...` lines
    python3 scripts/kafka.py status --dir .local
    python3 scripts/kafka.py down --dir .local

`fetch` asks Maven (`mvn dependency:copy-dependencies`) for the runtime dependencies of
`org.apache.kafka:kafka_2.13` as scripts/kafka/pom.xml lists them. Maven keeps what it
downloads in ~/.m2, so a second checkout copies instead of downloading; the copy in
.local/kafka-jars is reused while a stamp (the pom's hash) says it is the pom's.
`NOTIFYD_KAFKA_JARS` names another folder for them: the promise mutants' scratch copies of
the tree share the checkout's, instead of each asking Maven again.

A broker is one JVM that is both KRaft controller and broker (`process.roles=broker,
controller`), on two free ports of 127.0.0.1, with its data in a folder of its own: the
storage is formatted once (what `kafka-storage format` does: `kafka.tools.StorageTool`), then
`kafka.Kafka server.properties` runs in the foreground as a child process. Internal topics
have one partition and one replica, so a fresh broker is ready in a few seconds.
`KafkaBroker` is what tests/kafka_server.py starts once per test session.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 scripts/kafka.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.localservers import free_port

ROOT = Path(__file__).resolve().parent.parent
POM = ROOT / "scripts" / "kafka" / "pom.xml"
DEFAULT_JARS = Path(os.environ.get("NOTIFYD_KAFKA_JARS") or ROOT / ".local" / "kafka-jars")
CLUSTER_ID = "bm90aWZ5ZC1rYWZrYS0wMQ"  # b"notifyd-kafka-01" in base64url: any 16 bytes do
_API_VERSIONS = 18  # the request every client sends first; answered once the broker serves

# Small heap, quick start: a test broker holds a few thousand small messages.
JVM_OPTIONS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)
LOG4J2 = """\
status = error
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = info
"""


class KafkaError(RuntimeError):
    pass


def kafka_version() -> str:
    found = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    if found is None:
        raise KafkaError(f"{POM} names no <kafka.version>")
    return found.group(1)


def _stamp() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def fetch_jars(dest: Path = DEFAULT_JARS) -> Path:
    """The broker's jars in `dest`, fetched with Maven unless the stamp says they are there.
    A lock file keeps two processes (a test run and scripts/dev) from copying at once."""
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp = dest / "stamp"
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text().strip() == _stamp():
            return dest
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaError("Maven (mvn) is not installed; bash scripts/bootstrap.sh installs it")
        if shutil.which("java") is None:
            raise KafkaError("Java is not installed; bash scripts/bootstrap.sh installs it")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        done = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            raise KafkaError(f"mvn could not fetch the Kafka broker's jars:\n{done.stdout[-3000:]}")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
        stamp.write_text(_stamp() + "\n")
        return dest


def api_versions_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a Kafka broker answers an ApiVersions request (v0) without an error."""
    client = b"notifyd-probe"
    body = struct.pack(">hhih", _API_VERSIONS, 0, 1, len(client)) + client
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exactly(sock, 10)
    except OSError:
        return False
    _size, correlation, error = struct.unpack(">iih", head)
    return correlation == 1 and error == 0


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


class KafkaBroker:
    """One single-node KRaft broker in `base_dir`; `restart` keeps its ports and data."""

    def __init__(self, base_dir: Path, jars: Path, port: int | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.jars = jars
        self.port = port or free_port()
        self.controller_port = free_port()
        self.data = self.base_dir / "data"
        self.output = self.base_dir / "broker.out"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _properties(self) -> str:
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                f"log.dirs={self.data}",
                # one node: every internal topic with one replica, and few partitions
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "num.partitions=1",
                "",
            ]
        )

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaError("Java is not installed; bash scripts/bootstrap.sh installs it")
        return [
            java,
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self.base_dir / 'log4j2.properties'}",
            "-cp",
            f"{self.jars}/*",
            main,
            *args,
        ]

    def _format(self) -> None:
        """`kafka-storage format`, once per data folder (a restart keeps the data)."""
        if (self.data / "meta.properties").is_file():
            return
        done = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                "-t",
                CLUSTER_ID,
                "-c",
                str(self.base_dir / "server.properties"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise KafkaError(f"formatting the broker's storage failed:\n{done.stdout[-3000:]}")

    def start(self, timeout: float = 90.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "server.properties").write_text(self._properties())
        (self.base_dir / "log4j2.properties").write_text(LOG4J2)
        self._format()
        with self.output.open("ab") as out:
            self._proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.base_dir / "server.properties")),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test's terminal is not the broker's
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not api_versions_ok("127.0.0.1", self.port):
            if self._proc is not None and self._proc.poll() is not None:
                raise KafkaError(f"the Kafka broker exited during start-up\n{self._tail()}")
            if time.monotonic() > deadline:
                raise KafkaError(f"Kafka not ready after {timeout:.0f}s\n{self._tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: a controlled shutdown (the data stays for a `start`)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def restart(self, timeout: float = 90.0) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        self.stop()

    def _tail(self, lines: int = 30) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:])


# --- the command line (scripts/dev): a detached broker whose pid and port live in --dir


def _state(state_dir: Path) -> tuple[Path, Path]:
    base = state_dir.resolve() / "kafka"
    return base, base / "broker.pid"


def _running(pid_file: Path) -> tuple[int, int] | None:
    """(pid, port) of the broker `up` started, if it still runs."""
    with contextlib.suppress(OSError, ValueError):
        pid_text, port_text = pid_file.read_text().split()
        pid, port = int(pid_text), int(port_text)
        os.kill(pid, 0)
        return pid, port
    return None


def up(state_dir: Path, port: int | None) -> int:
    base, pid_file = _state(state_dir)
    found = _running(pid_file)
    if found is None:
        jars = fetch_jars()
        broker = KafkaBroker(base, jars, port)
        started = time.monotonic()
        broker.start()
        proc = broker._proc
        assert proc is not None
        pid_file.write_text(f"{proc.pid} {broker.port}\n")
        print(
            f"kafka: broker up on {broker.bootstrap} in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
        found = (proc.pid, broker.port)
        broker._proc = None  # detached: `down` stops it by its pid
    print(f"export NOTIFYD_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{found[1]}")
    return 0


def down(state_dir: Path) -> int:
    _, pid_file = _state(state_dir)
    found = _running(pid_file)
    if found is not None:
        os.kill(found[0], signal.SIGTERM)
        for _ in range(300):
            if _running(pid_file) is None:
                break
            time.sleep(0.1)
        print("kafka: broker stopped", file=sys.stderr)
    pid_file.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="the broker's jars into .local/kafka-jars")
    for name in ("up", "status", "down"):
        command = commands.add_parser(name)
        command.add_argument("--dir", default=".local", type=Path, help="state (default .local)")
        if name == "up":
            command.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch_jars())
            return 0
        if args.command == "up":
            return up(args.dir, args.port)
        if args.command == "down":
            return down(args.dir)
        found = _running(_state(args.dir)[1])
        print("kafka: not running" if found is None else f"kafka: pid {found[0]}, port {found[1]}")
        return 0 if found else 1
    except KafkaError as exc:
        print(f"kafka: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
