#!/usr/bin/env python3
"""Throwaway PostgreSQL and Redis servers for local development and tests.

Why this exists: notifyd's integration tests and the dev stack need a real PostgreSQL and
Redis, but we do not want to depend on (or disturb) system-wide clusters/services, Docker,
or a fixed port. This module starts private instances under a directory of our choice, on
loopback only, with trust auth, and hands back connection URLs.

It is deliberately stdlib-only: ``scripts/bootstrap.sh`` and CI may run it before the
virtualenv exists, and the test suite imports it from ``scripts/``.

CLI::

    python3 scripts/localservers.py up --dir .local [--pg-port N] [--redis-port N] [--unix]
    python3 scripts/localservers.py status --dir .local
    python3 scripts/localservers.py down --dir .local

``up`` prints ``export DATABASE_URL=...`` / ``export REDIS_URL=...`` lines on stdout, so
``eval "$(python3 scripts/localservers.py up --dir .local)"`` configures a shell. With
``--unix`` the URLs name the servers' Unix sockets instead of 127.0.0.1.

Running as root: PostgreSQL refuses to run as root, so ``initdb``/``pg_ctl`` are run as the
``postgres`` OS user through ``runuser``. That user must be able to traverse into
``base_dir``; we add ``o+x`` to ``base_dir`` itself and to blocking parent directories
*only* when they are inside this project or inside the system temp dir (e.g. pytest's
0700 ``/tmp/pytest-of-root``). Anything else (e.g. ``/root``) is reported as an error
instead of silently loosening permissions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "LocalServerError",
    "PostgresServer",
    "RedisServer",
    "find_pg_bindir",
    "find_redis_server",
    "free_port",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PG_OS_USER = "postgres"
PG_SUPERUSER = "postgres"
# sockaddr_un.sun_path is 108 bytes on Linux including the trailing NUL.
_MAX_UNIX_SOCKET_PATH = 107


class LocalServerError(RuntimeError):
    """Raised when a local server cannot be found, started, stopped or queried."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    The kernel picks it (bind to port 0), which avoids collisions between parallel test
    runs. There is an unavoidable race until the server binds it; callers surface the
    server's own error if that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now (used to drop a stale remembered port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _read_int_file(path: Path) -> int | None:
    """Read a small file holding one integer (port/pid files); None if absent or garbage."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _log_tail(path: Path, lines: int = 40) -> str:
    """Last lines of a server log, so start-up errors are actionable without digging."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {path} ---\n{tail}"


def _pid_alive(pid: int, comm: str | None = None) -> bool:
    """Whether pid is a live (non-zombie) process, optionally with the given command name.

    Zombies matter here: daemonized servers are re-parented to PID 1, and in containers
    PID 1 may never reap them, so ``kill(pid, 0)`` alone would report a dead server alive.
    Checking ``comm`` guards against a stale pidfile whose pid got reused.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists but owned by someone else
    stat_path = Path(f"/proc/{pid}/stat")
    if not stat_path.exists():
        return True  # no procfs (non-Linux): trust kill(0)
    try:
        stat_text = stat_path.read_text()
        # Format: "pid (comm) S ..."; comm may contain spaces/parens, so split at last ')'.
        state = stat_text.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        if comm is not None:
            return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except (OSError, IndexError):
        return False
    return True


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    """Poll until pid is gone (see _pid_alive for zombies); True if it went away in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _clean_env() -> dict[str, str]:
    """Environment for client tools without PG*/REDISCLI_* variables.

    A developer's PGHOST/PGSERVICE/PGPASSWORD etc. would otherwise silently redirect
    psql/pg_isready to some other server.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith(("PG", "REDISCLI_"))}


# ------------------------------------------------------------------- binary discovery


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version> directories (numeric, not lexical)."""
    return tuple(int(p) for p in re.findall(r"\d+", path.name)) or (-1,)


def find_pg_bindir(major: str | None = None) -> Path:
    """Locate the PostgreSQL server binaries directory.

    Debian/Ubuntu keep server binaries outside PATH in /usr/lib/postgresql/<major>/bin,
    possibly several majors side by side; we take the highest unless ``major`` is given
    (a reused data dir must be served by the major that created it). Falls back to a
    ``pg_ctl`` found on PATH (other distros, Homebrew).
    """
    candidates = [
        p.parent
        for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")
        if os.access(p, os.X_OK)
    ]
    if major is not None:
        for bindir in candidates:
            if bindir.parent.name == major:
                return bindir
    if candidates:
        best = max(candidates, key=lambda b: _version_key(b.parent))
        if major is not None and best.parent.name != major:
            raise LocalServerError(
                f"data directory was created by PostgreSQL {major}, but only "
                f"{sorted(c.parent.name for c in candidates)} are installed; install "
                f"postgresql-{major} or delete the data directory"
            )
        return best
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and (Path(pg_ctl).parent / "postgres").exists():
        return Path(pg_ctl).resolve().parent
    raise LocalServerError(
        "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and "
        "PATH). Install the OS package `postgresql` (apt-get install postgresql) or run "
        "scripts/bootstrap.sh"
    )


def find_redis_server() -> Path:
    """Locate ``redis-server``; the error names the Debian package to install."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if not found:
        raise LocalServerError(
            "redis-server not found. Install the OS package `redis-server` "
            "(apt-get install redis-server) or run scripts/bootstrap.sh"
        )
    return Path(found)


# ------------------------------------------------------------------------- PostgreSQL


class PostgresServer:
    """A private PostgreSQL cluster in ``base_dir`` listening on 127.0.0.1 only.

    Layout: ``pgdata/`` (cluster), ``pgsock/`` (unix socket dir, kept out of
    /var/run/postgresql so we never collide with a system cluster), ``postgres.log`` and
    ``pg.port`` (remembered port, so a restarted dev stack keeps its URL).

    The server is started with ``pg_ctl``, so it is detached from the calling process and
    keeps running until :meth:`stop` - tests must stop it themselves.
    """

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        *,
        fsync: bool = True,
        initdb_cache: Path | None = None,
    ) -> None:
        """`initdb_cache`: a folder where a fresh cluster is kept once made; later clusters
        are copies of it (an empty cluster made with the same options is the same every
        time, and copying it is a fraction of initdb's time: the tests make one per worker
        and per promise mutant)."""
        self.base_dir = Path(base_dir).resolve()
        self.initdb_cache = initdb_cache
        self.data_dir = self.base_dir / "pgdata"
        self.socket_dir = self.base_dir / "pgsock"
        self.log_file = self.base_dir / "postgres.log"
        self.port_file = self.base_dir / "pg.port"
        self.fsync = fsync
        self._explicit_port = port
        self.port: int = port if port is not None else self._pick_port()
        self._bindir: Path | None = None

    # -- internals

    def _pick_port(self) -> int:
        """Port of the running server, else the remembered one if still free, else new."""
        running = self._running_port()
        if running is not None:
            return running
        remembered = _read_int_file(self.port_file)
        if remembered is not None and _port_is_free(remembered):
            return remembered
        return free_port()

    def _running_port(self) -> int | None:
        """Port from postmaster.pid (line 4) if a live postmaster owns the data dir."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        return port if _pid_alive(pid, "postgres") else None

    @property
    def bindir(self) -> Path:
        """Server bin dir, matching the data dir's major version when it already exists."""
        if self._bindir is None:
            major: str | None = None
            with contextlib.suppress(OSError):
                major = (self.data_dir / "PG_VERSION").read_text().strip() or None
            self._bindir = find_pg_bindir(major)
        return self._bindir

    def _as_pg_user(self, argv: list[str]) -> list[str]:
        """Prefix argv with runuser when root, because initdb/pg_ctl/postgres refuse root."""
        if os.geteuid() != 0:
            return argv
        runuser = shutil.which("runuser")
        if runuser is None:
            raise LocalServerError("running as root but `runuser` (util-linux) is missing")
        return [runuser, "-u", PG_OS_USER, "--", *argv]

    def _run_pg_tool(
        self, argv: list[str], *, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a server-side tool (initdb, pg_ctl) as the right user, cwd inside base_dir.

        cwd matters: as root our cwd may be e.g. /root, which the postgres user cannot
        enter, and some tools complain about that.
        """
        proc = subprocess.run(
            self._as_pg_user(argv),
            cwd=self.base_dir,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise LocalServerError(
                f"{' '.join(argv[:2])} failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n{_log_tail(self.log_file)}"
            )
        return proc

    def _prepare_dirs(self) -> None:
        """Create the layout and, as root, hand the PostgreSQL parts to the postgres user."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self.log_file.touch(exist_ok=True)
        sock_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(sock_path)) > _MAX_UNIX_SOCKET_PATH:
            raise LocalServerError(
                f"unix socket path {sock_path} is longer than {_MAX_UNIX_SOCKET_PATH} bytes; "
                "use a shorter base_dir"
            )
        if os.geteuid() != 0:
            return
        import pwd  # POSIX-only; imported lazily so the module still imports elsewhere.

        pw = pwd.getpwnam(PG_OS_USER)
        for path in (self.data_dir, self.socket_dir, self.log_file):
            os.chown(path, pw.pw_uid, pw.pw_gid)
        self.data_dir.chmod(0o700)  # initdb/postgres insist on 0700 (or 0750)
        self.socket_dir.chmod(0o755)  # let any local user reach the socket
        _ensure_traversable(self.base_dir, pw.pw_uid, pw.pw_gid)

    def _initdb(self) -> None:
        """A new cluster in the (empty) data dir: a copy of the cache's when there is one,
        else made by initdb (and then kept in the cache)."""
        cache = self._cached_cluster()
        if cache is not None and (cache / "PG_VERSION").is_file():
            # cp -a keeps the owner (the postgres user, when root) and the modes
            self._copy_cluster(cache, self.data_dir)
            return
        self._run_pg_tool(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                PG_SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
                # C.UTF-8 always exists on Debian and avoids failures when the caller's
                # LANG names a locale that is not generated.
                "--locale=C.UTF-8",
            ],
        )
        if cache is not None:
            staging = Path(tempfile.mkdtemp(prefix=".initdb-", dir=cache.parent))
            try:
                self._copy_cluster(self.data_dir, staging)
                with contextlib.suppress(OSError):  # another process kept its copy first
                    staging.rename(cache)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _cached_cluster(self) -> Path | None:
        """The cache's cluster for this server's binaries (one per bin dir)."""
        if self.initdb_cache is None:
            return None
        self.initdb_cache.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9]+", "-", str(self.bindir)).strip("-")
        return self.initdb_cache / name

    @staticmethod
    def _copy_cluster(source: Path, target: Path) -> None:
        subprocess.run(["cp", "-a", f"{source}/.", str(target)], check=True)

    # -- public API

    def is_initialized(self) -> bool:
        """Whether ``pgdata`` already holds a cluster (then start() reuses it)."""
        return (self.data_dir / "PG_VERSION").is_file()

    def is_running(self) -> bool:
        """Whether a postmaster is serving this data dir (per ``pg_ctl status``)."""
        if not self.is_initialized():
            return False
        proc = self._run_pg_tool(
            [str(self.bindir / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False
        )
        return proc.returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        """initdb if needed, then start and wait until it accepts connections.

        A no-op if a server is already running on this data dir (its port is adopted;
        an explicit, different port is an error rather than being silently ignored).
        """
        if self.is_running():
            running = self._running_port()
            if running is not None:
                if self._explicit_port is not None and running != self._explicit_port:
                    raise LocalServerError(
                        f"PostgreSQL in {self.data_dir} already runs on port {running}, "
                        f"not {self._explicit_port}; stop it first"
                    )
                self.port = running
            self.port_file.write_text(f"{self.port}\n")
            self.wait_ready(timeout)
            return
        self._prepare_dirs()
        if not self.is_initialized():
            leftovers = list(self.data_dir.iterdir())
            if leftovers:
                raise LocalServerError(
                    f"{self.data_dir} is not empty but holds no cluster (failed initdb?); "
                    "delete it and retry"
                )
            self._initdb()
        # pg_ctl hands -o to /bin/sh, hence the quoting of the socket path.
        opts = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            f"-k {shlex.quote(str(self.socket_dir))}",
            "-c max_connections=200",
        ]
        if not self.fsync:
            opts.append("-c fsync=off")
        self.port_file.write_text(f"{self.port}\n")
        proc = self._run_pg_tool(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(int(timeout)),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                " ".join(opts),
            ],
            timeout=timeout + 30,
            check=False,
        )
        if proc.returncode != 0:
            raise LocalServerError(
                f"PostgreSQL failed to start on port {self.port} (pg_ctl exit "
                f"{proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}\n"
                f"{_log_tail(self.log_file)}"
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``pg_isready`` over TCP until the server accepts connections."""
        deadline = time.monotonic() + timeout
        argv = [
            str(self.bindir / "pg_isready"),
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            PG_SUPERUSER,
            "-d",
            "postgres",
        ]
        while True:
            rc = subprocess.run(argv, env=_clean_env(), check=False, timeout=30).returncode
            if rc == 0:
                return
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"PostgreSQL on 127.0.0.1:{self.port} not ready after {timeout:.0f}s "
                    f"(pg_isready exit {rc})\n{_log_tail(self.log_file)}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (disconnect clients, no waiting for them); no-op if not running."""
        if not self.is_running():
            return
        self._run_pg_tool(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-w",
                "-m",
                "fast",
                "-t",
                str(int(timeout)),
                "-D",
                str(self.data_dir),
            ],
            timeout=timeout + 30,
        )

    def dsn(self, database: str = "postgres", *, unix: bool = False) -> str:
        """libpq/asyncpg URL for ``database`` as the trust-authenticated superuser, over TCP
        or (``unix``) the socket in ``pgsock/``."""
        if unix:
            host = quote(str(self.socket_dir), safe="/")  # a path with `#`, `+` or `%` in it
            return f"postgresql://{PG_SUPERUSER}@/{database}?host={host}&port={self.port}"
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with the ``psql`` client over TCP and return its unaligned output.

        Runs as the caller (clients may run as root), ignores ~/.psqlrc (-X) and stops on
        the first error so failures surface as LocalServerError.
        """
        argv = [
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            PG_SUPERUSER,
            "-d",
            database,
            "-c",
            sql,
        ]
        proc = subprocess.run(
            argv, env=_clean_env(), capture_output=True, text=True, check=False, timeout=120
        )
        if proc.returncode != 0:
            raise LocalServerError(f"psql failed: {sql!r}: {proc.stderr.strip()}")
        return proc.stdout

    def database_exists(self, name: str) -> bool:
        """Whether a database called ``name`` exists."""
        literal = "'" + name.replace("'", "''") + "'"
        out = self.psql(f"SELECT 1 FROM pg_database WHERE datname = {literal}")
        return out.strip() == "1"

    def create_database(self, name: str, template: str | None = None) -> None:
        """CREATE DATABASE, optionally cloned from ``template``.

        Cloning a migrated template is much faster than re-running migrations per test;
        note PostgreSQL refuses to clone while anyone else is connected to the template.
        """
        sql = f"CREATE DATABASE {_quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {_quote_ident(template)}"
        self.psql(sql)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ... WITH (FORCE): disconnects leftover test sessions."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")


def _quote_ident(name: str) -> str:
    """Quote an SQL identifier (database names may come from test ids)."""
    return '"' + name.replace('"', '""') + '"'


def _ensure_traversable(path: Path, uid: int, gid: int) -> None:
    """Make sure user uid/gid can reach ``path``, adding o+x only where that is acceptable.

    Acceptable means ``path`` itself (we own it) or a directory strictly inside this
    project or the system temp dir. Anything else (e.g. a 0700 /root) raises instead,
    because silently opening a user's home is not ours to do.
    """
    import os.path as osp

    allowed_roots = [PROJECT_ROOT, Path(tempfile.gettempdir()).resolve()]
    try:
        import grp
        import pwd

        user = pwd.getpwuid(uid).pw_name
        groups = {gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    except (ImportError, KeyError):
        groups = {gid}
    blocked: list[Path] = []
    for directory in [*reversed(path.parents), path]:
        st = directory.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if ok:
            continue
        fixable = directory == path or any(
            directory != root and osp.commonpath([directory, root]) == str(root)
            for root in allowed_roots
        )
        if not fixable:
            blocked.append(directory)
            continue
        directory.chmod(st.st_mode | stat.S_IXOTH)
    if blocked:
        raise LocalServerError(
            f"the {PG_OS_USER!r} OS user cannot traverse {', '.join(map(str, blocked))} to "
            f"reach {path}; run `chmod o+x` on it or use a base dir under the project or "
            f"{tempfile.gettempdir()}"
        )


# ------------------------------------------------------------------------------ Redis


class RedisServer:
    """A private ``redis-server`` in ``base_dir`` on 127.0.0.1.

    Two modes: a child process (default; ideal for tests, which can :meth:`kill` and
    :meth:`restart` it to simulate outages) or ``daemonize=True`` for the dev stack, which
    must outlive the launching process. Either way ``redis.pid`` is written, so any
    process can later find and stop the server. With ``persistent=True`` the AOF
    (``appendfsync everysec``) survives restarts - but a :meth:`kill` may lose the last
    second of writes, just like production.
    """

    def __init__(self, base_dir: Path, port: int | None = None, *, persistent: bool = True) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.log_file = self.base_dir / "redis.log"
        self.pid_file = self.base_dir / "redis.pid"
        self.port_file = self.base_dir / "redis.port"
        # beside TCP, a Unix socket: a client on the same machine skips the TCP stack (see
        # `up --unix`); left out where the path is too long for one
        socket_path = self.base_dir / "redis.sock"
        self.socket_path = socket_path if len(str(socket_path)) < _MAX_UNIX_SOCKET_PATH else None
        self.persistent = persistent
        self._explicit_port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._daemonize = False
        if port is not None:
            self.port = port
        else:
            remembered = _read_int_file(self.port_file)
            if remembered is not None and (self.is_running() or _port_is_free(remembered)):
                self.port = remembered
            else:
                self.port = free_port()

    def _pid(self) -> int | None:
        """Pid of the live server for this base_dir, or None (stale pidfiles ignored)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc.pid
            self._proc = None  # reaped
        pid = _read_int_file(self.pid_file)
        if pid is not None and _pid_alive(pid, "redis-server"):
            return pid
        return None

    def is_running(self) -> bool:
        """Whether the server process for this base_dir is alive."""
        return self._pid() is not None

    def url(self, db: int = 0, *, unix: bool = False) -> str:
        """redis-py URL for logical database ``db``, over TCP or (``unix``) the Unix socket."""
        if unix and self.socket_path is not None:
            return f"unix://{quote(str(self.socket_path), safe='/')}?db={db}"
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self, timeout: float = 1.0) -> bool:
        """Raw RESP PING over TCP (no redis-cli needed); False while loading or down."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, daemonize: bool = False, timeout: float = 15.0) -> None:
        """Start the server and wait until it answers PING; no-op if already running.

        ``daemonize=True`` detaches it (``--daemonize yes``) so it outlives this process.
        """
        if self.is_running():
            self.wait_ready(timeout)
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()  # stale; a fresh one marks successful start-up
        argv = [
            str(find_redis_server()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--dir",
            str(self.base_dir),
            "--logfile",
            str(self.log_file),
            "--pidfile",
            str(self.pid_file),
            "--daemonize",
            "yes" if daemonize else "no",
            "--save",
            "",
        ]
        if self.socket_path is not None:
            argv += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        self.port_file.write_text(f"{self.port}\n")
        self._daemonize = daemonize
        if daemonize:
            proc = subprocess.run(
                argv,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
                timeout=30,
            )
            if proc.returncode != 0:
                raise LocalServerError(
                    f"redis-server --daemonize yes failed (exit {proc.returncode}): "
                    f"{proc.stderr.decode(errors='replace')}\n{_log_tail(self.log_file)}"
                )
        else:
            self._proc = subprocess.Popen(
                argv, cwd=self.base_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait for +PONG (not just an open port: Redis says -LOADING while replaying AOF).

        Also requires our own process to be alive, so a foreign server that happens to hold
        the port (pidfile absent: redis writes it only after binding) is not mistaken for ours.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise LocalServerError(
                    f"redis-server exited with {rc} during start-up on port {self.port}\n"
                    f"{_log_tail(self.log_file)}"
                )
            if self.ping() and self._pid() is not None:
                return
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"Redis on 127.0.0.1:{self.port} not ready after {timeout:.0f}s\n"
                    f"{_log_tail(self.log_file)}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful SIGTERM (flushes the AOF), escalating to SIGKILL; no-op if not running."""
        self._signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, simulating a crash (un-fsynced AOF writes may be lost)."""
        self._signal_and_wait(signal.SIGKILL, 10.0)

    def restart(self, timeout: float = 15.0) -> None:
        """Stop then start on the same port and dir, keeping data when persistent.

        Keeps the previous mode (child vs daemonized). Works after :meth:`kill` too.
        """
        self.stop(timeout)
        self.start(daemonize=self._daemonize, timeout=timeout)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        proc, self._proc = self._proc, None
        if proc is not None:  # our child: reap it so it does not linger as a zombie
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        elif not _wait_pid_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not _wait_pid_gone(pid, 10):
                raise LocalServerError(f"redis-server pid {pid} did not exit")
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()  # redis leaves it behind on SIGKILL


# -------------------------------------------------------------------------------- CLI


def _servers(args: argparse.Namespace) -> tuple[PostgresServer, RedisServer]:
    base = Path(args.dir).resolve()
    pg = PostgresServer(base, getattr(args, "pg_port", None))
    redis = RedisServer(base, getattr(args, "redis_port", None), persistent=True)
    return pg, redis


def _log(msg: str) -> None:
    print(f"localservers: {msg}", file=sys.stderr)


def _cmd_up(args: argparse.Namespace) -> int:
    pg, redis = _servers(args)
    pg.start()
    _log(f"postgres ready on 127.0.0.1:{pg.port} ({pg.data_dir})")
    if not pg.database_exists(args.database):
        pg.create_database(args.database)
        _log(f"created database {args.database!r}")
    redis.start(daemonize=True)
    _log(f"redis ready on 127.0.0.1:{redis.port} ({redis.base_dir})")
    if args.unix and (redis.socket_path is None or not redis.socket_path.exists()):
        # a Redis started before it had a socket (an older stack), or a --dir too long for one
        raise LocalServerError(
            f"redis in {redis.base_dir} has no Unix socket; run `down`, then `up --unix` "
            "(with a shorter --dir if the path is too long)"
        )
    print(f"export DATABASE_URL={shlex.quote(pg.dsn(args.database, unix=args.unix))}")
    print(f"export REDIS_URL={shlex.quote(redis.url(unix=args.unix))}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    pg, redis = _servers(args)
    redis.stop()
    _log("redis stopped")
    pg.stop()
    _log("postgres stopped")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    pg, redis = _servers(args)
    pg_up, redis_up = pg.is_running(), redis.is_running()
    print(f"postgres: {'running ' + pg.dsn(args.database) if pg_up else 'stopped'}")
    print(f"redis:    {'running ' + redis.url() if redis_up else 'stopped'}")
    return 0 if pg_up and redis_up else 3


def main(argv: list[str] | None = None) -> int:
    """Entry point for the ``up`` / ``down`` / ``status`` dev-stack commands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (
        ("up", _cmd_up, "start both servers (detached) and print export lines"),
        ("down", _cmd_down, "stop both servers"),
        ("status", _cmd_status, "show state; exit 3 unless both are running"),
    ):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--dir", default=".local", help="state directory (default: .local)")
        p.add_argument("--database", default="notifyd", help="application database name")
        if name == "up":
            p.add_argument("--pg-port", type=int, default=None)
            p.add_argument("--redis-port", type=int, default=None)
            p.add_argument(
                "--unix",
                action="store_true",
                help="print URLs over the servers' Unix sockets instead of TCP (cheaper for "
                "a daemon on the same machine)",
            )
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except LocalServerError as exc:
        _log(f"error: {exc}")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
