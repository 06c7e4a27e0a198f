"""UUIDv7 ids: version and variant bits right, strictly increasing within a process even in
a burst far beyond one per millisecond, and the hex form the same id as the UUID form."""

from __future__ import annotations

import itertools
import uuid

import orjson

from notifyd.ids import uuid7, uuid7_hex
from notifyd.payloads import dumps


def test_ids_are_version_7_and_strictly_increasing_in_a_burst() -> None:
    ids = [uuid7() for _ in range(20_000)]  # many share a millisecond: the counter orders them
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_the_random_part_differs_between_ids() -> None:
    low_bits = {u.int & ((1 << 62) - 1) for u in (uuid7() for _ in range(5_000))}
    assert len(low_bits) == 5_000


def test_hex_ids_are_uuid7_and_sort_with_the_others() -> None:
    before = uuid7()
    text = uuid7_hex()
    after = uuid7()
    assert len(text) == 32 and text == text.lower()
    parsed = uuid.UUID(text)
    assert parsed.version == 7
    assert before < parsed < after


def test_ids_are_standard_uuids_wherever_they_go() -> None:
    """uuid7 makes asyncpg's C UUID (cheaper to make, print and store); it must behave as a
    `uuid.UUID` everywhere one goes: compared, hashed, printed, and in every JSON we write."""
    made = uuid7()
    standard = uuid.UUID(str(made))
    assert isinstance(made, uuid.UUID)
    assert made == standard and hash(made) == hash(standard) and {standard: 1}[made] == 1
    assert str(made) == str(standard) and made.hex == standard.hex and made.int == standard.int
    assert orjson.loads(dumps({"id": made, "ids": [made, standard]})) == {
        "id": str(made),
        "ids": [str(made), str(standard)],
    }
