"""Dockerfile, .dockerignore, docker-compose.yml and docs/deploy.md hold together.

Docker cannot run here (no daemon), so these read the files the way Docker and Compose would
and check what a broken deployment would get wrong: an image that runs as root or runs the
wrong command, a COPY of a file the build context leaves out, migrations the image cannot
find, a compose environment with a name notifyd does not read (silently ignored: the daemon
would talk to localhost), notifyd starting before its migrations or backing services, Redis
without its append-only file, a documented env file or nginx block that would not work.
The image's HEALTHCHECK command itself is run against a real daemon.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from notifyd.app import Daemon
from notifyd.cli import build_parser, cmd_migrate, cmd_serve
from notifyd.settings import SPECS, Settings, load_settings
from scripts.localservers import free_port
from tests.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# every environment name notifyd reads: the settings table, plus the file it points at
NOTIFYD_NAMES = {name for spec in SPECS for name in spec.env} | {"NOTIFYD_CONFIG"}
# what the image may set besides notifyd's settings: the interpreter's own switches
IMAGE_ENV_NOT_SETTINGS = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
OPERATOR_ENV = {"JWT_SECRET": "compose-test-secret-0123456789abcdef"}


# --- Dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def read_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops these, inside a continuation too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        pending = ""
    return instructions


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    """Build stages, with ARG defaults declared before the first FROM substituted into FROM."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in read_dockerfile(path):
        if instruction.keyword == "ARG" and not result:
            name, _, default = instruction.value.partition("=")
            global_args[name] = default
        elif instruction.keyword == "FROM":
            words = [w for w in instruction.value.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {instruction.line}: FROM {instruction.value}"
            result.append(Stage(base, name))
        else:
            assert result, f"line {instruction.line}: {instruction.keyword} before FROM"
            result[-1].instructions.append(instruction)
    return result


def exec_form(instruction: Instruction) -> list[str]:
    value = instruction.value
    assert value.startswith("["), f"line {instruction.line}: use the exec form (JSON array)"
    argv = json.loads(value)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.value)
        if "=" not in words[0]:  # legacy `ENV NAME value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            name, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: {word!r} is not NAME=value"
            env[name] = value
    return env


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: PurePosixPath  # absolute, resolved against WORKDIR
    from_stage: str | None


def copies(stage: Stage) -> list[Copy]:
    result: list[Copy] = []
    workdir = PurePosixPath("/")
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.value
        elif instruction.keyword in {"COPY", "ADD"}:
            words = shlex.split(instruction.value)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            result.append(Copy(paths[:-1], workdir / paths[-1], from_stage))
    return result


def workdir_before(stage: Stage, line: int) -> PurePosixPath:
    workdir = PurePosixPath("/")
    for instruction in stage.all("WORKDIR"):
        if instruction.line < line:
            workdir = workdir / instruction.value
    return workdir


def healthcheck_command(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """(options, argv) of the stage's HEALTHCHECK; a shell-form command runs under sh -c."""
    value = stage.last("HEALTHCHECK").value
    assert value.upper() != "NONE", "the image must check its own health"
    options_text, _, command = re.split(r"(?:^|\s)(CMD)\s", value, maxsplit=1)
    options = dict(
        option.removeprefix("--").split("=", 1) for option in options_text.split() if option
    )
    if command.startswith("["):
        argv = [str(a) for a in json.loads(command)]
        return options, argv[1:] if argv[0] == "CMD" else argv
    return options, ["/bin/sh", "-c", command]


def image_argv(stage: Stage, command: list[str] | None = None) -> list[str]:
    """What a container of this stage runs: ENTRYPOINT + (the given command, or CMD)."""
    entrypoint = exec_form(stage.last("ENTRYPOINT")) if stage.all("ENTRYPOINT") else []
    return entrypoint + (command if command is not None else exec_form(stage.last("CMD")))


def notifyd_subcommand(argv: list[str]) -> Any:
    """The function the notifyd CLI would run for `argv`, parsed by the CLI's own parser."""
    assert argv and argv[0] == "notifyd", f"{argv} does not run the notifyd executable"
    return build_parser().parse_args(argv[1:]).func


def runtime_stage() -> Stage:
    return stages()[-1]


def test_dockerfile_is_multi_stage_and_the_runtime_copies_the_builders_venv() -> None:
    *builders, runtime = stages()
    assert builders, "a builder stage keeps pip and its caches out of the image"
    names = {stage.name for stage in builders}
    assert None not in names, "every build stage is named (FROM ... AS name)"
    assert all(stage.base.startswith("python:") and "slim" in stage.base for stage in stages())
    venvs = {
        match[1]
        for stage in builders
        for run in stage.all("RUN")
        for match in re.finditer(r"python -m venv (\S+)", run.value)
    }
    assert venvs, "the builder creates a virtualenv"
    from_builder = {str(c.sources[0]) for c in copies(runtime) if c.from_stage in names}
    assert venvs <= from_builder, f"the runtime copies {from_builder}, not the venv {venvs}"
    assert all("pip" not in r.value for r in runtime.all("RUN")), "the runtime installs nothing"


def test_builder_installs_the_locked_versions() -> None:
    runs = [run.value for stage in stages()[:-1] for run in stage.all("RUN")]
    installs = [run for run in runs if "pip install" in run]
    assert installs
    for run in installs:
        assert re.search(r"(--constraint|-c|-r|--requirement)\s+requirements\.lock", run), (
            f"unpinned install: {run}"
        )


def test_image_runs_as_an_unprivileged_user() -> None:
    runtime = runtime_stage()
    user = runtime.last("USER")
    name, _, group = user.value.partition(":")
    assert name not in {"root", "0"} and group not in {"root", "0"}
    later = [i for i in runtime.instructions if i.line > user.line and i.keyword == "USER"]
    assert not later
    if name.isdigit():  # the uid has a passwd entry, so HOME and `id` make sense
        assert any(f"--uid {name}" in run.value for run in runtime.all("RUN"))


def test_image_entrypoint_runs_notifyd_serve() -> None:
    assert notifyd_subcommand(image_argv(runtime_stage())) is cmd_serve
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["notifyd"] == "notifyd.cli:main", "the console script the image calls"


def test_image_listens_on_every_interface_at_the_exposed_port() -> None:
    runtime = runtime_stage()
    env = env_of(runtime)
    exposed = {word.split("/")[0] for i in runtime.all("EXPOSE") for word in i.value.split()}
    settings = load_settings({**env, "JWT_SECRET": "x" * 32}, dotenv_file=None, config_file=None)
    assert settings.host == "0.0.0.0", "inside a container 127.0.0.1 is unreachable"
    assert {str(settings.port)} == exposed


def test_image_environment_names_are_settings_notifyd_reads() -> None:
    for stage in stages():
        for name in env_of(stage):
            if name in IMAGE_ENV_NOT_SETTINGS or name.startswith("PIP_"):
                continue
            assert name in NOTIFYD_NAMES, f"Dockerfile sets {name}, which notifyd never reads"


def test_image_healthcheck_probes_healthz_without_curl() -> None:
    options, argv = healthcheck_command(runtime_stage())
    command = " ".join(argv)
    assert "/healthz" in command and "urllib" in command
    assert "curl" not in command and "wget" not in command, "the slim image has neither"
    assert options.keys() >= {"interval", "timeout", "retries"}


async def run_healthcheck(port: int) -> int:
    _, argv = healthcheck_command(runtime_stage())
    # `python` as the image resolves it (PATH=/opt/venv/bin:...): here, this venv's python
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "NOTIFYD_PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_image_healthcheck_passes_against_a_running_daemon(daemon: Daemon) -> None:
    assert await run_healthcheck(daemon.port) == 0


async def test_image_healthcheck_fails_when_nothing_answers() -> None:
    assert await run_healthcheck(free_port()) != 0


# --- build context ------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception `!`, pattern) in file order; the last match decides, as in Docker."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        text = line.removeprefix("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(text):
            if text.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif text.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif text[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif text[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(text[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def in_build_context(relative: str) -> bool:
    """Whether Docker sends this repository path to the builder (a pattern matching a parent
    folder matches everything inside it)."""
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negate, pattern in dockerignore_patterns():
        if any(pattern.match(candidate) for candidate in candidates):
            included = negate
    return included


def copied_sources() -> list[str]:
    local = [c for stage in stages() for c in copies(stage) if c.from_stage is None]
    return [source for c in local for source in c.sources]


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    sources = copied_sources()
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        files = [p for p in files if "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing to copy"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert in_build_context(relative), f"{relative} is copied but .dockerignore drops it"


def test_build_context_leaves_out_secrets_local_state_and_byte_code() -> None:
    for relative in (
        ".env",
        ".venv/bin/python",
        ".local/pgdata/postgresql.conf",
        ".git/config",
        "notifyd/__pycache__/cli.cpython-311.pyc",
        "tests/conftest.py",
    ):
        assert not in_build_context(relative), f"{relative} would be sent to the builder"


def test_dockerignore_check_follows_the_last_matching_pattern() -> None:
    """The matcher the two tests above rely on can say no, and honours `!` exceptions."""
    assert in_build_context("notifyd/cli.py")
    assert not in_build_context("notifyd/__pycache__/app.cpython-311.pyc")
    assert not in_build_context("Dockerfile.backup")


def test_the_image_installs_notifyd_regularly_and_keeps_only_the_venv() -> None:
    """The migrations ship inside the package (tests/test_packaging.py proves a wheel serves),
    so the builder installs it like any package and the runtime needs no source tree."""
    *builders, runtime = stages()
    installs = [
        run.value for stage in builders for run in stage.all("RUN") if "pip install" in run.value
    ]
    assert installs, "no build stage installs notifyd"
    for run in installs:
        assert not re.search(r"(--editable|-e)\s", run), f"an editable install: {run}"
    sources = {str(source) for stage in builders for c in copies(stage) for source in c.sources}
    assert not any(source.rstrip("/").endswith("sql") for source in sources), sources
    from_builder = [str(c.sources[0]) for c in copies(runtime) if c.from_stage]
    assert from_builder == ["/opt/venv"], f"the runtime copies {from_builder}"


def test_lock_pins_every_runtime_dependency_the_image_installs() -> None:
    """Installing with the lock as constraints pins only what the lock names: every package
    notifyd needs at run time must be there, at a version pyproject.toml accepts."""
    locked = {
        canonicalize_name(name): Version(version)
        for name, version in re.findall(
            r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M
        )
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    queue = [(Requirement(text), {""}) for text in project["dependencies"]]
    seen: set[str] = set()
    while queue:
        requirement, extras = queue.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in extras
        ):
            continue
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is needed at run time but not locked"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock has {name}=={locked[name]}, outside {requirement}"
        )
        if name in seen:
            continue
        seen.add(name)
        wanted = {""} | set(requirement.extras)
        for text in importlib.metadata.distribution(requirement.name).requires or []:
            queue.append((Requirement(text), wanted))
    assert {"aiohttp", "asyncpg", "redis", "uvloop"} <= seen


# --- docker-compose.yml -------------------------------------------------------------------


class MissingVariable(Exception):
    pass


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_]\w*))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `$$`."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["plain"]:
            return env.get(match["plain"], "")
        parsed = re.fullmatch(r"([A-Za-z_]\w*)(?:(:?[-?+])(.*))?", match["braced"], re.S)
        assert parsed, f"cannot read ${{{match['braced']}}}"
        name, operator, argument = parsed[1], parsed[2], parsed[3] or ""
        is_set, value = name in env, env.get(name, "")
        if operator is None:
            return value
        if operator in {":?", "?"}:
            if not (value if operator == ":?" else is_set):
                raise MissingVariable(f"{name}: {argument}")
            return value
        if operator in {":-", "-"}:
            return value if (value if operator == ":-" else is_set) else argument
        return argument if (value if operator == ":+" else is_set) else ""

    return _VARIABLE.sub(substitute, text)


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): interpolate(str(v), env) for k, v in raw.items()}


def built_images() -> set[str]:
    return {s["image"] for s in services().values() if "build" in s and "image" in s}


def runs_notifyd_image(service: Mapping[str, Any]) -> bool:
    return "build" in service or service.get("image") in built_images()


def notifyd_services() -> dict[str, dict[str, Any]]:
    found = {name: s for name, s in services().items() if runs_notifyd_image(s)}
    assert found
    return found


def service_argv(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    assert "entrypoint" not in service, "keep the image's entrypoint"
    return image_argv(runtime_stage(), command)


def service_named(predicate_image: str) -> str:
    names = [n for n, s in services().items() if predicate_image in str(s.get("image", ""))]
    assert len(names) == 1, f"one service runs {predicate_image}, found {names}"
    return names[0]


def duration(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def the_server() -> str:
    (name,) = [n for n, s in notifyd_services().items() if service_argv(s)[1:] == ["serve"]]
    return name


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in services().items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if "image" in service and "build" not in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), (
                f"{name}: pin the image tag"
            )


def test_long_running_services_have_health_checks() -> None:
    server = the_server()
    wanted = {
        server,
        service_named("postgres"),
        service_named("redis"),
        service_named("mailpit"),
    }
    for name in wanted:
        service = services()[name]
        check = service.get("healthcheck")
        if check is None and runs_notifyd_image(service):
            healthcheck_command(runtime_stage())  # inherited from the image: it must exist
            continue
        assert check and not check.get("disable"), f"{name} has no health check"
        assert check["test"] and check["test"][0] in {"CMD", "CMD-SHELL"}, check


def test_notifyd_waits_for_its_migrations_and_healthy_backing_services() -> None:
    server = services()[the_server()]
    depends = server["depends_on"]
    migrators = [n for n, s in notifyd_services().items() if service_argv(s)[1:2] == ["migrate"]]
    assert len(migrators) == 1, "one service applies the migrations, once"
    assert depends[migrators[0]]["condition"] == "service_completed_successfully"
    for backing in (service_named("postgres"), service_named("redis")):
        assert depends[backing]["condition"] == "service_healthy", backing


def test_migrate_is_a_one_shot_notifyd_migrate_after_postgresql() -> None:
    (name,) = [n for n, s in notifyd_services().items() if service_argv(s)[1:2] == ["migrate"]]
    service = services()[name]
    assert notifyd_subcommand(service_argv(service)) is cmd_migrate
    assert str(service.get("restart", "no")) == "no", "a one-shot must not be restarted"
    assert service["depends_on"][service_named("postgres")]["condition"] == "service_healthy"
    assert notifyd_subcommand(service_argv(services()[the_server()])) is cmd_serve


def test_notifyd_environment_names_are_settings_notifyd_reads() -> None:
    for name, service in notifyd_services().items():
        unknown = set(environment(service, OPERATOR_ENV)) - NOTIFYD_NAMES
        assert not unknown, f"{name} sets {sorted(unknown)}, which notifyd never reads"


def test_notifyd_environment_loads_and_points_at_the_compose_services() -> None:
    all_services = services()
    for name, service in notifyd_services().items():
        env = {**env_of(runtime_stage()), **environment(service, OPERATOR_ENV)}
        settings = load_settings(env, dotenv_file=None, config_file=None)
        database = urlsplit(settings.database_url)
        postgres = environment(all_services[service_named("postgres")], OPERATOR_ENV)
        assert database.hostname == service_named("postgres"), name
        assert database.username == postgres["POSTGRES_USER"]
        assert database.password == postgres["POSTGRES_PASSWORD"]
        assert database.path == f"/{postgres['POSTGRES_DB']}"
        redis = urlsplit(settings.effective_redis_url)
        assert (redis.hostname, redis.port) == (service_named("redis"), 6379)
        assert settings.email_host == service_named("mailpit")
        assert settings.email_port == 1025, "mailpit's SMTP port"
        assert settings.jwt_secret == OPERATOR_ENV["JWT_SECRET"]


def test_compose_ships_no_default_jwt_secret() -> None:
    for service in notifyd_services().values():
        with pytest.raises(MissingVariable, match="JWT_SECRET"):
            environment(service, {})


def test_redis_keeps_an_append_only_file_fsynced_every_second() -> None:
    redis = services()[service_named("redis")]
    command = redis["command"]
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    assert words[0] == "redis-server"
    options = dict(zip(words[1::2], words[2::2], strict=True))
    assert options.get("--appendonly") == "yes"
    assert options.get("--appendfsync") == "everysec"
    assert options.get("--maxmemory-policy") == "noeviction", "an evicted stream is lost work"
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", [])), "AOF on a volume"


def test_notifyd_gets_time_to_shut_down_gracefully() -> None:
    server = services()[the_server()]
    env = environment(server, OPERATOR_ENV)
    bound = float(env.get("NOTIFYD_SHUTDOWN_TIMEOUT", Settings().shutdown_timeout))
    assert duration(server["stop_grace_period"]) > bound


def test_interpolation_matches_compose() -> None:
    """The helper the compose checks read values with: defaults, required, escapes."""
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$x $SET", env) == (
        "v d  d $x v"
    )
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?needed}", env)
    assert interpolate("${EMPTY?needed}", env) == ""


# --- docs/deploy.md -----------------------------------------------------------------------


def fenced_blocks(language: str | None = None) -> list[str]:
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
    return [body for lang, body in blocks if language is None or lang == language]


def documented_env_file() -> dict[str, str]:
    marker = "# /etc/notifyd/notifyd.env"
    (block,) = [b for b in fenced_blocks() if b.startswith(marker)]
    env: dict[str, str] = {}
    for line in block.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not NAME=value: {line!r}"
        env[name] = value
    return env


def test_documented_env_file_uses_names_notifyd_reads_and_is_valid() -> None:
    env = documented_env_file()
    unknown = set(env) - NOTIFYD_NAMES
    assert not unknown, f"docs/deploy.md sets {sorted(unknown)}, which notifyd never reads"
    assert {"DATABASE_URL", "JWT_SECRET", "EMAIL_HOST", "NOTIFYD_TENANT_SECRET_KEY"} <= set(env)
    assert {"TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE"} <= set(env)
    load_settings(env, dotenv_file=None, config_file=None)


def test_documented_nginx_upgrades_websockets_and_outlives_the_heartbeat() -> None:
    blocks = fenced_blocks("nginx")
    assert blocks, "docs/deploy.md has no nginx block"
    config = "\n".join(blocks)
    location = re.search(r"location\s+/ws/\s*\{(?P<body>[^}]*)\}", config)
    assert location, "no `location /ws/` block"
    body = location["body"]
    assert re.search(r"proxy_http_version\s+1\.1;", body)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade;", body)
    assert re.search(r"proxy_set_header\s+Connection\s+\S+;", body)
    timeout = re.search(r"proxy_read_timeout\s+(\d+)s?;", body)
    assert timeout, "nginx closes a quiet upstream after 60 s unless told otherwise"
    heartbeat = Settings().ws_heartbeat
    documented = documented_env_file().get("NOTIFYD_WS_HEARTBEAT")
    assert int(timeout[1]) > float(documented or heartbeat)
