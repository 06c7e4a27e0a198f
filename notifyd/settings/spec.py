"""A plain view of each field's declaration in `Settings`, for the loader and the generated
listings (check-config, the example TOML, docs/settings.md). Derived, never written by hand."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import annotated_types
from pydantic import BeforeValidator
from pydantic.fields import FieldInfo

from notifyd.settings.model import TYPE_NAMES, Settings

# each field's declaration, as pydantic keeps it for a pydantic dataclass
FIELDS: dict[str, FieldInfo] = cast(Any, Settings).__pydantic_fields__


@dataclass(frozen=True)
class Spec:
    """One setting: attribute, environment names (the first is the one to use), TOML key,
    whether it is secret, its help, what it holds, its bounds and why they are there."""

    name: str
    env: tuple[str, ...]
    toml: str
    secret: bool
    help: str
    kind: str
    bounds: str
    note: str
    default: Any


def _spec(name: str) -> Spec:
    field = FIELDS[name]
    extra = cast(dict[str, Any], field.json_schema_extra)
    kind, bounds = "", []
    for item in field.metadata:
        if isinstance(item, BeforeValidator):
            kind = TYPE_NAMES.get(item.func, kind)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Ge):
            bounds.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            bounds.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            bounds.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.Lt):
            bounds.append(f"< {item.lt}")
    return Spec(
        name=name,
        env=tuple(extra["env"]),
        toml=str(extra["toml"]),
        secret=bool(extra["secret"]),
        help=field.description or "",
        kind=kind,
        bounds=", ".join(bounds),
        note=str(extra["note"]),
        default=field.get_default(call_default_factory=True),
    )


SPECS: tuple[Spec, ...] = tuple(_spec(name) for name in FIELDS)
