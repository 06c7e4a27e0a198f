"""Build `Settings` from layers, lowest first: built-in default, TOML file (`NOTIFYD_CONFIG` or
`--config`), `.env` in the working folder, process environment.

Why not pydantic-settings' sources (docs/architecture.md, "Settings declared once"): its
environment source decodes lists and tables as JSON where notifyd's syntax is `a,b` and
`role=ch,ch;...`, it is case-insensitive by default where the seeds' names are not,
`Settings()` would then read `os.environ` instead of meaning "the built-in defaults", and a bad
value must be reported with where it came from (`NOTIFYD_PORT` or `notifyd.toml
[server.port]`), which a merged source no longer knows. The declaration (`model.py`) is
pydantic's; this module only picks each field's raw value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from notifyd.settings.model import Settings, SettingsError
from notifyd.settings.spec import SPECS, Spec

_ADAPTER = TypeAdapter(Settings)

# settings notifyd once read and no longer does: setting one is a warning, not an error, so an
# upgrade does not stop a daemon over a knob that had no effect (docs/settings.md, "Retired")
RETIRED: dict[str, tuple[str, str]] = {
    "NOTIFYD_DISPATCH_CONCURRENCY": (
        "delivery.dispatch_concurrency",
        "notifyd no longer reads it; remove it",
    ),
}
_BOUNDS = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be {ge} or more",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
}


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    dotenv_file: str | os.PathLike[str] | None = ".env",
) -> Settings:
    """Build the settings; raise `SettingsError` naming every bad or missing setting."""
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    dotenv: dict[str, str] = {}
    if dotenv_file is not None and Path(dotenv_file).is_file():
        dotenv = {k: v for k, v in dotenv_values(dotenv_file).items() if v is not None}
    merged = {**dotenv, **env}

    table: dict[str, Any] = {}
    config_path = config_file or merged.get("NOTIFYD_CONFIG")
    if config_path:
        try:
            table = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"NOTIFYD_CONFIG: cannot read {config_path}: {exc.strerror}")
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"NOTIFYD_CONFIG: {config_path} is not valid TOML: {exc}")
    retired_keys = {key for key, _ in RETIRED.values()}
    problems += [
        f"{config_path}: unknown key {key!r}"
        for key in _unknown_keys(table)
        if key not in retired_keys
    ]
    notices = _retired(merged, table, config_path)

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for spec in SPECS:
        for name in spec.env:
            if name in merged:
                values[spec.name], origin[spec.name] = merged[name], name
                break
        else:
            found, raw = _lookup(table, spec.toml)
            if found:
                values[spec.name], origin[spec.name] = raw, f"{config_path} [{spec.toml}]"
    settings = _validate(values, origin, problems)
    if problems or settings is None:
        raise SettingsError(problems)
    object.__setattr__(settings, "_notices", tuple(notices))  # not a field: see Settings.notices
    return settings


def _validate(
    values: dict[str, Any], origin: dict[str, str], problems: list[str]
) -> Settings | None:
    """Validate, report, drop what failed and validate again, so one run names every problem:
    defaults stand in for the values at fault and, valid on their own, add no second report.
    The rules across settings run once every single value is valid."""
    by_name = {spec.name: spec for spec in SPECS}
    failed: set[str] = set()
    while True:
        try:
            return _ADAPTER.validate_python(values, context={"failed": frozenset(failed)})
        except SettingsError as exc:
            problems += exc.problems
            return None
        except ValidationError as exc:
            dropped = False
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else ""
                spec = by_name.get(name)
                label = origin.get(name) or (spec.env[0] if spec else name or "settings")
                problems.append(f"{label}: {_message(error, spec)}")
                dropped |= values.pop(name, None) is not None
                failed.add(name)
            if not dropped:
                return None


def _message(error: ErrorDetails, spec: Spec | None) -> str:
    """Pydantic's error in the words of a setting: bounds with why they are there, and a
    parser's or rule's own message (which never quotes a secret)."""
    ctx = error.get("ctx") or {}
    if error["type"] == "value_error":
        return str(ctx.get("error", error["msg"]))
    if error["type"] in _BOUNDS:
        text = _BOUNDS[error["type"]].format(**{k: f"{v:g}" for k, v in ctx.items()})
        return f"{text} ({spec.note})" if spec and spec.note else text
    return error["msg"]


def _lookup(table: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = table
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _unknown_keys(table: Mapping[str, Any]) -> list[str]:
    known = {spec.toml for spec in SPECS}
    sections = {key.split(".")[0] for key in known}
    unknown: list[str] = []
    for section, body in table.items():
        if section not in sections or not isinstance(body, Mapping):
            unknown.append(section)
            continue
        unknown += [f"{section}.{key}" for key in body if f"{section}.{key}" not in known]
    return unknown


def _retired(merged: Mapping[str, str], table: Mapping[str, Any], config_path: object) -> list[str]:
    notices = []
    for env, (toml, why) in RETIRED.items():
        if env in merged:
            notices.append(f"{env}: retired, {why}")
        if _lookup(table, toml)[0]:
            notices.append(f"{config_path} [{toml}]: retired, {why}")
    return notices
