"""`python -m bench.validation_cost [--against REF]`: what reading POST /notifications/send/'s
body costs per request, in µs, the pydantic model (`Schemas.send.json`) against the
hand-written reader of REF (`Fields` + `accept.rule_problems`, as of issue 26's start).

No daemon: the readers alone, on two bodies (the `rest_ingest` body and a templated email
with every optional field), in alternating rounds of `timeit` (the machine is shared: the
median of the rounds and the best one are both printed). REF's two modules are read with
`git show` into a temporary directory and imported from there.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from notifyd import tags
from notifyd.ids import OpaqueIdRule
from notifyd.schemas.registry import Schemas
from notifyd.settings import CHANNELS, Settings

BODIES = {
    "rest_ingest body": b'{"notification_type":"in_app","recipient":"user-17",'
    b'"message":"bench 0-12345"}',
    "email, template, all fields": orjson.dumps(
        {
            "notification_type": "email",
            "recipient": "ana@example.com",
            "subject": "Your interview",
            "template_key": "interview.scheduled",
            "context": {"name": "Ana", "when": "Tuesday 10:00", "room": "3B"},
            "user_id": "cand-42",
            "category": "interviews",
            "locale": "pt-BR",
        }
    ),
}


def old_reader(ref: str, settings: Settings) -> Callable[[bytes], None]:
    """REF's send body reading, as its handler did it."""
    where = Path(tempfile.mkdtemp(prefix="validation_cost_"))
    for name, path in (
        ("old_validation", "notifyd/http/validation.py"),
        ("old_accept", "notifyd/accept.py"),
    ):
        source = subprocess.run(
            ["git", "show", f"{ref}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        (where / f"{name}.py").write_text(source)
    sys.path.insert(0, str(where))
    validation: Any = importlib.import_module("old_validation")
    accept: Any = importlib.import_module("old_accept")
    rule = OpaqueIdRule.from_settings(settings.id_max_length, settings.id_pattern)

    def read(raw: bytes) -> None:
        fields = validation.Fields(orjson.loads(raw), rule)
        channel = fields.choice("notification_type", CHANNELS)
        recipient = fields.string("recipient", max_length=accept.RECIPIENT_MAX_LENGTH)
        subject = fields.string("subject", required=False, max_length=settings.subject_max_length)
        message = fields.string(
            "message", required=False, max_length=settings.notification_max_length
        )
        template_key = fields.string(
            "template_key", required=False, max_length=accept.TEMPLATE_KEY_MAX_LENGTH
        )
        context = fields.mapping("context", max_keys=settings.context_max_keys)
        user_id = fields.opaque_id("user_id", required=False)
        category = fields.string("category", required=False, max_length=accept.CATEGORY_MAX_LENGTH)
        fields.boolean("critical")
        locale = fields.string("locale", required=False, max_length=tags.LOCALE_MAX_LENGTH)
        for problem in accept.rule_problems(
            channel=channel,
            recipient=recipient,
            subject=subject,
            message=message,
            template_key=template_key,
            context=context,
            user_id=user_id,
            category=category,
            locale=locale,
            id_rule=rule,
            at_fault={error.field for error in fields.errors},
        ):
            fields.error(problem.field, problem.message)
        fields.done()

    return read


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--against", default="ae25b2e", help="the commit of the old reader")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=20_000, help="bodies per round")
    options = parser.parse_args(argv)
    settings = Settings()
    send = Schemas.build(settings).send
    readers: dict[str, Callable[[bytes], None]] = {
        f"{options.against} (orjson + Fields + rule_problems)": old_reader(
            options.against, settings
        ),
        "pydantic from the bytes (Schemas.send.json)": send.json,
        "pydantic from orjson's dict (Schemas.send.python)": lambda raw: send.python(
            orjson.loads(raw)
        ),
    }
    for body, raw in BODIES.items():
        rounds: dict[str, list[float]] = {label: [] for label in readers}
        for _ in range(options.rounds):
            for label, read in readers.items():  # alternating: every round runs each reader
                seconds = timeit.timeit(lambda read=read, raw=raw: read(raw), number=options.number)
                rounds[label].append(seconds / options.number * 1e6)
        for label, costs in rounds.items():
            print(
                f"{body:28} {label:54} median {statistics.median(costs):5.2f} µs"
                f"  best {min(costs):5.2f} µs"
            )


if __name__ == "__main__":
    main()
