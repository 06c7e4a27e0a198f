"""config/notifyd.example.toml documents every setting and loads as it stands."""

from __future__ import annotations

import tomllib

from notifyd.settings import SPECS, Settings, load_settings
from tests.helpers import ROOT

EXAMPLE = ROOT / "config" / "notifyd.example.toml"


def test_example_names_every_setting_and_its_environment_variable() -> None:
    text = EXAMPLE.read_text()
    table = tomllib.loads(text)
    for spec in SPECS:
        node = table
        for part in spec.toml.split("."):
            assert part in node, f"{spec.toml} missing from the example"
            node = node[part]
        if spec.name != "send_policy":
            assert spec.env[0] in text, f"{spec.env[0]} not mentioned in the example"


def test_example_loads_and_its_values_are_the_defaults() -> None:
    loaded = load_settings({"JWT_SECRET": "x" * 32}, config_file=EXAMPLE, dotenv_file=None)
    defaults = Settings(jwt_secret="x" * 32)
    assert loaded == defaults
