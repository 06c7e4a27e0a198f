"""`notifyd dlq list | requeue`: the dead-letter stream (`Keys.dead_letters`).

Two things end up there, and each goes back its own way:

- an *entry* a consumer gave up on (`streams.consumer.StreamConsumer.dead_letter`: delivered
  too often, or poison). It holds `stream`, `group`, `entry`, `reason`, `deliveries` and the
  original fields as `f:<name>`. Requeueing puts those fields back on their stream as a new
  entry. Its notification row never changed state, so there is nothing to undo in PostgreSQL.
- a *delivery* that failed for good (`actors.sender.Sender._fail`): `stream`, `tenant_id`, `id`,
  `reason`, `attempts`. Requeueing does what `POST /notifications/{id}/retry/` does
  (`requeue.restart_failed`: the row back to `dispatched` with fresh attempts, audited), then
  puts the delivery on its channel's stream. A notification no longer failed was requeued
  already (a row leaves `failed` no other way): its dead-letter copy is only removed.

Each requeued entry is deleted from the dead stream in the same atomic step that re-adds it
(a Lua script: it is re-added only if this command deleted it), so two operators requeueing
at once add it once.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.operator import connect
from notifyd.operator.output import from_ms, iso, print_json, shorten, table
from notifyd.payloads import NotificationIntent, PayloadError
from notifyd.requeue import RETRY_ACTION, delivery_ref, restart_failed
from notifyd.settings import Settings
from notifyd.store import notifications
from notifyd.store.audit import Author
from notifyd.streams.producer import Producer

ENTRY = "entry"  # a consumer gave up on a stream entry
DELIVERY = "delivery"  # a delivery failed for good
UNKNOWN = "unknown"

_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")
_BATCH = 100

# KEYS[1] = the dead stream, KEYS[2] = the stream to put the entry back on;
# ARGV[1] = the dead entry's id, ARGV[2] = the streams' MAXLEN ~ bound, ARGV[3..] = fields.
# Only the caller that deleted the dead entry re-adds it: exactly once however many run.
REQUEUE = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return false
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    dead_lettered_at: datetime
    kind: str
    stream: str
    group: str | None
    entry: str | None  # the original entry's id on `stream` (kind entry)
    reason: str
    tries: int | None  # deliveries of the entry, or attempts of the delivery
    tenant_id: str | None
    notification_id: str | None
    reminder_id: str | None
    fields: dict[str, str] = field(default_factory=dict)  # the original entry's (kind entry)
    raw: dict[bytes, bytes] = field(default_factory=dict, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dead_lettered_at": iso(self.dead_lettered_at),
            "kind": self.kind,
            "stream": self.stream,
            "group": self.group,
            "entry": self.entry,
            "reason": self.reason,
            "tries": self.tries,
            "tenant_id": self.tenant_id,
            "notification_id": self.notification_id,
            "reminder_id": self.reminder_id,
            "fields": self.fields,
        }


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _int(value: bytes | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def parse(entry_id: bytes, raw: dict[bytes, bytes], keys: Keys) -> DeadLetter:
    """What a dead-letter entry says, whichever of the two writers made it."""
    text_id = entry_id.decode()
    stream = _text(raw.get(b"stream")) or ""
    original = {k[2:]: v for k, v in raw.items() if k.startswith(b"f:")}
    if b"group" in raw:
        kind = ENTRY
        tenant_id, ref = _text(original.get(b"tenant_id")), _text(original.get(b"id"))
        if b"data" in original:  # an intent carries its ids in a JSON document
            try:
                intent = NotificationIntent.from_fields(original)
                tenant_id, ref = intent.tenant_id, intent.notification_id
            except PayloadError:
                pass
        tries = _int(raw.get(b"deliveries"))
    elif b"id" in raw and b"tenant_id" in raw:
        kind = DELIVERY
        tenant_id, ref = _text(raw[b"tenant_id"]), _text(raw[b"id"])
        tries = _int(raw.get(b"attempts"))
    else:
        kind, tenant_id, ref, tries = UNKNOWN, None, None, None
    is_reminder = stream == keys.reminders
    return DeadLetter(
        id=text_id,
        dead_lettered_at=from_ms(int(text_id.split("-", 1)[0])),
        kind=kind,
        stream=stream,
        group=_text(raw.get(b"group")),
        entry=_text(raw.get(b"entry")),
        reason=_text(raw.get(b"reason")) or "",
        tries=tries,
        tenant_id=tenant_id,
        notification_id=None if is_reminder else ref,
        reminder_id=ref if is_reminder else None,
        fields={
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in original.items()
        },
        raw=raw,
    )


async def newest(redis: Redis, keys: Keys, limit: int) -> list[DeadLetter]:
    replies: Any = await redis.xrevrange(keys.dead_letters, "+", "-", count=limit)
    return [parse(entry_id, fields, keys) for entry_id, fields in replies]


async def list_command(settings: Settings, *, limit: int, as_json: bool) -> int:
    keys = Keys(settings.redis_prefix)
    async with connect.redis(settings) as redis:
        letters = await newest(redis, keys, limit)
        total = int(await redis.xlen(keys.dead_letters))
    if as_json:
        print_json({"total": total, "entries": [letter.as_json() for letter in letters]})
        return connect.OK
    if not letters:
        print(f"no dead letters on {keys.dead_letters}")
        return connect.OK
    rows = [
        (
            letter.id,
            letter.dead_lettered_at,
            letter.kind,
            letter.stream,
            letter.tenant_id,
            _refers_to(letter),
            letter.tries,
            shorten(letter.reason),
        )
        for letter in letters
    ]
    headers = ("ID", "DEAD-LETTERED", "KIND", "STREAM", "TENANT", "REFERS TO", "TRIES", "REASON")
    print(table(headers, rows))
    print(f"{len(letters)} of {total} dead letter(s) on {keys.dead_letters}, newest first")
    return connect.OK


def _refers_to(letter: DeadLetter) -> str | None:
    if letter.notification_id:
        return f"notification {letter.notification_id}"
    if letter.reminder_id:
        return f"reminder {letter.reminder_id}"
    return None


@dataclass(frozen=True, slots=True)
class Outcome:
    id: str
    outcome: str  # requeued | already_requeued | not_found | skipped
    detail: str
    stream: str | None = None
    notification_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("requeued", "already_requeued")

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "outcome": self.outcome,
            "detail": self.detail,
            "stream": self.stream,
            "notification_id": self.notification_id,
        }


class Requeuer:
    """Puts dead letters back; PostgreSQL is opened only for failed deliveries."""

    def __init__(self, settings: Settings, redis: Redis, keys: Keys, author: Author) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = keys
        self._author = author
        self._move = redis.register_script(REQUEUE)
        self._producer = Producer(redis, settings.stream_max_len)

    async def one(self, letter: DeadLetter, pool: asyncpg.Pool | None) -> Outcome:
        if letter.kind == ENTRY:
            return await self._entry(letter)
        if letter.kind == DELIVERY:
            assert pool is not None
            return await self._delivery(letter, pool)
        return Outcome(letter.id, "skipped", "not a dead letter notifyd wrote; left as it is")

    async def _put_back(self, letter: DeadLetter, stream: str, fields: dict[Any, Any]) -> bool:
        flat: list[Any] = [self._settings.stream_max_len]
        for key, value in fields.items():
            flat += [key, value]
        added: Any = await self._move(
            keys=[self._keys.dead_letters, stream], args=[letter.id, *flat]
        )
        return added is not None

    async def _entry(self, letter: DeadLetter) -> Outcome:
        ours = letter.stream.startswith(f"{self._keys.prefix}:")
        if not ours or letter.stream == self._keys.dead_letters or not letter.fields:
            return Outcome(letter.id, "skipped", f"cannot put back on {letter.stream!r}")
        original = {k[2:]: v for k, v in letter.raw.items() if k.startswith(b"f:")}
        if not await self._put_back(letter, letter.stream, original):
            return Outcome(letter.id, "not_found", "removed meanwhile (requeued by someone else?)")
        return Outcome(
            letter.id,
            "requeued",
            f"entry put back on {letter.stream}",
            letter.stream,
            letter.notification_id,
        )

    async def _delivery(self, letter: DeadLetter, pool: asyncpg.Pool) -> Outcome:
        assert letter.tenant_id is not None and letter.notification_id is not None
        notification_id = _uuid(letter.notification_id)
        if notification_id is None:
            return Outcome(letter.id, "skipped", "names no notification id; left as it is")
        entry = self._author.entry(
            letter.tenant_id,
            RETRY_ACTION,
            {"notification_id": str(notification_id), "dead_letter": letter.id},
        )
        async with pool.acquire() as conn, conn.transaction():
            channel = await restart_failed(conn, letter.tenant_id, notification_id, entry)
            current = (
                None
                if channel
                else await notifications.get(conn, letter.tenant_id, notification_id)
            )
        if channel is None:
            if current is None:
                return Outcome(
                    letter.id, "skipped", "its notification is not in PostgreSQL; left as it is"
                )
            # a row leaves `failed` only by a requeue: this copy is done with
            await self._redis.xdel(self._keys.dead_letters, letter.id)
            return Outcome(
                letter.id,
                "already_requeued",
                f"the notification is {current.status} already; dead letter removed",
                None,
                str(notification_id),
            )
        stream = self._keys.deliver(channel)
        # the row is ours now (the guarded UPDATE): add the delivery even if a peer removed
        # the dead letter meanwhile
        async with self._redis.pipeline(transaction=True) as pipe:
            self._producer.add_in(pipe, stream, delivery_ref(letter.tenant_id, notification_id))
            pipe.xdel(self._keys.dead_letters, letter.id)
            await pipe.execute()
        return Outcome(
            letter.id,
            "requeued",
            f"delivery restarted on {stream} (as POST /notifications/{{id}}/retry/)",
            stream,
            str(notification_id),
        )


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


async def _chosen(redis: Redis, keys: Keys, ids: list[str]) -> list[DeadLetter | str]:
    """The named entries in the order given; an id not on the stream stays a str."""
    found: list[DeadLetter | str] = []
    for entry_id in ids:
        replies: Any = await redis.xrange(keys.dead_letters, entry_id, entry_id, count=1)
        found.append(parse(replies[0][0], replies[0][1], keys) if replies else entry_id)
    return found


async def _all(redis: Redis, keys: Keys) -> list[DeadLetter]:
    """Every entry there now, oldest first (ones dead-lettered during the run wait for the
    next one, so a requeue that fails again at once cannot loop)."""
    last: Any = await redis.xrevrange(keys.dead_letters, "+", "-", count=1)
    if not last:
        return []
    end = last[0][0]
    letters: list[DeadLetter] = []
    start: bytes | str = "-"
    while True:
        replies: Any = await redis.xrange(keys.dead_letters, start, end, count=_BATCH)
        letters += [parse(entry_id, fields, keys) for entry_id, fields in replies]
        if len(replies) < _BATCH:
            return letters
        start = b"(" + replies[-1][0]


def bad_ids(ids: Iterable[str]) -> list[str]:
    return [entry_id for entry_id in ids if not _ENTRY_ID.fullmatch(entry_id)]


async def requeue_command(
    settings: Settings,
    *,
    ids: list[str],
    everything: bool,
    as_json: bool,
    author: Author,
) -> int:
    wrong = bad_ids(ids)
    if wrong:
        for entry_id in wrong:
            print(
                f"notifyd dlq requeue: {entry_id!r} is not a stream entry id "
                "(like 1712345678901-0; see `notifyd dlq list`)",
                file=sys.stderr,
            )
        return connect.REFUSED
    keys = Keys(settings.redis_prefix)
    async with connect.redis(settings) as redis:
        chosen: list[DeadLetter | str] = list(
            await _all(redis, keys) if everything else await _chosen(redis, keys, ids)
        )
        requeuer = Requeuer(settings, redis, keys, author)
        needs_db = any(isinstance(c, DeadLetter) and c.kind == DELIVERY for c in chosen)
        if needs_db:
            async with connect.postgres(settings) as pool:
                outcomes = [await _one(requeuer, item, pool) for item in chosen]
        else:
            outcomes = [await _one(requeuer, item, None) for item in chosen]
    if as_json:
        print_json([o.as_json() for o in outcomes])
    elif not outcomes:
        print(f"no dead letters on {keys.dead_letters}")
    else:
        for o in outcomes:
            print(f"{o.id}  {o.outcome}  {o.detail}")
    return connect.OK if all(o.ok for o in outcomes) else connect.FAILED


async def _one(requeuer: Requeuer, item: DeadLetter | str, pool: asyncpg.Pool | None) -> Outcome:
    if isinstance(item, str):
        return Outcome(item, "not_found", "no such entry on the dead-letter stream")
    return await requeuer.one(item, pool)
