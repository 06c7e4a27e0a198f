"""Who may do what, by role. The one place a permission is decided.

The send policy (which roles may send which channels) is a setting: by default a plain `user`
may only send in-app notifications, because a browser-held token sending email or SMS to any
address is an abuse channel; an operator whose tokens are all trusted can widen it.
"""

from __future__ import annotations

from collections.abc import Mapping

from notifyd.auth.identity import Identity


def may_send(identity: Identity, channel: str, policy: Mapping[str, frozenset[str]]) -> bool:
    return channel in policy.get(identity.role, frozenset())


def may_manage_reminders(identity: Identity) -> bool:
    """Reminders are created by the hiring backend (a service) or an admin."""
    return identity.is_privileged


def may_change_reminder(identity: Identity, created_by: str, employer_id: str) -> bool:
    return identity.is_privileged or identity.user_id in (created_by, employer_id)


def may_read_audit(identity: Identity) -> bool:
    return identity.role == "admin"


def may_view_notification(identity: Identity, user_id: str | None, created_by: str) -> bool:
    return identity.is_privileged or identity.user_id in (user_id, created_by)
