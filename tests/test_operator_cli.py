"""The operator commands, run as real subprocesses against the test PostgreSQL and Redis:
`notifyd send`, `notifyd dlq list | requeue`, `notifyd reminders list`, `notifyd stats`.

Promises checked (each test names its own): a notification sent from the shell takes the REST
route's path (row + audit row, then the intent) and is delivered by a running daemon; bad
input names the flag and stores nothing; dead letters (a delivery refused with SMTP 550, a
poison entry) are listed newest first and go back where they came from, once; reminders are
filtered by due time, tenant and status; stats report what is in Redis and PostgreSQL; an
unreachable server is one readable line and exit code 1.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from notifyd.ids import uuid7
from tests.conftest import DaemonFactory
from tests.helpers import Api, base_env, run_cli, wait_for
from tests.smtp_sink import SmtpSink

TENANT = "TEN-0001"
INTENTS = "notifyd:intents"
DEAD = "notifyd:dead"
DELIVER_EMAIL = "notifyd:deliver:email"
TIMER = "notifyd:timer"
NO_POSTGRES = "postgresql://nobody@127.0.0.1:1/none"
NO_REDIS = "redis://127.0.0.1:1/0"

# Fast retries and sweeps so failures and requeues play out in milliseconds.
FAST = {
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
}


@pytest.fixture
def env(database_url: str, redis_url: str) -> dict[str, str]:
    """The settings a command needs to reach this test's PostgreSQL and Redis."""
    return base_env(database_url, redis_url)


async def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `notifyd ARGS` off the event loop, so an in-process daemon keeps working."""
    return await asyncio.to_thread(run_cli, *args, env=env, timeout=60)


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


async def status_of(db: asyncpg.Connection, notification_id: str) -> str | None:
    status: str | None = await db.fetchval(
        "SELECT status FROM notifications WHERE id = $1::uuid", notification_id
    )
    return status


async def wait_status(db: asyncpg.Connection, notification_id: str, status: str) -> None:
    async def reached() -> bool:
        return await status_of(db, notification_id) == status

    await wait_for(reached, timeout=20)


async def send(env: dict[str, str], *args: str) -> str:
    result = await cli("send", "--tenant", TENANT, *args, env=env)
    answer = json.loads(ok(result))
    assert answer["status"] == "queued" and answer["enqueued"] is True, answer
    [notification_id] = answer["notification_ids"]
    return str(notification_id)


# --- send --------------------------------------------------------------------------------------


async def test_send_in_app_takes_the_rest_path_and_is_delivered(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, env: dict[str, str]
) -> None:
    """Promise: `notifyd send` stores the row and an audit row naming the CLI, enqueues the
    intent, and the running daemon delivers it: the user sees it in the notification center."""
    daemon = await daemon_factory()
    notification_id = await send(
        env, "--to", "auth0|42", "--subject", "Smoke", "--message", "Hello from the shell"
    )
    await wait_status(db, notification_id, "sent")
    row = await db.fetchrow(
        "SELECT channel, recipient, user_id, created_by, subject, body FROM notifications "
        "WHERE id = $1::uuid",
        notification_id,
    )
    assert row is not None
    assert dict(row) == {
        "channel": "in_app",
        "recipient": "auth0|42",
        "user_id": "auth0|42",
        "created_by": "cli",
        "subject": "Smoke",
        "body": "Hello from the shell",
    }
    [entry] = await db.fetch(
        "SELECT user_id, tenant_id, details FROM audit_log WHERE action = 'notification.send'"
    )
    assert (entry["user_id"], entry["tenant_id"]) == ("cli", TENANT)
    details = json.loads(entry["details"])
    assert details["via"] == "cli"
    assert details["notification_id"] == notification_id
    assert details["channel"] == "in_app"
    async with Api(daemon) as api:
        status, listed, _ = await api.get("/notifications/", tenant=TENANT, user="auth0|42")
    assert status == 200
    assert [n["id"] for n in listed] == [notification_id]
    assert listed[0]["is_sent"] is True


async def test_send_email_arrives_at_the_smtp_server(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    env: dict[str, str],
) -> None:
    """Promise: an email sent from the shell reaches the SMTP server once, with its subject."""
    await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port))
    notification_id = await send(
        env,
        "--to", "cand-7",
        "--channel", "email",
        "--recipient", "candidate@example.com",
        "--subject", "Interview Scheduled",
        "--message", "Your interview is tomorrow at 10 AM.",
    )  # fmt: skip
    await wait_status(db, notification_id, "sent")
    [received] = await asyncio.to_thread(smtp_sink.wait_for, 1, 20)
    assert received.notifyd_id == notification_id
    assert received.rcpt_tos == ["candidate@example.com"]
    assert str(received.message["Subject"]) == "Interview Scheduled"
    user_id = await db.fetchval(
        "SELECT user_id FROM notifications WHERE id = $1::uuid", notification_id
    )
    assert user_id == "cand-7"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        pytest.param(["--channel", "email", "--subject", "S", "--message", "M"], "--recipient",
                     id="email-without-recipient"),
        pytest.param(["--channel", "email", "--recipient", "nobody", "--subject", "S",
                      "--message", "M"], "--recipient", id="not-an-email-address"),
        pytest.param(["--channel", "email", "--recipient", "a@example.com", "--message", "M"],
                     "--subject", id="email-without-subject"),
        pytest.param(["--channel", "email", "--recipient", "a@example.com", "--subject",
                      "Hello\x0cReply-To\t: x@evil.test", "--message", "M"], "--subject",
                     id="subject-with-a-form-feed"),
        pytest.param(["--subject", "S"], "--message", id="no-message"),
        pytest.param(["--message", "M", "--context", '{"a": 1}'], "--context",
                     id="context-without-template"),
        pytest.param(["--template-key", "interview_reminder", "--context", "[1, 2]"], "--context",
                     id="context-not-an-object"),
        pytest.param(["--message", "M", "--actor", "a b"], "--actor", id="bad-actor"),
        # these reach PostgreSQL: the region's phone rules, the tenant's templates
        pytest.param(["--channel", "sms", "--recipient", "7568992589", "--message", "M"],
                     "--recipient", id="national-number-invalid-in-US"),
        pytest.param(["--template-key", "no_such_template", "--context", "{}"], "--template-key",
                     id="unknown-template"),
        pytest.param(["--template-key", "interview_reminder", "--context", "{}"], "--context",
                     id="template-variable-missing"),
    ],
)  # fmt: skip
async def test_send_refuses_bad_input_naming_the_flag_and_stores_nothing(
    db: asyncpg.Connection, redis: Redis, env: dict[str, str], args: list[str], flag: str
) -> None:
    """Promise: bad input is exit code 2 with the flag at fault, and changes nothing."""
    result = await cli("send", "--tenant", TENANT, "--to", "auth0|42", *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"notifyd send: {flag}:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0
    assert await redis.xlen(INTENTS) == 0


# --- unreachable servers -----------------------------------------------------------------------

SEND = ["send", "--tenant", TENANT, "--to", "auth0|42", "--message", "M"]
DUE = ["reminders", "list", "--due-before", "2030-01-01T00:00:00Z"]


@pytest.mark.parametrize(
    ("down", "args"),
    [
        ("postgres", SEND),
        ("postgres", ["stats"]),
        ("postgres", DUE),
        ("redis", SEND),
        ("redis", ["stats"]),
        ("redis", ["dlq", "list"]),
        ("redis", ["dlq", "requeue", "--all"]),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]),
)
async def test_an_unreachable_server_is_one_line_and_exit_code_1(
    db: asyncpg.Connection, database_url: str, redis_url: str, down: str, args: list[str]
) -> None:
    """Promise: a command that cannot reach PostgreSQL or Redis says which setting to check,
    without a traceback, exits 1, and (send) stores nothing."""
    env = base_env(
        NO_POSTGRES if down == "postgres" else database_url,
        NO_REDIS if down == "redis" else redis_url,
    )
    result = await cli(*args, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    setting = "DATABASE_URL" if down == "postgres" else "REDIS_URL"
    assert setting in result.stderr
    assert "Traceback" not in result.stderr
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0


# --- dead letters ------------------------------------------------------------------------------


async def dead_letters(env: dict[str, str], *args: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(ok(await cli("dlq", "list", "--json", *args, env=env)))
    return document


async def test_failed_deliveries_are_listed_and_requeued_like_the_retry_route(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    env: dict[str, str],
) -> None:
    """Promise: deliveries refused with SMTP 550 are listed newest first with their reason;
    `dlq requeue ID` restarts one as POST /notifications/{id}/retry/ does (audited, fresh
    attempts, sent once) and removes its dead letter; a copy whose notification was requeued
    already (here by the route) is only removed; an id no longer there is exit code 1."""
    smtp_sink.fail_next(2, "550 5.7.1 Message rejected as spam")
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port), **FAST)
    email = ["--channel", "email", "--recipient", "c@example.com", "--subject", "S"]
    first = await send(env, "--to", "cand-1", *email, "--message", "first")
    await wait_status(db, first, "failed")
    second = await send(env, "--to", "cand-2", *email, "--message", "second")
    await wait_status(db, second, "failed")

    listed = await dead_letters(env)
    assert listed["total"] == 2
    newest, oldest = listed["entries"]
    assert [newest["notification_id"], oldest["notification_id"]] == [second, first]
    for entry in (newest, oldest):
        assert entry["kind"] == "delivery"
        assert entry["stream"] == DELIVER_EMAIL
        assert entry["tenant_id"] == TENANT
        assert "550" in entry["reason"] and "rejected as spam" in entry["reason"]
        assert entry["tries"] == 1
    assert [e["id"] for e in (await dead_letters(env, "--limit", "1"))["entries"]] == [newest["id"]]
    text = ok(await cli("dlq", "list", env=env))
    assert newest["id"] in text and oldest["id"] in text and "550" in text
    assert text.index(newest["id"]) < text.index(oldest["id"])

    # the first through the REST route; its dead letter stays behind until the CLI's turn
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            f"/notifications/{first}/retry/", tenant=TENANT, user="admin-1", role="admin"
        )
    assert status == 202, body
    await wait_status(db, first, "sent")

    result = await cli("dlq", "requeue", newest["id"], env=env)
    assert f"{newest['id']}  requeued" in ok(result)
    await wait_status(db, second, "sent")
    await asyncio.to_thread(smtp_sink.wait_for, 2, 20)
    assert sorted(r.notifyd_id or "" for r in smtp_sink.received) == sorted([first, second])
    record = await db.fetchrow(
        "SELECT attempts, last_error FROM notifications WHERE id = $1::uuid", second
    )
    assert record is not None and (record["attempts"], record["last_error"]) == (1, None)
    [audited] = await db.fetch(
        "SELECT user_id, details FROM audit_log WHERE action = 'notification.retry' "
        "AND details->>'via' = 'cli'"
    )
    assert audited["user_id"] == "cli"
    assert json.loads(audited["details"])["notification_id"] == second
    assert json.loads(audited["details"])["dead_letter"] == newest["id"]

    outcomes = json.loads(ok(await cli("dlq", "requeue", "--all", "--json", env=env)))
    assert [(o["id"], o["outcome"]) for o in outcomes] == [(oldest["id"], "already_requeued")]
    assert await redis.xlen(DEAD) == 0
    assert len(smtp_sink.received) == 2  # nothing sent twice

    again = await cli("dlq", "requeue", newest["id"], env=env)
    assert again.returncode == 1
    assert "not_found" in again.stdout


async def test_a_poison_entry_goes_back_on_its_stream_once(
    daemon_factory: DaemonFactory, redis: Redis, env: dict[str, str]
) -> None:
    """Promise: an entry a consumer gave up on is listed with its stream, group, reason and
    original fields, and `dlq requeue --all` puts exactly those fields back on that stream
    as a new entry, and deletes the dead letter."""
    fields = {"v": "1", "data": "not json"}
    daemon = await daemon_factory(**FAST)
    poison_id: Any = await redis.xadd(INTENTS, fields)  # type: ignore[arg-type]

    async def dead_lettered() -> bool:
        return bool(await redis.xlen(DEAD))

    await wait_for(dead_lettered, timeout=10)
    await daemon.stop()  # so the requeued entry stays where the command put it

    [entry] = (await dead_letters(env))["entries"]
    assert entry["kind"] == "entry"
    assert (entry["stream"], entry["group"], entry["entry"]) == (
        INTENTS,
        "dispatch",
        poison_id.decode(),
    )
    assert entry["fields"] == fields
    assert entry["reason"]

    outcomes = json.loads(ok(await cli("dlq", "requeue", "--all", "--json", env=env)))
    assert [(o["id"], o["outcome"], o["stream"]) for o in outcomes] == [
        (entry["id"], "requeued", INTENTS)
    ]
    assert await redis.xlen(DEAD) == 0
    on_stream: Any = await redis.xrange(INTENTS)
    copies = [
        (i, f) for i, f in on_stream if f == {k.encode(): v.encode() for k, v in fields.items()}
    ]
    assert copies[0][0] == poison_id
    assert len(copies) == 2 and copies[1][0] > poison_id

    empty = json.loads(ok(await cli("dlq", "requeue", "--all", "--json", env=env)))
    assert empty == []


async def test_dlq_requeue_refuses_bad_ids_and_needs_ids_or_all(env: dict[str, str]) -> None:
    """Promise: usage mistakes are exit code 2 and say what is expected."""
    for args in (["dlq", "requeue"], ["dlq", "requeue", "1-0", "--all"]):
        result = await cli(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert "--all" in result.stderr
    result = await cli("dlq", "requeue", "not-an-id", env=env)
    assert result.returncode == 2
    assert "'not-an-id' is not a stream entry id" in result.stderr


# --- reminders ---------------------------------------------------------------------------------

INSERT_REMINDER = """
INSERT INTO interview_reminders (id, tenant_id, application_id, candidate_id, employer_id,
                                 created_by, interview_time, reminder_time, status)
VALUES ($1, $2, $3, 'cand-1', 'emp-1', 'backend', $4::timestamptz + interval '1 hour', $4, $5)
"""


async def test_reminders_list_filters_by_due_time_tenant_and_status(
    db: asyncpg.Connection, env: dict[str, str]
) -> None:
    """Promise: `reminders list` shows reminders due before the time (soonest first), only
    scheduled ones unless asked, of every tenant unless one is named."""
    now = datetime.now(UTC).replace(microsecond=0)
    made: dict[str, uuid.UUID] = {}
    for name, tenant, due_in, status in [
        ("a-soon", "TEN-A", 10, "scheduled"),
        ("b-soon", "TEN-B", 20, "scheduled"),
        ("a-soonest", "TEN-A", 5, "scheduled"),
        ("a-later", "TEN-A", 300, "scheduled"),
        ("a-cancelled", "TEN-A", 15, "cancelled"),
    ]:
        made[name] = uuid7()
        await db.execute(
            INSERT_REMINDER, made[name], tenant, name, now + timedelta(minutes=due_in), status
        )
    before = (now + timedelta(minutes=60)).isoformat().replace("+00:00", "Z")

    async def listed(*args: str) -> list[str]:
        result = await cli("reminders", "list", "--due-before", before, "--json", *args, env=env)
        document = json.loads(ok(result))
        by_id = {str(v): k for k, v in made.items()}
        return [by_id[r["id"]] for r in document["reminders"]]

    assert await listed() == ["a-soonest", "a-soon", "b-soon"]
    assert await listed("--tenant", "TEN-A") == ["a-soonest", "a-soon"]
    assert await listed("--status", "cancelled") == ["a-cancelled"]
    assert await listed("--status", "all", "--tenant", "TEN-A") == [
        "a-soonest",
        "a-soon",
        "a-cancelled",
    ]
    assert await listed("--tenant", "TEN-C") == []

    text = ok(await cli("reminders", "list", "--due-before", before, "--limit", "2", env=env))
    assert str(made["a-soonest"]) in text and str(made["a-soon"]) in text
    assert str(made["b-soon"]) not in text
    assert "more match" in text

    result = await cli("reminders", "list", "--due-before", "2030-01-01T10:00:00", env=env)
    assert result.returncode == 2
    assert "--due-before" in result.stderr and "offset" in result.stderr


# --- stats -------------------------------------------------------------------------------------

INSERT_NOTIFICATION = """
INSERT INTO notifications (id, tenant_id, created_by, channel, recipient, body, status)
VALUES ($1, 'TEN-0001', 'backend', 'in_app', 'auth0|42', 'hello', $2)
"""


async def test_stats_report_what_is_in_redis_and_postgresql(
    db: asyncpg.Connection, redis: Redis, env: dict[str, str]
) -> None:
    """Promise: stream lengths, a group's consumers, pending entries and lag, the timer's size
    and next due time, the dead letters and the rows by status are the numbers put there."""
    for n in range(3):
        await redis.xadd(INTENTS, {"n": str(n)})
    await redis.xgroup_create(INTENTS, "dispatch", id="0")
    await redis.xreadgroup("dispatch", "worker-1", {INTENTS: ">"}, count=2)
    await redis.xadd(DELIVER_EMAIL, {"n": "0"})
    soonest = datetime.now(UTC) + timedelta(minutes=5)
    await redis.zadd(
        TIMER,
        {b"one": soonest.timestamp() * 1000, b"two": (soonest.timestamp() + 600) * 1000},
    )
    await redis.xadd(DEAD, {"reason": "x"})
    await redis.xadd(DEAD, {"reason": "y"})
    for status in ("queued", "queued", "sent", "failed"):
        await db.execute(INSERT_NOTIFICATION, uuid7(), status)

    stats = json.loads(ok(await cli("stats", "--json", env=env)))
    streams = {s["stream"]: s for s in stats["streams"]}
    assert streams[INTENTS]["length"] == 3
    [group] = streams[INTENTS]["groups"]
    assert (group["group"], group["consumers"], group["pending"], group["lag"]) == (
        "dispatch",
        1,
        2,
        1,
    )
    assert streams[DELIVER_EMAIL] == {"stream": DELIVER_EMAIL, "length": 1, "groups": []}
    assert streams["notifyd:reminders"]["length"] == 0
    assert streams[DEAD]["length"] == 2
    assert stats["dead_letters"] == 2
    assert stats["timer"]["key"] == TIMER and stats["timer"]["size"] == 2
    next_due = datetime.fromisoformat(stats["timer"]["next_due"])
    assert abs((next_due - soonest).total_seconds()) < 0.01
    assert 0 < stats["timer"]["next_due_in_s"] <= 300
    assert stats["notifications"] == {
        "by_status": {"failed": 1, "queued": 2, "sent": 1},
        "total": 4,
    }

    text = ok(await cli("stats", env=env)).splitlines()
    assert any(line.split() == [INTENTS, "3", "dispatch", "1", "2", "1"] for line in text), text
    assert any(line.split() == [DEAD, "2", "-", "-", "-", "-"] for line in text), text
    assert any(line.startswith(f"timer {TIMER}: 2 entries, next due") for line in text), text
    assert any(line.split() == ["queued", "2"] for line in text), text
    assert any(line.split() == ["total", "4"] for line in text), text


# --- help --------------------------------------------------------------------------------------


def test_help_names_the_operator_commands() -> None:
    result = run_cli("--help", env={}, timeout=30)
    assert result.returncode == 0, result.stderr
    for command in ("send", "dlq", "reminders", "stats"):
        assert command in result.stdout
    requeue = run_cli("dlq", "requeue", "--help", env={}, timeout=30)
    assert "/notifications/{id}/retry/" in requeue.stdout
