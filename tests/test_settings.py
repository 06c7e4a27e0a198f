"""Settings: the seeds' environment names work as written, a TOML file and `.env` are read with
a fixed precedence, every bad value is reported at once, and secrets never show.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from notifyd.settings import (
    DEFAULT_SEND_POLICY,
    Settings,
    SettingsError,
    describe,
    load_settings,
    parse_send_policy,
)

SECRET = "jwt-secret-that-is-long-enough-42"


def load(env: dict[str, str] | None = None) -> Settings:
    """Settings from exactly `env` (plus a JWT secret), no `.env`, no TOML."""
    return load_settings({"JWT_SECRET": SECRET, **(env or {})}, dotenv_file=None)


def problems_of(env: dict[str, str], config_file: Path | None = None) -> list[str]:
    """The problems `load_settings` reports for `env` (it must refuse)."""
    with pytest.raises(SettingsError) as caught:
        load_settings(env, config_file=config_file, dotenv_file=None)
    assert str(caught.value) == "; ".join(caught.value.problems)
    return caught.value.problems


def names(problems: list[str]) -> str:
    return "\n".join(problems)


# --- the seeds' environment names ------------------------------------------------------------


def test_seed_environment_names_work_as_written() -> None:
    s = load(
        {
            "DATABASE_URL": "postgresql://app:pw@db.internal:5433/hiring",
            "REDIS_HOST": "cache.internal",
            "REDIS_PORT": "6380",
            "EMAIL_HOST": "smtp.example.com",
            "EMAIL_PORT": "587",
            "EMAIL_HOST_USER": "mailer@example.com",
            "EMAIL_HOST_PASSWORD": "mail-pw",
            "EMAIL_USE_TLS": "True",
            "RECIPIENT_LIST": "ops@example.com, hr@example.com,,",
            "JWT_SECRET": SECRET,
            "JWT_EXPIRY": "7200",
            "TWILIO_ACCOUNT_SID": "AC123",
            "TWILIO_AUTH_TOKEN": "twilio-token",
            "TWILIO_PHONE": "+15005550006",
            "DEBUG": "True",
        }
    )
    assert s.database_url == "postgresql://app:pw@db.internal:5433/hiring"
    assert (s.redis_host, s.redis_port) == ("cache.internal", 6380)
    assert s.effective_redis_url == "redis://cache.internal:6380/0"
    assert (s.email_host, s.email_port) == ("smtp.example.com", 587)
    assert (s.email_host_user, s.email_host_password) == ("mailer@example.com", "mail-pw")
    assert s.email_use_tls is True
    assert s.recipient_list == ("ops@example.com", "hr@example.com")
    assert (s.jwt_secret, s.jwt_expiry) == (SECRET, 7200)
    assert s.effective_jwt_algorithms == ("HS256",)
    assert (s.twilio_account_sid, s.twilio_auth_token, s.twilio_phone) == (
        "AC123",
        "twilio-token",
        "+15005550006",
    )
    assert s.debug is True


@pytest.mark.parametrize(
    ("text", "value"),
    [("False", False), ("false", False), ("0", False), ("", False), ("True", True), ("1", True)],
)
def test_debug_accepts_django_style_strings(text: str, value: bool) -> None:
    assert load({"DEBUG": text}).debug is value


def test_redis_url_overrides_host_and_port() -> None:
    s = load({"REDIS_HOST": "ignored", "REDIS_PORT": "1234", "REDIS_URL": "redis://r:6390/3"})
    assert s.effective_redis_url == "redis://r:6390/3"


def test_redis_password_goes_into_the_built_url() -> None:
    s = load({"REDIS_HOST": "r", "REDIS_PASSWORD": "p@ss/word", "REDIS_DB": "2"})
    assert s.effective_redis_url == "redis://:p%40ss%2Fword@r:6379/2"


def test_defaults_need_only_a_jwt_key() -> None:
    s = load()
    assert (s.host, s.port, s.debug) == ("127.0.0.1", 8000, False)
    assert s.effective_redis_url == "redis://localhost:6379/0"
    assert s.send_policy == parse_send_policy(DEFAULT_SEND_POLICY)


# --- TOML file and precedence ------------------------------------------------------------


TOML = """
[server]
host = "0.0.0.0"
port = 9100
debug = true

[database]
url = "postgresql://toml@db/notifyd"
pool_max = 20

[redis]
host = "toml-redis"
port = 6381

[email]
host = "toml-smtp"
use_tls = true
recipient_list = ["a@example.com", "b@example.com"]

[auth]
jwt_secret = "toml-secret-that-is-long-enough"
tenant_claim = "org"
role_claim = "realm_access.roles"
algorithms = ["HS256"]

[auth.send_policy]
user = ["in_app", "email"]
service = ["email", "sms", "in_app"]

[limits]
id_max_length = 64
"""


def test_toml_file_keys(tmp_path: Path) -> None:
    config = tmp_path / "notifyd.toml"
    config.write_text(TOML)
    s = load_settings({}, config_file=config, dotenv_file=None)
    assert (s.host, s.port, s.debug) == ("0.0.0.0", 9100, True)
    assert (s.database_url, s.db_pool_max) == ("postgresql://toml@db/notifyd", 20)
    assert s.effective_redis_url == "redis://toml-redis:6381/0"
    assert (s.email_host, s.email_use_tls) == ("toml-smtp", True)
    assert s.recipient_list == ("a@example.com", "b@example.com")
    assert s.jwt_secret == "toml-secret-that-is-long-enough"
    assert (s.jwt_tenant_claim, s.jwt_role_claim) == ("org", "realm_access.roles")
    assert s.jwt_algorithms == ("HS256",)
    assert s.send_policy["user"] == frozenset({"in_app", "email"})
    assert s.send_policy["admin"] == frozenset()
    assert s.id_max_length == 64


def test_notifyd_config_names_the_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "notifyd.toml"
    config.write_text(TOML)
    s = load_settings({"NOTIFYD_CONFIG": str(config)}, dotenv_file=None)
    assert s.port == 9100


@pytest.mark.parametrize(
    ("layers", "port"),
    [
        (("env", "dotenv", "toml"), 1001),
        (("dotenv", "toml"), 1002),
        (("toml",), 1003),
        ((), 8000),
    ],
    ids=["env-wins", "dotenv-over-toml", "toml-over-default", "default"],
)
def test_precedence_env_over_dotenv_over_toml_over_default(
    tmp_path: Path, layers: tuple[str, ...], port: int
) -> None:
    env = {"JWT_SECRET": SECRET}
    if "env" in layers:
        env["NOTIFYD_PORT"] = "1001"
    dotenv = tmp_path / ".env"
    dotenv.write_text("NOTIFYD_PORT=1002\n" if "dotenv" in layers else "")
    config = tmp_path / "notifyd.toml"
    config.write_text("[server]\nport = 1003\n" if "toml" in layers else "")
    assert load_settings(env, config_file=config, dotenv_file=dotenv).port == port


def test_dotenv_file_supplies_seed_names(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        f'JWT_SECRET="{SECRET}"\n# a comment\nEMAIL_HOST=dotenv-smtp\nDEBUG=False\n'
        "NOTIFYD_CONFIG=\n"
    )
    s = load_settings({}, dotenv_file=dotenv)
    assert (s.jwt_secret, s.email_host, s.debug) == (SECRET, "dotenv-smtp", False)


def test_dotenv_can_name_the_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "notifyd.toml"
    config.write_text(TOML)
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"NOTIFYD_CONFIG={config}\nNOTIFYD_PORT=9200\n")
    s = load_settings({}, dotenv_file=dotenv)
    assert (s.port, s.email_host) == (9200, "toml-smtp")


def test_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    assert load_settings({"JWT_SECRET": SECRET}, dotenv_file=tmp_path / "nope").port == 8000


# --- every problem at once -------------------------------------------------------------------


def test_every_unparsable_value_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "JWT_SECRET": SECRET,
            "NOTIFYD_PORT": "abc",
            "EMAIL_PORT": "twenty-five",
            "DEBUG": "maybe",
            "JWT_EXPIRY": "1h",
            "NOTIFYD_SHUTDOWN_TIMEOUT": "soon",
            "NOTIFYD_SEND_POLICY": "guest=email",
        }
    )
    text = names(problems)
    for name in (
        "NOTIFYD_PORT",
        "EMAIL_PORT",
        "DEBUG",
        "JWT_EXPIRY",
        "NOTIFYD_SHUTDOWN_TIMEOUT",
        "NOTIFYD_SEND_POLICY",
    ):
        assert name in text, text
    assert len(problems) == 6


def test_every_invalid_value_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "JWT_SECRET": "short",
            "NOTIFYD_PORT": "70000",
            "DATABASE_URL": "mysql://root@db/notifyd",
            "REDIS_URL": "http://cache",
            "NOTIFYD_LOG_LEVEL": "loud",
            "JWT_EXPIRY": "0",
            "EMAIL_USE_TLS": "true",
            "EMAIL_USE_SSL": "true",
            "RECIPIENT_LIST": "ops@example.com,not-an-address",
            "NOTIFYD_ID_PATTERN": "[unclosed",
            "NOTIFYD_PAGE_SIZE_DEFAULT": "500",
        }
    )
    text = names(problems)
    for name in (
        "JWT_SECRET",
        "NOTIFYD_PORT",
        "DATABASE_URL",
        "REDIS_URL",
        "NOTIFYD_LOG_LEVEL",
        "JWT_EXPIRY",
        "EMAIL_USE_TLS",
        "RECIPIENT_LIST",
        "NOTIFYD_ID_PATTERN",
        "NOTIFYD_PAGE_SIZE_DEFAULT",
    ):
        assert name in text, text


def test_missing_jwt_key_is_named() -> None:
    text = names(problems_of({}))
    assert "JWT_SECRET" in text
    assert "JWT_PUBLIC_KEY_FILE" in text


def test_parse_errors_and_missing_settings_are_reported_together() -> None:
    text = names(problems_of({"NOTIFYD_PORT": "abc"}))
    assert "NOTIFYD_PORT" in text
    assert "JWT_SECRET" in text


def test_toml_problems_are_named_with_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nport = "eighty"\nprot = 1\n[nonsense]\nx = 1\n')
    problems = problems_of({"JWT_SECRET": SECRET}, config_file=config)
    text = names(problems)
    assert "'server.prot'" in text
    assert "'nonsense'" in text
    assert "[server.port]" in text and "eighty" in text
    assert all(str(config) in p for p in problems)


def test_unreadable_or_invalid_toml_is_reported(tmp_path: Path) -> None:
    assert "NOTIFYD_CONFIG" in names(
        problems_of({"JWT_SECRET": SECRET}, config_file=tmp_path / "missing.toml")
    )
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1\n")
    assert "not valid TOML" in names(problems_of({"JWT_SECRET": SECRET}, config_file=broken))


def test_jwt_algorithms_must_match_the_keys(tmp_path: Path) -> None:
    text = names(problems_of({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": "RS256,none,HS999"}))
    assert "RS256 needs JWT_PUBLIC_KEY_FILE" in text
    assert "'none'" in text
    assert "'HS999'" in text
    text = names(problems_of({"JWT_PUBLIC_KEY_FILE": str(tmp_path / "absent.pem")}))
    assert "JWT_PUBLIC_KEY_FILE" in text


def test_public_key_alone_implies_rs_and_es_only(tmp_path: Path) -> None:
    key = tmp_path / "pub.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\n")
    s = load_settings({"JWT_PUBLIC_KEY_FILE": str(key)}, dotenv_file=None)
    assert s.effective_jwt_algorithms == ("RS256", "ES256")


# --- secrets ---------------------------------------------------------------------------------


SECRETS = {
    "DATABASE_URL": "postgresql://notifyd:db-pass-0xA1@db.internal:5432/notifyd",
    "REDIS_PASSWORD": "redis-pass-0xB2",
    "JWT_SECRET": "jwt-secret-0xC3-long-enough",
    "EMAIL_HOST_PASSWORD": "smtp-pass-0xD4",
    "TWILIO_AUTH_TOKEN": "twilio-token-0xE5",
}
SECRET_VALUES = ("db-pass-0xA1", "redis-pass-0xB2", "jwt-secret-0xC3", "smtp-pass-0xD4", "0xE5")


def test_describe_masks_every_secret() -> None:
    rows = describe(load_settings(SECRETS, dotenv_file=None))
    shown = "\n".join(" ".join(row) for row in rows)
    for value in SECRET_VALUES:
        assert value not in shown
    by_env = {env: value for env, _, value in rows}
    assert by_env["JWT_SECRET"] == "***"
    assert by_env["EMAIL_HOST_PASSWORD"] == "***"
    assert by_env["TWILIO_AUTH_TOKEN"] == "***"
    assert by_env["DATABASE_URL"] == "postgresql://notifyd:***@db.internal:5432/notifyd"
    assert by_env["REDIS_URL"] == ""
    # the derived redis URL carries REDIS_PASSWORD, masked
    derived = {toml: value for env, toml, value in rows if env == "(derived)"}
    assert derived["redis url"] == "redis://:***@localhost:6379/0"


def test_describe_masks_a_password_in_redis_url() -> None:
    rows = describe(load({"REDIS_URL": "redis://default:redis-pass-0xB2@cache:6379/1"}))
    assert "redis-pass-0xB2" not in "\n".join(" ".join(row) for row in rows)


def test_describe_names_every_setting_and_unset_secrets() -> None:
    rows = describe(load())
    envs = [env for env, _, _ in rows]
    assert {"DATABASE_URL", "REDIS_HOST", "REDIS_URL", "JWT_SECRET", "TWILIO_PHONE"} <= set(envs)
    assert {env: value for env, _, value in rows}["TWILIO_AUTH_TOKEN"] == "(unset)"


def test_repr_of_settings_shows_no_secret() -> None:
    text = repr(load_settings(SECRETS, dotenv_file=None))
    for value in SECRET_VALUES:
        assert value not in text
    assert "jwt_expiry=3600" in text  # ordinary fields are still shown


def test_problems_never_echo_a_secret() -> None:
    problems = problems_of(
        {
            "JWT_SECRET": "tiny-0xC3",
            "DATABASE_URL": "mysql://root:db-pass-0xA1@db/x",
            "REDIS_URL": "http://:redis-pass-0xB2@cache",
        }
    )
    text = names(problems)
    for value in ("tiny-0xC3", "db-pass-0xA1", "redis-pass-0xB2"):
        assert value not in text


# --- NOTIFYD_SEND_POLICY --------------------------------------------------------------------


def test_default_send_policy_keeps_users_to_in_app() -> None:
    policy = load().send_policy
    assert policy["user"] == frozenset({"in_app"})
    assert policy["service"] == frozenset({"email", "sms", "in_app"})
    assert policy["admin"] == frozenset({"email", "sms", "in_app"})


def test_send_policy_can_restore_the_seed_behaviour() -> None:
    policy = load(
        {"NOTIFYD_SEND_POLICY": " user = email, sms ,in_app ; service=email,sms,in_app ;"}
    ).send_policy
    assert policy["user"] == frozenset({"email", "sms", "in_app"})
    assert policy["service"] == frozenset({"email", "sms", "in_app"})
    assert policy["admin"] == frozenset()  # a role not named may send nothing


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("guest=email", "unknown role 'guest'"),
        ("user=fax", "unknown channel 'fax'"),
        ("user:in_app", "expected role=channel"),
    ],
)
def test_send_policy_errors_name_the_setting(text: str, fragment: str) -> None:
    problems = problems_of({"JWT_SECRET": SECRET, "NOTIFYD_SEND_POLICY": text})
    assert len(problems) == 1
    assert problems[0].startswith("NOTIFYD_SEND_POLICY:")
    assert fragment in problems[0]


def test_send_policy_error_in_toml_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "notifyd.toml"
    config.write_text('[auth.send_policy]\nuser = ["in_app", "pigeon"]\n')
    text = names(problems_of({"JWT_SECRET": SECRET}, config_file=config))
    assert "[auth.send_policy]" in text and "pigeon" in text


def test_trusted_proxies_are_addresses_and_networks() -> None:
    settings = load({"NOTIFYD_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8 ,::1"})
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert load().trusted_proxies == ()  # trust no one's X-Forwarded-For by default
    problems = problems_of({"JWT_SECRET": SECRET, "NOTIFYD_TRUSTED_PROXIES": "127.0.0.1,nginx"})
    assert problems == ["NOTIFYD_TRUSTED_PROXIES: not an IP address or network: 'nginx'"]


def test_the_reminder_lookahead_is_bounded_and_zero_turns_it_off() -> None:
    assert load().reminder_lookahead == 0.3
    assert load({"NOTIFYD_REMINDER_LOOKAHEAD": "0"}).reminder_lookahead == 0.0
    assert load({"NOTIFYD_REMINDER_LOOKAHEAD": "5"}).reminder_lookahead == 5.0
    for bad in ({"NOTIFYD_REMINDER_LOOKAHEAD": "-0.1"}, {"NOTIFYD_REMINDER_LOOKAHEAD": "5.5"}):
        found = problems_of({"JWT_SECRET": SECRET, **bad})
        assert [p for p in found if p.startswith("NOTIFYD_REMINDER_LOOKAHEAD")], found
    # held unacknowledged while it waits: no longer than a dead reader's work is left alone
    found = problems_of(
        {"JWT_SECRET": SECRET, "NOTIFYD_REMINDER_LOOKAHEAD": "2", "NOTIFYD_CLAIM_IDLE": "2"}
    )
    assert [p for p in found if "NOTIFYD_CLAIM_IDLE" in p], found


# --- one declaration: bounds, retired settings --------------------------------------------


def test_a_bound_names_the_setting_and_says_why() -> None:
    problems = problems_of({"JWT_SECRET": SECRET, "NOTIFYD_RETAIN_BATCH": "20000"})
    assert len(problems) == 1
    assert problems[0].startswith("NOTIFYD_RETAIN_BATCH: must be at most 10000 (")
    assert "row locks" in problems[0]


def test_every_value_has_a_bound_even_those_once_unchecked() -> None:
    problems = problems_of(
        {
            "JWT_SECRET": SECRET,
            "NOTIFYD_CONTEXT_MAX_KEYS": "0",
            "NOTIFYD_MARK_READ_MAX_IDS": "-1",
            "EMAIL_PORT": "70000",
            "JWT_LEEWAY": "-5",
        }
    )
    text = names(problems)
    for name in (
        "NOTIFYD_CONTEXT_MAX_KEYS",
        "NOTIFYD_MARK_READ_MAX_IDS",
        "EMAIL_PORT",
        "JWT_LEEWAY",
    ):
        assert name in text, text
    assert len(problems) == 4


def test_not_a_number_is_refused_where_every_comparison_would_pass() -> None:
    for value in ("nan", "inf"):
        problems = problems_of({"JWT_SECRET": SECRET, "NOTIFYD_SEND_TIMEOUT": value})
        assert problems == [f"NOTIFYD_SEND_TIMEOUT: must be a finite number, got {value!r}"]


def test_a_bound_broken_in_the_toml_file_names_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "notifyd.toml"
    config.write_text("[delivery]\nretry_cap = 0\n")
    problems = problems_of({"JWT_SECRET": SECRET}, config_file=config)
    assert problems == [f"{config} [delivery.retry_cap]: must be greater than 0"]


def test_a_retired_setting_is_a_warning_not_an_error(tmp_path: Path) -> None:
    config = tmp_path / "notifyd.toml"
    config.write_text("[delivery]\ndispatch_concurrency = 16\n")
    settings = load_settings(
        {"JWT_SECRET": SECRET, "NOTIFYD_DISPATCH_CONCURRENCY": "16"},
        config_file=config,
        dotenv_file=None,
    )
    assert len(settings.notices) == 2
    assert settings.notices[0].startswith("NOTIFYD_DISPATCH_CONCURRENCY: retired")
    assert f"{config} [delivery.dispatch_concurrency]: retired" in settings.notices[1]
    assert not hasattr(settings, "dispatch_concurrency")
    assert load().notices == ()


def test_settings_are_frozen() -> None:
    settings = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    changed = dataclasses.replace(settings, port=1, send_policy=settings.send_policy)
    assert (changed.port, changed.send_policy) == (1, settings.send_policy)


def test_check_config_prints_a_retired_setting_as_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from notifyd.cli import main

    monkeypatch.chdir(tmp_path)  # no `.env` of the checkout
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("NOTIFYD_DISPATCH_CONCURRENCY", "16")
    monkeypatch.delenv("NOTIFYD_CONFIG", raising=False)
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "warning: NOTIFYD_DISPATCH_CONCURRENCY: retired" in out
    assert "configuration is valid" in out


def test_the_generated_listings_are_printed_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from notifyd.cli import main
    from notifyd.settings import example_toml, markdown

    assert main(["settings", "--example-toml"]) == 0
    assert capsys.readouterr().out == example_toml()
    assert main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown()


def test_a_bad_signing_key_is_reported_once_not_also_as_missing() -> None:
    assert problems_of({"JWT_SECRET": "short"}) == [
        "JWT_SECRET: too short, use at least 16 characters (32 random bytes is better)"
    ]
    assert "JWT_SECRET: missing" in names(problems_of({"JWT_SECRET": ""}))
