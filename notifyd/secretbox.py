"""Tenant secrets (SMTP passwords, Twilio tokens) encrypted at rest.

A tenant admin hands notifyd credentials for the tenant's own mail server and Twilio account;
a database dump or a read-only replica must not leak them. They are sealed with Fernet
(AES-128-CBC + HMAC-SHA256) under a key only the daemon's configuration holds,
`NOTIFYD_TENANT_SECRET_KEY`.

The key is any string (a passphrase from a secrets manager, not necessarily Fernet's own
format): 32 bytes are derived from it with SHA-256. A comma-separated list rotates keys: the
first one seals new values, every one of them opens old ones, so an operator adds a new key in
front, re-saves (or waits for admins to re-save), and drops the old key later. A key cannot
itself contain a comma.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from notifyd.settings import Settings


class SecretError(Exception):
    """A tenant secret cannot be sealed or opened with the configured key."""


def _fernet(passphrase: str) -> Fernet:
    digest = hashlib.sha256(passphrase.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def parse_keys(value: str) -> list[str]:
    """The keys of a `NOTIFYD_TENANT_SECRET_KEY` value, newest first; blanks dropped."""
    return [part.strip() for part in value.split(",") if part.strip()]


class SecretBox:
    """Seals with the first key, opens with any of them."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("SecretBox needs at least one key")
        self._fernet = MultiFernet([_fernet(key) for key in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox | None:
        """None when no key is configured: secrets then cannot be stored at all."""
        keys = parse_keys(settings.tenant_secret_key)
        return cls(keys) if keys else None

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except (InvalidToken, UnicodeError):
            raise SecretError(
                "a stored tenant secret cannot be decrypted with NOTIFYD_TENANT_SECRET_KEY; "
                "if the key was changed, list the old key after the new one "
                "(comma-separated) or have the tenant admin enter the secret again"
            ) from None

    def __repr__(self) -> str:
        return "SecretBox(***)"
