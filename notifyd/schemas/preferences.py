"""A user's notification preferences: opted-out channels and categories (the PUT body and
the answer)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from notifyd.schemas.fields import CATEGORY_PATTERN, Channel, Flag

MAX_CATEGORIES = 100

_CATEGORY_KEY = Annotated[str, Field(pattern=CATEGORY_PATTERN)]


class Preferences(BaseModel):
    """`false` opts out of a channel or a category; left out (or `true`) opts in. A PUT
    replaces the whole document."""

    model_config = ConfigDict(extra="forbid")

    channels: dict[Channel, Flag] | None = None
    categories: (
        Annotated[
            dict[_CATEGORY_KEY, Flag],
            Field(
                max_length=MAX_CATEGORIES,
                # pydantic says the key rule as patternProperties, which lets any other key
                # through in JSON Schema; propertyNames says what the server does
                json_schema_extra={
                    "propertyNames": {"pattern": CATEGORY_PATTERN},
                    "additionalProperties": {"type": "boolean"},
                },
            ),
        ]
        | None
    ) = None
