"""config/notifyd.example.toml and docs/settings.md are generated from the one declaration of
every setting (notifyd/settings/model.py), document every setting and load as they stand."""

from __future__ import annotations

import tomllib

from notifyd.settings import SPECS, Settings, example_toml, load_settings, markdown
from tests.helpers import ROOT

EXAMPLE = ROOT / "config" / "notifyd.example.toml"
REFERENCE = ROOT / "docs" / "settings.md"


def test_example_file_is_generated_from_the_declaration() -> None:
    assert EXAMPLE.read_text() == example_toml(), (
        "config/notifyd.example.toml is stale; regenerate it with "
        "`.venv/bin/notifyd settings --example-toml > config/notifyd.example.toml`"
    )


def test_settings_reference_is_generated_from_the_declaration() -> None:
    assert REFERENCE.read_text() == markdown(), (
        "docs/settings.md is stale; regenerate it with "
        "`.venv/bin/notifyd settings --markdown > docs/settings.md`"
    )


def test_example_names_every_setting_and_its_environment_variable() -> None:
    text = EXAMPLE.read_text()
    table = tomllib.loads(text)
    for spec in SPECS:
        node = table
        for part in spec.toml.split("."):
            assert part in node, f"{spec.toml} missing from the example"
            node = node[part]
        assert spec.env[0] in text, f"{spec.env[0]} not mentioned in the example"


def test_reference_names_every_setting_its_key_and_help() -> None:
    text = REFERENCE.read_text()
    for spec in SPECS:
        row = next((line for line in text.splitlines() if f"`{spec.env[0]}`" in line), "")
        assert f"`{spec.toml}`" in row and spec.help in row, spec.name


def test_every_setting_has_help_and_a_type() -> None:
    for spec in SPECS:
        assert spec.help and spec.kind, spec.name


def test_example_loads_and_its_values_are_the_defaults() -> None:
    loaded = load_settings({"JWT_SECRET": "x" * 32}, config_file=EXAMPLE, dotenv_file=None)
    defaults = Settings(jwt_secret="x" * 32)
    assert loaded == defaults
    assert loaded.notices == ()
