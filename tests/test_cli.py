"""The `notifyd` command line, run as a real subprocess: check-config, token, migrate, serve."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import jwt

from notifyd.store import migrate
from tests.helpers import ROOT, TEST_JWT_SECRET, Api, base_env, run_cli

# never contacted by these commands; only there so the settings are complete
UNUSED_REDIS = "redis://127.0.0.1:1/0"
DB_PASSWORD = "db-pass-0xA1"
MASKED_DB_URL = f"postgresql://notifyd:{DB_PASSWORD}@127.0.0.1:5432/notifyd"
ALL_VERSIONS = [m.version for m in migrate.discover()]


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


# --- check-config ----------------------------------------------------------------------------


def test_check_config_prints_settings_with_secrets_masked() -> None:
    env = base_env(
        MASKED_DB_URL,
        "redis://:redis-pass-0xB2@127.0.0.1:6379/0",
        EMAIL_HOST_PASSWORD="smtp-pass-0xD4",
        TWILIO_AUTH_TOKEN="twilio-token-0xE5",
    )
    result = run_cli("check-config", env=env, timeout=30)
    text = output(result)
    assert result.returncode == 0, text
    assert "configuration is valid" in result.stdout
    for secret in (TEST_JWT_SECRET, DB_PASSWORD, "redis-pass-0xB2", "smtp-pass-0xD4", "0xE5"):
        assert secret not in text
    assert "postgresql://notifyd:***@127.0.0.1:5432/notifyd" in result.stdout
    assert "JWT_SECRET" in result.stdout and "***" in result.stdout
    assert "NOTIFYD_PORT" in result.stdout


def test_check_config_masks_a_password_given_in_a_socket_urls_query() -> None:
    """`unix:///run/redis.sock?password=…` (redis-py) and libpq's `?password=` carry it
    outside the user part of the URL."""
    env = base_env(
        "postgresql://notifyd@/notifyd?host=/run/postgresql&password=db-pass-0xA1",
        "unix:///run/redis/redis.sock?db=0&password=redis-pass-0xC3",
    )
    result = run_cli("check-config", env=env, timeout=30)
    text = output(result)
    assert result.returncode == 0, text
    assert "db-pass-0xA1" not in text and "redis-pass-0xC3" not in text
    assert "unix:///run/redis/redis.sock?db=0&password=***" in result.stdout


def test_check_config_names_every_bad_value_and_fails() -> None:
    env = base_env(MASKED_DB_URL, UNUSED_REDIS, NOTIFYD_PORT="abc", EMAIL_PORT="smtp")
    result = run_cli("check-config", env=env, timeout=30)
    text = output(result)
    assert result.returncode != 0, text
    assert "NOTIFYD_PORT" in text and "EMAIL_PORT" in text
    assert "NOT valid" in text
    assert DB_PASSWORD not in text and TEST_JWT_SECRET not in text


def test_check_config_names_bad_port_and_missing_jwt_secret_together() -> None:
    env = base_env(MASKED_DB_URL, UNUSED_REDIS, NOTIFYD_PORT="abc")
    del env["JWT_SECRET"]
    result = run_cli("check-config", env=env, timeout=30)
    text = output(result)
    assert result.returncode != 0, text
    assert "NOTIFYD_PORT" in text
    assert "JWT_SECRET" in text


def test_check_config_warns_about_each_event_source_open_to_every_tenant() -> None:
    """The promise (issue 24, "ingestion is bound to tenants"): open stays the default for
    compatibility, so check-config says which running source any tenant may publish
    through; a source bound to a list is not warned about, nor a switched-off one."""
    broker = {"NOTIFYD_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/"}
    result = run_cli("check-config", env=base_env(MASKED_DB_URL, UNUSED_REDIS, **broker))
    assert result.returncode == 0, output(result)
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "NOTIFYD_EVENTS_TENANTS: is *" in warnings[0]
    assert "NOTIFYD_RABBITMQ_TENANTS: is *" in warnings[1]

    bound = base_env(MASKED_DB_URL, UNUSED_REDIS, NOTIFYD_EVENTS_TENANTS="TEN-1,TEN-2")
    result = run_cli("check-config", env=bound)
    assert result.returncode == 0 and "warning:" not in result.stdout, output(result)
    off = base_env(MASKED_DB_URL, UNUSED_REDIS, NOTIFYD_EVENTS_ENABLED="false", **broker)
    assert "warning:" not in run_cli("check-config", env=off).stdout


def test_check_config_refuses_an_empty_or_mixed_tenant_binding() -> None:
    env = base_env(
        MASKED_DB_URL,
        UNUSED_REDIS,
        NOTIFYD_EVENTS_TENANTS=" ",
        NOTIFYD_RABBITMQ_TENANTS="*,TEN-1",
        NOTIFYD_RABBITMQ_USER_TENANTS="svc-a=TEN-1;svc-b",
    )
    result = run_cli("check-config", env=env)
    text = output(result)
    assert result.returncode != 0, text
    assert "NOTIFYD_EVENTS_TENANTS: list the tenants" in text
    assert "NOTIFYD_RABBITMQ_TENANTS: * (every tenant) or a list" in text
    assert "NOTIFYD_RABBITMQ_USER_TENANTS" in text and "'svc-b'" in text


def test_check_config_reads_dotenv_in_the_working_folder_and_toml(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"JWT_SECRET={TEST_JWT_SECRET}\nEMAIL_HOST=dotenv-smtp\n")
    config = tmp_path / "notifyd.toml"
    config.write_text('[server]\nport = 9100\n[email]\nhost = "toml-smtp"\n')
    result = run_cli("--config", str(config), "check-config", env={}, cwd=tmp_path, timeout=30)
    assert result.returncode == 0, output(result)
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["EMAIL_HOST", "dotenv-smtp"] for line in lines), lines
    assert any(line.split()[:2] == ["NOTIFYD_PORT", "9100"] for line in lines), lines
    assert TEST_JWT_SECRET not in result.stdout


def test_other_commands_refuse_bad_settings_with_the_names() -> None:
    env = base_env(MASKED_DB_URL, UNUSED_REDIS, NOTIFYD_PORT="abc")
    result = run_cli("token", "--tenant", "T", "--user", "U", env=env, timeout=30)
    assert result.returncode == 2
    assert "NOTIFYD_PORT" in result.stderr
    assert "check-config" in result.stderr


# --- token ---------------------------------------------------------------------------------


def test_token_prints_a_jwt_with_the_given_claims() -> None:
    before = int(time.time())
    result = run_cli(
        "token", "--tenant", "T", "--user", "U", "--role", "admin", "--ttl", "60",
        env=base_env(MASKED_DB_URL, UNUSED_REDIS),
        timeout=30,
    )  # fmt: skip
    after = int(time.time())
    assert result.returncode == 0, output(result)
    token = result.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    claims = jwt.decode(token, TEST_JWT_SECRET, algorithms=["HS256"])
    assert (claims["tenant_id"], claims["user_id"], claims["role"]) == ("T", "U", "admin")
    assert before + 60 <= claims["exp"] <= after + 60
    assert before <= claims["iat"] <= after


def test_token_uses_the_configured_claim_names_and_expiry() -> None:
    env = base_env(
        MASKED_DB_URL,
        UNUSED_REDIS,
        JWT_TENANT_CLAIM="org",
        JWT_USER_CLAIM="sub",
        JWT_EXPIRY="120",
        JWT_ISSUER="https://auth.example.com/",
        JWT_AUDIENCE="notifyd",
    )
    result = run_cli("token", "--tenant", "TEN-0001", "--user", "auth0|42", env=env, timeout=30)
    assert result.returncode == 0, output(result)
    claims = jwt.decode(
        result.stdout.strip(),
        TEST_JWT_SECRET,
        algorithms=["HS256"],
        audience="notifyd",
        issuer="https://auth.example.com/",
    )
    assert (claims["org"], claims["sub"], claims["role"]) == ("TEN-0001", "auth0|42", "user")
    assert claims["exp"] - claims["iat"] == 120


def test_token_refuses_an_id_outside_the_safe_set() -> None:
    result = run_cli(
        "token", "--tenant", "TEN 0001", "--user", "U",
        env=base_env(MASKED_DB_URL, UNUSED_REDIS),
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--tenant" in result.stderr
    assert result.stdout == ""


async def test_token_from_the_cli_is_accepted_by_the_daemon(api: Api) -> None:
    settings = api.daemon.settings
    env = base_env(settings.database_url, settings.effective_redis_url)
    result = run_cli("token", "--tenant", "TEN-0001", "--user", "auth0|42", env=env, timeout=30)
    assert result.returncode == 0, output(result)
    status, body, _ = await api.get("/notifications/", bearer=result.stdout.strip())
    assert (status, body) == (200, [])


# --- migrate -------------------------------------------------------------------------------


async def applied_versions(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [r["version"] for r in rows]


async def test_migrate_applies_once_then_has_nothing_to_do(empty_database_url: str) -> None:
    env = base_env(empty_database_url, UNUSED_REDIS)
    first = run_cli("migrate", env=env, timeout=60)
    assert first.returncode == 0, output(first)
    assert "0001_initial" in first.stdout
    assert f"applied: {', '.join(ALL_VERSIONS)}" in first.stdout

    second = run_cli("migrate", env=env, timeout=60)
    assert second.returncode == 0, output(second)
    assert "nothing to apply" in second.stdout
    assert await applied_versions(empty_database_url) == ALL_VERSIONS


def test_two_concurrent_migrates_apply_each_version_once(empty_database_url: str) -> None:
    """Two processes started together: the advisory lock makes one apply, the other wait."""
    env = {"PATH": os.environ.get("PATH", ""), **base_env(empty_database_url, UNUSED_REDIS)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "notifyd", "migrate"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results: list[tuple[int, str]] = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        results.append((proc.returncode, stdout + stderr))
    assert [code for code, _ in results] == [0, 0], results
    appliers = [text for _, text in results if "applied:" in text]
    assert len(appliers) == 1, results
    assert asyncio.run(applied_versions(empty_database_url)) == ALL_VERSIONS


async def test_migrate_reports_an_unreachable_database() -> None:
    env = base_env("postgresql://nobody@127.0.0.1:1/none", UNUSED_REDIS)
    result = run_cli("migrate", env=env, timeout=30)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr


# --- serve ---------------------------------------------------------------------------------


async def test_serve_refuses_an_unmigrated_database(
    empty_database_url: str, redis_url: str
) -> None:
    """Redis is reachable and the port free: only the missing schema stops it."""
    result = run_cli("serve", env=base_env(empty_database_url, redis_url), timeout=30)
    assert result.returncode != 0, output(result)
    assert "notifyd migrate" in result.stderr, result.stderr
