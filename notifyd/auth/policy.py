"""Who may do what, by role. The one place a permission is decided.

Handlers ask here and only phrase the refusal (403, or 404 where even existence is private);
no handler compares roles itself. Three roles come from the token: `user` (a person, a
browser-held token), `service` (another backend) and `admin` (a tenant's operator). Services
and admins act for the whole tenant; a user acts for itself.

The send policy (which roles may send which channels) is a setting: by default a plain `user`
may only send in-app notifications, because a browser-held token sending email or SMS to any
address is an abuse channel; an operator whose tokens are all trusted can widen it.
"""

from __future__ import annotations

from collections.abc import Mapping

from notifyd.auth.identity import Identity

TENANT_WIDE = frozenset({"service", "admin"})


def acts_for_tenant(identity: Identity) -> bool:
    """Services and admins act for the whole tenant (see every row, add others to a room),
    not only for themselves."""
    return identity.role in TENANT_WIDE


def only_own(identity: Identity) -> str | None:
    """Whose rows a list shows: None for the whole tenant, else the caller's user id."""
    return None if identity.role in TENANT_WIDE else identity.user_id


# ---------------------------------------------------------------- notifications


def may_send(identity: Identity, channel: str, policy: Mapping[str, frozenset[str]]) -> bool:
    return channel in policy.get(identity.role, frozenset())


def may_send_critical(identity: Identity) -> bool:
    """`critical` bypasses the recipient's opt-outs: not for a browser-held token."""
    return identity.role in TENANT_WIDE


def may_view_notification(identity: Identity, user_id: str | None, created_by: str) -> bool:
    return identity.role in TENANT_WIDE or identity.user_id in (user_id, created_by)


def may_requeue(identity: Identity) -> bool:
    """Sending a failed delivery again is an operator's decision."""
    return identity.role == "admin"


def may_watch_feed(identity: Identity, tenant_id: str, user_id: str) -> bool:
    """A notification socket is its owner's only, whatever the role."""
    return (identity.tenant_id, identity.user_id) == (tenant_id, user_id)


# ---------------------------------------------------------------- reminders


def may_manage_reminders(identity: Identity) -> bool:
    """Reminders are created by the hiring backend (a service) or an admin."""
    return identity.role in TENANT_WIDE


def may_view_reminder(identity: Identity, involved: tuple[str, ...]) -> bool:
    """`involved`: the reminder's candidate, employer and creator."""
    return identity.role in TENANT_WIDE or identity.user_id in involved


def may_change_reminder(identity: Identity, created_by: str, employer_id: str) -> bool:
    return identity.role in TENANT_WIDE or identity.user_id in (created_by, employer_id)


# ---------------------------------------------------------------- recipients and workflows


def may_manage_recipients(identity: Identity) -> bool:
    """Addresses are set by the backend that knows them (a service) or an admin; a user
    changes only their own time zone and locale (`/recipients/me/`)."""
    return identity.role in TENANT_WIDE


def may_read_workflows(identity: Identity) -> bool:
    return identity.role in TENANT_WIDE


def may_write_workflows(identity: Identity) -> bool:
    """A workflow decides what reaches every user of the tenant: an operator's decision."""
    return identity.role == "admin"


def may_trigger_workflows(identity: Identity) -> bool:
    """Triggers and cancels come from the backend (a service) or an admin."""
    return identity.role in TENANT_WIDE


def may_view_workflow_run(identity: Identity, recipient: str) -> bool:
    """A user sees the runs addressed to them; services and admins every run."""
    return identity.role in TENANT_WIDE or identity.user_id == recipient


# ---------------------------------------------------------------- rooms


def may_enter_any_room(identity: Identity, *, dm: bool) -> bool:
    """Services and admins may open any group room of their tenant; a 1-on-1 room is its
    two members' only."""
    return not dm and identity.role in TENANT_WIDE


def may_manage_room(identity: Identity, member_role: str | None) -> bool:
    """Add members (or remove others): the room's owners, and services and admins.
    `member_role` is the caller's role in the room (None: not a member)."""
    return identity.role in TENANT_WIDE or member_role == "owner"


def may_remove_member(identity: Identity, member_role: str | None, user_id: str) -> bool:
    """Anyone may leave; removing someone else is managing the room."""
    return user_id == identity.user_id or may_manage_room(identity, member_role)


# ---------------------------------------------------------------- tenant configuration


def may_read_templates(identity: Identity) -> bool:
    return identity.role in TENANT_WIDE


def may_write_templates(identity: Identity) -> bool:
    return identity.role == "admin"


def may_manage_tenant_settings(identity: Identity) -> bool:
    """Delivery settings hold the tenant's relay credentials."""
    return identity.role == "admin"


def may_manage_webhooks(identity: Identity) -> bool:
    """Webhook endpoints decide where the tenant's events go, and their deliveries carry
    every event's data: an operator's, for reading too."""
    return identity.role == "admin"


def may_read_audit(identity: Identity) -> bool:
    return identity.role == "admin"
