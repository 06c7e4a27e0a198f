"""Who an operator command acts as, for the audit rows its writes add."""

from __future__ import annotations

import contextlib
import getpass
import socket

from notifyd.store.audit import Author

DEFAULT_ACTOR = "cli"


def cli_author(user_id: str = DEFAULT_ACTOR) -> Author:
    """`user_id` is the audit row's user (and a sent notification's `created_by`); the
    details say the write came from the command line, and from which OS user and host
    (best effort: a container may have no user name)."""
    details = {"via": "cli", "host": socket.gethostname()}
    with contextlib.suppress(KeyError, OSError):
        details["os_user"] = getpass.getuser()
    return Author(user_id, details)
