"""notifyd's settings: each declared once in `model.Settings`, read by `load.load_settings`,
listed by `render` (check-config, config/notifyd.example.toml, docs/settings.md)."""

from notifyd.settings.load import RETIRED, load_settings
from notifyd.settings.model import Settings, SettingsError
from notifyd.settings.render import describe, example_toml, markdown, mask_url
from notifyd.settings.spec import SPECS, Spec
from notifyd.settings.values import (
    CHANNELS,
    DEFAULT_ID_PATTERN,
    DEFAULT_SEND_POLICY,
    EGRESS_DEFAULT_PORTS,
    MAX_REMINDER_LOOKAHEAD,
    ROLES,
    parse_send_policy,
    parse_user_tenants,
)

__all__ = [
    "CHANNELS",
    "DEFAULT_ID_PATTERN",
    "DEFAULT_SEND_POLICY",
    "EGRESS_DEFAULT_PORTS",
    "MAX_REMINDER_LOOKAHEAD",
    "RETIRED",
    "ROLES",
    "SPECS",
    "Settings",
    "SettingsError",
    "Spec",
    "describe",
    "example_toml",
    "load_settings",
    "markdown",
    "mask_url",
    "parse_send_policy",
    "parse_user_tenants",
]
